"""Models of the lab. Each stores its constructor arguments in `self.args`, so a checkpoint
holding `model_class` and `model_args` rebuilds the model alone (see evaluate.load_model)."""
from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden width -> Linear classifier.

    `depth` means "number of hidden layers" here and in SkipMLP, so "depth d, width w"
    compares like with like.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.args = dict(in_features=in_features, hidden=list(hidden), num_classes=num_classes,
                         dropout=dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) or (B, F) -> (B, num_classes)
        return self.classifier(self.features(x))


class ResidualBlock(nn.Module):
    """x -> bridge(x) + branch(x); branch = [norm -> ReLU -> dropout -> Linear] per width.

    Pre-activation (He et al. 2016, "Identity mappings"): nothing follows the addition, so a
    branch whose last Linear is zero makes the block the identity (or the bridge). The
    bridge is a bias-free Linear, present exactly when the input and output widths differ.
    """

    def __init__(self, in_width: int, widths: list[int], dropout: float = 0.0, norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_width
        for w in widths:
            layers += [nn.LayerNorm(width)] if norm else []
            layers += [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(width, w)]
            width = w
        self.branch = nn.Sequential(*layers)
        self.bridge = nn.Linear(in_width, width, bias=False) if in_width != width else None

    def forward(self, x: Tensor) -> Tensor:  # (B, in_width) -> (B, widths[-1])
        return (x if self.bridge is None else self.bridge(x)) + self.branch(x)


class SkipMLP(nn.Module):
    """Flatten -> Linear input layer -> residual blocks over `hidden` -> [norm] ReLU -> classifier.

    `hidden` lists the widths of the hidden Linear layers inside the blocks, `block_size` per
    block (the last block takes what is left), so depth = len(hidden) as in MLP. The input
    layer (in_features -> hidden[0]) comes on top: SkipMLP(hidden=[w] * d) has d + 2 Linear
    layers, MLP(hidden=[w] * d) has d + 1 (one w x w layer fewer).
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, block_size: int = 2,
                 dropout: float = 0.0, norm: bool = False):
        super().__init__()
        self.args = dict(in_features=in_features, hidden=list(hidden), num_classes=num_classes,
                         block_size=block_size, dropout=dropout, norm=norm)
        self.input = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden[0]))
        blocks, width = [], hidden[0]
        for i in range(0, len(hidden), block_size):
            blocks.append(ResidualBlock(width, hidden[i:i + block_size], dropout, norm))
            width = hidden[i:i + block_size][-1]
        self.blocks = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.LayerNorm(width)] if norm else []
        self.head = nn.Sequential(*head, nn.ReLU(), *([nn.Dropout(dropout)] if dropout else []))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) or (B, F) -> (B, num_classes)
        return self.classifier(self.head(self.blocks(self.input(x))))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
