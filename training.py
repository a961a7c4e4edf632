"""The one training loop, and the run it writes to.

`Run` owns a run directory (config.json, checkpoints/, TensorBoard events, figures, W&B).
`train(model, data, run)` fits a classifier with cross-entropy and returns the per-epoch
history; every exercise and every study row goes through it.
"""
from __future__ import annotations

import glob
import itertools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from config import UserError
from dataset import Data
from evaluate import evaluate, load_checkpoint, save_figure


# ---------------------------------------------------------------------------------------------
# Run: directory, loggers, checkpoints

def pick_device(name: str) -> torch.device:
    if name != 'auto':
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device('cuda')
    if torch.backends.mps.is_available():
        return torch.device('mps')
    return torch.device('cpu')


def write_json(path: str, obj: Any) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic like write_json: torch.save to a temp file in the same folder, then os.replace."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Run:
    """runs/<exercise>/<run_name>/ with config.json, checkpoints/, TensorBoard events and W&B.

    With config['resume'] set, the run continues in the checkpoint's directory with the
    checkpoint's config; keys given on the command line (`overrides`) still apply.
    """

    def __init__(self, exercise: str, config: dict, overrides: dict | None = None,
                 name: str = 'run', tags: list[str] | None = None):
        self.exercise = exercise
        config = dict(config)  # resume='auto' resolves into our copy, not the caller's dict
        self.checkpoint = self._find_resume(config, name)
        if self.checkpoint is not None:
            path = config['resume']
            config = {**self.checkpoint['config'], **(overrides or {}), 'resume': path}
            self.dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            self.name = os.path.basename(self.dir)
        else:
            self.name = config['run_name'] or f"{name}-{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.dir = os.path.join(config['runs_dir'], exercise, self.name)
        self.config = config
        self.device = pick_device(config['device'])
        os.makedirs(os.path.join(self.dir, 'checkpoints'), exist_ok=True)
        write_json(os.path.join(self.dir, 'config.json'), config)
        with open(os.path.join(self.dir, 'command.txt'), 'a') as f:
            f.write(' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\n')
        print(f"run {self.dir} on {self.device}" + (f" (resuming {config['resume']})" if self.checkpoint else ''))
        print('config ' + ' '.join(f'{k}={v!r}' for k, v in config.items()))
        torch.manual_seed(config['seed'])  # before the script builds its model

        from torch.utils.tensorboard import SummaryWriter  # lazy: heavy import
        start = len(self.checkpoint['history']) if self.checkpoint else 0
        self.tb = SummaryWriter(self.dir, purge_step=start + 1)  # drop epochs a killed run logged twice
        self.wandb = self._init_wandb(tags or [])

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def _find_resume(self, config: dict, name: str) -> dict | None:
        resume = config['resume']
        if not resume:
            return None
        if resume == 'auto':
            base = os.path.join(config['runs_dir'], self.exercise)
            pattern = config['run_name'] or f"{name}-{config['dataset']}-*"
            found = sorted(glob.glob(os.path.join(base, pattern, 'checkpoints', 'last.pt')), key=os.path.getmtime)
            if not found:
                print(f"resume=auto: no last.pt under {os.path.join(base, pattern)}, starting fresh")
                config['resume'] = ''
                return None
            config['resume'] = found[-1]
        return load_checkpoint(config['resume'])

    def _init_wandb(self, tags: list[str]):
        """A W&B run, falling back to offline, then to none: W&B trouble never stops training."""
        mode = self.config['wandb']
        if mode == 'off':
            return None
        try:
            import wandb
        except ImportError:
            print("wandb is not installed; W&B logging is off")
            return None
        for m in [mode, 'offline'] if mode == 'online' else [mode]:
            try:
                return wandb.init(project=self.config['wandb_project'], group=self.exercise,
                                  name=self.name, id=_wandb_id(self.exercise, self.name), resume='allow',
                                  config=self.config, tags=tags, dir=self.dir, mode=m,
                                  settings=wandb.Settings(init_timeout=60, console='off'))
            except Exception as e:  # noqa: BLE001 - any W&B failure is non-fatal by design
                print(f"W&B {m} init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        print("W&B logging is off for this run")
        return None

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_figure(self, name: str, fig, step: int | None = None) -> str:
        """Save as <run>/<name>.png, and send to TensorBoard and W&B. Returns the PNG path."""
        path = self.path(f'{name}.png')
        self.tb.add_figure(name, fig, step, close=False)
        save_figure(fig, path)
        if self.wandb is not None:
            import wandb
            self.wandb.log({name: wandb.Image(path)})
        return path

    def finish(self, summary: dict | None = None) -> None:
        self.tb.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(summary)
            offline = self.wandb.offline
            self.wandb.finish()
            if offline:
                print(f"W&B ran offline; upload with: wandb sync {self.path('wandb', 'offline-run-*')}")


def _wandb_id(exercise: str, name: str) -> str:
    """Stable per run directory, so a resumed run continues the same W&B run."""
    return ''.join(c if c.isalnum() or c in '-_' else '_' for c in f'{exercise}-{name}')[-128:]


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
    """SIGINT / SIGTERM ask the loop to stop after the current step and checkpoint.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# The loop

def train(model: nn.Module, data: Data, run: Run) -> list[dict]:
    """Train `model` on data.train, select on data.val, checkpoint every epoch; return history.

    last.pt (every epoch, and on SIGINT/SIGTERM mid-epoch) and best.pt (best val/acc) hold the
    model, optimizer, scheduler, RNG states, position in the epoch, history and config, so a
    resumed run continues exactly where it stopped: on the CPU, bitwise.
    """
    config, device = run.config, run.device
    cuda = device.type == 'cuda'
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    memory_format = torch.channels_last if cuda and conv else torch.contiguous_format
    if cuda and conv:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    model.to(device=device, memory_format=memory_format)

    if not len(data.train) or not len(data.val):
        raise UserError(f"empty split (train {len(data.train)}, val {len(data.val)} samples): "
                        f"--val_split must be between 0 and 1, exclusive")
    bs = config['batch_size']
    steps_per_epoch = math.ceil(len(data.train) / bs)
    if config['max_steps']:
        steps_per_epoch = min(steps_per_epoch, config['max_steps'])
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, config['epochs'] * steps_per_epoch)
    generator = torch.Generator().manual_seed(config['seed'])  # shuffling only, CPU
    state = dict(epoch=0, batch=0, order=None, sums=torch.zeros(3), best_val_acc=-1.0, best_epoch=0,
                 history=[])

    if run.checkpoint is not None:
        ck = run.checkpoint
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
        if cuda and ck['rng']['cuda']:
            torch.cuda.set_rng_state_all(ck['rng']['cuda'])
        state.update({k: ck[k] for k in state})

    forward = torch.compile(model) if config['compile'] else model
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if cuda and config['amp'] else nullcontext())
    ls = config['label_smoothing']

    def checkpoint(name: str) -> None:
        save_checkpoint(run.path('checkpoints', name), {
            'model': model.state_dict(), 'model_class': type(model).__name__, 'model_args': model.args,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'rng': {'data': generator.get_state(), 'torch': torch.get_rng_state(),
                    'cuda': torch.cuda.get_rng_state_all() if cuda else []},
            'config': config, **state})

    def stop(reason: str) -> None:
        checkpoint('last.pt')
        print(f"{reason}; saved {run.path('checkpoints', 'last.pt')}\n"
              f"resume with: python {os.path.basename(sys.argv[0])} --resume {run.path('checkpoints', 'last.pt')}")
        run.finish()
        sys.exit(130)

    with StopRequest() as stop_request:
        while state['epoch'] < config['epochs']:
            epoch = state['epoch']
            if state['order'] is None:  # a new epoch; a resumed one keeps its order
                state['order'] = torch.randperm(len(data.train), generator=generator)
            sums = state['sums'].to(device)  # loss * n, correct, n (on device: no per-step sync)
            model.train()
            t0 = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, initial=state['batch'], desc=f'epoch {epoch + 1}/{config["epochs"]}',
                       leave=False, disable=not sys.stderr.isatty())
            batches = data.train.batches(bs, state['order'].to(device), start=state['batch'])
            for x, y in itertools.islice(batches, steps_per_epoch - state['batch']):
                x = x.contiguous(memory_format=memory_format)
                with autocast:
                    logits = forward(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=ls)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                sums[0] += loss.detach().float() * len(y)  # in-place adds of Python numbers: no sync
                sums[1] += (logits.argmax(1) == y).sum()
                sums[2] += len(y)
                state['batch'] += 1
                bar.update()
                if not bar.disable and state['batch'] % 50 == 0:  # .item() waits for the GPU
                    bar.set_postfix(loss=f'{sums[0].item() / sums[2].item():.4f}')
                if stop_request.requested:
                    state['sums'] = sums.cpu()
                    if torch.isfinite(sums[0]):
                        stop(f"stopped in epoch {epoch + 1} after batch {state['batch']}")
                    break
            bar.close()
            loss_sum, correct, n = sums.tolist()  # waits for the GPU, so the time below is real
            train_seconds = time.perf_counter() - t0
            if not math.isfinite(loss_sum):
                raise UserError(f"training loss became {loss_sum} in epoch {epoch + 1}; stopped. The last good "
                                f"checkpoint is {run.path('checkpoints', 'last.pt')}. Try a lower --lr.")

            val = evaluate(model, data.val, amp=config['amp'], memory_format=memory_format)
            row = {'epoch': epoch + 1, 'train/loss': loss_sum / n, 'train/acc': correct / n,
                   'val/loss': val['loss'], 'val/acc': val['acc'], 'lr': optimizer.param_groups[0]['lr'],
                   'epoch_seconds': time.perf_counter() - t0, 'samples_per_second': n / train_seconds}
            print(f"epoch {epoch + 1:3d}/{config['epochs']} | train loss {row['train/loss']:.4f} "
                  f"acc {100 * row['train/acc']:6.2f} | val loss {row['val/loss']:.4f} acc {100 * row['val/acc']:6.2f} "
                  f"| lr {row['lr']:.2e} | {row['epoch_seconds']:5.1f}s {row['samples_per_second']:,.0f} samples/s",
                  flush=True)
            run.log({k: v for k, v in row.items() if k != 'epoch'}, step=epoch + 1)

            state.update(epoch=epoch + 1, batch=0, order=None, sums=torch.zeros(3))
            state['history'] = state['history'] + [row]
            if val['acc'] > state['best_val_acc']:
                state.update(best_val_acc=val['acc'], best_epoch=epoch + 1)
                checkpoint('best.pt')
            checkpoint('last.pt')
            if stop_request.requested and state['epoch'] < config['epochs']:
                stop(f"stopped after epoch {epoch + 1}")
    return state['history']
