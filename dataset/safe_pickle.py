"""Loading REFER-style `refs(<splitBy>).p` pickles without letting them run code.

A pickle can name any importable callable and have it called while loading (`os.system`, `eval`,
...). The refs files only hold plain data: lists and dicts of strings and numbers. The unpickler
below resolves no global at all except a short allow-list of harmless constructors, so a
downloaded file that tries anything else fails with an error instead of executing.

Allowed: set/frozenset/OrderedDict (plain containers), `_codecs.encode(str, "latin1")` (how
Python 3 writes bytes at protocol 2), and numpy scalars and arrays of numeric dtypes (refs files
converted with numpy hold numpy ints or bbox arrays; their payload is raw bytes, never code).
numpy values are turned into Python numbers / lists after loading.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any, BinaryIO

import numpy as np


def _latin1_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode call with unexpected arguments")
    return text.encode("latin1")


def _numeric_dtype(spec, *_args):
    dt = np.dtype(spec) if isinstance(spec, str) else None
    if dt is None or dt.kind not in "biuf":
        raise pickle.UnpicklingError(f"refused numpy dtype {spec!r}: only numeric values are allowed")
    return dt


def _numeric_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("refused numpy scalar: only numeric scalars are allowed")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _empty_array(subtype, _shape=(0,), _dtype_code=b"b"):
    """numpy's array reconstructor, for plain ndarrays only; BUILD then fills it from raw bytes
    with a dtype that went through `_numeric_dtype`."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("refused numpy array subclass")
    return np.empty(0, dtype=np.uint8)


def _array_from_buffer(buf, dtype, shape, order="C"):
    """numpy's protocol-5 array reconstructor (raw buffer + numeric dtype)."""
    numeric = isinstance(dtype, np.dtype) and dtype.kind in "biuf"
    if not numeric or not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise pickle.UnpicklingError("refused numpy buffer: only numeric arrays are allowed")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _check_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"refused numpy array of dtype {arr.dtype}")
    return arr


_ALLOWED = {
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy.core.multiarray", "scalar"): _numeric_scalar,
    ("numpy._core.multiarray", "scalar"): _numeric_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the allow-listed globals above."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: refs pickles may hold only plain containers, "
                f"strings and numbers") from None


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, recursively; everything else as is."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _check_array(obj).tolist()
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(x) for x in obj)
    if isinstance(obj, dict):
        return type(obj)((_plain(k), _plain(v)) for k, v in obj.items())
    return obj


def safe_load(f: BinaryIO | bytes) -> Any:
    """Load plain data from a pickle stream (Python 2 `str` is decoded as UTF-8)."""
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    return _plain(RestrictedUnpickler(f, encoding="utf-8", errors="strict").load())


def safe_load_path(path: str) -> Any:
    """safe_load of a file; any failure is an UnpicklingError whose one-line message names it."""
    with open(path, "rb") as f:
        try:
            return safe_load(f)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None
        except EOFError:
            raise pickle.UnpicklingError(f"{path}: the pickle ends early (empty or cut-off file)") from None
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:  # garbled opcodes / payload
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
