"""The one training path: train_run(config) -> train(model, data, run) -> epochs -> steps.

`step` is one optimizer step, `run_epoch` one pass over the training split with validation and
checkpoints, `train` the loop around them; `train_run` is Run -> data -> model -> train ->
evaluate.report, which every exercise, study cell and 2.2/2.3 classifier goes through, and
`cached_run` reuses or resumes a run whose name carries the digest of its settings.
Under torchrun every process runs the same loop on its slice of each global batch (docs/many_gpus.md).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoint import Rngs, TrainState, restore, snapshot
from config import HOW_IT_RUNS, UserError
from dataset import Data, load_data
from device import Prepared, all_reduce_sum, barrier, broadcast_buffers, is_main, prepare
from evaluate import evaluate, report
from record import Run

BuildModel = Callable[[dict, Data], nn.Module]  # (config, data) -> model


# ---------------------------------------------------------------------------------------------
# Optimisation

def make_optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    lr, wd = config['lr'], config['weight_decay']
    if config['optimizer'] == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=config['momentum'],
                               nesterov=config['momentum'] > 0, weight_decay=wd)
    if config['optimizer'] == 'adam':
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if config['optimizer'] == 'adamw':
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    raise UserError(f"unknown optimizer {config['optimizer']!r}; choose adam, adamw or sgd")


def make_scheduler(optimizer: torch.optim.Optimizer, config: dict, total_steps: int):
    """Stepped once per batch, so short and long runs follow the same curve."""
    name = config['scheduler']
    if name == 'none' or (name == 'onecycle' and total_steps < 4):  # too short to warm up and anneal
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == 'cosine':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if name == 'onecycle':
        # warm up for a quarter of the run; at least 2 steps, or OneCycleLR divides by zero (smoke runs)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config['lr'], total_steps=total_steps,
                                                   pct_start=min(0.5, max(0.25, 2 / total_steps)))
    raise UserError(f"unknown scheduler {name!r}; choose none, cosine or onecycle")


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step and checkpoint; the run then
    exits with 128 + the signal's number, as the shell reports a process the signal ended
    (130 for Ctrl-C, 143 for SIGTERM). A second Ctrl-C interrupts at once. Under torchrun only
    rank 0 says so (`speak`): torchrun passes one signal on to every rank."""

    def __init__(self, speak: bool = True):
        self.requested, self.signum, self.speak = False, 0, speak

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum
        if self.speak:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device) -> bool:
        """Whether any process was asked to stop: every rank must stop at the same step. Also
        agrees on the exit code: SIGTERM's if any rank got one, else SIGINT's."""
        got = torch.tensor([float(self.signum == signal.SIGINT), float(self.signum == signal.SIGTERM)], device=device)
        sigint, sigterm = all_reduce_sum(got).tolist()
        if sigint or sigterm:
            self.signum = signal.SIGTERM if sigterm else signal.SIGINT
        return bool(sigint or sigterm)

    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)


class Progress:
    """A tqdm bar on a terminal; elsewhere (nohup, notebooks, cluster logs, CI) a short line
    every 10% of an epoch (at most one per 5 s) or every 30 s, with the running loss (this process's)
    and samples/s of all processes together, the rate the epoch line shows."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, world: int = 1):
        self.tty = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.tty
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not self.tty)
        self.total, self.step, self.desc = total, initial, desc
        self.every = max(1, total // 10)
        self.t0 = self.last = time.perf_counter()
        self.samples = 0  # of all processes, timed here (not those trained before a resume)
        self.loss_label = 'loss (rank 0)' if world > 1 else 'loss'  # summing it over ranks would sync them all

    def update(self, sums: torch.Tensor, samples: int) -> None:
        """sums = (loss * n, correct, n) of this process on the device, read (a GPU sync) only when
        printing; samples = this step's global batch (every process's slice together)."""
        self.step += 1
        self.samples += samples
        if self.tty:
            self.bar.update()
            if self.step % 50 == 0:
                self.bar.set_postfix(loss=f'{sums[0].item() / sums[2].item():.4f}')
        elif self.lines and self.step < self.total and (  # at most every 5 s: short runs stay quiet
                (self.step % self.every == 0 and time.perf_counter() - self.last > 5)
                or time.perf_counter() - self.last > 30):
            loss, _, n = sums.tolist()
            now = time.perf_counter()
            rate = self.samples / (now - self.t0)
            print(f"  {self.desc} {100 * self.step / self.total:3.0f}% | {self.loss_label} {loss / n:.4f} | "
                  f"{rate:,.0f} samples/s", flush=True)
            self.last = now

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# Model selection and divergence

SELECTION = 'best.pt: highest val/acc; ties go to the lower val/loss, then to the earlier epoch'


def better(val: dict, state: TrainState) -> bool:
    """Whether this epoch's validation beats the best so far (SELECTION). Small validation sets
    saturate (digits reaches 100%): the first epoch at 100% need not be the best model."""
    return val['acc'] > state.best_val_acc or (val['acc'] == state.best_val_acc and val['loss'] < state.best_val_loss)


DIVERGED = 5  # x ln(classes): a uniform guess scores 1x; a learning run never averages 5x over an epoch


def diverged(row: dict, num_classes: int, lr: float) -> dict | None:
    """{'epoch', 'reason'} when this epoch's loss exploded but stayed finite (a non-finite one
    stops the run); None otherwise. The run goes on (a one-cycle warm-up can recover), but says so."""
    limit = DIVERGED * math.log(num_classes)
    if row['train/loss'] <= limit and row['val/loss'] <= limit:
        return None
    return {'epoch': row['epoch'],
            'reason': f"diverging in epoch {row['epoch']}: train loss {row['train/loss']:.4g}, val loss "
                      f"{row['val/loss']:.4g} (over {DIVERGED} x ln({num_classes}) = {limit:.1f}). Likely cause: too high "
                      f"a learning rate; try --lr {lr / 10:g}"}


# ---------------------------------------------------------------------------------------------
# The loop

@dataclass
class Loop:
    """What one training run holds while it trains."""
    run: Run
    data: Data
    net: Prepared
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rngs: Rngs
    state: TrainState
    steps: int  # optimizer steps per epoch
    wrote_checkpoint: bool = False


def step(loop: Loop, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
    """One optimizer step on a global batch (x, y); adds (loss * n, correct, n) of this process to sums."""
    rank, world, n_global = loop.run.rank, loop.run.world, len(y)
    if world > 1:  # this process's slice of the global batch
        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    x = x.contiguous(memory_format=loop.net.memory_format)
    ls = loop.run.config['label_smoothing']
    with loop.net.autocast:
        logits = loop.net.forward(x)
        if world == 1:
            loss = F.cross_entropy(logits, y, label_smoothing=ls)
        else:  # DDP averages gradients over ranks: this makes it the global batch mean
            loss = F.cross_entropy(logits, y, label_smoothing=ls, reduction='sum') * world / n_global
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loop.optimizer.step()
    loop.scheduler.step()
    sums[0] += loss.detach().float() * n_global / world if world > 1 else loss.detach().float() * len(y)
    sums[1] += (logits.argmax(1) == y).sum()
    sums[2] += len(y)


def train_epoch(loop: Loop, stop_request: StopRequest) -> tuple[torch.Tensor, bool]:
    """The rest of the current epoch (a resumed one continues its order). Returns (sums, stopped)."""
    run, state, device = loop.run, loop.state, loop.run.device
    if state.order is None:  # a new epoch
        state.order = torch.randperm(len(loop.data.train), generator=loop.rngs.data)
    sums = state.sums.to(device)  # loss * n, correct, n of this process (no per-step sync)
    loop.net.model.train()
    progress = Progress(loop.steps, state.batch, f"epoch {state.epoch + 1}/{run.config['epochs']}",
                        enabled=run.rank == 0, world=run.world)
    batches = loop.data.train.batches(run.config['batch_size'], state.order.to(device), start=state.batch,
                                      generator=loop.rngs.augment)
    for x, y in itertools.islice(batches, loop.steps - state.batch):
        step(loop, x, y, sums)
        state.batch += 1
        progress.update(sums, len(y))
        if stop_request.requested if run.world == 1 else state.batch % 20 == 0 and stop_request.agreed(device):
            progress.close()
            return sums, True
    progress.close()
    return sums, False


def run_epoch(loop: Loop, stop_request: StopRequest) -> None:
    """Train, validate, checkpoint (best.pt, last.pt), then print and log the epoch's row."""
    run, state, model = loop.run, loop.state, loop.net.model
    t0 = time.perf_counter()
    sums, stopped = train_epoch(loop, stop_request)
    total = all_reduce_sum(sums.clone())  # every process's sums
    loss_sum, correct, n = total.tolist()  # waits for the GPU, so the time below is real
    seconds = state.seconds + time.perf_counter() - t0  # this epoch's training, all sessions
    if stopped:
        state.seconds = seconds
        if math.isfinite(loss_sum):
            stop(loop, f"stopped in epoch {state.epoch + 1} after batch {state.batch}", total, stop_request.exit_code())
    check_finite(loss_sum, state.epoch + 1, run)
    broadcast_buffers(model)  # evaluate and checkpoint rank 0's BatchNorm statistics, as DDP's next step would
    val = evaluate(model, loop.data.val, amp=loop.net.amp, memory_format=loop.net.memory_format)
    row = {'epoch': state.epoch + 1, 'train/loss': loss_sum / n, 'train/acc': correct / n,
           'val/loss': val['loss'], 'val/acc': val['acc'], 'train/lr': loop.optimizer.param_groups[0]['lr'],
           'train/epoch_seconds': state.seconds + time.perf_counter() - t0, 'train/samples_per_second': n / seconds}
    state.epoch, state.batch, state.order, state.sums, state.seconds = state.epoch + 1, 0, None, torch.zeros(3), 0.0
    state.history = state.history + [row]
    if state.diverged is None:
        state.diverged = diverged(row, loop.data.num_classes, run.config['lr'])
        if state.diverged and run.rank == 0:
            print(f"warning: {state.diverged['reason']}", flush=True)
    # the epoch's checkpoints first, then its logs: a logger failing cannot cost the epoch
    if better(val, state):
        state.best_val_acc, state.best_val_loss, state.best_epoch = val['acc'], val['loss'], row['epoch']
        checkpoint(loop, 'best.pt', state.sums)
    checkpoint(loop, 'last.pt', state.sums)
    if run.rank == 0 and not run.quiet:
        print(epoch_line(row, run.config['epochs']), flush=True)
    run.log({k: v for k, v in row.items() if k != 'epoch'}, step=row['epoch'])
    wanted = stop_request.requested if run.world == 1 else stop_request.agreed(run.device)
    if wanted and state.epoch < run.config['epochs']:
        stop(loop, f"stopped after epoch {row['epoch']}", state.sums, stop_request.exit_code())


def train(model: nn.Module, data: Data, run: Run) -> list[dict]:
    """Train `model` on data.train, select on data.val, checkpoint every epoch; return the history.

    last.pt (every epoch, and on SIGINT/SIGTERM mid-epoch) and best.pt (SELECTION) hold all
    training state (checkpoint.snapshot), so a resumed run continues exactly where it stopped: on
    the CPU, bitwise. Everything that can be refused is checked before run.start(), and a fresh
    run that fails before its first checkpoint leaves no folder behind.
    """
    loop = setup(model, data, run)
    run.start()
    try:
        with StopRequest(speak=run.rank == 0) as stop_request:
            while loop.state.epoch < run.config['epochs']:
                run_epoch(loop, stop_request)
    except BaseException as e:
        if not loop.wrote_checkpoint and not isinstance(e, SystemExit):
            run.discard()  # a fresh run that died before its first checkpoint leaves no stub
        raise
    run.notes.update(selection=SELECTION, diverged=loop.state.diverged)  # results.json records both
    return loop.state.history


# ---------------------------------------------------------------------------------------------
# Around the loop: set-up, checkpoints, stopping, the epoch line

def steps_per_epoch(data: Data, config: dict, world: int) -> int:
    if not len(data.train) or not len(data.val):
        raise UserError(f"empty split (train {len(data.train)}, val {len(data.val)} samples): "
                        f"--val_split must be between 0 and 1, exclusive, and --subset large enough")
    if config['batch_size'] < world:
        raise UserError(f"--batch_size {config['batch_size']} is the global batch; it must be >= the {world} processes")
    steps = math.ceil(len(data.train) / config['batch_size'])
    return min(steps, config['max_steps']) if config['max_steps'] else steps


def setup(model: nn.Module, data: Data, run: Run) -> Loop:
    """The model on its device, optimizer, scheduler, RNGs, and the checkpoint's state when resuming."""
    config, device, rank = run.config, run.device, run.rank
    steps = steps_per_epoch(data, config, run.world)
    net = prepare(model, device, config, run.world)
    optimizer = make_optimizer(net.model, config)
    scheduler = make_scheduler(optimizer, config, config['epochs'] * steps)
    rngs = Rngs(data=torch.Generator().manual_seed(config['seed']),
                augment=torch.Generator(device=device).manual_seed(config['seed']))
    state = TrainState()
    if run.checkpoint is not None:
        state = restore(run.checkpoint, net.model, optimizer, scheduler, rngs, device, config['epochs'] * steps)
        if rank > 0:  # the checkpoint holds rank 0's partial sums; the others start from zero
            state.sums = torch.zeros(3)
    if rank > 0:  # dropout: every process its own draws (model init was identical on all)
        torch.manual_seed(config['seed'] + 7919 * rank + 104729 * (state.epoch * steps + state.batch))
    return Loop(run, data, net, optimizer, scheduler, rngs, state, steps)


def checkpoint(loop: Loop, name: str, sums: torch.Tensor) -> None:
    """Rank 0 writes checkpoints/<name> (sums: the global partial sums of the epoch so far); the others wait."""
    run = loop.run
    if run.rank == 0:
        run.save_checkpoint(name, snapshot(loop.net.model, loop.optimizer, loop.scheduler, loop.rngs, loop.state,
                                           sums, run.config, run.exercise, run.wandb_id, run.world, run.device))
    loop.wrote_checkpoint = True
    barrier()


def stop(loop: Loop, reason: str, sums: torch.Tensor, code: int) -> None:
    """Checkpoint where training stands, say how to resume, and exit with `code`."""
    run = loop.run
    checkpoint(loop, 'last.pt', sums)
    if run.rank == 0:
        last = run.path('checkpoints', 'last.pt')
        print(f"{reason}; saved {last}\nresume with: python {os.path.basename(sys.argv[0])} --resume {last}", flush=True)
    run.finish()
    sys.exit(code)


def check_finite(loss_sum: float, epoch: int, run: Run) -> None:
    if not math.isfinite(loss_sum):
        last = run.path('checkpoints', 'last.pt')
        kept = (f"The last good checkpoint is {last}" if os.path.exists(last) else
                "No checkpoint was written: the run had not finished an epoch")
        raise UserError(f"training loss became {loss_sum} in epoch {epoch}, so the run stopped: try a lower --lr ({kept})")


def epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:3d}/{epochs} | train loss {row['train/loss']:.4f} acc {100 * row['train/acc']:6.2f} "
            f"| val loss {row['val/loss']:.4f} acc {100 * row['val/acc']:6.2f} | lr {row['train/lr']:.2e} | "
            f"{row['train/epoch_seconds']:5.1f}s {row['train/samples_per_second']:,.0f} samples/s")


# ---------------------------------------------------------------------------------------------
# One run, and a run reused by the digest of its settings

def train_run(exercise: str, config: dict, build_model: BuildModel, overrides: dict | None = None,
              name: str = 'run', may_change: tuple[str, ...] = (), tags: list[str] | None = None,
              make_data: Callable[[dict, torch.device], Data] = load_data, quiet: bool = False) -> dict:
    """One run: Run -> make_data -> build_model -> train -> report. Returns results.json's dict.
    may_change: the script's keys that a resume may change (they do not shape this run).
    tags: W&B tags (default: the config's model and depth, where it has them).
    quiet: no run, epoch and test lines (a study cell: cached_run prints one line for it)."""
    if tags is None:
        tags = ([config['model']] if 'model' in config else []) + ([f"depth={config['depth']}"] if 'depth' in config else [])
    run = Run(exercise, config, overrides, name=name, tags=tags, may_change=may_change, quiet=quiet)
    config = run.config  # the checkpoint's, when resuming
    data = make_data(config, run.device)
    model = build_model(config, data)
    history = train(model, data, run)
    results = report(run, model, data, history)
    barrier()  # rank 0 has written results.json
    return results


def digest(obj) -> str:
    """8 hex digits of a hash of obj (as JSON): part of a run name that changes whenever obj does."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def cached_run(exercise: str, config: dict, run_name: str, build_model: BuildModel,
               make_data: Callable[[dict, torch.device], Data] = load_data,
               tags: list[str] | None = None, quiet: bool = False) -> tuple[str, dict]:
    """runs/<exercise>/<run_name>, a name that carries the digest of the settings it stands for:
    reused when it finished (results.json), resumed from its last.pt when it was interrupted (where
    and how it runs, config.HOW_IT_RUNS, from this command, not from the checkpoint), else trained.
    Returns (run folder, results.json's dict). quiet: one line for the run (a study cell)."""
    run_dir = os.path.join(config['runs_dir'], exercise, run_name)
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    if os.path.exists(os.path.join(run_dir, 'results.json')):
        how = 'skip (done, same settings)'
        if not quiet and is_main():
            print(f"skip {run_dir}: done, same settings")
    else:  # a folder without last.pt never checkpointed: nothing in it to keep
        how = f'trained, resuming {last}' if os.path.exists(last) else 'trained'
        cell = {**config, 'run_name': run_name, 'overwrite': True, 'resume': last if os.path.exists(last) else ''}
        train_run(exercise, cell, build_model, {k: cell[k] for k in HOW_IT_RUNS if k in cell},
                  tags=tags, make_data=make_data, quiet=quiet)
    with open(os.path.join(run_dir, 'results.json')) as f:
        results = json.load(f)
    if quiet and is_main():
        print(f"{run_name}: test acc {100 * results['test_acc']:.2f}% (best val {100 * results['best_val_acc']:.2f}%), "
              f"{results['train_seconds']:.1f}s, {how}", flush=True)
    return run_dir, results
