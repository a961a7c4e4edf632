"""How a detector's output is scored (exercise 2.2): COCO mAP, greedy matching, PR curve, P / R / F1,
exact-count accuracy, and why counts are wrong: every output box and every missed object sorted into
one kind of error each (docs/exercise_2_2.md reads the census).

    scores, tp, n_gt = match(output, targets)            # one matching serves every threshold
    errors = count_errors(output, targets, threshold)    # -> {'canvases': {...}, 'detections': {...}, ...}

Census of the detections (score >= threshold), matched greedily in score order as match does (same
class, IoU >= 0.5):
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

# ---------------------------------------------------------------------------------------------
# Metrics


def coco_metrics(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> dict[str, float]:
    """COCO mAP@0.5, mAP@[.5:.95] and mAR@100 (torchmetrics MeanAveragePrecision, faster-coco-eval
    backend, or pycocotools if that is what is installed), over all classes present, on the 100
    best-scored detections of each canvas (COCO's maxDets, which torchmetrics applies too, with a warning)."""
    from torchmetrics.detection import MeanAveragePrecision
    try:
        import faster_coco_eval  # noqa: F401
        backend = 'faster_coco_eval'
    except ImportError:
        backend = 'pycocotools'
    metric = MeanAveragePrecision(box_format='xyxy', iou_type='bbox', backend=backend)
    top = [torch.argsort(p['scores'], descending=True, stable=True)[:100] for p in preds]  # COCO's maxDets 100,
    metric.update([{k: v[t] for k, v in p.items()} for p, t in zip(preds, top)], targets)  # said, not warned about
    r = metric.compute()
    return {'map_50': float(r['map_50']), 'map': float(r['map']), 'mar_100': float(r['mar_100']),
            'coco_backend': backend}


def match(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
          iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy COCO-style matching: per canvas and class, detections in score order each take the
    unmatched ground-truth box of that class with the highest IoU >= iou. Returns (scores (D,),
    true-positive flags (D,), number of ground-truth boxes). A detection's flag does not depend on
    lower-scored ones, so one matching serves every score threshold."""
    from torchvision.ops import box_iou
    scores, tps, n_gt = [], [], 0
    for p, t in zip(preds, targets):
        n_gt += len(t['boxes'])
        ious = box_iou(p['boxes'], t['boxes']) if len(p['boxes']) and len(t['boxes']) else None
        taken = np.zeros(len(t['boxes']), bool)
        for d in torch.argsort(p['scores'], descending=True, stable=True).tolist():
            hit = False
            if ious is not None:
                ok = (t['labels'] == p['labels'][d]).numpy() & ~taken & (ious[d].numpy() >= iou)
                if ok.any():
                    g = int(np.argmax(np.where(ok, ious[d].numpy(), -1)))
                    taken[g] = hit = True
            scores.append(float(p['scores'][d]))
            tps.append(hit)
    return np.asarray(scores, float), np.asarray(tps, bool), n_gt


def pr_curve(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> dict[str, np.ndarray]:
    """Precision and recall of the detections with score >= each threshold (thresholds descending)."""
    order = np.argsort(-scores, kind='stable')
    s, hits = scores[order], tp[order].cumsum()
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # one point per distinct score
    n = np.arange(1, len(s) + 1)
    return {'threshold': s[last], 'precision': (hits / n)[last], 'recall': (hits / max(n_gt, 1))[last]}


def prf_at(scores: np.ndarray, tp: np.ndarray, n_gt: int, threshold: float) -> dict[str, float]:
    keep = scores >= threshold
    n_tp, n_det = int(tp[keep].sum()), int(keep.sum())
    p = n_tp / n_det if n_det else 1.0
    r = n_tp / n_gt if n_gt else 1.0
    return {'precision': p, 'recall': r, 'f1': 2 * p * r / (p + r) if p + r else 0.0}


def best_threshold(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """The score threshold with the highest F1 at IoU >= 0.5 (the highest such threshold on ties).
    Meant for validation canvases, never the test ones."""
    curve = pr_curve(scores, tp, n_gt)
    if not len(curve['threshold']):
        return 1.0
    p, r = curve['precision'], curve['recall']
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0)
    return float(curve['threshold'][int(np.argmax(f1))])  # argmax: the first = highest threshold


def count_accuracy(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], threshold: float) -> float:
    """Fraction of canvases with exactly as many detections (score >= threshold) as objects."""
    right = [int((p['scores'] >= threshold).sum()) == len(t['boxes']) for p, t in zip(preds, targets)]
    return float(np.mean(right)) if right else 0.0


def above(preds: list[dict[str, Tensor]], threshold: float) -> list[dict[str, Tensor]]:
    return [{k: v[p['scores'] >= threshold] for k, v in p.items()} for p in preds]


def thin(curve: dict, points: int = 200) -> dict[str, list]:
    """The PR curve at most `points` points, evenly spread over its thresholds, for results.json: every
    candidate a threshold (peak_window 1) gives tens of thousands, and the records stay small."""
    n = len(curve['threshold'])
    keep = np.unique(np.linspace(0, n - 1, min(points, n)).round().astype(int)) if n else np.zeros(0, int)
    return {k: np.asarray(v)[keep].tolist() for k, v in curve.items()}


# ---------------------------------------------------------------------------------------------
# Why counts are wrong

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
    for d in order:  # the matching detect_metrics.match does
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
