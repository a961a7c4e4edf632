"""A run's record: its directory, config, checkpoints, figures, TensorBoard and W&B.

training.py (the loop) and evaluate.py (metrics, figures) both write through this module and
nothing here imports them, so the import graph has no cycle.

    run = Run('exercise_1_1', config, overrides, name='mlp')  # checks everything, writes nothing
    ...load data, build the model...
    run.start()          # runs/<exercise>/<name>/: config.json, command.txt, TensorBoard, W&B
    run.log({...}, step); run.log_figure('curves', fig); run.finish(summary)

Rules a run keeps (README, "Runs you can trust"):
- every file is written atomically (atomic_write): a crash leaves the old file or the new one;
- a fresh run never reuses an existing run directory unless config['overwrite'];
- a resumed run continues its own checkpoint, of its own exercise, with its own config; only
  the keys in config.MAY_CHANGE_ON_RESUME (device, logging, a longer plain schedule...) may
  differ, anything else is refused with one line naming the keys;
- W&B trouble never stops a run: a failing call switches W&B off for the run with one warning.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from typing import IO, Any, Callable

import torch

from config import MAY_CHANGE_ON_RESUME, UserError, plural

CHECKPOINT_KEYS = {'model', 'model_class', 'model_args', 'config'}
UMASK = os.umask(0o022)  # read the process umask (the only way is to set it) ...
os.umask(UMASK)          # ... and put it back


# ---------------------------------------------------------------------------------------------
# Files

def atomic_write(path: str, write: Callable[[IO], Any], binary: bool = True) -> str:
    """write(f) into a temp file beside `path`, fsync, then os.replace: readers see the old file
    or the new one, never half of one. The temp file is removed if anything fails. Returns path."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes it 0600; give it the permissions open() would
        with os.fdopen(fd, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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
    return atomic_write(path, lambda f: torch.save(state, f))


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
    """runs/<exercise>/<run>/checkpoints/last.pt -> runs/<exercise>/<run>"""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))


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
# Many processes: torchrun + DistributedDataParallel (README, "Many GPUs")
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
        # the console's config line: what differs from the script's defaults (config, less the overrides)
        self.defaults = {k: v for k, v in config.items() if k not in (overrides or {})}
        self.quiet = quiet  # a study cell: its caller prints one line for it; warnings still print
        self.rank, self.world = init_distributed(pick_device(config['device']))
        config = dict(config)  # resume='auto' resolves into our copy, not the caller's dict
        if config['resume'] == 'auto':
            config['resume'] = from_main(self._find_auto(config, name))
        self.checkpoint = load_checkpoint(config['resume']) if config['resume'] else None
        if self.checkpoint is not None:
            self._check_exercise(config['resume'])
            config = self._resumed_config(config, overrides or {}, set(may_change))
            self.dir = run_dir_of(config['resume'])
            self.wandb_id = self.checkpoint.get('wandb_id') or _new_wandb_id()
        else:
            run_name = from_main(config['run_name'] or f"{name}-{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")
            self.dir = os.path.abspath(os.path.join(config['runs_dir'], exercise, run_name))
            taken = from_main(os.path.exists(self.dir) and bool(os.listdir(self.dir)))  # rank 0's view: no race
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
        self.notes: dict = {}  # facts results.json records beside the metrics (training: selection, diverged)

    # -- deciding: fresh or resumed, and with which config ------------------------------------

    def _find_auto(self, config: dict, name: str) -> str:
        """resume=auto: the newest last.pt of an unfinished run of this name, or '' (start fresh)."""
        base = os.path.join(config['runs_dir'], self.exercise)
        pattern = config['run_name'] or f"{name}-{config['dataset']}-*"
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
        resumed['runs_dir'] = os.path.dirname(os.path.dirname(run_dir_of(config['resume'])))
        epoch = self.checkpoint.get('epoch', 0)
        if epoch >= resumed['epochs'] and os.path.exists(os.path.join(run_dir_of(config['resume']), 'results.json')):
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
        if fresh and os.path.exists(self.dir):  # only with overwrite (checked in __init__)
            shutil.rmtree(self.dir)
        os.makedirs(self.dir, exist_ok=True)  # checkpoints/ appears with the first checkpoint
        write_json(self.path('config.json'), self.config)
        with open(self.path('command.txt'), 'a') as f:
            f.write(' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\n')
        if not self.quiet:
            print(f"run {self.dir} on {self.device}" + ('' if fresh else f" (resuming {self.config['resume']})"))
            changed = {k: v for k, v in self.config.items()
                       if k not in ('resume', 'run_name', 'runs_dir') and self.defaults.get(k, object()) != v}
            if changed:  # the full config is in config.json and --help
                print('config ' + ' '.join(f'{k}={v!r}' for k, v in changed.items()))
        from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import
        start = len(self.checkpoint.get('history', [])) if self.checkpoint else 0
        self.tb = SummaryWriter(self.dir, purge_step=start + 1)  # drop epochs a killed run logged twice
        self.wandb = self._init_wandb()

    def discard(self) -> None:
        """Undo start() for a fresh run that failed before writing any checkpoint: no stub run
        directory (an empty run in TensorBoard) is left behind."""
        if (not self.started or self.rank != 0 or self.checkpoint is not None
                or os.path.exists(self.path('checkpoints', 'last.pt'))):
            return
        self.finish()
        shutil.rmtree(self.dir, ignore_errors=True)
        print(f"removed {self.dir}: the run failed before its first checkpoint")

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
                                 id=self.wandb_id, resume='allow', config=self.config, tags=self.tags,
                                 dir=self.dir, mode=m, settings=wandb.Settings(
                                     init_timeout=60, console='off', silent=not verbose, show_info=verbose))
            except Exception as e:  # noqa: BLE001 - any W&B failure is non-fatal by design
                print(f"W&B {m} init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                continue
            if not self.quiet:  # a study cell's caller prints its one line
                print(f"W&B offline; upload with: wandb sync {os.path.dirname(run.dir)}" if m == 'offline'
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
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self._wandb('log', lambda w: w.log(metrics, step=step))

    def log_figure(self, name: str, fig, step: int | None = None) -> str:
        """Save as <run>/<name>.png, and send to TensorBoard and W&B. Returns the PNG path."""
        self.start()
        path = self.path(f'{name}.png')
        if self.tb is None:  # not rank 0: nothing is written
            import matplotlib.pyplot as plt
            plt.close(fig)
            return path
        self.tb.add_figure(name, fig, step, close=False)
        save_figure(fig, path)

        def send(w):
            import wandb
            w.log({name: wandb.Image(path)})
        self._wandb(f'figure {name}', send)
        return path

    def log_figures(self, figures: dict, copy_to: str | None = None, prefix: str = '') -> list[str]:
        """log_figure each; with copy_to (the README's assets/, an explicit opt-in) also copy each
        PNG there as <prefix><name>.png. Returns every path written."""
        paths = []
        for name, fig in figures.items():
            paths.append(self.log_figure(name, fig))
            if copy_to and self.rank == 0:
                os.makedirs(copy_to, exist_ok=True)
                paths.append(copy_file(paths[-1], os.path.join(copy_to, f'{prefix}{name}.png')))
        return paths

    def finish(self, summary: dict | None = None) -> None:
        if not self.started:
            return
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if summary:
            self._wandb('summary', lambda w: w.summary.update(summary))
        self._wandb('finish', lambda w: w.finish())
        self.wandb = None


def _new_wandb_id() -> str:
    return secrets.token_hex(4)  # 8 hex characters, as W&B's own ids
