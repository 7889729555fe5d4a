"""Reading the pickles of numpy arrays that model zoos publish, without letting them run code.

A pickle is a program: each GLOBAL opcode names a callable that the loader imports and calls, so a
file that names `os.system` runs a shell command on load. `load_array_pickle` runs the pickle with
an unpickler whose `find_class` admits only what an array dictionary needs: numpy's array and
dtype reconstructors (under the module names numpy 1 and numpy 2 write) and `OrderedDict`; the
builtin containers, strings and numbers need no class at all. Anything else is refused before it
is imported or called, with its name in the error (`UnsafePickleError`). Object arrays, whose
elements would be pickles of their own, are refused after loading.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError


class UnsafePickleError(UserError):
    """The pickle names something other than numpy arrays and plain containers."""


def _numpy_attr(path: str) -> Any:
    """numpy's object at `path` ('_core.multiarray._reconstruct'), in numpy 2 or numpy 1 layout."""
    for root in (path, path.replace("_core.", "core.", 1)):
        obj: Any = np
        try:
            for part in root.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(f"numpy has no {path}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode`, as Python 3 pickles `bytes` at protocol 2, for its one use: latin-1."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise UnsafePickleError(
            f"the pickle encodes bytes as {encoding!r}; only latin-1 is expected"
        )
    return text.encode("latin1")


# (module, name) as a pickle writes them -> how to get the object. Nothing here runs code of the
# file's choosing: the numpy reconstructors build arrays and dtypes from data.
_ALLOWED = {
    **{
        (module, name): (lambda path=path: _numpy_attr(path))
        for module_core in ("numpy.core", "numpy._core")
        for module, name, path in (
            (f"{module_core}.multiarray", "_reconstruct", "_core.multiarray._reconstruct"),
            (f"{module_core}.multiarray", "scalar", "_core.multiarray.scalar"),
            (f"{module_core}.numeric", "_frombuffer", "_core.numeric._frombuffer"),
        )
    },
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # Python 2 pickles of arrays hold byte strings
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        getter = _ALLOWED.get((module, name))
        if getter is None:
            raise UnsafePickleError(
                f"{self.source}: refused to load '{module}.{name}': the file may only hold numpy arrays "
                "and plain containers (a pickle can name any Python callable and make the loader run it; "
                "nothing from this file was executed)"
            )
        return getter()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self.source}: refused a persistent id {pid!r}: not a plain pickle of arrays"
        )


def _check_no_objects(value: Any, source: str, where: str = "") -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise UnsafePickleError(
            f"{source}: {where or 'an entry'} is an object array; only numeric arrays are allowed"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            _check_no_objects(v, source, f"{where}.{k}" if where else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_no_objects(v, source, f"{where}[{i}]")


def load_array_pickle(path: str | Path) -> Any:
    """Unpickles `path` admitting only numpy arrays/dtypes/scalars and plain containers
    (UnsafePickleError naming anything else, raised before it is imported or called)."""
    p = Path(path)
    data = p.read_bytes()
    try:
        value = _ArrayUnpickler(io.BytesIO(data), str(p)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files are the user's
        raise UserError(f"{p} could not be read as a pickle: {type(e).__name__}: {e}") from e
    _check_no_objects(value, str(p))
    return value
