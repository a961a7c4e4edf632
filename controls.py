"""Exercise 2.1's controls: the same nets with another init, and how large the residual branches are.

  unscale_branches  undo the He init's down-scaling of every residual branch (SkipMLP's last Linear
                    per branch / sqrt(blocks), the residual CNN's last BatchNorm weight 1/sqrt(depth))
  orthogonal_init   the plain net with orthogonal weights (gain sqrt(2), for ReLU) instead of He's
  branch_ratios     ||branch(x)|| / ||x|| per residual block (Veit et al. 2016's small-branch argument)

They separate what the skip connection does from what the init's scaling does (docs/exercise_2_1.md).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from evaluate import pyplot
from models import CNN, ResidualBlock, SkipMLP

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@torch.no_grad()
def unscale_branches(model: nn.Module) -> nn.Module:
    """In place, on a freshly built init='he' SkipMLP or residual CNN: the same net without the branch
    down-scaling (models.SkipMLP / models.CNN), i.e. plain He init everywhere. The scaling is the last
    step of the init, after every random draw, so undoing it leaves the rest bit for bit; a model built
    with init='torch' has no scaling and is returned unchanged."""
    if model.args.get('init') != 'he':
        return model
    if isinstance(model, SkipMLP):
        for block in model.blocks:
            block.branch[-1].weight.mul_(math.sqrt(len(model.blocks)))
    elif isinstance(model, CNN) and model.args['variant'] == 'residual':
        for block in residual_blocks(model):
            block.bn2.weight.fill_(1.0)
    else:
        raise TypeError(f"{type(model).__name__} has no scaled residual branches; pass a SkipMLP or residual CNN")
    return model


@torch.no_grad()
def orthogonal_init(model: nn.Module) -> nn.Module:
    """In place: every Linear and Conv2d weight orthogonal (rows of the flattened weight), gain sqrt(2)
    as He's for ReLU, biases zero; norm layers untouched. Saxe et al. 2014's init for deep linear nets."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.orthogonal_(m.weight, gain=nn.init.calculate_gain('relu'))
            if m.bias is not None:
                m.bias.zero_()
    return model


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """SkipMLP's ResidualBlocks or the residual CNN's torchvision BasicBlocks, input -> output."""
    return [m for m in model.modules() if isinstance(m, ResidualBlock) or type(m).__name__ == 'BasicBlock']


def branch_of(block: nn.Module, x: Tensor) -> Tensor:
    """The block's residual branch on its input x (what the block adds to x, or to bridge(x))."""
    if isinstance(block, ResidualBlock):
        return block.branch(x)
    return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))  # BasicBlock without its sum


@torch.no_grad()
def branch_ratios(model: nn.Module, x: Tensor) -> list[float]:
    """Per residual block, input -> output: the mean over the batch x (model input) of
    ||branch(x_b)|| / ||x_b||, x_b each sample's input to the block (eval mode). Veit et al. read
    small ratios as "each block nudges the stream", which is what makes a lesion cheap."""
    blocks = residual_blocks(model)
    ratios: dict[nn.Module, float] = {}

    def measure(block: nn.Module, inputs: tuple, output: Tensor) -> None:
        xb = inputs[0]
        ratio = branch_of(block, xb).flatten(1).norm(dim=1) / xb.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
        ratios[block] = ratio.mean().item()

    was_training = model.training
    model.eval()
    handles = [b.register_forward_hook(measure) for b in blocks]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [ratios[b] for b in blocks]


def plot_controls(record: dict, title: str) -> Figure:
    """record: {'grads': {variant: {depth: [||dL/dW|| * ||W|| per layer]}}, 'shattering': {variant: {depth:
    shattering()}}}, all at init. Left: the gradient profile at the deepest depth, every variant on one
    axis. Right: lag-1 autocorrelation of the input gradient by depth."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    deep = max(int(d) for by_depth in record['grads'].values() for d in by_depth)
    for variant, style in VARIANT_STYLES.items():
        norms = record['grads'].get(variant, {}).get(str(deep))
        if norms is not None:
            left.plot(range(len(norms)), [max(v, 1e-30) for v in norms], style, label=variant)
        by_depth = record['shattering'].get(variant, {})
        depths = sorted(int(d) for d in by_depth)
        right.plot(depths, [by_depth[str(d)]['lag1'] for d in depths], style, marker='o', label=variant)
    left.set_yscale('log')
    left.set_xlabel('layer index (input -> classifier)')
    left.set_ylabel(f'||dL/dW|| * ||W||, depth {deep}, init')
    right.set_xscale('log', base=2)
    right.set_xlabel('depth')
    right.set_ylabel('lag-1 autocorrelation, init')
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'init controls ({title}): skip vs branch scaling vs init')
    fig.tight_layout()
    return fig


# every variant of the controls record: the two cells' own inits and the two controls
VARIANT_STYLES = {'plain': 'C0--', 'plain_orthogonal': 'C2--', 'residual': 'C1-', 'residual_unscaled': 'C3-'}
