"""Tiny synthetic datasets written in the real on-disk formats (IDX for MNIST, CIFAR-10's
Python-2 pickles), so that the real parsing code runs in tests and benchmarks. Not used by the
exercises themselves."""
import gzip
import os
import pickle
import struct

import numpy as np

from dataset import CIFAR_BATCHES, CIFAR_META


def write_idx(path: str, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(struct.pack('>I', d) for d in array.shape)
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root: str, folder: str = 'MNIST', n_train: int = 300, n_test: int = 100,
                gz: bool = True, seed: int = 0) -> str:
    """Synthetic 28x28 IDX files under root/<folder>/raw. A class is a bright 7x7 square at one
    of ten positions, so the data is learnable; pixel (0, 0..1) holds the sample index so tests
    can tell samples apart."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, 'raw')
    os.makedirs(raw, exist_ok=True)
    suffix = '.gz' if gz else ''
    for split, n, offset in (('train', n_train, 0), ('t10k', n_test, n_train)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            r, col = 3 + 10 * (c // 5), 1 + 5 * (c % 5)
            x[i, r:r + 7, col:col + 7] = 255
            x[i, 0, 0], x[i, 0, 1] = (offset + i) % 256, (offset + i) // 256
        write_idx(os.path.join(raw, f'{split}-images-idx3-ubyte{suffix}'), x)
        write_idx(os.path.join(raw, f'{split}-labels-idx1-ubyte{suffix}'), y)
    return root


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    """Writes bytes as Python 2 `str` opcodes, as the CIFAR files were written: they load as str
    with encoding='latin1' (torchvision) and as bytes with encoding='bytes' (the CIFAR page)."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, 'little'))
                   + obj)
        self.memoize(obj)
    dispatch[bytes] = save_py2_str


def write_cifar10(data_dir: str, arrays: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> str:
    """The inverse of load_cifar10, in the real on-disk format (protocol 2, bytes keys b'data',
    b'labels', b'label_names'); for synthetic data in tests and the benchmark. Returns the folder."""
    folder = os.path.join(data_dir, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(os.path.join(folder, name), 'wb') as f:
            _Py2Pickler(f, protocol=2).dump(obj)

    for split, files in CIFAR_BATCHES.items():
        x, y = arrays[split]
        for i, (xb, yb) in enumerate(zip(np.array_split(x, len(files)), np.array_split(y, len(files)))):
            dump(files[i], {b'batch_label': f'{files[i]} (synthetic)'.encode(), b'labels': [int(v) for v in yb],
                            b'data': np.ascontiguousarray(xb, dtype=np.uint8).reshape(len(xb), -1),
                            b'filenames': [f'{j}.png'.encode() for j in range(len(xb))]})
    dump(CIFAR_META, {b'label_names': [c.encode() for c in classes],
                      b'num_cases_per_batch': len(arrays['train'][1]) // 5, b'num_vis': 3 * 32 * 32})
    return folder
