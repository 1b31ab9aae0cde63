"""A strict stand-in for CuPy: the GPU code path, run on a machine without a GPU.

Backed by NumPy on the CPU, it behaves like CuPy 14 wherever minidpo can tell the difference:

- Names. ``cupy``, ``cupy.ndarray``, ufuncs, ``cupyx``, ``cupy.random`` and the parts of
  ``cupy.cuda`` in use hold exactly the names recorded from a real CuPy in ``cupy_api.json``
  (``record_api.py`` writes it). A name CuPy lacks raises AttributeError, as on a GPU; a name
  CuPy has but the stand-in does not emulate raises NotImplementedError (extend the stand-in).
- Arrays. ``ndarray`` is its own type wrapping a NumPy array. It refuses what CuPy refuses, with
  CuPy's error types and messages: implicit conversion to NumPy (``np.asarray(x)``), NumPy arrays
  in ufuncs, operators and kernel launches (``Unsupported type <class 'numpy.ndarray'>``), a
  non-scalar NumPy array assigned through basic indexing, ``__index__`` (CuPy has none), a
  reduction returning a host scalar (CuPy returns a 0-d device array). Like CuPy, an integer
  array index out of bounds wraps around instead of raising. It allows what CuPy
  allows: ``.get()``, ``cupy.asnumpy``, ``cupy.asarray(host)``, NEP-18 dispatch of ``np.*``
  functions CuPy implements, ``float()``/``int()``/``bool()``/``.item()`` on one element.
- Counting. Every device-to-host transfer or implicit sync (``.get()``, ``asnumpy``,
  ``float``, ``int``, ``bool``, ``.item()``, ``tolist``, printing, stream synchronize) is counted
  in ``COUNTS``; ``counting()`` measures a block. Every kernel launch is counted too, by name
  (``launches()``).
- Kernels. ``RawKernel``, ``ElementwiseKernel`` and ``ReductionKernel`` take CuPy's constructor
  signatures; a launch checks what CuPy or the driver would refuse and then runs the kernel's
  array-code twin (``kernel_twins.py``) over what the launch covers.

Use it in-process with ``install()`` / ``uninstall()`` (or the ``standin_cupy`` fixture), and in
a subprocess by putting ``tests/cupy_standin/site`` and the repository root on PYTHONPATH.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import sys
import types
import warnings
import weakref
from pathlib import Path

import numpy as np

API = json.loads(Path(__file__).with_name("cupy_api.json").read_text())
SITE = Path(__file__).with_name("site")
REPO_ROOT = Path(__file__).resolve().parents[2]

COUNTS: collections.Counter = collections.Counter()
"""Device-to-host transfers and syncs by kind; 'h2d' counts host-to-device copies (not syncs)."""

SYNC_KINDS = ("get", "asnumpy", "float", "int", "complex", "bool", "item", "tolist", "print",
              "synchronize")


def syncs(counter=None) -> int:
    """Total device-to-host transfers and syncs in ``counter`` (default: all so far)."""
    c = COUNTS if counter is None else counter
    return sum(c[k] for k in SYNC_KINDS)


def launches(counter=None) -> dict:
    """Kernel launches in ``counter`` (default: all so far) by kernel name (the minidpo_ prefix off)."""
    c = COUNTS if counter is None else counter
    return {k[len("launch:minidpo_"):]: v for k, v in sorted(c.items()) if k.startswith("launch:")}


@contextlib.contextmanager
def counting():
    """``with counting() as c:`` -> ``c`` holds the transfers and syncs of the block, by kind."""
    before = COUNTS.copy()
    c = collections.Counter()
    try:
        yield c
    finally:
        after = COUNTS.copy()
        for k in set(after) | set(before):
            if after[k] - before[k]:
                c[k] = after[k] - before[k]


class CUDARuntimeError(RuntimeError):
    pass


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


_SCALARS = (int, float, bool, complex, np.generic)


# ---------------------------------------------------------------------------------------------
# the array
# ---------------------------------------------------------------------------------------------

def _wrap(r):
    """NumPy results -> stand-in arrays; a NumPy scalar becomes a 0-d device array, as on CuPy."""
    if isinstance(r, np.ndarray):
        return ndarray(r)
    if isinstance(r, np.generic):
        return ndarray(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, list):
        return [_wrap(x) for x in r]
    return r


def _unwrap_strict(x, what="argument"):
    """A stand-in array -> its NumPy data; a NumPy array -> TypeError (no implicit upload)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap_strict(v, what) for v in x)
    return x


def _unwrap_index(idx):
    """Indices may be host data (CuPy uploads them); stand-in arrays are unwrapped."""
    if isinstance(idx, ndarray):
        return idx._a
    if isinstance(idx, tuple):
        return tuple(_unwrap_index(i) for i in idx)
    if isinstance(idx, np.ndarray):
        COUNTS["h2d"] += 1
    return idx


def _is_advanced(idx) -> bool:
    parts = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(p, (list, np.ndarray, ndarray)) for p in parts)


_BINARY = {
    "add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
    "floordiv": "floor_divide", "mod": "remainder", "pow": "power", "matmul": "matmul",
    "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor", "lshift": "left_shift",
    "rshift": "right_shift",
}
_COMPARE = {"lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal",
            "eq": "equal", "ne": "not_equal"}


class _MemoryPointer:
    def __init__(self, arr: "ndarray"):
        self.ptr = int(arr._a.__array_interface__["data"][0])
        self.device = Device(0)
        _POINTERS[self.ptr] = weakref.ref(arr)


_POINTERS: dict[int, weakref.ref] = {}


class _Flags:
    def __init__(self, a: np.ndarray):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[key]


class ndarray:
    """A device array: NumPy data behind CuPy's rules."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if isinstance(shape, np.ndarray):  # internal: wrap NumPy data
            self._a = shape
            return
        self._a = np.empty(shape, dtype=dtype, order=order)

    # -- what CuPy refuses -------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __getattr__(self, name):
        if name not in _NDARRAY_NAMES:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        if not hasattr(np.ndarray, name):
            raise NotImplementedError(f"the CuPy stand-in does not emulate ndarray.{name}")
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                args = _unwrap_strict(args)
                kwargs = {k: _unwrap_strict(v) for k, v in kwargs.items()}
                return _wrap(attr(*args, **kwargs))
            return method
        return _wrap(attr)

    # -- attributes ----------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    T = property(lambda self: ndarray(self._a.T))
    data = property(lambda self: _MemoryPointer(self))
    device = property(lambda self: Device(0))

    @property
    def base(self):
        return None if self._a.base is None else ndarray(np.asarray(self._a.base))

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3,
                "data": (self.data.ptr, False), "strides": None if self._a.flags.c_contiguous else self.strides}

    # -- explicit transfers (allowed, counted) -------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        COUNTS["get"] += 1
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        COUNTS["h2d"] += 1
        self._a[...] = arr

    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        COUNTS["item"] += 1
        return self._a.item()

    def tolist(self):
        COUNTS["tolist"] += 1
        return self._a.tolist()

    def __float__(self):
        COUNTS["float"] += 1
        return float(self._a.copy())

    def __int__(self):
        COUNTS["int"] += 1
        return int(self._a.copy())

    def __complex__(self):
        COUNTS["complex"] += 1
        return complex(self._a.copy())

    def __bool__(self):
        if self.size == 0:
            warnings.warn("The truth value of an empty array is ambiguous. Returning False, but in "
                          "future this will result in an error. Use `array.size > 0` to check that "
                          "an array is not empty.", DeprecationWarning, stacklevel=2)
            return False
        if self.size == 1:
            COUNTS["bool"] += 1
            return bool(self._a.copy())
        raise ValueError("The truth value of an array with more than one element is ambiguous. "
                         "Use a.any() or a.all()")

    def __repr__(self):
        COUNTS["print"] += 1
        return repr(self._a)

    def __str__(self):
        COUNTS["print"] += 1
        return str(self._a)

    def __format__(self, spec):
        COUNTS["print"] += 1
        return format(self._a.copy() if self.ndim else self._a.item(), spec)

    # -- container -----------------------------------------------------------------------------
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __getitem__(self, idx):
        idx = _unwrap_index(idx)
        if isinstance(idx, (np.ndarray, list)) and np.asarray(idx).dtype.kind in "iu" and self.ndim:
            # CuPy wraps out-of-bounds integer-array indices around where NumPy raises IndexError
            return ndarray(np.take(self._a, np.asarray(idx), axis=0, mode="wrap"))
        return _wrap(self._a[idx])

    def __setitem__(self, idx, value):
        advanced = _is_advanced(idx)
        if isinstance(value, ndarray):
            value = value._a
        elif not advanced:
            # basic indexing goes through fill(): a host array must be a scalar (CuPy gh-2079)
            host = np.asarray(value, dtype=self.dtype)
            if host.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = host[()]
        elif isinstance(value, (np.ndarray, list)):
            COUNTS["h2d"] += 1
        self._a[_unwrap_index(idx)] = value

    def fill(self, value):
        if isinstance(value, ndarray):
            if value.shape != ():
                raise ValueError("non-scalar cupy.ndarray cannot be used for fill")
            value = value._a[()]
        else:
            host = np.asarray(value, dtype=self.dtype)
            if host.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        self._a.fill(value)

    def scatter_add(self, slices, value):
        warnings.warn("`ndarray.scatter_add` is deprecated. Please use `cupy.add.at` instead.",
                      DeprecationWarning, stacklevel=2)
        np.add.at(self._a, _unwrap_index(slices), _unwrap_strict(value))

    def partition(self, kth, axis=-1):
        _check_kth(kth)
        if not self._a.flags.c_contiguous:
            raise NotImplementedError("Sorting non-contiguous array is not supported.")
        self._a.partition(kth, axis=axis)

    def dot(self, b, out=None):
        if not isinstance(b, ndarray):
            raise TypeError(f"Argument 'b' has incorrect type (expected cupy._core.core._ndarray_base, "
                            f"got {type(b).__name__})")
        return _wrap(np.dot(self._a, b._a, out=None if out is None else out._a))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        return ndarray(self._a.astype(dtype, order=order, copy=copy))

    def copy(self, order="C"):
        return ndarray(self._a.copy(order=order))

    def reshape(self, *shape, order="C"):
        return ndarray(self._a.reshape(*shape, order=order))

    def view(self, dtype=None):
        return ndarray(self._a.view() if dtype is None else self._a.view(dtype))

    # -- NumPy protocols -----------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        f = _MODULE_FUNCS.get(ufunc.__name__)
        if not isinstance(f, _Ufunc):
            return NotImplemented
        if ufunc.__name__ in _COMPARE.values():
            inputs = tuple(x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x for x in inputs)
        if "out" in kwargs:
            out = kwargs["out"]
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kwargs["out"] = out[0]
        if method == "__call__":
            return f(*inputs, **kwargs)
        if method in API["ufunc"]:
            return getattr(f, method)(*inputs, **kwargs)
        return NotImplemented

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        mod = func.__module__.split(".")[1:] if func.__module__ else []
        target = cupy if not mod else getattr(cupy, mod[0], None)
        f = getattr(target, name, None) if target is not None else None
        if f is None or f is func:
            return NotImplemented
        for t in types:
            if not issubclass(t, (ndarray, np.ndarray)):
                return NotImplemented
        return f(*args, **kwargs)


def _make_binary(op, name, reflected=False, inplace=False):
    def binop(self, other):
        f = _MODULE_FUNCS[name]
        if inplace:
            return f(self, other, out=self)
        return f(other, self) if reflected else f(self, other)
    binop.__name__ = f"__{'r' if reflected else 'i' if inplace else ''}{op}__"
    return binop


for _op, _name in _BINARY.items():
    setattr(ndarray, f"__{_op}__", _make_binary(_op, _name))
    setattr(ndarray, f"__r{_op}__", _make_binary(_op, _name, reflected=True))
    setattr(ndarray, f"__i{_op}__", _make_binary(_op, _name, inplace=True))
for _op, _name in _COMPARE.items():
    setattr(ndarray, f"__{_op}__", _make_binary(_op, _name))
ndarray.__neg__ = lambda self: _MODULE_FUNCS["negative"](self)
ndarray.__pos__ = lambda self: _MODULE_FUNCS["positive"](self)
ndarray.__abs__ = lambda self: _MODULE_FUNCS["absolute"](self)
ndarray.__invert__ = lambda self: _MODULE_FUNCS["invert"](self)
ndarray.__hash__ = None
ndarray.__module__ = "cupy"

_NDARRAY_NAMES = frozenset(API["ndarray"])


# ---------------------------------------------------------------------------------------------
# functions and ufuncs
# ---------------------------------------------------------------------------------------------

def _check_ufunc_arg(x):
    if isinstance(x, ndarray):
        return x._a
    if type(x) in (int, float, bool, complex) or isinstance(x, np.generic):
        return x
    raise _unsupported(x)


class _Ufunc:
    """A CuPy ufunc: device arrays and scalars only (a NumPy array or a list is refused)."""

    def __init__(self, name):
        self._np = getattr(np, name)
        self.__name__ = self.name = name
        self.nin, self.nout, self.nargs = self._np.nin, self._np.nout, self._np.nargs
        self.types = self._np.types

    def _out(self, kwargs):
        out = kwargs.get("out")
        if out is None:
            return None
        if isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, ndarray):
            raise TypeError(f"Output arguments must be cupy.ndarray, got {type(out)}")
        kwargs["out"] = out._a
        return out

    def __call__(self, *args, **kwargs):
        ins = [_check_ufunc_arg(a) for a in args[: self.nin]]
        if len(args) > self.nin:
            kwargs["out"] = args[self.nin]
        out = self._out(kwargs)
        if "dtype" in kwargs and kwargs["dtype"] is None:
            del kwargs["dtype"]
        with np.errstate(all="ignore"):  # a GPU raises no floating-point warnings
            r = self._np(*ins, **kwargs)
        return out if out is not None else _wrap(r)

    def at(self, a, indices, b=None):
        if not isinstance(a, ndarray):
            raise TypeError("cupy ufunc.at needs a cupy.ndarray")
        idx = _unwrap_index(indices)
        if b is None:
            self._np.at(a._a, idx)
        else:
            self._np.at(a._a, idx, _check_ufunc_arg(b))

    def reduce(self, a, axis=0, dtype=None, out=None, keepdims=False):
        o = None if out is None else out._a
        r = self._np.reduce(_check_ufunc_arg(a), axis=axis, dtype=dtype, out=o, keepdims=keepdims)
        return out if out is not None else _wrap(r)

    def accumulate(self, a, axis=0, dtype=None, out=None):
        return _wrap(self._np.accumulate(_check_ufunc_arg(a), axis=axis, dtype=dtype))

    def outer(self, a, b, **kwargs):
        return _wrap(self._np.outer(_check_ufunc_arg(a), _check_ufunc_arg(b), **kwargs))

    def reduceat(self, a, indices, axis=0, dtype=None, out=None):
        return _wrap(self._np.reduceat(_check_ufunc_arg(a), _unwrap_index(indices), axis=axis, dtype=dtype))


# Functions that take host data and upload it.
_UPLOADERS = {"array", "asarray", "asanyarray"}
# Functions whose result is host information, not an array.
_HOST_RESULT = {"result_type", "can_cast", "isscalar", "ndim", "shape", "size", "promote_types",
                "min_scalar_type", "iinfo", "finfo", "issubdtype", "dtype", "common_type",
                "obj2sctype", "isdtype"}


def _upload(name):
    np_f = getattr(np, name)

    def f(obj, dtype=None, *args, copy=None if name != "array" else True, **kwargs):
        kwargs.pop("blocking", None)
        if isinstance(obj, ndarray):  # already on the device: asarray returns it when it can
            if name == "array" or copy:
                return ndarray(np.array(obj._a, dtype=dtype, copy=True))
            r = np.asarray(obj._a, dtype=dtype)
            return obj if r is obj._a else ndarray(r)
        if isinstance(obj, (list, tuple)) and any(isinstance(v, ndarray) for v in obj):
            obj = [v._a if isinstance(v, ndarray) else v for v in obj]
        COUNTS["h2d"] += 1
        return ndarray(np.array(np_f(obj, dtype=dtype), copy=True))
    f.__name__ = name
    return f


def _function(name):
    np_f = getattr(np, name)

    def f(*args, **kwargs):
        args = _unwrap_strict(args)
        kwargs = {k: _unwrap_strict(v) for k, v in kwargs.items()}
        r = np_f(*args, **kwargs)
        return r if name in _HOST_RESULT else _wrap(r)
    f.__name__ = name
    return f


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy._core.core._ndarray_base, "
                        f"got {type(a).__name__})")
    r = np.ascontiguousarray(a._a, dtype=dtype)
    return a if r is a._a else ndarray(r)


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        COUNTS["asnumpy"] += 1
        r = np.array(a._a, order=order, copy=True)
        if out is not None:
            out[...] = r
            return out
        return r
    return np.asarray(a, order=order)


def _check_kth(kth):
    if not isinstance(kth, int):
        iter(kth)  # CuPy iterates a non-int kth: a NumPy integer raises "not iterable" here


def partition(a, kth, axis=-1):
    if not isinstance(a, ndarray):
        raise _unsupported(a)
    _check_kth(kth)
    return ndarray(np.partition(a._a, kth, axis=axis))


def get_array_module(*args):
    return cupy if any(isinstance(a, ndarray) for a in args) else np


# ---------------------------------------------------------------------------------------------
# cupy.cuda
# ---------------------------------------------------------------------------------------------

class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def use(self):
        return None

    def synchronize(self):
        COUNTS["synchronize"] += 1

    compute_capability = "90"
    mem_info = property(lambda self: (64 << 30, 80 << 30))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return self.id


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0

    def synchronize(self):
        COUNTS["synchronize"] += 1

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._t = None

    def record(self, stream=None):
        import time

        self._t = time.perf_counter()

    def synchronize(self):
        COUNTS["synchronize"] += 1

    done = property(lambda self: True)


def get_elapsed_time(start, end):
    return (end._t - start._t) * 1e3


class MemoryPool:
    def __init__(self, allocator=None):
        self._limit = 0

    def used_bytes(self):  # the stand-in has no pool: memory measurements need a GPU
        return 0

    def total_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self, stream=None):
        return None

    def free_all_free(self):
        return None

    def set_limit(self, size=None, fraction=None):
        self._limit = size or 0

    def get_limit(self):
        return self._limit

    def malloc(self, size):
        raise NotImplementedError("the CuPy stand-in does not hand out raw device memory")


class PinnedMemoryPool:
    def __init__(self, allocator=None):
        pass

    def free_all_blocks(self):
        return None

    def n_free_blocks(self):
        return 0

    def malloc(self, size):
        raise NotImplementedError("the CuPy stand-in does not hand out pinned memory")


class MemoryHook:
    name = "MemoryHook"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def alloc_preprocess(self, **kw): pass
    def alloc_postprocess(self, **kw): pass
    def malloc_preprocess(self, **kw): pass
    def malloc_postprocess(self, **kw): pass
    def free_preprocess(self, **kw): pass
    def free_postprocess(self, **kw): pass


_DEFAULT_POOL = MemoryPool()
_DEFAULT_PINNED_POOL = PinnedMemoryPool()
_CURRENT_STREAM = Stream()


def _runtime_module():
    m = _strict_module("cupy.cuda.runtime", API["cuda.runtime"])
    m.CUDARuntimeError = CUDARuntimeError
    m.getDeviceCount = lambda: 1
    m.getDevice = lambda: 0
    m.setDevice = lambda i: Device(i) and None
    m.deviceSynchronize = lambda: COUNTS.update(synchronize=1)
    m.memGetInfo = lambda: (64 << 30, 80 << 30)
    m.runtimeGetVersion = lambda: 12080
    m.driverGetVersion = lambda: 12080
    m.getDeviceProperties = lambda i: {"name": b"CuPy stand-in (NumPy on the CPU)", "totalGlobalMem": 80 << 30,
                                       "major": 9, "minor": 0, "multiProcessorCount": 132,
                                       "maxThreadsPerBlock": 1024}
    return m


# ---------------------------------------------------------------------------------------------
# modules with exactly CuPy's names
# ---------------------------------------------------------------------------------------------

class _StrictModule(types.ModuleType):
    """A module that has exactly the recorded names: a missing one is an AttributeError, as on
    CuPy; a recorded one the stand-in does not emulate is a NotImplementedError."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self.__dict__.get("_recorded", ()):
            raise NotImplementedError(f"the CuPy stand-in does not emulate {self.__name__}.{name}")
        raise AttributeError(f"module '{self.__name__}' has no attribute '{name}'")


def _strict_module(name, recorded):
    m = _StrictModule(name)
    m._recorded = frozenset(recorded)
    return m


def _build():
    from . import kernels as _k

    cp = _strict_module("cupy", API["cupy"])
    cp.__version__ = API["cupy_version"]
    cp.__file__ = __file__
    cp.ndarray = ndarray
    funcs = {}
    for name in API["cupy"]:
        obj = getattr(np, name, None)
        if obj is None:
            continue
        if isinstance(obj, np.ufunc):
            funcs[name] = _Ufunc(name)
        elif isinstance(obj, type) or isinstance(obj, (int, float)) or obj is None:
            funcs[name] = obj  # scalar types (cupy.float32 is numpy.float32), constants
        elif callable(obj):
            funcs[name] = _upload(name) if name in _UPLOADERS else _function(name)
        else:
            funcs[name] = obj
    funcs.update(ascontiguousarray=ascontiguousarray, partition=partition, asnumpy=asnumpy, get_array_module=get_array_module,
                 ElementwiseKernel=_k.ElementwiseKernel, ReductionKernel=_k.ReductionKernel,
                 RawKernel=_k.RawKernel, get_default_memory_pool=lambda: _DEFAULT_POOL,
                 get_default_pinned_memory_pool=lambda: _DEFAULT_PINNED_POOL, newaxis=None,
                 inf=math.inf, nan=math.nan, pi=math.pi, e=math.e, ndarray=ndarray)
    funcs = {k: v for k, v in funcs.items() if k in API["cupy"]}
    _MODULE_FUNCS.update(funcs)
    for k, v in funcs.items():
        setattr(cp, k, v)

    cuda = _strict_module("cupy.cuda", API["cuda"])
    cuda.runtime = _runtime_module()
    cuda.Device, cuda.Stream, cuda.Event, cuda.MemoryPool = Device, Stream, Event, MemoryPool
    cuda.PinnedMemoryPool, cuda.MemoryHook = PinnedMemoryPool, MemoryHook
    cuda.get_current_stream = lambda device=None: _CURRENT_STREAM
    cuda.get_elapsed_time = get_elapsed_time
    cuda.is_available = lambda: True
    cuda.get_device_id = lambda: 0
    cp.cuda = cuda

    rnd = _strict_module("cupy.random", API["random"])
    for name in API["random"]:
        f = getattr(np.random, name, None)
        if callable(f) and not isinstance(f, type):
            setattr(rnd, name, _function_of(f, name))
    rnd.default_rng = lambda seed=None: _Generator(seed)
    cp.random = rnd

    cpx = _strict_module("cupyx", API["cupyx"])

    def scatter_add(a, slices, value):
        a.scatter_add(slices, value)
    cpx.scatter_add = scatter_add
    return cp, cpx


class _Generator:
    """cupy.random.Generator: only the methods CuPy's Generator has (no permutation, choice, ...)."""

    def __init__(self, seed):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        if name not in API["random.Generator"]:
            raise AttributeError(f"'cupy.random._generator_api.Generator' object has no attribute '{name}'")
        return _function_of(getattr(self._g, name), name)


def _function_of(np_f, name):
    def f(*args, **kwargs):
        args = _unwrap_strict(args)
        kwargs = {k: _unwrap_strict(v) for k, v in kwargs.items()}
        return _wrap(np_f(*args, **kwargs))
    f.__name__ = name
    return f


_MODULE_FUNCS: dict = {}
cupy, cupyx = _build()

_SAVED: dict = {}
_NAMES = ("cupy", "cupyx", "cupy.cuda", "cupy.cuda.runtime", "cupy.random")


def install() -> types.ModuleType:
    """Make ``import cupy`` (and cupyx, cupy.cuda, ...) give the stand-in in this process."""
    for n in _NAMES:
        if n not in _SAVED:
            _SAVED[n] = sys.modules.get(n)
    sys.modules.update({"cupy": cupy, "cupyx": cupyx, "cupy.cuda": cupy.cuda,
                        "cupy.cuda.runtime": cupy.cuda.runtime, "cupy.random": cupy.random})
    return cupy


def uninstall() -> None:
    """Put back whatever ``cupy`` was before ``install()`` (the real CuPy, or nothing)."""
    for n, m in _SAVED.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m
    _SAVED.clear()


def subprocess_env(env=None) -> dict:
    """An environment whose Python processes import the stand-in as ``cupy``."""
    import os

    env = dict(os.environ if env is None else env)
    parts = [str(SITE), str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env
