"""Class activation maps (CAM, Grad-CAM, Grad-CAM++) and how faithful they are.

Owns the maps (one scalar weight per channel of a target layer's feature maps, post-processed
as pytorch-grad-cam does), the faithfulness metrics (RISE deletion / insertion AUC, Grad-CAM++'s
Average Drop / Increase in Confidence), the substrate a removed pixel becomes, the random, constant
and object-prior baselines, bootstrap intervals and paired verdicts (with p-values), and
`faithfulness`, the one table of them that exercise 2.3 prints and records. Why each choice:
docs/exercise_2_3.md.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

ClassIdx = int | Tensor | None


# ----------------------------------------------------------------------------- helpers

@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Explain the deployed model (BatchNorm running stats, no dropout), then restore the mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _class_indices(class_idx: ClassIdx, logits: Tensor) -> Tensor:
    """None -> predicted class, int -> same class for all, (B,) -> per image. Returns (B,) long."""
    if class_idx is None:
        return logits.argmax(1)
    return torch.as_tensor(class_idx, device=logits.device).long().expand(logits.shape[0])


def _forward_with_features(model: nn.Module, images: Tensor,
                           target_layer: nn.Module) -> tuple[Tensor, Tensor]:
    """Run the model once; return (logits (B, n), A (B, K, h, w)), A being a leaf that requires grad."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        # We only ever need d(score)/dA, so A becomes a fresh leaf: backprop stops here
        # (no work in earlier layers) and it works even if all parameters are frozen.
        store['A'] = output.detach().requires_grad_(True)
        # The rest of the network gets a *clone*: an nn.ReLU(inplace=True) right after the
        # target layer would otherwise overwrite A (and in-place ops on a leaf are an error).
        return store['A'].clone()

    handle = target_layer.register_forward_hook(hook)
    try:
        logits = model(images)
    finally:  # never leave a hook behind, even if the forward raises
        handle.remove()
    if 'A' not in store:
        raise RuntimeError('target_layer was not called during the forward pass')
    return logits, store['A']


def _activations_and_grads(model: nn.Module, images: Tensor, target_layer: nn.Module,
                           class_idx: ClassIdx) -> tuple[Tensor, Tensor]:
    """Return A and dy^c/dA, both (B, K, h, w)."""
    with _eval_mode(model), torch.enable_grad():  # enable_grad: works inside a caller's no_grad
        logits, A = _forward_with_features(model, images, target_layer)
        c = _class_indices(class_idx, logits)
        # In eval mode the images of a batch do not interact, so the gradient of the *sum* of
        # scores w.r.t. A[b] is the gradient of image b's own score.
        score = logits.gather(1, c[:, None]).sum()
        # autograd.grad returns the gradient instead of accumulating it into any .grad.
        (grads,) = torch.autograd.grad(score, A)
    return A.detach(), grads


def _minmax(x: Tensor) -> Tensor:
    """Per-image min-max scaling of (B, h, w) to [0, 1]; the 1e-7 keeps flat maps finite."""
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo + 1e-7)


def _finish(raw: Tensor, size: tuple[int, int], normalize: bool) -> Tensor:
    """Raw (B, h, w) map -> normalised (B, H, W) map in [0, 1] (the pytorch-grad-cam order)."""
    if not normalize:
        return raw
    m = _minmax(raw.relu())
    m = F.interpolate(m[:, None], size=size, mode='bilinear', align_corners=False)[:, 0]  # (B, H, W)
    return _minmax(m)


# ----------------------------------------------------------------------------- maps

def predict(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (B, n) and predicted classes (B,) in eval mode."""
    with _eval_mode(model), torch.no_grad():
        probs = model(images).softmax(1)
    return probs, probs.argmax(1)


def cam(model: nn.Module, images: Tensor, target_layer: nn.Module, fc: nn.Linear,
        class_idx: ClassIdx = None, normalize: bool = True) -> Tensor:
    """CAM: sum_k fc.weight[c, k] * A^k. Valid only when A -> global average pool -> fc.

    Returns (B, H, W) in [0, 1] if normalize else the raw map (B, h, w) (no ReLU, no bias).
    """
    with _eval_mode(model), torch.no_grad():  # no gradients needed: weights are read off fc
        logits, A = _forward_with_features(model, images, target_layer)
        w = fc.weight[_class_indices(class_idx, logits)]   # (B, K)
        raw = torch.einsum('bk,bkhw->bhw', w, A)            # (B, h, w)
    return _finish(raw, images.shape[-2:], normalize)


def grad_cam(model: nn.Module, images: Tensor, target_layer: nn.Module,
             class_idx: ClassIdx = None, normalize: bool = True) -> Tensor:
    """Grad-CAM: ReLU(sum_k alpha_k A^k), alpha_k = spatial mean of dy^c/dA^k.

    For a GAP + Linear head alpha_k = fc.weight[c, k] / (h*w), so Grad-CAM = ReLU(CAM) / (h*w).
    """
    A, g = _activations_and_grads(model, images, target_layer, class_idx)  # (B, K, h, w) each
    alpha = g.mean(dim=(2, 3), keepdim=True)                               # (B, K, 1, 1)
    raw = (alpha * A).sum(1).relu()                                        # (B, h, w)
    return _finish(raw, images.shape[-2:], normalize)


def grad_cam_pp(model: nn.Module, images: Tensor, target_layer: nn.Module,
                class_idx: ClassIdx = None, normalize: bool = True) -> Tensor:
    """Grad-CAM++: ReLU(sum_k w_k A^k), w_k = sum_ij relu(g_ij) * a_ij (closed form, Eq. 19).

    The paper's closed form assumes an exponential score, which turns the 2nd and 3rd
    derivatives into g^2 and g^3; like pytorch-grad-cam's GradCAMPlusPlus we plug in the
    gradient g of the logit.
    """
    A, g = _activations_and_grads(model, images, target_layer, class_idx)  # (B, K, h, w) each
    g2, g3 = g ** 2, g ** 3
    sum_A = A.sum(dim=(2, 3), keepdim=True)                                # (B, K, 1, 1)
    a = g2 / (2 * g2 + sum_A * g3 + 1e-6)                                  # alpha_ij^kc
    a = torch.where(g != 0, a, torch.zeros_like(a))                        # as the reference
    w = (g.relu() * a).sum(dim=(2, 3), keepdim=True)                       # (B, K, 1, 1)
    raw = (w * A).sum(1).relu()                                            # (B, h, w)
    return _finish(raw, images.shape[-2:], normalize)


def random_maps(shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Baseline: i.i.d. uniform [0, 1) maps of the given (B, H, W) shape, NOT smoothed."""
    return torch.rand(shape, generator=generator)


# ----------------------------------------------------------------------------- faithfulness

def _class_probs(model: nn.Module, images: Tensor, c: Tensor) -> Tensor:
    """Softmax probability of class c[b] for every image (B,). Caller sets eval + no_grad."""
    return model(images).softmax(1).gather(1, c[:, None])[:, 0]


def blur_sigma(width: int) -> float:
    """RISE's blur (sigma 5 px at 224 px, 2.2% of the width) scaled to an image `width` px wide:
    a fixed 5 px would wipe out 16-18% of a 28-32 px image, far more than RISE removed."""
    return 5.0 * width / 224


def blur(images: Tensor, sigma: float | None = None) -> Tensor:
    """Insertion start of the 'rise' substrate: a Gaussian blur, sigma = blur_sigma(W) unless given;
    kernel 2*ceil(2 sigma) + 1 (+-2 sigma, at least 3 px), odd as gaussian_blur wants."""
    sigma = blur_sigma(images.shape[-1]) if sigma is None else sigma
    k = max(3, 2 * math.ceil(2 * sigma) + 1)
    return gaussian_blur(images, kernel_size=[k, k], sigma=[sigma, sigma])


SUBSTRATES = {  # what a removed pixel becomes; the same in deletion, Average Drop and Increase in Confidence
    'black': 'removed pixels become black (pixel value 0) in deletion, Average Drop and Increase in Confidence; '
             'insertion starts from an all-black image',
    'rise': 'removed pixels become the dataset-mean colour (0 in normalised space, RISE\'s deletion) in deletion, '
            'Average Drop and Increase in Confidence; insertion starts from a Gaussian blur of the image (RISE), '
            'sigma = 5 px * width / 224',
}


def substrate_fns(name: str, mean: Tensor, std: Tensor) -> tuple[Callable[[Tensor], Tensor],
                                                               Callable[[Tensor], Tensor]]:
    """(removed, insertion_start) for normalised images (B, C, H, W): `removed(x)` is what deleted or
    masked pixels become, `insertion_start(x)` the image insertion starts from. mean, std per channel."""
    if name == 'black':
        shift = (-torch.as_tensor(mean) / torch.as_tensor(std)).view(1, -1, 1, 1)  # pixel 0, normalised

        def black(x: Tensor) -> Tensor:
            return shift.to(x).expand_as(x)
        return black, black
    if name == 'rise':
        return torch.zeros_like, blur
    raise ValueError(f"unknown substrate {name!r}; choose one of {sorted(SUBSTRATES)}")


def _saliency_order(maps: Tensor, tie_break: Tensor | None) -> Tensor:
    """Pixel indices (B, H*W), most salient first. Equal saliency is ordered by tie_break (B, H, W),
    descending: with the i.i.d. random map there, a flat map (or a map's flat zero region) is
    ranked exactly as the random baseline ranks it, never by raster order."""
    flat = maps.reshape(len(maps), -1)
    if tie_break is None:
        return flat.argsort(dim=1, descending=True)
    pre = tie_break.to(maps.device).reshape(len(maps), -1).argsort(dim=1, descending=True)
    inner = flat.gather(1, pre).argsort(dim=1, descending=True, stable=True)
    return pre.gather(1, inner)


def deletion_insertion_auc(model: nn.Module, images: Tensor, maps: Tensor, class_idx: ClassIdx,
                           steps: int = 32, substrate_fn: Callable[[Tensor], Tensor] | None = None,
                           batch_size: int = 256, insertion_fn: Callable[[Tensor], Tensor] | None = None,
                           tie_break: Tensor | None = None) -> dict:
    """RISE deletion / insertion curves and their areas (mean over images).

    Pixels are ranked by saliency (maps (B, H, W)); at step i the top floor(i*H*W/steps)
    pixels are swapped: deletion replaces them in the image by the substrate, insertion
    puts them from the image into the substrate. The curve is the softmax probability of
    class_idx against the fraction i/steps in [0, 1]; AUC is its trapezoidal area.
    Lower deletion AUC and higher insertion AUC mean a more faithful map.

    substrate_fn(images) -> (B, C, H, W): what deleted pixels become, and the insertion start
    too unless insertion_fn is given. Default (None): zeros for deletion (the dataset mean,
    since images are mean/std-normalised) and blur (sigma scaled to the width) for insertion.
    tie_break (B, H, W): orders pixels of equal saliency (see _saliency_order).
    batch_size bounds memory: about that many perturbed images (at least B) per forward pass.
    Besides the means, 'deletion_aucs' / 'insertion_aucs' (B,) hold every image's own AUC.
    """
    B, C, H, W = images.shape
    maps = maps.to(images.device)  # everything below lives where the images are
    # rank[b, p] = position of pixel p in image b's saliency order (0 = most salient)
    order = _saliency_order(maps, tie_break)
    positions = torch.arange(H * W, device=order.device).expand(B, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions).view(B, 1, H, W)
    n_swapped = torch.arange(steps + 1, device=order.device) * (H * W) // steps  # per step
    chunk = max(1, batch_size // B)                               # steps per forward pass

    curves = {}
    with _eval_mode(model), torch.no_grad():
        c = _class_indices(class_idx, model(images))
        substrates = {'deletion': (substrate_fn or torch.zeros_like)(images),
                      'insertion': (insertion_fn or substrate_fn or blur)(images)}
        for kind, substrate in substrates.items():
            # the curve morphs `start` into `end`, most salient pixels first
            start, end = (images, substrate) if kind == 'deletion' else (substrate, images)
            probs = []
            for n in n_swapped.split(chunk):
                mask = (rank[None] < n[:, None, None, None, None]).float()   # (S, B, 1, H, W)
                x = start * (1 - mask) + end * mask                          # (S, B, C, H, W)
                probs.append(_class_probs(model, x.flatten(0, 1), c.repeat(len(n))).view(len(n), B))
            curves[kind] = torch.cat(probs).T                                # (B, steps+1)

    x_axis = torch.linspace(0, 1, steps + 1, device=order.device)
    aucs = {kind: torch.trapezoid(curve, x_axis) for kind, curve in curves.items()}  # (B,) each
    return {'deletion_auc': aucs['deletion'].mean().item(), 'insertion_auc': aucs['insertion'].mean().item(),
            'deletion_aucs': aucs['deletion'], 'insertion_aucs': aucs['insertion'],
            'deletion_curve': curves['deletion'].mean(0),
            'insertion_curve': curves['insertion'].mean(0)}


def average_drop_increase(model: nn.Module, images: Tensor, maps: Tensor, class_idx: ClassIdx,
                          mean: Tensor | None = None, std: Tensor | None = None,
                          substrate_fn: Callable[[Tensor], Tensor] | None = None, per_image: bool = False) -> dict:
    """Average Drop % and Increase in Confidence % (Grad-CAM++ paper, Sec. 5.1).

    Y = p(c | image), O = p(c | image * map), maps (B, H, W) in [0, 1].
    Average Drop = 100 * mean(max(0, Y - O) / Y) (lower is better);
    Increase in Confidence = 100 * mean(O > Y) (higher is better).

    If mean and std (per channel) are given, the masking happens in [0, 1] pixel space,
    i.e. masked pixels turn black rather than dataset-mean grey. Written in normalised
    space, (x*std + mean) * m re-normalised is x*m + (m - 1)*mean/std, which is exactly x
    when m = 1. Without them the product is taken in normalised space (masked -> mean).
    substrate_fn(images), if given, is what a fully masked pixel becomes instead:
    masked = s + m * (x - s), the same "removed" as deletion's (see substrate_fns).
    per_image: also 'average_drops' and 'increases' (B,), each image's own term.
    """
    m = maps[:, None]                                                    # (B, 1, H, W)
    masked = images * m
    if substrate_fn is not None:
        s = substrate_fn(images)
        masked = s + m * (images - s)
    elif mean is not None and std is not None:
        shift = (torch.as_tensor(mean) / torch.as_tensor(std)).to(images).view(1, -1, 1, 1)
        masked = masked + (m - 1) * shift
    with _eval_mode(model), torch.no_grad():
        c = _class_indices(class_idx, model(images))
        Y = _class_probs(model, images, c)
        O = _class_probs(model, masked, c)
    drops, increases = 100 * (Y - O).clamp(min=0) / Y, 100 * (O > Y).float()  # (B,) each
    out = {'average_drop': drops.mean().item(), 'increase_in_confidence': increases.mean().item()}
    return out | ({'average_drops': drops, 'increases': increases} if per_image else {})


def _bootstrap_means(values: Tensor, resamples: int, seed: int) -> Tensor:
    """Means (resamples,) of per-image values (N,) drawn with replacement, seeded."""
    v = values.detach().double().cpu().flatten()
    idx = torch.randint(len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed))
    return v[idx].mean(1)


def _percentiles(means: Tensor, level: float) -> list[float]:
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double))
    return [lo.item(), hi.item()]


def bootstrap_ci(values: Tensor, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval [lo, hi] of the mean of per-image values (N,): images drawn with
    replacement `resamples` times. Given paired differences (ours - theirs, image by image) it is the
    paired bootstrap: both sides are resampled together, so what images share cancels."""
    return _percentiles(_bootstrap_means(values, resamples, seed), level)


def compare(ours: Tensor, theirs: Tensor, better: str, seed: int = 0, resamples: int = 2000,
            with_p: bool = False) -> dict:
    """Paired comparison of per-image values (N,) of one metric ('lower' or 'higher' is better):
    the mean difference ours - theirs, its 95% paired bootstrap interval, the verdict ('better' /
    'worse' only when the interval excludes 0, else 'tie') and, with_p, 'p': the two-sided bootstrap
    p-value 2 * min(share of resampled means <= 0, share >= 0), +1-smoothed and capped at 1 (a map
    compared with itself has p = 1)."""
    d = ours.double() - theirs.double()
    means = _bootstrap_means(d, resamples, seed)  # the same resamples as bootstrap_ci(d, resamples, seed)
    lo, hi = _percentiles(means, 0.95)
    tail = min((means <= 0).sum().item(), (means >= 0).sum().item())
    good, bad = (hi < 0, lo > 0) if better == 'lower' else (lo > 0, hi < 0)
    out = {'diff': d.mean().item(), 'ci95': [lo, hi], 'verdict': 'better' if good else 'worse' if bad else 'tie'}
    return out | ({'p': min(1.0, 2 * (tail + 1) / (resamples + 1))} if with_p else {})


# ----------------------------------------------------------------------------- the faithfulness table

METHODS = ('cam', 'grad_cam', 'grad_cam_pp')
BASELINES = ('random', 'random_smooth', 'constant', 'object_prior')
BETTER = {'deletion_auc': 'lower', 'insertion_auc': 'higher',  # how each metric rewards a faithful map
          'average_drop': 'lower', 'increase_in_confidence': 'higher'}
DEL_INS, AD_IC = ('deletion_auc', 'insertion_auc'), ('average_drop', 'increase_in_confidence')
SHUFFLED = (*METHODS, 'constant')  # maps whose Average Drop / Increase is also scored with their pixels shuffled


def explain_all(model: nn.Module, x: Tensor, layer: nn.Module, fc: nn.Linear, batch: int,
                class_idx: Tensor | None = None) -> dict[str, Tensor]:
    """{method: maps (B, H, W) in [0, 1]} for normalised images x (B, C, H, W), of the predicted
    class or, given class_idx (B,), of those classes."""
    classes = [None] * len(x.split(batch)) if class_idx is None else class_idx.split(batch)
    fns = {'cam': lambda xb, c: cam(model, xb, layer, fc, c), 'grad_cam': lambda xb, c: grad_cam(model, xb, layer, c),
           'grad_cam_pp': lambda xb, c: grad_cam_pp(model, xb, layer, c)}
    return {m: torch.cat([fns[m](xb, c) for xb, c in zip(x.split(batch), classes)]) for m in METHODS}


def predict_all(model: nn.Module, x: Tensor, normalize: Callable[[Tensor], Tensor], batch: int) -> Tensor:
    """Softmax probabilities (N, n) of images x (N, C, H, W), normalised and predicted in batches."""
    return torch.cat([predict(model, normalize(xb))[0] for xb in x.split(batch)])


def map_size(model: nn.Module, x: Tensor, layer: nn.Module, fc: nn.Linear) -> tuple[int, int]:
    """The target layer's (h, w) for images like x: how many cells a map has before upsampling."""
    return tuple(cam(model, x[:1], layer, fc, normalize=False).shape[-2:])


def smooth_random_maps(shape: tuple[int, int, int], size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Random maps with the methods' spatial statistics: uniform noise at the target layer's
    resolution (B, h, w), upsampled bilinearly to (H, W) and min-max scaled, as the maps are."""
    m = F.interpolate(random_maps(shape, generator)[:, None], size=size, mode='bilinear',
                      align_corners=False)[:, 0]  # (B, H, W)
    return _minmax(m)


def object_prior(images: Tensor, mean: Tensor, std: Tensor, hw: tuple[int, int]) -> Tensor:
    """Baseline from the image alone, no model: its pixel intensity in [0, 1] (un-normalised, mean over
    channels: ink on a black background) average-pooled to the maps' (h, w) cells, then ReLU, min-max,
    bilinear upsampling and min-max as `_finish` does the methods' maps. images normalised (B, C, H, W)."""
    std, mean = (torch.as_tensor(v).to(images).view(1, -1, 1, 1) for v in (std, mean))  # per channel
    pixels = images * std + mean                                         # (B, C, H, W) in [0, 1]
    raw = F.adaptive_avg_pool2d(pixels.mean(1, keepdim=True), hw)[:, 0]  # (B, h, w)
    return _finish(raw, images.shape[-2:], normalize=True)


def baseline_maps(cam_maps: Tensor, hw: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    """The three baselines for a batch whose CAMs are cam_maps (B, H, W): i.i.d. random pixels,
    random at the target layer's (h, w) upsampled like the maps, and the image's mean CAM value."""
    b, size = len(cam_maps), tuple(cam_maps.shape[1:])
    return {'random': random_maps((b, *size), generator=generator).to(cam_maps.device),
            'random_smooth': smooth_random_maps((b, *hw), size, generator).to(cam_maps.device),
            'constant': cam_maps.mean((1, 2), keepdim=True).expand_as(cam_maps)}


def map_scores(model: nn.Module, x: Tensor, maps: Tensor, removed: Callable, start: Callable, steps: int,
               tie_break: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each image's four metrics (B,) for the predicted class, and the batch's summed curves."""
    di = deletion_insertion_auc(model, x, maps, None, steps=steps, substrate_fn=removed, insertion_fn=start,
                                tie_break=tie_break)
    ad = average_drop_increase(model, x, maps, None, substrate_fn=removed, per_image=True)
    per_image = {'deletion_auc': di['deletion_aucs'], 'insertion_auc': di['insertion_aucs'],
                 'average_drop': ad['average_drops'], 'increase_in_confidence': ad['increases']}
    curves = {kind: di[f'{kind}_curve'] * len(x) for kind in ('deletion', 'insertion')}
    return per_image, curves


def _verdicts(values: dict, shuffled: dict, seed: int) -> dict[str, dict]:
    """{map: {'vs': {baseline: {metric: compare(...)}}, 'beats_<baseline>': {metric: bool}}} for
    the methods (against all three baselines) and the constant map (against random only)."""
    out = {}
    for m in SHUFFLED:
        refs = {'random': {**{k: values['random'][k] for k in DEL_INS}, **shuffled[m]},
                'random_smooth': values['random_smooth'], 'constant': values['constant']}
        if m == 'constant':
            refs = {'random': refs['random']}
        vs = {b: {k: compare(values[m][k], ref[k], BETTER[k], seed) for k in BETTER} for b, ref in refs.items()}
        out[m] = {'vs': vs, **{f'beats_{b}': {k: r['verdict'] == 'better' for k, r in res.items()}
                               for b, res in vs.items()}}
    return out


def _start_checks(kept: Tensor, p_start: Tensor, classes: int) -> dict:
    """Is insertion's start image (the substrate) near chance? kept (N,): it keeps the prediction."""
    agree = kept.float().mean().item()
    return {'agreement_with_prediction': agree, 'mean_p_predicted': p_start.mean().item(),
            'chance': 1 / classes, 'near_chance': agree < 2 / classes,
            'rule': 'near chance = the start image gets the prediction of the full image for '
                    'fewer than 2 / classes of the images'}


def faithfulness(model: nn.Module, images: Tensor, layer: nn.Module, fc: nn.Linear, mean: Tensor, std: Tensor,
                 substrate: str, *, steps: int = 32, batch_size: int = 64, seed: int = 0) -> dict:
    """The faithfulness table of every method and baseline on normalised images (N, C, H, W), for
    the predicted class, `substrate` (SUBSTRATES) being what a removed pixel becomes in all four
    metrics: {'table': {map: {metric: mean, 'ci95': {metric: [lo, hi]}, ...}}, 'curves': {map:
    {'deletion' | 'insertion': mean curve}}, 'checks': {...}, 'per_image': {map: {metric: [N values]}}}
    (per_image: for paired comparisons across maps, sanity.method_comparisons). Baselines: BASELINES.

    Every number has a 95% bootstrap interval over images; each method (and the constant map) is
    compared with the baselines image by image ('vs'), and `beats_<baseline>` is True only when it
    is better at 95% confidence. 'random' tests location: its pixel order on deletion / insertion
    (and it breaks ties in every map's order), the map's own pixels shuffled on Average Drop /
    Increase, which also reward contrast. So a constant map ties 'random' by construction.
    """
    removed, start = substrate_fns(substrate, mean, std)
    generator = torch.Generator().manual_seed(seed)  # the random baselines' maps
    names = (*METHODS, *BASELINES)
    hw = map_size(model, images, layer, fc)
    per_batch: dict = {m: [] for m in names}
    shuffled_batches: dict = {m: [] for m in SHUFFLED}
    curves: dict = {m: {'deletion': 0.0, 'insertion': 0.0} for m in names}
    cam_vs_grad_cam, start_kept, start_p = 0.0, [], []
    for xb in images.split(batch_size):
        maps = explain_all(model, xb, layer, fc, batch_size)
        cam_vs_grad_cam = max(cam_vs_grad_cam, (maps['cam'] - maps['grad_cam']).abs().max().item())
        maps |= baseline_maps(maps['cam'], hw, generator) | {'object_prior': object_prior(xb, mean, std, hw)}
        perm = maps['random'].flatten(1).argsort(1)  # (B, H*W): one random shuffle of the pixels per image
        for m in names:
            scores, summed = map_scores(model, xb, maps[m], removed, start, steps, tie_break=maps['random'])
            per_batch[m].append({k: v.cpu() for k, v in scores.items()})
            curves[m] = {kind: curves[m][kind] + summed[kind].cpu() for kind in summed}
            if m in SHUFFLED:
                mixed = maps[m].flatten(1).gather(1, perm).view_as(maps[m])
                ad = average_drop_increase(model, xb, mixed, None, substrate_fn=removed, per_image=True)
                shuffled_batches[m].append({'average_drop': ad['average_drops'].cpu(),
                                            'increase_in_confidence': ad['increases'].cpu()})
        _, pred = predict(model, xb)
        start_probs, start_pred = predict(model, start(xb))
        start_kept.append((start_pred == pred).cpu())
        start_p.append(start_probs.gather(1, pred[:, None])[:, 0].cpu())
    values = {m: {k: torch.cat([b[k] for b in rows]) for k in rows[0]} for m, rows in per_batch.items()}
    shuffled = {m: {k: torch.cat([b[k] for b in rows]) for k in AD_IC} for m, rows in shuffled_batches.items()}
    table = {m: {**{k: v.mean().item() for k, v in values[m].items()},
                 'ci95': {k: bootstrap_ci(v, seed=seed) for k, v in values[m].items()}} for m in names}
    for m, verdicts in _verdicts(values, shuffled, seed).items():
        table[m] |= {**verdicts, 'shuffled': {k: v.mean().item() for k, v in shuffled[m].items()}}
    checks = {'cam_vs_grad_cam_max_abs_diff': cam_vs_grad_cam,
              'insertion_start': _start_checks(torch.cat(start_kept), torch.cat(start_p), fc.out_features)}
    n = len(images)
    return {'table': table, 'checks': checks,
            'per_image': {m: {k: v.tolist() for k, v in vs.items()} for m, vs in values.items()},  # paired tests
            'curves': {m: {kind: [float(f'{v:.4g}') for v in (c / n).tolist()] for kind, c in cs.items()}  # 4 digits:
                       for m, cs in curves.items()}}                                                # records stay small


def describe(images: int, steps: int, size: tuple[int, int], hw: tuple[int, int], substrate: str,
             sensitivity_substrate: str | None, checks: dict, seed: int) -> dict:
    """How `faithfulness` measured a table of `images` images of `size` (H, W) px whose maps have
    hw cells, in words and numbers: recorded beside the table."""
    h, w = size
    return {'images': images, 'explained_class': 'predicted', 'steps': steps, 'pixels_per_step': h * w / steps,
            'map_size': list(hw), 'input_size': [h, w],
            'substrate': substrate, 'substrate_means': SUBSTRATES[substrate],
            'sensitivity_substrate': sensitivity_substrate,
            'blur_sigma_px': blur_sigma(w), 'blur_rule': 'sigma = 5 px * width / 224 (RISE: 5 px at 224 px)',
            'average_drop_masking': 'substrate + map * (image - substrate): a fully masked pixel is removed as in '
                                    'deletion',
            'random_baseline': f"i.i.d. uniform per-pixel maps (explain.random_maps), seed {seed}; "
                               "its pixel order also breaks ties in every map's order",
            'random_smooth_baseline': 'uniform noise at the target layer resolution, bilinearly upsampled and '
                                      'min-max scaled like the maps, same generator',
            'constant_baseline': "every pixel at the image's mean CAM value: no location, CAM's contrast",
            'object_prior_baseline': 'the image alone, no model (explain.object_prior): pixel intensity, mean over '
                                     "channels, average-pooled to the maps' cells and upsampled like the maps",
            'beats_random': 'better at 95% confidence (paired bootstrap over images, 2000 resamples) than random '
                            'location: the random pixel order on deletion / insertion, the same map with its pixels '
                            'shuffled on Average Drop / Increase in Confidence; ties are ties',
            'intervals': '95% percentile bootstrap over images, 2000 resamples',
            'cam_equals_grad_cam': 'on a GAP + linear head Grad-CAM = ReLU(CAM) / (h*w): the same map after min-max, '
                                   'one result shown twice', **checks,
            'metric_directions': BETTER}
