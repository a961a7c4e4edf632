"""Exercise 1.2: SkipMLP, study.py (grid with skip/resume, seeds and lr choice, gradient norms) and the W&B sweep file.

CPU only, no network; about 25 s, most of it the in-process smoke studies (one seed; seeded) on scikit-learn's digits.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import exercise_1_2  # noqa: E402
from config import parse_args  # noqa: E402
from models import MLP, ResidualBlock, SkipMLP, num_params  # noqa: E402
from study import grad_norms  # noqa: E402


# ---------------------------------------------------------------------------------------------
# SkipMLP

@pytest.mark.parametrize('in_width, widths', [(16, [16, 16]), (16, [32, 8]), (16, [24])])
def test_block_with_zeroed_last_layer_is_identity_or_bridge(in_width, widths):
    torch.manual_seed(0)
    block = ResidualBlock(in_width, widths, norm=True)
    x = torch.randn(5, in_width)
    skip = x if block.bridge is None else block.bridge(x)
    assert not torch.allclose(block(x), skip)  # the branch contributes before zeroing
    last = block.branch[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    torch.testing.assert_close(block(x), skip)


def test_bridge_exactly_when_widths_differ():
    # blocks of 2: 8 -> [8, 8] | 8 -> [16, 16] | 16 -> [16, 4] | 4 -> [9, 4] | 4 -> [5] (rest)
    model = SkipMLP(64, [8, 8, 16, 16, 16, 4, 9, 4, 5], num_classes=3, block_size=2)
    expected = [None, (8, 16), (16, 4), None, (4, 5)]
    got = [None if b.bridge is None else (b.bridge.in_features, b.bridge.out_features) for b in model.blocks]
    assert got == expected
    bridges = [b.bridge for b in model.blocks if b.bridge is not None]
    assert all(isinstance(b, nn.Linear) and b.bias is None for b in bridges)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize('depth', [1, 2, 3, 8, 17])
@pytest.mark.parametrize('norm', [False, True])
def test_shapes_and_parameter_counts(depth, norm):
    n_in, w, k = 64, 12, 10
    skip = SkipMLP(n_in, [w] * depth, k, block_size=2, dropout=0.1, norm=norm)
    plain = MLP(n_in, [w] * depth, k, dropout=0.1)
    x = torch.randn(3, 1, 8, 8)
    assert skip(x).shape == plain(x).shape == (3, k)

    linear = (n_in * w + w) + depth * (w * w + w) + (w * k + k)  # input, hidden, classifier
    layer_norms = 2 * w * (depth + 1) if norm else 0               # one per hidden Linear + final
    assert num_params(skip) == linear + layer_norms
    assert num_params(plain) == (n_in * w + w) + (depth - 1) * (w * w + w) + (w * k + k)
    hidden_linears = [m for b in skip.blocks for m in b.branch if isinstance(m, nn.Linear)]
    assert len(hidden_linears) == depth and len(skip.blocks) == math.ceil(depth / 2)
    assert SkipMLP(**skip.args).args == skip.args  # checkpoints rebuild it from model_args


# ---------------------------------------------------------------------------------------------
# Init: the study's fair default

def hidden_outputs(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    outs, h = [], x
    for m in model.features:
        h = m(h)
        if isinstance(m, nn.ReLU):
            outs.append(h)
    return outs


def test_he_init_keeps_a_deep_plain_nets_signal_and_torch_default_loses_it():
    # He: E[h^2] stays put layer to layer; PyTorch's default divides it by about 6 per layer, so at
    # depth 32 the last hidden layer no longer depends on the input (only the biases are left)
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    he = hidden_outputs(MLP(256, [256] * 32, 10, init='he'), x)
    ratio = (he[-1] ** 2).mean() / (he[0] ** 2).mean()
    assert 0.1 < ratio < 10
    torch.manual_seed(0)
    default = hidden_outputs(MLP(256, [256] * 32, 10), x)[-1]
    assert default.std(0).mean() < 1e-6 * default.abs().mean()  # across-input spread ~ 0
    assert he[-1].std(0).mean() > 0.1 * he[-1].abs().mean()


def test_he_init_scales_residual_branches_and_zeroes_biases():
    torch.manual_seed(0)
    model = SkipMLP(64, [128] * 8, 10, block_size=2, init='he')
    blocks = len(model.blocks)  # 4
    for block in model.blocks:
        first, last = block.branch[1], block.branch[-1]
        assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
        assert last.weight.std().item() == pytest.approx(math.sqrt(2 / 128 / blocks), rel=0.05)
        assert first.bias.abs().sum() == 0 == last.bias.abs().sum()
    with pytest.raises(ValueError):
        MLP(4, [4], 2, init='xavier')


def test_study_defaults_are_fair_and_the_old_setting_is_a_separate_cell():
    from study import cell_id
    data = type('D', (), {'shape': (1, 4, 4), 'num_classes': 3})()  # what build_model reads
    study = exercise_1_2.study_config(exercise_1_2.config)
    assert study['init'] == 'he' and study['dropout'] == 0.0
    for model in ('plain', 'residual'):
        net = exercise_1_2.build_model({**study, 'model': model, 'depth': 4, 'width': 8}, data)
        assert net.args['init'] == 'he' and not any(isinstance(m, nn.Dropout) for m in net.modules())
    old = exercise_1_2.study_config({**exercise_1_2.config, 'study_init': 'torch', 'study_dropout': 0.2})
    assert (old['init'], old['dropout']) == ('torch', 0.2) and cell_id(old) != cell_id(study)


# ---------------------------------------------------------------------------------------------
# Gradient norms, against a hand computation

def test_grad_norms_by_hand():
    # x (1, 1, 1, 2) -> 1x1 conv (weight 1) -> flatten -> W1 (3x2) -> W2 (2x3) -> logits, label 0
    model = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.Flatten(),
                          nn.Linear(2, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.copy_(torch.tensor([[1., 0.], [0., 1.], [1., 1.]]))
        model[3].weight.copy_(torch.tensor([[1., 0., 0.], [0., 1., 0.]]))
    x, y = torch.tensor([[[[1., 2.]]]]), torch.tensor([0])
    # h = W1 x = [1, 2, 3]; logits = [1, 2]; dL/dlogits = softmax - onehot = s * [-1, 1], s = e / (1 + e)
    s = math.e / (1 + math.e)
    # dW2 = g h^T: |g| |h|;  dh = W2^T g = s [-1, 1, 0], dW1 = dh x^T: |dh| |x|;
    # dx = W1^T dh = s [-1, 1], dconv = dx . x = s
    expected = [('0', s), ('2', s * math.sqrt(2) * math.sqrt(5)), ('3', s * math.sqrt(2) * math.sqrt(14))]
    got = grad_norms(model, x, y)
    assert [r['layer'] for r in got] == [name for name, _ in expected]
    weights = [1.0, 2.0, math.sqrt(2)]  # ||W|| of the three layers
    for r, (_, e), w in zip(got, expected, weights):
        assert r['grad'] == pytest.approx(e, rel=1e-5)
        assert r['weight'] == pytest.approx(w, rel=1e-6)
        assert r['ratio'] == pytest.approx(e / w, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no side effects on .grad


def test_scale_free_gradient_is_unchanged_when_a_batchnorm_followed_weight_is_scaled():
    # BatchNorm (train mode) after the conv: the loss ignores the conv's scale c, so ||dL/dW||
    # falls as 1/c (the raw metric calls the layer "vanishing"), ||dL/dW|| / ||W|| as 1/c^2,
    # and ||dL/dW|| * ||W|| stays put
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    before = grad_norms(model, x, y, label_smoothing=0.1)
    with torch.no_grad():
        model[0].weight.mul_(10)
    after = grad_norms(model, x, y, label_smoothing=0.1)
    assert after[0]['grad'] == pytest.approx(before[0]['grad'] / 10, rel=1e-3)
    assert after[0]['ratio'] == pytest.approx(before[0]['ratio'] / 100, rel=1e-3)
    assert after[0]['scale_free'] == pytest.approx(before[0]['scale_free'], rel=1e-3)
    assert after[1]['grad'] == pytest.approx(before[1]['grad'], rel=1e-4)  # the Linear sees the same input


def test_grad_norms_use_the_training_loss_with_label_smoothing():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    smooth = grad_norms(model, x, y, label_smoothing=0.2)[0]['grad']
    loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
    assert smooth == pytest.approx(torch.autograd.grad(loss, model.weight)[0].norm().item(), rel=1e-6)
    assert smooth != pytest.approx(grad_norms(model, x, y)[0]['grad'], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# The study, end to end on digits

def test_smoke_study_writes_outputs_then_skips_and_resumes(tmp_path, capsys):
    keys = dict(dataset='digits', subset=256, max_steps=3, study_epochs=2, depths=[2, 3],
                study_width=16, wandb='off', runs_dir=str(tmp_path), study_seeds=[0], study_lrs=[])  # one cell each
    overrides = parse_args(exercise_1_2.config, [f'--{k}={v}' for k, v in keys.items()])
    for part in ('study', 'grads'):  # 'single' is the same train_run as one study cell
        overrides['part'] = part
        exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)

    out = tmp_path / 'exercise_1_2'
    for name in ('study.csv', 'study_acc.png', 'study_loss.png', 'grad_norms.png'):
        assert (out / name).stat().st_size > 0, name
    lines = (out / 'study.csv').read_text().splitlines()
    assert lines[0] == ('model,depth,width,lr,seed,chosen,params,best_val_acc,test_acc,final_train_loss,'
                        'clean_train_loss,clean_train_acc,train_seconds,cell')
    assert [tuple(r.split(',')[:3]) for r in lines[1:]] == [
        ('plain', '2', '16'), ('residual', '2', '16'), ('plain', '3', '16'), ('residual', '3', '16')]
    cells = [out / r.split(',')[-1] for r in lines[1:]]
    assert [c.name[:-9] for c in cells] == [f'study-{m}-d{d}' for d in (2, 3) for m in ('plain', 'residual')]
    assert all((c / 'curves.png').exists() for c in cells)  # per-run figures through Run.log_figure
    out_text = capsys.readouterr().out
    assert 'first/last' in out_text  # the gradient summary

    # again: every cell is skipped, nothing is rewritten ...
    mtimes = [os.path.getmtime(c / 'results.json') for c in cells]
    (cells[1] / 'results.json').unlink()  # ... except one "interrupted" cell, which resumes
    overrides['part'] = 'study'
    exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    out_text = capsys.readouterr().out
    assert out_text.count('skip ') == 3
    assert f"resuming {cells[1] / 'checkpoints' / 'last.pt'}" in out_text
    assert 'epoch   1/2' not in out_text  # the resumed cell had finished training: no epoch re-run
    assert [os.path.getmtime(c / 'results.json') for i, c in enumerate(cells) if i != 1] == \
        [m for i, m in enumerate(mtimes) if i != 1]
    assert (cells[1] / 'results.json').exists()


# ---------------------------------------------------------------------------------------------
# W&B sweep

def test_sweep_config_validates_with_wandbs_validator():
    import yaml
    try:  # what wandb's own controller validates with (wandb.wandb_controller), from wandb[sweeps]
        import sweeps
    except ImportError:
        pytest.fail("needs the `sweeps` package (wandb[sweeps]): pip install --no-deps sweeps jsonref")
    with open(os.path.join(ROOT, 'sweeps', 'exercise_1_2.yaml')) as f:
        cfg = yaml.safe_load(f)
    assert sweeps.schema_violations_from_proposed_config(cfg) == []
    sweeps.SweepConfig(cfg)  # raises on an invalid config
    bad = {**cfg, 'method': 'grd', 'parameters': {**cfg['parameters'], 'depth': {'valus': [2]}}}
    assert len(sweeps.schema_violations_from_proposed_config(bad)) >= 2  # the validator has teeth

    # an agent runs `python exercise_1_2.py --key=value ...`: every cell must parse as one single run
    assert cfg['program'] == 'exercise_1_2.py' and '${args}' in cfg['command']
    params = cfg['parameters']
    fixed = {k: p['value'] for k, p in params.items() if 'value' in p}
    for model in params['model']['values']:
        for depth in params['depth']['values']:
            argv = [f'--{k}={v}' for k, v in {**fixed, 'model': model, 'depth': depth}.items()]
            parsed = parse_args(exercise_1_2.config, argv)
            assert parsed['part'] == 'single' and parsed['model'] == model and parsed['depth'] == depth
    config = exercise_1_2.config
    assert (fixed['width'], fixed['epochs']) == (config['study_width'], config['study_epochs'])


# ---------------------------------------------------------------------------------------------
# The seeded study: lr chosen on val with the first seed, the other seeds at that lr only

def fake_cells(monkeypatch, val_acc):
    """study.study_cell replaced by a row whose best_val_acc is val_acc(model, lr, seed) and whose
    test_acc ranks the lrs the other way round; returns the list of (model, depth, lr, seed) trained."""
    import study
    trained = []

    def cell(exercise, cell, build_model, data):
        trained.append((cell['model'], cell['depth'], cell['lr'], cell['seed']))
        val = val_acc(cell['model'], cell['lr'], cell['seed'])
        return {'model': cell['model'], 'depth': cell['depth'], 'lr': cell['lr'], 'seed': cell['seed'], 'params': 1,
                'best_val_acc': val, 'test_acc': 1 - val + cell['seed'] / 100, 'clean_train_loss': cell['seed'] / 10}
    monkeypatch.setattr(study, 'study_cell', cell)
    return trained


def test_seeded_study_chooses_the_best_val_lr_then_trains_the_other_seeds_there_only(monkeypatch):
    import study
    best = {'plain': 1e-3, 'residual': 3e-3}
    trained = fake_cells(monkeypatch, lambda model, lr, seed: 0.9 if lr == best[model] else 0.5 + lr)
    config = {**exercise_1_2.study_config(exercise_1_2.config), 'lr': 1.0}  # --lr is not in the grid: unused
    rows, summary = study.run_seeded_study('exercise_1_2', config, None, depths=[2, 4], seeds=[0, 1, 2],
                                           lrs=[3e-4, 1e-3, 3e-3])
    assert len(trained) == 2 * 2 * (3 + 2)  # (model, depth) x (grid at the first seed + two more seeds), not 9
    for model in ('plain', 'residual'):
        for depth in (2, 4):
            mine = [t for t in trained if t[:2] == (model, depth)]
            assert mine == [(model, depth, lr, 0) for lr in (3e-4, 1e-3, 3e-3)] + \
                [(model, depth, best[model], seed) for seed in (1, 2)]
    assert [(r['lr'], r['seed']) for r in rows if r['chosen'] and r['model'] == 'plain' and r['depth'] == 2] == \
        [(1e-3, 0), (1e-3, 1), (1e-3, 2)]
    assert [(s['model'], s['depth'], s['lr'], s['n_seeds']) for s in summary] == \
        [('plain', 2, 1e-3, 3), ('residual', 2, 3e-3, 3), ('plain', 4, 1e-3, 3), ('residual', 4, 3e-3, 3)]


def test_lr_choice_ignores_the_test_split_and_breaks_ties_to_the_smaller_lr():
    from study import choose_lr
    grid = [{'lr': 3e-4, 'best_val_acc': 0.80, 'test_acc': 0.95}, {'lr': 1e-3, 'best_val_acc': 0.85, 'test_acc': 0.70},
            {'lr': 3e-3, 'best_val_acc': 0.85, 'test_acc': 0.99}]
    assert choose_lr(grid) == 1e-3  # the val tie between 1e-3 and 3e-3 goes to the smaller lr
    swapped = [{**r, 'test_acc': t} for r, t in zip(grid, [0.1, 0.99, 0.2])]
    assert choose_lr(swapped) == choose_lr(grid)
    assert choose_lr([{'lr': 1e-3, 'best_val_acc': 0.5}]) == 1e-3


def test_seeded_study_refuses_a_bad_grid_before_training(monkeypatch):
    import study
    from config import UserError
    trained = fake_cells(monkeypatch, lambda model, lr, seed: 0.5)
    config = exercise_1_2.study_config(exercise_1_2.config)
    for seeds, lrs in (([], [1e-3]), ([0, 0], [1e-3]), ([0.5], []), ([0], [1e-3, 1e-3]), ([0], [0.0])):
        with pytest.raises(UserError):
            study.run_seeded_study('exercise_1_2', config, None, depths=[2], seeds=seeds, lrs=lrs)
    assert trained == []


def swapped_test_labels(data_dir=''):
    """scikit-learn's digits with the test labels permuted: train and val are digits' own."""
    from dataset import load_digits_dataset
    arrays = load_digits_dataset(data_dir)
    x, y = arrays['test']
    return {**arrays, 'test': (x, np.roll(y, 7))}


SEEDED = dict(dataset='digits', subset=256, max_steps=3, study_epochs=1, depths=[2], study_width=16, wandb='off',
              study_seeds=[0, 1], study_lrs=[1e-3, 3e-2])


def test_seeded_smoke_study_tables_rerun_and_the_test_split_chooses_nothing(tmp_path, monkeypatch, capsys):
    import csv
    import dataclasses
    import json
    import statistics
    import study
    from dataset import DATASETS
    overrides = parse_args(exercise_1_2.config, [f'--{k}={v}' for k, v in {**SEEDED, 'part': 'study',
                                                                              'runs_dir': str(tmp_path)}.items()])
    exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    out = tmp_path / 'exercise_1_2'
    with open(out / 'study.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (2 + 1)  # per model: both lrs at seed 0, seed 1 at the chosen lr
    for model in ('plain', 'residual'):
        grid = [r for r in rows if r['model'] == model and r['seed'] == '0']
        assert [float(r['lr']) for r in grid] == [1e-3, 3e-2]
        chosen = study.choose_lr([{'lr': float(r['lr']), 'best_val_acc': float(r['best_val_acc'])} for r in grid])
        [extra] = [r for r in rows if r['model'] == model and r['seed'] == '1']
        assert float(extra['lr']) == chosen
        assert [r['chosen'] == 'True' for r in grid + [extra]] == [float(r['lr']) == chosen for r in grid] + [True]
    # the summary: mean, sample std, range over the chosen cells' rows
    with open(out / 'study_summary.csv', newline='') as f:
        summary = list(csv.DictReader(f))
    record = json.loads((out / 'study.json').read_text())
    assert [r['cell'] for r in record['rows']] == [r['cell'] for r in rows]
    for s, kept in zip(summary, record['summary']):
        accs = [float(r['test_acc']) for r in rows if r['model'] == s['model'] and r['chosen'] == 'True']
        assert int(s['n_seeds']) == len(accs) == 2 and float(s['lr']) == kept['lr']
        assert float(s['test_acc_mean']) == pytest.approx(statistics.fmean(accs)) == kept['test_acc_mean']
        assert float(s['test_acc_std']) == pytest.approx(statistics.stdev(accs)) == kept['test_acc_std']
        assert (float(s['test_acc_min']), float(s['test_acc_max'])) == (min(accs), max(accs))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith('study-')]
    assert [line.split(':')[0] for line in printed] == ['study-plain-d2', 'study-residual-d2']  # one per (model, depth)
    assert all(line.endswith('3 cells: 3 trained') for line in printed)  # the cells' own lines held back

    # again: every cell is reused, no folder is added
    folders = sorted(p.name for p in out.iterdir() if p.name.startswith('study-'))
    exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    printed = capsys.readouterr().out
    assert printed.count('3 cells: 3 reused') == 2 and 'trained' not in printed
    assert sorted(p.name for p in out.iterdir() if p.name.startswith('study-')) == folders
    # grads looks at each (model, depth)'s chosen cell at the first seed, found without training
    study_settings = exercise_1_2.study_config({**exercise_1_2.config, **overrides})
    cells = study.chosen_cells('exercise_1_2', study_settings, ('plain', 'residual'), [2], [0, 1], [1e-3, 3e-2])
    assert [(c['lr'], c['seed']) for c in cells.values()] == \
        [(float(r['lr']), 0) for r in rows if r['seed'] == '0' and r['chosen'] == 'True']
    exercise_1_2.main({**exercise_1_2.config, **overrides, 'part': 'grads'}, {**overrides, 'part': 'grads'})
    assert 'first/last' in capsys.readouterr().out and (out / 'grad_norms.png').exists()

    # the same cells with the test labels permuted: the same choice and val accuracies, other test accuracies
    monkeypatch.setitem(DATASETS, 'digits_swapped', dataclasses.replace(DATASETS['digits'], loader=swapped_test_labels))
    config = exercise_1_2.study_config({**exercise_1_2.config, **overrides, 'dataset': 'digits_swapped'})
    swapped, _ = study.run_seeded_study('exercise_1_2', config, exercise_1_2.build_model, depths=[2], seeds=[0, 1],
                                        lrs=[1e-3, 3e-2])
    assert [(r['model'], r['lr'], r['seed'], r['chosen']) for r in swapped] == \
        [(r['model'], float(r['lr']), int(r['seed']), r['chosen'] == 'True') for r in rows]
    assert [r['best_val_acc'] for r in swapped] == [float(r['best_val_acc']) for r in rows]
    assert [r['test_acc'] for r in swapped] != [float(r['test_acc']) for r in rows]
