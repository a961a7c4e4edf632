"""Models of the lab. Each stores its constructor arguments in `self.args`, so a checkpoint
holding `model_class` and `model_args` rebuilds the model alone (see evaluate.load_model)."""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from config import UserError

INITS = ('torch', 'he')  # the `init` argument of every model below


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal init, std sqrt(2 / fan_in), for every Linear and Conv2d below `module`,
    zero biases; BatchNorm / LayerNorm at weight 1, bias 0. He keeps the second moment of a
    ReLU net's activations constant with depth (He et al. 2015); PyTorch's default (kaiming
    uniform with a = sqrt(5), i.e. std 1/sqrt(3 fan_in)) shrinks it by 6x per layer."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] per hidden width -> Linear classifier.

    `depth` means "number of hidden layers" here and in SkipMLP, so "depth d, width w"
    compares like with like.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0,
                 init: str = 'torch'):
        super().__init__()
        check_init(init)
        self.args = dict(in_features=in_features, hidden=list(hidden), num_classes=num_classes,
                         dropout=dropout, init=init)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        if init == 'he':
            he_init(self)

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

    init='he': He init everywhere (he_init), and the last Linear of every branch scaled down by
    1/sqrt(number of blocks). A He-initialised branch adds about as much variance as its input
    has, so unscaled the residual stream would double its variance per block (2^32 at 64
    layers); scaled, it grows by at most (1 + 1/n)^n < e over the whole net, and every block
    starts close to the identity while its branch still gets gradients (a zero last layer
    would block them to the branch's earlier layers at the first step).
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, block_size: int = 2,
                 dropout: float = 0.0, norm: bool = False, init: str = 'torch'):
        super().__init__()
        check_init(init)
        self.args = dict(in_features=in_features, hidden=list(hidden), num_classes=num_classes,
                         block_size=block_size, dropout=dropout, norm=norm, init=init)
        self.input = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden[0]))
        blocks, width = [], hidden[0]
        for i in range(0, len(hidden), block_size):
            blocks.append(ResidualBlock(width, hidden[i:i + block_size], dropout, norm))
            width = hidden[i:i + block_size][-1]
        self.blocks = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.LayerNorm(width)] if norm else []
        self.head = nn.Sequential(*head, nn.ReLU(), *([nn.Dropout(dropout)] if dropout else []))
        self.classifier = nn.Linear(width, num_classes)
        if init == 'he':
            he_init(self)
            for block in self.blocks:  # small last layer per branch: see the class docstring
                block.branch[-1].weight.data /= math.sqrt(len(self.blocks))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) or (B, F) -> (B, num_classes)
        return self.classifier(self.head(self.blocks(self.input(x))))


class CNN(nn.Module):
    """A fully convolutional classifier; `variant` 'plain' or 'residual', same layers otherwise.

    Each stage is the reference repo's stage, conv -> BatchNorm -> ReLU -> [Dropout] -> MaxPool(2),
    which sets the stage's width and halves the resolution, followed by `depth` blocks of two
    3x3 convs at that width:
      plain:    conv-BN-ReLU-conv-BN-ReLU
      residual: torchvision's BasicBlock, conv-BN-ReLU-conv-BN, + identity, ReLU
    Shapes never change inside a block (the stage conv already did), so BasicBlock needs no
    downsample and both variants have exactly the same parameters: only the shortcut differs.
    depth=0 is the reference network itself; conv layers = len(widths) * (1 + 2 * depth).
    init='he': He init for every conv and Linear (he_init); in residual blocks the last
    BatchNorm's weight starts at 1/sqrt(depth), the scaling SkipMLP gives its branches'
    last layer (BatchNorm makes the conv's own scale irrelevant). 'torch': PyTorch's default.

    window_cells=[b, n] (exercise 2.2's fine-tune in context): the pooling averages only the n x n
    final cells from cell b on each axis, so the net classifies the window its input's margin
    surrounds (b cells = 8b px at output stride 8) while seeing the pixels around it, as the fully
    convolutional net on a canvas does; None pools every cell (the plain classifier).

    Head: global average pooling, then one Linear. For CAM (exercise 2.3):
      model.features    nn.Sequential of all stages; its output is the final maps A, (B, K, h, w)
      model.classifier  the nn.Linear(K, num_classes) applied after global average pooling
    """

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], depth: int = 1,
                 variant: str = 'residual', kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 dropout: float = 0.0, init: str = 'torch', window_cells: list[int] | None = None):
        super().__init__()
        if variant not in ('plain', 'residual'):
            raise ValueError(f"variant must be 'plain' or 'residual', got {variant!r}")
        check_init(init)
        self.args = dict(in_channels=in_channels, num_classes=num_classes, widths=list(widths), depth=depth,
                         variant=variant, kernel_size=kernel_size, stride=stride, padding=padding,
                         dropout=dropout, init=init)
        self.window_cells = list(window_cells) if window_cells else None
        if self.window_cells:  # only then in args: checkpoints of plain classifiers keep their args
            self.args['window_cells'] = self.window_cells
        from torchvision.models.resnet import BasicBlock  # lazy: torchvision is slow to import

        def conv_bn_relu(c_in: int, c_out: int, k: int = 3, s: int = 1, p: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        stages: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers = conv_bn_relu(c, w, kernel_size, stride, padding)
            if dropout:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers.append(BasicBlock(w, w) if variant == 'residual'
                              else nn.Sequential(*conv_bn_relu(w, w), *conv_bn_relu(w, w)))
            stages.append(nn.Sequential(*layers))
            c = w
        self.features = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)
        if init == 'he':
            he_init(self)
            for block in self.modules():  # as SkipMLP: each stage's branches add < e x its variance
                if isinstance(block, BasicBlock):
                    block.bn2.weight.data.fill_(1 / math.sqrt(depth))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        a = self.features(x)  # (B, K, h, w): the maps CAM weighs with classifier.weight
        if self.window_cells:
            b, n = self.window_cells
            a = a[..., b:b + n, b:b + n]
        return self.classifier(self.pool(a))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# torchvision's ImageNet ResNet-18, as exercise 2.3 explains it on Imagenette

# Imagenette's ten wnids (sorted, = its labels) as ImageNet-1k class indices: tench, English
# springer, cassette player, chain saw, church, French horn, garbage truck, gas pump, golf ball,
# parachute.
IMAGENETTE_TO_IMAGENET = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # what these weights expect


def build_resnet18(weights: str) -> nn.Module:
    """torchvision's ResNet-18: 'imagenet' weights (downloaded once to $TORCH_HOME) or 'random' init."""
    from torchvision.models import ResNet18_Weights, resnet18  # lazy: torchvision is slow to import
    if weights == 'random':
        return resnet18(weights=None)
    w = ResNet18_Weights.IMAGENET1K_V1
    try:
        return resnet18(weights=w)
    except Exception as e:  # noqa: BLE001 - offline, proxy, hash mismatch: one clear line
        folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise UserError(f"could not download the ResNet-18 ImageNet weights {w.url} into {folder} "
                        f"({type(e).__name__}); put {os.path.basename(w.url)} there by hand") from None


def restrict_head(model: nn.Module, rows: list[int]) -> nn.Module:
    """Replace model.fc by the same Linear keeping only `rows`: new model(x) == old model(x)[:, rows]."""
    fc = model.fc
    head = nn.Linear(fc.in_features, len(rows)).to(fc.weight)
    with torch.no_grad():
        head.weight.copy_(fc.weight[rows])
        head.bias.copy_(fc.bias[rows])
    model.fc = head
    return model
