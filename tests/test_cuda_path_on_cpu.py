"""As much of the CUDA path as the CPU can run: bf16 autocast (--amp on), channels_last
(--channels_last on), torch.compile of a tiny model, and the GPU check's dry run. (DDP, the rest
of it, is tests/test_distributed.py.) What stays CUDA-only: NCCL, SyncBatchNorm, cuDNN, CUDA
events and memory, real speed: `python bench/gpu_check.py` on a CUDA machine."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from dataset import load_data
from evaluate import evaluate, load_model
from record import Run
from synthetic import write_cifar10
from training import train

CLASSES = [str(i) for i in range(10)]


@pytest.fixture
def cifar_config(tmp_path, config):
    """Exercise 1.3's config on 96 synthetic CIFAR images: a tiny residual CNN (BatchNorm, convs)."""
    import numpy as np
    from exercise_1_3 import config as config_1_3
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (('train', 96), ('test', 32))}
    write_cifar10(str(tmp_path / 'data'), arrays, CLASSES)
    return {**config_1_3, **{k: config[k] for k in ('runs_dir', 'data_dir', 'wandb', 'device')},
            'widths': [4, 8, 8], 'epochs': 1, 'batch_size': 32, 'val_split': 0.25, 'run_name': 'cuda-path'}


def train_cnn(config: dict, seen: dict):
    """One run of exercise 1.3's model, recording what its first conv sees and returns."""
    from exercise_1_3 import build_model
    run = Run('exercise_1_3', config, name='cnn')
    data = load_data(run.config, run.device)
    model = build_model(run.config, data)
    conv = model.features[0][0]

    def look(module, args, out):
        key = 'train' if module.training else 'eval'
        seen.setdefault(key, (args[0].dtype, args[0].is_contiguous(memory_format=torch.channels_last)
                              and not args[0].is_contiguous(), out.dtype))
    conv.register_forward_hook(look)
    history = train(model, data, run)
    run.finish()
    return model, data, history, run


@pytest.mark.parametrize('on', [True, False], ids=['on', 'off'])
def test_amp_and_channels_last_on_the_cpu(cifar_config, on):
    """--amp on: the convs compute in bf16 under CPU autocast, weights stay fp32 (what a checkpoint
    holds); --channels_last on: NHWC weights and inputs. Off: fp32, NCHW. 'auto' is off on the CPU."""
    word = 'on' if on else 'off'
    seen = {}
    model, data, history, run = train_cnn({**cifar_config, 'amp': word, 'channels_last': word}, seen)
    dtype = torch.bfloat16 if on else torch.float32
    assert seen['train'] == (torch.float32, on, dtype)  # float32 input, autocast casts inside the conv
    assert seen['eval'] == (torch.float32, on, dtype)  # validation runs the same path
    conv = model.features[0][0].weight
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last) == on
    assert all(torch.isfinite(torch.tensor(h['train/loss'])) for h in history)
    _, ckpt = load_model(run.path('checkpoints', 'last.pt'))  # rebuilt from fp32 state, whatever the memory format
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt.model_state.values())


def test_bf16_autocast_agrees_with_fp32_within_bf16_precision(cifar_config):
    seen = {}
    model, data, _, _ = train_cnn({**cifar_config, 'amp': 'on', 'channels_last': 'on'}, seen)
    fp32 = evaluate(model, data.test, amp=False)
    bf16 = evaluate(model, data.test, amp=True, memory_format=torch.channels_last)
    assert bf16['loss'] == pytest.approx(fp32['loss'], rel=2e-2)  # bf16 keeps 8 bits of mantissa
    with torch.autocast('cpu', dtype=torch.bfloat16):
        x = data.test.normalize(data.test.x).contiguous(memory_format=torch.channels_last)
        logits = model.eval()(x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(data.test.normalize(data.test.x)), rtol=0.05, atol=0.05)


def has_cxx() -> str:
    return next((c for c in (os.environ.get('CXX'), 'g++', 'c++', 'clang++') if c and shutil.which(c)), '')


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx(), reason='torch.compile (inductor) needs a C++ compiler on the CPU; none found')
def test_compile_trains_the_same_model(config, tmp_path, monkeypatch):
    """--compile True on a tiny MLP (inductor, C++ on the CPU) ends where eager training ends.
    Cold compile cache, as in CI: costs ~30 s on a 2-core machine, hence `slow` (CI still runs it)."""
    import torch._dynamo
    from models import MLP
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))  # cold, as in CI
    monkeypatch.setenv('TORCHINDUCTOR_COMPILE_THREADS', '1')
    config = {**config, 'epochs': 1, 'max_steps': 3, 'dropout': 0.0, 'hidden': [16]}
    params, seconds = {}, {}
    for compile in (False, True):
        run = Run('exercise_1_1', {**config, 'compile': compile, 'run_name': f'compile-{compile}'}, name='mlp')
        data = load_data(run.config, run.device)
        model = MLP(64, config['hidden'], 10)
        t0 = time.perf_counter()
        train(model, data, run)
        seconds[compile] = time.perf_counter() - t0
        run.finish()
        params[compile] = model.state_dict()
    torch._dynamo.reset()
    for name, value in params[False].items():
        torch.testing.assert_close(params[True][name], value, msg=name)
    print(f"compile cost: {seconds[True] - seconds[False]:.1f} s (eager run {seconds[False]:.1f} s)")


def test_gpu_check_without_cuda_says_so_in_one_line(capsys, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    import gpu_check
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no CUDA device' in err and '--device cpu --tiny' in err
    assert gpu_check.main(['--device', 'cpu']) == 2  # the CPU only as a dry run


def test_gpu_check_dry_run(tmp_path):
    """Every step of bench/gpu_check.py (smoke runs of 1.1, 1.2, 1.3 and 2.3 as subprocesses, the
    timed loop with and without torch.compile, the FLOP count, the DataLoader pipeline) at tiny sizes
    on the CPU; the figures mean nothing. 50-60 s on the idle 2-core machine, most of it a cold torch.compile,
    and past 120 s under load: the limit only catches a hang (it was 120 s, the suite's one flaky failure)."""
    out = tmp_path / 'check.json'
    result = subprocess.run([sys.executable, 'bench/gpu_check.py', '--device', 'cpu', '--tiny', '--out', str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report['dry_run'] and report['problems'] == []
    assert [s['name'] for s in report['smoke']] == ['1.1', '1.2 study cell', '1.3', '2.2', '2.3 part 1']
    assert all(s['exit_code'] == 0 for s in report['smoke'])
    # FLOPs from the layers: widths [8, 16, 16], one block per stage, 32x32 input, counted by hand
    macs = 32 * 32 * 8 * 27 + 2 * 16 * 16 * 8 * 8 * 9 + 16 * 16 * 16 * 8 * 9 + 2 * 8 * 8 * 16 * 16 * 9 \
        + 8 * 8 * 16 * 16 * 9 + 2 * 4 * 4 * 16 * 16 * 9
    assert report['flops']['macs_conv'] == macs and report['flops']['train_flops'] == 6 * (macs + 16 * 10)
    for key in ('no_compile', 'compile'):
        assert len(report['ours'][key]['epoch_seconds']) == 4 and report['ours'][key]['images_per_second'] > 0
    assert report['dataloader']['images_per_second'] > 0 and 'skipped' in report['ddp']
    names = [r['name'] for r in report['rows']]
    assert 'ours / DataLoader (compile off)' in names and 'gpu_check' in result.stdout
