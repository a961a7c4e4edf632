"""Datasets held whole on the training device.

Every small dataset is read once into a uint8 tensor (N, C, H, W) on the device. Batches are
slices of an index permutation; conversion to float, augmentation and normalisation run on
whole batches on the device. There is no per-sample PIL / DataLoader path: for data this
small that path, not the model, is what limits training speed.

On-disk layout is torchvision's, so an existing torchvision download is reused:
  <data_dir>/MNIST/raw/*-idx?-ubyte[.gz]   <data_dir>/FashionMNIST/raw/...
  <data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   (python pickles)
A --data_dir holding the four IDX files loose (Debian's /usr/share/datasets/fashion-mnist/) works
too. Missing files are downloaded with torchvision's utilities, which verify MD5 checksums; a
failed download leaves --data_dir as it was (no empty folders).

With config['augment'], the train split is augmented per batch on the device (random crop
with zero padding, and a horizontal flip where mirrored images keep their label).
"""
from __future__ import annotations

import gzip
import math
import zlib
import os
import pickle
import shutil
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
    augment: Augment | None = None  # uint8 batch -> uint8 batch (train only)

    def __len__(self) -> int:
        return len(self.y)

    def normalize(self, x: Tensor) -> Tensor:
        return (x.float() / 255 - self.mean) / self.std

    def batches(self, batch_size: int, order: Tensor | None = None, start: int = 0,
                generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) batches in `order` (default: as stored), from batch index `start` on; augmented
        (train split) with draws from `generator`."""
        n = len(self) if order is None else len(order)
        for i in range(start * batch_size, n, batch_size):
            idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x, generator)
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
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a download cut short leaves a truncated .gz
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}), as an interrupted download "
                        f"leaves it; delete it and run again to download it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}; "
                        f"delete it and run again to download it")
    return data.reshape(dims)


def _find(raw_dir: str, stem: str) -> str | None:
    for name in (stem, stem + '.gz'):
        if os.path.exists(os.path.join(raw_dir, name)):
            return os.path.join(raw_dir, name)
    return None


OFFLINE_HINT = "Offline? --dataset digits trains on scikit-learn's bundled digits with no download."


def _download_into(folder: str, download: Callable[[], None]) -> None:
    """download(), which writes into `folder`, creating it. If it fails, the folders it created
    (from the outermost that did not exist) are removed: only a download that succeeds leaves
    anything in --data_dir, and a --data_dir that does not exist is created only for one."""
    created, path = None, os.path.abspath(folder)
    while not os.path.exists(path):
        created, path = path, os.path.dirname(path)
    try:
        download()
    except BaseException:
        if created is not None:  # it did not exist before this call: everything in it is ours
            shutil.rmtree(created, ignore_errors=True)
        raise


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
                f"could not download {', '.join(m + '.gz' for m in missing)} from {dataset_cls.mirrors[0]} "
                f"({type(error).__name__}). Put them in {raw_dir}, or point --data_dir (or $DLA_DATA) at a folder "
                f"holding {dataset_cls.__name__}/raw/ or the four .gz files. {OFFLINE_HINT}")


def load_idx_dataset(name: str, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images (N, 28, 28), labels (N,)), 'test': ...} for mnist or fashion_mnist."""
    from torchvision.datasets import MNIST, FashionMNIST
    dataset_cls = {'mnist': MNIST, 'fashion_mnist': FashionMNIST}[name]
    stems = [s for pair in IDX_FILES.values() for s in pair]
    raw_dir = os.path.join(data_dir, dataset_cls.__name__, 'raw')  # torchvision's layout
    if all(_find(data_dir, s) for s in stems):  # the four files loose in data_dir (Debian's package)
        raw_dir = data_dir
    missing = [s for s in stems if _find(raw_dir, s) is None]
    if missing:
        print(f"{name}: {len(missing)} file(s) missing in {raw_dir}, downloading")
        _download_into(raw_dir, lambda: _download(dataset_cls, raw_dir, missing))
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
# CIFAR-10 (python pickles, as torchvision downloads them)

CIFAR_BATCHES = {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']}
CIFAR_META = 'batches.meta'


class _Dtype:
    """A numpy dtype as a CIFAR file describes it, checked before numpy sees it: a plain number of
    1 to 8 bytes (|u1, <i8, <f4, ...). A structured, sub-array or object dtype, or any flags, is
    refused: numpy would otherwise rebuild whatever dtype state the file chose."""
    CODES = {'b1', 'u1', 'u2', 'u4', 'u8', 'i1', 'i2', 'i4', 'i8', 'f2', 'f4', 'f8'}

    def __init__(self, code, align=False, copy=True):
        code = code.decode('ascii', 'replace') if isinstance(code, bytes) else code
        if code not in self.CODES:
            raise pickle.UnpicklingError(f"dtype {code!r} is not a plain numeric dtype")
        self.code, self.order = code, '|'

    def __setstate__(self, state):
        # numpy's dtype state: (version, byte order, subarray, names, fields, elsize, alignment, flags)
        plain = isinstance(state, tuple) and len(state) == 8 and state[2:] == (None, None, None, -1, -1, 0)
        order = state[1] if plain else None
        order = order.decode('latin1') if isinstance(order, bytes) else order
        if order not in ('<', '>', '|', '='):
            raise pickle.UnpicklingError(f"dtype {self.code!r} comes with a state that is not a plain numeric dtype's")
        self.order = order

    def numpy(self) -> np.dtype:
        return np.dtype(('|' if self.code[1] == '1' else self.order.replace('|', '=')) + self.code)


class _Array:
    """numpy's _reconstruct, rebuilt: the array is made from its bytes with np.frombuffer and a
    checked _Dtype, never from numpy's own pickle path."""

    def __init__(self, cls, shape, typecode):
        if cls is not _NDARRAY:
            raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise pickle.UnpicklingError("an array state that is not (shape, dtype, fortran, data)")
        shape, dtype, fortran, raw = state[-4:]
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(dtype, _Dtype) and isinstance(raw, bytes) and fortran in (0, 1)):
            raise pickle.UnpicklingError("an array state that is not (shape, plain dtype, fortran, bytes)")
        dt = dtype.numpy()
        if len(raw) != math.prod(shape) * dt.itemsize:  # exact (Python ints): no overflow to match
            raise pickle.UnpicklingError(f"array of shape {shape} and dtype {dt} with {len(raw)} bytes")
        self.array = np.frombuffer(raw, dtype=dt).reshape(shape, order='F' if fortran else 'C').copy()


def _scalar(dtype, raw):
    if not (isinstance(dtype, _Dtype) and isinstance(raw, bytes) and len(raw) == dtype.numpy().itemsize):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    return np.frombuffer(raw, dtype=dtype.numpy())[0]


def _latin1(text, encoding='utf-8'):
    """_codecs.encode as protocol-2 pickles of Python 3 bytes use it: latin-1 only."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode('latin1')


_NDARRAY = object()  # stands for numpy.ndarray, which only ever reaches _Array


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the real CIFAR files hold: dicts, lists, strings, numbers and numpy
    arrays of plain numbers. No numpy code sees the file: its arrays are rebuilt by _Array, _Dtype
    and _scalar above from bytes. Any other global (os.system, builtins.eval, ...) is refused."""
    STANDINS = {'_reconstruct': _Array, 'scalar': _scalar}

    def find_class(self, module: str, name: str):
        if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name in self.STANDINS:
            return self.STANDINS[name]
        if (module, name) == ('numpy', 'ndarray'):
            return _NDARRAY
        if (module, name) == ('numpy', 'dtype'):
            return _Dtype
        if (module, name) == ('_codecs', 'encode'):
            return _latin1
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")


def _plain(obj):
    """The unpickled object with every _Array replaced by its numpy array."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise pickle.UnpicklingError("an array without its data")
        return obj.array
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, _Dtype):
        raise pickle.UnpicklingError("a bare dtype")
    return obj


def _unpickle(path: str) -> dict:
    """A CIFAR pickle, written by Python 2: keys come back as str whichever way it was written.
    Loaded with _CifarUnpickler, so a tampered file cannot run code."""
    with open(path, 'rb') as f:
        try:
            d = _plain(_CifarUnpickler(f, encoding='bytes').load())  # py2 str -> bytes, as the CIFAR page loads it
        except Exception as e:  # noqa: BLE001 - truncated, not a pickle, a forbidden global or dtype
            raise UserError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); "
                            f"delete it to download it again") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a CIFAR batch (a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar10(data_dir: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """({'train': (images (N, 3, 32, 32) uint8, labels (N,)), 'test': ...}, class names)."""
    from torchvision.datasets import CIFAR10
    folder = os.path.join(data_dir, CIFAR10.base_folder)
    names = [n for files in CIFAR_BATCHES.values() for n in files] + [CIFAR_META]
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        print(f"cifar10: {len(missing)} file(s) missing in {folder}, downloading {CIFAR10.filename}")
        from torchvision.datasets.utils import download_and_extract_archive
        try:  # md5-checked; extracts into data_dir/cifar-10-batches-py/
            _download_into(data_dir, lambda: download_and_extract_archive(
                CIFAR10.url, data_dir, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5))
        except Exception as e:  # noqa: BLE001 - offline, proxy, bad checksum: one clear line
            raise UserError(f"could not download {CIFAR10.url} ({type(e).__name__}) for {', '.join(missing)} in "
                            f"{folder}. Unpack it into {data_dir}, or point --data_dir (or $DLA_DATA) at a folder "
                            f"holding {CIFAR10.base_folder}/. {OFFLINE_HINT}") from None
    out = {}
    for split, files in CIFAR_BATCHES.items():
        xs, ys = [], []
        for name in files:
            path = os.path.join(folder, name)
            d = _unpickle(path)
            x, y = np.asarray(d.get('data')), np.asarray(d.get('labels'), dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
                raise UserError(f"{path}: expected 'data' (N, 3072) uint8 and N 'labels', "
                                f"got {x.dtype} {x.shape} and {y.shape}")
            xs.append(x.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32: (N, C, H, W)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    names = _unpickle(os.path.join(folder, CIFAR_META))['label_names']
    return out, [c.decode() if isinstance(c, bytes) else c for c in names]


# ---------------------------------------------------------------------------------------------
# Augmentation: whole uint8 batches on their device, drawing from a generator on that device
# (training.train keeps one, seeded and checkpointed; every DDP rank draws the same numbers)

def random_crop(x: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Each image shifted by its own (dy, dx) in [-pad, pad], zeros shifted in: the same as
    torchvision's RandomCrop(size, padding=pad). (B, C, H, W) -> (B, C, H, W), any dtype."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p), zeros
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), device=x.device, generator=generator)  # crop corners
    rows = dy + torch.arange(h, device=x.device)  # (B, H)
    cols = dx + torch.arange(w, device=x.device)  # (B, W)
    i = torch.arange(b, device=x.device)[:, None, None]
    return padded[i, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each image mirrored left-right with probability 1/2. (B, C, H, W) -> (B, C, H, W)."""
    flip = torch.rand(len(x), device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@dataclass
class Augment:
    """Random crop with zero padding `pad`, then (if `flip`) a random horizontal flip."""
    pad: int
    flip: bool

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:  # uint8 (B, C, H, W)
        x = random_crop(x, self.pad, generator) if self.pad else x
        return random_flip(x, generator) if self.flip else x


FLIP_INVARIANT = {'fashion_mnist', 'cifar10'}  # a mirrored digit is not a digit; a mirrored shoe is a shoe


# ---------------------------------------------------------------------------------------------
# Assembling the splits

def spread(n: int, k: int) -> Tensor:
    """k indices spread evenly over range(n), all of them when k <= 0 or k >= n: a subset that
    keeps every class of a class-sorted dataset."""
    if k <= 0 or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


def _stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, from training images (N, C, H, W) uint8.
    Exact, from a histogram of the 256 byte values: no float copy of the dataset."""
    values = np.arange(256) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        p = np.bincount(x[:, c].ravel(), minlength=256) / x[:, c].size  # P(pixel == v)
        m = float(p @ values)
        mean.append(m)
        std.append(float(np.sqrt(p @ values ** 2 - m * m)))
    return mean, std


def load_data(config: dict, device: torch.device | str) -> Data:
    """The train / val / test splits of config['dataset'] on `device`.

    val is a fixed random `val_split` fraction of the official training set (SPLIT_SEED), so
    model selection never sees the test split. `subset` caps every split (smoke runs).
    config.get('augment') augments the train split: a random crop with padding H // 8 (4 for
    CIFAR's 32 px, 3 for 28 px, 1 for digits' 8 px) and, for FLIP_INVARIANT datasets, a flip.
    """
    name = config['dataset']
    if name in ('mnist', 'fashion_mnist'):
        arrays = load_idx_dataset(name, config['data_dir'])
        classes = MNIST_CLASSES if name == 'mnist' else FASHION_CLASSES
    elif name == 'digits':
        arrays, classes = load_digits_dataset(), MNIST_CLASSES
    elif name == 'cifar10':
        arrays, classes = load_cifar10(config['data_dir'])
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

    train = split(x_train[train_idx], y_train[train_idx])
    if config.get('augment', False):
        train.augment = Augment(pad=x_train.shape[2] // 8, flip=name in FLIP_INVARIANT)
    return Data(name=name, classes=classes, train=train,
                val=split(x_train[val_idx], y_train[val_idx]),
                test=split(x_test, y_test))


# ---------------------------------------------------------------------------------------------
# Imagenette (exercise 2.3): ten easy ImageNet classes, JPEG folders as fast.ai ships them

IMAGENETTE_WNIDS = ['n01440764', 'n02102040', 'n02979186', 'n03000684', 'n03028079',
                    'n03394916', 'n03417042', 'n03425413', 'n03445777', 'n03888257']  # sorted = class order


def load_imagenette(data_dir: str, split: str = 'val', size: str = '160px', image_size: int = 160,
                    limit: int = 0, download: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    """(images (N, 3, S, S) uint8, labels (N,) int64, class names) of Imagenette on the CPU.

    torchvision's Imagenette reads <data_dir>/imagenette2-160/<split>/<wnid>/*.JPEG (for
    size '160px'; imagenette2-320 and imagenette2 for the others) and, if that folder is
    missing and `download`, fetches and unpacks the md5-checked archive; an existing folder is
    never downloaded again. Each image is resized (shorter side) and centre-cropped to
    image_size. `limit` > 0 keeps that many images spread evenly over the (class-sorted) files,
    so every class stays represented. Labels index the sorted wnids (IMAGENETTE_WNIDS).
    """
    from torchvision import transforms
    from torchvision.datasets import Imagenette
    url, _ = Imagenette._ARCHIVES[size]
    folder = os.path.join(data_dir, os.path.basename(url).removesuffix('.tgz'))
    if not os.path.isdir(folder) and not download:
        raise UserError(f"Imagenette not found in {folder}; download {url} and unpack it into {data_dir}")
    if not os.path.isdir(folder):
        print(f"imagenette: {folder} missing, downloading {url}")
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                             transforms.PILToTensor()])
    try:
        ds = Imagenette(data_dir, split=split, size=size, download=download, transform=tf)
    except Exception as e:  # noqa: BLE001 - offline, proxy, bad checksum, half-present folder: one line
        raise UserError(f"could not read or download Imagenette {size} {split} ({type(e).__name__}); download "
                        f"{url} and unpack it into {data_dir} (it unpacks to {folder}/{{train,val}}/<wnid>/*.JPEG)"
                        ) from None
    if ds.wnids != IMAGENETTE_WNIDS:
        raise UserError(f"{folder}/{split} holds class folders {ds.wnids}, expected the ten Imagenette "
                        f"wnids {IMAGENETTE_WNIDS}")
    if not len(ds):
        raise UserError(f"{folder}/{split} holds no .JPEG files")
    images, labels = zip(*(ds[i] for i in spread(len(ds), limit).tolist()))
    x = torch.stack([im.expand(3, -1, -1) for im in images])  # (N, 3, S, S); grey JPEGs get 3 channels
    return x, torch.tensor(labels, dtype=torch.int64), [names[0] for names in ds.classes]
