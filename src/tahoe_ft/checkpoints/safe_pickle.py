"""A restricted unpickler for the plain-data pickles of an upstream run folder (`var_dims.pkl`, and the torch
file `pert_onehot_map.pt`, whose keys upstream stores as numpy strings).

`SafeUnpickler.find_class` allows only what such files need: numpy's scalar / dtype / array reconstruction,
replaced by stand-ins that rebuild numbers, strings and numeric arrays from their raw bytes (a dtype from its
type code and byte order alone, so a crafted dtype state cannot add fields, object members or flags), the
latin-1 `_codecs.encode` that pickle protocol 2 uses for bytes, and, in a torch file, torch's plain-tensor
rebuild. Every other global (`os.system`, `builtins.open`, `eval`, ...) is refused before anything is called,
and GLOBAL hands out a fresh wrapper each time, so a pickle's BUILD cannot change a shared class or function.
`read_pickle` / `read_torch_data` turn any refusal into one `UserError` line.
"""

from __future__ import annotations

import math
import os
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tahoe_ft.errors import UserError


class RefusedPickle(pickle.UnpicklingError):
    """The pickle needs something that is not plain data."""


# numpy kinds rebuilt from raw bytes: bool, signed/unsigned int, float, complex, unicode and byte strings
_NUMPY_KINDS = "biufcUS"
_MAX_DEPTH = 64


class _Dtype:
    """Stands in for `numpy.dtype(code, align, copy)` + its pickled state; only the type code and byte order
    are used, so a crafted state cannot add fields, object members or flags."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(code, str):
            raise RefusedPickle(f"numpy dtype from {type(code).__name__}")
        try:
            dt = np.dtype(code)
        except TypeError:
            raise RefusedPickle(f"numpy dtype {code!r}") from None
        if dt.kind not in _NUMPY_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise RefusedPickle(f"numpy dtype {code!r} (only numbers and strings)")
        self.dtype = dt

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5:
            raise RefusedPickle("numpy dtype state")
        order, extra = state[1], state[2:5]
        if order not in ("<", ">", "|", "=") or any(x is not None for x in extra):
            raise RefusedPickle("numpy dtype with fields or sub-arrays")
        if len(state) > 5 and state[5] not in (-1, self.dtype.itemsize):
            raise RefusedPickle("numpy dtype with a foreign item size")
        if order in "<>" and self.dtype.byteorder not in ("|",):
            self.dtype = self.dtype.newbyteorder(order)


class _NdarrayClass:
    """Stands in for the `numpy.ndarray` class (only as `_reconstruct`'s first argument)."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise RefusedPickle("numpy.ndarray called directly")


class _Array:
    """Stands in for `numpy._core.multiarray._reconstruct(ndarray, shape, typecode)` + its state; the array is
    rebuilt from its raw bytes by `_materialize`."""

    def __init__(self, cls: Any = None, shape: Any = None, typecode: Any = None):
        if not (isinstance(cls, type) and issubclass(cls, _NdarrayClass)):
            raise RefusedPickle("numpy array of a subclass")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, rawdata)
        if not isinstance(state, tuple) or len(state) != 5:
            raise RefusedPickle("numpy array state")
        _, shape, dtype, fortran, raw = state
        self.array = _array_from_bytes(raw, dtype, shape, "F" if fortran else "C")


def _array_from_bytes(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if isinstance(dtype, _Dtype):
        dtype = dtype.dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
        raise RefusedPickle("numpy array of objects")
    if not isinstance(raw, bytes | bytearray):
        raise RefusedPickle("numpy array whose data is not raw bytes")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise RefusedPickle("numpy array shape")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise RefusedPickle("numpy array whose data does not fit its shape")
    return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order=order).copy()


def _scalar(dtype: Any, data: Any) -> Any:
    """`numpy._core.multiarray.scalar(dtype, raw bytes)` -> the python number or string."""
    if not isinstance(dtype, _Dtype) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise RefusedPickle("numpy scalar")
    return np.frombuffer(data, dtype=dtype.dtype)[0].item()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    """`numpy._core.numeric._frombuffer` (pickle protocol 5 arrays)."""
    if order not in ("C", "F"):
        raise RefusedPickle("numpy array order")
    return _array_from_bytes(buf, dtype, shape, order)


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """`_codecs.encode(text, "latin1")`: how pickle protocol 2 (`torch.save`) spells a bytes object."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle("_codecs.encode other than latin1 text -> bytes")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {
        ("numpy", "dtype"): _Dtype,
        ("numpy", "ndarray"): _NdarrayClass,
        ("_codecs", "encode"): _latin1_bytes,
    }
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy >= 2 / numpy 1.x names
        out[mod, "scalar"] = _scalar
        out[mod, "_reconstruct"] = _Array
    for mod in ("numpy._core.numeric", "numpy.core.numeric"):
        out[mod, "_frombuffer"] = _frombuffer
    return out


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, strings, numbers and numeric/string numpy arrays and
    scalars (rebuilt from their raw bytes, never through numpy's own unpickling). Every other global a pickle
    names raises `RefusedPickle` before anything is called."""

    extra_globals: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = {**_numpy_globals(), **self.extra_globals}
        if (module, name) not in allowed:
            raise RefusedPickle(f"{module}.{name}")
        obj = allowed[module, name]
        # a fresh object per lookup: a pickle's BUILD may set attributes on what GLOBAL gave it, and must
        # not reach a shared class or function (e.g. torch's _rebuild_tensor_v2.__defaults__)
        if isinstance(obj, type):
            return type(obj.__name__, (obj,), {})
        return lambda *args, **kwargs: obj(*args, **kwargs)


def _torch_globals() -> dict[tuple[str, str], Any]:
    import collections

    import torch._utils

    # the functions torch's own weights-only loader allows for plain tensors
    return {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


class _TorchFileUnpickler(SafeUnpickler):
    """`SafeUnpickler` plus plain tensors, for `torch.load(pickle_module=...)` (torch supplies the storages)."""

    extra_globals = _torch_globals()


def _torch_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("tahoe_ft_safe_pickle")
    mod.Unpickler = _TorchFileUnpickler  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: _TorchFileUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    return mod


def _materialize(obj: Any, depth: int = 0) -> Any:
    """Stand-ins -> numpy arrays / dtypes; containers rebuilt (a cycle or absurd nesting is refused)."""
    if depth > _MAX_DEPTH:
        raise RefusedPickle("nesting deeper than 64 levels")
    if isinstance(obj, _Array):
        if obj.array is None:
            raise RefusedPickle("numpy array without data")
        return obj.array
    if isinstance(obj, _Dtype):
        return obj.dtype
    if isinstance(obj, dict):
        return {_materialize(k, depth + 1): _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v, depth + 1) for v in obj)
    return obj


def _refused(path: Path, what: str, exc: Exception) -> UserError:
    return UserError(
        f"{path} needs {str(exc) or type(exc).__name__} to unpickle, which is refused (only numbers, strings, "
        f"lists, dicts, numpy arrays{' and tensors' if what == 'torch' else ''}); is it from a state tx train run?"
    )


def read_pickle(path: str | os.PathLike) -> Any:
    """A `.pkl` of plain data (`var_dims.pkl`) through `SafeUnpickler`; one `UserError` line otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _materialize(SafeUnpickler(fh).load())
    except RefusedPickle as exc:
        raise _refused(path, "pickle", exc) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(
            f"{path} is truncated or not a pickle ({type(exc).__name__}: {exc}); use another folder"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None


def read_torch_data(path: str | os.PathLike) -> Any:
    """A torch file of plain data and tensors (`pert_onehot_map.pt`, whose keys upstream stores as numpy
    strings) through `SafeUnpickler` (no code runs); one `UserError` line otherwise."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_torch_pickle_module())
        return _materialize(obj)
    except RefusedPickle as exc:
        raise _refused(path, "torch", exc) from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is truncated or not a torch file ({first}); use another folder") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
