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


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
