"""Exercise 2.1's analyses of one plain or residual net (models.MLP / SkipMLP / CNN):

  lesion      delete blocks at test time and measure accuracy (Veit, Wilber and Belongie,
              NeurIPS 2016, "Residual networks behave like ensembles of relatively shallow networks"),
              optionally with BatchNorm statistics re-estimated after each lesion (recalibrated)
  landscape   the training loss along random filter-normalised directions around the weights
              (Li, Xu, Taylor, Studer and Goldstein, NeurIPS 2018, "Visualizing the loss landscape")
  shattering  the input gradient along a line of inputs and its autocorrelation (Balduzzi et al.,
              ICML 2017, "The shattered gradients problem")

The gradient norms per layer are study.grad_norms (plot_grad_profiles draws them); the init
controls are controls.py. Every analysis takes the model and a dataset.Split and evaluates in eval
mode; the plot_* functions draw their records (one figure per analysis); exercise_2_1.py picks the cells.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor, nn

from dataset import Split
from evaluate import evaluate, pyplot
from models import CNN, MLP, SkipMLP

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def head(split: Split, n: int) -> Split:
    """The first n samples of split (all if n is 0), unaugmented."""
    n = n or len(split)
    return dataclasses.replace(split, x=split.x[:n], y=split.y[:n], augment=None)


# ---------------------------------------------------------------------------------------------
# Lesion study

def lesion_units(model: nn.Module) -> list[list[nn.Module]]:
    """The blocks a lesion deletes, input -> output, each as the modules whose output is replaced by
    their input (deleted() below). Residual: each block's branch (the identity or bridge stays).
    Plain MLP: the width x width hidden layers in pairs, grouped from the classifier end, the two
    Linear layers a SkipMLP block holds (depth d: d/2 units for even d, as SkipMLP's blocks);
    the first hidden layer changes the width and stays. Plain CNN: each 2-conv block.
    Deleting a plain unit makes it the identity exactly: its input comes out of a ReLU, so the
    ReLU after the deleted Linear (or after a residual CNN block's sum) changes nothing."""
    if isinstance(model, SkipMLP):
        return [[block] for block in model.blocks]
    if isinstance(model, MLP):
        hidden = [m for m in model.features if isinstance(m, nn.Linear)][1:]
        return [hidden[max(i - 2, 0):i] for i in range(len(hidden), 0, -2)][::-1]
    if isinstance(model, CNN):
        units = []
        for stage in model.features:
            children = list(stage)
            pool = max(i for i, m in enumerate(children) if isinstance(m, nn.MaxPool2d))
            units += [[block] for block in children[pool + 1:]]
        return units
    raise TypeError(f"no lesion units defined for {type(model).__name__}")


def _skip(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    bridge = getattr(module, 'bridge', None)  # a ResidualBlock that changes the width keeps its bridge
    return inputs[0] if bridge is None else bridge(inputs[0])


@contextmanager
def deleted(units: list[list[nn.Module]]) -> Iterator[None]:
    """Within the block, every module of `units` passes its input through (forward hooks)."""
    handles = [m.register_forward_hook(_skip) for unit in units for m in unit]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lesion_study(model: nn.Module, split: Split, draws: int, generator: torch.Generator,
                 calibration: Tensor | None = None) -> dict:
    """{'intact': acc, 'one_block': [acc with block i deleted], 'k_blocks': {k: mean acc over `draws`
    random sets of k deleted blocks}} for k = 1 (the mean of one_block), 2, 4, ... and all blocks.
    calibration (a normalised input batch), for a model with BatchNorm: also 'recalibrated', the same
    three with the running statistics re-estimated on it after each lesion (recalibrated())."""
    def acc(units_deleted: list[list[nn.Module]]) -> tuple[float, float]:  # (as trained, recalibrated)
        with deleted(units_deleted):
            raw = evaluate(model, split)['acc']
            if calibration is None:
                return raw, raw
            with recalibrated(model, calibration):
                return raw, evaluate(model, split)['acc']

    units = lesion_units(model)
    intact = acc([])
    one_block = [acc([unit]) for unit in units]
    k_blocks = {'1': [sum(a[i] for a in one_block) / len(one_block) for i in (0, 1)]} if units else {}
    ks = [2 ** i for i in range(1, len(units).bit_length()) if 2 ** i < len(units)] + [len(units)] * (len(units) > 1)
    for k in ks:
        accs = []
        for _ in range(draws if k < len(units) else 1):  # all blocks: one way to pick them
            pick = torch.randperm(len(units), generator=generator)[:k].tolist()
            accs.append(acc([units[i] for i in pick]))
        k_blocks[str(k)] = [sum(a[i] for a in accs) / len(accs) for i in (0, 1)]

    def column(i: int) -> dict:
        return {'intact': intact[i], 'one_block': [a[i] for a in one_block],
                'k_blocks': {k: a[i] for k, a in k_blocks.items()}}
    record = {**column(0), 'blocks': len(units), 'samples': len(split)}
    if calibration is not None:
        record['recalibrated'] = {**column(1), 'calibration_samples': len(calibration)}
    return record


# ---------------------------------------------------------------------------------------------
# Loss landscape

def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction in weight space, one tensor per parameter, with every filter (a row of a
    Linear, an output channel of a conv) rescaled to the norm of the same filter of the model, so a
    step of 1 moves each filter by its own size whatever its scale (Li et al. 2018, sec. 4).
    Biases and BatchNorm / LayerNorm parameters (1-D) get zeros, as the paper's `ignore='biasbn'`."""
    direction = []
    for p in model.parameters():
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator).to(p.device)
        scale = p.detach().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12)  # (filters,)
        direction.append(d * scale.view(-1, *[1] * (p.dim() - 1)))
    return direction


@torch.no_grad()
def loss_at(model: nn.Module, base: list[Tensor], directions: list[list[Tensor]], coeffs: list[float],
            split: Split) -> float:
    """Eval-mode cross-entropy on split with weights base + sum_i coeffs[i] * directions[i]."""
    for j, p in enumerate(model.parameters()):
        p.copy_(base[j] + sum(c * d[j] for c, d in zip(coeffs, directions)))
    return evaluate(model, split)['loss']


def landscape(model: nn.Module, split: Split, directions: int, points: int, grid: int,
              generator: torch.Generator, radius: float = 1.0) -> dict:
    """1-D slices along `directions` random filter-normalised directions (`points` steps in
    [-radius, radius]) and one 2-D slice (grid x grid) along two more. 'rise': the mean loss
    increase over both signs and all 1-D directions at each step size (keys '0_5' for 0.5: no dots,
    so a record's key path stays dot-separated); the model is restored."""
    base = [p.detach().clone() for p in model.parameters()]
    alphas = torch.linspace(-radius, radius, points).tolist()
    try:
        loss0 = loss_at(model, base, [], [], split)
        curves = []
        for _ in range(directions):
            d = filter_normalized_direction(model, generator)
            curves.append([loss_at(model, base, [d], [a], split) for a in alphas])
        d1, d2 = filter_normalized_direction(model, generator), filter_normalized_direction(model, generator)
        axis = torch.linspace(-radius, radius, grid).tolist()
        surface = [[loss_at(model, base, [d1, d2], [a, b], split) for a in axis] for b in axis]  # rows: d2
    finally:
        _restore(model, base)
    rise = {f'{a:g}'.replace('.', '_'): sum(c[i] + c[-1 - i] for c in curves) / (2 * len(curves)) - loss0
            for i, a in enumerate(alphas) if a > 0}  # c[-1 - i]: the step -a; key '0_5' = step 0.5
    return {'loss0': loss0, 'alphas': alphas, 'curves': curves, 'rise': rise, 'axis': axis, 'surface': surface,
            'samples': len(split)}


@torch.no_grad()
def _restore(model: nn.Module, base: list[Tensor]) -> None:
    for p, b in zip(model.parameters(), base):
        p.copy_(b)


# ---------------------------------------------------------------------------------------------
# Shattered gradients

def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of batch x (a fresh model's are 0 and 1,
    which would make eval mode meaningless at initialisation); parameters are not touched."""
    norms = batchnorms(model)
    if not norms:
        return
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


@contextmanager
def recalibrated(model: nn.Module, x: Tensor) -> Iterator[None]:
    """Within the block, every BatchNorm's running statistics are batch x's, through the model as it
    is then (lesion hooks included); on exit the previous statistics come back."""
    norms = batchnorms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    calibrate_batchnorm(model, x)
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def line_gradient(model: nn.Module, x0: Tensor, x1: Tensor, cls: int, points: int) -> Tensor:
    """g(t) = d f(x(t)) / dt on x(t) = x0 + t (x1 - x0), t in [0, 1] at `points` steps, f the
    logit of class `cls`: the 1-D input gradient of Balduzzi et al. for a high-dimensional input
    (the input gradient projected on the line). x0, x1: (C, H, W) normalised inputs."""
    t = torch.linspace(0, 1, points, device=x0.device).view(-1, 1, 1, 1)
    x = (x0 + t * (x1 - x0)).requires_grad_(True)  # (points, C, H, W)
    (g,) = torch.autograd.grad(model(x)[:, cls].sum(), x)
    return (g * (x1 - x0)).flatten(1).sum(1)  # (points,)


def autocorrelation(g: Tensor, max_lag: int) -> list[float]:
    """rho(k) = sum_t (g_t - mean)(g_t+k - mean) / sum_t (g_t - mean)^2 for k = 0 .. max_lag:
    about 0 for k >= 1 in white noise, close to 1 for small k in brown noise (a random walk)."""
    g = g - g.mean()
    var = (g * g).sum().clamp_min(1e-30)
    return [((g[:len(g) - k] * g[k:]).sum() / var).item() for k in range(max_lag + 1)]


def shattering(model: nn.Module, split: Split, lines: int, points: int, max_lag: int) -> dict:
    """Gradients along `lines` lines between consecutive images of split (image 2i to 2i + 1, the
    logit of image 2i's class), in eval mode. 'lag1': mean rho(1); 'autocorr': mean rho(k);
    'lag1_lines': rho(1) of each line; 'example': g(t) of the first line, divided by its largest |g|."""
    model.eval()
    x = split.normalize(split.x[:2 * lines])
    rhos, example = [], None
    for i in range(lines):
        g = line_gradient(model, x[2 * i], x[2 * i + 1], int(split.y[2 * i]), points)
        rhos.append(autocorrelation(g, max_lag))
        if example is None:
            example = (g / g.abs().max().clamp_min(1e-30)).tolist()
    mean = [sum(r[k] for r in rhos) / len(rhos) for k in range(max_lag + 1)]
    return {'lag1': mean[1], 'lag1_lines': [r[1] for r in rhos], 'autocorr': mean, 'example': example,
            'lines': lines, 'points': points}


# ---------------------------------------------------------------------------------------------
# Figures: solid residual, dashed plain

def plot_lesion(lesion: dict, title: str) -> Figure:
    """Left: accuracy with one block deleted, by block position. Right: mean accuracy with k random
    blocks deleted. Solid residual, dashed plain, one colour per depth."""
    plt = pyplot()
    depths = sorted({int(d) for by_depth in lesion.values() for d in by_depth})
    colors = dict(zip(depths, plt.cm.viridis([i / max(len(depths) - 1, 1) for i in range(len(depths))])))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, style in (('plain', '--'), ('residual', '-')):
        for d, r in lesion.get(m, {}).items():
            n = len(r['one_block'])
            left.plot([(i + 0.5) / max(n, 1) for i in range(n)], [100 * a for a in r['one_block']], style,
                      marker='.', color=colors[int(d)], label=f'{m} {d}')
            ks = [int(k) for k in r['k_blocks']]
            right.plot(ks, [100 * a for a in r['k_blocks'].values()], style, marker='o', color=colors[int(d)],
                       label=f'{m} {d}')
            if 'recalibrated' in r:  # BatchNorm statistics re-estimated after each lesion
                right.plot(ks, [100 * a for a in r['recalibrated']['k_blocks'].values()], ':', marker='x',
                           color=colors[int(d)], label=f'{m} {d}, BN re-estimated')
    left.set_xlabel('position of the deleted block (0 = input, 1 = output)')
    left.set_ylabel('test accuracy (%)')
    left.set_title('one block deleted')
    right.set_xscale('log', base=2)
    right.set_xlabel('blocks deleted (k, random)')
    right.set_title('k random blocks deleted (mean)')
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle(f'lesion study ({title}); solid residual, dashed plain, dotted: BatchNorm re-estimated')
    fig.tight_layout()
    return fig


def landscape_panels(land: dict) -> list[tuple[str, str, str, dict]]:
    """(stage, model, depth, record) for each slice of an analyse_landscape record: the trained
    weights' slices at land[model][depth], the initial weights' (if any) at land['init'][model][depth]."""
    stages = [('trained', {m: v for m, v in land.items() if m != 'init'})]
    stages += [('init', land['init'])] if 'init' in land else []
    return [(stage, m, d, r) for stage, by_model in stages for m, by_depth in by_model.items()
            for d, r in sorted(by_depth.items(), key=lambda item: int(item[0]))]


def plot_landscape_1d(land: dict, title: str) -> Figure:
    """Training loss along each 1-D direction: one panel per (stage, depth), trained weights on top,
    initial weights below, plain and residual together, one y scale for all panels."""
    plt = pyplot()
    panels = landscape_panels(land)
    stages = list(dict.fromkeys(p[0] for p in panels))
    depths = sorted({int(p[2]) for p in panels})
    fig, axes = plt.subplots(len(stages), len(depths), figsize=(4.5 * len(depths), 3.5 * len(stages)),
                             squeeze=False, sharey=True)
    colors = {'plain': 'C0', 'residual': 'C1'}
    for stage, m, d, r in panels:
        ax = axes[stages.index(stage)][depths.index(int(d))]
        for i, curve in enumerate(r['curves']):
            ax.plot(r['alphas'], curve, color=colors.get(m, 'C2'), alpha=0.8, label=m if i == 0 else None)
        ax.set_yscale('log')
        ax.set_title(f'depth {d}, {stage} weights')
        ax.set_xlabel('step along a filter-normalised direction')
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel('training loss')
        row[0].legend()
    fig.suptitle(f'1-D loss slices ({title}); one y scale for all panels')
    fig.tight_layout()
    return fig


def plot_landscape_2d(land: dict, title: str, surface: bool = False) -> Figure:
    """The 2-D slice of each (stage, model, depth), rows plain / residual (trained, then init):
    contour lines of the loss on ONE log scale for every panel (13 levels from the lowest loss of any
    panel to 10^4 x it), or a 3-D surface of log10 loss with one z range."""
    import numpy as np
    from matplotlib.colors import LogNorm
    plt = pyplot()
    panels = landscape_panels(land)
    rows = list(dict.fromkeys((p[0], p[1]) for p in panels))
    depths = sorted({int(p[2]) for p in panels})
    surfaces = [np.array(p[3]['surface']) for p in panels]
    low = max(min(z.min() for z in surfaces), 1e-3)  # plain nets reach 10^20: cap the scale at 10^4 x the lowest
    high = max(min(max(z.max() for z in surfaces), 1e4 * low), 1.01 * low)
    levels = np.geomspace(low, high, 13)
    fig = plt.figure(figsize=(4.2 * len(depths), 3.8 * len(rows)))
    for (stage, m, d, r), Z in zip(panels, surfaces):
        a = np.array(r['axis'])
        X, Y = np.meshgrid(a, a)
        index = rows.index((stage, m)) * len(depths) + depths.index(int(d)) + 1
        if surface:
            ax = fig.add_subplot(len(rows), len(depths), index, projection='3d')
            ax.plot_surface(X, Y, np.log10(np.clip(Z, low, high)), cmap='viridis', linewidth=0,
                            vmin=np.log10(low), vmax=np.log10(high))
            ax.set_zlim(np.log10(low), np.log10(high))
            ax.set_zlabel('log10 loss')
        else:
            ax = fig.add_subplot(len(rows), len(depths), index)
            cs = ax.contour(X, Y, Z, levels=levels, cmap='viridis', norm=LogNorm(low, high))
            ax.clabel(cs, fontsize=6, fmt='%.2g')
            ax.plot(0, 0, 'k+')
            ax.set_aspect('equal')
        ax.set_title(f'{m}, depth {d}, {stage}')
    scale = f'one scale for all panels: {low:.2g} to {high:.2g}'
    fig.suptitle(f"2-D loss slices ({title}); {'z = log10 loss, clipped to ' if surface else 'contours on '}{scale}")
    fig.tight_layout()
    return fig


def plot_grad_profiles(records: list[dict], title: str) -> Figure:
    """||dL/dW|| * ||W|| (study.grad_norms' scale_free) by layer index: one panel per (stage, depth),
    plain (dashed) and residual (solid) on the same axis, one log y scale for every panel."""
    plt = pyplot()
    stages = list(dict.fromkeys(r['stage'] for r in records))
    depths = sorted({r['depth'] for r in records})
    fig, axes = plt.subplots(len(stages), len(depths), figsize=(2.8 * len(depths), 3 * len(stages)),
                             squeeze=False, sharey=True)
    for r in records:
        ax = axes[stages.index(r['stage'])][depths.index(r['depth'])]
        values = [max(n['scale_free'], 1e-30) for n in r['norms']]  # log axis: exact zeros at the floor
        style = {'plain': 'C0--', 'residual': 'C1-'}.get(r['model'], 'C2:')
        ax.plot(range(len(values)), values, style, label=r['model'])
        ax.set_yscale('log')
        ax.set_title(f"depth {r['depth']}, {r['stage']}", fontsize=9)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel('||dL/dW|| * ||W||')
    for ax in axes[-1]:
        ax.set_xlabel('layer (input -> classifier)')
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f'{title}; one y scale for every panel')
    fig.tight_layout()
    return fig


def plot_shattering(shatter: dict, title: str) -> Figure:
    """Top: g(t) on the first line at the deepest depth (normalised), init and trained. Bottom left:
    lag-1 autocorrelation by depth; bottom right: rho(k) at the deepest depth."""
    plt = pyplot()
    depths = sorted({int(d) for by_model in shatter.values() for by_depth in by_model.values() for d in by_depth})
    deep = str(depths[-1])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for ax, stage in zip(axes[0], ('init', 'trained')):
        for m, color in (('plain', 'C0'), ('residual', 'C1')):
            g = shatter[stage][m][deep]['example']
            ax.plot([t / max(len(g) - 1, 1) for t in range(len(g))], g, color=color, lw=0.8, label=m)
        ax.set_title(f'd logit / dt along one line, depth {deep}, {stage}')
        ax.set_xlabel('t (image a -> image b)')
        ax.legend(fontsize=7)
    for stage, style in (('init', '--'), ('trained', '-')):
        for m, color in (('plain', 'C0'), ('residual', 'C1')):
            by_depth = shatter[stage][m]
            axes[1][0].plot(depths, [by_depth[str(d)]['lag1'] for d in depths], style, marker='o', color=color,
                            label=f'{m}, {stage}')
            rho = by_depth[deep]['autocorr']
            axes[1][1].plot(range(len(rho)), rho, style, color=color, label=f'{m}, {stage}')
    axes[1][0].set_xscale('log', base=2)
    axes[1][0].set_xlabel('depth')
    axes[1][0].set_ylabel('lag-1 autocorrelation')
    axes[1][1].set_xlabel('lag (steps along the line)')
    axes[1][1].set_ylabel(f'autocorrelation, depth {deep}')
    for ax in axes[1]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'shattered gradients ({title}); 1 = brown noise, 0 = white noise')
    fig.tight_layout()
    return fig
