"""Shared test helpers: tiny synthetic datasets in the real on-disk formats, and configs that
train in well under a second on the CPU."""
import gzip
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('WANDB_SILENT', 'true')


def write_idx(path: str, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(struct.pack('>I', d) for d in array.shape)
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root: str, folder: str = 'MNIST', n_train: int = 300, n_test: int = 100,
                gz: bool = True, seed: int = 0) -> str:
    """Synthetic 28x28 IDX files under root/<folder>/raw. A class is a bright 7x7 square at one
    of ten positions, so the data is learnable; pixel (0, 0..1) holds the sample index so tests
    can tell samples apart."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, 'raw')
    os.makedirs(raw, exist_ok=True)
    suffix = '.gz' if gz else ''
    for split, n, offset in (('train', n_train, 0), ('t10k', n_test, n_train)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            r, col = 3 + 10 * (c // 5), 1 + 5 * (c % 5)
            x[i, r:r + 7, col:col + 7] = 255
            x[i, 0, 0], x[i, 0, 1] = (offset + i) % 256, (offset + i) // 256
        write_idx(os.path.join(raw, f'{split}-images-idx3-ubyte{suffix}'), x)
        write_idx(os.path.join(raw, f'{split}-labels-idx1-ubyte{suffix}'), y)
    return root


@pytest.fixture
def config(tmp_path):
    """exercise 1.1's config, sized for a test: digits, tiny MLP, W&B off, runs under tmp_path."""
    from exercise_1_1 import config
    return {**config, 'dataset': 'digits', 'hidden': [32], 'dropout': 0.1, 'epochs': 3, 'batch_size': 64,
            'wandb': 'off', 'runs_dir': str(tmp_path / 'runs'), 'data_dir': str(tmp_path / 'data'),
            'device': 'cpu', 'run_name': 'test'}


@pytest.fixture
def run_script():
    """Run a script as a user would: a subprocess in the repo root; returns CompletedProcess."""
    import subprocess

    def run(*args: str, env: dict | None = None, timeout: int = 120):
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, 'WANDB_MODE': 'offline', **(env or {})})
    return run
