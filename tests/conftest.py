"""Shared test helpers: tiny synthetic datasets in the real on-disk formats, and configs that
train in well under a second on the CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('WANDB_SILENT', 'true')
if os.environ.get('PYTEST_XDIST_WORKER'):  # `pytest -n N`: N processes share the cores; one thread each,
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # else their OpenMP threads spin against each other

from synthetic import write_cifar10, write_idx, write_mnist  # noqa: F401,E402 - re-exported for the tests


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
