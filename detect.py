"""Exercise 2.2's detector: a trained classifier turned into one by network surgery, and scored.

  fully_convolutionalize(model, input_shape)  the classifier as a conv net with the same weights
  decode(...)                                 score maps -> peaks -> ink-refined boxes -> per-class NMS
  Decoding, LIMITS                            the decoding keys (Decoding.from_config) and their limits
  score(...)                                  threshold -> decode -> NMS -> match -> metrics (COCO, P/R/F1, count;
                                              the metrics and the error census are detect_metrics')

The canvases it is scored on are canvases.py's; its figures are detect_display.py's. Boxes are xyxy
floats with exclusive ends, as in canvases.py.
Why the surgery is exact (MLP) or nearly so (CNN): docs/exercise_2_2.md.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import models
from canvases import Canvases, ink_box
from config import UserError
from detect_metrics import best_threshold, coco_metrics, count_accuracy, match, pr_curve, prf_at

# ---------------------------------------------------------------------------------------------
# Network surgery


@dataclass(frozen=True)
class Geometry:
    """Where an output position of a fully convolutional net looks in its input (one axis; square).
    Output (i, j) sees input rows [offset + stride*i, offset + stride*i + receptive_field) (and the
    same for columns), and stands for the `window` x `window` crop at (stride*i, stride*j)."""
    stride: int            # input px per output step
    receptive_field: int   # input px one output position depends on (may exceed window: padding)
    offset: int            # first input px of output 0's receptive field (< 0: it reaches into padding)
    window: int            # the classifier's input size (px)

    def windows(self, i: Tensor, j: Tensor) -> Tensor:
        """Top-left (y, x) of the crops that output positions (i, j) stand for: (D, 2)."""
        return torch.stack([i, j], 1) * self.stride


def _conv_like(m: nn.Module) -> tuple[int, int, int, int] | None:
    """(kernel, stride, padding, dilation) of a square conv / pooling layer, else None."""
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
        k, s, p = pair(m.kernel_size), pair(m.stride), pair(m.padding)
        d = pair(getattr(m, 'dilation', 1))
        if len({k[0], k[1]}) != 1 or s[0] != s[1] or p[0] != p[1] or d[0] != d[1] or isinstance(m.padding, str):
            raise UserError(f"{m} is not square: receptive field geometry needs square kernels")
        return k[0], s[0], p[0], d[0]
    return None


POINTWISE = (nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Identity)


def trace_geometry(module: nn.Module, stride: int = 1, rf: int = 1, offset: int = 0) -> tuple[int, int, int]:
    """(stride, receptive_field, offset) after `module`, from its layers (the usual recursion):
    a layer with kernel k, stride s, padding p, dilation d seen at input step `stride` grows the
    receptive field by (d(k-1)) * stride, moves its start by -p * stride and multiplies the step by s.
    A residual block (torchvision BasicBlock, identity shortcut) has its conv path's geometry."""
    from torchvision.models.resnet import BasicBlock
    geo = _conv_like(module)
    if geo is not None:
        k, s, p, d = geo
        return stride * s, rf + d * (k - 1) * stride, offset - p * stride
    if isinstance(module, POINTWISE):
        return stride, rf, offset
    if isinstance(module, BasicBlock):
        if module.downsample is not None:
            raise UserError("a BasicBlock with a downsample shortcut is not supported by the geometry trace")
        children = [module.conv1, module.conv2]
    elif isinstance(module, nn.Sequential):
        children = list(module)
    else:
        raise UserError(f"cannot trace the receptive field through {type(module).__name__}")
    for child in children:
        stride, rf, offset = trace_geometry(child, stride, rf, offset)
    return stride, rf, offset


class FullyConvolutional(nn.Sequential):
    """A classifier after surgery: (B, C, H, W) -> logits (B, num_classes, H', W'), with .geometry."""

    def __init__(self, layers: list[nn.Module], geometry: Geometry, num_classes: int, source: str):
        super().__init__(*layers)
        self.geometry, self.num_classes, self.source = geometry, num_classes, source


def _linear_as_conv(linear: nn.Linear, in_channels: int, kernel: tuple[int, int]) -> nn.Conv2d:
    """A Conv2d computing `linear` on each (in_channels, *kernel) patch, flattened as nn.Flatten does
    (C, H, W order): the same weights, reshaped, not retrained."""
    conv = nn.Conv2d(in_channels, linear.out_features, kernel, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.view(linear.out_features, in_channels, *kernel))  # (out, C, kh, kw)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def fully_convolutionalize(model: nn.Module, input_shape: tuple[int, int, int]) -> FullyConvolutional:
    """The classifier `model` (trained on (C, H, W) = input_shape images, H == W) as a fully
    convolutional net with the same weights: on an input_shape image it gives model(x) as (B, n, 1, 1);
    on a canvas, output (i, j) is the classifier on the crop at (stride*i, stride*j), exactly for
    models.MLP (its Linears become convs) and up to the crop's border padding for models.CNN (GAP +
    Linear becomes a 1x1 conv and a stride-1 average over one crop's cells): docs/exercise_2_2.md
    says why. Any other model (e.g. SkipMLP) is a UserError."""
    c, h, w = input_shape
    if h != w:
        raise UserError(f"surgery needs square classifier inputs, got {h}x{w}")
    model = copy.deepcopy(model).cpu().eval()
    name = type(model).__name__
    if type(model) is models.CNN:
        if model.args['in_channels'] != c:
            raise UserError(f"the CNN takes {model.args['in_channels']}-channel images, the canvases have {c}")
        features = model.features
        with torch.no_grad():
            fh, fw = features(torch.zeros(1, *input_shape)).shape[-2:]  # final maps of one crop, e.g. 3x3
        fc = model.classifier
        layers = [features, _linear_as_conv(fc, fc.in_features, (1, 1)), nn.AvgPool2d((fh, fw), stride=1)]
        n = fc.out_features
    elif type(model) is models.MLP:
        if model.args['in_features'] != c * h * w:
            raise UserError(f"the MLP takes {model.args['in_features']} inputs, not a flattened {c}x{h}x{w} image")
        layers, channels = [], c
        kernel = (h, w)
        for m in list(model.features) + [model.classifier]:
            if isinstance(m, nn.Flatten):
                continue
            if isinstance(m, nn.Linear):
                layers.append(_linear_as_conv(m, channels, kernel))
                channels, kernel = m.out_features, (1, 1)
            elif isinstance(m, nn.ReLU):
                layers.append(nn.ReLU())
            elif not isinstance(m, nn.Dropout):  # Dropout is the identity at inference
                raise UserError(f"cannot convert layer {type(m).__name__} of the MLP")
        n = model.classifier.out_features
    else:
        raise UserError(f"a {name} cannot be fully convolutionalized: only models.CNN (conv features, "
                        f"GAP + Linear head) and models.MLP (Linear layers over the flattened image) can")
    net = nn.Sequential(*layers)
    stride, rf, offset = trace_geometry(net)
    fcn = FullyConvolutional(layers, Geometry(stride, rf, offset, h), n, name).eval()
    with torch.no_grad():
        out = fcn(torch.zeros(1, *input_shape))
    if out.shape[-2:] != (1, 1):  # the geometry's promise: one crop, one output position
        raise UserError(f"the converted {name} gives a {tuple(out.shape[-2:])} map on one {h}x{w} crop, not 1x1")
    return fcn


def context_margin(g: Geometry) -> int:
    """px of canvas on each side of a window that its output position sees (receptive field beyond the
    window, the larger side, rounded up to whole strides so the cells stay aligned): 8 for the depth-0 CNN."""
    beyond = max(-g.offset, g.offset + g.receptive_field - g.window, 0)
    return g.stride * -(-beyond // g.stride)


def in_context(model: nn.Module, g: Geometry) -> nn.Module:
    """The CNN `model` set to classify the window at the centre of a (window + 2 context_margin) px input,
    seeing its surroundings as its fully convolutional form on a canvas does (models.CNN window_cells)."""
    if type(model) is not models.CNN:
        raise UserError(f"only a models.CNN can be fine-tuned in context, not a {type(model).__name__}")
    with torch.no_grad():
        cells = model.features(torch.zeros(1, model.args['in_channels'], g.window, g.window)).shape[-1]
    model.window_cells = [context_margin(g) // g.stride, cells]
    model.args = {**model.args, 'window_cells': model.window_cells}
    return model


def with_background(model: nn.Module) -> nn.Module:
    """The same classifier with one more output (the background class, last), its old rows kept."""
    old = model.classifier
    new = nn.Linear(old.in_features, old.out_features + 1)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[:-1].copy_(old.weight)
        new.bias[:-1].copy_(old.bias)
    model.classifier = new
    model.args = {**model.args, 'num_classes': old.out_features + 1}
    return model


# ---------------------------------------------------------------------------------------------
# Score maps -> detections


@torch.no_grad()
def score_maps(fcn: FullyConvolutional, x: Tensor) -> Tensor:
    """Softmax class probabilities at every output position: normalised (B, C, H, W) -> (B, n, H', W')."""
    return fcn(x).softmax(1)


def ink_components(canvas: np.ndarray, ink_threshold: int) -> np.ndarray:
    """Boxes (K, 4) as (y0, x0, y1, x1), exclusive ends, of the 8-connected ink components of a 2-D canvas."""
    from scipy import ndimage
    labels, k = ndimage.label(canvas > ink_threshold, structure=np.ones((3, 3), bool))
    if not k:
        return np.zeros((0, 4), np.int64)
    return np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in ndimage.find_objects(labels)])


def refine_boxes(windows: np.ndarray, window: int, canvas: np.ndarray, ink_threshold: int,
                 margin: int, refine: bool = True, drop_empty: bool = True,
                 central: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (D, 4) xyxy for detection windows with top-left (y, x) (D, 2), and a keep mask (D,).

    A box is the union of the ink components lying wholly inside the window grown by `margin` px
    (an object up to `margin` px off the window's grid position is still whole inside); if none
    is, the ink box of the window itself; a window with no ink is dropped. central=True (2.2's default
    since its MNIST census): of those components, the ones that reach into the window's central half
    (a neighbour wholly inside the grown window is not merged in, unless nothing reaches the centre),
    and a window with no whole component is dropped rather than clipped (an off-centre window on
    part of an object).
    Both heuristics can be switched off, to measure what they add to the network's own output
    (the box ablation): refine=False gives the raw window (clipped to the canvas) as the box,
    drop_empty=False keeps windows with no ink (with their raw window as the box)."""
    if not refine or not drop_empty:
        size = np.array(canvas.shape[:2])
        raw = np.concatenate([np.clip(windows, 0, size), np.clip(windows + window, 0, size)], 1)[:, [1, 0, 3, 2]]
        if not refine:
            keep = np.array([(canvas[t:b, l:r] > ink_threshold).any() for l, t, r, b in raw], bool)
            return raw, keep | (not drop_empty)
        boxes, keep = refine_boxes(windows, window, canvas, ink_threshold, margin, central=central)
        return np.where(keep[:, None], boxes, raw), np.ones(len(windows), bool)
    comps = ink_components(canvas, ink_threshold)                    # (K, 4) y0 x0 y1 x1
    lo = windows - margin                                            # (D, 2)
    hi = windows + window + margin
    inside = ((comps[None, :, 0] >= lo[:, None, 0]) & (comps[None, :, 1] >= lo[:, None, 1]) &
              (comps[None, :, 2] <= hi[:, None, 0]) & (comps[None, :, 3] <= hi[:, None, 1]))  # (D, K)
    if central:
        c0, c1 = windows + window // 4, windows + window - window // 4           # the central half
        core = inside & ((comps[None, :, 0] < c1[:, None, 0]) & (comps[None, :, 2] > c0[:, None, 0]) &
                         (comps[None, :, 1] < c1[:, None, 1]) & (comps[None, :, 3] > c0[:, None, 1]))
        inside = np.where(core.any(1, keepdims=True), core, inside)
    big = np.iinfo(np.int64).max
    y0 = np.where(inside, comps[None, :, 0], big).min(1, initial=big)
    x0 = np.where(inside, comps[None, :, 1], big).min(1, initial=big)
    y1 = np.where(inside, comps[None, :, 2], -1).max(1, initial=-1)
    x1 = np.where(inside, comps[None, :, 3], -1).max(1, initial=-1)
    boxes = np.stack([x0, y0, x1, y1], 1)
    keep = inside.any(1)
    for d in np.flatnonzero(~keep) if not central else []:           # no whole component: clip to the window
        t, l = np.maximum(windows[d], 0)
        b = ink_box(canvas[t:windows[d, 0] + window, l:windows[d, 1] + window], ink_threshold)
        if b is not None:
            boxes[d] = (l + b[1], t + b[0], l + b[3], t + b[2])
            keep[d] = True
    return boxes, keep


def decode(probs: Tensor, canvas: np.ndarray, geometry: Geometry, num_objects: int, threshold: float,
           nms_iou: float, ink_threshold: int, margin: int, refine: bool = True,
           drop_empty: bool = True, peak: int = 3, central: bool = False) -> dict[str, Tensor]:
    """Detections of one canvas from its score maps (n, H', W'): per class (the first num_objects
    maps; an 11th background map only competes through the softmax), the local maxima (peak x peak
    positions; 1: every position) with score >= threshold; each maps back to its crop (geometry), is refined to the ink in it
    (refine_boxes; refine / drop_empty switch its heuristics off), and per-class NMS (torchvision
    batched_nms, IoU > nms_iou) removes duplicates.
    Returns {'boxes' (D, 4) xyxy, 'scores' (D,), 'labels' (D,)}, highest score first."""
    from torchvision.ops import batched_nms
    s = probs[:num_objects]                                                      # (K, H', W')
    top = (s == F.max_pool2d(s[None], peak, stride=1, padding=peak // 2)[0]) & (s >= threshold)
    c, i, j = top.nonzero(as_tuple=True)
    scores = s[c, i, j]
    windows = geometry.windows(i, j).numpy()                                     # (D, 2) y, x
    boxes, keep = refine_boxes(windows, geometry.window, canvas, ink_threshold, margin, refine, drop_empty, central)
    boxes = torch.from_numpy(boxes[keep]).float()
    scores, labels = scores[torch.from_numpy(keep)], c[torch.from_numpy(keep)]
    order = batched_nms(boxes, scores, labels, nms_iou)                          # sorted by score
    return {'boxes': boxes[order], 'scores': scores[order], 'labels': labels[order]}


@dataclass(frozen=True)
class Decoding:
    """How score maps become the detector's output (2.2's decoding keys); refine and drop_empty are
    the box ablation's switches (refine_boxes)."""
    num_objects: int        # maps that are object classes; a background map only competes through the softmax
    min_score: float        # lowest peak kept for the ranked list behind mAP and the PR curve
    nms_iou: float          # per-class NMS
    agnostic_iou: float     # then class-agnostic NMS for the output (1 = off)
    ink_threshold: int      # uint8 level above which a pixel is ink
    margin: int             # px: ink components this far outside a window still count as its own
    refine: bool = True     # box = the ink in the window (else the raw window)
    drop_empty: bool = True  # a window without ink is no detection
    peak: int = 3           # a detection is a local maximum over peak x peak positions of its class map
    central: bool = False   # refine_boxes' central rule
    overlap: float = 1.0    # agnostic_nms: a box covered more than this by a better one goes (1 = off)

    @classmethod
    def from_config(cls, config: dict, num_objects: int, refine: bool = True, drop_empty: bool = True) -> Decoding:
        """2.2's decoding keys (min_score, nms_iou, agnostic_iou, ink_threshold, refine_margin, peak_window,
        refine_central, agnostic_overlap) as a Decoding."""
        return cls(num_objects, config['min_score'], config['nms_iou'], config['agnostic_iou'],
                   config['ink_threshold'], config['refine_margin'], refine, drop_empty, config['peak_window'],
                   config['refine_central'], config['agnostic_overlap'])


# (key, test, what the value must be): the decoding keys, for config.check before any work
LIMITS = [
    ('score_threshold', lambda v: v <= 1, '<= 1 (< 0: chosen on the val canvases)'),
    ('min_score', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('nms_iou', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('agnostic_iou', lambda v: 0 < v <= 1, 'in (0, 1] (1 = off)'),
    ('agnostic_overlap', lambda v: 0 < v <= 1, 'in (0, 1] (1 = off)'),
    ('refine_margin', lambda v: v >= 0, '>= 0'),
    ('peak_window', lambda v: v >= 1 and v % 2 == 1, 'an odd whole number >= 1 (1: every position; NMS alone merges)'),
]


def detect(fcn: FullyConvolutional, canvases: Canvases, mean: Tensor, std: Tensor, decoding: Decoding,
           threshold: float, batch_size: int = 64) -> tuple[list[dict[str, Tensor]], Tensor]:
    """decode's detections (score >= threshold) for every canvas (batched forward), and the score
    maps of the first canvas."""
    out, first = [], None
    d = decoding
    for start in range(0, len(canvases), batch_size):
        imgs = canvases.images[start:start + batch_size]
        probs = score_maps(fcn, (imgs.float() / 255 - mean) / std)
        first = probs[0] if first is None else first
        for k in range(len(imgs)):
            out.append(decode(probs[k], imgs[k, 0].numpy(), fcn.geometry, d.num_objects, threshold, d.nms_iou,
                              d.ink_threshold, d.margin, d.refine, d.drop_empty, d.peak, d.central))
    return out, first


def agnostic_nms(pred: dict[str, Tensor], iou: float, overlap: float = 1.0) -> dict[str, Tensor]:
    """One label per object: class-agnostic NMS over one canvas's detections (objects never overlap,
    so two boxes with IoU > iou are one object), then, greedily by score, a box whose intersection
    with a kept better one exceeds `overlap` of the smaller box's area goes (a piece of an object
    inside its whole box has a low IoU with it). 1 switches either off. Like NMS before it, this
    commutes with a later score threshold, so one pass serves every threshold."""
    if not len(pred['boxes']):
        return pred
    if iou < 1:
        from torchvision.ops import nms
        keep = nms(pred['boxes'], pred['scores'], iou)
        pred = {k: v[keep] for k, v in pred.items()}
    if overlap < 1 and len(pred['boxes']) > 1:
        b = pred['boxes']
        order = torch.argsort(pred['scores'], descending=True, stable=True)
        inter = (torch.minimum(b[:, None, 2:], b[None, :, 2:]) - torch.maximum(b[:, None, :2], b[None, :, :2]))
        area = (b[:, 2:] - b[:, :2]).prod(1)
        covered = inter.clamp(min=0).prod(2) / torch.minimum(area[:, None], area[None, :]).clamp(min=1e-9)
        kept: list[int] = []
        for d in order.tolist():
            if not kept or covered[d, kept].max() <= overlap:
                kept.append(d)
        pred = {k: v[torch.tensor(kept)] for k, v in pred.items()}
    return pred


@torch.no_grad()
def time_per_canvas(fcn: FullyConvolutional, canvases: Canvases, mean: Tensor, std: Tensor, decoding: Decoding,
                    threshold: float, threads: int = 1) -> float:
    """Median ms to detect on one canvas (uint8 in, boxes out: normalise, forward, decode, agnostic NMS), batch 1,
    with `threads` torch threads, after 5 warm-up canvases. The median resists other jobs' bursts."""
    d = decoding
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for k in range(-5, len(canvases)):
            img = canvases.images[max(k, 0)]
            t0 = time.perf_counter()
            probs = score_maps(fcn, (img[None].float() / 255 - mean) / std)[0]
            agnostic_nms(decode(probs, img[0].numpy(), fcn.geometry, d.num_objects, threshold, d.nms_iou,
                                d.ink_threshold, d.margin, d.refine, d.drop_empty, d.peak, d.central),
                         d.agnostic_iou, d.overlap)
            if k >= 0:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 1000 * float(np.median(times))


# ---------------------------------------------------------------------------------------------
# Scoring: what the tracks and the box ablation report


@dataclass
class Score:
    """What `score` measured on the test canvases."""
    metrics: dict[str, float | str]   # map_50 map mar_100 coco_backend precision recall f1 count_acc
    threshold: float                  # the output's score threshold
    output: list[dict[str, Tensor]]   # per canvas, after agnostic NMS; scores >= min(min_score, threshold)
    first_maps: Tensor                # (n, H', W') score maps of test canvas 0
    curve: dict[str, np.ndarray]      # pr_curve of the output
    detections: int                   # output boxes at or above the threshold
    objects: int                      # ground-truth boxes


def score(fcn: FullyConvolutional, val: Canvases, test: Canvases, mean: Tensor, std: Tensor, decoding: Decoding,
          threshold: float | None = None, truth: str = 'ink') -> Score:
    """threshold -> decode -> NMS -> match -> metrics. The threshold is given, or (None) the best-F1
    one of the output on the val canvases; the test canvases never select anything. COCO mAP ranks
    every per-class detection >= min_score; P / R / F1 and count accuracy are the output's, at the
    threshold. `truth`: the ground-truth boxes (Canvases.targets): 'ink' or 'placement'."""
    if threshold is None:
        val_preds, _ = detect(fcn, val, mean, std, decoding, decoding.min_score)
        val_output = [agnostic_nms(p, decoding.agnostic_iou, decoding.overlap) for p in val_preds]
        threshold = best_threshold(*match(val_output, val.targets(truth)))
    preds, first_maps = detect(fcn, test, mean, std, decoding, min(decoding.min_score, threshold))
    targets = test.targets(truth)
    output = [agnostic_nms(p, decoding.agnostic_iou, decoding.overlap) for p in preds]
    scores, tp, n_gt = match(output, targets)
    metrics = {**coco_metrics(preds, targets), **prf_at(scores, tp, n_gt, threshold),
               'count_acc': count_accuracy(output, targets, threshold)}
    return Score(metrics, threshold, output, first_maps, pr_curve(scores, tp, n_gt),
                 int((scores >= threshold).sum()), n_gt)


def surgery_check(model: nn.Module, fcn: FullyConvolutional, x: Tensor, canvas_size: int) -> dict:
    """How exactly the surgery reproduces the classifier, on normalised images x (B, 1, w, w): on the
    images themselves, and with each image alone on a black canvas at a stride-aligned place. A model
    fine-tuned in context (in_context) is given each window with its margin, as it was trained."""
    g = fcn.geometry
    model = model.cpu().eval()
    m = g.stride * model.window_cells[0] if getattr(model, 'window_cells', None) else 0  # in context: the margin
    black = x.amin().item()                                     # normalised black (MNIST-style data)
    with torch.no_grad():
        framed = F.pad(x, (m, m, m, m), value=black)
        logits = model(framed)
        alone = (fcn(framed)[:, :, m // g.stride, m // g.stride] - logits).abs().max().item()
        i = (canvas_size - g.window) // 2 // g.stride             # a central output position
        canvas = torch.full((len(x), x.shape[1], canvas_size, canvas_size), black)
        at = slice(g.stride * i, g.stride * i + g.window)
        canvas[:, :, at, at] = x
        placed = fcn(canvas)[:, :, i, i]
        seen = slice(g.stride * i - m, g.stride * i + g.window + m)  # the window and its margin
        crop_logits = model(canvas[:, :, seen, seen])
    return {'max_abs_diff_on_crops': alone, 'on_canvas_max_abs_diff': (placed - crop_logits).abs().max().item(),
            'on_canvas_top1_agreement': (placed.argmax(1) == crop_logits.argmax(1)).float().mean().item(),
            'images': len(x)}
