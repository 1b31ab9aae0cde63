"""The stand-in's kernel classes: CuPy's constructor signatures, CuPy's and the driver's launch
checks, and in place of the compiled CUDA C, an array-code twin of each kernel run over exactly
what the launch covers.

A RawKernel launch is checked against the C parameter list parsed from its source: argument
count, device arrays only (a NumPy array is ``Unsupported type``), each pointer's pointee dtype,
C-contiguity, each scalar's width (CuPy passes a Python int as ``long long`` and a Python float as
``double``, so a Python int for an ``int`` parameter is a bug), grid and block as tuples, at most
1,024 threads a block. The twin then computes the rows the grid covers (row kernels: one block a
row; grid-stride kernels: everything, when the grid is not empty); rows a too-small grid misses
stay as they were, so the caller's test sees the bug.

The twins are written here, from each kernel's documented semantics in minidpo/kernels.py, in
NumPy, independently of minidpo's own array code.
"""

from __future__ import annotations

import math
import re

import numpy as np

_CTYPE_DTYPES = {
    "float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
    "signed char": np.int8, "char": np.int8, "unsigned char": np.uint8, "bool": np.bool_,
    "unsigned int": np.uint32, "unsigned long long": np.uint64, "short": np.int16,
    "long": np.int64, "size_t": np.uint64, "ptrdiff_t": np.int64,
}


def _arr():
    from . import ndarray

    return ndarray


def _launched(name: str) -> None:
    """Count a kernel launch (``COUNTS["launch:" + name]``; package's :func:`launches`)."""
    from . import COUNTS

    COUNTS["launch:" + name] += 1


def _scalar_dtype(x):
    """The C type CuPy passes a scalar kernel argument as."""
    if type(x) is bool:
        return np.dtype(np.bool_)
    if type(x) is int:
        return np.dtype(np.int64) if x < 0x8000000000000000 else np.dtype(np.uint64)
    if type(x) is float:
        return np.dtype(np.float64)
    if type(x) is complex:
        return np.dtype(np.complex128)
    if isinstance(x, np.generic):
        return x.dtype
    raise TypeError(f"Unsupported type {type(x)}")


def _dims(v, what):
    if not isinstance(v, tuple):
        raise TypeError(f"{what} must be a tuple of ints (CuPy: ``kernel(grid, block, args)``), got {type(v).__name__}")
    if not 1 <= len(v) <= 3 or not all(isinstance(d, (int, np.integer)) for d in v):
        raise ValueError(f"{what} must be a tuple of 1 to 3 ints, got {v!r}")
    v = tuple(int(d) for d in v) + (1,) * (3 - len(v))
    if min(v) < 1:
        raise ValueError(f"{what} {v} has a dimension < 1 (cudaErrorInvalidConfiguration)")
    return v


# ---------------------------------------------------------------------------------------------
# RawKernel
# ---------------------------------------------------------------------------------------------

def parse_params(code: str, name: str) -> list[tuple[str, bool]]:
    """(C type, is_pointer) for each parameter of ``extern "C" __global__ void name(...)``."""
    typedefs = dict((alias, real) for real, alias in re.findall(r"typedef\s+([\w ]+?)\s+(\w+)\s*;", code))
    m = re.search(r'extern\s+"C"\s+__global__\s+void\s+' + re.escape(name) + r"\s*\(([^)]*)\)", code)
    if m is None:
        raise ValueError(f'no extern "C" __global__ function named {name!r} in the kernel source '
                         f"(cuModuleGetFunction would fail: CUDA_ERROR_NOT_FOUND)")
    params = []
    for p in filter(None, (s.strip() for s in m.group(1).split(","))):
        ptr = "*" in p
        words = [w for w in re.sub(r"[*&]", " ", p).split()
                 if w not in ("const", "__restrict__", "restrict", "volatile")]
        ctype = " ".join(words[:-1])
        ctype = typedefs.get(ctype, ctype)
        if ctype not in _CTYPE_DTYPES:
            raise ValueError(f"kernel {name}: parameter {p!r} has a type the stand-in does not know")
        params.append((ctype, ptr))
    return params


class RawKernel:
    """``RawKernel(str code, str name, tuple options=(), str backend='nvrtc',
    bool translate_cucomplex=False, *, bool enable_cooperative_groups=False, jitify=None)``"""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False, *,
                 enable_cooperative_groups=False, jitify=None):
        if not isinstance(code, str) or not isinstance(name, str):
            raise TypeError("RawKernel(code, name): code and name must be str")
        if not isinstance(options, tuple):
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got {type(options).__name__})")
        self.code, self.name, self.options = code, name, options
        self._params = None  # parsed at the first launch, as CuPy compiles then

    def __call__(self, grid, block, args, *, shared_mem=0):
        ndarray = _arr()
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if block[0] * block[1] * block[2] > 1024 or block[0] > 1024 or block[1] > 1024 or block[2] > 64:
            raise RuntimeError(f"CUDA_ERROR_INVALID_VALUE: block {block} exceeds 1024 threads a block")
        if grid[0] > 2**31 - 1 or grid[1] > 65535 or grid[2] > 65535:
            raise RuntimeError(f"CUDA_ERROR_INVALID_VALUE: grid {grid} too large")
        if not isinstance(args, tuple):
            raise TypeError(f"args must be a tuple, got {type(args).__name__}")
        if self._params is None:
            self._params = parse_params(self.code, self.name)
        if len(args) != len(self._params):
            raise TypeError(f"kernel {self.name} takes {len(self._params)} arguments, {len(args)} given")
        for i, (a, (ctype, ptr)) in enumerate(zip(args, self._params)):
            want = np.dtype(_CTYPE_DTYPES[ctype])
            if ptr:
                if not isinstance(a, ndarray):
                    raise TypeError(f"Unsupported type {type(a)}" if isinstance(a, np.ndarray) else
                                    f"kernel {self.name} argument {i}: a {ctype}* needs a cupy.ndarray, got {type(a).__name__}")
                if a.dtype != want:
                    raise TypeError(f"kernel {self.name} argument {i}: {ctype}* given a {a.dtype} array")
                if not a.flags.c_contiguous:
                    raise ValueError(f"kernel {self.name} argument {i}: a raw pointer needs a C-contiguous array")
            else:
                if isinstance(a, (ndarray, np.ndarray)):
                    raise TypeError(f"kernel {self.name} argument {i}: the {ctype} scalar was given an array")
                if _scalar_dtype(a) != want:
                    raise TypeError(f"kernel {self.name} argument {i}: {ctype} given {_scalar_dtype(a)} "
                                    f"({8 * _scalar_dtype(a).itemsize} bits for {8 * want.itemsize}); "
                                    f"pass {want.name}(value)")
        twin = RAW_TWINS.get(self.name)
        if twin is None:
            raise NotImplementedError(f"the CuPy stand-in has no array-code twin for RawKernel {self.name}")
        _launched(self.name)
        with np.errstate(all="ignore"):  # a GPU raises no floating-point warnings
            twin(grid, block, *[a._a if isinstance(a, ndarray) else a for a in args])


def _rows_covered(grid, n) -> int:
    """Row kernels take row = blockIdx.x: the grid covers min(grid.x, n) rows."""
    return min(grid[0], int(n))


def _full_warps(block, name):
    if block[0] % 32:
        raise ValueError(f"kernel {name}: its warp reductions need blockDim.x a multiple of 32, got {block[0]}")


def _layernorm_forward(grid, block, x, w, b, y, mean, rstd, N, C, eps):
    _full_warps(block, "layernorm_forward")
    n = _rows_covered(grid, N)
    x2 = x.reshape(N, C)[:n]
    mu = x2.mean(axis=1, keepdims=True, dtype=x.dtype)
    var = ((x2 - mu) ** 2).mean(axis=1, keepdims=True, dtype=x.dtype)
    r = (1 / np.sqrt(var + eps)).astype(x.dtype)
    y.reshape(N, C)[:n] = (x2 - mu) * r * w + b
    mean.reshape(N, 1)[:n] = mu
    rstd.reshape(N, 1)[:n] = r


def _layernorm_backward_dx(grid, block, dy, x, w, mean, rstd, dx, N, C):
    _full_warps(block, "layernorm_backward_dx")
    n = _rows_covered(grid, N)
    dy2, x2 = dy.reshape(N, C)[:n], x.reshape(N, C)[:n]
    mu, r = mean.reshape(N, 1)[:n], rstd.reshape(N, 1)[:n]
    xhat = (x2 - mu) * r
    g = dy2 * w
    dx.reshape(N, C)[:n] = r * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))


def _masked_softmax(grid, block, att, start, hidden_lo, hidden_hi, rows, H, nq, nk, S, q0, self0, k0, scale):
    _full_warps(block, "masked_softmax")
    n = _rows_covered(grid, rows)
    a = att.reshape(rows, nk)[:n]
    r = np.arange(n)
    i = r % nq  # query within the block
    at = (r // (nq * H)) * S + q0 + i  # its column of the (b, S) layout arrays
    first = start.reshape(-1)[at][:, None]
    lo, hi = hidden_lo.reshape(-1)[at][:, None], hidden_hi.reshape(-1)[at][:, None]
    j = k0 + np.arange(nk)[None, :]
    visible = (j >= first) & (j <= (self0 + i)[:, None]) & ~((j >= lo) & (j < hi))
    s = np.where(visible, a * scale, -np.inf)
    s = np.exp(s - s.max(axis=1, keepdims=True))
    a[...] = s / s.sum(axis=1, keepdims=True)


def _logsoftmax_gather(grid, block, logits, labels, lp, lse, rows, V):
    _full_warps(block, "logsoftmax_gather")
    n = _rows_covered(grid, rows)
    z = logits.reshape(rows, V)[:n]
    m = z.max(axis=1, keepdims=True)
    finite = np.isfinite(m)  # an all -inf row (or one holding +inf): lse is the max itself
    s = np.where(finite, np.log(np.exp(z - np.where(finite, m, 0)).sum(axis=1, keepdims=True)) + m, m)[:, 0]
    lse.reshape(rows)[:n] = s
    lp.reshape(rows)[:n] = z[np.arange(n), labels.reshape(rows)[:n]] - s


def _logsoftmax_gather_backward(grid, block, logits, lse, labels, g, dlogits, M, V):
    z = logits.reshape(M, V)
    p = np.exp(z - lse.reshape(M)[:, None])
    onehot = np.zeros_like(p)
    onehot[np.arange(M), labels.reshape(M)] = 1
    dlogits.reshape(M, V)[...] = g.reshape(M)[:, None] * (onehot - p)


def _adamw_multi_tensor(grid, block, ptrs, offsets, decay, K, b1, b2, eps, step_size, sqrt_bc2, lr_wd):
    from . import _POINTERS

    quads = ptrs.reshape(K, 4)
    for k in range(K):
        arrs = []
        for ptr in quads[k]:
            ref = _POINTERS.get(int(ptr))
            a = ref() if ref is not None else None
            if a is None:
                raise RuntimeError(f"adamw_multi_tensor: pointer {int(ptr):#x} of tensor {k} is not a live "
                                   f"device array (freed before the launch?)")
            arrs.append(a._a)
        p, g, m, v = arrs
        size = int(offsets[k + 1] - offsets[k])
        if not all(a.size == size for a in arrs):
            raise RuntimeError(f"adamw_multi_tensor: tensor {k} sizes {[a.size for a in arrs]} != offsets' {size}")
        t = p.dtype.type
        m *= t(b1)
        m += t(1 - b1) * g
        v *= t(b2)
        v += t(1 - b2) * g * g
        if decay[k]:
            p -= t(lr_wd) * p
        p -= t(step_size) * m / (np.sqrt(v) / t(sqrt_bc2) + t(eps))


RAW_TWINS = {
    "minidpo_layernorm_forward": _layernorm_forward,
    "minidpo_layernorm_backward_dx": _layernorm_backward_dx,
    "minidpo_masked_softmax": _masked_softmax,
    "minidpo_logsoftmax_gather": _logsoftmax_gather,
    "minidpo_logsoftmax_gather_backward": _logsoftmax_gather_backward,
    "minidpo_adamw_multi_tensor": _adamw_multi_tensor,
}


# ---------------------------------------------------------------------------------------------
# ElementwiseKernel and ReductionKernel
# ---------------------------------------------------------------------------------------------

def _parse_kernel_params(params: str):
    """[(name, type, raw)] from 'T x, raw T y, float32 z'."""
    out = []
    for item in filter(None, (s.strip() for s in params.split(","))):
        parts = item.split()
        raw = parts[0] == "raw"
        out.append((parts[-1], parts[-2], raw))
    return out


def _check_args(kname, params, args):
    ndarray = _arr()
    T = None
    for (pname, typ, _), a in zip(params, args):
        if isinstance(a, np.ndarray):
            raise TypeError(f"Unsupported type {type(a)}")
        if not isinstance(a, ndarray) and not isinstance(a, (int, float, bool, complex, np.generic)):
            raise TypeError(f"Unsupported type {type(a)}")
        dt = a.dtype if isinstance(a, ndarray) else None
        if typ == "T" and dt is not None:
            if T is not None and T != dt:
                raise TypeError(f"Type is mismatched. {kname} T {T} {dt}")
            T = dt
        elif typ != "T" and dt is not None and np.dtype(typ) != dt:
            raise TypeError(f"Type is mismatched. {kname} {pname} {typ} {dt}")
    return T


class ElementwiseKernel:
    """``ElementwiseKernel(in_params, out_params, operation, name='kernel', reduce_dims=True,
    preamble='', no_return=False, return_tuple=False, **kwargs)``"""

    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, **kwargs):
        for k in kwargs:
            if k not in ("options", "loop_prep", "after_loop"):
                raise TypeError(f"ElementwiseKernel() got an unexpected keyword argument '{k}'")
        self.in_params, self.out_params = _parse_kernel_params(in_params), _parse_kernel_params(out_params)
        self.operation, self.name = operation, name
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self.nargs = self.nin + self.nout

    def __call__(self, *args, size=None, block_size=None):
        ndarray = _arr()
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(f"Wrong number of arguments for {self.name!r}: {self.nin} or {self.nargs} expected, {len(args)} given")
        T = _check_args(self.name, self.in_params + self.out_params, args)
        ins = [a._a if isinstance(a, ndarray) else a for a in args[: self.nin]]
        shape = np.broadcast_shapes(*[np.shape(a) for a in ins if isinstance(a, np.ndarray)])
        outs = list(args[self.nin:])
        if not outs:
            outs = [ndarray(np.empty(shape, dtype=T if typ == "T" else np.dtype(typ))) for _, typ, _ in self.out_params]
        for o in outs:
            if o.shape != shape:
                raise ValueError(f"Out shape is mismatched: {self.name} {o.shape} vs broadcast {shape}")
        twin = ELEMENTWISE_TWINS.get(self.name)
        if twin is None:
            raise NotImplementedError(f"the CuPy stand-in has no array-code twin for ElementwiseKernel {self.name}")
        _launched(self.name)
        twin(*ins, *[o._a for o in outs])
        return outs[0] if self.nout == 1 else tuple(outs)


_GELU_K = math.sqrt(2.0 / math.pi)


def _gelu_forward(x, y):
    t = x.dtype.type
    y[...] = t(0.5) * x * (1 + np.tanh(t(_GELU_K) * (x + t(0.044715) * x ** 3)))


def _gelu_backward(dy, x, dx):
    t = x.dtype.type
    th = np.tanh(t(_GELU_K) * (x + t(0.044715) * x ** 3))
    dz = t(_GELU_K) * (1 + t(3 * 0.044715) * x * x)
    dx[...] = dy * (t(0.5) * (1 + th) + t(0.5) * x * (1 - th * th) * dz)


def _softmax_backward(att, delta, ds):
    ds[...] = att * (ds - delta)


ELEMENTWISE_TWINS = {
    "minidpo_gelu_forward": _gelu_forward,
    "minidpo_gelu_backward": _gelu_backward,
    "minidpo_softmax_backward": _softmax_backward,
}


class ReductionKernel:
    """``ReductionKernel(str in_params, str out_params, map_expr, reduce_expr, post_map_expr,
    identity, name='reduce_kernel', reduce_type=None, reduce_dims=True, preamble='', options=())``"""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                 name="reduce_kernel", reduce_type=None, reduce_dims=True, preamble="", options=()):
        if not isinstance(in_params, str) or not isinstance(out_params, str):
            raise TypeError("ReductionKernel: in_params and out_params must be str")
        self.in_params, self.out_params = _parse_kernel_params(in_params), _parse_kernel_params(out_params)
        self.name = name
        self.nin = len(self.in_params)

    def __call__(self, *args, out=None, axis=None, keepdims=False, stream=None):
        ndarray = _arr()
        if len(args) != self.nin:
            raise TypeError(f"Wrong number of arguments for {self.name!r}: {self.nin} expected, {len(args)} given")
        T = _check_args(self.name, self.in_params, args)
        twin = REDUCTION_TWINS.get(self.name)
        if twin is None:
            raise NotImplementedError(f"the CuPy stand-in has no array-code twin for ReductionKernel {self.name}")
        _launched(self.name)
        r = np.asarray(twin(*[a._a if isinstance(a, ndarray) else a for a in args], axis=axis,
                            keepdims=keepdims), dtype=T)
        if out is not None:
            out._a[...] = r
            return out
        return ndarray(r)


def _layernorm_dw(dy, x, mean, rstd, axis=None, keepdims=False):
    return (dy * ((x - mean) * rstd)).sum(axis=axis, keepdims=keepdims)


REDUCTION_TWINS = {"minidpo_layernorm_dw": _layernorm_dw}
