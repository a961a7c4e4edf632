"""The one training loop.

`train(model, data, run)` fits a classifier with cross-entropy, selects on the validation split
and checkpoints every epoch; every exercise and every study cell goes through it. The run's
record (directory, checkpoints, TensorBoard, W&B) is record.Run.

Under torchrun (docs/many_gpus.md) the same loop runs on every process: all ranks draw the
same permutation and augmentation for the global batch and each trains on its slice, wrapped
in DistributedDataParallel; rank 0 alone writes. Without torchrun nothing of that is active.
"""
from __future__ import annotations

import itertools
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import UserError
from dataset import Data
from evaluate import evaluate
from record import Run, all_reduce_sum, barrier, memory_format, save_checkpoint, use_amp


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


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA RNG state of the run's own device (None off CUDA): a checkpoint must not depend on
    how many GPUs were visible where it was written."""
    return torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


def restore_cuda_rng(state, device: torch.device) -> None:
    """Put back cuda_rng_state's state on `device`. Checkpoints written before it hold a list, one
    state per GPU visible then: the entry of this device's index is used if there is one (a run
    resumed with fewer GPUs visible, or on another index, draws afresh on the missing ones)."""
    if isinstance(state, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        state = state[index] if index < len(state) else None
    if state is not None:
        torch.cuda.set_rng_state(state, device)


# ---------------------------------------------------------------------------------------------
# Model selection and divergence

SELECTION = 'best.pt: highest val/acc; ties go to the lower val/loss, then to the earlier epoch'


def better(val: dict, state: dict) -> bool:
    """Whether this epoch's validation beats the best so far (SELECTION). Small validation sets
    saturate (digits reaches 100%): the first epoch at 100% need not be the best model."""
    return val['acc'] > state['best_val_acc'] or (
        val['acc'] == state['best_val_acc'] and val['loss'] < state['best_val_loss'])


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

def train(model: nn.Module, data: Data, run: Run) -> list[dict]:
    """Train `model` on data.train, select on data.val, checkpoint every epoch; return history.

    last.pt (every epoch, and on SIGINT/SIGTERM mid-epoch) and best.pt (best val/acc) hold the
    model, optimizer, scheduler, RNG states, position in the epoch, history and config, so a
    resumed run continues exactly where it stopped: on the CPU, bitwise. Everything that can be
    refused is checked before run.start(), and a fresh run that fails before its first checkpoint
    leaves no directory behind.
    """
    config, device, rank, world = run.config, run.device, run.rank, run.world
    if not len(data.train) or not len(data.val):
        raise UserError(f"empty split (train {len(data.train)}, val {len(data.val)} samples): "
                        f"--val_split must be between 0 and 1, exclusive, and --subset large enough")
    bs = config['batch_size']
    if bs < world:
        raise UserError(f"--batch_size {bs} is the global batch; it must be >= the {world} processes")
    steps_per_epoch = math.ceil(len(data.train) / bs)
    if config['max_steps']:
        steps_per_epoch = min(steps_per_epoch, config['max_steps'])
    if config.get('sync_bn') and world > 1:
        if device.type != 'cuda':
            raise UserError("--sync_bn True needs CUDA (NCCL); on the CPU each process keeps its own BatchNorm "
                            "statistics")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    mf = memory_format(device, model, config)
    amp = use_amp(device, config)
    if device.type == 'cuda' and mf == torch.channels_last:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    model.to(device=device, memory_format=mf)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, config['epochs'] * steps_per_epoch)
    generator = torch.Generator().manual_seed(config['seed'])  # shuffling, CPU
    augment_generator = torch.Generator(device=device).manual_seed(config['seed'])  # augmentation, on device
    state = dict(epoch=0, batch=0, order=None, sums=torch.zeros(3), seconds=0.0, best_val_acc=-1.0,
                 best_val_loss=math.inf, best_epoch=0, history=[], diverged=None)

    ck = run.checkpoint
    if ck is not None:
        lacking = [k for k in ('optimizer', 'scheduler', 'rng') if not isinstance(ck.get(k), dict)]
        if lacking:
            raise UserError(f"{config['resume']} holds no training state to resume (no {', '.join(lacking)}); "
                            f"expected a last.pt or best.pt written by training.train")
        if ck['model_class'] != type(model).__name__ or ck['model_args'] != model.args:
            raise UserError(f"{config['resume']} holds a {ck['model_class']}{ck['model_args']}, but this run built "
                            f"a {type(model).__name__}{model.args}")
        planned = ck['scheduler'].get('total_steps', ck['scheduler'].get('T_max'))  # onecycle / cosine
        if planned is not None and planned != config['epochs'] * steps_per_epoch:
            raise UserError(f"{config['resume']} was scheduled for {planned} steps, this run would take "
                            f"{config['epochs'] * steps_per_epoch}: resume with its epochs, batch_size and "
                            f"max_steps, or start a new run")
        model.load_state_dict(ck['model'])
        optimizer.load_state_dict(ck['optimizer'])
        scheduler.load_state_dict(ck['scheduler'])
        generator.set_state(ck['rng']['data'])
        torch.set_rng_state(ck['rng']['torch'])
        if 'augment' in ck['rng'] and ck['rng'].get('augment_device', 'cpu') == device.type:
            augment_generator.set_state(ck['rng']['augment'])
        if device.type == 'cuda':
            restore_cuda_rng(ck['rng'].get('cuda'), device)
        state.update({k: ck[k] for k in state if k in ck})
        if rank > 0:  # the checkpoint holds rank 0's partial sums; the others start from zero
            state['sums'] = torch.zeros(3)
    if rank > 0:  # dropout: every process its own draws (model init above was identical on all)
        torch.manual_seed(config['seed'] + 7919 * rank + 104729 * (state['epoch'] * steps_per_epoch + state['batch']))

    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if config['compile']:
        forward = torch.compile(forward)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    ls = config['label_smoothing']
    wrote_checkpoint = False

    def checkpoint(name: str, sums: torch.Tensor) -> None:
        """Rank 0 writes (sums: the global partial sums of the epoch so far); the others wait."""
        nonlocal wrote_checkpoint
        if rank == 0:
            os.makedirs(run.path('checkpoints'), exist_ok=True)
            save_checkpoint(run.path('checkpoints', name), {
                'model': model.state_dict(), 'model_class': type(model).__name__, 'model_args': model.args,
                'exercise': run.exercise, 'wandb_id': run.wandb_id, 'world_size': world,
                'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'rng': {'data': generator.get_state(), 'torch': torch.get_rng_state(),
                        'augment': augment_generator.get_state(), 'augment_device': device.type,
                        'cuda': cuda_rng_state(device)},
                'config': config, **state, 'sums': sums.cpu()})
        wrote_checkpoint = True
        barrier()

    def stop(reason: str, sums: torch.Tensor, code: int) -> None:
        checkpoint('last.pt', sums)
        if rank == 0:
            print(f"{reason}; saved {run.path('checkpoints', 'last.pt')}\n"
                  f"resume with: python {os.path.basename(sys.argv[0])} --resume {run.path('checkpoints', 'last.pt')}",
                  flush=True)
        run.finish()
        sys.exit(code)

    run.start()
    try:
        with StopRequest(speak=rank == 0) as stop_request:
            while state['epoch'] < config['epochs']:
                epoch = state['epoch']
                if state['order'] is None:  # a new epoch; a resumed one keeps its order
                    state['order'] = torch.randperm(len(data.train), generator=generator)
                sums = state['sums'].to(device)  # loss * n, correct, n of this process (no per-step sync)
                model.train()
                t0 = time.perf_counter()
                progress = Progress(steps_per_epoch, state['batch'], f'epoch {epoch + 1}/{config["epochs"]}',
                                    enabled=rank == 0, world=world)
                batches = data.train.batches(bs, state['order'].to(device), start=state['batch'],
                                             generator=augment_generator)
                stopped = False
                for x, y in itertools.islice(batches, steps_per_epoch - state['batch']):
                    n_global = len(y)
                    if world > 1:  # this process's slice of the global batch
                        x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
                    x = x.contiguous(memory_format=mf)
                    with autocast:
                        logits = forward(x)
                        if world == 1:
                            loss = F.cross_entropy(logits, y, label_smoothing=ls)
                        else:  # DDP averages gradients over ranks: this makes it the global batch mean
                            loss = F.cross_entropy(logits, y, label_smoothing=ls, reduction='sum') * world / n_global
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    n = len(y)
                    sums[0] += (loss.detach().float() * n_global / world if world > 1 else loss.detach().float() * n)
                    sums[1] += (logits.argmax(1) == y).sum()
                    sums[2] += n
                    state['batch'] += 1
                    progress.update(sums, n_global)
                    if (stop_request.requested if world == 1 else
                            state['batch'] % 20 == 0 and stop_request.agreed(device)):
                        stopped = True
                        break
                progress.close()
                total = all_reduce_sum(sums.clone())  # every process's sums
                loss_sum, correct, n = total.tolist()  # waits for the GPU, so the time below is real
                seconds = state['seconds'] + time.perf_counter() - t0  # this epoch's training, all sessions
                if stopped:
                    state['seconds'] = seconds
                    if math.isfinite(loss_sum):
                        stop(f"stopped in epoch {epoch + 1} after batch {state['batch']}", total,
                             stop_request.exit_code())
                if not math.isfinite(loss_sum):
                    last = run.path('checkpoints', 'last.pt')
                    kept = (f"The last good checkpoint is {last}" if os.path.exists(last) else
                            "No checkpoint was written: the run had not finished an epoch")
                    raise UserError(f"training loss became {loss_sum} in epoch {epoch + 1}; stopped. {kept}. "
                                    f"Try a lower --lr.")

                if world > 1:  # BatchNorm running stats differ by each rank's last slice: evaluate and
                    import torch.distributed as dist  # checkpoint rank 0's on every rank, as DDP's next step would
                    for buffer in model.buffers():
                        dist.broadcast(buffer, src=0)
                val = evaluate(model, data.val, amp=amp, memory_format=mf)
                row = {'epoch': epoch + 1, 'train/loss': loss_sum / n, 'train/acc': correct / n,
                       'val/loss': val['loss'], 'val/acc': val['acc'], 'lr': optimizer.param_groups[0]['lr'],
                       'epoch_seconds': state['seconds'] + time.perf_counter() - t0,
                       'samples_per_second': n / seconds}
                state.update(epoch=epoch + 1, batch=0, order=None, sums=torch.zeros(3), seconds=0.0)
                state['history'] = state['history'] + [row]
                if state['diverged'] is None:
                    state['diverged'] = diverged(row, data.num_classes, config['lr'])
                    if state['diverged'] and rank == 0:
                        print(f"warning: {state['diverged']['reason']}", flush=True)
                # the epoch's checkpoints first, then its logs: a logger failing cannot cost the epoch
                if better(val, state):
                    state.update(best_val_acc=val['acc'], best_val_loss=val['loss'], best_epoch=epoch + 1)
                    checkpoint('best.pt', state['sums'])
                checkpoint('last.pt', state['sums'])
                if rank == 0 and not run.quiet:
                    print(f"epoch {epoch + 1:3d}/{config['epochs']} | train loss {row['train/loss']:.4f} "
                          f"acc {100 * row['train/acc']:6.2f} | val loss {row['val/loss']:.4f} "
                          f"acc {100 * row['val/acc']:6.2f} | lr {row['lr']:.2e} | {row['epoch_seconds']:5.1f}s "
                          f"{row['samples_per_second']:,.0f} samples/s", flush=True)
                run.log({k: v for k, v in row.items() if k != 'epoch'}, step=epoch + 1)
                wanted = stop_request.requested if world == 1 else stop_request.agreed(device)
                if wanted and state['epoch'] < config['epochs']:
                    stop(f"stopped after epoch {epoch + 1}", state['sums'], stop_request.exit_code())
    except BaseException as e:
        if not wrote_checkpoint and not isinstance(e, SystemExit):
            run.discard()  # a fresh run that died before its first checkpoint leaves no stub
        raise
    run.notes.update(selection=SELECTION, diverged=state['diverged'])  # results.json records both
    return state['history']
