"""Provenance: where a result came from (code, command, versions, device, data, times).

report.py reads it back from results.json; nothing here ever fails a run.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Callable

import torch

from device import device_info

REPO = os.path.dirname(os.path.abspath(__file__))


def now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())


def provenance(device: torch.device | str = 'cpu', world: int = 1, data=None, started: str | None = None) -> dict:
    """Where a result came from: code (git commit, uncommitted changes), exact command line,
    versions, device, world size, data (sample counts and a hash of every split's tensors) and
    times. Never raises: whatever cannot be found says why instead."""
    device = torch.device(device)
    out = {**_guarded(git_state), 'command': shlex.join(getattr(sys, 'orig_argv', sys.argv)), 'cwd': os.getcwd(),
           'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
           **_guarded(lambda: device_info(device)), 'world_size': world,
           'data': _guarded(lambda: data_fingerprint(data)) if data is not None else None,
           'started': started, 'ended': now()}
    return out


def _guarded(call: Callable[[], dict]) -> dict:
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - provenance must never fail a run
        return {'provenance_error': f'{type(e).__name__}: {e}'}


def git_state() -> dict:
    """{'git_commit': sha or why there is none, 'git_dirty': uncommitted changes (None if unknown)}
    of the code this process imported: read at the first call (Run() makes it), then remembered."""
    return dict(_git_state(REPO, os.environ.get('PATH', '')))


@functools.lru_cache(maxsize=None)
def _git_state(repo: str, path: str) -> tuple:  # path: $PATH, part of the key (which git, if any)
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(['git', *args], cwd=repo, capture_output=True, text=True, timeout=10)
    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0:
            return ('git_commit', 'not a git checkout'), ('git_dirty', None)
        status = git('status', '--porcelain')  # tracked changes and untracked files (runs/, data/ are ignored)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return ('git_commit', head.stdout.strip()), ('git_dirty', dirty)
    except FileNotFoundError:
        return ('git_commit', 'git is not installed'), ('git_dirty', None)
    except Exception as e:  # noqa: BLE001 - a timeout, a strange git: provenance never fails a run
        return ('git_commit', f'git failed ({type(e).__name__})'), ('git_dirty', None)


def data_fingerprint(data) -> dict:
    """Sample counts and a SHA-256 (16 hex digits) of each split's images and labels exactly as
    trained and tested on (after parsing and splitting): equal hashes, equal data. `data` is a
    dataset.Data, or a fingerprint already made (a dict, passed through)."""
    if isinstance(data, dict):
        return data
    return {'dataset': data.name, **({} if getattr(data, 'canonical', None) is None else {'canonical': data.canonical}),
            **{name: split_fingerprint(getattr(data, name)) for name in ('train', 'val', 'test')}}


def split_fingerprint(split) -> dict:
    """{'samples', 'sha256'} of a split's x and y tensors; never raises (provenance never fails a run)."""
    try:
        h = hashlib.sha256()
        for t in (split.x, split.y):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {'samples': len(split.y), 'sha256': h.hexdigest()[:16]}
    except Exception as e:  # noqa: BLE001
        return {'samples': len(getattr(split, 'y', ())), 'sha256': f'unknown ({type(e).__name__})'}
