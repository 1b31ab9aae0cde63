"""The fast paths: layers.py and logprobs.py made fast, with the same signatures.

Read layers.py and logprobs.py for the math; this module computes the same numbers (to
round-off; tests/test_fast.py checks every function against its plain twin) with:

- cache blocking on the CPU: GELU's elementwise chain and the log-softmax over the (M, V)
  logits run in pieces that stay in the cache, in place, with no full-size temporaries;
- the causal skip: attention cuts its queries into blocks, each scored only against the keys
  it can see (the batch layout's blocks: packing.query_blocks);
- fused CUDA kernels (kernels.py) on CuPy arrays, one visible ``if kernels.use(x):`` per layer;
- fused compiled CPU kernels (cpu_kernels.py, Numba, when installed) on NumPy arrays, one visible
  ``ck = rt.cpu_kernels(x)`` per layer; their rows are shared among the threads like the NumPy
  passes. Where they run and on how many threads is runtime.py's business, not this module's.

One switch picks the path for the model, the trainer and everything built on them:

    ops()                       the functions in use: this module (default) or the plain ones
    set_plain(True)             use the plain reference everywhere (for reading, and for checks)
    with plain():               the same, inside a block

Shapes: B batch, T time, C channels, V vocabulary, H heads, D head size, N = B * T rows,
M scored tokens.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np

from . import checks, kernels, layers, logprobs
from . import runtime as rt
from .backend import get_array_module, scatter_add
from .logprobs import log_softmax, log_softmax_backward, logsumexp
from .packing import query_blocks

__all__ = ["ops", "set_plain", "is_plain", "plain", "PLAIN", "FAST", "embedding_forward", "embedding_backward",
           "linear_forward", "linear_backward", "layernorm_forward", "layernorm_backward", "gelu_forward",
           "gelu_backward", "attention_forward", "attention_backward", "attention_forward_kv", "unembed_forward",
           "unembed_backward", "softmax", "token_logps", "token_logps_backward", "sequence_logps",
           "sequence_logps_backward"]

# ------------------------------------------------------------------------------------ the switch

_PLAIN = False


def set_plain(flag: bool = True) -> None:
    """Use the plain reference (True) or the fast paths (False, the default) from now on."""
    global _PLAIN
    _PLAIN = bool(flag)


def is_plain() -> bool:
    return _PLAIN


@contextlib.contextmanager
def plain(flag: bool = True):
    """``with plain():`` runs the plain reference inside the block (``plain(False)``: the fast one)."""
    old = _PLAIN
    set_plain(flag)
    try:
        yield
    finally:
        set_plain(old)


def ops():
    """The namespace of layer and log-prob functions in use: :data:`PLAIN` or :data:`FAST`."""
    return PLAIN if _PLAIN else FAST


# ------------------------------------------------------------------------------------ embedding, linear


def embedding_forward(idx, wte, wpe, position_ids=None):
    """layers.embedding_forward, the position rows added in place."""
    T = idx.shape[1]
    x = wte[idx]  # (B, T, C)
    x += wpe[:T] if position_ids is None else wpe[position_ids]
    return x, (idx, position_ids, wte.shape, wpe.shape)


def embedding_backward(dx, cache, dwte=None):
    """layers.embedding_backward; positions 0..T-1 (a padded batch) by a sum over B instead of a
    scatter-add; the scatter-adds compiled (cpu_kernels.scatter_add_rows) when available."""
    idx, position_ids, wte_shape, wpe_shape = cache
    xp = get_array_module(dx)
    B, T, C = dx.shape
    dx2 = dx.reshape(B * T, C)  # (N, C)
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)  # (V, C)
    ck = rt.cpu_kernels(dwte, dx2) if dwte.flags.c_contiguous and dx2.flags.c_contiguous and dwte.dtype == dx2.dtype \
        else None
    if ck:  # np.add.at's row by row loop, compiled
        ck.scatter_add_rows(dwte, np.ascontiguousarray(idx.reshape(-1), dtype=np.int64), dx2)
    else:
        scatter_add(dwte, idx.reshape(-1), dx2)
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)  # (n_ctx, C)
    if position_ids is None:
        dwpe[:T] = dx.sum(axis=0)  # positions 0..T-1 are distinct: a plain sum over B
    elif position_ids.ndim == 1:
        scatter_add(dwpe, position_ids, dx.sum(axis=0))  # (T,) ids, (T, C) values
    elif ck:  # per-token positions (a packed layout): the compiled scatter-add
        ck.scatter_add_rows(dwpe, np.ascontiguousarray(position_ids.reshape(-1), dtype=np.int64), dx2)
    else:
        scatter_add(dwpe, position_ids.reshape(-1), dx2)  # (N,) ids, (N, C) values
    return None, {"wte": dwte, "wpe": dwpe}


def _matmul(a, b, out):
    """out (M, P) = a (M, K) @ b (K, P) on NumPy: MKL's GEMM or np.matmul (see runtime.gemm_lib)."""
    lib = rt.gemm_lib()
    return lib.matmul(a, b, out) if lib is not None else np.matmul(a, b, out=out)


def _bmm(mkl, a, b, out):
    """out = a @ b for stacks of matrices (a (P, Q, M, K), b (P, Q, K, N)): through MKL's batched
    GEMM when ``mkl`` is mkl_blas, else the arrays' own matmul."""
    return mkl.bmm(a, b, out) if mkl is not None else get_array_module(a).matmul(a, b, out=out)


def _numpy(*arrays) -> bool:
    return all(type(a) is np.ndarray for a in arrays)


def _matmul_rows(a, b, bias=None):
    """a (M, K) @ b (K, P) (+ bias (P,), added in place), the rows of a shared among the threads."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))

    def part(s):
        _matmul(a[s], b, out[s])
        if bias is not None:
            out[s] += bias

    rt.parallel_for(part, rt.parts(a.shape[0], a.shape[1] * b.shape[1]))
    return out


def _two_products(a, b, p, q, db_of=None):
    """The two products of a matrix product's backward, at once, each on half the threads:
    (a @ b, p^T @ q) with a (N, I), b (I, J), p (N, R), q (N, S) -> (N, J), (R, S); the first
    by rows of a, the second by its own rows (p[:, s]^T @ q). ``db_of`` (N, S): also its column
    sums (the bias gradient), by columns. Returns (a @ b, p^T @ q, sums or None)."""
    N = a.shape[0]
    dt = np.result_type(a, b, p, q)
    first = np.empty((N, b.shape[1]), dtype=dt)
    second = np.empty((p.shape[1], q.shape[1]), dtype=dt)
    sums = None if db_of is None else np.empty(db_of.shape[1], dtype=dt)
    half = rt.half_threads()  # both products cost N I J = N R S multiply-adds
    tasks = [(0, s) for s in rt.parts(N, a.shape[1] * b.shape[1], threads=half)]
    tasks += [(1, s) for s in rt.parts(p.shape[1], N * q.shape[1], threads=half)]
    if db_of is not None:
        tasks += [(2, s) for s in rt.parts(db_of.shape[1], N, threads=half)]

    def part(task):
        which, s = task
        if which == 0:
            _matmul(a[s], b, first[s])
        elif which == 1:
            _matmul(p[:, s].T, q, second[s])
        else:
            np.sum(db_of[:, s], axis=0, out=sums[s])

    rt.parallel_for(part, tasks)
    return first, second, sums


def linear_forward(x, w, b=None):
    """layers.linear_forward, the bias added in place; on NumPy the rows shared among the threads."""
    x2 = x.reshape(-1, w.shape[0])  # (N, Cin)
    if _numpy(x2, w):
        y = _matmul_rows(x2, w, bias=b)  # (N, Cout)
    else:
        y = x2 @ w  # (N, Cout)
        if b is not None:
            y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_backward(dy, cache):
    """layers.linear_backward; on NumPy dx by row parts, dw by parts of its rows (x[:, s]^T @ dy)
    and db by column parts, all on the pool at once."""
    x, w, has_bias = cache
    x2 = x.reshape(-1, w.shape[0])  # (N, Cin)
    dy2 = dy.reshape(-1, w.shape[1])  # (N, Cout)
    if not _numpy(x2, dy2, w):
        return layers.linear_backward(dy, cache)
    dx, dw, db = _two_products(dy2, w.T, x2, dy2, db_of=dy2 if has_bias else None)  # (N, Cin), (Cin, Cout)
    return dx.reshape(x.shape), {"w": dw, "b": db}


def unembed_forward(x, wte):
    """layers.unembed_forward; on NumPy the rows shared among the threads."""
    if not _numpy(x, wte):
        return layers.unembed_forward(x, wte)
    C = x.shape[-1]
    logits = _matmul_rows(x.reshape(-1, C), wte.T)  # (N, V)
    return logits.reshape(*x.shape[:-1], wte.shape[0]), (x, wte)


def unembed_backward(dlogits, cache):
    """layers.unembed_backward; on NumPy dx by row parts and dwte by parts of its rows
    (dlogits[:, s]^T @ x), on the pool at once."""
    x, wte = cache
    if not _numpy(dlogits, x, wte):
        return layers.unembed_backward(dlogits, cache)
    C = x.shape[-1]
    dl2 = dlogits.reshape(-1, wte.shape[0])  # (N, V)
    dx, dwte, _ = _two_products(dl2, wte, dl2, x.reshape(-1, C))  # (N, C), (V, C)
    return dx.reshape(x.shape), {"wte": dwte}


# ------------------------------------------------------------------------------------ layernorm


def _row_blocks(rows: slice, C: int) -> list[slice]:
    """The rows of one part cut into blocks of about runtime.BLOCK elements (their temporaries stay in L2)."""
    nb = max(1, rt.BLOCK // max(1, C))
    return [slice(i, min(i + nb, rows.stop)) for i in range(rows.start, rows.stop, nb)]


def _layernorm_forward_rows(x2, w, b, eps, y, mean, rstd, rows):
    """y, mean, rstd of layers.layernorm_forward for ``rows`` of x2 (N, C), block by block."""
    C = x2.shape[1]
    t = x2.dtype.type
    for r in _row_blocks(rows, C):
        x_, y_, m_, s_ = x2[r], y[r], mean[r], rstd[r]  # (n, C), (n, C), (n, 1), (n, 1)
        np.einsum("nc->n", x_, out=m_[:, 0])
        m_ *= t(1.0 / C)
        np.subtract(x_, m_, out=y_)  # centred; becomes the output in place
        np.einsum("nc,nc->n", y_, y_, out=s_[:, 0])
        s_ *= t(1.0 / C)
        s_ += t(eps)
        np.sqrt(s_, out=s_)
        np.reciprocal(s_, out=s_)  # rstd
        y_ *= s_  # x_hat
        y_ *= w
        y_ += b


def layernorm_forward(x, w, b, eps=1e-5):
    """layers.layernorm_forward: row sums as einsum (one read, no (N, C) square), in place, in
    row blocks shared among the threads. CuPy: one fused kernel, one block per row."""
    C = x.shape[-1]
    xp = get_array_module(x)
    x2 = x.reshape(-1, C)  # (N, C)
    if kernels.use(x):
        y, mean, rstd = kernels.layernorm_forward(x2, w, b, eps)  # (N, C), (N, 1), (N, 1)
        return y.reshape(x.shape), (x, w, mean, rstd)
    if xp is np:
        N = x2.shape[0]
        y = np.empty((N, C), dtype=x.dtype)
        mean = np.empty((N, 1), dtype=x.dtype)
        rstd = np.empty((N, 1), dtype=x.dtype)
        ck = rt.cpu_kernels(x2, w, b) if x2.flags.c_contiguous else None
        if ck:
            m1, r1 = mean.reshape(-1), rstd.reshape(-1)  # (N,) views
            rt.parallel_for(lambda r: ck.layernorm_forward(x2[r], w, b, eps, y[r], m1[r], r1[r]), rt.parts(N, C))
        else:
            rt.parallel_for(lambda r: _layernorm_forward_rows(x2, w, b, eps, y, mean, rstd, r), rt.parts(N, C))
        return y.reshape(x.shape), (x, w, mean, rstd)
    t = x.dtype.type
    mean = xp.einsum("nc->n", x2)[:, None]  # (N, 1)
    mean *= t(1.0 / C)
    y = x2 - mean  # (N, C) centred; becomes the output in place
    var = xp.einsum("nc,nc->n", y, y)[:, None]  # (N, 1)
    var *= t(1.0 / C)
    var += t(eps)
    rstd = xp.sqrt(var)
    xp.reciprocal(rstd, out=rstd)  # (N, 1)
    y *= rstd  # x_hat
    y *= w
    y += b
    return y.reshape(x.shape), (x, w, mean, rstd)


def _layernorm_dx_(g, xhat, rstd):
    """In place: g (n, C) = dy w on entry, dx = rstd (g - mean(g) - x_hat mean(g x_hat)) on exit;
    x_hat (n, C) is overwritten."""
    xp = get_array_module(g)
    t = g.dtype.type
    C = g.shape[1]
    m_g = xp.einsum("nc->n", g)[:, None]  # (n, 1)
    m_g *= t(1.0 / C)
    m_gx = xp.einsum("nc,nc->n", g, xhat)[:, None]  # (n, 1)
    m_gx *= t(1.0 / C)
    g -= m_g
    xhat *= m_gx
    g -= xhat
    g *= rstd


def _layernorm_backward_rows(dy2, x2, w, mean, rstd, dx, rows):
    """dx of layers.layernorm_backward for ``rows``, block by block."""
    C = x2.shape[1]
    for r in _row_blocks(rows, C):
        xhat = x2[r] - mean[r]  # (n, C)
        xhat *= rstd[r]
        np.multiply(dy2[r], w, out=dx[r])  # g = dy w
        _layernorm_dx_(dx[r], xhat, rstd[r])


def layernorm_backward(dy, cache):
    """layers.layernorm_backward: four einsum reductions, in place; dx in row blocks shared among
    the threads, dw and db over all rows at once.
    CuPy: dx by one kernel per row, dw by one reduction kernel."""
    x, w, mean, rstd = cache
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    dy2 = dy.reshape(-1, C)  # (N, C)
    mean, rstd = mean.reshape(-1, 1), rstd.reshape(-1, 1)  # (N, 1): a plain cache works too
    if kernels.use(dy):
        dx, dw, db = kernels.layernorm_backward(dy2, x2, w, mean, rstd)
        return dx.reshape(x.shape), {"w": dw, "b": db}
    xp = get_array_module(dy)
    ck = rt.cpu_kernels(dy2, x2, w) if xp is np and dy2.flags.c_contiguous and x2.flags.c_contiguous else None
    if ck:
        N = x2.shape[0]
        dx = np.empty((N, C), dtype=dy.dtype)
        parts = rt.parts(N, C)
        m1 = np.ascontiguousarray(mean.reshape(-1))  # (N,)
        r1 = np.ascontiguousarray(rstd.reshape(-1))
        dws = np.zeros((len(parts), C), dtype=dy.dtype)  # one partial sum per part, added in order
        dbs = np.zeros((len(parts), C), dtype=dy.dtype)
        rt.parallel_for(lambda i: ck.layernorm_backward(dy2[parts[i]], x2[parts[i]], w, m1[parts[i]], r1[parts[i]],
                                                     dx[parts[i]], dws[i], dbs[i]), range(len(parts)))
        return dx.reshape(x.shape), {"w": dws.sum(axis=0), "b": dbs.sum(axis=0)}
    if xp is np:
        N = x2.shape[0]
        dx = np.empty((N, C), dtype=dy.dtype)
        rt.parallel_for(lambda r: _layernorm_backward_rows(dy2, x2, w, mean, rstd, dx, r), rt.parts(N, C))
        xhat = x2 - mean  # (N, C); dw and db as sums over all N rows at once: the numbers of the
        xhat *= rstd  # unblocked path (and of the CuPy path without kernels), bit for bit
        db = dy2.sum(axis=0)  # (C,)
        dw = np.einsum("nc,nc->c", dy2, xhat)  # (C,)
        return dx.reshape(x.shape), {"w": dw, "b": db}
    xhat = x2 - mean  # (N, C)
    xhat *= rstd
    db = dy2.sum(axis=0)  # (C,)
    dw = xp.einsum("nc,nc->c", dy2, xhat)  # (C,)
    g = dy2 * w  # (N, C)
    _layernorm_dx_(g, xhat, rstd)
    return g.reshape(x.shape), {"w": dw, "b": db}


# ------------------------------------------------------------------------------------ GELU

_GELU_K, _GELU_C = layers.GELU_K, layers.GELU_C


def _gelu_forward_part(x_, y_, t):
    """y_ = GELU(x_) for flat views x_, y_, block by block."""
    xp = get_array_module(x_)
    for s in rt.cache_blocks(x_.size, xp):
        x, u = x_[s], y_[s]
        xp.multiply(x, x, out=u)  # x^2
        u *= t(_GELU_C)
        u += t(1.0)
        u *= x  # x + c x^3
        u *= t(_GELU_K)
        xp.tanh(u, out=u)  # tanh z
        u += t(1.0)
        u *= x
        u *= t(0.5)


def gelu_forward(x):
    """layers.gelu_forward, block by block, the blocks shared among the threads.
    CuPy: one fused elementwise kernel."""
    if kernels.use(x):
        return kernels.gelu_forward(x), x
    xp = get_array_module(x)
    t = x.dtype.type
    y = xp.empty(x.shape, dtype=x.dtype)
    xf, yf = x.reshape(-1), y.reshape(-1)  # flat views
    ck = rt.cpu_kernels(x) if x.flags.c_contiguous else None
    if ck:
        rt.parallel_for(lambda s: ck.gelu_forward(xf[s], yf[s]), rt.flat_parts(xf.size, xp))
        return y, x
    rt.parallel_for(lambda s: _gelu_forward_part(xf[s], yf[s], t), rt.flat_parts(xf.size, xp))
    return y, x


def _gelu_backward_part(x_, dy_, dx_, t):
    """dx_ = GELU'(x_) dy_ for flat views, block by block."""
    xp = get_array_module(x_)
    for s in rt.cache_blocks(x_.size, xp):
        x, d = x_[s], dx_[s]
        th = x * x  # x^2
        xp.multiply(th, t(3.0 * _GELU_C * _GELU_K), out=d)
        d += t(_GELU_K)  # dz/dx = k (1 + 3 c x^2)
        th *= t(_GELU_C)
        th += t(1.0)
        th *= x
        th *= t(_GELU_K)
        xp.tanh(th, out=th)  # tanh z
        d *= x  # x dz/dx
        d -= d * th  # x dz/dx (1 - tanh z)
        d += t(1.0)
        th += t(1.0)
        d *= th
        d *= t(0.5)
        d *= dy_[s]


def gelu_backward(dy, cache):
    """layers.gelu_backward, block by block, the blocks shared among the threads, with
    dy/dx = 0.5 (1 + tanh z) (1 + x dz/dx (1 - tanh z)). CuPy: one fused elementwise kernel."""
    x = cache
    if kernels.use(x):
        return kernels.gelu_backward(dy, x), {}
    xp = get_array_module(x)
    t = x.dtype.type
    dx = xp.empty(x.shape, dtype=x.dtype)
    xf, dyf, dxf = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)  # flat views
    ck = rt.cpu_kernels(dy, x) if x.flags.c_contiguous and dy.flags.c_contiguous and dy.dtype == x.dtype else None
    if ck:
        rt.parallel_for(lambda s: ck.gelu_backward(dyf[s], xf[s], dxf[s]), rt.flat_parts(xf.size, xp))
        return dx, {}
    rt.parallel_for(lambda s: _gelu_backward_part(xf[s], dyf[s], dxf[s], t), rt.flat_parts(xf.size, xp))
    return dx, {}


# ------------------------------------------------------------------------------------ attention

_MASK_CACHE: dict = {}


def _device_key(xp):
    if xp.__name__ == "numpy":
        return ("numpy", 0)
    return (xp.__name__, xp.cuda.Device().id)  # pragma: no cover - needs a GPU


def _causal_bias(xp, dtype, nq, nk, offset):
    """(nq, nk) additive bias of the causal mask: 0 where query i (key index offset + i) may see
    key j (layers.sees), -inf where not; built once per (device, dtype, shape, offset), read-only."""
    key = (_device_key(xp), np.dtype(dtype).str, nq, nk, offset)
    bias = _MASK_CACHE.get(key)
    if bias is None:
        if len(_MASK_CACHE) > 256:
            _MASK_CACHE.clear()
        t = np.dtype(dtype).type
        bias = xp.where(layers.sees(nk, offset=offset, n_queries=nq, xp=xp), t(0), t(-math.inf)).astype(dtype)
        if xp is np:
            bias.flags.writeable = False  # shared by every call
        _MASK_CACHE[key] = bias
    return bias


def _zero_rows(xp, B, S):
    """A cached read-only (B, S) int64 array of zeros: the start and hidden range of causal queries
    for the kernels, which always read a layout."""
    key = (_device_key(xp), "zeros", B, S)
    z = _MASK_CACHE.get(key)
    if z is None:
        z = xp.zeros((B, S), dtype=np.int64)
        if xp is np:
            z.flags.writeable = False
        _MASK_CACHE[key] = z
    return z


def _softmax_lastaxis_(s):
    """In-place softmax over the last axis (max-subtracted)."""
    xp = get_array_module(s)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _biased_softmax_(att, bias):
    """att += bias; softmax over the last axis; in place. att (..., nq, L), bias broadcastable to
    att. On NumPy with a contiguous att and a bias of at most 2 dims, in blocks of whole (nq, L)
    matrices that fit in L2, so the five passes read the cache, not memory; every row is computed
    as unblocked, so the numbers are identical."""
    xp = get_array_module(att)
    if xp is not np or not att.flags.c_contiguous or bias.ndim > 2 or att.ndim < 2 or att.size < _SOFTMAX_BLOCKED:
        att += bias
        return _softmax_lastaxis_(att)
    nq, L = att.shape[-2:]
    mats = att.reshape(-1, nq, L)  # (M, nq, L) view
    m = max(1, rt.BLOCK // max(1, nq * L))  # matrices per block
    for i in range(0, mats.shape[0], m):
        a = mats[i:i + m]  # (m, nq, L)
        a += bias
        a -= a.max(axis=-1, keepdims=True)
        np.exp(a, out=a)
        a /= a.sum(axis=-1, keepdims=True)  # (m, nq, 1): the same numbers as unblocked
    return att


def softmax(s):
    """layers.softmax, on a copy, in place."""
    return _softmax_lastaxis_(s.copy())


def _masked_softmax_(att, scale, start, hidden_lo, hidden_hi, q0, self0, k0, causal):
    """In place: att (b, H, nq, nk) holds q k^T for the queries q0..q0+nq-1 of each row (their
    own key indices self0..self0+nq-1) and the keys k0..k0+nk-1; on exit softmax(scale att) over
    the keys each query sees (layers.sees with the layout's start, hidden_lo, hidden_hi (b, S),
    the rest 0). CuPy: one fused kernel; NumPy: one compiled loop, else the NumPy passes with an
    -inf bias (a cached one for the causal mask, a block-sized one from the layout otherwise)."""
    xp = get_array_module(att)
    if kernels.use(att):
        return kernels.masked_softmax_(att, scale, start, hidden_lo, hidden_hi, q0, self0, k0)
    ck = rt.cpu_kernels(att) if att.flags.c_contiguous else None
    if ck:
        b, H, nq, nk = att.shape
        ck.masked_softmax_(att.reshape(b * H, nq, nk), H, scale, start, hidden_lo, hidden_hi, q0, self0, k0)
        return att
    if scale != 1.0:
        att *= att.dtype.type(scale)
    nq, nk = att.shape[-2:]
    if causal:
        return _biased_softmax_(att, _causal_bias(xp, att.dtype, nq, k0 + nk, self0)[:, k0:])
    sl = slice(q0, q0 + nq)
    allowed = layers.sees(k0 + nk, start[:, sl], hidden_lo[:, sl], hidden_hi[:, sl], self0)  # (b, nq, k0 + nk)
    t = att.dtype.type
    bias = xp.where(allowed[:, None, :, k0:], t(0), t(-math.inf))  # (b, 1, nq, nk)
    return _biased_softmax_(att, bias)


def _causal_blocks(T: int) -> tuple:
    """((i0, i1, 0), ...): the blocks of packing.query_blocks for causal queries (every key from 0)."""
    return query_blocks(np.zeros((1, T), dtype=np.int64))


def _batch_parts(B: int, work_per_row: int, xp) -> list[slice]:
    """Batch rows cut into one part per thread (NumPy); on CuPy one part."""
    return rt.parts(B, work_per_row) if xp is np else [slice(0, B)]


_MKL_ATTENTION_T = 256  # from this T on, attention's products go through MKL's batched GEMM (C1, T 256:
#                         160 against 167 ms forward + backward a layer at 1 thread; C0, T 64: 29 against
#                         15 ms a step at 2 threads, the small products faster through np.matmul)
_COPY_KV_T = 128  # from this T on, attention copies k and v (C1, T 256: -12 ms a layer forward +
#                   backward at 1 thread; C0, T 64: +0.8 ms, so not there)
_SOFTMAX_BLOCKED = 1 << 20  # elements: from this size on the masked softmax runs in L2-sized blocks


def attention_forward(qkv, n_head, layout=None):
    """layers.attention_forward block by block: the queries i0..i1-1 of each of the layout's query
    blocks (packing.query_blocks) are scored against keys k0..i1-1 only, the keys they may see
    (causal: from key 0; packed rows: from their sequences' start); the softmax applies the
    layout's rule inside one kernel (_masked_softmax_). The batch rows are shared among the
    threads.

    Cache: (qs, k, v, atts, y, blocks, layout) with qs = q / sqrt(D), atts each block's
    (B, H, i1 - i0, i1 - k0) softmax and y the output, referenced.
    """
    checks.qkv(qkv, n_head)
    xp = get_array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = qkv.dtype.type(1.0 / math.sqrt(D))
    causal = layout is None or layout.causal
    blocks = _causal_blocks(T) if causal else layout.blocks
    if causal:
        start = lo = hi = _zero_rows(xp, B, T)
    else:
        start, lo, hi = layout.start, layout.hidden_lo, layout.hidden_hi  # (B, T) each
    q, k_view, v_view = layers.split_heads(qkv, n_head)  # (B, H, T, D) views
    qs = xp.empty(q.shape, dtype=qkv.dtype)  # (B, H, T, D) = q / sqrt(D), filled per part
    copy_kv = T >= _COPY_KV_T  # (B, H, T, D) contiguous copies of k and v, filled per part: the
    k = xp.empty(q.shape, dtype=qkv.dtype) if copy_kv else k_view  # batched matmuls run faster
    v = xp.empty(q.shape, dtype=qkv.dtype) if copy_kv else v_view  # on them, and qkv is freed
    fused = kernels.use(qkv)  # the CUDA kernel scales the raw scores itself
    yh = xp.empty((B, T, n_head, D), dtype=qkv.dtype)  # heads side by side
    atts = [xp.empty((B, n_head, i1 - i0, i1 - k0), dtype=qkv.dtype) for i0, i1, k0 in blocks]
    mkl = rt.gemm_lib() if xp is np and T >= _MKL_ATTENTION_T else None  # MKL's batched GEMM

    def part(bs):
        xp.multiply(q[bs], scale, out=qs[bs])
        if copy_kv:
            k[bs] = k_view[bs]
            v[bs] = v_view[bs]
        for (i0, i1, k0), att_full in zip(blocks, atts):
            att = att_full[bs]  # (b, H, nq, nk)
            kt = k[bs, :, k0:i1].transpose(0, 1, 3, 2)  # (b, H, D, nk)
            _bmm(mkl, (q if fused else qs)[bs, :, i0:i1], kt, att)
            _masked_softmax_(att, 1.0 / math.sqrt(D) if fused else 1.0, start[bs], lo[bs], hi[bs], i0, i0, k0,
                             causal)
            if mkl is not None:  # straight into the heads-side-by-side output
                mkl.bmm(att, v[bs, :, k0:i1], yh[bs, i0:i1].transpose(0, 2, 1, 3))
            else:
                yh[bs, i0:i1] = (att @ v[bs, :, k0:i1]).transpose(0, 2, 1, 3)  # (b, nq, H, D)

    rt.parallel_for(part, _batch_parts(B, n_head * T * T, xp))
    y = yh.reshape(B, T, C)
    return y, (qs, k, v, atts, y, blocks)


def attention_backward(dy, cache):
    """layers.attention_backward, block by block as the forward: block i0..i1-1 reaches keys
    k0..i1-1, so their dk and dv sum the blocks that see them (a hidden key has att = 0: nothing).
    The softmax's row sum is taken on the (T, D) side, sum_j datt_ij att_ij = dy_i . y_i. The batch
    rows are shared among the threads. CuPy: ds = att (datt - delta) in one pass."""
    qs, k, v, atts, y, blocks = cache
    xp = get_array_module(dy)
    B, H, T, D = qs.shape
    C = H * D
    scale = dy.dtype.type(1.0 / math.sqrt(D))
    dqkv = xp.empty((B, T, 3, H, D), dtype=dy.dtype)
    d = dqkv.transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D) view: dq, dk, dv
    # the last block of a causal layout reaches every key, so dk and dv can be written by it and
    # added to by the others; otherwise they start at 0
    write_first = blocks[-1][1] == T and blocks[-1][2] == 0
    mkl = rt.gemm_lib() if xp is np and T >= _MKL_ATTENTION_T else None  # MKL: dq, dk, dv written or added

    def part(bs):
        dyb = dy[bs]  # (b, T, C)
        b = dyb.shape[0]
        if not write_first:
            d[1][bs] = 0
            d[2][bs] = 0
        dyh = dyb.reshape(b, T, H, D).transpose(0, 2, 1, 3)  # (b, H, T, D)
        delta = (dyb * y[bs]).reshape(b, T, H, D).sum(axis=-1)  # (b, T, H)
        delta = delta.transpose(0, 2, 1)[..., None]  # (b, H, T, 1)
        ck = rt.cpu_kernels(dyb, atts[0])
        for (i0, i1, k0), att_full in reversed(list(zip(blocks, atts))):
            att = att_full[bs]  # (b, H, nq, nk)
            dy_b = dyh[:, :, i0:i1]  # (b, H, nq, D)
            first = write_first and i1 == T  # the last block, processed first, writes dk and dv
            if mkl is not None:
                mkl.bmm(att.transpose(0, 1, 3, 2), dy_b, d[2][bs, :, k0:i1], beta=0.0 if first else 1.0)  # dv
                ds = mkl.bmm(dy_b, v[bs, :, k0:i1].transpose(0, 1, 3, 2), np.empty(att.shape, dtype=dy.dtype))
            else:
                dv = att.transpose(0, 1, 3, 2) @ dy_b  # (b, H, nk, D)
                ds = dy_b @ v[bs, :, k0:i1].transpose(0, 1, 3, 2)  # datt (b, H, nq, nk)
            if kernels.use(ds):
                kernels.softmax_backward_(ds, att, delta[:, :, i0:i1])
            elif ck and ds.flags.c_contiguous and att.flags.c_contiguous:
                nq, nk = att.shape[-2:]
                ck.softmax_backward_(ds.reshape(-1, nq, nk), att.reshape(-1, nq, nk),
                                     np.ascontiguousarray(delta[:, :, i0:i1, 0]).reshape(-1, nq))
            else:
                ds -= delta[:, :, i0:i1]
                ds *= att
            if mkl is not None:
                mkl.bmm(ds.transpose(0, 1, 3, 2), qs[bs, :, i0:i1], d[1][bs, :, k0:i1], beta=0.0 if first else 1.0)
                mkl.bmm(ds, k[bs, :, k0:i1], d[0][bs, :, i0:i1], alpha=float(scale))  # dq
                continue
            dk = ds.transpose(0, 1, 3, 2) @ qs[bs, :, i0:i1]  # (b, H, nk, D)
            if first:
                d[2][bs], d[1][bs] = dv, dk
            else:
                d[2][bs, :, k0:i1] += dv
                d[1][bs, :, k0:i1] += dk
            dq = ds @ k[bs, :, k0:i1]  # (b, H, nq, D)
            dq *= scale
            d[0][bs, :, i0:i1] = dq

    rt.parallel_for(part, _batch_parts(B, H * T * T, xp))
    return dqkv.reshape(B, T, 3 * C), {}


def attention_forward_kv(qkv, n_head, k_cache, v_cache, offset, start=None):
    """layers.attention_forward_kv with the causal skip (query block i0..i1-1 scored against keys
    0..offset + i1 - 1 only) and the fused masked softmax; start (B, T_new): each new query's
    first visible key (a left-padded row)."""
    checks.qkv(qkv, n_head)
    xp = get_array_module(qkv)
    B, Tn, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    L = offset + Tn
    q, k, v = layers.split_heads(qkv, n_head)  # (B, H, Tn, D) views
    k_cache[:, :, offset:L] = k
    v_cache[:, :, offset:L] = v
    qs = q * qkv.dtype.type(1.0 / math.sqrt(D))  # (B, H, Tn, D)
    causal = start is None
    z = _zero_rows(xp, B, Tn)
    start = z if causal else start
    yh = xp.empty((B, Tn, n_head, D), dtype=qkv.dtype)
    mkl = rt.gemm_lib() if xp is np and L >= _MKL_ATTENTION_T else None  # MKL's batched GEMM
    fused = kernels.use(qkv)

    def part(bs):  # query i (key index offset + i) sees keys start[b, i] .. offset + i
        for i0, i1, _ in _causal_blocks(Tn):
            kt = k_cache[bs, :, : offset + i1].transpose(0, 1, 3, 2)  # (b, H, D, offset + i1)
            att = xp.empty((qs[bs].shape[0], n_head, i1 - i0, offset + i1), dtype=qkv.dtype)
            _bmm(mkl, (q if fused else qs)[bs, :, i0:i1], kt, att)  # (b, H, i1 - i0, offset + i1)
            _masked_softmax_(att, 1.0 / math.sqrt(D) if fused else 1.0, start[bs], z[bs], z[bs], i0, offset + i0, 0,
                             causal)
            if mkl is not None:
                mkl.bmm(att, v_cache[bs, :, : offset + i1], yh[bs, i0:i1].transpose(0, 2, 1, 3))
            else:
                yh[bs, i0:i1] = (att @ v_cache[bs, :, : offset + i1]).transpose(0, 2, 1, 3)

    rt.parallel_for(part, _batch_parts(B, n_head * Tn * L, xp))  # the batch rows shared among the threads
    return yh.reshape(B, Tn, C)  # (B, Tn, C)


# ------------------------------------------------------------------------------------ log pi(y|x)

_PIECE = 1 << 18  # elements (1 MiB of float32) per piece of the (M, V) loops


def _row_pieces(M: int, V: int, xp) -> list[slice]:
    """Slices of about _PIECE elements covering the M rows of an (M, V) array (on CuPy: one)."""
    if xp is not np or M * V <= _PIECE:
        return [slice(0, M)]
    nm = max(1, _PIECE // max(V, 1))
    return [slice(i, min(i + nm, M)) for i in range(0, M, nm)]


def token_logps(logits, labels):
    """logprobs.token_logps: lse in row pieces that stay in the cache, shared among the threads,
    without an (M, V) temporary. CPU: one compiled loop a row; CuPy: one fused kernel."""
    M, V = checks.token_logps_args(logits, labels)
    xp = get_array_module(logits, labels)
    if kernels.use(logits):
        lp, lse = kernels.logsoftmax_gather(logits, labels)
        return lp, {"logits": logits, "labels": labels, "lse": lse}
    lse = xp.empty((M,), dtype=logits.dtype)
    ck = rt.cpu_kernels(logits) if logits.flags.c_contiguous and V else None
    if ck:
        lp = np.empty((M,), dtype=logits.dtype)
        lab = np.ascontiguousarray(labels, dtype=np.int64)
        rt.parallel_for(lambda s: ck.logsoftmax_gather(logits, lab, lp, lse, s.start, s.stop), rt.parts(M, V))
        return lp, {"logits": logits, "labels": labels, "lse": lse}

    def piece(s):
        lse[s] = logsumexp(logits[s], axis=-1)

    rt.parallel_for(piece, _row_pieces(M, V, xp))
    lp = logits[xp.arange(M), labels] - lse  # (M,)
    return lp, {"logits": logits, "labels": labels, "lse": lse}


def token_logps_backward(dlp, cache, *, overwrite_logits: bool = False):
    """logprobs.token_logps_backward writing one (M, V) array, piece by piece: the softmax
    exp(logits - lse) into it, the one-hot subtracted in place, the row scale applied in place.
    ``overwrite_logits``: that array is the forward's logits (destroyed; call once per cache).
    CPU: one compiled loop a row; CuPy: the (M, V) array written in one kernel pass."""
    logits, labels, lse = cache["logits"], cache["labels"], cache["lse"]
    xp = get_array_module(logits)
    M, V = logits.shape
    dt = logits.dtype
    g = xp.asarray(dlp).astype(dt, copy=False)  # (M,)
    if kernels.use(logits) and logits.flags.c_contiguous:
        return kernels.logsoftmax_gather_backward(logits, lse, labels, g, out=logits if overwrite_logits else None)
    if overwrite_logits:
        if xp is np and not logits.flags.writeable:
            raise ValueError("overwrite_logits=True needs writable logits, got a read-only array")
        out = logits  # (M, V) the forward's buffer, reused
    else:
        out = xp.empty_like(logits)
    ck = rt.cpu_kernels(logits, lse, g) if out.flags.c_contiguous and V else None
    if ck:
        if out is not logits:
            np.copyto(out, logits)  # the kernel works in place
        g_c = np.ascontiguousarray(g)
        lab = np.ascontiguousarray(labels, dtype=np.int64)
        rt.parallel_for(lambda s: ck.logsoftmax_gather_backward_(out, lse, lab, g_c, s.start, s.stop), rt.parts(M, V))
        return out

    def piece(s):
        body = out[s]  # (m, V) view
        xp.subtract(logits[s], lse[s][:, None], out=body)  # log p
        xp.exp(body, out=body)  # p
        body[xp.arange(body.shape[0]), labels[s]] -= dt.type(1)  # p - onehot
        body *= (-g[s])[:, None]  # g (onehot - p)

    rt.parallel_for(piece, _row_pieces(M, V, xp))
    return out


def sequence_logps(logits, labels, weights):
    """logprobs.sequence_logps on the fast token_logps: logps = weights @ lp."""
    checks.sequence_logps_args(logits, labels, weights)
    lp, cache = token_logps(logits, labels)  # (M,)
    cache["weights"] = weights
    return weights @ lp, cache


def sequence_logps_backward(dlogps, cache, *, overwrite_logits: bool = False):
    """logprobs.sequence_logps_backward on the fast token_logps_backward: dlp = weights^T dlogps."""
    w = cache["weights"]
    checks.dlogps(dlogps, w.shape[0])
    dlp = w.T @ get_array_module(w).asarray(dlogps).astype(w.dtype, copy=False)  # (M,)
    return token_logps_backward(dlp, cache, overwrite_logits=overwrite_logits)


# ------------------------------------------------------------------------------------ the two namespaces

_NAMES = ([n for n in layers.__all__ if n not in ("sees", "split_heads")]
          + [n for n in logprobs.__all__ if n != "token_log_sum_sq"])  # WPO's constant: one plain function
"""The functions with a fast twin: every layer's forward and backward, the softmax, the log-probs."""
PLAIN = SimpleNamespace(name="plain", **{n: getattr(layers, n, None) or getattr(logprobs, n) for n in _NAMES})
"""The plain reference: layers.py and logprobs.py."""
FAST = SimpleNamespace(name="fast", **{n: globals()[n] for n in _NAMES})
"""This module's functions (the default)."""
