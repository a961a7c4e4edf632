"""The checkpoint: its one schema, save, load, and the restore of a model or of training state.

A checkpoint is a plain dict (torch.save, read back with weights_only=True) built in one place,
snapshot(); its keys are read in this module only, through a Checkpoint's attributes. Old
checkpoints (amp as a bool, the CUDA RNG as a list of every visible GPU's state) still load.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from config import UserError
from files import atomic_write

REQUIRED = {'model', 'model_class', 'model_args', 'config'}
DATA_KEYS = {'dataset', 'data_dir', 'val_split', 'subset'}  # what load_data needs from a checkpoint's config


# ---------------------------------------------------------------------------------------------
# Where training stands: saved in every checkpoint, restored on resume

@dataclass
class TrainState:
    epoch: int = 0                  # epochs finished
    batch: int = 0                  # batches of the current epoch done
    order: torch.Tensor | None = None  # the current epoch's permutation (None between epochs)
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3))  # loss * n, correct, n so far this epoch
    seconds: float = 0.0            # training time of the current epoch so far, all sessions
    best_val_acc: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    history: list = field(default_factory=list)  # one row per finished epoch
    diverged: dict | None = None    # training.diverged's finding, once


@dataclass
class Rngs:
    data: torch.Generator           # shuffling, on the CPU
    augment: torch.Generator        # augmentation, on the device


# ---------------------------------------------------------------------------------------------
# The schema

def snapshot(model: nn.Module, optimizer, scheduler, rngs: Rngs, state: TrainState, sums: torch.Tensor,
             config: dict, exercise: str, wandb_id: str, world: int, device: torch.device) -> dict:
    """The checkpoint of a training run (sums: the global partial sums of the epoch so far)."""
    return {'model': model.state_dict(), 'model_class': type(model).__name__, 'model_args': model.args,
            'exercise': exercise, 'wandb_id': wandb_id, 'world_size': world,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'rng': {'data': rngs.data.get_state(), 'torch': torch.get_rng_state(),
                    'augment': rngs.augment.get_state(), 'augment_device': device.type,
                    'cuda': cuda_rng_state(device)},
            'config': config, **asdict(state), 'sums': sums.cpu()}


class Checkpoint:
    """A loaded checkpoint; its attributes are the only readers of its keys."""

    def __init__(self, raw: dict, path: str = ''):
        self.raw, self.path = raw, path

    config = property(lambda self: self.raw['config'])
    model_class = property(lambda self: self.raw['model_class'])
    model_args = property(lambda self: self.raw['model_args'])
    model_state = property(lambda self: self.raw['model'])
    exercise = property(lambda self: self.raw.get('exercise'))  # None in checkpoints from before it
    wandb_id = property(lambda self: self.raw.get('wandb_id'))
    epoch = property(lambda self: self.raw.get('epoch', 0))
    batch = property(lambda self: self.raw.get('batch', 0))
    best_epoch = property(lambda self: self.raw.get('best_epoch', 0))
    best_val_acc = property(lambda self: self.raw.get('best_val_acc'))
    history = property(lambda self: upgrade_history(self.raw.get('history', [])))
    run_name = property(lambda self: self.raw['config'].get('run_name'))

    def resumed_config(self) -> dict:
        """The config it was trained with, in today's form (amp was a bool once)."""
        old = dict(self.config)
        if isinstance(old.get('amp'), bool):
            old['amp'] = 'auto' if old['amp'] else 'off'
        return old


# ---------------------------------------------------------------------------------------------
# Save and load

def save(path: str, ckpt: dict) -> str:
    # serialised in memory first: torch.save writing to a full disk reports RuntimeError('[enforce fail
    # at inline_container.cc] unexpected pos'), our own f.write reports OSError(ENOSPC) for cannot_write
    def write(f):
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        f.write(buffer.getbuffer())
    return atomic_write(path, write)


def read(path: str) -> dict:
    """A checkpoint of this project as its plain dict (weights_only=True); UserError for anything else."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated, garbage, or pickles that are not plain data
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); nothing was changed") from None
    if not isinstance(ckpt, dict) or not REQUIRED <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of this project (needs {sorted(REQUIRED)})")
    return ckpt


def load(path: str) -> Checkpoint:
    return Checkpoint(read(path), path)


def rebuild_model(path: str, expect: tuple[type[nn.Module], ...] = (), what: str = '') -> tuple[nn.Module, Checkpoint]:
    """(model with the checkpoint's weights, checkpoint), rebuilt from the checkpoint alone; UserError
    (naming `what` the script expected) unless it holds a models.py class in `expect` (empty = any)
    whose weights fit, with a config that names its data."""
    import models
    ck = load(path)
    name, args = ck.model_class, ck.model_args
    exercise = ck.exercise or 'an unknown exercise'
    expected = f"; expected {what}" if what else ''
    cls = getattr(models, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or not isinstance(args, dict):
        raise UserError(f"{path}: unknown model class {name!r}{expected}")
    if expect and not issubclass(cls, expect):
        raise UserError(f"{path} holds a {name} of {exercise}{expected or ', which this script cannot use'}")
    if not isinstance(ck.config, dict) or not DATA_KEYS <= ck.config.keys():
        raise UserError(f"{path}: its config does not say which data its model was trained on{expected}")
    try:
        model = cls(**args)
        model.load_state_dict(ck.model_state)
    except Exception as e:  # noqa: BLE001 - arguments or weights that do not build this class
        raise UserError(f"{path}: its weights do not fit a {name}({args}) ({type(e).__name__}){expected}") from None
    return model, ck


# ---------------------------------------------------------------------------------------------
# Restoring training state

def restore(ck: Checkpoint, model: nn.Module, optimizer, scheduler, rngs: Rngs, device: torch.device,
            planned_steps: int) -> TrainState:
    """Put the checkpoint's model, optimizer, scheduler and RNG states back; return where training stood.
    UserError when it cannot continue this run (no training state, another model, another schedule)."""
    raw, path = ck.raw, ck.path
    lacking = [k for k in ('optimizer', 'scheduler', 'rng') if not isinstance(raw.get(k), dict)]
    if lacking:
        raise UserError(f"{path} holds no training state to resume (no {', '.join(lacking)}); "
                        f"expected a last.pt or best.pt written by training.train")
    if ck.model_class != type(model).__name__ or ck.model_args != model.args:
        raise UserError(f"{path} holds a {ck.model_class}{ck.model_args}, but this run built "
                        f"a {type(model).__name__}{model.args}")
    planned = raw['scheduler'].get('total_steps', raw['scheduler'].get('T_max'))  # onecycle / cosine
    if planned is not None and planned != planned_steps:
        raise UserError(f"{path} was scheduled for {planned} steps, this run would take {planned_steps}: resume "
                        f"with its epochs, batch_size and max_steps, or start a new run")
    model.load_state_dict(ck.model_state)
    optimizer.load_state_dict(raw['optimizer'])
    scheduler.load_state_dict(raw['scheduler'])
    rng = raw['rng']
    rngs.data.set_state(rng['data'])
    torch.set_rng_state(rng['torch'])
    if 'augment' in rng and rng.get('augment_device', 'cpu') == device.type:
        rngs.augment.set_state(rng['augment'])
    if device.type == 'cuda':
        restore_cuda_rng(rng.get('cuda'), device)
    return TrainState(**{f.name: raw[f.name] for f in fields(TrainState) if f.name in raw if f.name != 'history'},
                      history=ck.history)


# History keys renamed so TensorBoard's first two tag groups are train/ and val/ (docs/usage.md, "Logs")
RENAMED = {'lr': 'train/lr', 'epoch_seconds': 'train/epoch_seconds', 'samples_per_second': 'train/samples_per_second'}


def upgrade_history(history: list[dict]) -> list[dict]:
    """A checkpoint's history rows under today's keys (rows written before the rename keep their values)."""
    return [{RENAMED.get(k, k): v for k, v in row.items()} for row in history]


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA RNG state of the run's own device (None off CUDA): a checkpoint must not depend on
    how many GPUs were visible where it was written."""
    return torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


def restore_cuda_rng(state: Any, device: torch.device) -> None:
    """Put back cuda_rng_state's state on `device`. Checkpoints written before it hold a list, one
    state per GPU visible then: the entry of this device's index is used if there is one."""
    if isinstance(state, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        state = state[index] if index < len(state) else None
    if state is not None:
        torch.cuda.set_rng_state(state, device)
