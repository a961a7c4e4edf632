"""Runs you can trust: a run's record says what ran, work is never lost, bad input is one line.

Each test names the promise it keeps. CPU, offline, in-process (the scripts' `cli`), seconds.
"""
import csv
import glob
import gzip
import json
import os
import pickle
import signal

import numpy as np
import pytest
import torch

import exercise_1_1
import exercise_1_2
import exercise_1_3
import exercise_2_3 as ex23
import record
import rundir
import training
from config import UserError, cli
from dataset import load_data
from models import CNN, MLP, SkipMLP
from checkpoint import read as load_checkpoint, save as save_checkpoint
from files import atomic_write, save_figure
from record import Run
from study import cell_id
from synthetic import write_cifar10, write_mnist

CHOICES_1_1 = {'dataset': ('mnist', 'fashion_mnist', 'digits')}
TIMINGS = ('train/epoch_seconds', 'train/samples_per_second')


def argv_of(config: dict, **extra) -> list[str]:
    """The command line that gives `config` (the test fixture's) to a script, plus extra keys."""
    keys = ('dataset', 'hidden', 'dropout', 'epochs', 'batch_size', 'wandb', 'runs_dir', 'data_dir', 'device',
            'run_name')
    items = {**{k: config[k] for k in keys}, **extra}
    return [f'--{k}={v}' for k, v in items.items()]


def run_1_1(argv: list[str]) -> int:
    """exercise_1_1.py as the shell runs it, in-process: its exit code (0 when it returns)."""
    try:
        cli(exercise_1_1.main, exercise_1_1.config, argv, choices=CHOICES_1_1)
    except SystemExit as e:
        return e.code
    return 0


class SigtermAtStep:
    """Send ourselves SIGTERM (as a cluster scheduler would) before the model's n-th training step."""

    def __init__(self, n: int, kinds=(MLP, SkipMLP, CNN)):
        self.n, self.seen, self.kinds = n, 0, kinds

    def __enter__(self):
        def hook(module, args):
            if isinstance(module, self.kinds) and module.training:
                self.seen += 1
                if self.seen == self.n:
                    signal.raise_signal(signal.SIGTERM)
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def read(run_dir, name='results.json'):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


def without_timings(history):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


# ---------------------------------------------------------------------------------------------
# Resumed runs continue exactly, and their records say so

def assert_resume_is_exact(reference_dir: str, resumed_dir: str) -> None:
    """History (timings aside), best.pt's choice, results.json and the weights are those of the
    uninterrupted run."""
    ref, res = (load_checkpoint(os.path.join(d, 'checkpoints', 'last.pt')) for d in (reference_dir, resumed_dir))
    assert without_timings(res['history']) == without_timings(ref['history'])
    for a, b in zip(ref['model'].values(), res['model'].values()):
        assert torch.equal(a, b)
    best_ref, best_res = (load_checkpoint(os.path.join(d, 'checkpoints', 'best.pt')) for d in (reference_dir, resumed_dir))
    assert (best_res['best_epoch'], best_res['best_val_acc']) == (best_ref['best_epoch'], best_ref['best_val_acc'])
    for a, b in zip(best_ref['model'].values(), best_res['model'].values()):
        assert torch.equal(a, b)
    results = [{k: v for k, v in read(d).items() if k not in ('train_seconds', 'provenance')}  # times, command
               for d in (reference_dir, resumed_dir)]
    assert results[0] == results[1]


@pytest.mark.parametrize('stop_at', [14, 18], ids=['between-epochs', 'mid-epoch'])
def test_mlp_resume_matches_uninterrupted_run_in_every_record(config, stop_at):
    config = {**config, 'subset': 400, 'batch_size': 32, 'epochs': 3, 'dropout': 0.3}  # 12 steps per epoch
    runs = config['runs_dir']
    assert run_1_1(argv_of(config, run_name='ref', subset=400)) == 0
    with SigtermAtStep(stop_at):
        assert run_1_1(argv_of(config, run_name='cut', subset=400)) == 143  # 128 + SIGTERM
    last = os.path.join(runs, 'exercise_1_1', 'cut', 'checkpoints', 'last.pt')
    assert (load_checkpoint(last)['epoch'], load_checkpoint(last)['batch']) == ((1, 1) if stop_at == 14 else (1, 5))
    assert run_1_1(argv_of(config, run_name='cut', subset=400, resume=last)) == 0
    assert_resume_is_exact(os.path.join(runs, 'exercise_1_1', 'ref'), os.path.join(runs, 'exercise_1_1', 'cut'))


def test_augmented_cnn_resume_is_exact(tmp_path):
    """The 1.3 path: on-device crop + flip drawn from the checkpointed augmentation generator."""
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (('train', 90), ('test', 20))}
    write_cifar10(str(tmp_path / 'data'), arrays, [str(i) for i in range(10)])
    argv = ['--data_dir', str(tmp_path / 'data'), '--runs_dir', str(tmp_path / 'runs'), '--widths', '[4,8,8]',
            '--batch_size', '16', '--epochs', '2', '--wandb', 'off', '--device', 'cpu']
    choices = {'dataset': ('cifar10',)}
    cli(exercise_1_3.main, exercise_1_3.config, [*argv, '--run_name', 'ref'], choices=choices)
    with SigtermAtStep(8), pytest.raises(SystemExit):  # 5 steps per epoch: stop in epoch 2
        cli(exercise_1_3.main, exercise_1_3.config, [*argv, '--run_name', 'cut'], choices=choices)
    last = str(tmp_path / 'runs' / 'exercise_1_3' / 'cut' / 'checkpoints' / 'last.pt')
    assert load_checkpoint(last)['batch'] == 2 and load_checkpoint(last)['config']['augment'] is True
    cli(exercise_1_3.main, exercise_1_3.config, [*argv, '--resume', last], choices=choices)
    assert_resume_is_exact(str(tmp_path / 'runs' / 'exercise_1_3' / 'ref'), str(tmp_path / 'runs' / 'exercise_1_3' / 'cut'))


STUDY = {'part': 'study', 'dataset': 'digits', 'depths': [2], 'study_width': 16, 'study_epochs': 2,
         'batch_size': 64, 'wandb': 'off', 'device': 'cpu', 'subset': 320, 'study_seeds': [0], 'study_lrs': []}


def study(tmp_path, **changes):
    overrides = {**STUDY, 'runs_dir': str(tmp_path), **changes}
    exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    with open(tmp_path / 'exercise_1_2' / 'study.csv', newline='') as f:
        return list(csv.DictReader(f))


def test_study_cell_stopped_mid_training_resumes_exactly(tmp_path):
    reference = study(tmp_path / 'ref')
    with SigtermAtStep(7), pytest.raises(SystemExit):  # 5 steps per epoch: the plain cell, in epoch 2
        study(tmp_path / 'cut')
    cells = glob.glob(str(tmp_path / 'cut' / 'exercise_1_2' / 'study-plain-d2-*'))
    assert len(cells) == 1 and not os.path.exists(os.path.join(cells[0], 'results.json'))
    resumed = study(tmp_path / 'cut')
    assert [r['cell'] for r in resumed] == [r['cell'] for r in reference]
    for a, b in zip(reference, resumed):
        assert {k: v for k, v in a.items() if k != 'train_seconds'} == {k: v for k, v in b.items() if k != 'train_seconds'}
        assert_resume_is_exact(str(tmp_path / 'ref' / 'exercise_1_2' / a['cell']),
                               str(tmp_path / 'cut' / 'exercise_1_2' / b['cell']))


def test_resume_refuses_changed_optimiser_keys_and_config_json_stays_true(config):
    with SigtermAtStep(3):
        assert run_1_1(argv_of(config, epochs=2)) == 143  # 128 + SIGTERM
    run_dir = os.path.join(config['runs_dir'], 'exercise_1_1', 'test')
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    before = read(run_dir, 'config.json')
    with pytest.raises(UserError, match=r"cannot change lr \(0.001 -> 0.5\), weight_decay \(0.05 -> 0.9\)"):
        Run('exercise_1_1', {**config, 'epochs': 2, 'resume': last, 'lr': 0.5, 'weight_decay': 0.9},
            {'resume': last, 'lr': 0.5, 'weight_decay': 0.9})
    assert read(run_dir, 'config.json') == before
    # where and how it runs may change, and config.json then says so
    assert run_1_1([f'--resume={last}', '--wandb=off', '--device=cpu', '--amp=off', f"--runs_dir={config['runs_dir']}"]) == 0
    after = read(run_dir, 'config.json')
    assert after['lr'] == before['lr'] and after['amp'] == 'off' and after['resume'] == last


def test_resume_throughput_counts_only_what_it_timed(config, monkeypatch):
    """A fake clock that ticks one second per training step: a resumed epoch reports the same
    samples/s and epoch time as an uninterrupted one."""
    clock = {'t': 0.0}

    def tick(module, args):
        if isinstance(module, MLP) and module.training:
            clock['t'] += 1.0
    handle = torch.nn.modules.module.register_module_forward_pre_hook(tick)
    monkeypatch.setattr(training.time, 'perf_counter', lambda: clock['t'])
    try:
        config = {**config, 'subset': 400, 'batch_size': 32, 'epochs': 2}
        assert run_1_1(argv_of(config, run_name='ref', subset=400)) == 0
        with SigtermAtStep(17):
            assert run_1_1(argv_of(config, run_name='cut', subset=400)) == 143  # 128 + SIGTERM
        last = os.path.join(config['runs_dir'], 'exercise_1_1', 'cut', 'checkpoints', 'last.pt')
        assert run_1_1(argv_of(config, run_name='cut', subset=400, resume=last)) == 0
    finally:
        handle.remove()
    ref, cut = (load_checkpoint(os.path.join(config['runs_dir'], 'exercise_1_1', n, 'checkpoints', 'last.pt'))
                for n in ('ref', 'cut'))
    assert ref['history'][1]['train/epoch_seconds'] == 13.0  # 400 samples / 32 = 13 steps
    for key in TIMINGS:
        assert cut['history'][1][key] == ref['history'][1][key]


def test_resume_auto_continues_an_unfinished_run_and_never_retests_a_finished_one(config, capsys):
    with SigtermAtStep(20):
        assert run_1_1(argv_of(config, epochs=3)) == 143  # SIGTERM; 23 steps per epoch: stopped in epoch 1
    assert run_1_1(argv_of(config, epochs=3, resume='auto')) == 0
    run_dir = os.path.join(config['runs_dir'], 'exercise_1_1', 'test')
    assert read(run_dir)['epochs_run'] == 3 and 'resume=auto: resuming' in capsys.readouterr().out
    results = os.path.getmtime(os.path.join(run_dir, 'results.json'))
    with pytest.raises(UserError, match='is finished'):  # the named run is done: say so, change nothing
        Run('exercise_1_1', {**config, 'resume': 'auto'}, {'resume': 'auto'})
    assert os.path.getmtime(os.path.join(run_dir, 'results.json')) == results
    run = Run('exercise_1_1', {**config, 'resume': 'auto', 'run_name': ''}, {'resume': 'auto'}, name='mlp')
    assert run.checkpoint is None and 'starting a fresh run' in capsys.readouterr().out  # as README says
    last = os.path.join(run_dir, 'checkpoints', 'last.pt')
    with pytest.raises(UserError, match='finished all 3 epochs'):
        Run('exercise_1_1', {**config, 'resume': last}, {'resume': last})


def test_fresh_run_never_overwrites_an_existing_run(config):
    assert run_1_1(argv_of(config, epochs=1)) == 0
    run_dir = os.path.join(config['runs_dir'], 'exercise_1_1', 'test')
    results = read(run_dir)
    with pytest.raises(UserError, match='already exists: resume it with --resume .*last.pt, choose another'):
        Run('exercise_1_1', config)
    assert read(run_dir) == results
    assert run_1_1(argv_of(config, epochs=2, overwrite=True)) == 0  # explicit: replaced
    assert read(run_dir)['epochs_run'] == 2


def test_resuming_another_exercises_checkpoint_writes_nothing(tmp_path, config):
    overrides = {**STUDY, 'runs_dir': str(tmp_path), 'study_epochs': 1}
    exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    [cell] = glob.glob(str(tmp_path / 'exercise_1_2' / 'study-residual-d2-*'))
    files = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(cell, '**'), recursive=True)}
    last = os.path.join(cell, 'checkpoints', 'last.pt')
    with pytest.raises(UserError, match='is a checkpoint of exercise_1_2 \\(SkipMLP\\), not of exercise_1_1'):
        exercise_1_1.main({**config, 'resume': last}, {'resume': last})
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(cell, '**'), recursive=True)} == files


def test_model_that_does_not_match_its_checkpoint_is_refused_before_writing(config):
    with SigtermAtStep(3):
        assert run_1_1(argv_of(config, epochs=2)) == 143  # 128 + SIGTERM
    last = os.path.join(config['runs_dir'], 'exercise_1_1', 'test', 'checkpoints', 'last.pt')
    run = Run('exercise_1_1', {**config, 'resume': last}, {'resume': last})
    with pytest.raises(UserError, match=r'holds a MLP.*but this run built a MLP'):
        training.train(MLP(64, [7], 10), load_data(run.config, 'cpu'), run)
    assert not run.started


# ---------------------------------------------------------------------------------------------
# Study cells: a table never mixes settings

def test_study_cells_are_keyed_by_their_settings(tmp_path, capsys):
    first = study(tmp_path)
    second = study(tmp_path, study_width=24, lr=3e-3)
    assert 'skip' not in capsys.readouterr().out  # other settings: trained, not reused
    assert [r['width'] for r in second] == ['24', '24'] and [r['width'] for r in first] == ['16', '16']
    assert len(glob.glob(str(tmp_path / 'exercise_1_2' / 'study-*'))) == 4
    assert study(tmp_path, study_width=24, lr=3e-3) == second  # the same settings again: reused
    assert capsys.readouterr().out.count('skip ') == 2


def test_cell_identity_covers_what_shapes_a_result_and_nothing_else():
    base = {**exercise_1_2.config, 'model': 'plain', 'depth': 2}
    for key, value in (('dataset', 'fashion_mnist'), ('width', 64), ('lr', 0.1), ('seed', 1), ('epochs', 9),
                       ('subset', 100), ('dropout', 0.0), ('max_steps', 5)):
        assert cell_id({**base, key: value}) != cell_id(base), key
    for key, value in (('device', 'cpu'), ('wandb', 'off'), ('runs_dir', '/elsewhere'), ('data_dir', '/d'),
                       ('depths', [2, 4]), ('part', 'all'), ('resume', 'x.pt'), ('run_name', 'x')):
        assert cell_id({**base, key: value}) == cell_id(base), key


# ---------------------------------------------------------------------------------------------
# W&B: never costs the run, never mixes runs

class FakeWandbRun:
    def __init__(self, fail_log_at: int | None = None):
        self.logged, self.fail_log_at, self.offline, self.dir, self.url = [], fail_log_at, True, '/x/files', ''
        self.summary = {}

    def log(self, metrics, step=None):
        if step == self.fail_log_at:
            raise ConnectionError('W&B service went away')
        self.logged.append(step)

    def finish(self):
        pass


def test_wandb_failure_mid_run_costs_nothing(config, monkeypatch, capsys):
    import wandb
    fake = FakeWandbRun(fail_log_at=2)
    monkeypatch.setattr(wandb, 'init', lambda **kw: fake)
    results = exercise_1_1.main({**config, 'wandb': 'offline'}, {})
    assert results['epochs_run'] == 3 and fake.logged == [1]
    out = capsys.readouterr().out
    assert out.count('warning: W&B log failed (ConnectionError: W&B service went away)') == 1
    assert load_checkpoint(os.path.join(config['runs_dir'], 'exercise_1_1', 'test', 'checkpoints', 'last.pt'))['epoch'] == 3


def test_each_epoch_is_checkpointed_before_it_is_logged(config, monkeypatch):
    seen = []
    real = record.Run.log

    def log(self, metrics, step):
        seen.append((step, load_checkpoint(self.path('checkpoints', 'last.pt'))['epoch']))
        real(self, metrics, step)
    monkeypatch.setattr(record.Run, 'log', log)
    exercise_1_1.main(config, {})
    assert seen[:3] == [(1, 1), (2, 2), (3, 3)]


def test_fresh_runs_get_fresh_wandb_ids_and_a_resume_keeps_its_own(config, monkeypatch):
    import wandb
    inits = []
    monkeypatch.setattr(wandb, 'init', lambda **kw: inits.append(kw) or FakeWandbRun())
    with SigtermAtStep(3):
        assert run_1_1(argv_of(config, wandb='offline')) == 143  # 128 + SIGTERM
    first = load_checkpoint(os.path.join(config['runs_dir'], 'exercise_1_1', 'test', 'checkpoints', 'last.pt'))
    assert first['wandb_id'] == inits[0]['id']
    assert run_1_1(argv_of(config, wandb='offline', resume='auto')) == 0
    assert inits[1]['id'] == inits[0]['id'] and inits[1]['resume'] == 'allow'
    assert run_1_1(argv_of(config, wandb='offline', overwrite=True)) == 0  # the same name, trained afresh
    assert inits[2]['id'] != inits[0]['id']


# ---------------------------------------------------------------------------------------------
# Files: written whole or not at all; the README's figures left alone

def test_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / 'study.csv'
    atomic_write(str(path), lambda f: f.write('old\n'), binary=False)

    def half(f):
        f.write('half a fi')
        raise OSError('disk full')
    with pytest.raises(OSError):
        atomic_write(str(path), half, binary=False)
    assert path.read_text() == 'old\n' and os.listdir(tmp_path) == ['study.csv']
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # what a plain open() would give


def test_failed_checkpoint_and_figure_writes_leave_old_files_and_no_temp_files(tmp_path, monkeypatch):
    ckpt, png = tmp_path / 'last.pt', tmp_path / 'curves.png'
    save_checkpoint(str(ckpt), {'n': 1})
    import matplotlib.pyplot as plt
    save_figure(plt.figure(), str(png))
    before = png.read_bytes()

    def crash(*args, **kwargs):
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError):
        save_checkpoint(str(ckpt), {'n': 2})
    fig = plt.figure()
    monkeypatch.setattr(fig, 'savefig', crash)
    with pytest.raises(OSError):
        save_figure(fig, str(png))
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=True)['n'] == 1 and png.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['curves.png', 'last.pt']


def test_exercise_2_3_leaves_the_readme_figures_alone_by_default(tmp_path, config, monkeypatch):
    """A run of part 1 without --assets writes its figures into its run only: the README's
    assets/ (here a stand-in beside a stand-in script folder) is not touched."""
    import exercise_1_3
    monkeypatch.setattr(ex23, 'HERE', str(tmp_path / 'repo'))
    model = CNN(1, 10, [4, 8], depth=0)  # two poolings: 2x2 maps of 8x8 digits
    path = tmp_path / 'cnn.pt'
    torch.save({'model': model.state_dict(), 'model_class': 'CNN', 'model_args': model.args, 'exercise': 'exercise_1_3',
                'config': {**exercise_1_3.config, 'dataset': 'digits', 'data_dir': config['data_dir']}}, path)
    results = ex23.main({**ex23.config, 'part': 'cnn', 'checkpoint': str(path), 'runs_dir': config['runs_dir'],
                         'wandb': 'off', 'device': 'cpu', 'faithfulness_images': 4, 'faithfulness_steps': 2,
                         'per_class': [1, 0], 'min_map_size': 2, 'sensitivity': False}, {})
    assert results['figures'] and all(p.startswith(config['runs_dir']) for p in results['figures'])
    assert not (tmp_path / 'repo').exists()


# ---------------------------------------------------------------------------------------------
# Untrusted files never run code

class WritesSentinel:
    path = ''

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_cifar_pickle_with_a_payload_is_refused_before_it_runs(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n))
              for s, n in (('train', 10), ('test', 5))}
    folder = write_cifar10(str(tmp_path), arrays, [str(i) for i in range(10)])
    sentinel = tmp_path / 'pwned'
    WritesSentinel.path = str(sentinel)
    with open(os.path.join(folder, 'data_batch_1'), 'wb') as f:
        pickle.dump({b'data': WritesSentinel(), b'labels': []}, f, protocol=2)
    with pytest.raises(UserError, match='data_batch_1 is not a readable CIFAR pickle'):
        load_data({'dataset': 'cifar10', 'data_dir': str(tmp_path), 'val_split': 0.1, 'subset': 0}, 'cpu')
    assert not sentinel.exists()


def test_checkpoint_with_a_payload_is_refused_before_it_runs(tmp_path):
    sentinel = tmp_path / 'pwned'
    WritesSentinel.path = str(sentinel)
    path = tmp_path / 'last.pt'
    torch.save({'model': {}, 'model_class': 'MLP', 'model_args': {}, 'config': {}, 'x': WritesSentinel()}, path)
    with pytest.raises(UserError, match='not a readable checkpoint'):
        load_checkpoint(str(path))
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit, nothing written

@pytest.mark.parametrize('args, message', [
    (['--val_split', '-0.1'], '--val_split must be between 0 and 1, exclusive'),
    (['--val_split', '1'], '--val_split must be between 0 and 1, exclusive'),
    (['--subset', '-5'], '--subset must be >= 0'),
    (['--epochs', '0'], '--epochs must be >= 1'),
    (['--batch_size', '0'], '--batch_size must be >= 1'),
    (['--lr', '-1'], '--lr must be > 0'),
    (['--dataset', 'mnst'], "--dataset 'mnst' is not one of mnist, fashion_mnist, digits"),
    (['--optimizer', 'adamm'], "--optimizer 'adamm' is not one of adam, adamw, sgd"),
])
def test_bad_values_stop_before_anything_is_written(config, capsys, args, message):
    assert run_1_1(argv_of(config) + args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {message}') and err.count('\n') == 1
    assert not os.path.exists(config['runs_dir'])


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cuda_on_a_machine_without_it_is_one_line(config, capsys):
    assert run_1_1(argv_of(config, device='cuda')) == 1
    assert capsys.readouterr().err == ("error: --device cuda: CUDA is not available on this machine; "
                                       "use --device auto or cpu\n")
    assert not os.path.exists(config['runs_dir'])


def test_truncated_download_is_one_line_and_writes_no_run(tmp_path, config, capsys):
    write_mnist(str(tmp_path / 'data'))
    path = tmp_path / 'data' / 'MNIST' / 'raw' / 'train-images-idx3-ubyte.gz'
    path.write_bytes(path.read_bytes()[:2000])  # what an interrupted download leaves
    assert run_1_1(argv_of(config, dataset='mnist', data_dir=tmp_path / 'data', hidden=[8])) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'train-images-idx3-ubyte.gz is truncated or corrupt' in err
    assert 'delete it and run again' in err and len(err.splitlines()) == 1
    assert not os.path.exists(config['runs_dir'])


def test_run_that_fails_before_its_first_checkpoint_leaves_no_directory(config, capsys):
    class Explodes(MLP):
        def forward(self, x):
            return super().forward(x) * float('nan')
    run = Run('exercise_1_1', config, name='mlp')
    with pytest.raises(UserError, match='loss became nan in epoch 1'):
        training.train(Explodes(64, [8], 10), load_data(run.config, 'cpu'), run)
    assert not os.path.exists(run.dir) and 'removed' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Directions and data facts that a flipped sign would break

def test_beats_random_follows_each_metrics_direction():
    """explain.compare reads 'better' in each metric's own direction (explain.BETTER), and a tie is not a win."""
    from explain import BETTER, compare
    n = torch.arange(200, dtype=torch.float64) / 200  # per-image values with some spread
    ours = {'deletion_auc': 0.2 + 0.01 * n, 'insertion_auc': 0.8 + 0.01 * n, 'average_drop': 10 + n,
            'increase_in_confidence': 30 + n}
    worse = {'deletion_auc': 0.3 + 0.01 * n, 'insertion_auc': 0.7 + 0.01 * n, 'average_drop': 20 + n,
             'increase_in_confidence': 20 + n}
    verdicts = lambda a, b: {k: compare(a[k], b[k], better)['verdict'] for k, better in BETTER.items()}
    assert verdicts(ours, worse) == dict.fromkeys(BETTER, 'better')
    assert verdicts(worse, ours) == dict.fromkeys(BETTER, 'worse')
    assert verdicts(ours, ours) == dict.fromkeys(BETTER, 'tie')  # a tie is not a win


@pytest.mark.parametrize('dataset, pad, flip', [('cifar10', 4, True), ('fashion_mnist', 3, True),
                                                ('mnist', 3, False), ('digits', 1, False)])
def test_augmentation_pads_by_an_eighth_and_flips_only_mirror_safe_data(tmp_path, dataset, pad, flip):
    if dataset == 'cifar10':
        rng = np.random.default_rng(0)
        write_cifar10(str(tmp_path), {s: (rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8),
                                          rng.integers(0, 10, 10)) for s in ('train', 'test')}, list('abcdefghij'))
    elif dataset != 'digits':
        write_mnist(str(tmp_path), {'mnist': 'MNIST', 'fashion_mnist': 'FashionMNIST'}[dataset], 20, 10)
    data = load_data({'dataset': dataset, 'data_dir': str(tmp_path), 'val_split': 0.2, 'subset': 0,
                      'augment': True}, 'cpu')
    assert (data.train.augment.pad, data.train.augment.flip) == (pad, flip)
    assert data.val.augment is None and data.test.augment is None


def test_idx_reader_refuses_a_gzip_cut_in_the_middle(tmp_path):
    from dataset import read_idx
    path = tmp_path / 'x.gz'
    with gzip.open(path, 'wb') as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 39, 16]) + bytes(10000))
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(UserError, match='truncated or corrupt'):
        read_idx(str(path))


def test_a_checkpoint_from_before_a_key_resumes_as_it_was_trained(tmp_path, config):
    """1.1 on mnist now augments by default (dataset.DATASETS); a checkpoint written before 1.1 had the
    `augment` key trained without it, and resuming it must not switch augmentation on silently."""
    data_dir = str(tmp_path / 'mnist')
    write_mnist(data_dir)
    cfg = {**config, 'dataset': 'mnist', 'data_dir': data_dir}
    assert run_1_1(argv_of(cfg, epochs=1, max_steps=2, augment=False)) == 0
    last = os.path.join(cfg['runs_dir'], 'exercise_1_1', cfg['run_name'], 'checkpoints', 'last.pt')
    os.remove(os.path.join(os.path.dirname(os.path.dirname(last)), 'results.json'))  # as if stopped
    old = load_checkpoint(last)
    del old['config']['augment']                       # as written before the key existed
    save_checkpoint(last, old)
    run = Run('exercise_1_1', exercise_1_1.with_defaults('exercise_1_1', {**exercise_1_1.config, 'resume': last,
                                                                         'dataset': 'mnist'}, {'resume': last}),
              {'resume': last})
    assert run.config['augment'] is False
    rundir.release(run.dir)
