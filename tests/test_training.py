import glob
import json
import os
import signal

import pytest
import torch
from torch import nn

import training
from config import UserError
from dataset import load_data
from exercise_1_1 import main
from models import MLP
from checkpoint import read as load_checkpoint
from record import Run
from training import train


def fit(config, overrides=None):
    """One run as exercise 1.1 composes it, returning (model, run, history)."""
    run = Run('exercise_1_1', config, overrides, name='mlp')
    data = load_data(run.config, run.device)
    model = MLP(64, run.config['hidden'], 10, dropout=run.config['dropout'])
    return model, run, train(model, data, run)


def test_overfits_a_small_batch(config):
    config = {**config, 'subset': 64, 'batch_size': 64, 'epochs': 60, 'hidden': [128], 'dropout': 0.0,
              'lr': 3e-3, 'weight_decay': 0.0, 'scheduler': 'none', 'label_smoothing': 0.0}
    _, run, history = fit(config)
    run.finish()
    assert history[-1]['train/acc'] == 1.0 and history[-1]['train/loss'] < 0.05


def test_mlp_shapes():
    model = MLP(784, [64, 32], 10)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [64, 32, 10]


class ExplodesAtEpoch2(MLP):
    """An MLP whose loss turns NaN from its 6th training step on."""
    steps = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            ExplodesAtEpoch2.steps += 1
            if ExplodesAtEpoch2.steps > 5:
                out = out * float('nan')
        return out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(config):
    config = {**config, 'subset': 320, 'batch_size': 64}  # 5 steps per epoch
    run = Run('exercise_1_1', config, name='mlp')
    data = load_data(config, 'cpu')
    with pytest.raises(UserError, match='loss became nan in epoch 2'):
        train(ExplodesAtEpoch2(64, [16], 10), data, run)
    ckpt = load_checkpoint(run.path('checkpoints', 'last.pt'))
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    run.finish()


def test_tensorboard_events_hold_the_logged_scalars(config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    results = main(config, {})
    events = EventAccumulator(os.path.join(config['runs_dir'], 'exercise_1_1', 'test'))
    events.Reload()
    scalars = events.Tags()['scalars']
    for key in ('train/loss', 'train/acc', 'val/loss', 'val/acc', 'train/lr', 'train/epoch_seconds',
                'train/samples_per_second'):
        assert key in scalars
        assert [e.step for e in events.Scalars(key)] == [1, 2, 3]
    assert events.Scalars('~results/test_acc')[0].value == pytest.approx(results['test_acc'])  # HParams headline
    assert not [k for k in scalars if k.startswith('test/')]  # one-off results are not scalar history
    groups = sorted({tag.split('/')[0] for kind in ('scalars', 'images') for tag in events.Tags()[kind]})
    assert groups[:2] == ['train', 'val']  # TensorBoard's Time Series opens the first two groups: the curves


def test_results_json_and_run_directory(config):
    main(config, {})
    run_dir = os.path.join(config['runs_dir'], 'exercise_1_1', 'test')
    results = json.load(open(os.path.join(run_dir, 'results.json')))
    for key in ('test_acc', 'test_loss', 'best_val_acc', 'best_epoch', 'epochs_run', 'train_seconds', 'num_params',
                'dataset', 'device', 'torch_version'):
        assert key in results
    assert results['epochs_run'] == 3 and results['dataset'] == 'digits' and results['device'] == 'cpu'
    assert results['num_params'] == 64 * 32 + 32 + 32 * 10 + 10
    assert results['test_acc'] > 0.5  # 3 epochs of a 32-unit MLP on digits
    assert json.load(open(os.path.join(run_dir, 'config.json'))) == config
    for name in ('checkpoints/last.pt', 'checkpoints/best.pt', 'curves.png', 'confusion.png'):
        assert os.path.exists(os.path.join(run_dir, name)), name
    best = load_checkpoint(os.path.join(run_dir, 'checkpoints', 'best.pt'))
    assert best['config'] == config and best['best_epoch'] == results['best_epoch']


def test_wandb_offline_run_is_written(config, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    main({**config, 'wandb': 'offline', 'epochs': 1}, {})
    run_dir = os.path.join(config['runs_dir'], 'exercise_1_1', 'test')
    assert glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*', 'run-*.wandb'))


def test_wandb_init_failure_does_not_stop_the_run(config, monkeypatch, capsys):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError('api.wandb.ai unreachable')
    monkeypatch.setattr(wandb, 'init', broken_init)
    results = main({**config, 'wandb': 'online', 'epochs': 1}, {})
    out = capsys.readouterr().out
    assert 'W&B online init failed (RuntimeError: api.wandb.ai unreachable)' in out
    assert 'W&B offline init failed' in out and 'W&B logging is off' in out
    assert results['epochs_run'] == 1


def test_empty_validation_split_is_refused(config):
    run = Run('exercise_1_1', {**config, 'val_split': 0.0}, name='mlp')
    with pytest.raises(UserError, match='--val_split must be between 0 and 1'):
        train(MLP(64, [8], 10), load_data(run.config, 'cpu'), run)
    run.finish()


@pytest.mark.parametrize('total', [4, 5, 8, 100])
def test_onecycle_warms_up_then_anneals_even_in_smoke_runs(total):
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scheduler = training.make_scheduler(optimizer, {'scheduler': 'onecycle', 'lr': 0.1}, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.1) and 0 < peak < total - 1
    assert lrs[-1] < lrs[0] < 0.1


def test_onecycle_too_short_to_cycle_keeps_lr_constant():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scheduler = training.make_scheduler(optimizer, {'scheduler': 'onecycle', 'lr': 0.1}, 2)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]['lr'] == 0.1


def test_ctrl_c_saves_prints_resume_command_and_resume_auto_finishes(tmp_path):
    """End to end, as a user does it: Ctrl-C a running script, then resume it from the CLI."""
    import subprocess
    import sys
    from conftest import ROOT
    args = [sys.executable, 'exercise_1_1.py', '--dataset', 'digits', '--hidden', '[16]', '--epochs', '40',
            '--wandb', 'off', '--runs_dir', str(tmp_path), '--run_name', 'ctrl-c']
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training really runs
        if line.startswith('epoch   2/40 '):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert 'SIGINT: stopping after this step' in out and 'Traceback' not in err
    assert '--resume ' + os.path.join(str(tmp_path), 'exercise_1_1', 'ctrl-c', 'checkpoints', 'last.pt') in out
    stopped_at = load_checkpoint(os.path.join(str(tmp_path), 'exercise_1_1', 'ctrl-c', 'checkpoints', 'last.pt'))
    assert 2 <= stopped_at['epoch'] < 40

    result = subprocess.run(args + ['--resume', 'auto'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    results = json.load(open(os.path.join(str(tmp_path), 'exercise_1_1', 'ctrl-c', 'results.json')))
    assert results['epochs_run'] == 40


def test_resume_refuses_a_different_schedule_length(config):
    _, run, _ = fit({**config, 'epochs': 2})
    run.finish()
    last = run.path('checkpoints', 'last.pt')
    with pytest.raises(UserError, match='was scheduled for 42 steps, this run would take 63'):
        fit({**config, 'epochs': 3, 'resume': last}, {'epochs': 3})


def test_progress_lines_without_a_terminal(monkeypatch, capsys):
    """Under nohup, a notebook or CI: a line every 10% of an epoch, at most one per 5 s."""
    clock = {'t': 0.0}
    monkeypatch.setattr(training.time, 'perf_counter', lambda: clock['t'])
    monkeypatch.setattr(training.sys.stderr, 'isatty', lambda: False)
    progress = training.Progress(total=100, initial=0, desc='epoch 1/3', enabled=True)
    sums = torch.zeros(3)
    for step in range(100):
        clock['t'] += 1.0  # one second per step
        sums += torch.tensor([0.5 * 32, 0, 32])
        progress.update(sums, 32)  # one process: its batch is the global one
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and lines[0] == '  epoch 1/3  10% | loss 0.5000 | 32 samples/s'


def test_curves_legend_names_only_the_regularisers_that_are_on():
    from evaluate import plot_curves
    history = [{'epoch': e, 'train/loss': 1 / e, 'val/loss': 1 / e, 'train/acc': 0.5, 'val/acc': 0.5} for e in (1, 2)]
    for config, expected in (({'dropout': 0.0, 'label_smoothing': 0.0}, 'train (running mean)'),
                             ({'dropout': 0.2, 'label_smoothing': 0.0, 'augment': True},
                              'train (running mean, dropout and augmentation on)')):
        fig = plot_curves(history, config, 'exercise_1_3: cnn')
        assert fig.legends[0].get_texts()[0].get_text() == expected
        assert fig._suptitle.get_text() == 'exercise_1_3: cnn'
        assert all(float(t).is_integer() for t in fig.axes[0].get_xticks())
