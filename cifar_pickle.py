"""CIFAR-10's batches are Python 2 pickles; this module reads them without running pickle code.

Only what the real files hold is rebuilt (dicts, lists, strings, numbers, numpy arrays of plain
numbers, made from their bytes); any other global in a file is refused (tests/test_edges_b.py).
"""
from __future__ import annotations

import math
import pickle

import numpy as np

from config import UserError


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


def unpickle(path: str) -> dict:
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
