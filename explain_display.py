"""How exercise 2.3 shows what explain.py and sanity.py measure: the faithfulness table, the paired
comparisons and the randomisation cascade on the console (and a table as flat rows for the loggers);
grids of example maps over their images (`overlay`), the deletion / insertion curves and the
cascade's figures. A module of its own so that explain.py and sanity.py hold the measures only."""
from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import torch
from torch import Tensor, nn

from dataset import Split
from evaluate import pyplot
from explain import BASELINES, BETTER, explain_all

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LABELS = {'cam': 'CAM', 'grad_cam': 'Grad-CAM', 'grad_cam_pp': 'Grad-CAM++', 'random': 'random',
          'random_smooth': 'random smooth', 'constant': 'constant', 'object_prior': 'object prior'}
LINESTYLE = {'random': '--', 'random_smooth': ':', 'constant': '-.', 'object_prior': (0, (5, 1, 1, 1))}  # baselines
MARK = {'better': '+', 'worse': '-', 'tie': '='}  # a paired verdict in the printed table
SHORT = {'black': 'removed = black, insertion from black', 'rise': 'removed = mean colour, insertion from a blur'}


def print_table(title: str, table: dict, substrate: str, checks: dict, notes: bool = True) -> None:
    """One table of explain.faithfulness on the console, a row per map; notes: the legend below it."""
    print(f"\nfaithfulness, {title}; substrate '{substrate}': {SHORT[substrate]}")
    print(f"  {'map':<13} {'deletion AUC (lower)':>27} {'insertion AUC (higher)':>27} "
          f"{'Average Drop % (lower)':>27} {'Increase % (higher)':>27}")
    for m, row in table.items():
        cells = [f"{row[k]:.3f} [{row['ci95'][k][0]:.3f},{row['ci95'][k][1]:.3f}]" if 'auc' in k else
                 f"{row[k]:.1f} [{row['ci95'][k][0]:.1f},{row['ci95'][k][1]:.1f}]" for k in BETTER]
        if 'vs' in row:
            cells = [c + ' ' + '/'.join(MARK[row['vs'][b][k]['verdict']] for b in row['vs'])
                     for c, k in zip(cells, BETTER)]
        print(f"  {LABELS[m]:<13} {cells[0]:>27} {cells[1]:>27} {cells[2]:>27} {cells[3]:>27}")
    start = checks['insertion_start']
    if not start['near_chance']:
        print(f"  WARNING: {100 * start['agreement_with_prediction']:.0f}% of insertion's start images keep their "
              f"prediction (chance {100 * start['chance']:.0f}%): insertion AUC measures little here")
    if not notes:
        return
    print("  [95% bootstrap interval over images]; vs random / random smooth / constant, paired, at 95%: "
          "+ better, - worse, = tie")
    print("  'random' tests location: the random pixel order (deletion, insertion), the map's own pixels shuffled "
          "(Average Drop, Increase)")
    print(f"  CAM and Grad-CAM are one result, not two: with GAP + one linear layer Grad-CAM = ReLU(CAM) / (h*w), "
          f"the same after min-max (max |diff| {checks['cam_vs_grad_cam_max_abs_diff']:.1e})")


def table_rows(table: dict) -> list[dict]:
    """A faithfulness table as flat rows, one per map (each metric, its interval and its verdicts)."""
    return [{'method': m, **{k: v for k, v in row.items() if k in BETTER},
             **{f'{k}/ci95_{end}': ci[i] for k, ci in row.get('ci95', {}).items() for i, end in enumerate(('low', 'high'))},
             **{f'{k}/{metric}': won for k, wins in row.items() if k.startswith('beats_')
                for metric, won in wins.items()}}
            for m, row in table.items()]


def pick_examples(y: Tensor, pred: Tensor, n_correct: int, n_wrong: int, num_classes: int) -> dict[str, list[int]]:
    """The first n_correct correctly and n_wrong wrongly predicted test images of every class."""
    out: dict[str, list[int]] = {'correct': [], 'wrong': []}
    for c in range(num_classes):
        out['correct'] += torch.nonzero((y == c) & (pred == c))[:n_correct, 0].tolist()
        out['wrong'] += torch.nonzero((y == c) & (pred != c))[:n_wrong, 0].tolist()
    return out


def example_figures(model: nn.Module, split: Split, probs: Tensor, classes: list[str], layer: nn.Module,
                    fc: nn.Linear, prefix: str, title: str, per_class: list[int], batch: int) -> dict[str, Figure]:
    """{'<prefix>_correct' | '<prefix>_wrong': grid of maps} for the first per_class = [correct, wrong]
    test images of every class (probs (N, n): the model's predictions on split)."""
    picks = pick_examples(split.y, probs.argmax(1), *per_class, len(classes))
    figures = {}
    for kind, idx in picks.items():
        if not idx:
            print(f"{prefix}: no {kind} predictions to show")
            continue
        idx = torch.tensor(idx, device=split.x.device)
        maps = explain_all(model, split.normalize(split.x[idx]), layer, fc, batch)
        figures[f'{prefix}_{kind}'] = plot_maps(split.x[idx].cpu(), {m: v.cpu() for m, v in maps.items()},
                                                probs[idx].cpu(), split.y[idx].cpu(), classes,
                                                f"{title}: {kind} predictions, maps of the predicted class")
    return figures


def plot_maps(images: Tensor, maps: dict[str, Tensor], probs: Tensor, y: Tensor, classes: list[str], title: str,
              per_row: int = 2) -> Figure:
    """`per_row` images per row (the examples of one class side by side), each as a group: the image
    (true and predicted class, p of the prediction), then each method's map over it. images uint8
    (B, C, H, W), maps {method: (B, H, W)}, probs (B, n), all on the CPU."""
    plt = pyplot()
    b, group = len(images), 1 + len(maps)
    rows, cols = -(-b // per_row), per_row * group
    fig, axes = plt.subplots(rows, cols, figsize=(1.25 * cols, 1.45 * rows + 0.5), squeeze=False,
                             layout='constrained')  # constrained: the title never overlaps the headers
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(b):
        row, first = i // per_row, (i % per_row) * group
        img = images[i]
        ax = axes[row, first]
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap='gray', vmin=0, vmax=255)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())  # (C, H, W) -> (H, W, C)
        pred = int(probs[i].argmax())
        right = pred == int(y[i])
        ax.set_title(f"{classes[y[i]]}" + ('' if right else f"\n→ {classes[pred]}") + f" {probs[i, pred]:.2f}",
                     fontsize=7, color='green' if right else 'red')
        rgb = img.expand(3, -1, -1)  # overlay wants 3 channels; grey images are repeated
        for j, (name, m) in enumerate(maps.items()):
            ax = axes[row, first + 1 + j]
            ax.imshow(overlay(rgb, m[i]))
            if row == 0:
                ax.set_title(LABELS[name], fontsize=8)
    fig.suptitle(f"{title}\n(title: true class, → predicted if wrong, p of the prediction; "
                 f"green right, red wrong; maps of the predicted class)", fontsize=9)
    return fig


def plot_faithfulness(curves: dict, table: dict, title: str, substrate: str) -> Figure:
    """Deletion and insertion: the mean curve of every map, its AUC in the legend; baselines grey."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, kind in zip(axes, ('deletion', 'insertion')):
        for m, cs in curves.items():
            x = torch.linspace(0, 1, len(cs[kind])).tolist()
            ax.plot(x, cs[kind], label=f"{LABELS[m]} (AUC {table[m][f'{kind}_auc']:.3f})",
                    linestyle=LINESTYLE.get(m, '-'),
                    color='gray' if m in BASELINES else None)
        what = {('black', 'deletion'): 'deleted (set to black)', ('black', 'insertion'): 'inserted into a black image',
                ('rise', 'deletion'): 'deleted (set to the mean colour)',
                ('rise', 'insertion'): 'inserted into the blurred image'}[substrate, kind]
        ax.set_xlabel(f'fraction of pixels {what}', fontsize=8)
        ax.set_ylabel('p(predicted class)')
        better = 'lower' if kind == 'deletion' else 'higher'
        ax.set_title(f"{kind}, most salient pixels first ({better} AUC = more faithful)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


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


# ----------------------------------------------------------------------------- controls (sanity.py)

METRIC = {'deletion_auc': 'deletion', 'insertion_auc': 'insertion', 'average_drop': 'Avg Drop',
          'increase_in_confidence': 'Increase'}


def _name(key: str) -> str:
    """'grad_cam_pp_randomised' -> 'Grad-CAM++ (randomised)'."""
    base = key.removesuffix('_randomised')
    return LABELS.get(base, base) + (' (randomised)' if key != base else '')


def print_comparisons(title: str, comparisons: dict) -> None:
    """A paired family (sanity.paired_family) on the console, one line per pair and metric. Lines start
    with the metric, never with a map's label, so they never read as a row of a faithfulness table."""
    print(f"\npaired comparisons, {title}: {comparisons['family']}")
    for pair, metrics in comparisons['pairs'].items():
        a, b = pair.split('_vs_')
        for k, r in metrics.items():
            print(f"  {METRIC[k]:<10} {_name(a)} - {_name(b)}: {r['diff']:+.3g} ({r['lo']:+.3g} to {r['hi']:+.3g}), "
                  f"p {r['p']:.3f}, Holm {r['p_holm']:.3f}: {r['verdict']}")


def print_cascade(record: dict) -> None:
    """Spearman rank correlation with the trained maps at each cascade step (sanity.sanity_checks)."""
    print(f"\nsanity checks (Adebayo et al. 2018), {record['images']} images: cascading randomisation from the head "
          f"down, Spearman rho of each method's maps with the trained model's (mean, 95% interval)")
    methods = next(iter(record['cascade'].values()))
    print(f"  {'step: randomised up to':<24}" + ''.join(f"{LABELS[m]:>26}" for m in methods))
    for step, row in record['cascade'].items():
        print(f"  {step:<24}" + ''.join(f"{r['rho']:>+8.2f} ({r['lo']:+.2f} to {r['hi']:+.2f})" for r in row.values()))
    faith = record['faithfulness']
    print(f"  faithfulness on the trained model, substrate '{faith['substrate']}' (deletion, insertion, Avg Drop, "
          f"Increase; trained vs fully randomised maps):")
    for m, row in faith['table'].items():
        print(f"  scored {_name(m):<26}" + ', '.join(f"{row[k]:.3f}" for k in BETTER))


def print_data_randomisation(record: dict) -> None:
    """Adebayo's data randomisation (sanity.data_randomisation): a line per method, one for the model."""
    print(f"\ndata randomisation (Adebayo et al. 2018), {record['images']} images: Spearman rho of each method's maps "
          f"of a copy trained on permuted labels with the trained model's (mean, 95% interval)")
    for m, r in record['rank_correlation'].items():
        print(f"  {LABELS[m]:<12} rho {r['rho']:+.2f} ({r['lo']:+.2f} to {r['hi']:+.2f}), flat maps "
              f"{100 * r['flat_maps']:.0f}%")
    m = record['model']
    print(f"  model {m['run_dir']} ({m['checkpoint']}, {m['epochs']} epochs, {m['subset'] or 'all'} training images): "
          f"{100 * m['train_acc_permuted']:.1f}% of its permuted training labels memorised, true test acc "
          f"{100 * m['test_acc']:.1f}% (chance {100 * m['chance']:.0f}%)")


def plot_cascade(images: Tensor, figure_maps: dict[str, dict[str, Tensor]], title: str) -> Figure:
    """Adebayo's Fig. 2: one row per (image, method), one column per cascade step (trained first),
    each map over its image. images uint8 (n, C, H, W) on the CPU, figure_maps {step: {method: (n, H, W)}}."""
    plt = pyplot()
    steps = list(figure_maps)
    methods = list(figure_maps['trained'])
    rows = [(i, m) for i in range(len(images)) for m in methods]
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(1.1 * len(steps) + 1, 1.1 * len(rows) + 0.8),
                             squeeze=False, layout='constrained')
    for r, (i, m) in enumerate(rows):
        rgb = images[i].expand(3, -1, -1)  # overlay wants 3 channels; grey images are repeated
        for c, step in enumerate(steps):
            ax = axes[r, c]
            ax.imshow(overlay(rgb, figure_maps[step][m][i]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(step, fontsize=6, rotation=30)
            if c == 0:
                ax.set_ylabel(f"#{i} {LABELS[m]}", fontsize=6)
    last = '; last column: a copy trained on permuted labels' if 'permuted labels' in figure_maps else ''
    fig.suptitle(f"{title}\ncascading randomisation: columns re-initialise one more layer group, head first{last}",
                 fontsize=8)
    return fig


def plot_rank_correlation(record: dict, title: str) -> Figure:
    """Spearman rho (mean, 95% interval) of each method's maps with the trained maps vs cascade step."""
    plt = pyplot()
    steps = list(record['cascade'])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = list(range(len(steps) + 1))  # 0: the trained model, rho 1 by definition
    for m, style in zip(next(iter(record['cascade'].values())), ('--', ':', '-')):  # CAM = Grad-CAM: both visible
        rho, lo, hi = ([1.0] + [record['cascade'][s][m][k] for s in steps] for k in ('rho', 'lo', 'hi'))
        ax.plot(x, rho, marker='o', linestyle=style, label=LABELS[m])
        ax.fill_between(x, lo, hi, alpha=0.2)
    ax.axhline(0, color='gray', linewidth=0.8)
    ax.set_xticks(x, ['trained', *steps], rotation=30, fontsize=7, ha='right')
    ax.set_xlabel('randomised from the head down to (cumulative)', fontsize=8)
    ax.set_ylabel('Spearman rho with trained maps')
    ax.set_title(f"{title}: a map that explains the model falls towards 0", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
