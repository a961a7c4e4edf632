"""Exercise 2.2: network surgery (exact for the MLP, what holds for the CNN), canvases, decoding,
the metric wiring on known cases, bad input as one line, and a smoke run of the whole script on
a tiny synthetic MNIST. CPU, offline, seconds."""
import json
import os

import numpy as np
import pytest
import torch

import canvases
import detect
import detect_metrics
import exercise_2_2 as ex22
from config import UserError, cli
from conftest import write_mnist
from models import CNN, MLP, SkipMLP

EX = 'exercise_2_2'


def randomize_bn(model):
    """Eval-mode BatchNorm with non-trivial statistics, so the surgery is tested on a real affine map."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Surgery

def test_mlp_surgery_is_exact_at_every_position():
    torch.manual_seed(0)
    mlp = MLP(784, [64, 32], 10, dropout=0.2).eval()
    fcn = detect.fully_convolutionalize(mlp, (1, 28, 28))
    assert fcn.geometry == detect.Geometry(stride=1, receptive_field=28, offset=0, window=28)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (fcn(x)[:, :, 0, 0] - mlp(x)).abs().max() <= 1e-5      # one crop: the classifier's logits
        canvas = torch.randn(2, 1, 36, 41)
        out = fcn(canvas)                                              # (2, 10, 9, 14)
        crops = canvas.unfold(2, 28, 1).unfold(3, 28, 1)               # (2, 1, 9, 14, 28, 28): every crop
        ref = mlp(crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, 28, 28)).view(2, 9, 14, 10).permute(0, 3, 1, 2)
    assert out.shape == (2, 10, 9, 14) and (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize('depth,variant', [(0, 'plain'), (1, 'residual')])
def test_cnn_surgery_exact_on_a_crop_local_and_stride_equivariant(depth, variant):
    torch.manual_seed(0)
    cnn = randomize_bn(CNN(1, 10, [4, 8, 16], depth=depth, variant=variant))
    fcn = detect.fully_convolutionalize(cnn, (1, 28, 28))
    g = fcn.geometry
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert (fcn(x)[:, :, 0, 0] - cnn(x)).abs().max() <= 1e-5        # the GAP of one crop, exactly
    assert g.stride == 8 and g.window == 28                            # three MaxPool(2)

    # locality, exact: output (i, j) does not move when every pixel outside its receptive field does,
    # and the receptive field is tight: its edge pixels do reach it (union over a batch of inputs)
    i = j = -(g.offset // g.stride)                                   # the first position whose field is inside
    lo, hi = g.offset + g.stride * i, g.offset + g.stride * i + g.receptive_field
    size = hi + 5
    canvas = torch.randn(16, 1, size, size, requires_grad=True)
    fcn(canvas)[:, :, i, j].sum().backward()
    support = canvas.grad.abs().sum((0, 1)) > 0                        # (size, size)
    rows = torch.nonzero(support.any(1))[:, 0]
    cols = torch.nonzero(support.any(0))[:, 0]
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (lo, hi, lo, hi)
    with torch.no_grad():
        outside = canvas.detach().clone()
        noise = torch.randn_like(outside)
        noise[:, :, lo:hi, lo:hi] = 0
        assert torch.equal(fcn(outside + noise)[:, :, i, j], fcn(outside)[:, :, i, j])

        # stride equivariance, exact away from the border: content moved by one stride moves the map by one
        big = torch.randn(2, 1, 120, 120)
        a, b = fcn(big[:, :, 8:, 8:]), fcn(big)
        inner = slice(-g.offset // g.stride + 1, -(g.receptive_field // g.stride + 1))
        assert torch.allclose(a[:, :, inner, inner], b[:, :, 1:, 1:][:, :, inner, inner], atol=1e-5)


def test_models_that_cannot_be_converted_are_one_line():
    for model, shape in ((SkipMLP(784, [16, 16], 10), (1, 28, 28)), (MLP(64, [16], 10), (1, 28, 28)),
                         (CNN(3, 10, [4, 8, 16], depth=0), (1, 28, 28))):
        with pytest.raises(UserError) as e:
            detect.fully_convolutionalize(model, shape)
        assert '\n' not in str(e.value)
    assert 'SkipMLP' in str(pytest.raises(UserError, detect.fully_convolutionalize,
                                          SkipMLP(784, [16], 10), (1, 28, 28)).value)


# ---------------------------------------------------------------------------------------------
# Canvases

def split_images(n=40, seed=0):
    """(x uint8 (n, 1, 28, 28), y): a blob of ink at a random size in the middle of each image."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, 28, 28), np.uint8)
    for k in range(n):
        h, w = rng.integers(6, 22, 2)
        t, l = (28 - h) // 2, (28 - w) // 2
        x[k, 0, t:t + h, l:l + w] = rng.integers(100, 256)
        x[k, 0, t, l] = 20                                             # faint: below the ink threshold
    return torch.from_numpy(x), torch.from_numpy(rng.integers(0, 10, n))


def test_canvases_are_seeded_real_images_with_tight_separate_ink_boxes():
    x, y = split_images()
    cv = canvases.make_canvases(x, y, 12, [0, 0], canvas_size=80, objects=[3, 4], min_gap=2, ink_threshold=32)
    again = canvases.make_canvases(x, y, 12, [0, 0], canvas_size=80, objects=[3, 4], min_gap=2, ink_threshold=32)
    other = canvases.make_canvases(x, y, 12, [0, 1], canvas_size=80, objects=[3, 4], min_gap=2, ink_threshold=32)
    assert torch.equal(cv.images, again.images) and not torch.equal(cv.images, other.images)
    assert cv.images.dtype == torch.uint8 and cv.images.shape == (12, 1, 80, 80)
    for k in range(len(cv)):
        img, boxes = cv.images[k, 0], cv.boxes[k].long()
        assert 3 <= len(boxes) <= 4 and torch.equal(cv.labels[k], y[cv.sources[k]])
        covered = torch.zeros_like(img, dtype=torch.bool)
        for b, src, (cy, cx), placed in zip(boxes.tolist(), cv.sources[k].tolist(), cv.centres[k].tolist(),
                                            cv.placements[k].tolist()):
            x0, y0, x1, y1 = b
            patch = img[y0:y1, x0:x1]
            assert canvases.ink_box(patch.numpy(), 32) == (0, 0, y1 - y0, x1 - x0)   # tight around the ink
            ref = x[src, 0]
            ry0, rx0, ry1, rx1 = canvases.ink_box(ref.numpy(), 32)
            assert torch.equal(patch, ref[ry0:ry1, rx0:rx1])                     # the real image, unscaled
            assert (cy - 14, cx - 14) == (y0 - ry0, x0 - rx0)                   # centre of the placed image
            assert placed == [cx - 14, cy - 14, cx + 14, cy + 14]                # its whole 28x28 square
            covered[y0:y1, x0:x1] = True
        assert not (img[~covered] > 32).any()                                   # no ink outside the boxes
        for a in range(len(boxes)):                                             # gaps of >= 2 px
            for b in range(a + 1, len(boxes)):
                p, q = boxes[a], boxes[b]
                assert p[2] + 2 <= q[0] or q[2] + 2 <= p[0] or p[3] + 2 <= q[1] or q[3] + 2 <= p[1]
    jitter = canvases.make_canvases(x, y, 6, [0, 0], canvas_size=100, objects=[3, 3], object_size=[20, 36])
    sizes = torch.cat([b[:, 2] - b[:, 0] for b in jitter.boxes])
    assert sizes.max() > 22                                                     # some images were scaled up
    for ink, placed in zip(jitter.boxes, jitter.placements):                    # each placed square holds its ink
        assert (placed[:, :2] <= ink[:, :2]).all() and (ink[:, 2:] <= placed[:, 2:]).all()
        assert torch.equal(placed[:, 2] - placed[:, 0], placed[:, 3] - placed[:, 1])
    assert [t['boxes'] for t in jitter.targets('placement')] == jitter.placements


def test_a_canvas_too_small_is_one_line():
    x, y = split_images()
    with pytest.raises(UserError) as e:
        canvases.make_canvases(x, y, 2, 0, canvas_size=50, objects=[3, 6])
    assert '\n' not in str(e.value) and '--canvas_size 88' in str(e.value)


def rule_labels(cv, corners, window, max_shift, background=10):
    """The label rule, written out again: the nearest object whose centre is within max_shift + 0.5 px
    (y and x) of the crop's centre, else background."""
    labels = []
    for k, cs in enumerate(corners):
        for t, l in cs.tolist():
            off = (cv.centres[k].double() - torch.tensor([t + window / 2, l + window / 2])).abs().amax(1)
            near = (off <= max_shift + 0.5).nonzero().flatten()
            labels.append(int(cv.labels[k][near[off[near].argmin()]]) if len(near) else background)
    return labels


@pytest.mark.parametrize('object_size', [[28, 28], [19, 27]], ids=['even', 'odd-jitter'])
def test_background_crops_follow_the_label_rule(object_size):
    x, y = split_images()
    cv = canvases.make_canvases(x, y, 10, [0, 0], canvas_size=100, objects=[3, 5], object_size=object_size)
    crops, labels = canvases.background_crops(cv, 28, max_shift=4, random_per_canvas=3, seed=0)
    corners = canvases.crop_corners(cv, 28, max_shift=4, random_per_canvas=3, seed=0)
    n_obj = sum(len(b) for b in cv.boxes)
    assert crops.shape == (2 * n_obj + 3 * 10, 1, 28, 28) and crops.dtype == torch.uint8
    assert labels.tolist() == rule_labels(cv, corners, 28, 4)           # every crop of every canvas
    i = 0
    for k, cs in enumerate(corners):
        padded = torch.nn.functional.pad(cv.images[k, 0], (28, 28, 28, 28))
        for t, l in cs.tolist():                                         # each crop is the canvas there
            assert torch.equal(crops[i, 0], padded[t + 28:t + 56, l + 28:l + 56])
            i += 1
        off = (torch.from_numpy(cs[:2 * len(cv.centres[k])]).double() + 14 -
               cv.centres[k].double().repeat_interleave(2, 0)).abs().amax(1)
        assert (off[0::2] <= 4.5).all() and (off[1::2] > 4.5).all()      # positive, then off-centre, per object
        assert labels[i - len(cs):i - len(cs) + 2 * len(cv.centres[k]):2].tolist() == cv.labels[k].tolist()


def test_ignore_zone_drops_the_crops_between_the_shifts_and_nothing_else():
    """ignore_shift 8: no crop whose nearest object centre is 4.5-8.5 px off is kept; off-centre crops
    lie beyond 8.5 px; every kept crop follows the label rule; ignore_shift = max_shift changes nothing."""
    x, y = split_images()
    cv = canvases.make_canvases(x, y, 20, [0, 0], canvas_size=100, objects=[3, 5])
    same = canvases.background_crops(cv, 28, max_shift=4, random_per_canvas=3, seed=0, ignore_shift=4)
    before = canvases.background_crops(cv, 28, max_shift=4, random_per_canvas=3, seed=0)
    assert torch.equal(same[0], before[0]) and torch.equal(same[1], before[1])
    crops, labels = canvases.background_crops(cv, 28, max_shift=4, random_per_canvas=3, seed=0, ignore_shift=8)
    corners = canvases.crop_corners(cv, 28, max_shift=4, random_per_canvas=3, seed=0, ignore_shift=8)
    kept, dropped = [], 0
    for k, cs in enumerate(corners):
        n = len(cv.centres[k])
        off = (torch.from_numpy(cs).double()[:, None] + 14 - cv.centres[k].double()[None]).abs().amax(2).amin(1)
        own = (torch.from_numpy(cs[:2 * n]).double() + 14 - cv.centres[k].double().repeat_interleave(2, 0)).abs().amax(1)
        assert (own[0::2] <= 4.5).all() and (own[1::2] > 8.5).all()     # positive; off-centre beyond the zone
        zone = (off > 4.5) & (off <= 8.5)
        dropped += int(zone.sum())
        kept.append(cs[~zone.numpy()])
    assert labels.tolist() == rule_labels(cv, kept, 28, 4) and len(crops) == sum(map(len, kept))
    assert dropped > 0 and (labels == 10).any()
    with pytest.raises(UserError):
        canvases.crop_corners(cv, 28, max_shift=4, random_per_canvas=3, seed=0, ignore_shift=3)


def test_odd_sized_objects_are_labelled_alike_on_either_side():
    """A 9 px object's centre falls mid-pixel (44.5): crops shifted by up to max_shift either way keep
    its class, those further off either way are background, and positives are drawn symmetrically."""
    img = torch.zeros(1, 1, 100, 100, dtype=torch.uint8)
    img[0, 0, 40:49, 50:59] = 255
    n = 300
    cv = canvases.Canvases(img.repeat(n, 1, 1, 1), [torch.tensor([[50., 40, 59, 49]])] * n,
                         [torch.tensor([7])] * n, [torch.tensor([[44.5, 54.5]])] * n, [torch.tensor([0])] * n)
    crops, labels = canvases.background_crops(cv, 28, max_shift=3, random_per_canvas=0, seed=0)
    offsets = []
    for crop, label in zip(crops[0::2, 0], labels[0::2]):               # the positives, read off the pixels
        rows, cols = (crop > 0).any(1).nonzero(), (crop > 0).any(0).nonzero()
        t, l = 40 - int(rows[0]), 50 - int(cols[0])                    # the crop's corner on the canvas
        offsets += [t + 14 - 44.5, l + 14 - 54.5]
        assert label == 7
    assert sorted(set(offsets)) == [-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]
    assert (labels[1::2] == 10).all()                                  # the off-centre ones
    many = torch.tensor(offsets)
    assert abs(float(many.mean())) < 0.35                              # no side favoured (sd of the mean ~0.1)


# ---------------------------------------------------------------------------------------------
# Decoding and metrics

def test_decode_maps_peaks_back_to_exact_ink_boxes():
    x, y = split_images()
    cv = canvases.make_canvases(x, y, 1, [3, 0], canvas_size=100, objects=[4, 4])
    g = detect.Geometry(stride=8, receptive_field=38, offset=-7, window=28)
    probs = torch.zeros(11, 10, 10)
    probs[10] = 1.0                                                    # background everywhere
    for (cy, cx), c in zip(cv.centres[0].tolist(), cv.labels[0].tolist()):
        i, j = round((cy - 14) / 8), round((cx - 14) / 8)              # the crop nearest each object
        probs[:, i, j] = 0
        probs[c, i, j] = 0.9
        if j + 1 < 10 and probs[10, i, j + 1] == 1:                  # a weaker duplicate next to it
            probs[:, i, j + 1] = 0
            probs[c, i, j + 1] = 0.6
    img = cv.images[0, 0]
    empty = [(i, j) for i in range(10) for j in range(10) if not (img[8 * i:8 * i + 28, 8 * j:8 * j + 28] > 32).any()
             and probs[3, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].max() == 0]
    assert empty                                                       # this canvas has a window without ink
    probs[3, empty[-1][0], empty[-1][1]] = 0.95                        # a peak on empty black: dropped
    out = detect.decode(probs, cv.images[0, 0].numpy(), g, num_objects=10, threshold=0.5, nms_iou=0.3,
                        ink_threshold=32, margin=4)
    order = torch.argsort(out['boxes'][:, 0] * 1000 + out['boxes'][:, 1])
    ref = torch.argsort(cv.boxes[0][:, 0] * 1000 + cv.boxes[0][:, 1])
    assert torch.equal(out['boxes'][order], cv.boxes[0][ref])          # exact ink boxes, duplicates gone
    assert torch.equal(out['labels'][order], cv.labels[0][ref])
    assert (out['scores'] == 0.9).all()
    high = detect.decode(probs, cv.images[0, 0].numpy(), g, 10, 0.95, 0.3, 32, 4)
    assert len(high['boxes']) == 0                                     # nothing above 0.95 with ink



def test_decode_nms_removes_same_class_duplicates_and_keeps_other_classes():
    """Two peaks of one class two cells apart (so the 3x3 peak test keeps both) stand for windows
    that both hold the whole object: refined to the same box, the weaker is a duplicate that decode's
    per-class NMS removes. A peak of another class on it stays (per class); agnostic_nms removes it."""
    canvas = np.zeros((100, 100), np.uint8)
    canvas[30:40, 30:40] = 200                                         # inside the windows at cells 2 and 4 (+-4 px)
    g = detect.Geometry(stride=8, receptive_field=38, offset=-7, window=28)
    probs = torch.zeros(11, 10, 10)
    probs[10] = 1.0
    probs[:, 2, 2], probs[:, 2, 4], probs[:, 3, 2] = 0, 0, 0
    probs[4, 2, 2], probs[4, 2, 4], probs[7, 3, 2] = 0.9, 0.6, 0.5
    box = torch.tensor([[30., 30, 40, 40]])
    out = detect.decode(probs, canvas, g, num_objects=10, threshold=0.3, nms_iou=0.3, ink_threshold=32, margin=4)
    assert torch.equal(out['boxes'], box.repeat(2, 1))
    assert out['labels'].tolist() == [4, 7] and out['scores'].tolist() == pytest.approx([0.9, 0.5])
    kept = detect.decode(probs, canvas, g, num_objects=10, threshold=0.3, nms_iou=1.0, ink_threshold=32, margin=4)
    assert sorted(kept['scores'].tolist()) == pytest.approx([0.5, 0.6, 0.9])  # the duplicate was there to remove
    one = detect.agnostic_nms(out, 0.3)                                # one label per object: the higher score
    assert one['labels'].tolist() == [4] and torch.equal(one['boxes'], box)
    assert len(detect.agnostic_nms(out, 1.0)['boxes']) == 2


def test_a_raw_window_on_the_placed_square_is_a_hit_against_placement_truth_only():
    """The box ablation's last row: the network's own box (its 28x28 window) scored against where the
    image was placed; against the tight ink box of a small blob the same window misses."""
    img = torch.zeros(1, 1, 100, 100, dtype=torch.uint8)
    img[0, 0, 18:26, 26:34] = 200                                      # an 8x8 blob inside the square at (8, 16)
    cv = canvases.Canvases(img, [torch.tensor([[26., 18, 34, 26]])], [torch.tensor([5])],
                           [torch.tensor([[22., 30.]])], [torch.tensor([0])], [torch.tensor([[16., 8, 44, 36]])])
    probs = torch.zeros(11, 10, 10)
    probs[10] = 1.0
    probs[:, 1, 2], probs[5, 1, 2] = 0, 0.9                          # the window at (8, 16): the placed square
    g = detect.Geometry(stride=8, receptive_field=38, offset=-7, window=28)
    out = detect.decode(probs, img[0, 0].numpy(), g, 10, 0.5, 0.3, 32, 4, refine=False, drop_empty=False)
    assert out['boxes'].tolist() == [[16., 8, 44, 36]]
    assert detect_metrics.match([out], cv.targets('placement'))[1].tolist() == [True]
    assert detect_metrics.match([out], cv.targets())[1].tolist() == [False]    # IoU 64/784 with the ink box


def test_metric_wiring_on_known_cases():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], dtype=torch.float)
    target = [{'boxes': boxes, 'labels': torch.zeros(4, dtype=torch.long)}]
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    perfect = [{'boxes': boxes.clone(), 'scores': scores, 'labels': torch.zeros(4, dtype=torch.long)}]
    m = detect_metrics.coco_metrics(perfect, target)
    assert (m['map_50'], m['map'], m['mar_100']) == (1.0, 1.0, 1.0)
    assert detect_metrics.prf_at(*detect_metrics.match(perfect, target), 0.5) == {'precision': 1.0, 'recall': 1.0, 'f1': 1.0}

    off = [{**perfect[0], 'boxes': boxes.clone()}]
    off[0]['boxes'][3] += torch.tensor([100., 0, 100, 0])             # the lowest-scored box misses entirely
    m = detect_metrics.coco_metrics(off, target)
    # COCO AP: 101 recall points; precision 1 up to recall 0.75 (76 points), 0 after
    assert m['map_50'] == pytest.approx(76 / 101, abs=1e-6) and m['map'] == pytest.approx(76 / 101, abs=1e-6)
    assert m['mar_100'] == pytest.approx(0.75, abs=1e-6)
    assert detect_metrics.prf_at(*detect_metrics.match(off, target), 0.5) == pytest.approx(
        {'precision': 0.75, 'recall': 0.75, 'f1': 0.75})

    shifted = [{**perfect[0], 'boxes': boxes.clone()}]
    shifted[0]['boxes'][3] += torch.tensor([2., 0, 2, 0])             # IoU 80/120 = 0.667: a hit up to 0.65
    m = detect_metrics.coco_metrics(shifted, target)
    assert m['map_50'] == 1.0
    assert m['map'] == pytest.approx((4 * 1 + 6 * 76 / 101) / 10, abs=1e-6)   # 4 of 10 IoU thresholds pass


def test_threshold_choice_and_counts():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    tp = np.array([True, True, False, True, False])
    assert detect_metrics.best_threshold(scores, tp, n_gt=3) == 0.6            # P 3/4, R 1 -> F1 0.857, the best
    curve = detect_metrics.pr_curve(scores, tp, 3)
    assert curve['recall'].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1, 1])
    preds = [{'scores': torch.tensor([0.9, 0.4])}, {'scores': torch.tensor([0.8])}]
    targets = [{'boxes': torch.zeros(1, 4)}, {'boxes': torch.zeros(2, 4)}]
    assert detect_metrics.count_accuracy(preds, targets, 0.5) == 0.5


# ---------------------------------------------------------------------------------------------
# The script

TINY = ['--epochs', '1', '--max_steps', '2', '--finetune_epochs', '1', '--finetune_canvases', '12',
        '--test_canvases', '4', '--val_canvases', '3', '--widths', '[4,8,16]', '--wandb', 'off', '--device', 'cpu',
        '--figure_canvases', '2']


@pytest.fixture(scope='module')
def tiny_mnist(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp('ex22') / 'data'), n_train=200, n_test=60)


def test_smoke_run_writes_results_and_figures_and_stages_are_reused(tiny_mnist, tmp_path, capsys):
    runs, assets = str(tmp_path / 'runs'), str(tmp_path / 'assets')
    args = ['--data_dir', tiny_mnist, '--runs_dir', runs, '--assets', 'true', '--assets_dir', assets, *TINY]
    cli(ex22.main, ex22.config, [*args, '--run_name', 'first'])
    with open(os.path.join(runs, 'exercise_2_2', 'first', 'results.json')) as f:
        results = json.load(f)
    assert set(results['tracks']) == {'zero_shot', 'background'}
    for m in results['tracks'].values():
        assert {'map_50', 'map', 'mar_100', 'precision', 'recall', 'f1', 'count_acc', 'ms_per_canvas'} <= set(m)
        assert 0 <= m['map'] <= m['map_50'] <= 1 and m['threshold_from'].endswith('val-split canvases')
        assert m['surgery']['max_abs_diff_on_crops'] <= 1e-4 and m['geometry']['stride'] == 8
    for variants in results['box_ablation'].values():                          # every variant of each track
        assert set(variants) == set(ex22.ABLATION) and variants['raw_windows_vs_placement']['map'] <= 1
    assert results['box_ablation_means']['raw_windows_vs_placement']['truth'] == 'placement'
    assert results['canvases']['test'] == {'split': 'test', 'n': 4, 'seed': [0, 0],
                                           'objects': results['tracks']['zero_shot']['objects']}
    for name in ('detections', 'score_maps', 'pr_curve'):
        assert os.path.exists(os.path.join(runs, 'exercise_2_2', 'first', f'{name}.png'))
        assert os.path.exists(os.path.join(assets, f'ex22_{name}.png'))
    stages = sorted(os.listdir(os.path.join(runs, 'exercise_2_2')))
    assert [s.split('-')[0] for s in stages] == ['background', 'classifier', 'first']

    # a stage whose identity matches a finished run is reused: nothing is built or trained again
    from config import parse_args
    cfg = {**ex22.config, **parse_args(ex22.config, args)}
    identity = {k: cfg[k] for k in ex22.CLASSIFIER_KEYS}
    assert f'classifier-mnist-{ex22.digest(identity)}' in stages

    def never(*a):
        raise AssertionError('a finished stage was trained again')
    best, results = ex22.train_stage('classifier', cfg, identity, never, never)
    assert best.endswith('checkpoints/best.pt') and 'test_acc' in results
    assert 'classifier-mnist-' in (out := capsys.readouterr().out) and 'done, same settings' in out


def test_bad_input_is_one_line(tiny_mnist, tmp_path, capsys):
    skip = tmp_path / 'skip.pt'
    model = SkipMLP(784, [16, 16], 10)
    torch.save({'model': model.state_dict(), 'model_class': 'SkipMLP', 'model_args': model.args,
                'config': {**ex22.config, 'dataset': 'mnist'}}, skip)
    background = tmp_path / 'background.pt'                          # 2.2's own background classifier: 11 classes
    model = detect.with_background(CNN(1, 10, [4, 8, 16], depth=0, variant='plain'))
    torch.save({'model': model.state_dict(), 'model_class': 'CNN', 'model_args': model.args, 'exercise': EX,
                'config': {**ex22.config, 'dataset': 'mnist', 'data_dir': tiny_mnist}}, background)
    for argv, words in ((['--checkpoint', str(skip)], 'holds a SkipMLP'),
                        (['--checkpoint', str(background)], 'gives 11 scores on mnist'),
                        (['--canvas_size', '50'], 'cannot surely hold 6 images'),
                        (['--max_shift', '30'], '--max_shift must be in [0, 20]'),     # looped forever
                        (['--max_shift', '21'], '--max_shift must be in [0, 20]'),
                        (['--objects', '[6,3]'], '--objects must be [min, max]'),
                        (['--objects', '[3]'], '--objects must be [min, max]'),
                        (['--object_size', '[28,300]'], 'cannot surely hold'),
                        (['--canvas_size', '20', '--objects', '[1,1]', '--object_size', '[10,10]'],
                         '--canvas_size must be >= 28'),
                        (['--ink_threshold', '255'], '--ink_threshold must be in [0, 254]'),
                        (['--nms_iou', '0'], '--nms_iou must be in (0, 1]')):
        with pytest.raises(SystemExit) as e:
            cli(ex22.main, ex22.config, [*argv, '--data_dir', tiny_mnist, '--runs_dir', str(tmp_path / 'runs'),
                                         *TINY])
        err = capsys.readouterr().err
        assert e.value.code == 1 and words in err and err.count('\n') == 1 and 'Traceback' not in err, (argv, err)
    assert not os.path.exists(tmp_path / 'runs')                      # refused before anything was written


def test_detection_run_name_is_checked_before_any_stage_trains(tiny_mnist, tmp_path, capsys, monkeypatch):
    taken = tmp_path / 'runs' / EX / 'taken'
    taken.mkdir(parents=True)
    (taken / 'results.json').write_text('{}')
    monkeypatch.setattr(ex22, 'train_stage', lambda *a, **k: pytest.fail('a stage trained before the name check'))
    with pytest.raises(SystemExit) as e:
        cli(ex22.main, ex22.config, ['--data_dir', tiny_mnist, '--runs_dir', str(tmp_path / 'runs'), '--run_name',
                                     'taken', *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'taken' in err and err.count('\n') == 1 and 'Traceback' not in err
    assert os.listdir(tmp_path / 'runs' / EX) == ['taken']


def test_central_rule_keeps_a_neighbour_out_and_drops_a_window_on_part_of_an_object():
    """refine_central: a small neighbour lying wholly inside the grown window is not merged into the box,
    and a window that holds no object wholly is no detection (the old rule clipped it to the window)."""
    canvas = np.zeros((100, 100), np.uint8)
    canvas[10:30, 12:24] = 200                                       # the object: ink box x 12..24, y 10..30
    canvas[12:28, 30:33] = 200                                       # a thin neighbour 6 px right of it
    canvas[50:95, 60:64] = 200                                       # a tall stroke no window holds wholly
    windows = np.array([[6, 4], [64, 56]])
    boxes, keep = detect.refine_boxes(windows, 28, canvas, 32, 4)
    assert boxes[0].tolist() == [12, 10, 33, 30] and keep.tolist() == [True, True]   # merged; clipped piece
    boxes, keep = detect.refine_boxes(windows, 28, canvas, 32, 4, central=True)
    assert boxes[0].tolist() == [12, 10, 24, 30] and keep.tolist() == [True, False]


def test_agnostic_overlap_removes_a_piece_inside_a_better_box_and_keeps_neighbours():
    pred = {'boxes': torch.tensor([[10., 10, 30, 30], [12, 12, 20, 20], [32, 10, 50, 30]]),
            'scores': torch.tensor([0.9, 0.8, 0.7]), 'labels': torch.tensor([1, 2, 3])}
    assert len(detect.agnostic_nms(pred, 0.3)['boxes']) == 3       # IoU 0.16: NMS keeps the piece
    out = detect.agnostic_nms(pred, 1.0, overlap=0.5)              # it lies wholly inside the 0.9 box
    assert out['labels'].tolist() == [1, 3]
    assert len(detect.agnostic_nms(pred, 1.0, overlap=1.0)['boxes']) == 3


def test_peak_window_1_keeps_two_same_class_neighbours_that_3x3_peaks_merge():
    canvas = np.zeros((100, 100), np.uint8)
    canvas[20:40, 18:22] = 200                                       # two thin '1's, 8 px apart
    canvas[20:40, 30:34] = 200
    g = detect.Geometry(stride=8, receptive_field=38, offset=-7, window=28)
    probs = torch.zeros(11, 10, 10)
    probs[10] = 1.0
    probs[:, 2, 1], probs[:, 2, 2] = 0, 0
    probs[1, 2, 1], probs[1, 2, 2] = 0.9, 0.8                        # each '1' in its own window, one cell apart
    args = dict(num_objects=10, threshold=0.5, nms_iou=0.3, ink_threshold=32, margin=4, central=True)
    assert len(detect.decode(probs, canvas, g, peak=3, **args)['boxes']) == 1
    both = detect.decode(probs, canvas, g, peak=1, **args)
    assert sorted(both['boxes'][:, 0].tolist()) == [18, 30] and both['labels'].tolist() == [1, 1]


def test_the_recorded_pr_curve_is_thinned_to_200_points_with_both_ends():
    n = 5000
    curve = {'threshold': np.linspace(1, 0, n), 'precision': np.linspace(1, 0.5, n), 'recall': np.linspace(0, 1, n)}
    small = detect_metrics.thin(curve)
    assert len(small['threshold']) == 200 and small['recall'][0] == 0 and small['recall'][-1] == 1
    assert detect_metrics.thin({k: v[:3] for k, v in curve.items()})['threshold'] == curve['threshold'][:3].tolist()
    assert detect_metrics.thin({k: v[:0] for k, v in curve.items()}) == {'threshold': [], 'precision': [], 'recall': []}
