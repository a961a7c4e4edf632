"""Exercise 2.1: the four analyses on cases with known answers, and the script's smoke runs.

CPU only, no network; a few seconds, most of it the two smoke runs on scikit-learn's digits.
"""
import json
import math
import os

import pytest
import torch
from torch import nn

import exercise_1_2
import exercise_2_1
from analysis import (autocorrelation, calibrate_batchnorm, deleted, filter_normalized_direction, head, landscape,
                      lesion_study, lesion_units, line_gradient, recalibrated)
from config import cli, parse_args
from controls import branch_ratios, unscale_branches
from dataset import Split, load_data
from evaluate import evaluate, load_model
from models import CNN, MLP, SkipMLP
from study import cell_config, cell_dir


def split_of(x: torch.Tensor, y: torch.Tensor) -> Split:
    """A Split whose normalize() is the identity on float inputs (mean 0, std 1/255 undoes the /255)."""
    c = x.shape[1]
    return Split(x=x, y=y, mean=torch.zeros(1, c, 1, 1), std=torch.full((1, c, 1, 1), 1 / 255))


# ---------------------------------------------------------------------------------------------
# Lesion

def test_residual_block_with_zero_branch_is_unaffected_by_its_lesion():
    torch.manual_seed(0)
    model = SkipMLP(12, [8] * 6, 3, init='he').eval()
    x = torch.randn(5, 12)
    units = lesion_units(model)
    assert len(units) == 3
    with torch.no_grad():
        units[1][0].branch[-1].weight.zero_()
        units[1][0].branch[-1].bias.zero_()
    out = model(x)
    with deleted([units[1]]):
        torch.testing.assert_close(model(x), out)
    with deleted([units[0]]):  # a live branch: deleting it changes the output
        assert not torch.allclose(model(x), out)
    torch.testing.assert_close(model(x), out)  # hooks removed on exit


def test_plain_lesion_units_are_pairs_from_the_output_and_identity_pairs_delete_cleanly():
    torch.manual_seed(0)
    model = MLP(12, [8] * 6, 3).eval()  # 5 width x width layers -> units [l1], [l2, l3], [l4, l5]
    units = lesion_units(model)
    hidden = [m for m in model.features if isinstance(m, nn.Linear)]
    assert [[hidden.index(m) for m in u] for u in units] == [[1], [2, 3], [4, 5]]
    with torch.no_grad():  # make the middle pair the identity: deleting it changes nothing
        for m in units[1]:
            m.weight.copy_(torch.eye(8))
            m.bias.zero_()
    x = torch.randn(5, 12)
    out = model(x)
    with deleted([units[1]]):
        torch.testing.assert_close(model(x), out)


def test_lesion_record_and_cnn_units():
    torch.manual_seed(0)
    model = SkipMLP(4, [6] * 8, 2, init='he')
    split = split_of(torch.randn(40, 1, 2, 2), torch.randint(0, 2, (40,)))
    r = lesion_study(model, split, draws=3, generator=torch.Generator().manual_seed(0))
    assert len(r['one_block']) == 4 and list(r['k_blocks']) == ['1', '2', '4']
    assert r['k_blocks']['1'] == pytest.approx(sum(r['one_block']) / 4)
    cnn = CNN(1, 3, [4, 8], depth=2, variant='residual')
    assert len(lesion_units(cnn)) == 4  # depth blocks per stage


def test_branch_ratio_is_zero_for_a_zero_branch_and_positive_otherwise():
    torch.manual_seed(0)
    model = SkipMLP(12, [8] * 6, 3, init='he')
    with torch.no_grad():
        model.blocks[1].branch[-1].weight.zero_()
        model.blocks[1].branch[-1].bias.zero_()
    ratios = branch_ratios(model, torch.randn(5, 12))
    assert len(ratios) == 3 and ratios[1] == 0 and ratios[0] > 0 and ratios[2] > 0
    cnn = CNN(1, 3, [4, 8], depth=2, variant='residual', init='he')
    for block in lesion_units(cnn)[:1]:
        block[0].bn2.weight.data.zero_()  # a BasicBlock whose branch ends in a zero BatchNorm
    ratios = branch_ratios(cnn, torch.randn(3, 1, 8, 8))
    assert len(ratios) == 4 and ratios[0] == 0 and min(ratios[1:]) > 0


def test_batchnorm_recalibration_changes_running_statistics_only_and_restores_them():
    torch.manual_seed(0)
    model = CNN(1, 3, [4, 8], depth=1, variant='residual', init='he').eval()
    params = {k: v.clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(16, 1, 8, 8) * 3 + 1
    with recalibrated(model, x):
        assert not model.training
        changed = [k for k, v in model.named_buffers() if not torch.equal(v, buffers[k])]
        assert {k.rsplit('.', 1)[1] for k in changed} == {'running_mean', 'running_var', 'num_batches_tracked'}
        assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
        bn = model.features[0][1]
        torch.testing.assert_close(bn.running_mean, model.features[0][0](x).mean((0, 2, 3)))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_lesion_with_recalibration_records_both_and_an_intact_net_recalibrated_on_its_own_stats_is_unchanged():
    torch.manual_seed(0)
    model = CNN(1, 3, [4], depth=2, variant='residual', init='he')
    split = split_of(torch.randn(24, 1, 8, 8), torch.randint(0, 3, (24,)))
    x = split.normalize(split.x)
    calibrate_batchnorm(model, x)  # running statistics = x's: re-estimating them on x changes nothing
    r = lesion_study(model, split, draws=2, generator=torch.Generator().manual_seed(0), calibration=x)
    bn = r['recalibrated']
    assert bn['intact'] == pytest.approx(r['intact']) and len(bn['one_block']) == len(r['one_block']) == 2
    assert set(bn['k_blocks']) == set(r['k_blocks']) and bn['calibration_samples'] == 24
    assert 'recalibrated' not in lesion_study(SkipMLP(64, [6] * 4, 3), split, 1, torch.Generator())


# ---------------------------------------------------------------------------------------------
# Init controls

def test_unscaled_residual_net_differs_from_the_scaled_one_only_in_each_branchs_last_layer():
    torch.manual_seed(3)
    scaled = SkipMLP(12, [8] * 8, 3, init='he')
    torch.manual_seed(3)
    unscaled = unscale_branches(SkipMLP(12, [8] * 8, 3, init='he'))
    last = {f'blocks.{i}.branch.{len(b.branch) - 1}.weight' for i, b in enumerate(scaled.blocks)}
    for (name, p), q in zip(scaled.named_parameters(), unscaled.parameters()):
        if name in last:
            torch.testing.assert_close(q, p * 2)  # sqrt(4 blocks)
        else:
            assert torch.equal(p, q), name
    torch.manual_seed(3)
    cnn = CNN(1, 3, [4, 8], depth=4, variant='residual', init='he')
    torch.manual_seed(3)
    cnn_unscaled = unscale_branches(CNN(1, 3, [4, 8], depth=4, variant='residual', init='he'))
    for (name, p), q in zip(cnn.named_parameters(), cnn_unscaled.parameters()):
        if name.endswith('bn2.weight'):
            assert torch.all(p == 0.5) and torch.all(q == 1), name
        else:
            assert torch.equal(p, q), name
    torch.manual_seed(3)
    default = SkipMLP(12, [8] * 8, 3)  # init='torch' scales nothing: nothing to undo
    assert all(torch.equal(p, q) for p, q in zip(default.parameters(), unscale_branches(default).parameters()))


# ---------------------------------------------------------------------------------------------
# Loss landscape

def test_directions_are_filter_normalised_and_skip_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4))
    d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for p, dp in zip(model.parameters(), d):
        if p.dim() == 1:
            assert dp.abs().sum() == 0
        else:
            torch.testing.assert_close(dp.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))


def test_linear_softmax_landscape_matches_its_closed_form():
    # one linear layer, no bias: logits z(a) = (W + a D) x, so the loss along D is exactly
    # mean_i [logsumexp(z_i + a u_i) - z_iy - a u_iy], u = D x (convex, and what loss_at must give)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    x, y = torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,))
    weight = model[1].weight.detach().clone()
    r = landscape(model, split_of(x, y), directions=1, points=5, grid=3, generator=torch.Generator().manual_seed(1))
    (d,) = filter_normalized_direction(model, torch.Generator().manual_seed(1))  # the same first draw
    z, u = x.flatten(1) @ weight.T, x.flatten(1) @ d.T
    expected = [(torch.logsumexp(z + a * u, 1) - (z + a * u)[torch.arange(10), y]).mean().item() for a in r['alphas']]
    assert r['curves'][0] == pytest.approx(expected, rel=1e-5)
    assert r['loss0'] == pytest.approx(expected[2], rel=1e-5)
    assert r['rise']['1'] == pytest.approx((expected[0] + expected[4]) / 2 - expected[2], rel=1e-4, abs=1e-6)
    torch.testing.assert_close(model[1].weight, weight)  # restored
    assert len(r['surface']) == len(r['surface'][0]) == 3


# ---------------------------------------------------------------------------------------------
# Shattered gradients

def test_one_layer_linear_net_has_a_constant_gradient_along_the_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x0, x1 = torch.randn(1, 2, 2), torch.randn(1, 2, 2)
    g = line_gradient(model, x0, x1, cls=2, points=9)
    expected = (model[1].weight[2] * (x1 - x0).flatten()).sum().item()
    assert g.tolist() == pytest.approx([expected] * 9, rel=1e-5)
    deep = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    assert g.std() < 1e-6 < line_gradient(deep, x0 * 3, x1 * 3, cls=2, points=64).std()


def test_autocorrelation_of_white_and_brown_noise():
    gen = torch.Generator().manual_seed(0)
    white = torch.randn(4096, generator=gen)
    brown = white.cumsum(0)
    assert autocorrelation(white, 2)[0] == pytest.approx(1.0)
    assert abs(autocorrelation(white, 2)[1]) < 0.05
    assert autocorrelation(brown, 2)[1] > 0.95
    t = torch.arange(1000, dtype=torch.float64)
    assert autocorrelation(torch.cos(2 * math.pi * t / 100), 50)[50] == pytest.approx(-1.0, abs=0.06)


# ---------------------------------------------------------------------------------------------
# The script

def test_lesion_part_reuses_the_1_2_cells_and_writes_the_record(tmp_path, capsys):
    # exercise 1.2's study with 2.1's smoke settings first: 2.1 must find and reuse its cells
    smoke = exercise_2_1.SMOKE_SETTINGS['mlp']
    keys = dict(dataset='digits', subset=256, wandb='off', runs_dir=str(tmp_path), part='study', depths=[4],
                **{k: v for k, v in smoke.items() if k != 'depths'})
    overrides = parse_args(exercise_1_2.config, [f'--{k}={v}' for k, v in keys.items()])
    exercise_1_2.main({**exercise_1_2.config, **overrides}, overrides)
    capsys.readouterr()
    cli(exercise_2_1.main, exercise_2_1.config,
        ['--smoke', 'True', '--part', 'lesion', '--depths', '[4]', '--runs_dir', str(tmp_path)])
    printed = capsys.readouterr().out
    assert printed.count('skip ') == 2 and 'epoch' not in printed  # nothing trained twice
    (path,) = (tmp_path / 'exercise_2_1').glob('mlp-*/results.json')
    lesion = json.loads(path.read_text())['lesion']
    assert set(lesion) == {'plain', 'residual'}
    for model in lesion:
        r = lesion[model]['4']
        assert 0 <= r['intact'] <= 1 and len(r['one_block']) == 2 and set(r['k_blocks']) == {'1', '2'}


def test_cnn_smoke_runs_every_part(tmp_path):
    cli(exercise_2_1.main, exercise_2_1.config, ['--smoke', 'True', '--study', 'cnn', '--runs_dir', str(tmp_path)])
    (out,) = (tmp_path / 'exercise_2_1').glob('cnn-*')
    results = json.loads((out / 'results.json').read_text())
    assert set(exercise_2_1.PARTS) <= set(results)
    assert set(results['shattering']) == {'init', 'trained'}
    for name in ('grad_norms', 'lesion', 'landscape_1d', 'landscape_contour', 'landscape_surface', 'shattering',
                 'controls'):
        assert (out / f'{name}.png').stat().st_size > 0, name
    # the controls' and item 10's keys
    deep = results['shattering']['trained']['residual']['2']
    assert len(deep['lag1_lines']) == deep['lines'] and deep['lag1'] == pytest.approx(sum(deep['lag1_lines']) / 2)
    assert set(results['landscape']['init']) == {'plain', 'residual'}
    assert len(results['landscape']['residual']['2']['curves']) == 1  # the per-direction curves
    for model in ('plain', 'residual'):
        assert 'recalibrated' in results['lesion'][model]['2']
    assert len(results['lesion']['residual']['2']['branch_ratio']) == 2 * 3  # blocks per stage x stages
    assert set(results['controls']['grads']) == set(exercise_2_1.CONTROLS) == set(results['controls']['shattering'])
    assert len(results['controls']['grads']['residual_unscaled']['2']) == len(results['controls']['grads']['residual']['2'])


def test_init_landscape_is_taken_at_the_cells_initial_weights(tmp_path):
    cli(exercise_2_1.main, exercise_2_1.config,
        ['--smoke', 'True', '--part', 'landscape', '--depths', '[2]', '--runs_dir', str(tmp_path)])
    (path,) = (tmp_path / 'exercise_2_1').glob('mlp-*/results.json')
    land = json.loads(path.read_text())['landscape']
    config = {**exercise_2_1.config, **exercise_2_1.SMOKE, 'smoke': True, 'depths': [2], 'runs_dir': str(tmp_path)}
    study, _ = exercise_2_1.study_settings(config)
    data = load_data(study, torch.device('cpu'))
    train = head(data.train, exercise_2_1.SMOKE['landscape_samples'])
    for model in ('plain', 'residual'):
        best = os.path.join(cell_dir('exercise_1_2', cell_config(study, model, 2)), 'checkpoints', 'best.pt')
        trained, ckpt = load_model(best)
        torch.manual_seed(ckpt.config['seed'])
        initial = exercise_1_2.build_model(ckpt.config, data)
        assert land['init'][model]['2']['loss0'] == pytest.approx(evaluate(initial, train)['loss'], rel=1e-6)
        assert land[model]['2']['loss0'] == pytest.approx(evaluate(trained, train)['loss'], rel=1e-6)
        assert land[model]['2']['loss0'] != pytest.approx(land['init'][model]['2']['loss0'], rel=1e-3)


def test_settings_must_be_keys_of_the_exercise(capsys):
    with pytest.raises(SystemExit) as e:
        cli(exercise_2_1.main, exercise_2_1.config, ['--settings', "{'study_widht': 8}"])
    assert e.value.code == 1 and 'study_widht' in capsys.readouterr().err
