"""Why a detector's counts are wrong: every output box and every missed object of exercise 2.2, sorted
into one kind of error each, and every wrong-count canvas into why (docs/exercise_2_2.md reads it).

    errors = count_errors(output, targets, threshold)   # -> {'canvases': {...}, 'detections': {...}, ...}

Detections (score >= threshold), matched greedily in score order as detect.match does (same class, IoU >= 0.5):
  correct       matched
  duplicate     IoU >= 0.5 with an object another detection already matched
  wrong_class   IoU >= 0.5 with an unmatched object of another class
  merged        covers most (>= 50%) of two or more objects' boxes: one box for neighbours
  partial       overlaps an object (0 < IoU < 0.5) and covers less than half of any two: a piece, or a shifted box
  background    overlaps no object at all
Objects left unmatched: 'missed' (no detection overlaps it), 'wrong_class' (only a wrong-class detection at
IoU >= 0.5), 'merged' (inside a merged box), 'mislocalised' (only overlapped at IoU < 0.5).
An object is 'crowded' when another object's box lies within 4 px (the canvases keep >= min_gap px).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch import Tensor

CROWDED_PX = 4  # px between two objects' boxes below which the pair counts as crowded


def _cover(a: Tensor, b: Tensor) -> Tensor:
    """(A, B): the fraction of each box b's area that box a covers."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (b[:, 2:] - b[:, :2]).prod(-1).clamp(min=1e-9)[None]


def _gaps(boxes: Tensor) -> Tensor:
    """(k,) px from each box to its nearest other box (Chebyshev gap; inf when alone)."""
    if len(boxes) < 2:
        return torch.full((len(boxes),), float('inf'))
    dx = torch.maximum(boxes[None, :, 0] - boxes[:, None, 2], boxes[:, None, 0] - boxes[None, :, 2]).clamp(min=0)
    dy = torch.maximum(boxes[None, :, 1] - boxes[:, None, 3], boxes[:, None, 1] - boxes[None, :, 3]).clamp(min=0)
    gap = torch.maximum(dx, dy).fill_diagonal_(float('inf'))
    return gap.min(1).values


def canvas_errors(pred: dict[str, Tensor], target: dict[str, Tensor]) -> tuple[list[str], list[str], list[bool]]:
    """(kind of each detection, kind of each object ('found' if matched), crowded flag of each object)."""
    from torchvision.ops import box_iou
    boxes, labels = pred['boxes'], pred['labels']
    gt, gt_labels = target['boxes'].float(), target['labels']
    order = torch.argsort(pred['scores'], descending=True, stable=True).tolist()
    iou = box_iou(boxes, gt) if len(boxes) and len(gt) else torch.zeros(len(boxes), len(gt))
    cover = _cover(boxes, gt) if len(boxes) and len(gt) else torch.zeros(len(boxes), len(gt))
    taken = np.zeros(len(gt), bool)
    kinds = [''] * len(boxes)
    for d in order:  # the matching detect.match does
        ok = (gt_labels == labels[d]).numpy() & ~taken & (iou[d] >= 0.5).numpy()
        if ok.any():
            taken[int(np.argmax(np.where(ok, iou[d].numpy(), -1)))] = True
            kinds[d] = 'correct'
    for d in order:
        if kinds[d]:
            continue
        hit = (iou[d] >= 0.5).numpy()
        if (cover[d] >= 0.5).sum() >= 2:
            kinds[d] = 'merged'
        elif (hit & taken).any():
            kinds[d] = 'duplicate'
        elif hit.any():
            kinds[d] = 'wrong_class'
        elif (iou[d] > 0).any():
            kinds[d] = 'partial'
        else:
            kinds[d] = 'background'
    objects = []
    for g in range(len(gt)):
        if taken[g]:
            objects.append('found')
            continue
        by = [kinds[d] for d in range(len(boxes)) if iou[d, g] > 0]
        objects.append('merged' if any(k == 'merged' and cover[d, g] >= 0.5 for d, k in enumerate(kinds)) else
                       'wrong_class' if any(iou[d, g] >= 0.5 for d in range(len(boxes))) else
                       'mislocalised' if by else 'missed')
    return kinds, objects, (_gaps(gt) <= CROWDED_PX).tolist()


def count_errors(output: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], threshold: float) -> dict:
    """The error census of a detector's output at `threshold` (module docstring): counts of detection
    kinds, of unmatched objects' kinds (and how many of them were crowded), and of wrong-count
    canvases by direction and by the kinds of error on them."""
    dets, objs, crowded_objs, canvases, causes = Counter(), Counter(), Counter(), Counter(), Counter()
    n_crowded = 0
    for p, t in zip(output, targets):
        keep = p['scores'] >= threshold
        kinds, objects, crowded = canvas_errors({k: v[keep] for k, v in p.items()}, t)
        dets.update(kinds)
        objs.update(o for o in objects if o != 'found')
        crowded_objs.update(o for o, c in zip(objects, crowded) if c and o != 'found')
        n_crowded += sum(crowded)
        diff = len(kinds) - len(objects)
        canvases['right' if diff == 0 else 'over' if diff > 0 else 'under'] += 1
        if diff:
            errs = sorted({k for k in kinds if k != 'correct'} | {f'object_{o}' for o in objects if o != 'found'})
            causes[' + '.join(errs) or 'none'] += 1
    return {'canvases': dict(canvases), 'detections': dict(dets), 'objects_unmatched': dict(objs),
            'objects_unmatched_crowded': dict(crowded_objs), 'objects': sum(len(t['boxes']) for t in targets),
            'objects_crowded': n_crowded, 'crowded_px': CROWDED_PX,
            'wrong_count_causes': dict(causes.most_common())}
