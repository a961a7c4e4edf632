"""Class activation maps (CAM, Grad-CAM, Grad-CAM++) and faithfulness metrics.

All three methods weight the feature maps A (B, K, h, w) of a target layer by one
scalar per channel and sum over channels:

    CAM        (Zhou et al. 2016)         w_k = fc.weight[c, k]        needs GAP + Linear head
    Grad-CAM   (Selvaraju et al. 2017)    w_k = mean_ij dy^c/dA^k_ij   any differentiable head
    Grad-CAM++ (Chattopadhay et al. 2018) w_k = sum_ij relu(g) * a_ij   closed form of Eq. 19

y^c is the pre-softmax logit. With normalize=True a map is post-processed exactly as
pytorch-grad-cam does it, so the two agree to float precision:
    ReLU -> per-image min-max (x - min) / (max - min + 1e-7)
         -> bilinear upsampling to the input size (align_corners=False, same as cv2.resize)
         -> min-max again.

Faithfulness metrics ask "does the model actually rely on the highlighted pixels?":
    deletion / insertion AUC            (Petsiuk et al. 2018, RISE)
    Average Drop / Increase in Confidence (Chattopadhay et al. 2018, Grad-CAM++)
What a "removed" pixel becomes is one choice, the substrate (substrate_fns): 'black' (pixel
value 0, for black-background sets like MNIST) or 'rise' (the dataset-mean colour, i.e. 0 in
normalised space, and a Gaussian blur as the insertion start, as RISE's code does). Every
number gets a paired bootstrap interval over images (bootstrap_ci, compare).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import matplotlib
import numpy as np
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


def bootstrap_ci(values: Tensor, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval [lo, hi] of the mean of per-image values (N,): images drawn with
    replacement `resamples` times. Given paired differences (ours - theirs, image by image) it is the
    paired bootstrap: both sides are resampled together, so what images share cancels."""
    v = values.detach().double().cpu().flatten()
    idx = torch.randint(len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed))
    means = v[idx].mean(1)                                               # (resamples,)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double))
    return [lo.item(), hi.item()]


def compare(ours: Tensor, theirs: Tensor, better: str, seed: int = 0) -> dict:
    """Paired comparison of per-image values (N,) of one metric ('lower' or 'higher' is better):
    the mean difference ours - theirs, its 95% paired bootstrap interval, and the verdict:
    'better' / 'worse' only when the interval excludes 0 (at 95% confidence), else 'tie'."""
    d = ours.double() - theirs.double()
    lo, hi = bootstrap_ci(d, seed=seed)
    good, bad = (hi < 0, lo > 0) if better == 'lower' else (lo > 0, hi < 0)
    return {'diff': d.mean().item(), 'ci95': [lo, hi], 'verdict': 'better' if good else 'worse' if bad else 'tie'}


def faithfulness(model: nn.Module, images: Tensor, maps: Tensor, class_idx: ClassIdx,
                 mean: Tensor | None = None, std: Tensor | None = None, **kw) -> dict:
    """All four scalar metrics as plain floats (JSON-ready); kw go to deletion_insertion_auc, and its
    substrate_fn (what deleted pixels become) is Average Drop's masking substrate too."""
    di = deletion_insertion_auc(model, images, maps, class_idx, **kw)
    ad = average_drop_increase(model, images, maps, class_idx, mean=mean, std=std,
                               substrate_fn=kw.get('substrate_fn'))
    return {'deletion_auc': di['deletion_auc'], 'insertion_auc': di['insertion_auc'], **ad}


# ----------------------------------------------------------------------------- figures

def overlay(image: Tensor | np.ndarray, heatmap: Tensor | np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured map (H, W) in [0, 1] over an image -> (H, W, 3) float array in [0, 1].

    image: (3, H, W) or (H, W, 3), uint8 in [0, 255] or float in [0, 1] (un-normalise first).
    """
    img = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image)
    img = img.astype(np.float32) / 255 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)                                     # (3, H, W) -> (H, W, 3)
    hm = np.asarray(heatmap.detach().cpu() if isinstance(heatmap, Tensor) else heatmap)
    heat = matplotlib.colormaps['jet'](np.clip(hm, 0, 1))[..., :3]     # (H, W, 3), drop alpha
    return np.clip((1 - alpha) * img + alpha * heat, 0, 1)
