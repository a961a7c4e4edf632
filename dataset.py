"""Datasets held whole on the training device.

Every small dataset is read once into a uint8 tensor (N, C, H, W) on the device. Batches are
slices of an index permutation; conversion to float, augmentation and normalisation run on
whole batches on the device. There is no per-sample PIL / DataLoader path: for data this
small that path, not the model, is what limits training speed.

On-disk layout is torchvision's, so an existing torchvision download is reused:
  <data_dir>/MNIST/raw/*-idx?-ubyte[.gz]   <data_dir>/FashionMNIST/raw/...
Missing files are downloaded with torchvision's utilities, which verify MD5 checksums.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from config import UserError

SPLIT_SEED = 0  # the train/val split is fixed, whatever the run's seed, so runs compare on one val set


# ---------------------------------------------------------------------------------------------
# Containers

@dataclass
class Split:
    """One split on the device: uint8 images plus what turns them into model input."""
    x: Tensor                      # (N, C, H, W) uint8
    y: Tensor                      # (N,) int64
    mean: Tensor                   # (1, C, 1, 1) float, in [0, 1] pixel units
    std: Tensor                    # (1, C, 1, 1)
    augment: Callable[[Tensor], Tensor] | None = None  # uint8 batch -> uint8 batch (train only)

    def __len__(self) -> int:
        return len(self.y)

    def normalize(self, x: Tensor) -> Tensor:
        return (x.float() / 255 - self.mean) / self.std

    def batches(self, batch_size: int, order: Tensor | None = None,
                start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) batches in `order` (default: as stored), from batch index `start` on."""
        n = len(self)
        for i in range(start * batch_size, n, batch_size):
            idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x)
            yield self.normalize(x), self.y[idx]


@dataclass
class Data:
    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # (C, H, W)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------
# MNIST-format (IDX) files

MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                   'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array; the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find(raw_dir: str, stem: str) -> str | None:
    for name in (stem, stem + '.gz'):
        if os.path.exists(os.path.join(raw_dir, name)):
            return os.path.join(raw_dir, name)
    return None


def _download(dataset_cls, raw_dir: str, missing: list[str]) -> None:
    """torchvision's download with MD5 check, trying each mirror; a clear error when offline."""
    from torchvision.datasets.utils import download_url
    md5 = dict(dataset_cls.resources)
    for stem in missing:
        for mirror in dataset_cls.mirrors:
            try:
                download_url(mirror + stem + '.gz', raw_dir, stem + '.gz', md5[stem + '.gz'])
                break
            except Exception as e:  # noqa: BLE001 - any failure means: try the next mirror
                error = e
        else:
            raise UserError(
                f"could not download {', '.join(m + '.gz' for m in missing)} into {raw_dir} "
                f"({type(error).__name__}); copy the files there by hand or go online")


def load_idx_dataset(name: str, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images (N, 28, 28), labels (N,)), 'test': ...} for mnist or fashion_mnist."""
    from torchvision.datasets import MNIST, FashionMNIST
    dataset_cls = {'mnist': MNIST, 'fashion_mnist': FashionMNIST}[name]
    raw_dir = os.path.join(data_dir, dataset_cls.__name__, 'raw')
    stems = [s for pair in IDX_FILES.values() for s in pair]
    missing = [s for s in stems if _find(raw_dir, s) is None]
    if missing:
        print(f"{name}: {len(missing)} file(s) missing in {raw_dir}, downloading")
        _download(dataset_cls, raw_dir, missing)
    out = {}
    for split, (images, labels) in IDX_FILES.items():
        x, y = read_idx(_find(raw_dir, images)), read_idx(_find(raw_dir, labels))
        if len(x) != len(y):
            raise UserError(f"{raw_dir}: {len(x)} {split} images but {len(y)} labels")
        out[split] = (x, y)
    return out


def load_digits_dataset() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    y = d.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = len(y) // 5
    return {'train': (x[order[n_test:]], y[order[n_test:]]),
            'test': (x[order[:n_test]], y[order[:n_test]])}


# ---------------------------------------------------------------------------------------------
# Assembling the splits

def _stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, from training images (N, C, H, W)."""
    f = x.astype(np.float64) / 255
    return f.mean(axis=(0, 2, 3)).tolist(), f.std(axis=(0, 2, 3)).tolist()


def load_data(config: dict, device: torch.device | str) -> Data:
    """The train / val / test splits of config['dataset'] on `device`.

    val is a fixed random `val_split` fraction of the official training set (SPLIT_SEED), so
    model selection never sees the test split. `subset` caps every split (smoke runs).
    """
    name = config['dataset']
    if name in ('mnist', 'fashion_mnist'):
        arrays = load_idx_dataset(name, config['data_dir'])
        classes = MNIST_CLASSES if name == 'mnist' else FASHION_CLASSES
    elif name == 'digits':
        arrays, classes = load_digits_dataset(), MNIST_CLASSES
    else:
        raise UserError(f"unknown dataset {name!r}; choose mnist, fashion_mnist, digits or cifar10")

    x_train, y_train = arrays['train']
    x_test, y_test = arrays['test']
    if x_train.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        x_train, x_test = x_train[:, None], x_test[:, None]

    order = np.random.default_rng(SPLIT_SEED).permutation(len(y_train))
    n_val = int(round(config['val_split'] * len(y_train)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean, std = _stats(x_train[train_idx])

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        if config['subset']:
            x, y = x[:config['subset']], y[:config['subset']]
        c = x.shape[1]
        return Split(x=torch.from_numpy(np.array(x)).to(device),
                     y=torch.from_numpy(y.astype(np.int64)).to(device),
                     mean=torch.tensor(mean, device=device).view(1, c, 1, 1),
                     std=torch.tensor(std, device=device).view(1, c, 1, 1))

    return Data(name=name, classes=classes,
                train=split(x_train[train_idx], y_train[train_idx]),
                val=split(x_train[val_idx], y_train[val_idx]),
                test=split(x_test, y_test))
