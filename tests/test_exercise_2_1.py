"""Exercise 2.1: the four analyses on cases with known answers, and the script's smoke runs.

CPU only, no network; a few seconds, most of it the two smoke runs on scikit-learn's digits.
"""
import json
import math

import pytest
import torch
from torch import nn

import exercise_1_2
import exercise_2_1
from analysis import (autocorrelation, deleted, filter_normalized_direction, landscape, lesion_study,
                      lesion_units, line_gradient)
from config import cli, parse_args
from dataset import Split
from models import CNN, MLP, SkipMLP


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
    for name in ('grad_norms', 'lesion', 'landscape_1d', 'landscape_contour', 'landscape_surface', 'shattering'):
        assert (out / f'{name}.png').stat().st_size > 0, name


def test_settings_must_be_keys_of_the_exercise(capsys):
    with pytest.raises(SystemExit) as e:
        cli(exercise_2_1.main, exercise_2_1.config, ['--settings', "{'study_widht': 8}"])
    assert e.value.code == 1 and 'study_widht' in capsys.readouterr().err
