"""One dataset registry, one declaration of what a config key is, and data that are what their name says
(issue 21 items 3 and 4, issue 22 item 3)."""
import dataclasses
import hashlib
import json
import os
import runpy
import sys

import numpy as np
import pytest

import config
import dataset
import exercise_1_2
import exercise_1_3
import exercise_2_2
import exercise_2_3
import study
import training
from config import COMMON, ROLE
from dataset import DATASETS, IDX_FILES, DatasetInfo, dataset_names, load_data
from provenance import data_fingerprint
from synthetic import write_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# The seven key lists as they were written before config.ROLE (main 07687e5): every set derived now
# must equal its old one, so no cell digest, stage name, run name or resume rule changes.

OLD_HOW_IT_RUNS = {'resume', 'device', 'amp', 'channels_last', 'compile', 'data_dir', 'runs_dir', 'run_name',
                   'overwrite', 'wandb', 'wandb_project', 'wandb_verbose'}
OLD_MAY_CHANGE_ON_RESUME = OLD_HOW_IT_RUNS | {'epochs'}
OLD_NOT_IDENTITY = OLD_HOW_IT_RUNS | {'part', 'depths'}
OLD_STUDY_KEYS_1_2 = ('part', 'depths', 'study_width', 'study_epochs', 'study_init', 'study_dropout')
OLD_STUDY_KEYS_1_3 = ('part', 'depths', 'study_widths', 'study_epochs', 'study_init')
OLD_CLASSIFIER_KEYS = ('dataset', 'model', 'widths', 'depth', 'hidden', 'dropout', 'augment', 'epochs', 'batch_size',
                       'optimizer', 'lr', 'momentum', 'weight_decay', 'scheduler', 'label_smoothing', 'seed', 'subset',
                       'val_split', 'max_steps')
OLD_NOT_FINETUNE = OLD_HOW_IT_RUNS | {'checkpoint', 'model', 'widths', 'depth', 'hidden', 'dropout', 'augment', 'epochs',
                                      'lr', 'test_canvases', 'val_canvases', 'score_threshold', 'min_score', 'nms_iou',
                                      'agnostic_iou', 'refine_margin', 'timing_threads', 'figure_canvases', 'assets',
                                      'assets_dir'}
OLD_FORWARD_TO_1_3 = ('dataset', 'data_dir', 'subset', 'epochs', 'max_steps', 'device', 'seed', 'amp', 'channels_last',
                      'compile', 'runs_dir', 'wandb', 'wandb_project', 'wandb_verbose')  # + wandb_verbose: now forwarded


def test_key_roles_derive_exactly_the_old_lists():
    assert config.HOW_IT_RUNS == OLD_HOW_IT_RUNS
    assert config.MAY_CHANGE_ON_RESUME == OLD_MAY_CHANGE_ON_RESUME
    assert config.NOT_IDENTITY == OLD_NOT_IDENTITY
    seeded = ('study_seeds', 'study_lrs')  # added since (issue 23 item 5): which cells a study trains, in no cell's id
    assert exercise_1_2.STUDY_KEYS == OLD_STUDY_KEYS_1_2 + seeded
    assert exercise_1_3.STUDY_KEYS == OLD_STUDY_KEYS_1_3 + seeded
    # added since (issue 22's MNIST detector): a classifier key, and decoding keys read after training
    new_classifier, new_after = {'black_is_zero'}, {'peak_window', 'agnostic_overlap', 'refine_central'}
    assert set(exercise_2_2.CLASSIFIER_KEYS) == set(OLD_CLASSIFIER_KEYS) | new_classifier
    assert set(exercise_2_2.FINETUNE_KEYS) == {k for k in exercise_2_2.config
                                               if k not in OLD_NOT_FINETUNE | new_classifier | new_after}
    assert set(exercise_2_3.FORWARD_TO_1_3) == set(OLD_FORWARD_TO_1_3)


def test_a_study_cell_keeps_its_digest():
    cell = {**exercise_1_2.config, 'model': 'plain', 'depth': 2}
    old = training.digest({k: v for k, v in cell.items() if k not in OLD_NOT_IDENTITY})
    assert study.cell_id(cell) == old


def test_every_common_key_has_a_role_from_the_vocabulary():
    roles = {config.RUNS, config.THIS_RUN, config.DATA, config.RECIPE, config.SCHEDULE, config.RESULT,
             config.CHOOSES, config.STUDY, config.AFTER}
    assert set(COMMON) <= set(ROLE) and set(ROLE.values()) <= roles
    for script in (exercise_1_2, exercise_1_3, exercise_2_2):
        assert set(script.ROLE) <= set(script.config), script.__name__  # no role for a key the script lacks


# ---------------------------------------------------------------------------------------------
# The dataset registry: every script's choices and per-dataset rules read it

def test_registry_entries_describe_what_load_data_returns(config):
    for name in ('digits',):
        info, data = DATASETS[name], load_data({**config, 'dataset': name}, 'cpu')
        assert data.shape == (info.channels, info.size, info.size) and data.classes == info.classes
    assert dataset_names() == tuple(DATASETS)
    assert dataset_names(channels=1) == ('mnist', 'fashion_mnist', 'digits')  # 1.1 and 1.2's choices, as before
    assert dataset_names(channels=1, size=28) == ('mnist', 'fashion_mnist')   # 2.2's
    assert [n for n, i in DATASETS.items() if i.background == 'black'] == ['mnist', 'fashion_mnist', 'digits']
    assert [exercise_2_3.substrate_for(n, 'auto') for n in DATASETS] == ['black', 'black', 'black', 'rise']
    assert [n for n, i in DATASETS.items() if i.flip_invariant] == ['fashion_mnist', 'cifar10']


def tiny_loader(data_dir: str) -> dict:
    """A made-up 3-class set of 6x6 grey images: the class is which third of the image is lit."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 40, (n, 6, 6)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, :, 2 * c:2 * c + 2] = 255
        return x, y
    return {'train': split(120), 'test': split(30)}


def test_adding_a_dataset_is_one_entry_and_one_loader(tmp_path, monkeypatch, capsys):
    tiny = DatasetInfo(tiny_loader, ['left', 'middle', 'right'], channels=1, size=6, flip_invariant=False,
                       background='black')
    monkeypatch.setitem(DATASETS, 'tiny', tiny)
    runs = tmp_path / 'runs'
    argv = ['exercise_1_1.py', '--dataset', 'tiny', '--epochs', '4', '--batch_size', '16', '--hidden', '[16]', '--runs_dir', str(runs),
            '--run_name', 't', '--wandb', 'off', '--device', 'cpu']
    monkeypatch.setattr(sys, 'argv', argv)
    runpy.run_path(os.path.join(ROOT, 'exercise_1_1.py'), run_name='__main__')  # its cli, its choices
    with open(runs / 'exercise_1_1' / 't' / 'results.json') as f:
        results = json.load(f)
    assert results['dataset'] == 'tiny' and results['test_acc'] > 0.5  # chance is 1/3
    monkeypatch.delitem(DATASETS, 'tiny')
    monkeypatch.setattr(sys, 'argv', [*argv[:2], 'tiny2', *argv[3:]])
    with pytest.raises(SystemExit) as exit_info:  # not registered: refused by the choices, before any run
        runpy.run_path(os.path.join(ROOT, 'exercise_1_1.py'), run_name='__main__')
    assert exit_info.value.code == 2 and "--dataset 'tiny2' is not one of mnist, fashion_mnist, digits" in \
        capsys.readouterr().err


def test_per_dataset_defaults_are_said_and_a_flag_wins(capsys):
    cfg = exercise_1_3.with_dataset_defaults({**exercise_1_3.config, 'dataset': 'mnist'}, {'lr': 0.3})
    assert cfg['widths'] == [32, 64, 128] and cfg['epochs'] == 15 and cfg['lr'] == exercise_1_3.config['lr']
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith('mnist: widths=[32, 64, 128] epochs=15') and 'lr=' not in line
    assert exercise_1_3.with_dataset_defaults({**exercise_1_3.config, 'dataset': 'cifar10'}, {}) == \
        {**exercise_1_3.config, 'dataset': 'cifar10'}
    assert capsys.readouterr().out == ''  # cifar10 is the recipe itself: nothing to say


# ---------------------------------------------------------------------------------------------
# Issue 22.3: the data are what their name says

def tiny_md5s(raw: str) -> dict:
    return {stem: hashlib.md5(open(os.path.join(raw, stem), 'rb').read()).hexdigest()
            for pair in IDX_FILES.values() for stem in pair}


def test_files_that_are_not_mnist_are_said_once_and_recorded(tmp_path, config, capsys):
    write_mnist(str(tmp_path), n_train=40, n_test=10, gz=True)
    cfg = {**config, 'dataset': 'mnist', 'data_dir': str(tmp_path)}
    data = load_data(cfg, 'cpu')
    lines = [line for line in capsys.readouterr().out.splitlines() if 'MD5' in line]
    assert len(lines) == 1 and lines[0].startswith("mnist: ") and "not mnist's" in lines[0]
    assert 'canonical: false' in lines[0] and len(lines[0].replace(str(tmp_path), '')) <= 110
    assert data.canonical is False and data_fingerprint(data)['canonical'] is False
    load_data(cfg, 'cpu')
    assert 'MD5' not in capsys.readouterr().out  # said once per process
    assert 'canonical' not in data_fingerprint(load_data({**config, 'dataset': 'digits'}, 'cpu'))  # nothing to check


def test_fashion_files_in_mnist_raw_are_named(tmp_path, config, capsys, monkeypatch):
    raw = os.path.join(write_mnist(str(tmp_path), n_train=40, n_test=10, gz=False), 'MNIST', 'raw')
    monkeypatch.setitem(DATASETS, 'fashion_mnist', dataclasses.replace(DATASETS['fashion_mnist'], md5=tiny_md5s(raw)))
    data = load_data({**config, 'dataset': 'mnist', 'data_dir': str(tmp_path)}, 'cpu')
    assert data.canonical is False
    assert "holds fashion_mnist's files, not mnist's (MD5)" in capsys.readouterr().out


@pytest.mark.parametrize('gz', [False, True])
def test_files_with_the_known_md5s_are_canonical(tmp_path, config, capsys, monkeypatch, gz):
    raw = os.path.join(write_mnist(str(tmp_path / 'plain'), n_train=40, n_test=10, gz=False), 'MNIST', 'raw')
    write_mnist(str(tmp_path / 'gz'), n_train=40, n_test=10, gz=True)  # the same bytes, gzipped
    monkeypatch.setitem(DATASETS, 'mnist', dataclasses.replace(DATASETS['mnist'], md5=tiny_md5s(raw)))
    data = load_data({**config, 'dataset': 'mnist', 'data_dir': str(tmp_path / ('gz' if gz else 'plain'))}, 'cpu')
    assert data.canonical is True and data_fingerprint(data)['canonical'] is True
    assert 'MD5' not in capsys.readouterr().out


def test_each_file_is_hashed_once_per_process(tmp_path, config, monkeypatch):
    write_mnist(str(tmp_path), n_train=40, n_test=10)
    hashed = []
    real_md5 = hashlib.md5
    monkeypatch.setattr(dataset.hashlib, 'md5', lambda raw: hashed.append(len(raw)) or real_md5(raw))
    for _ in range(3):
        load_data({**config, 'dataset': 'mnist', 'data_dir': str(tmp_path)}, 'cpu')
    assert len(hashed) == 4  # four files, hashed at their first read only


def test_role_declarations_leave_help_comments_alone():
    rows = {r.split()[0]: r for r in config.help_text(exercise_2_2.config, exercise_2_2.__file__).splitlines()[2:]}
    assert 'best.pt to convert' in rows['--checkpoint'] and 'BatchNorm' in rows['--sync_bn']
    assert 'raw window boxes' in rows['--box_ablation'] and 'classifier epochs' in rows['--epochs']
