"""The run folder: <runs_dir>/<exercise>/<run_name>/, who holds it, and fresh / resume / overwrite.

A run name is one plain folder name; a folder is held by one process at a time (<run>/.lock,
flock); nothing is deleted or moved that is not a run folder directly under
<runs_dir>/<exercise>/. --overwrite moves the old run aside (.<name>.replaced-<pid>) and
deletes it only once the new run has its first checkpoint; a replacement that dies before that
gives it back, at exit or, after kill -9, at the next start of that name (docs/usage.md, "Run folders").
"""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import sys

from checkpoint import Checkpoint, load
from config import MAY_CHANGE_ON_RESUME, UserError, check_run_name, plural
from files import TEMP_FILE, cannot_write, copy_file, write_json

try:
    import fcntl  # flock: a claim the kernel drops when its process dies, however it dies
except ImportError:  # Windows: run folders are not claimed (docs/usage.md, "Run folders")
    fcntl = None

LOCK = '.lock'  # <run>/.lock: flock'ed by the process that writes the run; holds "process <pid> on <host>"
_HELD: dict[str, int] = {}  # realpath of a run folder -> the descriptor of its claimed .lock
_REPLACING: list[RunFolder] = []  # replacements holding an old run aside until their first checkpoint


# ---------------------------------------------------------------------------------------------
# Locks and what may be deleted

def check_runs_dir(runs_dir: str, exercise: str) -> None:
    for folder in (runs_dir, os.path.join(runs_dir, exercise)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"--runs_dir: {folder} is not a folder")


def has_run(folder: str) -> bool:
    """Anything in `folder` but a lock: a run (or a stranger's files) is there."""
    return os.path.isdir(folder) and any(name != LOCK for name in os.listdir(folder))


def check_deletable(folder: str, exercise_dir: str) -> None:
    """UserError unless `folder` is a real folder directly under `exercise_dir` (no link, no '..')
    that holds a run (config.json or checkpoints/) or only our own lock and temp files."""
    real = os.path.realpath(folder)
    if os.path.islink(folder) or not os.path.isdir(real) or os.path.dirname(real) != os.path.realpath(exercise_dir):
        raise UserError(f"{folder} is not a run folder directly under {exercise_dir}; not touching it")
    names = os.listdir(real)
    if not ({'config.json', 'checkpoints'} & set(names) or all(n == LOCK or TEMP_FILE.match(n) for n in names)):
        raise UserError(f"{folder} does not look like a run (no config.json, no checkpoints/); not touching it: "
                        f"move it away or choose another --run_name")


def holder(folder: str) -> str:
    """'process <pid> on <host>' when a live process holds `folder`'s lock, else ''. Writes nothing."""
    if fcntl is None or os.path.realpath(folder) in _HELD:
        return ''
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)
    except OSError:
        return ''
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return ''  # free: closing fd below releases it again
    except OSError:
        return os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
    finally:
        os.close(fd)


def claim(folder: str) -> str:
    """Hold `folder`'s lock until release() or this process ends (the kernel drops a flock however a
    process dies). UserError when a live process holds it. Returns who held it last without
    releasing it (a killed process), else ''."""
    key = os.path.realpath(folder)
    if fcntl is None or key in _HELD:  # this process already holds it (an earlier Run of the same run)
        return ''
    path = os.path.join(folder, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        who = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'another process'
        os.close(fd)
        raise UserError(f"run {folder} is in use by {who}: let it finish or stop it first, "
                        f"or choose another --run_name") from None
    previous = os.pread(fd, 200, 0).decode(errors='replace').strip()
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    if not getattr(_at_exit, 'registered', False):  # by the first claim: importing changes nothing
        atexit.register(_at_exit)
        _at_exit.registered = True
    _HELD[key] = fd
    return previous


def release(folder: str) -> None:
    fd = _HELD.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # a clean end: the next claim finds no name, so it reports no take-over
        os.close(fd)


def remove_temp_files(folder: str) -> list[str]:
    """Remove atomic_write temp files left in a run folder (and its checkpoints/) by a process killed
    mid-write. Only our own pattern, only there, and only by the process that holds the run."""
    removed = []
    for where in (folder, os.path.join(folder, 'checkpoints')):
        for name in os.listdir(where) if os.path.isdir(where) else []:
            if TEMP_FILE.match(name) and os.path.isfile(os.path.join(where, name)):
                os.remove(os.path.join(where, name))
                removed.append(os.path.join(where, name))
    return removed


def _at_exit() -> None:
    """However the process ends: a replacement that never checkpointed gives the old run back, and
    every claim is released cleanly."""
    for folder in list(_REPLACING):
        try:
            folder.settle(keep_new=os.path.exists(os.path.join(folder.dir, 'checkpoints', 'last.pt')))
        except (UserError, OSError) as e:
            print(f"warning: {e}; the old run is still at {folder.aside}", file=sys.stderr)
    for key in list(_HELD):
        release(key)


# ---------------------------------------------------------------------------------------------
# One run's folder

class RunFolder:
    """The folder of one run, as rank 0 claims, fills, replaces or gives it back."""

    def __init__(self, path: str, imported: bool = False, import_from: str = '', import_best: str = ''):
        self.dir, self.parent = path, os.path.dirname(path)
        self.imported, self.import_from, self.import_best = imported, import_from, import_best
        self.aside = ''  # the old run an --overwrite replacement keeps until its first checkpoint

    def _claim(self) -> None:
        previous = claim(self.dir)
        if previous:
            print(f"run {self.dir}: took over from {previous}, which ended without releasing it")

    def claim_resumed(self) -> None:
        """Hold the run being resumed; a lock or temp files left by a killed process are taken over."""
        self._claim()
        removed = remove_temp_files(self.dir)
        if removed:
            print(f"run {self.dir}: removed {plural(len(removed), 'temp file')} left by a write that was cut off "
                  f"({', '.join(map(os.path.basename, removed))})")
        self.restore_or_drop_aside()

    def claim_new(self, overwrite: bool) -> None:
        """A fresh or imported run makes the folder its own; an old run there (only with overwrite)
        is moved aside and kept until this run's first checkpoint (settle)."""
        os.makedirs(self.parent, exist_ok=True)
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)  # two processes may both get here: the lock decides
        elif has_run(self.dir) and overwrite:
            check_deletable(self.dir, self.parent)  # nothing, not even a lock, is written into a stranger's folder
        self._claim()
        self.restore_or_drop_aside()
        if has_run(self.dir):
            if not overwrite or self.imported:
                release(self.dir)
                raise UserError(f"run {self.dir} already exists (made by another process just now): "
                                f"choose another --run_name")
            self._move_old_aside()
        if self.imported:
            os.makedirs(os.path.join(self.dir, 'checkpoints'), exist_ok=True)
            copy_file(self.import_from, os.path.join(self.dir, 'checkpoints', 'last.pt'))
            if self.import_best:
                copy_file(self.import_best, os.path.join(self.dir, 'checkpoints', 'best.pt'))
            print(f"{self.import_from} is not in a run folder: copied into {os.path.join(self.dir, 'checkpoints')}, "
                  f"the run continues there")

    def _move_old_aside(self) -> None:
        check_deletable(self.dir, self.parent)
        self.aside = os.path.join(self.parent, f".{os.path.basename(self.dir)}.replaced-{os.getpid()}")
        os.rename(self.dir, self.aside)
        _HELD[os.path.realpath(self.aside)] = _HELD.pop(os.path.realpath(self.dir))
        _REPLACING.append(self)
        os.makedirs(self.dir)
        claim(self.dir)
        print(f"replacing run {self.dir}: the old run is kept as {self.aside} until this run's first checkpoint")

    def settle(self, keep_new: bool) -> None:
        """End an --overwrite replacement: keep_new deletes the old run kept aside; otherwise the new
        run's folder is removed and the old run is put back where it was."""
        if not self.aside:
            return
        if keep_new:
            check_deletable(self.aside, self.parent)
            shutil.rmtree(self.aside)
        else:
            if os.path.exists(self.dir):
                check_deletable(self.dir, self.parent)
                shutil.rmtree(self.dir)
            release(self.dir)
            os.rename(self.aside, self.dir)
            print(f"restored the run {self.dir} that this run was replacing")
        release(self.aside)
        self.aside = ''
        _REPLACING.remove(self)

    def restore_or_drop_aside(self) -> None:
        """With this run claimed, an old run still kept aside (.<name>.replaced-<pid>) belongs to a
        replacement killed before it settled: dropped if the replacement checkpointed, else restored."""
        for aside in self._asides():
            if os.path.realpath(aside) in _HELD or holder(aside):
                continue  # still in the hands of a live replacement (or of this process)
            if os.path.exists(os.path.join(self.dir, 'checkpoints', 'last.pt')):
                check_deletable(aside, self.parent)
                shutil.rmtree(aside)
                continue
            check_deletable(aside, self.parent)
            if os.path.isdir(self.dir):  # the killed replacement's files go; our lock stays in place
                check_deletable(self.dir, self.parent)
                for entry in os.listdir(self.dir):
                    if entry != LOCK:
                        target = os.path.join(self.dir, entry)
                        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
                for entry in os.listdir(aside):
                    if entry != LOCK:
                        os.rename(os.path.join(aside, entry), os.path.join(self.dir, entry))
                shutil.rmtree(aside)
            else:
                os.rename(aside, self.dir)
            print(f"run {self.dir}: restored the run that a replacement killed before its first checkpoint "
                  f"had moved aside")

    def recover_replaced(self) -> None:
        """Before the name is checked: an old run kept aside by a killed replacement is put back, or
        dropped if the replacement had its first checkpoint. Nothing is done while a live process holds it."""
        if not self._asides():
            return
        mine = os.path.realpath(self.dir) in _HELD
        if os.path.isdir(self.dir):
            self._claim()
        self.restore_or_drop_aside()
        if not mine:
            release(self.dir)

    def _asides(self) -> list[str]:
        name = glob.escape(os.path.basename(self.dir))
        return glob.glob(os.path.join(glob.escape(self.parent), f".{name}.replaced-*"))

    def write_config(self, config: dict) -> None:
        """config.json (what ran) and command.txt (every command that ran it, one per line)."""
        write_json(os.path.join(self.dir, 'config.json'), config)
        with open(os.path.join(self.dir, 'command.txt'), 'a') as f:
            f.write(' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\n')

    def remove(self) -> None:
        """A fresh run that failed before its first checkpoint: no stub folder is left behind."""
        if os.path.isdir(self.dir):
            check_deletable(self.dir, self.parent)
            shutil.rmtree(self.dir, ignore_errors=True)
            print(f"removed {self.dir}: the run failed before its first checkpoint")
        self.settle(keep_new=False)
        release(self.dir)


# ---------------------------------------------------------------------------------------------
# Resuming: which folder, which config

def run_dir_of(checkpoint_path: str) -> str:
    """runs/<exercise>/<run>/checkpoints/last.pt -> runs/<exercise>/<run>"""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))


def find_auto(exercise: str, config: dict, name: str) -> tuple[str, str]:
    """resume=auto: (the newest last.pt of an unfinished run of this name or '', the line to print)."""
    base = os.path.join(config['runs_dir'], exercise)
    pattern = glob.escape(config['run_name']) if config['run_name'] else f"{name}-{config['dataset']}-*"
    found = sorted(glob.glob(os.path.join(base, pattern, 'checkpoints', 'last.pt')), key=os.path.getmtime)
    unfinished = [p for p in found if not os.path.exists(os.path.join(run_dir_of(p), 'results.json'))]
    if unfinished:
        return unfinished[-1], f"resume=auto: resuming {unfinished[-1]}"
    if config['run_name'] and found and not config['overwrite']:
        raise UserError(f"resume=auto: run {run_dir_of(found[-1])} is finished (it has results.json); "
                        f"choose another --run_name, or pass --overwrite True to train it again")
    return '', f"resume=auto: no unfinished run matches {os.path.join(base, pattern)}; starting a fresh run"


def check_exercise(ck: Checkpoint, exercise: str) -> None:
    theirs = ck.exercise or os.path.basename(os.path.dirname(run_dir_of(ck.path)))
    if theirs != exercise:
        raise UserError(f"{ck.path} is a checkpoint of {theirs} ({ck.model_class}), not of "
                        f"{exercise}: resume it with {theirs}.py")


def resume_folder(ck: Checkpoint, exercise: str, runs_dir: str, overrides: dict) -> RunFolder:
    """A checkpoint in <runs_dir>/<exercise>/<run>/checkpoints/ continues its run there. Any other
    (copied from a cluster) never gets files written beside it: the run continues in a new folder
    <runs_dir>/<exercise>/<run_name>, into which claim_new copies it as checkpoints/last.pt."""
    real = os.path.realpath(ck.path)
    folder = os.path.dirname(os.path.dirname(real))
    if (os.path.basename(os.path.dirname(real)) == 'checkpoints' and os.path.basename(os.path.dirname(folder))
            == exercise and os.path.isfile(os.path.join(folder, 'config.json'))):
        return RunFolder(folder)
    name = overrides.get('run_name') or ck.run_name or 'resumed'
    check_run_name(name)
    folder = os.path.abspath(os.path.join(runs_dir, exercise, name))
    if os.path.exists(folder):
        raise UserError(f"{ck.path} is not in a run folder (<runs_dir>/{exercise}/<run>/checkpoints/), so it "
                        f"would continue in {folder}, which exists: give another --run_name")
    beside = os.path.join(os.path.dirname(real), 'best.pt')  # the same run's best.pt, copied along with it
    same_run = os.path.isfile(beside) and load(beside).wandb_id == ck.wandb_id
    best = (None if not ck.best_epoch else beside if same_run else
            real if ck.batch == 0 and ck.epoch == ck.best_epoch else '')
    if best == '':
        raise UserError(f"{ck.path} stopped at epoch {ck.epoch} but its best epoch was {ck.best_epoch}, "
                        f"and no best.pt lies beside it: put the run's best.pt there and resume again")
    return RunFolder(folder, imported=True, import_from=ck.path, import_best=best or '')


def resumed_config(ck: Checkpoint, config: dict, overrides: dict, may_change: set[str], folder: str) -> dict:
    """The checkpoint's config, plus the overrides that may change; UserError for the others."""
    old = ck.resumed_config()
    if 'augment' in config:  # absent = trained without augmentation (dataset.load_data), whatever today's
        old.setdefault('augment', False)  # default is (1.1 on mnist): a run resumes as it was trained
    allowed = MAY_CHANGE_ON_RESUME | may_change
    changed = {k: v for k, v in overrides.items() if k not in allowed and old.get(k, config[k]) != v}
    if changed:
        keys = ', '.join(f"{k} ({old.get(k)!r} -> {v!r})" for k, v in changed.items())
        raise UserError(f"resuming {config['resume']} cannot change {keys}: its optimizer, schedule and model "
                        f"state were built with the old values; resume without them, or start a new run")
    # defaults of keys newer than the checkpoint, then the checkpoint's config, then allowed changes
    resumed = {**config, **old, **{k: v for k, v in overrides.items() if k in allowed}}
    resumed['resume'] = config['resume']
    resumed['runs_dir'] = os.path.dirname(os.path.dirname(folder))
    if ck.epoch >= resumed['epochs'] and os.path.exists(os.path.join(folder, 'results.json')):
        raise UserError(f"{config['resume']} finished all {plural(ck.epoch, 'epoch')} and has results.json, so there is "
                        f"nothing to resume: evaluate it with `python evaluate.py {config['resume']}`, or start a new run")
    return resumed
