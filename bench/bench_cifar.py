"""Speed of one CIFAR-10 training epoch: our on-device pipeline vs the usual DataLoader pipeline.

(a) ours: exercise 1.3's default model and config trained by training.train (the product
    itself, in a temporary run directory, W&B off): uint8 data held on the device, crop + flip
    on whole batches there, bf16 autocast and channels_last on CUDA.
(b) the common recipe: torchvision.datasets.CIFAR10 + RandomCrop(32, padding=4),
    RandomHorizontalFlip, ToTensor, Normalize + DataLoader(num_workers, pin_memory), feeding the
    same model, optimiser, scheduler and autocast in a plain loop (the baseline, not ours).

Both read the same synthetic uint8 images, written as real CIFAR-10 pickles in a temp dir (no
CIFAR-10 needed; speed does not depend on pixel values). Rates are of the last epoch, so with
--epochs 2 the first absorbs cuDNN autotuning and torch.compile; (a)'s epoch time includes its
validation pass over 2% held-out images, so its rate is, if anything, understated.

    python bench/bench_cifar.py                                  # 50,000 images, default model
    python bench/bench_cifar.py --device cpu --n 2000 --widths [32,64,128] --epochs 1
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
from contextlib import nullcontext  # noqa: E402

from exercise_1_3 import EXERCISE, build_model, config as default_config  # noqa: E402
from device import pick_device  # noqa: E402
from record import Run  # noqa: E402
from synthetic import write_cifar10  # noqa: E402
from training import make_optimizer, make_scheduler, train  # noqa: E402

CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 train statistics


def step(forward, x: torch.Tensor, y: torch.Tensor, optimizer, scheduler, autocast, label_smoothing: float):
    """One optimizer step as training.train takes it in a single process; the benchmarks' loops
    differ only in how batches arrive. Returns the loss."""
    with autocast:
        loss = F.cross_entropy(forward(x), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if device.type == 'cuda' else 'n/a (CPU)'


# ---------------------------------------------------------------------------------------------
# (a) ours: training.train on Split with on-device augmentation

def bench_ours(config: dict) -> tuple[float, str]:
    device = pick_device(config['device'])
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    run = Run(EXERCISE, config, name='bench')
    from dataset import load_data
    data = load_data(config, run.device)
    model = build_model(config, data)
    history = train(model, data, run)
    run.finish()
    last = history[-1]
    return len(data.train) / last['train/epoch_seconds'], peak_memory(device)


# ---------------------------------------------------------------------------------------------
# (b) torchvision CIFAR10 + transforms + DataLoader, same model and step

def bench_torchvision(config: dict, data_dir: str, workers: int) -> tuple[float, str]:
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import CIFAR10

    folder = os.path.join(data_dir, CIFAR10.base_folder)

    def md5(name: str) -> str:
        with open(os.path.join(folder, name), 'rb') as f:
            return hashlib.md5(f.read()).hexdigest()

    class SyntheticCIFAR10(CIFAR10):  # the real class; only the checksums are the synthetic files'
        train_list = [[n, md5(n)] for n, _ in CIFAR10.train_list]
        test_list = [[n, md5(n)] for n, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, 'md5': md5(CIFAR10.meta['filename'])}

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    dataset = SyntheticCIFAR10(data_dir, train=True, transform=transform)
    device = pick_device(config['device'])
    cuda = device.type == 'cuda'
    loader = DataLoader(dataset, batch_size=config['batch_size'], shuffle=True, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0, drop_last=False)

    torch.manual_seed(config['seed'])
    model = build_model(config, SimpleNamespace(shape=(3, 32, 32), num_classes=10))  # what build_model reads of Data
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, config['epochs'] * len(loader))
    forward = torch.compile(model) if config['compile'] else model
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if cuda and config['amp'] != 'off' else nullcontext()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for epoch in range(config['epochs']):
        sync(device)
        t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            step(forward, x, y, optimizer, scheduler, autocast, config['label_smoothing'])
        sync(device)
        seconds = time.perf_counter() - t0
        print(f"(b) epoch {epoch + 1}: {seconds:.1f}s, {len(dataset) / seconds:,.0f} images/s", flush=True)
    return len(dataset) / seconds, peak_memory(device)


# ---------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=50000, help='training images per epoch')
    p.add_argument('--device', default='auto', help='auto | cuda | cpu | mps')
    p.add_argument('--epochs', type=int, default=2, help='epochs per pipeline; the last one is reported')
    p.add_argument('--compile', action='store_true', help='torch.compile the model in both pipelines')
    p.add_argument('--widths', type=ast.literal_eval, default=default_config['widths'],
                   help='CNN widths; smaller for a CPU run')
    p.add_argument('--batch_size', type=int, default=default_config['batch_size'])
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='DataLoader workers for (b)')
    args = p.parse_args()

    n_val = max(1, round(0.02 * args.n))  # (a) holds out val images; train keeps exactly n
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        x = rng.integers(0, 256, (args.n + n_val, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, args.n + n_val)
        write_cifar10(tmp, {'train': (x, y), 'test': (x[:n_val], y[:n_val])}, CLASSES)
        config = {**default_config, 'dataset': 'cifar10', 'data_dir': tmp, 'runs_dir': os.path.join(tmp, 'runs'),
                  'wandb': 'off', 'device': args.device, 'epochs': args.epochs, 'compile': args.compile,
                  'widths': args.widths, 'batch_size': args.batch_size, 'val_split': n_val / (args.n + n_val),
                  'run_name': 'bench'}
        device = pick_device(args.device)
        hardware = torch.cuda.get_device_name() if device.type == 'cuda' else \
            f"CPU, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores visible)"
        print(f"bench: {args.n:,} images/epoch, widths {args.widths}, batch {args.batch_size}, {args.epochs} epoch(s), "
              f"compile={args.compile}, on {hardware}, torch {torch.__version__}", flush=True)
        ours, ours_mem = bench_ours(config)
        theirs, theirs_mem = bench_torchvision({**config, 'device': args.device}, tmp, args.workers)
    print(f"(a) ours (on-device data + augmentation, training.train): {ours:10,.0f} images/s  peak {ours_mem}")
    print(f"(b) torchvision CIFAR10 + DataLoader ({args.workers} workers): {theirs:10,.0f} images/s  peak {theirs_mem}")
    print(f"ratio (a)/(b): {ours / theirs:.2f}x")
    if args.widths == default_config['widths'] and args.batch_size == default_config['batch_size']:
        print(f"exercise 1.3's default run ({default_config['epochs']} epochs of 45,000 images) at (a)'s rate: "
              f"~{default_config['epochs'] * 45000 / ours:.0f} s of training")


if __name__ == '__main__':
    main()
