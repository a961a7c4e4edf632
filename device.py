"""The device and the process group: where a run computes, and with how many processes.

pick_device / use_amp / memory_format decide the device and precision; init_distributed ...
from_main wrap torch.distributed (docs/many_gpus.md), and do nothing without torchrun;
prepare() readies a model for training (device, memory format, SyncBN, DDP, compile, autocast).
"""
from __future__ import annotations

import atexit
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

from config import UserError


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

def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group first (NCCL on CUDA, else gloo)."""
    import torch.distributed as dist
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        dist.init_process_group(backend)
        if backend == 'gloo':  # destroyed while the interpreter is alive (a local act), not at its teardown
            atexit.register(_destroy_group)
    return rank_world()


def _destroy_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_group() -> None:
    """After a script's main returned on every rank (config.cli): wait for all, so that no rank tears
    its end of the group down while another still uses it. Without this, a rank that finished first
    was aborted at exit now and then (SIGABRT, "terminate called without an active exception")."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


# ---------------------------------------------------------------------------------------------
# A model ready to train

@dataclass
class Prepared:
    """model: the module whose state_dict is saved; forward: what the step calls (DDP, compiled)."""
    model: nn.Module
    forward: nn.Module
    memory_format: torch.memory_format
    amp: bool
    autocast: ContextManager


def prepare(model: nn.Module, device: torch.device, config: dict, world: int) -> Prepared:
    """Move `model` to the device in its memory format; under torchrun convert BatchNorm to SyncBN
    (config['sync_bn']) and wrap it in DDP; torch.compile it (config['compile'])."""
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
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if config['compile']:
        forward = torch.compile(forward)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    return Prepared(model, forward, mf, amp, autocast)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers on every rank (BatchNorm statistics differ by each rank's last slice)."""
    if rank_world()[1] > 1:
        import torch.distributed as dist
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
