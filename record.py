"""A run's record: its directory, config, checkpoints, figures, TensorBoard and W&B.

training.py (the loop) and evaluate.py (metrics, figures) both write through this module and
nothing here imports them, so the import graph has no cycle.

    run = Run('exercise_1_1', config, overrides, name='mlp')  # checks everything, writes nothing
    ...load data, build the model...
    run.start()          # runs/<exercise>/<name>/: config.json, command.txt, TensorBoard, W&B
    run.log({...}, step); run.log_figure('curves', fig); run.finish(results)

Rules a run keeps (docs/usage.md, "Resume rules"):
- every file is written atomically (atomic_write): a crash leaves the old file or the new one;
- a fresh run never reuses an existing run directory unless config['overwrite'], and then keeps
  the old run aside until its own first checkpoint (docs/usage.md, "Run folders");
- a run folder is held by one process at a time (<run>/.lock); run names are plain folder names,
  and nothing is deleted that is not a run folder directly under <runs_dir>/<exercise>/;
- a write the disk refuses is one line naming the file (cannot_write), never a traceback;
- a resumed run continues its own checkpoint, of its own exercise, with its own config; only
  the keys in config.MAY_CHANGE_ON_RESUME (device, logging, a longer plain schedule...) may
  differ, anything else is refused with one line naming the keys;
- W&B trouble never stops a run: a failing call switches W&B off for the run with one warning.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable

import torch

from config import MAY_CHANGE_ON_RESUME, UserError, check_run_name, plural

try:
    import fcntl  # flock: a claim the kernel drops when its process dies, however it dies
except ImportError:  # Windows: run folders are not claimed (docs/usage.md, "Run folders")
    fcntl = None

CHECKPOINT_KEYS = {'model', 'model_class', 'model_args', 'config'}
UMASK = os.umask(0o022)  # read the process umask (the only way is to set it) ...
os.umask(UMASK)          # ... and put it back


# ---------------------------------------------------------------------------------------------
# Files

def atomic_write(path: str, write: Callable[[IO], Any], binary: bool = True) -> str:
    """write(f) into a temp file beside `path`, fsync, then os.replace: readers see the old file
    or the new one, never half of one. The temp file is removed if anything fails. Returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it 0600; give it the permissions open() would
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno:
            raise cannot_write(path, e) from None
        raise
    return path


def cannot_write(path: str, e: OSError) -> UserError:
    """The one line for a write the filesystem refused (ENOSPC, EFBIG, EROFS, EACCES...): the file and
    the cause. Every write of a run goes through here; the files it had are left as they were."""
    return UserError(f"cannot write {path}: {e.strerror or e}")


def shown_path(path: str) -> str:
    """path relative to the working directory when it lies under it: console lines fit a screen."""
    return os.path.relpath(path) if os.path.abspath(path).startswith(os.getcwd() + os.sep) else path


def write_json(path: str, obj: Any) -> str:
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2), binary=False)


def copy_file(src: str, dst: str) -> str:
    with open(src, 'rb') as f:
        return atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as a PNG (atomically) and free it. Returns path."""
    import matplotlib.pyplot as plt
    try:
        atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120, bbox_inches='tight'))
    finally:
        plt.close(fig)
    return path


def save_checkpoint(path: str, state: dict) -> str:
    # serialised in memory first: torch.save writing to a full disk reports RuntimeError('[enforce fail
    # at inline_container.cc] unexpected pos'), our own f.write reports OSError(ENOSPC) for cannot_write
    def write(f):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        f.write(buffer.getbuffer())
    return atomic_write(path, write)


def load_checkpoint(path: str) -> dict:
    """A checkpoint of this project, loaded with weights_only=True; UserError for anything else."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated, garbage, or pickles that are not plain data
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); nothing was changed") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of this project (needs {sorted(CHECKPOINT_KEYS)})")
    return ckpt


def run_dir_of(checkpoint_path: str) -> str:
    """runs/<exercise>/<run>/checkpoints/last.pt -> runs/<exercise>/<run> (only for paths known to be
    inside a run: Run._resume_dir decides that)"""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))


# ---------------------------------------------------------------------------------------------
# Run folders: what may be deleted, who holds a run (docs/usage.md, "Run folders")

LOCK = '.lock'  # <run>/.lock: flock'ed by the process that writes the run; holds "process <pid> on <host>"
TEMP_FILE = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp$')  # atomic_write's temp files: .<name>.XXXXXXXX.tmp
_HELD: dict[str, int] = {}  # realpath of a run folder -> the descriptor of its claimed .lock
_REPLACING: list = []  # Runs holding an old run aside until their first checkpoint (settled at exit at the latest)


def check_runs_dir(runs_dir: str, exercise: str) -> None:
    for folder in (runs_dir, os.path.join(runs_dir, exercise)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"--runs_dir: {folder} is not a folder")


def has_run(folder: str) -> bool:
    """Anything in `folder` but a lock: a run (or a stranger's files) is there."""
    return os.path.isdir(folder) and any(name != LOCK for name in os.listdir(folder))


def check_deletable(folder: str, exercise_dir: str) -> None:
    """UserError unless `folder` is a real folder directly under `exercise_dir` (no link, no '..')
    that holds a run (config.json or checkpoints/) or only our own lock and temp files. Called before
    anything the engine deletes or moves: a name is never trusted to be what it says."""
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
    process dies, kill -9 included). UserError when a live process holds it. Returns who held it last
    without releasing it (a killed process), else ''."""
    key = os.path.realpath(folder)
    if fcntl is None or key in _HELD:  # this process already holds it (an earlier Run of the same run)
        return ''
    path = os.path.join(folder, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
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


@atexit.register
def _at_exit() -> None:
    """However the process ends (an error, sys.exit): a replacement that never checkpointed gives the
    old run back, and every claim is released cleanly."""
    for run in list(_REPLACING):
        try:
            run._settle(keep_new=os.path.exists(run.path('checkpoints', 'last.pt')))
        except (UserError, OSError) as e:
            print(f"warning: {e}; the old run is still at {run.aside}", file=sys.stderr)
    for key in list(_HELD):
        release(key)


def _quiet_tensorboard_thread(args, previous=threading.excepthook) -> None:
    """TensorBoard's writer thread dies on a full disk with a traceback of its own; its error is
    raised again in the main thread on the next write, where Run reports it in one line."""
    if type(args.thread).__name__ == '_AsyncWriterThread' and isinstance(args.exc_value, OSError):
        return
    previous(args)


threading.excepthook = _quiet_tensorboard_thread


# ---------------------------------------------------------------------------------------------
# Device and precision

def pick_device(name: str) -> torch.device:
    """'auto' = cuda, then mps, then cpu; an explicit device that is not there is a UserError.
    Under torchrun a CUDA device is the process's own: cuda:LOCAL_RANK."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name == 'cuda' and 'LOCAL_RANK' in os.environ and torch.cuda.is_available():
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device auto or cpu")
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu")
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise UserError(f"--device {name}: only cpu, cuda and mps are supported")
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    return device


def use_amp(device: torch.device, config: dict) -> bool:
    """bf16 autocast? config['amp']: auto = on CUDA only, on = CUDA or CPU, off."""
    if config['amp'] == 'auto':
        return device.type == 'cuda'
    return config['amp'] == 'on' and device.type in ('cuda', 'cpu')


def memory_format(device: torch.device, model: torch.nn.Module, config: dict) -> torch.memory_format:
    """channels_last (NHWC) for conv nets: config['channels_last'] auto = on CUDA only, on, off."""
    conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    on = device.type == 'cuda' if config['channels_last'] == 'auto' else config['channels_last'] == 'on'
    return torch.channels_last if conv and on else torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# Many processes: torchrun + DistributedDataParallel (docs/many_gpus.md)
# Without torchrun (no WORLD_SIZE > 1 in the environment) none of this does anything.

def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group first (NCCL on CUDA, else gloo)."""
    import torch.distributed as dist
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank_world()


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, TensorBoard and W&B."""
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over all processes, in place (nothing to do without torchrun). Returns t."""
    if rank_world()[1] > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def from_main(obj: Any) -> Any:
    """Rank 0's value of obj on every process (a run name with a timestamp, say)."""
    if rank_world()[1] == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# The run

class Run:
    """runs/<exercise>/<run_name>/ with config.json, command.txt, checkpoints/, TensorBoard and W&B.

    The constructor only checks and decides (fresh or resumed, which directory, which config);
    start() creates the directory and the loggers, so a run refused or failing before it starts
    leaves nothing behind. training.train() starts its run; scripts that train nothing start
    theirs when they first log.

    With config['resume'] set (a path, or 'auto' for the newest unfinished run of this name),
    the run continues in the checkpoint's directory with the checkpoint's config. A key given on
    the command line (`overrides`) that differs from the checkpoint's value is applied when it is
    in config.MAY_CHANGE_ON_RESUME or `may_change` (keys of the script that do not shape this
    run, such as 1.2's `part`), and refused otherwise.
    """

    def __init__(self, exercise: str, config: dict, overrides: dict | None = None,
                 name: str = 'run', tags: list[str] | None = None, may_change: tuple[str, ...] = (),
                 quiet: bool = False):
        self.exercise, self.tags = exercise, tags or []
        self.started_at = now()  # provenance: when this run (or this resumed session) began
        git_state()  # ... and the code it runs: read once per process, before anyone edits the tree
        # the console's config line: what differs from the script's defaults (config, less the overrides)
        self.defaults = {k: v for k, v in config.items() if k not in (overrides or {})}
        self.quiet = quiet  # a study cell: its caller prints one line for it; warnings still print
        self.rank, self.world = init_distributed(pick_device(config['device']))
        check_runs_dir(config['runs_dir'], exercise)
        config = dict(config)  # resume='auto' resolves into our copy, not the caller's dict
        if config['resume'] == 'auto':
            config['resume'] = from_main(self._find_auto(config, name))
        self.checkpoint = load_checkpoint(config['resume']) if config['resume'] else None
        self.imported = False  # resuming a checkpoint from outside the runs folder (copied in by start())
        self.aside = ''  # the old run that an --overwrite replacement keeps until its first checkpoint
        self.discarding = False  # discard() is undoing start()
        if self.checkpoint is not None:
            self._check_exercise(config['resume'])
            self.dir, self.imported = self._resume_dir(config, overrides or {})
            config = self._resumed_config(config, overrides or {}, set(may_change))
            self.wandb_id = self.checkpoint.get('wandb_id') or _new_wandb_id()
            if not self.imported:  # claimed now, before any work: a run is trained by one process at a time
                self._on_main(self._claim_resumed)
        else:
            run_name = from_main(config['run_name'] or f"{name}-{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")
            check_run_name(run_name)
            self.dir = os.path.abspath(os.path.join(config['runs_dir'], exercise, run_name))
            self._on_main(self._recover_replaced)
            busy = from_main(holder(self.dir) if self.rank == 0 else '')
            if busy:
                raise UserError(f"run {self.dir} is in use by {busy}: let it finish or stop it first, "
                                f"or choose another --run_name")
            taken = from_main(has_run(self.dir))  # rank 0's view; start() claims the folder and checks again
            if taken and config.get('overwrite'):
                check_deletable(self.dir, os.path.dirname(self.dir))  # before any work, and before touching it
            if taken and not config.get('overwrite'):
                last = os.path.join(self.dir, 'checkpoints', 'last.pt')
                how = f"resume it with --resume {last}" if os.path.exists(last) else "delete it"
                raise UserError(f"run {self.dir} already exists: {how}, choose another --run_name, "
                                f"or pass --overwrite True to replace it")
            self.wandb_id = from_main(_new_wandb_id())  # a fresh run never continues an old W&B run
        self.name = os.path.basename(self.dir)
        config['run_name'] = self.name
        self.config = config
        self.device = pick_device(config['device'])
        torch.manual_seed(config['seed'])  # before the script builds its model
        self.started = False
        self.tb = self.wandb = None
        self.step = 0  # the highest step logged: W&B drops any row logged below it
        self.notes: dict = {}  # facts results.json records beside the metrics (training: selection, diverged)

    # -- deciding: fresh or resumed, and with which config ------------------------------------

    def _find_auto(self, config: dict, name: str) -> str:
        """resume=auto: the newest last.pt of an unfinished run of this name, or '' (start fresh)."""
        base = os.path.join(config['runs_dir'], self.exercise)
        pattern = glob.escape(config['run_name']) if config['run_name'] else f"{name}-{config['dataset']}-*"
        found = sorted(glob.glob(os.path.join(base, pattern, 'checkpoints', 'last.pt')), key=os.path.getmtime)
        unfinished = [p for p in found if not os.path.exists(os.path.join(run_dir_of(p), 'results.json'))]
        if unfinished:
            self._say(f"resume=auto: resuming {unfinished[-1]}")
            return unfinished[-1]
        if config['run_name'] and found and not config['overwrite']:
            raise UserError(f"resume=auto: run {run_dir_of(found[-1])} is finished (it has results.json); "
                            f"choose another --run_name, or pass --overwrite True to train it again")
        self._say(f"resume=auto: no unfinished run matches {os.path.join(base, pattern)}; starting a fresh run")
        return ''

    def _check_exercise(self, path: str) -> None:
        exercise = self.checkpoint.get('exercise') or os.path.basename(os.path.dirname(run_dir_of(path)))
        if exercise != self.exercise:
            raise UserError(f"{path} is a checkpoint of {exercise} ({self.checkpoint['model_class']}), not of "
                            f"{self.exercise}: resume it with {exercise}.py")

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def _on_main(self, act: Callable[[], None]) -> None:
        """act() on rank 0 alone; a UserError it raises is raised on every rank, so all of them stop."""
        error = ''
        if self.rank == 0:
            try:
                act()
            except UserError as e:
                error = str(e)
        error = from_main(error)
        if error:
            raise UserError(error)

    def _resume_dir(self, config: dict, overrides: dict) -> tuple[str, bool]:
        """(run folder, imported). A checkpoint in <runs_dir>/<exercise>/<run>/checkpoints/ continues its
        run there. Any other (copied from a cluster, downloaded) never gets files written beside it: the
        run continues in a new folder <runs_dir>/<exercise>/<run_name> (the checkpoint's own run name
        unless --run_name gives one), into which start() copies it as checkpoints/last.pt."""
        path = config['resume']
        real = os.path.realpath(path)
        folder = os.path.dirname(os.path.dirname(real))
        if (os.path.basename(os.path.dirname(real)) == 'checkpoints' and os.path.basename(os.path.dirname(folder))
                == self.exercise and os.path.isfile(os.path.join(folder, 'config.json'))):
            return folder, False
        name = overrides.get('run_name') or self.checkpoint['config'].get('run_name') or 'resumed'
        check_run_name(name)
        folder = os.path.abspath(os.path.join(config['runs_dir'], self.exercise, name))
        if os.path.exists(folder):
            raise UserError(f"{path} is not in a run folder (<runs_dir>/{self.exercise}/<run>/checkpoints/), so it "
                            f"would continue in {folder}, which exists: give another --run_name")
        ck = self.checkpoint
        beside = os.path.join(os.path.dirname(real), 'best.pt')  # the same run's best.pt, copied along with it
        same_run = os.path.isfile(beside) and load_checkpoint(beside).get('wandb_id') == ck.get('wandb_id')
        self.import_best = (None if not ck.get('best_epoch') else beside if same_run else
                            real if ck.get('batch', 0) == 0 and ck.get('epoch') == ck['best_epoch'] else '')
        if self.import_best == '':
            raise UserError(f"{path} stopped at epoch {ck.get('epoch')} but its best epoch was {ck['best_epoch']}, "
                            f"and no best.pt lies beside it: put the run's best.pt there and resume again")
        return folder, True

    def _claim(self) -> None:
        previous = claim(self.dir)
        if previous:
            print(f"run {self.dir}: took over from {previous}, which ended without releasing it")

    def _claim_resumed(self) -> None:
        """Hold the run being resumed; a lock or temp files left by a killed process are taken over."""
        self._claim()
        removed = remove_temp_files(self.dir)
        if removed:
            print(f"run {self.dir}: removed {plural(len(removed), 'temp file')} left by a write that was cut off "
                  f"({', '.join(map(os.path.basename, removed))})")
        self._restore_or_drop_aside()

    def _claim_new(self) -> None:
        """start(), rank 0, a fresh or imported run: make the folder ours. An old run there (only with
        --overwrite, refused otherwise) is moved aside and kept until this run's first checkpoint
        (_settle): a replacement that fails before that gives it back."""
        parent = os.path.dirname(self.dir)
        os.makedirs(parent, exist_ok=True)
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)  # two processes may both get here: the lock decides
        elif has_run(self.dir) and self.config.get('overwrite'):
            check_deletable(self.dir, parent)  # nothing, not even a lock, is written into a stranger's folder
        self._claim()
        self._restore_or_drop_aside()
        if has_run(self.dir):
            if not self.config.get('overwrite') or self.imported:
                release(self.dir)
                raise UserError(f"run {self.dir} already exists (made by another process just now): "
                                f"choose another --run_name")
            check_deletable(self.dir, parent)
            self.aside = os.path.join(parent, f".{self.name}.replaced-{os.getpid()}")
            os.rename(self.dir, self.aside)
            _HELD[os.path.realpath(self.aside)] = _HELD.pop(os.path.realpath(self.dir))
            _REPLACING.append(self)
            os.makedirs(self.dir)
            claim(self.dir)
            print(f"replacing run {self.dir}: the old run is kept as {self.aside} until this run's first checkpoint")
        if self.imported:
            os.makedirs(self.path('checkpoints'), exist_ok=True)
            copy_file(self.config['resume'], self.path('checkpoints', 'last.pt'))
            if self.import_best:
                copy_file(self.import_best, self.path('checkpoints', 'best.pt'))
            print(f"{self.config['resume']} is not in a run folder: copied into {self.path('checkpoints')}, "
                  f"the run continues there")

    def _restore_or_drop_aside(self) -> None:
        """With this run claimed, an old run still kept aside (.<name>.replaced-<pid>) belongs to a
        replacement killed before it settled: dropped if the replacement checkpointed, else restored."""
        parent, name = os.path.split(self.dir)
        for aside in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.replaced-*")):
            if os.path.realpath(aside) in _HELD or holder(aside):
                continue  # still in the hands of a live replacement (or of this process)
            if os.path.exists(self.path('checkpoints', 'last.pt')):
                check_deletable(aside, parent)
                shutil.rmtree(aside)
                continue
            if not os.path.isdir(self.dir):  # the killed replacement's folder is gone already
                check_deletable(aside, parent)
                os.rename(aside, self.dir)
                print(f"run {self.dir}: restored the run that a replacement killed before its first checkpoint "
                      f"had moved aside")
                continue
            check_deletable(self.dir, parent)
            check_deletable(aside, parent)
            for entry in os.listdir(self.dir):  # the killed replacement's files; our lock stays in place
                if entry != LOCK:
                    target = os.path.join(self.dir, entry)
                    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
            for entry in os.listdir(aside):
                if entry != LOCK:
                    os.rename(os.path.join(aside, entry), os.path.join(self.dir, entry))
            shutil.rmtree(aside)
            print(f"run {self.dir}: restored the run that a replacement killed before its first checkpoint "
                  f"had moved aside")

    def _recover_replaced(self) -> None:
        """__init__, rank 0, before the name is checked: an old run kept aside by a replacement that was
        killed (kill -9, a power cut) before it settled is put back, or dropped if the replacement had
        its first checkpoint. Nothing is done while the run is held by a live process."""
        parent, name = os.path.split(self.dir)
        if not glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.replaced-*")):
            return
        mine = os.path.realpath(self.dir) in _HELD
        if os.path.isdir(self.dir):
            self._claim()
        self._restore_or_drop_aside()
        if not mine:
            release(self.dir)

    def _settle(self, keep_new: bool) -> None:
        """End an --overwrite replacement: keep_new deletes the old run kept aside; otherwise the new
        run's folder is removed and the old run is put back where it was."""
        if not self.aside:
            return
        parent = os.path.dirname(self.dir)
        if keep_new:
            check_deletable(self.aside, parent)
            shutil.rmtree(self.aside)
        else:
            if os.path.exists(self.dir):
                check_deletable(self.dir, parent)
                shutil.rmtree(self.dir)
            release(self.dir)
            os.rename(self.aside, self.dir)
            print(f"restored the run {self.dir} that this run was replacing")
        release(self.aside)
        self.aside = ''
        _REPLACING.remove(self)

    def _resumed_config(self, config: dict, overrides: dict, may_change: set[str]) -> dict:
        """The checkpoint's config, plus the overrides that may change; UserError for the others."""
        old = dict(self.checkpoint['config'])
        if isinstance(old.get('amp'), bool):  # checkpoints from before amp took auto | on | off
            old['amp'] = 'auto' if old['amp'] else 'off'
        allowed = MAY_CHANGE_ON_RESUME | may_change
        changed = {k: v for k, v in overrides.items() if k not in allowed and old.get(k, config[k]) != v}
        if changed:
            keys = ', '.join(f"{k} ({old.get(k)!r} -> {v!r})" for k, v in changed.items())
            raise UserError(f"resuming {config['resume']} cannot change {keys}: its optimizer, schedule and model "
                            f"state were built with the old values. Resume without them, or start a new run")
        # defaults of keys newer than the checkpoint, then the checkpoint's config, then allowed changes
        resumed = {**config, **old, **{k: v for k, v in overrides.items() if k in allowed}}
        resumed['resume'] = config['resume']
        resumed['runs_dir'] = os.path.dirname(os.path.dirname(self.dir))
        epoch = self.checkpoint.get('epoch', 0)
        if epoch >= resumed['epochs'] and os.path.exists(os.path.join(self.dir, 'results.json')):
            raise UserError(f"{config['resume']} finished all {plural(epoch, 'epoch')} and has results.json: nothing to "
                            f"resume. Evaluate it with `python evaluate.py {config['resume']}`, or start a new run")
        return resumed

    # -- writing ------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def start(self) -> None:
        """Create the run directory, config.json, command.txt, TensorBoard writer and W&B run."""
        if self.started:
            return
        self.started = True
        if self.rank != 0:  # under torchrun, rank 0 alone writes
            return
        fresh = self.checkpoint is None
        if fresh or self.imported:  # claim the folder; an old run (overwrite) is kept aside, not deleted
            self._claim_new()     # checkpoints/ appears with the first checkpoint
        write_json(self.path('config.json'), self.config)
        with open(self.path('command.txt'), 'a') as f:
            f.write(' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\n')
        if not self.quiet:
            print(f"run {shown_path(self.dir)} on {self.device}" + ('' if fresh else f" (resuming {self.config['resume']})"))
            changed = {k: v for k, v in self.config.items()
                       if k not in ('resume', 'run_name', 'runs_dir') and self.defaults.get(k, object()) != v}
            if changed:  # the full config is in config.json and --help
                print('config ' + ' '.join(f'{k}={v!r}' for k, v in changed.items()))
        from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import
        start = len(self.checkpoint.get('history', [])) if self.checkpoint else 0
        self.tb = SummaryWriter(self.dir, purge_step=start + 1)  # drop epochs a killed run logged twice
        self.step = start
        self._tensorboard_extra('config text', lambda tb: tb.add_text('config', markdown_table(
            [{'key': k, 'value': json.dumps(v)} for k, v in self.config.items()]), start))
        self.wandb = self._init_wandb()

    def discard(self) -> None:
        """Undo start() for a fresh run that failed before writing any checkpoint: no stub run
        directory (an empty run in TensorBoard) is left behind."""
        if (not self.started or self.rank != 0 or self.checkpoint is not None
                or os.path.exists(self.path('checkpoints', 'last.pt'))):
            return
        self.discarding = True  # finish() must not settle the replacement in the new run's favour
        self.finish()
        if os.path.isdir(self.dir):
            check_deletable(self.dir, os.path.dirname(self.dir))
            shutil.rmtree(self.dir, ignore_errors=True)
            print(f"removed {self.dir}: the run failed before its first checkpoint")
        self._settle(keep_new=False)
        release(self.dir)

    def _init_wandb(self):
        """A W&B run, falling back to offline, then to none: W&B trouble never stops training.
        W&B's own console output only with config['wandb_verbose']; one line of ours instead."""
        mode = self.config['wandb']
        if mode == 'off':
            return None
        try:
            import wandb
        except ImportError:
            print("wandb is not installed; W&B logging is off")
            return None
        verbose = self.config.get('wandb_verbose', False)
        for m in [mode, 'offline'] if mode == 'online' else [mode]:
            try:
                run = wandb.init(project=self.config['wandb_project'], group=self.exercise, name=self.name,
                                 id=self.wandb_id, resume='allow', tags=self.tags,
                                 config={**self.config, 'provenance': self.provenance()},  # final one at finish
                                 dir=self.dir, mode=m, settings=wandb.Settings(
                                     init_timeout=60, console='off', silent=not verbose, show_info=verbose))
            except Exception as e:  # noqa: BLE001 - any W&B failure is non-fatal by design
                print(f"W&B {m} init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                continue
            if not self.quiet:  # a study cell's caller prints its one line
                print(f"W&B offline; upload with: wandb sync {shown_path(os.path.dirname(run.dir))}" if m == 'offline'
                      else f"W&B: {run.url}")
            return run
        print("W&B logging is off for this run")
        return None

    def _wandb(self, what: str, call: Callable[[Any], Any]) -> None:
        """call(wandb_run), guarded: the first failure switches W&B off for this run, with one warning."""
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as e:  # noqa: BLE001 - W&B must never cost the run
            print(f"warning: W&B {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"W&B is off for the rest of this run, TensorBoard and checkpoints go on", flush=True)
            self.wandb = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.start()
        if self.tb is None:  # not rank 0
            return
        if os.path.exists(self.path('checkpoints', 'last.pt')):  # training logs after its checkpoints
            self._settle(keep_new=True)
        if step < self.step:  # W&B would drop the row ("less than the current step"): a bug, say so
            print(f"warning: {sorted(metrics)} logged at step {step} after step {self.step}; W&B ignores them",
                  flush=True)
        self.step = max(self.step, step)
        with self._tensorboard():
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        self._wandb('log', lambda w: w.log(metrics, step=step))

    @contextlib.contextmanager
    def _tensorboard(self):
        """A TensorBoard write the disk refuses (its writer thread fails; the next call raises) -> one line."""
        try:
            yield
        except OSError as e:
            self.tb = None  # closing it would raise the same error again
            raise cannot_write(f"TensorBoard events in {self.dir}", e) from None

    def log_figure(self, name: str, fig, step: int | None = None) -> str:
        """Save as <run>/<name>.png, and send to TensorBoard and W&B. Returns the PNG path."""
        self.start()
        path = self.path(f'{name}.png')
        if self.tb is None:  # not rank 0: nothing is written
            import matplotlib.pyplot as plt
            plt.close(fig)
            return path
        step = self.step if step is None else step  # the current step: a W&B log without one advances it
        self.step = max(self.step, step)
        with self._tensorboard():
            self.tb.add_figure(name, fig, step, close=False)
        save_figure(fig, path)

        def send(w):
            import wandb
            w.log({name: wandb.Image(path)}, step=self.step)
        self._wandb(f'figure {name}', send)
        return path

    def log_figures(self, figures: dict, copy_to: str | None = None, prefix: str = '') -> list[str]:
        """log_figure each; with copy_to (the docs' assets/, an explicit opt-in) also copy each
        PNG there as <prefix><name>.png. Returns every path written."""
        paths = []
        for name, fig in figures.items():
            paths.append(self.log_figure(name, fig))
            if copy_to and self.rank == 0:
                os.makedirs(copy_to, exist_ok=True)
                paths.append(copy_file(paths[-1], os.path.join(copy_to, f'{prefix}{name}.png')))
        return paths

    def finish(self, results: dict | None = None) -> None:
        """Close TensorBoard and W&B. With the run's results (results.json's dict): TensorBoard's
        HParams get the config and the numeric results, W&B's summary every result (flat_results)
        and W&B's config the final provenance."""
        if not self.started:
            return
        flat = flat_results(results or {})
        if self.tb is not None:
            if results:
                self._tensorboard_extra('hparams', lambda tb: self._log_hparams(tb, flat))
            with self._tensorboard():
                self.tb.close()
            self.tb = None
        if results:
            self._wandb('summary', lambda w: w.summary.update(flat))
        if results and 'provenance' in results:
            self._wandb('provenance', lambda w: w.config.update({'provenance': results['provenance']},
                                                                allow_val_change=True))
        self._wandb('finish', lambda w: w.finish())
        self.wandb = None
        if not self.discarding:
            self._settle(keep_new=True)  # the run ended well (stopped after a checkpoint, or finished)
            release(self.dir)

    # -- comparing runs: HParams, tables, provenance ---------------------------------------------

    def _log_hparams(self, tb, flat: dict) -> None:
        """TensorBoard's HParams tab: the config as hparams (lists and dicts as JSON text), the
        numeric results as metrics (scalars tagged results/<key>, at the last step)."""
        from torch.utils.tensorboard.summary import hparams
        params = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in self.config.items()}
        metrics = {f'results/{k}': v for k, v in flat.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # no experiment summary: TensorBoard then builds the table from every run's hparams and
        # scalars, so runs of different exercises (different keys) sit in one logdir side by side
        _, start_info, end_info = hparams(params, metrics)
        tb.file_writer.add_summary(start_info)
        for k, v in metrics.items():
            tb.add_scalar(k, v, self.step)
        tb.file_writer.add_summary(end_info)

    def log_table(self, name: str, rows: list[dict]) -> None:
        """A results table (one dict per row) to W&B as a wandb.Table and to TensorBoard as text."""
        self.start()
        if self.tb is None:  # not rank 0
            return
        self._tensorboard_extra(f'table {name}', lambda tb: tb.add_text(name, markdown_table(rows), self.step))
        self._wandb(f'table {name}', lambda w: w.log({name: wandb_table(rows)}, step=self.step))

    def provenance(self, data=None) -> dict:
        return provenance(self.device, self.world, data, self.started_at)

    def _tensorboard_extra(self, what: str, call: Callable[[Any], Any]) -> None:
        """call(SummaryWriter), guarded: an extra TensorBoard record never costs the run."""
        try:
            call(self.tb)
        except Exception as e:  # noqa: BLE001 - logging trouble never stops a run
            print(f"warning: TensorBoard {what} failed ({type(e).__name__}: {e}); the run goes on", flush=True)


def _new_wandb_id() -> str:
    return secrets.token_hex(4)  # 8 hex characters, as W&B's own ids


# ---------------------------------------------------------------------------------------------
# Provenance and tables: what makes runs comparable and traceable (report.py reads them back)

REPO = os.path.dirname(os.path.abspath(__file__))


def now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())


def provenance(device: torch.device | str = 'cpu', world: int = 1, data=None, started: str | None = None) -> dict:
    """Where a result came from: code (git commit, uncommitted changes), exact command line,
    versions, device, world size, data (sample counts and a hash of every split's tensors) and
    times. Never raises: whatever cannot be found says why instead."""
    device = torch.device(device)
    out = {**_guarded(git_state), 'command': shlex.join(getattr(sys, 'orig_argv', sys.argv)), 'cwd': os.getcwd(),
           'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
           **_guarded(lambda: device_info(device)), 'world_size': world,
           'data': _guarded(lambda: data_fingerprint(data)) if data is not None else None,
           'started': started, 'ended': now()}
    return out


def _guarded(call: Callable[[], dict]) -> dict:
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - provenance must never fail a run
        return {'provenance_error': f'{type(e).__name__}: {e}'}


def git_state() -> dict:
    """{'git_commit': sha or why there is none, 'git_dirty': uncommitted changes (None if unknown)}
    of the code this process imported: read at the first call (Run() makes it), then remembered."""
    return dict(_git_state(REPO, os.environ.get('PATH', '')))


@functools.lru_cache(maxsize=None)
def _git_state(repo: str, path: str) -> tuple:  # path: $PATH, part of the key (which git, if any)
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(['git', *args], cwd=repo, capture_output=True, text=True, timeout=10)
    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0:
            return ('git_commit', 'not a git checkout'), ('git_dirty', None)
        status = git('status', '--porcelain')  # tracked changes and untracked files (runs/, data/ are ignored)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return ('git_commit', head.stdout.strip()), ('git_dirty', dirty)
    except FileNotFoundError:
        return ('git_commit', 'git is not installed'), ('git_dirty', None)
    except Exception as e:  # noqa: BLE001 - a timeout, a strange git: provenance never fails a run
        return ('git_commit', f'git failed ({type(e).__name__})'), ('git_dirty', None)


def device_info(device: torch.device) -> dict:
    """The device's name (GPU name, or CPU model) and how many there are (GPUs, or CPU cores)."""
    if device.type == 'cuda':
        return {'device': str(device), 'device_name': torch.cuda.get_device_name(device),
                'device_count': torch.cuda.device_count()}
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
    except OSError:
        pass
    return {'device': str(device), 'device_name': name, 'device_count': os.cpu_count(),
            'torch_threads': torch.get_num_threads()}


def data_fingerprint(data) -> dict:
    """Sample counts and a SHA-256 (16 hex digits) of each split's images and labels exactly as
    trained and tested on (after parsing and splitting): equal hashes, equal data. `data` is a
    dataset.Data, or a fingerprint already made (a dict, passed through)."""
    if isinstance(data, dict):
        return data
    return {'dataset': data.name, **({} if getattr(data, 'canonical', None) is None else {'canonical': data.canonical}),
            **{name: split_fingerprint(getattr(data, name)) for name in ('train', 'val', 'test')}}


def split_fingerprint(split) -> dict:
    """{'samples', 'sha256'} of a split's x and y tensors; never raises (provenance never fails a run)."""
    try:
        h = hashlib.sha256()
        for t in (split.x, split.y):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {'samples': len(split.y), 'sha256': h.hexdigest()[:16]}
    except Exception as e:  # noqa: BLE001
        return {'samples': len(getattr(split, 'y', ())), 'sha256': f'unknown ({type(e).__name__})'}


def flat_results(results: dict, prefix: str = '') -> dict:
    """results.json's scalars (numbers, booleans, strings) with nested keys joined by '/'; lists
    (curves, per-class values) and the provenance block (in the W&B config) are left out."""
    out = {}
    for k, v in results.items():
        if k == 'provenance' and not prefix:
            continue
        if isinstance(v, dict):
            out.update(flat_results(v, f'{prefix}{k}/'))
        elif isinstance(v, (bool, int, float, str)):
            out[f'{prefix}{k}'] = v
    return out


def table_columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _cell(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)


def markdown_table(rows: list[dict]) -> str:
    columns = table_columns(rows)
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
    lines += ['| ' + ' | '.join(str(_cell(row.get(c, ''))) for c in columns) + ' |' for row in rows]
    return '\n'.join(lines)


def wandb_table(rows: list[dict]):
    import wandb
    columns = table_columns(rows)
    return wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows])


def log_tables(exercise: str, config: dict, folder: str, tables: dict[str, list[dict]]) -> None:
    """Tables that belong to no single run (a study's grid) as TensorBoard text in `folder` and as
    wandb.Tables of a short W&B run (job_type 'table', grouped with the exercise's runs). Logging
    trouble prints one warning and never stops the caller."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(folder, exist_ok=True)
        with SummaryWriter(folder) as tb:
            for name, rows in tables.items():
                tb.add_text(name, markdown_table(rows))
    except Exception as e:  # noqa: BLE001 - logging trouble never stops a run
        print(f"warning: TensorBoard tables failed ({type(e).__name__}: {e})")
    if config.get('wandb', 'off') == 'off':
        return
    try:
        import wandb
        verbose = config.get('wandb_verbose', False)
        run = wandb.init(project=config['wandb_project'], group=exercise, job_type='table',
                         name=f'{os.path.basename(folder)}-{time.strftime("%Y%m%d-%H%M%S")}', dir=folder,
                         mode=config['wandb'], config={**config, 'provenance': provenance()}, reinit='create_new',
                         settings=wandb.Settings(init_timeout=60, console='off', silent=not verbose,
                                                 show_info=verbose))
        try:
            run.log({name: wandb_table(rows) for name, rows in tables.items()}, step=0)
        finally:
            run.finish()
    except Exception as e:  # noqa: BLE001
        print(f"warning: W&B tables failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
