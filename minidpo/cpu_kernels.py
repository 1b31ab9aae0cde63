"""Compiled CPU kernels (Numba): the fast path's fused passes on NumPy arrays.

NumPy runs ``u = x * x; u *= c; ...; np.tanh(u, out=u); ...`` as one pass over memory per line.
The kernels here do each layer's elementwise or row-wise work in one loop, the CPU counterpart of
kernels.py's CUDA kernels, with the same math (the twins are the same plain functions):

    kernel                          does                                              twin
    gelu_forward / gelu_backward    GELU and its derivative, elementwise              layers.gelu_*
    layernorm_forward               mean, rstd and the normalised row, row by row     layers.layernorm_forward
    layernorm_backward              dx row by row; dw and db summed over the rows     layers.layernorm_backward
    masked_softmax_                 scale, the layout's mask, softmax of attention    layers.softmax + layers.sees
    softmax_backward_               ds = att * (datt - delta)                         layers.attention_backward
    logsoftmax_gather               logsumexp of a row and the label's log-prob       logprobs.token_logps
    logsoftmax_gather_backward_     g * (onehot - softmax), in place                  logprobs.token_logps_backward
    scatter_add_rows                target[idx[i]] += values[i], repeats accumulated  backend.scatter_add

Each kernel works on the rows (or the flat range) it is given and releases the GIL, so fast.py
shares the rows among its thread pool exactly as it does for its NumPy passes. Every kernel
computes in its arrays' own dtype: float32 in training, float64 in the gradient checks.

exp on float32 is computed in the loop (2^n e^r: a degree-7 polynomial for e^r on |r| <= ln2/2,
2^n from the exponent bits, within 4 ulp of the true value), so that the compiler can vectorize
it; NumPy's own exp is vectorized, Numba's call to the C library's is not. float64 uses
``math.exp``. GELU uses 0.5 (1 + tanh z) = 1 / (1 + exp(-2 z)), which needs exp only.

Numba is optional (``pip install minidpo[fast]``). fast.py imports this module on first use
only, so ``import minidpo`` never imports Numba; without it (or with ``MINIDPO_CPU_KERNELS=0``)
the fast path runs its NumPy passes. Compiled code is cached on disk by Numba (``cache=True``).

Shape letters: B batch, T time, C channels, V vocabulary, M score matrices, L keys.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from . import layers

__all__ = [
    "gelu_forward",
    "gelu_backward",
    "layernorm_forward",
    "layernorm_backward",
    "masked_softmax_",
    "softmax_backward_",
    "logsoftmax_gather",
    "logsoftmax_gather_backward_",
    "scatter_add_rows",
]

# fastmath without 'nnan'/'ninf': a NaN or inf in the input still reaches the output, so a
# diverging run is still caught by the trainer's finiteness checks. 'reassoc' lets the row sums
# vectorize; error_model="numpy": x / 0 is inf, not an exception (and the loops vectorize).
_FLAGS = {"reassoc", "contract", "arcp", "nsz", "afn"}
_jit = numba.njit(nogil=True, cache=True, fastmath=_FLAGS, error_model="numpy")
_inline = numba.njit(inline="always", fastmath=_FLAGS, error_model="numpy")

_GELU_K, _GELU_C = layers.GELU_K, layers.GELU_C  # GELU's tanh approximation, as layers.py


# ------------------------------------------------------------------------------------ scalars


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 = _LN2_HI + _LN2_LO; n * _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.4286068203094172e-06


@_inline
def _exp32(x):
    """exp(x) for a float32 x: x = n ln2 + r, |r| <= ln2 / 2; e^r by Horner; 2^n as exponent bits.
    Below -87.34 (where float32's normal range ends) the result is 0; above 88.37 (where n would
    reach 128) it is inf, though the true value overflows only at 88.72: the kernels here take
    exp of x <= 0 (softmax, log-softmax) or only need 1 / (1 + exp) to be 0 there (GELU).
    NaN stays NaN."""
    small = x < np.float32(-87.33654)
    big = x > np.float32(88.37626)
    y = np.float32(-87.33654) if x < np.float32(-87.33654) else x  # written so that a NaN passes
    y = np.float32(88.37626) if y > np.float32(88.37626) else y
    n = np.floor(y * np.float32(_LOG2E) + np.float32(0.5))  # float32, -126..127
    r = y - n * np.float32(_LN2_HI) - n * np.float32(_LN2_LO)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    e = p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    e = np.float32(np.inf) if big else e
    return np.float32(0.0) if small else e


def _exp(x):  # typed by the overload below
    raise NotImplementedError


@overload(_exp, inline="always", fastmath=_FLAGS)
def _exp_typed(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: math.exp(x)


def _cast(value, like):  # value (a Python float) in the dtype of ``like`` (an array or a scalar)
    raise NotImplementedError


@overload(_cast, inline="always")
def _cast_typed(value, like):
    dt = like.dtype if isinstance(like, types.Array) else like
    to = np.float32 if dt == types.float32 else np.float64
    return lambda value, like: to(value)


@numba.njit(nogil=True, cache=True, fastmath=True)
def _row_max(row):
    """max of a non-empty 1-D array. Eight running maxima, so that the loop vectorizes (a single
    running max does not); full fastmath: a NaN in the row gives some value here, and the caller's
    exp(x - max) still turns that row into NaN."""
    n = row.size
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = row[0]
    j = 0
    while j + 8 <= n:
        a0 = max(a0, row[j])
        a1 = max(a1, row[j + 1])
        a2 = max(a2, row[j + 2])
        a3 = max(a3, row[j + 3])
        a4 = max(a4, row[j + 4])
        a5 = max(a5, row[j + 5])
        a6 = max(a6, row[j + 6])
        a7 = max(a7, row[j + 7])
        j += 8
    while j < n:
        a0 = max(a0, row[j])
        j += 1
    return max(max(max(a0, a1), max(a2, a3)), max(max(a4, a5), max(a6, a7)))


# ------------------------------------------------------------------------------------ GELU


@_jit
def gelu_forward(x, y):
    """y = 0.5 x (1 + tanh z) = x / (1 + exp(-2 z)),  z = k (x + c x^3).   x, y: flat (n,)."""
    k = _cast(-2.0 * _GELU_K, x)
    c = _cast(_GELU_C, x)
    one = _cast(1.0, x)
    for i in range(x.size):
        v = x[i]
        y[i] = v / (one + _exp(k * (v + c * v * v * v)))


@_jit
def gelu_backward(dy, x, dx):
    """dx = dy (s + 2 x s (1 - s) dz/dx),  s = (1 + tanh z) / 2 = 1 / (1 + exp(-2 z)),
    dz/dx = k (1 + 3 c x^2)   (0.5 (1 - tanh^2 z) = 2 s (1 - s)).   dy, x, dx: flat (n,)."""
    k = _cast(_GELU_K, x)
    c = _cast(_GELU_C, x)
    one = _cast(1.0, x)
    two = _cast(2.0, x)
    three_c = _cast(3.0 * _GELU_C, x)
    for i in range(x.size):
        v = x[i]
        v2 = v * v
        s = one / (one + _exp(-two * k * (v + c * v2 * v)))
        dz = k * (one + three_c * v2)
        dx[i] = dy[i] * (s + two * v * s * (one - s) * dz)


# ------------------------------------------------------------------------------------ layernorm


@_jit
def layernorm_forward(x, w, b, eps, y, mean, rstd):
    """Rows of layers.layernorm_forward: mean = mean_c x; rstd = 1 / sqrt(mean_c (x - mean)^2 + eps);
    y = (x - mean) rstd w + b.   x, y (n, C); w, b (C,); mean, rstd (n,)."""
    n, C = x.shape
    inv_c = _cast(1.0, x) / _cast(C, x)
    e = _cast(eps, x)
    for r in range(n):
        s = _cast(0.0, x)
        for j in range(C):
            s += x[r, j]
        m = s * inv_c
        q = _cast(0.0, x)
        for j in range(C):
            d = x[r, j] - m
            q += d * d
        rs = _cast(1.0, x) / _cast(math.sqrt(q * inv_c + e), x)
        mean[r] = m
        rstd[r] = rs
        for j in range(C):
            y[r, j] = (x[r, j] - m) * rs * w[j] + b[j]


@_jit
def layernorm_backward(dy, x, w, mean, rstd, dx, dw, db):
    """Rows of layers.layernorm_backward: with x_hat = (x - mean) rstd and g = dy w,
    dx = rstd (g - mean_c g - x_hat mean_c (g x_hat)); dw += sum over the rows of dy x_hat,
    db += sum over the rows of dy (dw, db: this part's sums, added to what they hold).
    dy, x, dx (n, C); w, dw, db (C,); mean, rstd (n,)."""
    n, C = x.shape
    inv_c = _cast(1.0, x) / _cast(C, x)
    for r in range(n):
        m = mean[r]
        rs = rstd[r]
        sg = _cast(0.0, x)
        sgx = _cast(0.0, x)
        for j in range(C):
            xh = (x[r, j] - m) * rs
            g = dy[r, j] * w[j]
            sg += g
            sgx += g * xh
            dw[j] += dy[r, j] * xh
            db[j] += dy[r, j]
        mg = sg * inv_c
        mgx = sgx * inv_c
        for j in range(C):
            xh = (x[r, j] - m) * rs
            dx[r, j] = rs * (dy[r, j] * w[j] - mg - xh * mgx)


# ------------------------------------------------------------------------------------ attention


@_jit
def _exp_sum_(seg, sc, mx):
    """In place: seg[j] = exp(seg[j] sc - mx); returns their sum."""
    s = _cast(0.0, seg)
    for j in range(seg.size):
        e = _exp(seg[j] * sc - mx)
        seg[j] = e
        s += e
    return s


@_inline
def _scale_(seg, c):
    """In place: seg *= c."""
    for j in range(seg.size):
        seg[j] *= c


@_inline
def _fill_(seg, v):
    """In place: seg[:] = v."""
    for j in range(seg.size):
        seg[j] = v


@_jit
def masked_softmax_(att, H, scale, start, hidden_lo, hidden_hi, q0, self0, k0):
    """In place: att (b H, nq, nk), the scores of a query block (matrix mi is batch row mi // H) ->
    softmax over the last axis of scale * att, over the keys each query sees, 0 elsewhere.
    Query i reads column q0 + i of its row of start, hidden_lo, hidden_hi (b, S) and sits at key
    index self0 + i; the block holds keys k0..k0 + nk - 1; key j is visible iff
    start <= j <= self0 + i and not hidden_lo <= j < hidden_hi (layers.sees): block-locally the
    run [first, last), less the hidden run [lo, hi) when a query has one (a shared prompt's
    rejected token). Each run is a view indexed from 0 (the loops vectorize)."""
    M, nq, nk = att.shape
    sc = _cast(scale, att)
    zero = _cast(0.0, att)
    for mi in range(M):
        bi = mi // H
        for i in range(nq):
            first = max(start[bi, q0 + i] - k0, 0)
            last = min(self0 + i - k0 + 1, nk)
            lo = min(max(hidden_lo[bi, q0 + i] - k0, first), last)
            hi = min(max(hidden_hi[bi, q0 + i] - k0, lo), last)
            row = att[mi, i]
            if hi > lo:  # two visible runs: [first, lo) and [hi, last)
                a, b = row[first:lo], row[hi:last]
                mx = _cast(-np.inf, att)
                if a.size:
                    mx = max(mx, _row_max(a))
                if b.size:
                    mx = max(mx, _row_max(b))
                mx = mx * sc  # scale > 0
                inv = _cast(1.0, mx) / (_exp_sum_(a, sc, mx) + _exp_sum_(b, sc, mx))
                _scale_(a, inv)
                _scale_(b, inv)
                _fill_(row[lo:hi], zero)
            else:  # one run, the causal case
                a = row[first:last]
                mx = _row_max(a) * sc
                _scale_(a, _cast(1.0, mx) / _exp_sum_(a, sc, mx))
            _fill_(row[:first], zero)
            _fill_(row[last:], zero)


@_jit
def softmax_backward_(ds, att, delta):
    """In place: ds (M, nq, L) <- att * (ds - delta), delta (M, nq) broadcast over the keys."""
    M, nq, L = ds.shape
    for mi in range(M):
        for i in range(nq):
            d = delta[mi, i]
            for j in range(L):
                ds[mi, i, j] = att[mi, i, j] * (ds[mi, i, j] - d)


# ------------------------------------------------------------------------------------ log pi(y|x)


@_jit
def logsoftmax_gather(logits, labels, lp, lse, m0, m1):
    """Rows m0..m1-1 of logprobs.token_logps: lse = logsumexp_v logits[m]; lp = logits[m, labels[m]]
    - lse. logits (M, V); labels (M,) int; lp, lse (M,)."""
    M, V = logits.shape
    zero = _cast(0.0, logits)
    for m in range(m0, m1):
        mx = _row_max(logits[m])
        s = zero
        for v in range(V):
            s += _exp(logits[m, v] - mx)
        z = mx + _cast(math.log(s), logits)
        lse[m] = z
        lp[m] = logits[m, labels[m]] - z


@_jit
def logsoftmax_gather_backward_(dlogits, lse, labels, g, m0, m1):
    """In place, rows m0..m1-1 of logprobs.token_logps_backward: dlogits holds the logits on entry
    and on exit dlogits[m] = g[m] (onehot(labels[m]) - exp(logits[m] - lse[m])) (one array read and
    written in place: the loop vectorizes). dlogits (M, V); lse, g (M,); labels (M,) int."""
    M, V = dlogits.shape
    for m in range(m0, m1):
        z = lse[m]
        gg = g[m]
        for v in range(V):
            dlogits[m, v] = -gg * _exp(dlogits[m, v] - z)
        dlogits[m, labels[m]] += gg


# ------------------------------------------------------------------------------------ embedding


@_jit
def scatter_add_rows(target, idx, values):
    """In place: target[idx[i]] += values[i] for i in order, repeated rows accumulated (the
    embedding backward's dwte). target (V, C); idx (M,) int in 0..V-1; values (M, C)."""
    M, C = values.shape
    for i in range(M):
        r = idx[i]
        for j in range(C):
            target[r, j] += values[i, j]
