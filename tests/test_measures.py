"""Fair measures for 2.2 and 2.3 (issue 18 items 1-7, issue 15 item 3): the substrate, the constant
baseline, bootstrap intervals, the scaled blur, the map-size refusal and the near-chance warning of
2.3; the box ablation of 2.2. CPU, tiny models, about a second each."""
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

import detect
import exercise_2_3 as ex23
import explain as E
from config import UserError

MEAN, STD = torch.tensor([0.2860]), torch.tensor([0.3530])  # Fashion-MNIST's


def tiny_cnn(pools: int = 2) -> nn.Sequential:
    """conv -> ReLU -> pools x MaxPool [target = index 2] -> GAP -> fc: maps of 28 / 2**pools cells a side."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(*[nn.MaxPool2d(2) for _ in range(pools)]),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def images(n: int = 6, size: int = 28) -> torch.Tensor:
    """Normalised 'garments': a bright blob on black, like Fashion-MNIST."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, 1, size, size)
    for k in range(n):
        r, c = torch.randint(4, size - 12, (2,), generator=g).tolist()
        x[k, 0, r:r + 10, c:c + 8] = torch.rand(10, 8, generator=g) * 0.5 + 0.5
    return (x - MEAN) / STD


CONFIG = {'seed': 0, 'batch_size': 4, 'steps': 4}


def test_substrate_is_black_on_black_background_sets_and_rise_elsewhere():
    """What docs/exercise_2_3.md says: black for mnist / fashion_mnist / digits (deletion, insertion
    start and Average Drop's masking alike), RISE's mean colour + blur for cifar10 and imagenette."""
    for name in ('mnist', 'fashion_mnist', 'digits'):
        assert ex23.substrate_for(name, 'auto') == 'black'
    for name in ('cifar10', 'imagenette'):
        assert ex23.substrate_for(name, 'auto') == 'rise'
    assert ex23.substrate_for('fashion_mnist', 'rise') == 'rise'       # an explicit choice wins
    x = images()
    removed, start = E.substrate_fns('black', MEAN, STD)
    assert torch.allclose(removed(x) * STD + MEAN, torch.zeros_like(x), atol=1e-6)  # pixel value 0
    assert torch.equal(start(x), removed(x))
    removed, start = E.substrate_fns('rise', MEAN, STD)
    assert torch.equal(removed(x), torch.zeros_like(x)) and torch.equal(start(x), E.blur(x))

    # one "removed" everywhere: the last deletion step and a zero map in Average Drop both see black
    model = tiny_cnn()
    black = E.substrate_fns('black', MEAN, STD)[0]
    with torch.no_grad():
        c = model(x).argmax(1)
        p_black = model(black(x)).softmax(1).gather(1, c[:, None])[:, 0]
    removed, start = E.substrate_fns('black', MEAN, STD)
    di = E.deletion_insertion_auc(model, x, torch.rand(len(x), 28, 28), None, steps=4, substrate_fn=removed,
                                  insertion_fn=start)
    assert torch.allclose(di['deletion_curve'][-1], p_black.mean(), atol=1e-6)
    assert torch.allclose(di['insertion_curve'][0], p_black.mean(), atol=1e-6)
    ad = E.average_drop_increase(model, x, torch.zeros(len(x), 28, 28), None, substrate_fn=removed, per_image=True)
    with torch.no_grad():
        p = model(x).softmax(1).gather(1, c[:, None])[:, 0]
    assert torch.allclose(ad['average_drops'], 100 * (p - p_black).clamp(min=0) / p, atol=1e-4)


def test_a_constant_map_never_beats_random_by_construction():
    """Its pixel order is the random map's (ties broken by it) and shuffling it changes nothing:
    every paired difference with 'random' is exactly 0, a tie, on all four metrics."""
    model, x = tiny_cnn(), images(8)
    table = E.faithfulness(model, x, model[2], model[5], MEAN, STD, 'black', **CONFIG)['table']
    row = table['constant']
    for k in E.BETTER:
        assert row['vs']['random'][k]['diff'] == 0 and row['vs']['random'][k]['verdict'] == 'tie'
        assert row['beats_random'][k] is False
    assert row['deletion_auc'] == table['random']['deletion_auc']     # the same order, the same curve
    for m in E.METHODS:                                               # methods carry intervals and verdicts
        assert set(table[m]['vs']) == {'random', 'random_smooth', 'constant'}
        assert all(lo <= table[m][k] <= hi for k, (lo, hi) in table[m]['ci95'].items())


def test_bootstrap_interval_covers_a_known_case():
    """Bernoulli(0.4) per-image values, n = 100: the 95% interval holds the true mean in about 95% of
    samples and is as wide as the normal approximation says; paired comparisons call ties ties."""
    g = torch.Generator().manual_seed(1)
    hits, widths = 0, []
    for trial in range(200):
        v = (torch.rand(100, generator=g) < 0.4).float()
        lo, hi = E.bootstrap_ci(v, resamples=1000, seed=trial)
        hits += lo <= 0.4 <= hi
        widths.append(hi - lo)
    assert 0.90 <= hits / 200 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * (0.4 * 0.6 / 100) ** 0.5, rel=0.1)
    a = torch.rand(300, generator=g)
    assert E.compare(a, a, 'lower')['verdict'] == 'tie'
    assert E.compare(a - 0.1, a, 'lower')['verdict'] == 'better'
    assert E.compare(a - 0.1, a, 'higher')['verdict'] == 'worse'
    noisy = a + 0.01 * torch.randn(300, generator=g)                  # no real difference
    assert E.compare(noisy, a, 'higher')['ci95'][0] < 0 < E.compare(noisy, a, 'higher')['ci95'][1]


def test_insertion_blur_sigma_scales_with_image_size_and_its_start_is_checked():
    assert E.blur_sigma(224) == 5.0 and E.blur_sigma(28) == pytest.approx(0.625)
    x = images(2)
    assert torch.allclose(E.blur(x), gaussian_blur(x, [5, 5], [0.625, 0.625]))
    assert not torch.allclose(E.blur(x), gaussian_blur(x, [11, 11], [5.0, 5.0]))  # not RISE's 224 px blur
    model = tiny_cnn()
    checks = E.faithfulness(model, images(8), model[2], model[5], MEAN, STD, 'rise', **CONFIG)['checks']
    start = checks['insertion_start']
    assert start['chance'] == 0.1 and start['near_chance'] == (start['agreement_with_prediction'] < 0.2)


def test_maps_too_small_to_localise_are_refused_in_one_line():
    model = tiny_cnn(pools=4)                                         # 28 -> 1x1 maps
    with pytest.raises(UserError, match='1x1'):
        ex23.check_maps(model, images(1), model[2], model[5], 0.9, 10, {'min_map_size': 3})
    model = tiny_cnn(pools=3)                                         # 3x3: allowed
    hw, warnings = ex23.check_maps(model, images(1), model[2], model[5], 0.9, 10, {'min_map_size': 3})
    assert hw == (3, 3) and warnings == []


def test_near_chance_accuracy_is_warned_about(capsys):
    model = tiny_cnn()
    _, warnings = ex23.check_maps(model, images(1), model[2], model[5], 0.35, 10, {'min_map_size': 3})
    assert len(warnings) == 1 and 'near chance' in warnings[0] and 'near chance' in capsys.readouterr().out
    _, warnings = ex23.check_maps(model, images(1), model[2], model[5], 0.60, 10, {'min_map_size': 3})
    assert warnings == []


def test_box_ablation_raw_windows_and_the_no_ink_rule():
    """refine=False gives the window the network fired in, drop_empty=False keeps windows on black."""
    canvas = np.zeros((100, 100), np.uint8)
    canvas[10:30, 14:24] = 200                                        # one object, ink box x 14..24, y 10..30
    windows = np.array([[8, 8], [64, 64], [88, 88]])                 # on the object, on black, at the border
    boxes, keep = detect.refine_boxes(windows, 28, canvas, 32, 4)
    assert keep.tolist() == [True, False, False] and boxes[0].tolist() == [14, 10, 24, 30]
    boxes, keep = detect.refine_boxes(windows, 28, canvas, 32, 4, refine=False)
    assert keep.tolist() == [True, False, False] and boxes[0].tolist() == [8, 8, 36, 36]
    boxes, keep = detect.refine_boxes(windows, 28, canvas, 32, 4, refine=False, drop_empty=False)
    assert keep.all() and boxes.tolist() == [[8, 8, 36, 36], [64, 64, 92, 92], [88, 88, 100, 100]]
    boxes, keep = detect.refine_boxes(windows, 28, canvas, 32, 4, drop_empty=False)
    assert keep.all() and boxes[0].tolist() == [14, 10, 24, 30] and boxes[1].tolist() == [64, 64, 92, 92]
