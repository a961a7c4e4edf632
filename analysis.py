"""Exercise 2.1's analyses of one plain or residual net (models.MLP / SkipMLP / CNN):

  lesion      delete blocks at test time and measure accuracy (Veit, Wilber and Belongie,
              NeurIPS 2016, "Residual networks behave like ensembles of relatively shallow networks")
  landscape   the training loss along random filter-normalised directions around the weights
              (Li, Xu, Taylor, Studer and Goldstein, NeurIPS 2018, "Visualizing the loss landscape")
  shattering  the input gradient along a line of inputs and its autocorrelation (Balduzzi et al.,
              ICML 2017, "The shattered gradients problem")

The gradient norms per layer are study.grad_norms. Every function takes the model and a
dataset.Split and evaluates in eval mode; exercise_2_1.py picks the cells and draws the figures.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from dataset import Split
from evaluate import evaluate
from models import CNN, MLP, SkipMLP


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


def lesion_study(model: nn.Module, split: Split, draws: int, generator: torch.Generator) -> dict:
    """{'intact': acc, 'one_block': [acc with block i deleted], 'k_blocks': {k: mean acc over `draws`
    random sets of k deleted blocks}} for k = 1 (the mean of one_block), 2, 4, ... and all blocks."""
    def acc() -> float:
        return evaluate(model, split)['acc']

    units = lesion_units(model)
    intact = acc()
    one_block = []
    for unit in units:
        with deleted([unit]):
            one_block.append(acc())
    k_blocks = {'1': sum(one_block) / len(one_block)} if units else {}
    ks = [2 ** i for i in range(1, len(units).bit_length()) if 2 ** i < len(units)] + [len(units)] * (len(units) > 1)
    for k in ks:
        accs = []
        for _ in range(draws if k < len(units) else 1):  # all blocks: one way to pick them
            pick = torch.randperm(len(units), generator=generator)[:k].tolist()
            with deleted([units[i] for i in pick]):
                accs.append(acc())
        k_blocks[str(k)] = sum(accs) / len(accs)
    return {'intact': intact, 'one_block': one_block, 'k_blocks': k_blocks, 'blocks': len(units),
            'samples': len(split)}


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

@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of batch x (a fresh model's are 0 and 1,
    which would make eval mode meaningless at initialisation)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    model(x)
    for m in norms:
        m.momentum = 0.1
    model.train(was_training)


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
    'example': g(t) of the first line, divided by its largest |g|."""
    model.eval()
    x = split.normalize(split.x[:2 * lines])
    rhos, example = [], None
    for i in range(lines):
        g = line_gradient(model, x[2 * i], x[2 * i + 1], int(split.y[2 * i]), points)
        rhos.append(autocorrelation(g, max_lag))
        if example is None:
            example = (g / g.abs().max().clamp_min(1e-30)).tolist()
    mean = [sum(r[k] for r in rhos) / len(rhos) for k in range(max_lag + 1)]
    return {'lag1': mean[1], 'autocorr': mean, 'example': example, 'lines': lines, 'points': points}
