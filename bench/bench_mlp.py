"""Exercise 1.1's input pipeline against the common one: one epoch, same model, same device.

(a) ours: the whole dataset as one uint8 tensor on the device, batches from an index
    permutation, normalised on the device, through training.train.
(b) common: torchvision.datasets.MNIST + ToTensor + Normalize + DataLoader, a plain loop.

Both train MLP(784, [64, 64], 10) with Adam (lr 1e-3) at batch size 64 for one epoch and are
then scored on the test split, so the speed-up is shown at equal accuracy.

    python bench/bench_mlp.py                                       # synthetic MNIST-sized data
    python bench/bench_mlp.py --data_dir /path --dataset fashion_mnist  # real IDX files
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import COMMON  # noqa: E402
from dataset import IDX_FILES, load_idx_dataset  # noqa: E402
from models import MLP  # noqa: E402
from record import Run  # noqa: E402
from training import train  # noqa: E402
from evaluate import evaluate  # noqa: E402


def write_raw_idx(root: str, arrays: dict) -> None:
    """Uncompressed IDX files in torchvision's MNIST layout, which its MNIST class reads."""
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    for split, names in IDX_FILES.items():
        for name, a in zip(names, arrays[split]):
            header = bytes([0, 0, 8, a.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in a.shape)
            with open(os.path.join(raw, name), 'wb') as f:
                f.write(header + a.astype(np.uint8).tobytes())


def ours(root: str, device: str, batch_size: int) -> tuple[float, float]:
    config = {**COMMON, 'dataset': 'mnist', 'data_dir': root, 'runs_dir': os.path.join(root, 'runs'), 'epochs': 1,
              'batch_size': batch_size, 'optimizer': 'adam', 'lr': 1e-3, 'scheduler': 'none', 'wandb': 'off',
              'device': device, 'run_name': 'bench'}
    run = Run('bench', config, name='bench')
    from dataset import load_data
    t0 = time.perf_counter()
    data = load_data(config, run.device)
    load_seconds = time.perf_counter() - t0
    model = MLP(784, [64, 64], 10)
    history = train(model, data, run)
    run.finish()
    acc = evaluate(model, data.test)['acc']
    print(f"(a) ours:   load {load_seconds:.2f}s once, then {history[0]['train/samples_per_second']:,.0f} samples/s, "
          f"test acc {100 * acc:.2f}%")
    return history[0]['train/samples_per_second'], acc


def common(root: str, device: str, batch_size: int, workers: int) -> tuple[float, float]:
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(root, train=True, transform=tf)
    test_set = datasets.MNIST(root, train=False, transform=tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    model = MLP(784, [64, 64], 10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=1000):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    acc = correct / len(test_set)
    print(f"(b) common: {len(train_set) / seconds:,.0f} samples/s (DataLoader, num_workers={workers}), "
          f"test acc {100 * acc:.2f}%")
    return len(train_set) / seconds, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataset', default='', choices=('', 'mnist', 'fashion_mnist'),
                   help="'' = synthetic MNIST-sized data; mnist | fashion_mnist = real files")
    p.add_argument('--data_dir', default='./data')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--workers', type=int, default=0, help='DataLoader workers for (b); 0 is the DataLoader default')
    args = p.parse_args()

    if args.dataset:
        arrays = load_idx_dataset(args.dataset, args.data_dir)
    else:  # synthetic: the speed comparison does not depend on pixel values
        rng = np.random.default_rng(0)
        arrays = {s: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
                  for s, n in (('train', 60_000), ('test', 10_000))}
    print(f"data: {args.dataset or 'synthetic'} ({len(arrays['train'][1]):,} train images), device {args.device}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as root:
        write_raw_idx(root, arrays)
        fast, acc_a = ours(root, args.device, args.batch_size)
        slow, acc_b = common(root, args.device, args.batch_size, args.workers)
    print(f"speed-up (a)/(b): {fast / slow:.1f}x at test acc {100 * acc_a:.2f}% vs {100 * acc_b:.2f}%")


if __name__ == '__main__':
    main()
