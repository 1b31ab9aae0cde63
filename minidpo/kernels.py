"""Fused CuPy kernels for the GPU, and the plain functions each must equal (its twin).

On a GPU, array code such as ``u = x * x; u *= c; ...; xp.tanh(u, out=u); ...`` launches one
kernel per line and moves the whole array through memory each time. The kernels here do each
layer's elementwise or row-wise work in one pass (one launch, one read of each input, one write
of each output):

    kernel                          does                                              used by
    gelu_forward / gelu_backward    GELU and its derivative, elementwise              fast.py
    layernorm_forward               mean, rstd and the normalised row, one block/row  fast.py
    layernorm_backward              dx one block per row; dw one reduction            fast.py
    masked_softmax_                 scale, the layout's mask, softmax of attention    fast.py
    softmax_backward_               ds = att * (datt - delta)                         fast.py
    logsoftmax_gather               logsumexp of a row and the label's log-prob       fast.py
    logsoftmax_gather_backward      (M, V) written once: g * (onehot - softmax)       fast.py
    adamw_multi_tensor              AdamW for every parameter in one launch           optim.py

The fast path dispatches in one visible line, ``if kernels.use(x):``. Each kernel's twin (in
:data:`TWINS`) is the plain function of layers.py / logprobs.py / optim.py it replaces;
tests/test_kernels.py compares the two (on a GPU, or on the strict CuPy stand-in, which checks
each launch and runs its own array-code twin in place of the CUDA C). ``with kernels.disabled():``
(or ``MINIDPO_KERNELS=0`` in the environment, for a whole run) makes the fast path run its array
code on CuPy arrays too. The CUDA sources are compiled with ``nvcc`` in CI, where no GPU is needed.

Kernels are built lazily, on first use, one per dtype (float32 in training, float64 in the
gradient checks); importing this module never imports CuPy. Every kernel computes in the
arrays' own dtype.

Shape letters: B batch, T time, C channels, V vocabulary, H heads, N = B * T rows, M scored
tokens (rows of the logits).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np

from . import layers, logprobs
from .backend import get_array_module

__all__ = [
    "use",
    "disabled",
    "gelu_forward",
    "gelu_backward",
    "layernorm_forward",
    "layernorm_backward",
    "masked_softmax_",
    "softmax_backward_",
    "logsoftmax_gather",
    "logsoftmax_gather_backward",
    "adamw_multi_tensor",
    "TWINS",
    "cuda_sources",
]

_ENABLED = os.environ.get("MINIDPO_KERNELS", "1") != "0"
"""Kernels on unless the environment says ``MINIDPO_KERNELS=0`` (then CuPy runs the array code)."""


def use(*arrays) -> bool:
    """True when the kernels should run: kernels are enabled and an argument is a CuPy array.

    Never imports CuPy: a CuPy array can only exist once CuPy has been imported by someone."""
    if not _ENABLED or "cupy" not in sys.modules:
        return False
    return any(get_array_module(a) is not np for a in arrays)


@contextlib.contextmanager
def disabled():
    """Inside this block the fast path runs its array code even on CuPy arrays (no kernels)."""
    global _ENABLED
    old, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = old


# ---------------------------------------------------------------------------------------------
# CUDA sources. ``real`` is typedef'd to float or double when a kernel is built.
# ---------------------------------------------------------------------------------------------

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715

# ElementwiseKernel operations (``operation`` is CuPy's keyword; CuPy wraps each in a __global__
# loop over i; in params are values, out params references). T is the arrays' dtype.
GELU_FORWARD = dict(
    in_params="T x",
    out_params="T y",
    operation=f"""
    // y = 0.5 x (1 + tanh(k (x + c x^3)))
    const T k = (T){_GELU_K!r}, c = (T){_GELU_C!r};
    T th = tanh(k * (x + c * x * x * x));
    y = (T)0.5 * x * ((T)1 + th);
    """,
    name="minidpo_gelu_forward",
)

GELU_BACKWARD = dict(
    in_params="T dy, T x",
    out_params="T dx",
    operation=f"""
    // dy/dx = 0.5 (1 + tanh z) + 0.5 x (1 - tanh^2 z) k (1 + 3 c x^2),  z = k (x + c x^3)
    const T k = (T){_GELU_K!r}, c = (T){_GELU_C!r};
    T x2 = x * x;
    T th = tanh(k * (x + c * x2 * x));
    T dz = k * ((T)1 + (T)3 * c * x2);
    dx = dy * ((T)0.5 * ((T)1 + th) + (T)0.5 * x * ((T)1 - th * th) * dz);
    """,
    name="minidpo_gelu_backward",
)

SOFTMAX_BACKWARD = dict(
    in_params="T att, T delta",
    out_params="T ds",
    operation="""
    // ds holds datt on entry:  ds = att * (datt - delta),  delta = sum_j datt_j att_j (per row)
    ds = att * (ds - delta);
    """,
    name="minidpo_softmax_backward",
)

# ReductionKernel: dw[c] = sum_n dy[n, c] * x_hat[n, c],  x_hat = (x - mean[n]) * rstd[n]
LAYERNORM_DW = dict(
    in_params="T dy, T x, T mean, T rstd",
    out_params="T dw",
    map_expr="dy * ((x - mean) * rstd)",
    reduce_expr="a + b",
    post_map_expr="dw = a",
    identity="0",
    name="minidpo_layernorm_dw",
)

# RawKernels: whole CUDA C sources. Row-wise kernels run one block per row and reduce across the
# block with warp shuffles (blockDim.x a multiple of 32, at most 1024).
_COMMON = r"""
__device__ __forceinline__ real warp_sum(real v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ real warp_max(real v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum (or max) of v over the block, returned to every thread. `shared` holds 32 values.
__device__ real block_sum(real v, real* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();                       // shared may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (threadIdx.x < n_warps) ? shared[threadIdx.x] : (real)0;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}
__device__ real block_max(real v, real* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (threadIdx.x < n_warps) ? shared[threadIdx.x] : NEG_INF;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}
"""

LAYERNORM_FORWARD = _COMMON + r"""
// One block per row n of x (N, C):
//   mean = mean_c x,  rstd = 1 / sqrt(mean_c (x - mean)^2 + eps),  y = (x - mean) rstd w + b
extern "C" __global__ void minidpo_layernorm_forward(
        const real* __restrict__ x, const real* __restrict__ w, const real* __restrict__ b,
        real* __restrict__ y, real* __restrict__ mean_out, real* __restrict__ rstd_out,
        const long long N, const int C, const real eps) {
    __shared__ real shared[32];
    const long long n = blockIdx.x;
    if (n >= N) return;                    // uniform over the block
    const real* xr = x + n * C;
    real s = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    const real mean = block_sum(s, shared) / (real)C;
    real ss = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { real d = xr[c] - mean; ss += d * d; }
    const real rstd = (real)1 / sqrt(block_sum(ss, shared) / (real)C + eps);
    real* yr = y + n * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = (xr[c] - mean) * rstd * w[c] + b[c];
    if (threadIdx.x == 0) { mean_out[n] = mean; rstd_out[n] = rstd; }
}
"""

LAYERNORM_BACKWARD_DX = _COMMON + r"""
// One block per row n. With x_hat = (x - mean) rstd and g = dy * w:
//   dx = rstd * (g - mean_c(g) - x_hat * mean_c(g * x_hat))
extern "C" __global__ void minidpo_layernorm_backward_dx(
        const real* __restrict__ dy, const real* __restrict__ x, const real* __restrict__ w,
        const real* __restrict__ mean, const real* __restrict__ rstd, real* __restrict__ dx,
        const long long N, const int C) {
    __shared__ real shared[32];
    const long long n = blockIdx.x;
    if (n >= N) return;
    const real* xr = x + n * C;
    const real* dyr = dy + n * C;
    const real m = mean[n], r = rstd[n];
    real sg = 0, sgx = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        real g = dyr[c] * w[c];
        sg += g;
        sgx += g * ((xr[c] - m) * r);
    }
    const real mg = block_sum(sg, shared) / (real)C;
    const real mgx = block_sum(sgx, shared) / (real)C;
    real* dxr = dx + n * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        real xhat = (xr[c] - m) * r;
        dxr[c] = r * (dyr[c] * w[c] - mg - xhat * mgx);
    }
}
"""

MASKED_SOFTMAX = _COMMON + r"""
// In place over the scores of a query block, att (b, H, nq, nk), one block per row
// row = (bi * H + h) * nq + i: query i of batch row bi reads its layout at column q0 + i of the
// (b, S) arrays start, hidden_lo, hidden_hi (packing.Layout), sits at key index self0 + i, and the
// row holds keys k0 .. k0 + nk - 1. Key j is visible iff
//   start <= j <= self0 + i  and not  hidden_lo <= j < hidden_hi                  (layers.sees)
// and att_j = exp(scale s_j - max) / sum over the visible j' of exp(scale s_j' - max), else 0.
extern "C" __global__ void minidpo_masked_softmax(
        real* __restrict__ att, const long long* __restrict__ start, const long long* __restrict__ hidden_lo,
        const long long* __restrict__ hidden_hi, const long long rows, const int H, const int nq, const int nk,
        const long long S, const long long q0, const long long self0, const long long k0, const real scale) {
    __shared__ real shared[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const long long i = row % nq, bi = row / ((long long)nq * H);
    const long long at = bi * S + q0 + i;
    const long long first = start[at], lo = hidden_lo[at], hi = hidden_hi[at], last = self0 + i;
    real* a = att + row * nk;
    real mx = NEG_INF;
    for (int c = threadIdx.x; c < nk; c += blockDim.x) {
        const long long j = k0 + c;
        if (j >= first && j <= last && !(j >= lo && j < hi)) mx = fmax(mx, scale * a[c]);
    }
    mx = block_max(mx, shared);
    real s = 0;
    for (int c = threadIdx.x; c < nk; c += blockDim.x) {
        const long long j = k0 + c;
        const bool seen = j >= first && j <= last && !(j >= lo && j < hi);
        const real e = seen ? exp(scale * a[c] - mx) : (real)0;
        a[c] = e;
        s += e;
    }
    const real inv = (real)1 / block_sum(s, shared);
    for (int c = threadIdx.x; c < nk; c += blockDim.x) a[c] *= inv;
}
"""

LOGSOFTMAX_GATHER = _COMMON + r"""
// One block per row m of logits (M, V), the logits that predict scored token m:
//   lse[m] = log sum_v exp(logits[m, v]),  lp[m] = logits[m, labels[m]] - lse[m]
// One read of the row: each thread keeps a running (max, sum of exp(x - max)) pair, and the
// pairs are merged across the block.
extern "C" __global__ void minidpo_logsoftmax_gather(
        const real* __restrict__ logits, const long long* __restrict__ labels,
        real* __restrict__ lp, real* __restrict__ lse_out, const long long rows, const long long V) {
    __shared__ real shared[32];
    const long long r = blockIdx.x;
    if (r >= rows) return;
    const real* x = logits + r * V;
    real m = NEG_INF, s = 0;
    for (long long v = threadIdx.x; v < V; v += blockDim.x) {
        real xv = x[v];
        if (xv > m) { s = s * exp(m - xv) + (real)1; m = xv; }  // the first: exp(-inf) = 0
        else if (xv != NEG_INF) s += exp(xv - m);               // -inf adds 0 (and no -inf - -inf)
    }
    const real M = block_max(m, shared);
    // rescale every thread's sum to the common max (a thread that saw nothing, or only -inf,
    // contributes 0)
    s = (m == NEG_INF) ? (real)0 : s * exp(m - M);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) {
        // an all -inf row: lse = -inf (the array code returns the max itself there)
        const real lse = (M == NEG_INF || M == -NEG_INF) ? M : M + log(s);
        lse_out[r] = lse;
        lp[r] = x[labels[r]] - lse;
    }
}
"""

LOGSOFTMAX_GATHER_BACKWARD = r"""
// dlogits (M, V), written once (may alias logits: each entry is read, then written, by the same
// thread). With p = exp(logits - lse[m]):
//   dlogits[m, v] = g[m] * (1[v == labels[m]] - p)
// g[m] = d loss / d lp[m], the upstream gradient of each scored token's log-prob.
extern "C" __global__ void minidpo_logsoftmax_gather_backward(
        const real* logits, const real* __restrict__ lse, const long long* __restrict__ labels,
        const real* __restrict__ g, real* dlogits, const long long M, const long long V) {
    const long long total = M * V;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long m = i / V, v = i - m * V;
        const real p = exp(logits[i] - lse[m]);
        dlogits[i] = g[m] * (((v == labels[m]) ? (real)1 : (real)0) - p);
    }
}
"""

ADAMW_MULTI_TENSOR = r"""
// AdamW (optim.py's (A)) over many tensors in one launch. Tensor k has n_k entries at the
// addresses ptrs[4k + 0..3] = (p, g, m, v); offsets[k] = n_0 + ... + n_{k-1} (offsets[K] = total);
// decay[k] = 1 if tensor k decays. Element i of the concatenation belongs to the tensor k with
// offsets[k] <= i < offsets[k + 1] (binary search):
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p = p (1 - lr_wd decay[k]) - step_size m / (sqrt(v) / sqrt_bc2 + eps)
extern "C" __global__ void minidpo_adamw_multi_tensor(
        const unsigned long long* __restrict__ ptrs, const long long* __restrict__ offsets,
        const signed char* __restrict__ decay, const int K, const real b1, const real b2,
        const real eps, const real step_size, const real sqrt_bc2, const real lr_wd) {
    const long long total = offsets[K];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        int lo = 0, hi = K;                 // offsets[lo] <= i < offsets[hi]
        while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (offsets[mid] <= i) lo = mid; else hi = mid; }
        const long long j = i - offsets[lo];
        real* p = (real*)ptrs[4 * lo];
        const real* g = (const real*)ptrs[4 * lo + 1];
        real* m = (real*)ptrs[4 * lo + 2];
        real* v = (real*)ptrs[4 * lo + 3];
        const real gj = g[j];
        const real mj = b1 * m[j] + ((real)1 - b1) * gj;
        const real vj = b2 * v[j] + ((real)1 - b2) * gj * gj;
        m[j] = mj;
        v[j] = vj;
        const real wd = decay[lo] ? lr_wd : (real)0;
        p[j] = p[j] * ((real)1 - wd) - step_size * (mj / (sqrt(vj) / sqrt_bc2 + eps));
    }
}
"""

RAW_SOURCES = {
    "layernorm_forward": (LAYERNORM_FORWARD, "minidpo_layernorm_forward"),
    "layernorm_backward_dx": (LAYERNORM_BACKWARD_DX, "minidpo_layernorm_backward_dx"),
    "masked_softmax": (MASKED_SOFTMAX, "minidpo_masked_softmax"),
    "logsoftmax_gather": (LOGSOFTMAX_GATHER, "minidpo_logsoftmax_gather"),
    "logsoftmax_gather_backward": (LOGSOFTMAX_GATHER_BACKWARD, "minidpo_logsoftmax_gather_backward"),
    "adamw_multi_tensor": (ADAMW_MULTI_TENSOR, "minidpo_adamw_multi_tensor"),
}
ELEMENTWISE_SOURCES = {"gelu_forward": GELU_FORWARD, "gelu_backward": GELU_BACKWARD,
                       "softmax_backward": SOFTMAX_BACKWARD}
REDUCTION_SOURCES = {"layernorm_dw": LAYERNORM_DW}

_REAL = {"float32": ("float", "(-__int_as_float(0x7f800000))"),
         "float64": ("double", "(-__longlong_as_double(0x7ff0000000000000LL))")}


def raw_source(name: str, dtype) -> str:
    """The complete CUDA C source of RawKernel ``name`` for float32 or float64."""
    real, neg_inf = _REAL[np.dtype(dtype).name]
    return f"typedef {real} real;\n#define NEG_INF {neg_inf}\n" + RAW_SOURCES[name][0]


# ---------------------------------------------------------------------------------------------
# building kernels (lazily, once per dtype)
# ---------------------------------------------------------------------------------------------

_BUILT: dict = {}


def _cupy():
    import cupy  # only reached with CuPy arrays in hand

    return cupy


def _raw(name: str, dtype):
    key = ("raw", name, np.dtype(dtype).name)
    k = _BUILT.get(key)
    if k is None:
        if np.dtype(dtype).name not in _REAL:
            raise TypeError(f"kernel {name}: float32 or float64 arrays only, got {np.dtype(dtype)}")
        k = _cupy().RawKernel(raw_source(name, dtype), RAW_SOURCES[name][1])
        _BUILT[key] = k
    return k


def _elementwise(name: str):
    k = _BUILT.get(name)
    if k is None:
        k = _cupy().ElementwiseKernel(**ELEMENTWISE_SOURCES[name])
        _BUILT[name] = k
    return k


def _reduction(name: str):
    k = _BUILT.get(name)
    if k is None:
        k = _cupy().ReductionKernel(**REDUCTION_SOURCES[name])
        _BUILT[name] = k
    return k


def _threads(width: int) -> int:
    """Threads per block for a row of ``width``: a multiple of 32 in [32, 1024]."""
    return int(min(1024, max(32, 32 * math.ceil(min(width, 256) / 32))))


def _grid_stride(total: int, threads: int = 256) -> int:
    """Blocks for a grid-stride loop over ``total`` entries (enough to fill any current GPU)."""
    return int(max(1, min(math.ceil(total / threads), 65535 * 8)))


def _contiguous(*arrays):
    xp = get_array_module(*arrays)
    return [xp.ascontiguousarray(a) for a in arrays]


# ---------------------------------------------------------------------------------------------
# the kernels' Python faces (CuPy arrays in, CuPy arrays out)
# ---------------------------------------------------------------------------------------------


def gelu_forward(x):
    """GELU (tanh form) in one pass; twin: layers.gelu_forward. Any shape."""
    return _elementwise("gelu_forward")(x)


def gelu_backward(dy, x):
    """dx = dy * GELU'(x) in one pass; twin: layers.gelu_backward."""
    return _elementwise("gelu_backward")(dy, x)


def layernorm_forward(x2, w, b, eps: float):
    """One block per row: (y (N, C), mean (N, 1), rstd (N, 1)) for x2 (N, C), w, b (C,).
    Twin: layers.layernorm_forward."""
    x2, w, b = _contiguous(x2, w, b)
    cp = _cupy()
    N, C = x2.shape
    y = cp.empty_like(x2)
    mean = cp.empty((N, 1), dtype=x2.dtype)
    rstd = cp.empty((N, 1), dtype=x2.dtype)
    if N:
        _raw("layernorm_forward", x2.dtype)((N,), (_threads(C),),
                                            (x2, w, b, y, mean, rstd, np.int64(N), np.int32(C),
                                             x2.dtype.type(eps)))
    return y, mean, rstd


def layernorm_backward(dy2, x2, w, mean, rstd):
    """(dx (N, C), dw (C,), db (C,)) for layernorm_forward; twin: layers.layernorm_backward.
    dx: one block per row; dw: one reduction kernel (no (N, C) temporary); db: a column sum."""
    dy2, x2, w, mean, rstd = _contiguous(dy2, x2, w, mean, rstd)
    cp = _cupy()
    N, C = x2.shape
    dx = cp.empty_like(x2)
    if N:
        _raw("layernorm_backward_dx", x2.dtype)((N,), (_threads(C),),
                                                (dy2, x2, w, mean, rstd, dx, np.int64(N), np.int32(C)))
    dw = _reduction("layernorm_dw")(dy2, x2, mean, rstd, axis=0)  # (C,)
    db = dy2.sum(axis=0)  # (C,)
    return dx, dw, db


def masked_softmax_(scores, scale: float, start, hidden_lo, hidden_hi, q0: int, self0: int, k0: int):
    """In place: scores (b, H, nq, nk) -> softmax over the last axis of scale * scores, over the
    keys each query sees (the layout's start, hidden_lo, hidden_hi (b, S) int64; query i reads
    column q0 + i, sits at key index self0 + i; the row holds keys k0..k0 + nk - 1), 0 elsewhere.
    Twin: layers.softmax of the scaled scores where layers.sees, -inf elsewhere."""
    if not scores.flags.c_contiguous:
        raise ValueError("masked_softmax_ needs a C-contiguous scores array (it works in place)")
    cp = _cupy()
    b, H, nq, nk = scores.shape
    start, hidden_lo, hidden_hi = (cp.ascontiguousarray(a, dtype=cp.int64) for a in (start, hidden_lo, hidden_hi))
    rows = scores.size // nk if nk else 0
    if rows:
        _raw("masked_softmax", scores.dtype)((rows,), (_threads(nk),),
                                             (scores, start, hidden_lo, hidden_hi, np.int64(rows), np.int32(H),
                                              np.int32(nq), np.int32(nk), np.int64(start.shape[1]), np.int64(q0),
                                              np.int64(self0), np.int64(k0), scores.dtype.type(scale)))
    return scores


def softmax_backward_(datt, att, delta):
    """In place: datt <- att * (datt - delta) (delta broadcast over the last axis), one pass.
    Twin: the ``ds`` line of layers.attention_backward."""
    _elementwise("softmax_backward")(att, delta, datt)
    return datt


def logsoftmax_gather(logits, labels):
    """(lp (M,), lse (M,)) with lse = logsumexp of each row of logits (M, V) and lp = logits[m,
    labels[m]] - lse, in one read of each row. Twin: logprobs.token_logps."""
    cp = _cupy()
    logits = cp.ascontiguousarray(logits)
    labels = cp.ascontiguousarray(labels, dtype=cp.int64)
    M, V = logits.shape
    lp = cp.empty((M,), dtype=logits.dtype)
    lse = cp.empty((M,), dtype=logits.dtype)
    if M:
        _raw("logsoftmax_gather", logits.dtype)((M,), (_threads(V),),
                                                (logits, labels, lp, lse, np.int64(M), np.int64(V)))
    return lp, lse


def logsoftmax_gather_backward(logits, lse, labels, g, out=None):
    """dlogits (M, V) = g[m] (onehot(labels[m]) - softmax(logits[m])), written in one pass. ``out``
    may be ``logits`` itself (then it is overwritten). Twin: logprobs.token_logps_backward.
    lse, labels, g: (M,)."""
    cp = _cupy()
    if not logits.flags.c_contiguous:
        raise ValueError("logsoftmax_gather_backward needs C-contiguous logits")
    M, V = logits.shape
    if out is None:
        out = cp.empty_like(logits)
    elif out.shape != logits.shape or out.dtype != logits.dtype or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array of the logits' shape and dtype")
    lse, g = _contiguous(lse.astype(logits.dtype, copy=False), g.astype(logits.dtype, copy=False))
    labels = cp.ascontiguousarray(labels, dtype=cp.int64)
    total = M * V
    if total:
        _raw("logsoftmax_gather_backward", logits.dtype)((_grid_stride(total),), (256,),
                                                         (logits, lse, labels, g, out, np.int64(M), np.int64(V)))
    return out


def adamw_multi_tensor(params, grads, ms, vs, decay, b1, b2, eps, step_size, sqrt_bc2, lr_wd) -> None:
    """optim.py's AdamW update (A) for every tensor, in place, in one kernel launch.

    Args:
        params, grads, ms, vs: equal-length lists of C-contiguous CuPy arrays of one dtype;
            tensor k's four arrays have one shape.
        decay: list of bools, whether tensor k decays.
        b1, b2, eps, step_size, sqrt_bc2, lr_wd: Python floats (as optim.AdamW.step computes).
    Twin: optim.adamw_update, applied tensor by tensor.
    """
    cp = _cupy()
    K = len(params)
    if not (len(grads) == len(ms) == len(vs) == len(decay) == K) or K == 0:
        raise ValueError("adamw_multi_tensor: params, grads, ms, vs and decay must be equal, non-empty lists")
    dtype = params[0].dtype
    grads = [g if g.flags.c_contiguous else cp.ascontiguousarray(g) for g in grads]
    for arrs in (params, ms, vs):
        if not all(a.flags.c_contiguous for a in arrs):
            raise ValueError("adamw_multi_tensor: parameters and moments must be C-contiguous (updated in place)")
    ptrs = np.array([[p.data.ptr, g.data.ptr, m.data.ptr, v.data.ptr]
                     for p, g, m, v in zip(params, grads, ms, vs)], dtype=np.uint64).reshape(-1)
    offsets = np.zeros(K + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([p.size for p in params])
    total = int(offsets[-1])
    d_ptrs, d_offsets = cp.asarray(ptrs), cp.asarray(offsets)
    d_decay = cp.asarray(np.array(decay, dtype=np.int8))
    t = dtype.type
    if total:
        _raw("adamw_multi_tensor", dtype)((_grid_stride(total),), (256,),
                                          (d_ptrs, d_offsets, d_decay, np.int32(K), t(b1), t(b2), t(eps),
                                           t(step_size), t(sqrt_bc2), t(lr_wd)))
    # grads the kernel reads through raw pointers must outlive the queued launch: CuPy's pool may
    # hand a freed block to the next allocation, but on the same stream it is only reused after
    # this kernel has run, so holding references to the end of this call is enough.


# ---------------------------------------------------------------------------------------------
# twins: the plain functions each kernel replaces, called with the kernel's arguments
# ---------------------------------------------------------------------------------------------


def _twin_gelu_forward(x):
    return layers.gelu_forward(x)[0]


def _twin_gelu_backward(dy, x):
    return layers.gelu_backward(dy, x)[0]


def _twin_layernorm_forward(x2, w, b, eps):
    y, (_, _, mean, rstd) = layers.layernorm_forward(x2, w, b, eps)
    return y, mean, rstd  # (N, C), (N, 1), (N, 1)


def _twin_layernorm_backward(dy2, x2, w, mean, rstd):
    dx, g = layers.layernorm_backward(dy2, (x2, w, mean, rstd))
    return dx, g["w"], g["b"]


def _twin_masked_softmax_(scores, scale, start, hidden_lo, hidden_hi, q0, self0, k0):
    xp = get_array_module(scores)
    nq, nk = scores.shape[-2:]
    q = slice(q0, q0 + nq)
    seen = layers.sees(k0 + nk, start[:, q], hidden_lo[:, q], hidden_hi[:, q], self0)[:, None, :, k0:]  # (b, 1, nq, nk)
    scores[...] = layers.softmax(xp.where(seen, scores * scale, -math.inf))
    return scores


def _twin_softmax_backward_(datt, att, delta):
    datt[...] = att * (datt - delta)
    return datt


def _twin_logsoftmax_gather(logits, labels):
    lp, cache = logprobs.token_logps(logits, labels)
    return lp, cache["lse"]


def _twin_logsoftmax_gather_backward(logits, lse, labels, g, out=None):
    d = logprobs.token_logps_backward(g, {"logits": logits, "labels": labels, "lse": lse})
    if out is None:
        return d
    out[...] = d
    return out


TWINS = {
    "gelu_forward": (gelu_forward, _twin_gelu_forward),
    "gelu_backward": (gelu_backward, _twin_gelu_backward),
    "layernorm_forward": (layernorm_forward, _twin_layernorm_forward),
    "layernorm_backward": (layernorm_backward, _twin_layernorm_backward),
    "masked_softmax_": (masked_softmax_, _twin_masked_softmax_),
    "softmax_backward_": (softmax_backward_, _twin_softmax_backward_),
    "logsoftmax_gather": (logsoftmax_gather, _twin_logsoftmax_gather),
    "logsoftmax_gather_backward": (logsoftmax_gather_backward, _twin_logsoftmax_gather_backward),
}
"""name -> (kernel function, twin function), the twin taking the same arguments. optim.py adds
"adamw_multi_tensor" (its twin is optim's own per-tensor update) through :func:`register_twin`."""


def register_twin(name: str, twin) -> None:
    """Record the plain twin of kernel ``name`` (for a module this one may not import)."""
    TWINS[name] = (globals()[name], twin)


# ---------------------------------------------------------------------------------------------
# every CUDA source as a standalone translation unit (for `nvcc -c`, no GPU needed)
# ---------------------------------------------------------------------------------------------

_CTYPES = {"float32": "float", "float64": "double", "int64": "long long", "int32": "int", "int8": "signed char",
           "bool": "bool"}


def _param_decls(params: str, kind: str):
    """Declarations for an ElementwiseKernel/ReductionKernel parameter list: (kernel arguments,
    per-element bindings). ``kind`` is "in" or "out"."""
    args, binds = [], []
    for item in filter(None, (s.strip() for s in params.split(","))):
        parts = item.split()
        raw = parts[0] == "raw"
        typ, name = parts[-2], parts[-1]
        ctype = "T" if typ == "T" else _CTYPES[typ]  # T is typedef'd to real, as CuPy does
        if raw:
            args.append(f"{'const ' if kind == 'in' else ''}{ctype}* __restrict__ {name}")
        elif kind == "in":
            args.append(f"const {ctype}* __restrict__ _in_{name}")
            binds.append(f"const {ctype} {name} = _in_{name}[i];")
        else:
            args.append(f"{ctype}* __restrict__ _out_{name}")
            binds.append(f"{ctype}& {name} = _out_{name}[i];")
    return args, binds


def _elementwise_unit(spec: dict, real: str) -> str:
    ins, in_b = _param_decls(spec["in_params"], "in")
    outs, out_b = _param_decls(spec["out_params"], "out")
    binds = "\n    ".join(in_b + out_b)
    return (f"typedef {real} T;\n"
            f"extern \"C\" __global__ void {spec['name']}_check({', '.join(ins + outs)}, const long long n) {{\n"
            f"  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
            f"  if (i >= n) return;\n    {binds}\n  {{ {spec['operation']} }}\n}}\n")


def _reduction_unit(spec: dict, real: str) -> str:
    ins, in_b = _param_decls(spec["in_params"], "in")
    outs, out_b = _param_decls(spec["out_params"], "out")
    return (f"typedef {real} T;\n"
            f"extern \"C\" __global__ void {spec['name']}_check({', '.join(ins + outs)}, const long long n) {{\n"
            f"  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
            f"  if (i >= n) return;\n  {' '.join(in_b)}\n"
            f"  T a = (T)({spec['identity']});\n"
            f"  {{ T b = ({spec['map_expr']}); a = ({spec['reduce_expr']}); }}\n"
            f"  {{ {' '.join(out_b)} {spec['post_map_expr']}; }}\n}}\n")


def cuda_sources() -> dict[str, str]:
    """Every kernel as a standalone CUDA C++ unit, for float and double: name -> source.

    RawKernel sources are used as they are. ElementwiseKernel and ReductionKernel bodies are
    wrapped in an equivalent ``__global__`` function (in params bound to values, out params to
    references, as CuPy binds them), so ``nvcc -c`` checks the code CuPy would compile."""
    out = {}
    for dtype, (real, _) in _REAL.items():
        sfx = "f32" if dtype == "float32" else "f64"
        for name in RAW_SOURCES:
            out[f"{name}_{sfx}"] = raw_source(name, dtype)
        for name, spec in ELEMENTWISE_SOURCES.items():
            out[f"{name}_{sfx}"] = _elementwise_unit(spec, real)
        for name, spec in REDUCTION_SOURCES.items():
            out[f"{name}_{sfx}"] = _reduction_unit(spec, real)
    return out
