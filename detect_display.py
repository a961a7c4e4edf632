"""How exercise 2.2 shows what detect.py measures: test canvases with their boxes, score maps and the
PR curves (figures), and the track and box-ablation tables as TensorBoard text / W&B tables
(log_tables) and on the console (print_results). A module of its own so that detect.py holds the
detector and its measures only."""
from __future__ import annotations

from typing import TYPE_CHECKING

from evaluate import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from canvases import Canvases
    from dataset import Data
    from detect import Geometry
    from record import Run


def _draw_boxes(ax, boxes: Tensor, labels: Tensor, classes: list[str], color: str, scores: Tensor | None = None,
                style: str = '-') -> None:
    from matplotlib.patches import Rectangle
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                               linewidth=1.1, linestyle=style))
        text = classes[int(labels[k])] + ('' if scores is None else f' {float(scores[k]):.2f}')
        ax.text(x0 - 0.5, (y0 - 1.5) if scores is not None else (y1 + 2.5), text, color=color, fontsize=5.5,
                va='bottom' if scores is not None else 'top',
                bbox=dict(facecolor='black', alpha=0.55, pad=0.5, linewidth=0))


def plot_detections(canvases: Canvases, tracks: dict[str, list[dict[str, Tensor]]], classes: list[str],
                    title: str, indices: list[int]) -> Figure:
    """One row per track, one column per canvas: ground truth (green dashed, label below) and the
    detections above the track's threshold (coloured, label and score above)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(tracks), len(indices), figsize=(2.6 * len(indices), 2.8 * len(tracks)),
                             squeeze=False)
    for row, (name, preds) in enumerate(tracks.items()):
        for col, k in enumerate(indices):
            ax = axes[row, col]
            ax.imshow(canvases.images[k, 0].numpy(), cmap='gray', vmin=0, vmax=255)
            _draw_boxes(ax, canvases.boxes[k], canvases.labels[k], classes, 'lime', style='--')
            _draw_boxes(ax, preds[k]['boxes'], preds[k]['labels'], classes, 'orangered', preds[k]['scores'])
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_score_maps(canvas: Tensor, maps: dict[str, Tensor], classes: list[str], geometry: dict[str, Geometry],
                    title: str) -> Figure:
    """The canvas and each class's score map (softmax probability at each output position, drawn over
    the canvas, each cell centred on the crop it stands for), one row per track."""
    plt = pyplot()
    n = max(m.shape[0] for m in maps.values())
    names = classes + ['background']
    fig, axes = plt.subplots(len(maps), n + 1, figsize=(1.45 * (n + 1), 1.7 * len(maps)), squeeze=False)
    size = canvas.shape[-1]
    for row, (track, m) in enumerate(maps.items()):
        g = geometry[track]
        axes[row, 0].imshow(canvas[0].numpy(), cmap='gray', vmin=0, vmax=255)
        axes[row, 0].set_ylabel(track, fontsize=8)
        h, w = m.shape[-2:]
        half = g.window / 2 - g.stride / 2  # each cell drawn centred on its crop's centre
        extent = (half - 0.5, half + g.stride * w - 0.5, half + g.stride * h - 0.5, half - 0.5)
        for c in range(n):
            ax = axes[row, c + 1]
            if c < m.shape[0]:
                ax.imshow(canvas[0].numpy(), cmap='gray', vmin=0, vmax=255)
                ax.imshow(m[c].numpy(), cmap='magma', vmin=0, vmax=1, extent=extent, alpha=0.8)
                ax.set_xlim(-0.5, size - 0.5)
                ax.set_ylim(size - 0.5, -0.5)
                ax.set_title(names[c], fontsize=7)
            else:
                ax.axis('off')
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_pr(curves: dict[str, dict], title: str) -> Figure:
    """Precision-recall at IoU >= 0.5 of each track, its chosen (validation) threshold marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, c in curves.items():
        line, = ax.plot(c['recall'], c['precision'], label=name)
        ax.plot([c['at']['recall']], [c['at']['precision']], 'o', color=line.get_color(),
                label=f"threshold {c['threshold']:.2f}: P {c['at']['precision']:.3f} R {c['at']['recall']:.3f}")
    ax.set_xlabel('recall (IoU >= 0.5)')
    ax.set_ylabel('precision')
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower left')
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def figures(tracks: dict[str, dict], labels: dict[str, str], data: Data, test: Canvases,
            config: dict) -> dict[str, Figure]:
    """The run's three figures from its tracks ({name: {'metrics', 'preds', 'maps', 'geometry'}}),
    each track shown under labels[name]."""
    by_label = lambda key: {labels[n]: t[key] for n, t in tracks.items()}  # noqa: E731
    title = f"{data.name}: {len(test)} test-split canvases of {config['canvas_size']} px"
    shown = list(range(min(config['figure_canvases'], len(test))))
    curves = {labels[n]: {**t['metrics']['pr_curve'], 'threshold': t['metrics']['threshold'], 'at': t['metrics']}
              for n, t in tracks.items()}
    return {
        'detections': plot_detections(test, by_label('preds'), data.classes, f"{title}; green dashed = ground "
                                      f"truth, orange = detections above the val-chosen threshold", shown),
        'score_maps': plot_score_maps(test.images[0], by_label('maps'), data.classes, by_label('geometry'),
                                      f"softmax score maps of test canvas 0 (one cell per output position, "
                                      f"stride {tracks['background']['geometry'].stride} px)"),
        'pr_curve': plot_pr(curves, title),
    }


def log_tables(run: Run, results: dict) -> None:
    """The track and box-ablation tables of results.json as TensorBoard text and W&B tables: their
    numbers only (one-off results: never in the scalar history, which holds curves only)."""
    numbers = lambda m: {k: v for k, v in m.items() if isinstance(v, (int, float))}  # noqa: E731
    run.log_table('tracks', [{'track': name, **numbers(m)} for name, m in results['tracks'].items()])
    ablation = results['box_ablation']
    if ablation:
        run.log_table('box_ablation', [{'track': track, 'variant': variant, **m}
                                       for track, variants in ablation.items() for variant, m in variants.items()])


def print_results(results: dict, labels: dict[str, str]) -> None:
    """The track table, then the box ablation (if any); each track shown under labels[name]."""
    cols = [('map_50', 'mAP@0.5'), ('map', 'mAP@[.5:.95]'), ('mar_100', 'mAR@100'), ('precision', 'P'),
            ('recall', 'R'), ('f1', 'F1'), ('count_acc', 'count acc'), ('ms_per_canvas', 'ms/canvas'),
            ('threshold', 'threshold')]
    print(f"\n{results['dataset']}, {results['canvases']['test']['n']} test canvases")
    print(f"  {'track':<38}" + ''.join(f"{h:>13}" for _, h in cols))
    for name, m in results['tracks'].items():
        print(f"  {labels[name]:<38}" + ''.join(f"{m[k]:>13.4f}" if k != 'ms_per_canvas' else f"{m[k]:>13.1f}"
                                                for k, _ in cols))
    if results['box_ablation']:
        print("\nbox ablation (each variant thresholded on the val canvases)")
        cols = ('map_50', 'map', 'f1', 'count_acc')
        print(f"  {'track':<26}{'variant':<28}" + ''.join(f"{k:>11}" for k in cols))
        for track, variants in results['box_ablation'].items():
            for name, m in variants.items():
                print(f"  {labels[track][:24]:<26}{name:<28}" + ''.join(f"{m[k]:>11.4f}" for k in cols))
    print("\nwhy counts are wrong (detect_metrics; boxes at the output threshold)")
    for name, m in results['tracks'].items():
        e = m['errors']
        extra = ', '.join(f"{k} {v}" for k, v in sorted(e['detections'].items()) if k != 'correct')
        lost = ', '.join(f"{k} {v}" for k, v in sorted(e['objects_unmatched'].items()))
        print(f"  {labels[name]:<38} canvases {e['canvases']} | boxes not correct: {extra or 'none'} | "
              f"objects unmatched: {lost or 'none'}")
