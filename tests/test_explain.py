"""Tests for explain.py: CAM identities, agreement with pytorch-grad-cam, localisation on a
synthetic task, hook hygiene and faithfulness metrics. CPU only, no network."""
import json

import pytest
import torch
import torchvision
from torch import nn

import explain as E

METHODS = ['cam', 'grad_cam', 'grad_cam_pp']


def tiny_gap_cnn(n_classes: int = 3, inplace: bool = False) -> nn.Sequential:
    """conv -> ReLU -> maxpool -> conv -> ReLU -> conv -> ReLU [target = index 6] -> GAP -> fc [9]."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_classes))


def explain_with(method: str, model: nn.Module, x: torch.Tensor, layer: nn.Module, fc: nn.Linear, **kw):
    if method == 'cam':
        return E.cam(model, x, layer, fc, **kw)
    return getattr(E, method)(model, x, layer, **kw)


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        for d in ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks'):
            assert len(getattr(m, d, {})) == 0, f"{d} left on module '{name}'"


# ----------------------------------------------------------------------------- 1. identity

def test_grad_cam_equals_relu_cam_over_area_for_gap_linear_head():
    torch.manual_seed(0)
    model, x = tiny_gap_cnn(n_classes=5), torch.randn(4, 3, 16, 16)
    layer, fc = model[5], model[9]            # conv output: A may be negative, so ReLU matters
    model[6] = nn.Identity()                  # A -> GAP -> fc directly, as the identity requires
    for c in [0, 2, 4, torch.tensor([1, 3, 0, 4])]:
        raw_cam = E.cam(model, x, layer, fc, class_idx=c, normalize=False)           # (B, h, w)
        raw_gc = E.grad_cam(model, x, layer, class_idx=c, normalize=False)
        assert raw_cam.shape == raw_gc.shape == (4, 8, 8)
        assert (raw_cam < 0).any() and raw_gc.abs().max() > 0                        # non-trivial
        torch.testing.assert_close(raw_gc, raw_cam.relu() / (8 * 8), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 2. reference

@pytest.mark.parametrize('ours, theirs', [('grad_cam', 'GradCAM'), ('grad_cam_pp', 'GradCAMPlusPlus')])
def test_matches_pytorch_grad_cam_on_resnet18(ours, theirs):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 96, 96)                                 # layer4 maps are 3x3
    for classes in ([3, 7], None):
        with getattr(pytorch_grad_cam, theirs)(model, [model.layer4]) as ref_cam:
            targets = None if classes is None else [ClassifierOutputTarget(c) for c in classes]
            ref = torch.from_numpy(ref_cam(x, targets))             # (B, H, W), cv2 bilinear resize
        idx = None if classes is None else torch.tensor(classes)
        got = getattr(E, ours)(model, x, model.layer4, class_idx=idx)
        assert got.shape == ref.shape == (2, 96, 96)
        assert ref.max() > 0.99                                     # non-degenerate reference
        assert (got - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- trained model

N_CLASSES, SIZE, PATCH = 3, 32, 6


def make_patterns_data(n: int, g: torch.Generator, patterns: torch.Tensor, with_background: bool):
    """Noise images; class k < N_CLASSES has patterns[k] pasted at a random spot.

    Label N_CLASSES is 'no pattern': without it one class could be recognised by the *absence*
    of the others' patterns, and its CAM would then legitimately highlight the background.
    """
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, N_CLASSES + with_background, (n,), generator=g)
    pos = torch.randint(0, SIZE - PATCH + 1, (n, 2), generator=g)           # top-left (row, col)
    for i, (r, c) in enumerate(pos.tolist()):
        if y[i] < N_CLASSES:
            x[i, :, r:r + PATCH, c:c + PATCH] = patterns[y[i]]
    return x, y, pos


@pytest.fixture(scope='module')
def trained():
    """A tiny GAP CNN trained for a few seconds; returns (model, layer, fc, x_test, y_test, pos)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    patterns = 3 * (2 * torch.randint(0, 2, (N_CLASSES, 3, PATCH, PATCH), generator=g).float() - 1)
    x, y, _ = make_patterns_data(2000, g, patterns, with_background=True)
    x_test, y_test, pos = make_patterns_data(150, g, patterns, with_background=False)
    model = tiny_gap_cnn(N_CLASSES + 1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, model[6], model[9], x_test, y_test, pos


def hit_rate(maps: torch.Tensor, pos: torch.Tensor) -> float:
    """Fraction of maps whose argmax pixel lies inside the pasted pattern's box."""
    flat = maps.flatten(1).argmax(1)
    r, c = flat // SIZE, flat % SIZE
    inside = ((r >= pos[:, 0]) & (r < pos[:, 0] + PATCH) & (c >= pos[:, 1]) & (c < pos[:, 1] + PATCH))
    return inside.float().mean().item()


# ----------------------------------------------------------------------------- 3. localisation

def test_maps_localise_the_class_pattern(trained):
    model, layer, fc, x, y, pos = trained
    rates = {m: hit_rate(explain_with(m, model, x, layer, fc, class_idx=y), pos) for m in METHODS}
    rates['random'] = hit_rate(E.random_maps((len(x), SIZE, SIZE), torch.Generator().manual_seed(0)), pos)
    print('hit rates:', rates)
    assert all(rates[m] >= 0.9 for m in METHODS), rates
    assert rates['random'] < 0.3, rates               # chance ~ box area / image area = 3.5%


# ----------------------------------------------------------------------------- 4. hooks & state

class RaisesAfterTarget(nn.Module):
    def __init__(self):
        super().__init__()
        self.features, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        self.features(x)
        raise ValueError('boom')


@pytest.mark.parametrize('method', METHODS)
def test_no_side_effects(method):
    torch.manual_seed(0)
    model, x = tiny_gap_cnn(), torch.randn(2, 3, 16, 16)
    model.train()
    maps = explain_with(method, model, x, model[6], model[9])
    assert maps.shape == (2, 16, 16) and maps.min() >= 0 and maps.max() <= 1
    assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())     # autograd.grad, not .backward()
    assert all(m.training for m in model.modules())            # training mode restored

    model.eval()                                               # ... and eval stays eval
    explain_with(method, model, x, model[6], model[9])
    assert not any(m.training for m in model.modules())

    with torch.no_grad():                                      # works in a caller's no_grad
        torch.testing.assert_close(explain_with(method, model, x, model[6], model[9]), maps)


@pytest.mark.parametrize('method', METHODS)
def test_hooks_removed_when_forward_raises(method):
    torch.manual_seed(0)
    model = RaisesAfterTarget().train()
    with pytest.raises(ValueError, match='boom'):
        explain_with(method, model, torch.randn(1, 3, 8, 8), model.features, model.fc)
    assert_no_hooks(model)
    assert model.training


@pytest.mark.parametrize('method', METHODS)
def test_inplace_relu_after_target_layer(method):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    plain, inplace = tiny_gap_cnn(), tiny_gap_cnn(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    # target = the conv, whose output an in-place ReLU would overwrite if it were not cloned
    for c in [None, 1]:
        want = explain_with(method, plain, x, plain[5], plain[9], class_idx=c, normalize=False)
        got = explain_with(method, inplace, x, inplace[5], inplace[9], class_idx=c, normalize=False)
        assert (want < 0).any() if method == 'cam' else want.max() > 0
        torch.testing.assert_close(got, want)
    assert_no_hooks(inplace)


# ----------------------------------------------------------------------------- 5. class_idx

@pytest.mark.parametrize('method', METHODS)
def test_default_class_is_prediction(method, trained):
    model, layer, fc, x, _, _ = trained
    x = x[:8]
    probs, pred = E.predict(model, x)
    assert probs.shape == (8, 4) and torch.equal(pred, model(x).argmax(1))
    assert len(pred.unique()) > 1                               # per-image classes really differ
    run = lambda c: explain_with(method, model, x, layer, fc, class_idx=c, normalize=False)
    torch.testing.assert_close(run(None), run(pred))
    torch.testing.assert_close(run(2), run(torch.full((8,), 2)))
    assert not torch.allclose(run(pred), run((pred + 1) % 4))   # the class does matter


# ----------------------------------------------------------------------------- 6. faithfulness

def test_deletion_insertion_beats_random(trained):
    model, layer, _, x, y, _ = trained
    x, y, steps = x[:100], y[:100], 16
    gc = E.grad_cam(model, x, layer, class_idx=y)
    rnd = E.random_maps(gc.shape, torch.Generator().manual_seed(0))
    ours = E.deletion_insertion_auc(model, x, gc, y, steps=steps)
    base = E.deletion_insertion_auc(model, x, rnd, y, steps=steps)
    print('grad-cam:', {k: v for k, v in ours.items() if 'auc' in k},
          'random:', {k: v for k, v in base.items() if 'auc' in k})
    assert ours['deletion_auc'] < base['deletion_auc'] - 0.05
    assert ours['insertion_auc'] > base['insertion_auc'] + 0.05

    # curve end points: original image, zeros (deletion) and blurred image (insertion)
    prob = lambda imgs: E.predict(model, imgs)[0].gather(1, y[:, None]).mean()
    for r in (ours, base):
        assert r['deletion_curve'].shape == r['insertion_curve'].shape == (steps + 1,)
        torch.testing.assert_close(r['deletion_curve'][0], prob(x))
        torch.testing.assert_close(r['insertion_curve'][-1], prob(x))
        torch.testing.assert_close(r['deletion_curve'][-1], prob(torch.zeros_like(x)))
        torch.testing.assert_close(r['insertion_curve'][0], prob(E.blur(x)))


def test_deletion_insertion_by_hand():
    # logit_0 = sum of the 4 pixels, logit_1 = 0, so p(class 0) = sigmoid(sum of pixels)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]]))
    x = torch.tensor([2.0, -1.0, 0.5, 1.0]).view(1, 1, 1, 4)
    saliency = torch.tensor([0.1, 0.9, 0.5, 0.3]).view(1, 1, 4)   # order: pixel 1, 2, 3, 0
    r = E.deletion_insertion_auc(model, x, saliency, 0, steps=4, substrate_fn=torch.zeros_like)
    deletion = torch.sigmoid(torch.tensor([2.5, 3.5, 3.0, 2.0, 0.0]))   # remaining-pixel sums
    insertion = torch.sigmoid(torch.tensor([0.0, -1.0, -0.5, 0.5, 2.5]))  # inserted-pixel sums
    torch.testing.assert_close(r['deletion_curve'], deletion)
    torch.testing.assert_close(r['insertion_curve'], insertion)
    trapezoid = lambda v: 0.25 * (v[0] / 2 + v[1:-1].sum() + v[-1] / 2)
    assert r['deletion_auc'] == pytest.approx(trapezoid(deletion).item(), abs=1e-6)
    assert r['insertion_auc'] == pytest.approx(trapezoid(insertion).item(), abs=1e-6)


def test_average_drop_increase(trained):
    model, layer, fc, x, y, _ = trained
    gc = E.grad_cam(model, x[:64], layer, class_idx=y[:64])
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    for kw in ({}, {'mean': mean, 'std': std}):
        r = E.average_drop_increase(model, x[:64], gc, y[:64], **kw)
        assert 0 <= r['average_drop'] <= 100 and 0 <= r['increase_in_confidence'] <= 100
        ones = E.average_drop_increase(model, x[:64], torch.ones_like(gc), y[:64], **kw)
        assert ones == {'average_drop': 0.0, 'increase_in_confidence': 0.0}

    f = E.faithfulness(model, x[:32], layer, fc, mean, std, 'black', steps=8)  # every map's four metrics
    for row in f['table'].values():
        assert {'deletion_auc', 'insertion_auc', 'average_drop', 'increase_in_confidence'} <= set(row)
        assert all(isinstance(row[k], float) for k in E.BETTER)
    json.dumps(f)                                               # plain floats only


def test_average_drop_by_hand():
    # p(class 0) = sigmoid(x_0 + x_1); the map keeps pixel 1 and blanks pixel 0
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    ln3 = torch.log(torch.tensor(3.0)).item()
    x = torch.tensor([[ln3, 0.0], [-ln3, 0.0]]).view(2, 1, 1, 2)   # Y = 3/4 and 1/4
    maps = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(2, 1, 2)    # O = 1/2 for both
    r = E.average_drop_increase(model, x, maps, 0)
    # drops: (3/4 - 1/2) / (3/4) = 1/3 and 0 (O > Y) -> mean 1/6; one of two increases
    assert r['average_drop'] == pytest.approx(100 / 6, abs=1e-4)
    assert r['increase_in_confidence'] == pytest.approx(50.0)
    # with mean/std the blanked pixel becomes black in pixel space: x_0 -> -mean/std = -1
    r = E.average_drop_increase(model, x, maps, 0, mean=torch.tensor([0.5]), std=torch.tensor([0.5]))
    Y, O = torch.sigmoid(torch.tensor([ln3, -ln3])), torch.sigmoid(torch.tensor([-1.0, -1.0]))
    assert r['average_drop'] == pytest.approx(100 * ((Y - O).clamp(min=0) / Y).mean().item(), abs=1e-4)
    assert r['increase_in_confidence'] == pytest.approx(50.0)  # sigmoid(-1) = 0.27 > 1/4


def test_overlay():
    from explain_display import overlay  # a figure helper: it moved to explain_display
    torch.manual_seed(0)
    img, heat = torch.rand(3, 8, 10), torch.rand(8, 10)
    a = overlay(img, heat)
    b = overlay((img.permute(1, 2, 0).numpy() * 255).round().astype('uint8'), heat.numpy())
    assert a.shape == b.shape == (8, 10, 3) and 0 <= a.min() and a.max() <= 1
    assert abs(a - b).max() < 0.01
    hot = overlay(torch.zeros(3, 1, 1), torch.ones(1, 1))     # jet(1) is dark red
    assert hot[0, 0, 0] > 0.2 and hot[0, 0, 2] < 0.05
