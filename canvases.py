"""Exercise 2.2's data: real images placed on black canvases with their tight ink boxes, and the
crops track B's background class is fine-tuned on; the canvas and crop keys' limits (LIMITS).

Coordinates: boxes are xyxy floats in canvas pixels with exclusive ends, so the box of pixel
columns 3..9 is x1=3, x2=10 (its width is x2 - x1). Ground truth and predictions use one rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from config import UserError
from dataset import Data, Split

WINDOW = 28  # px: the classifier's input (1-channel 28x28 data), so the crop and detection window
KEYS = ('canvas_size', 'objects', 'object_size', 'min_gap', 'ink_threshold')  # 2.2's keys that shape a canvas


def _pair(v) -> bool:
    return len(v) == 2 and all(type(i) is int for i in v) and 1 <= v[0] <= v[1]


# (key, test, what the value must be): 2.2's canvas and crop keys, for config.check before any work
LIMITS = [
    ('canvas_size', lambda v: v >= WINDOW, f'>= {WINDOW}, the classifier\'s window'),
    ('objects', _pair, '[min, max] whole numbers with 1 <= min <= max'),
    ('object_size', _pair, '[min, max] whole numbers with 1 <= min <= max'),
    ('min_gap', lambda v: v >= 0, '>= 0'),
    ('ink_threshold', lambda v: 0 <= v < 255, 'in [0, 254] (uint8 levels above it are ink)'),
    ('max_shift', lambda v: 0 <= v < 3 * WINDOW // 4,
     f'in [0, {3 * WINDOW // 4 - 1}]: off-centre (background) crops are shifted by more, up to 3/4 of the '
     f'{WINDOW} px window'),
    ('ignore_shift', lambda v: 0 <= v < 3 * WINDOW // 4,
     f'in [0, {3 * WINDOW // 4 - 1}] and >= --max_shift (= max_shift: no ignore zone)'),
]


def canvas_keys(config: dict) -> dict:
    """make_canvases' keyword arguments (KEYS) from 2.2's config."""
    return {k: config[k] for k in KEYS}


@dataclass
class Canvases:
    """Images on black canvases. Boxes are the tight ink boxes (xyxy, exclusive ends)."""
    images: Tensor               # (N, 1, S, S) uint8
    boxes: list[Tensor]          # per canvas (k, 4) float32
    labels: list[Tensor]         # per canvas (k,) int64
    centres: list[Tensor]        # per canvas (k, 2) float32: (y, x) centre of each placed image
    sources: list[Tensor]        # per canvas (k,) int64: index of each image in its split
    placements: list[Tensor] = field(default_factory=list)  # per canvas (k, 4) xyxy: each image's whole square

    def __len__(self) -> int:
        return len(self.images)

    def targets(self, truth: str = 'ink') -> list[dict[str, Tensor]]:
        """Ground truth per canvas, as torchmetrics and detect_metrics.match take it: the tight ink boxes, or
        (truth='placement') the square where each image was placed (28x28 unless scaled)."""
        boxes = self.placements if truth == 'placement' else self.boxes
        return [{'boxes': b, 'labels': c} for b, c in zip(boxes, self.labels)]


def ink_box(img: np.ndarray, ink_threshold: int) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1), exclusive ends, of the pixels > ink_threshold of a 2-D uint8 image; None if none."""
    mask = img > ink_threshold
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def check_fits(canvas_size: int, objects: list[int], object_size: list[int], min_gap: int) -> None:
    """UserError unless max(objects) images of max(object_size) px surely fit: a grid of cells of
    (size + gap) px must have that many cells. (Ink boxes are often smaller, so this is conservative.)"""
    lo, hi = objects
    s_lo, s_hi = object_size
    if not (1 <= lo <= hi) or not (1 <= s_lo <= s_hi) or min_gap < 0:
        raise UserError(f"--objects and --object_size take [min, max] with 1 <= min <= max, --min_gap >= 0; "
                        f"got {objects}, {object_size}, {min_gap}")
    per_row = (canvas_size + min_gap) // (s_hi + min_gap)
    if per_row * per_row < hi:
        rows = int(np.ceil(np.sqrt(hi)))
        need = rows * (s_hi + min_gap) - min_gap
        raise UserError(f"a {canvas_size}x{canvas_size} canvas cannot surely hold {hi} images of {s_hi} px with "
                        f"{min_gap} px gaps: use --canvas_size {need} or more, or fewer --objects")


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size:
        return img
    t = torch.from_numpy(img).float()[None, None]
    t = F.interpolate(t, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return t[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def make_canvases(x: np.ndarray | Tensor, y: np.ndarray | Tensor, n: int, seed: int | list[int],
                  canvas_size: int = 100, objects: list[int] = (3, 6), object_size: list[int] = (28, 28),
                  min_gap: int = 2, ink_threshold: int = 32) -> Canvases:
    """n canvases (canvas_size px, black) holding objects[0]..objects[1] images of split (x, y).

    Built in pixel space: each image (uint8 (N, [1,] H, W)) is scaled to a size drawn from
    object_size (bilinear, antialiased; [28, 28] = no scaling) and put at a uniformly random place
    inside the canvas where its ink box keeps min_gap px from every other ink box; images are
    combined by pixel-wise max. Images without ink are never drawn. Deterministic in `seed`.
    """
    check_fits(canvas_size, list(objects), list(object_size), min_gap)
    x = (x.cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)).reshape(len(x), *x.shape[-2:])
    y = y.cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    has_ink = (x > ink_threshold).reshape(len(x), -1).any(1)
    usable = np.flatnonzero(has_ink)
    if not len(usable):
        raise UserError(f"no image of the split has a pixel above ink_threshold {ink_threshold}")
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, canvas_size, canvas_size), np.uint8)
    out = Canvases(torch.from_numpy(images), [], [], [], [])
    for k in range(n):
        for _restart in range(50):
            canvas, boxes, labels, centres, sources, squares = images[k, 0], [], [], [], [], []
            canvas[:] = 0
            for _ in range(rng.integers(objects[0], objects[1] + 1)):
                idx = int(usable[rng.integers(len(usable))])
                img = _resize(x[idx], int(rng.integers(object_size[0], object_size[1] + 1)))
                s = img.shape[0]
                y0, x0, y1, x1 = ink_box(img, ink_threshold) or (0, 0, s, s)
                for _try in range(200):
                    top, left = rng.integers(0, canvas_size - s + 1, 2)
                    b = (top + y0, left + x0, top + y1, left + x1)
                    if all(b[2] + min_gap <= o[0] or o[2] + min_gap <= b[0] or
                           b[3] + min_gap <= o[1] or o[3] + min_gap <= b[1] for o in boxes):
                        break
                else:
                    break  # no room left: start this canvas again
                np.maximum(canvas[top:top + s, left:left + s], img, out=canvas[top:top + s, left:left + s])
                boxes.append(b)
                labels.append(int(y[idx]))
                centres.append((top + s / 2, left + s / 2))
                squares.append((left, top, left + s, top + s))
                sources.append(idx)
            else:
                break
        else:
            raise UserError(f"could not place {objects[1]} images on a {canvas_size}px canvas in 50 attempts; "
                            f"use a larger --canvas_size or fewer --objects")
        out.boxes.append(torch.tensor([[b[1], b[0], b[3], b[2]] for b in boxes], dtype=torch.float32).view(-1, 4))
        out.labels.append(torch.tensor(labels, dtype=torch.int64))
        out.centres.append(torch.tensor(centres, dtype=torch.float32).view(-1, 2))
        out.sources.append(torch.tensor(sources, dtype=torch.int64))
        out.placements.append(torch.tensor(squares, dtype=torch.float32).view(-1, 4))
    return out


def crop_corners(canvases: Canvases, window: int, max_shift: int, random_per_canvas: int,
                 seed: int | list[int], ignore_shift: int | None = None) -> list[np.ndarray]:
    """Top-left (y, x) of background_crops' crops, per canvas (int64 (M, 2), canvas coordinates).

    Per object: a positive, whose centre lies within max_shift (+ 0.5, see background_crops) of the
    object's centre in y and x, drawn uniformly from those places; and an off-centre crop, beyond
    ignore_shift (default max_shift), shifted by up to 3/4 window (a partial view). Per canvas,
    random_per_canvas crops anywhere. Every draw is bounded: UserError if the shifts leave no room
    for off-centre crops."""
    far = (3 * window) // 4
    ignore_shift = max_shift if ignore_shift is None else ignore_shift
    if not 0 <= max_shift <= ignore_shift < far:
        raise UserError(f"--max_shift {max_shift} / --ignore_shift {ignore_shift} leave no room for off-centre "
                        f"(background) crops of a {window} px window, which are shifted by more than both and at "
                        f"most {far} px: use 0 <= max_shift <= ignore_shift <= {far - 1}")
    rng = np.random.default_rng(seed)
    half, reach = window / 2, ignore_shift + 0.5
    out = []
    for k in range(len(canvases)):
        size = canvases.images.shape[-1]
        corners = []
        for centre in canvases.centres[k].numpy().astype(np.float64):
            centred = centre - half                                  # the corner that centres the crop (may be .5)
            lo, hi = np.ceil(centred - max_shift - 0.5), np.floor(centred + max_shift + 0.5)
            corners.append(lo + rng.integers(0, (hi - lo + 1).astype(np.int64)))
            for _ in range(1000):  # rejection: at most (41/43)^2 of draws fail (max_shift 20), so this ends
                corner = np.floor(centred) + rng.integers(-far, far + 1, 2)
                if np.abs(corner - centred).max() > reach:
                    break
            else:
                raise UserError(f"no off-centre crop found in 1000 draws (--max_shift {max_shift}, window {window})")
            corners.append(corner)
        for _ in range(random_per_canvas):
            corners.append(rng.integers(-int(half), size - int(half) + 1, 2).astype(float))
        out.append(np.asarray(corners, dtype=np.int64).reshape(-1, 2))
    return out


def background_crops(canvases: Canvases, window: int, max_shift: int, random_per_canvas: int,
                     seed: int | list[int], background: int = 10, ignore_shift: int | None = None,
                     margin: int = 0) -> tuple[Tensor, Tensor]:
    """Crops of `window` px from canvases, labelled for an (n+1)-way classifier: (x uint8 (M, 1, w, w), y (M,));
    with `margin` px of the canvas around each (w + 2 margin px: the fine-tune in context, detect.in_context).

    Crops at crop_corners (per object a positive and an off-centre crop, per canvas random ones;
    outside the canvas is black). Every crop is labelled by one rule: the class of the object whose
    centre lies nearest the crop's centre within max_shift + 0.5 px in y and x, else `background`.
    The half pixel makes the rule symmetric: an odd-sized object's centre falls mid-pixel, so a crop
    is 0.5, 1.5, ... px off it, alike on either side (without it, a shift of -max_shift would be
    background and +max_shift the class). For even sizes it is exactly "within max_shift px".
    ignore_shift > max_shift leaves a zone untrained, as detectors leave IoUs between their positive
    and negative thresholds: a crop whose nearest object centre is more than max_shift but at most
    ignore_shift px off is dropped, neither the class nor background (the stride-8 decoder always has
    a window within 4 px of an object; the next one, 4-12 px off, need not say background).
    """
    pad, half = window + margin, window / 2
    ignore_reach = (max_shift if ignore_shift is None else ignore_shift) + 0.5
    xs, ys = [], []
    for k, corners in enumerate(crop_corners(canvases, window, max_shift, random_per_canvas, seed, ignore_shift)):
        img = F.pad(canvases.images[k, 0], (pad, pad, pad, pad)).numpy()  # black beyond the canvas
        centres = canvases.centres[k].numpy().astype(np.float64)
        for t, l in corners:
            dist = np.abs(centres - (np.array([t, l]) + half)).max(1) if len(centres) else np.zeros(0)
            near = np.flatnonzero(dist <= max_shift + 0.5)
            if not len(near) and (dist <= ignore_reach).any():
                continue  # in the ignore zone
            xs.append(img[t + pad - margin:t + pad + window + margin, l + pad - margin:l + pad + window + margin])
            ys.append(int(canvases.labels[k][near[dist[near].argmin()]]) if len(near) else background)
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys, dtype=torch.int64)


def crop_data(data: Data, config: dict, device: torch.device | str = 'cpu', margin: int = 0) -> tuple[Data, dict]:
    """Track B's 11-class crops (uint8, class 10 = background; with `margin` px of canvas around each window)
    on `device`, cut from canvases of each
    split: train from the train split (finetune_canvases of them), val and test (reported, never
    selected on; a tenth as many) from theirs, each with its own seed stream of canvas_seed.
    Returns the crops and per split {'canvases', 'crops', 'background'}."""
    splits, counts = {}, {}
    n_canvases = config['finetune_canvases']
    sizes = (n_canvases, max(n_canvases // 10, 1), max(n_canvases // 10, 1))
    for stream, (name, n) in enumerate(zip(('train', 'val', 'test'), sizes)):
        split, seed = getattr(data, name), [config['canvas_seed'], 10 + stream]
        canvases = make_canvases(split.x, split.y, n, seed, **canvas_keys(config))
        x, y = background_crops(canvases, data.shape[-1], config['max_shift'], config['random_crops'], seed,
                                background=data.num_classes, ignore_shift=config['ignore_shift'], margin=margin)
        splits[name] = Split(x=x.to(device), y=y.to(device), mean=split.mean.to(device), std=split.std.to(device))
        counts[name] = {'canvases': n, 'crops': len(y), 'background': int((y == data.num_classes).sum())}
    return Data(name=f'{data.name}-crops', classes=data.classes + ['background'], **splits), counts


def crop_summary(counts: dict) -> str:
    """crop_data's counts as one line: 'train 140 (88 background, 12 canvases), val ...'."""
    return ', '.join(f"{split} {c['crops']:,} ({c['background']:,} background, {c['canvases']:,} "
                     f"canvas{'' if c['canvases'] == 1 else 'es'})" for split, c in counts.items())
