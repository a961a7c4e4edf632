"""Every advertised path learns or says why not (issue 15 items 1, 2, 5, 6, 7; issue 18 item 8):
per-dataset defaults, divergence, model selection ties, data folders, a console that fits a screen."""
import json
import os
import re
import subprocess

import pytest
import torch

import training
from config import UserError, cli, help_text, parse_args
from dataset import DATASETS, load_cifar10, load_data, load_idx_dataset
from evaluate import report
from models import MLP
from checkpoint import read as load_checkpoint
from record import Run
from synthetic import write_mnist
from training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = ['--wandb', 'off', '--device', 'cpu']


# ---------------------------------------------------------------------------------------------
# 1. a listed dataset learns with the script's defaults (the full bench: bench/bench_defaults.py)

def test_exercise_1_3_on_digits_learns_with_its_defaults_and_keeps_2x2_maps(tmp_path, capsys):
    import exercise_1_3
    # the CIFAR-10 recipe (lr 0.2, batch 512, 8x8 -> 1x1 maps) diverged here (docs/exercise_1_3.md); 3 epochs: short
    cli(exercise_1_3.main, exercise_1_3.config,
        ['--dataset', 'digits', '--epochs', '3', '--runs_dir', str(tmp_path), '--run_name', 'd', *SYSTEM])
    assert "dataset.DATASETS, exercise_1_3's defaults" in capsys.readouterr().out  # said, not silent
    with open(tmp_path / 'exercise_1_3' / 'd' / 'results.json') as f:
        assert json.load(f)['test_acc'] > 0.8  # chance is 0.10
    best = load_checkpoint(tmp_path / 'exercise_1_3' / 'd' / 'checkpoints' / 'best.pt')
    assert best['config']['widths'] == DATASETS['digits'].defaults['exercise_1_3']['widths']
    # exercise 2.3 explains the last maps: at least 2x2 on 8x8 digits
    config = exercise_1_3.with_dataset_defaults({**exercise_1_3.config, 'dataset': 'digits'}, {})
    data = load_data(config, 'cpu')
    maps = exercise_1_3.build_model(config, data).features(data.train.normalize(data.train.x[:2]))
    assert maps.shape[-2:] == (2, 2)
    # a flag overrides a dataset default; --help states every one of them
    assert exercise_1_3.with_dataset_defaults({**config, 'lr': 0.2}, {'lr': 0.2})['lr'] == 0.2
    rows = {r.split()[0]: r for r in help_text(exercise_1_3.config, exercise_1_3.__file__).splitlines()[2:]}
    for dataset, values in ((name, info.defaults.get('exercise_1_3', {})) for name, info in DATASETS.items()):
        for key, value in values.items():  # e.g. --lr's row ends '...; fashion_mnist, mnist: 0.1; digits: 0.05'
            said = [p for p in rows[f'--{key}'].split(';') if re.search(rf'(?<!\w){dataset}\b', p)]
            assert len(said) == 1 and said[0].endswith(f': {value!r}'), (dataset, key)


# ---------------------------------------------------------------------------------------------
# 2. a loss that explodes but stays finite is said and recorded; issue 18.8: ties go to lower val loss

def test_a_finite_explosion_is_said_in_one_line_and_recorded(config, capsys):
    run = Run('exercise_1_1', {**config, 'epochs': 2}, name='mlp')
    data = load_data(run.config, run.device)
    model = MLP(64, [16], 10)
    with torch.no_grad():
        model.classifier.weight.mul_(1e4)  # logits in the thousands: loss far above ln(10), yet finite
    history = train(model, data, run)
    results = report(run, model, data, history)
    warnings = [line for line in capsys.readouterr().out.splitlines() if 'diverging' in line]
    assert len(warnings) == 1 and 'epoch 1' in warnings[0] and '--lr' in warnings[0]
    with open(run.path('results.json')) as f:
        recorded = json.load(f)
    assert recorded['diverged'] == results['diverged'] and recorded['diverged']['epoch'] == 1
    assert 'ln(10)' in recorded['diverged']['reason'] and recorded['selection'] == training.SELECTION


def test_ties_in_val_acc_go_to_the_lower_val_loss(config, monkeypatch):
    scripted = iter([{'acc': 1.0, 'loss': 0.5}, {'acc': 1.0, 'loss': 0.2}, {'acc': 1.0, 'loss': 0.3}])
    monkeypatch.setattr(training, 'evaluate', lambda *a, **k: next(scripted))
    run = Run('exercise_1_1', config, name='mlp')  # 3 epochs
    data = load_data(run.config, run.device)
    model = MLP(64, [16], 10)
    train(model, data, run)
    run.finish()
    assert load_checkpoint(run.path('checkpoints', 'best.pt'))['best_epoch'] == 2
    assert 'lower val/loss' in run.notes['selection'] and run.notes['diverged'] is None  # a learning run


# ---------------------------------------------------------------------------------------------
# 5. data where users have it; nothing created by a download that fails

def test_idx_files_loose_in_data_dir_are_read_without_a_download(tmp_path, monkeypatch):
    loose = os.path.join(write_mnist(str(tmp_path / 'src'), n_train=30, n_test=10), 'MNIST', 'raw')  # Debian's layout
    before = sorted(os.listdir(loose))

    def no_download(*a, **k):
        raise AssertionError('downloaded although the files are there')
    monkeypatch.setattr('torchvision.datasets.utils.download_url', no_download)
    arrays = load_idx_dataset('fashion_mnist', loose)
    assert arrays['train'][0].shape == (30, 28, 28) and sorted(os.listdir(loose)) == before


def failing_download(url, root, filename=None, md5=None):
    os.makedirs(root, exist_ok=True)  # as torchvision's download_url does, before it fails
    open(os.path.join(root, filename), 'wb').close()
    raise OSError('offline')


def test_a_failed_download_leaves_data_dir_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setattr('torchvision.datasets.utils.download_url', failing_download)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(UserError, match='could not download'):
        load_idx_dataset('mnist', str(empty))
    assert os.listdir(empty) == []  # no empty MNIST/raw
    with pytest.raises(UserError, match='could not download'):
        load_idx_dataset('mnist', str(tmp_path / 'new' / 'data'))
    assert not (tmp_path / 'new').exists()  # created only to download into ...

    def failing_archive(url, root, filename=None, md5=None):
        os.makedirs(os.path.join(root, 'cifar-10-batches-py'))
        raise OSError('offline')
    monkeypatch.setattr('torchvision.datasets.utils.download_and_extract_archive', failing_archive)
    with pytest.raises(UserError, match='could not download'):
        load_cifar10(str(tmp_path / 'cifar' / 'data'))
    assert not (tmp_path / 'cifar').exists()
    source = os.path.join(write_mnist(str(tmp_path / 'src'), n_train=30, n_test=10), 'MNIST', 'raw')

    def download(url, root, filename=None, md5=None):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(source, filename), 'rb') as f, open(os.path.join(root, filename), 'wb') as out:
            out.write(f.read())
    monkeypatch.setattr('torchvision.datasets.utils.download_url', download)
    assert load_idx_dataset('mnist', str(tmp_path / 'new'))['test'][0].shape == (10, 28, 28)  # ... as here
    assert len(os.listdir(tmp_path / 'new' / 'MNIST' / 'raw')) == 4


# ---------------------------------------------------------------------------------------------
# 6. a console that fits a screen

def test_config_line_shows_only_what_differs_from_the_defaults(config, capsys):
    run = Run('exercise_1_1', {**config, 'lr': 0.01}, {'lr': 0.01}, name='mlp')
    run.start()
    run.finish()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('config')]
    assert lines == ['config lr=0.01']


def test_exercise_1_2_default_run_fits_50_lines_one_per_cell(tmp_path, capsys, monkeypatch):
    import exercise_1_2
    monkeypatch.chdir(tmp_path)  # the default --runs_dir ./runs
    depths, epochs = [2, 4], 2  # the default: 6 depths (each adds 2 cell lines, 2 gradient lines), 20 epochs
    argv = ['--dataset', 'digits', '--max_steps', '1', '--depths', str(depths).replace(' ', ''), '--epochs', str(epochs),
            '--study_epochs', '1', '--width', '16', '--study_width', '8', *SYSTEM]  # small and short, the same lines
    cli(exercise_1_2.main, exercise_1_2.config, argv)
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith('study-') for line in lines) == 2 * len(depths)  # one line per study cell
    default = exercise_1_2.config
    assert len(lines) + 4 * (len(default['depths']) - len(depths)) + default['epochs'] - epochs <= 50
    assert all(len(line) <= 160 for line in lines if not line.startswith('epoch'))


# ---------------------------------------------------------------------------------------------
# 7. small things

def test_an_unquoted_list_gets_the_hint():
    import exercise_1_1
    with pytest.raises(UserError, match='quote list values'):
        parse_args(exercise_1_1.config, ['--hidden', '[512,', '256]'])  # what the shell makes of [512, 256]


def test_help_says_what_the_wandb_default_does():
    import exercise_1_1
    line = next(r for r in help_text(exercise_1_1.config, exercise_1_1.__file__).splitlines() if '--wandb ' in r)
    assert 'default: online if logged in, else offline' in line and len(line) <= 160


def test_2_2_says_its_crop_counts_in_words():
    import canvases
    counts = {'train': {'canvases': 12, 'crops': 1400, 'background': 88}, 'val': {'canvases': 1, 'crops': 9,
                                                                                   'background': 6}}
    assert canvases.crop_summary(counts) == 'train 1,400 (88 background, 12 canvases), val 9 (6 background, 1 canvas)'


def test_venv_is_ignored_by_git():
    assert subprocess.run(['git', 'check-ignore', '-q', '.venv/bin/python'], cwd=ROOT).returncode == 0


def test_make_run_fails_with_the_scripts_own_line_last_before_makes(tmp_path):
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\necho "error: could not download (offline)" >&2\nexit 1\n')
    fake.chmod(0o755)
    done = subprocess.run(['make', '-o', 'install', 'run', f'PYTHON={fake}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0  # a failed run never looks like a success
    assert [line for line in lines if not line.startswith('make')][-1] == 'error: could not download (offline)'
    assert len(lines) <= 2  # -s: no echoed command; only make's own "Error 1" may follow the script's line


@pytest.mark.parametrize('message, category, module', [
    ("Detected pickle protocol 4 in the checkpoint, which was not the default pickle protocol used by `torch.load` "
     "(2).", UserWarning, 'torch._weights_only_unpickler'),
    ("Support for class-based `config` is deprecated, use ConfigDict instead.", DeprecationWarning, 'sweeps.run'),
    ("Valid config keys have changed in V2:\n* 'allow_population_by_field_name' has been renamed to "
     "'validate_by_name'", UserWarning, 'pydantic._internal._config'),
])
def test_the_three_known_warnings_are_filtered_with_a_reason(message, category, module):
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # under pytest.ini's filters
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module, registry={})
    assert caught == []
