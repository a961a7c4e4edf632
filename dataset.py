"""Datasets held whole on the training device, and the registry that says what each one is.

DATASETS maps a --dataset name to its loader, classes, shape, flip invariance, background and the
per-script defaults it needs; every script's choices read it (docs/usage.md, "Data"). load_data puts
the train / val / test splits on the device as uint8 tensors; batches are index slices, augmented
and normalised there. Files use torchvision's layout, are downloaded with its MD5-checked
utilities, and IDX files are checked against the MD5s of the real ones (`Data.canonical`).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from cifar_pickle import unpickle
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
    canonical: bool | None = None  # its files are the real ones (known MD5s); None: nothing to check them against

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


_MD5: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> MD5 of the uncompressed bytes


def _version(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _read_bytes(path: str) -> bytes:
    """The bytes an IDX file holds (a .gz uncompressed); their MD5 is remembered for idx_md5."""
    opener = gzip.open if path.endswith('.gz') else open
    version = _version(path)
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a download cut short leaves a truncated .gz
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}), as an interrupted download "
                        f"leaves it; delete it and run again to download it") from None
    if version not in _MD5:
        _MD5[version] = hashlib.md5(raw).hexdigest()
    return raw


def idx_md5(path: str) -> str:
    """MD5 of an IDX file's uncompressed bytes, computed once per process per file version."""
    version = _version(path)
    if version not in _MD5:
        _read_bytes(path)
    return _MD5[version]


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array; the format of MNIST and Fashion-MNIST."""
    raw = _read_bytes(path)
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


def load_idx_dataset(name: str, data_dir: str) -> dict[str, Any]:
    """{'train': (images (N, 28, 28), labels (N,)), 'test': ..., 'canonical': bool} for mnist or fashion_mnist."""
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
    out['canonical'] = check_canonical(name, raw_dir)
    return out


_SAID: set = set()  # (dataset, file versions) already said non-canonical in this process


def check_canonical(name: str, raw_dir: str) -> bool | None:
    """Whether raw_dir's IDX files are the real `name` (their uncompressed MD5s); if not, one line says
    so (whose files they are, when known) and the run goes on: Data.canonical records it."""
    if not DATASETS[name].md5:
        return None
    paths = {stem: _find(raw_dir, stem) for pair in IDX_FILES.values() for stem in pair}
    found = {stem: idx_md5(path) for stem, path in paths.items()}
    differ = [stem for stem, md5 in found.items() if DATASETS[name].md5.get(stem) != md5]
    said = (name, tuple(_version(p) for p in paths.values()))
    if differ and said not in _SAID and int(os.environ.get('RANK', '0')) == 0:
        _SAID.add(said)
        owner = next((other for other, info in DATASETS.items() if other != name and info.md5 == found), None)
        which = '' if len(differ) == len(found) else f" ({', '.join(differ)})"
        what = f"holds {owner}'s files, not {name}'s" if owner else f"holds files that are not {name}'s{which}"
        shown = raw_dir if os.path.relpath(raw_dir).startswith('..') else os.path.relpath(raw_dir)
        print(f"{name}: {shown} {what} (MD5); the run goes on, recorded as canonical: false")
    return not differ


def load_digits_dataset(data_dir: str = '') -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16), split 80/20 with a fixed seed;
    no files, so data_dir is not read."""
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
            d = unpickle(path)
            x, y = np.asarray(d.get('data')), np.asarray(d.get('labels'), dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
                raise UserError(f"{path}: expected 'data' (N, 3072) uint8 and N 'labels', "
                                f"got {x.dtype} {x.shape} and {y.shape}")
            xs.append(x.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32: (N, C, H, W)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    names = unpickle(os.path.join(folder, CIFAR_META))['label_names']
    return out, [c.decode() if isinstance(c, bytes) else c for c in names]


def load_cifar10_arrays(data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_cifar10(data_dir)[0]  # the class names are the registry's (the real batches.meta has the same)


# ---------------------------------------------------------------------------------------------
# The registry: what each --dataset is. Adding a dataset is one entry here and one loader above.

@dataclass(frozen=True)
class DatasetInfo:
    loader: Callable[[str], dict[str, Any]]  # data_dir -> {'train': (x, y), 'test': (x, y)[, 'canonical': bool]}
    classes: list[str]                       # label i is classes[i]
    channels: int                            # x is (N, channels, size, size) uint8, or (N, size, size) for 1
    size: int                                # px, square
    flip_invariant: bool                     # a mirrored image keeps its label (augmentation may flip)
    background: str                          # 'black': objects on black, black means "nothing there"; 'natural'
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # {script: {key: value}} where its own do not fit
    md5: dict[str, str] = field(default_factory=dict)  # {file: MD5 of its uncompressed bytes} of the real files


# Exercise 1.3's values where its CIFAR-10 recipe does not fit, applied to the keys not given on the command
# line (with_defaults); 1.3's --help comments repeat them. Measured on a CPU (docs/exercise_1_3.md,
# "Per-dataset defaults"): on digits (8x8 px, 3 steps per epoch) the CIFAR recipe diverged in epoch 3
# (21.73%), and two stages keep the 2x2 maps 2.3 explains; on Fashion-MNIST it diverged in short runs
# (peak lr 0.2 at batch 512): the 28 px sets take the recipe measured at 93.57% on Fashion-MNIST.
# A resumed run keeps its checkpoint's config; a study cell's id hashes the config after these.
CNN_28PX = {'widths': [32, 64, 128], 'epochs': 15, 'batch_size': 128, 'lr': 0.1, 'label_smoothing': 0.1}
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']

DATASETS: dict[str, DatasetInfo] = {
    'mnist': DatasetInfo(
        functools.partial(load_idx_dataset, 'mnist'), MNIST_CLASSES, channels=1, size=28, flip_invariant=False,
        background='black', defaults={'exercise_1_3': CNN_28PX, 'exercise_1_1': {'augment': True}},
        md5={'train-images-idx3-ubyte': '6bbc9ace898e44ae57da46a324031adb',  # MNIST's own four files
             'train-labels-idx1-ubyte': 'a25bea736e30d166cdddb491f175f624',
             't10k-images-idx3-ubyte': '2646ac647ad5339dbf082846283269ea',
             't10k-labels-idx1-ubyte': '27ae3e4e09519cfbb04c329615203637'}),
    'fashion_mnist': DatasetInfo(
        functools.partial(load_idx_dataset, 'fashion_mnist'), FASHION_CLASSES, channels=1, size=28,
        flip_invariant=True, background='black', defaults={'exercise_1_3': CNN_28PX},
        md5={'train-images-idx3-ubyte': 'f4a8712d7a061bf5bd6d2ca38dc4d50a',  # Zalando's files (Debian's package)
             'train-labels-idx1-ubyte': '9018921c3c673c538a1fc5bad174d6f9',
             't10k-images-idx3-ubyte': '8181f5470baa50b63fa0f6fddb340f0a',
             't10k-labels-idx1-ubyte': '15d484375f8d13e6eb1aabb0c3f46965'}),
    'digits': DatasetInfo(
        load_digits_dataset, MNIST_CLASSES, channels=1, size=8, flip_invariant=False,
        background='black',
        defaults={'exercise_1_3': {'widths': [32, 64], 'study_widths': [32, 64], 'batch_size': 128, 'lr': 0.05}}),
    'cifar10': DatasetInfo(load_cifar10_arrays, CIFAR10_CLASSES, channels=3, size=32, flip_invariant=True,
                           background='natural'),
}


def dataset_names(channels: int | None = None, size: int | None = None) -> tuple[str, ...]:
    """The registered datasets, those with `channels` and `size` only when given: a script's --dataset choices."""
    return tuple(name for name, info in DATASETS.items()
                 if channels in (None, info.channels) and size in (None, info.size))


def with_defaults(script: str, config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """config with the dataset's defaults for `script` on every key the user did not give, said in one line."""
    own = {k: v for k, v in DATASETS[config['dataset']].defaults.get(script, {}).items() if k not in overrides}
    if own and not config['resume']:
        print(f"{config['dataset']}: " + ' '.join(f'{k}={v!r}' for k, v in own.items())
              + f" (dataset.DATASETS, {script}'s defaults; a flag overrides any)")
    return {**config, **own}


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
    CIFAR's 32 px, 3 for 28 px, 1 for digits' 8 px) and, for flip_invariant datasets, a flip.
    config.get('black_is_zero') normalises as x / std (mean 0): a conv's zero padding is then black,
    as the black canvas around a crop is for exercise 2.2's detector.
    """
    name = config['dataset']
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (dataset.DATASETS)")
    info = DATASETS[name]
    arrays = info.loader(config['data_dir'])
    x_train, y_train = arrays['train']
    x_test, y_test = arrays['test']
    if x_train.ndim == 3:  # (N, H, W) -> (N, 1, H, W)
        x_train, x_test = x_train[:, None], x_test[:, None]

    order = np.random.default_rng(SPLIT_SEED).permutation(len(y_train))
    n_val = int(round(config['val_split'] * len(y_train)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean, std = _stats(x_train[train_idx])
    if config.get('black_is_zero', False):
        mean = [0.0] * len(mean)

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
        train.augment = Augment(pad=x_train.shape[2] // 8, flip=info.flip_invariant)
    return Data(name=name, classes=list(info.classes), train=train, val=split(x_train[val_idx], y_train[val_idx]),
                test=split(x_test, y_test), canonical=arrays.get('canonical'))


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
