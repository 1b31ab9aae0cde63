"""GPT-2's layers as paired forward/backward functions, in NumPy or CuPy array code.

Every layer is two functions, the forward directly above its backward:

    out, cache = name_forward(x, ...)        # cache holds only what the backward needs
    dx, grads  = name_backward(dout, cache)  # grads: a dict keyed by the forward's parameter names

Each backward restates the forward line, then its derivative. The array module ``xp`` (numpy or
cupy) comes from the inputs, so one code path serves the CPU and the GPU. Outputs keep the
input dtype: float32 in -> float32 out, float64 in -> float64 out (constants are cast to the
input's dtype, never left as float64 NumPy scalars).

Shape letters: B batch, T time, C channels, V vocabulary, H heads, D head size (C = H * D),
N = B * T flattened rows. Weight matmuls run on (N, C) views: a 2-D matmul is faster than a 3-D
broadcast in NumPy, and CuPy's TF32 path only applies to 2-D.

GPU: on CuPy arrays, GELU, layernorm and the attention softmax run as fused kernels
(minidpo/kernels.py). Each such layer says so in one line at its top, ``if kernels.use(x):``;
the array code below that line is the kernel's twin (the CPU path, and the reference that
tests/test_kernels.py compares the kernel with).

Residual connections need no layer: ``x = x + f(x)`` has gradient ``dx = dout + f'(x)^T dout``,
so the model adds each branch's input gradient into the residual gradient (see model.py).
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .backend import get_array_module, scatter_add

__all__ = [
    "embedding_forward",
    "embedding_backward",
    "linear_forward",
    "linear_backward",
    "layernorm_forward",
    "layernorm_backward",
    "gelu_forward",
    "gelu_backward",
    "attention_forward",
    "attention_backward",
    "attention_forward_kv",
    "unembed_forward",
    "unembed_backward",
    "attention_bias",
]


# ---------------------------------------------------------------------------------------------
# token + position embedding
# ---------------------------------------------------------------------------------------------


def embedding_forward(idx, wte, wpe, position_ids=None):
    """Token plus position embedding: ``x[b, t] = wte[idx[b, t]] + wpe[pos[b, t]]``.

    Args:
        idx: (B, T) integer token ids, 0 <= idx < V (the caller validates the range).
        wte: (V, C) token embedding.
        wpe: (n_ctx, C) position embedding.
        position_ids: None for positions 0..T-1 (the training case), or (T,) positions shared
            by every row, or (B, T) positions per row (left-padded generation).

    Returns:
        x: (B, T, C), dtype of ``wte``.
        cache: (idx, position_ids, wte.shape, wpe.shape).
    """
    B, T = idx.shape
    x = wte[idx]  # (B, T, C)
    if position_ids is None:
        x += wpe[:T]  # (T, C) broadcast over B
    else:
        x += wpe[position_ids]  # (T, C) or (B, T, C)
    return x, (idx, position_ids, wte.shape, wpe.shape)


def embedding_backward(dx, cache, dwte=None):
    """Backward of :func:`embedding_forward`.

    forward:  x[b, t] = wte[idx[b, t]] + wpe[pos[b, t]]
    backward: dwte[v] = sum over (b, t) with idx[b, t] == v of dx[b, t]   (scatter-add: a token
              id that occurs twice gets both contributions), and likewise dwpe[p].

    Args:
        dx: (B, T, C) gradient of the output.
        cache: from the forward.
        dwte: optional (V, C) array to accumulate the token-embedding gradient into, in place.
            The model passes the tied output projection's gradient here, so the tied weight's
            gradient becomes the SUM of its two uses without another (V, C) array.

    Returns:
        (None, grads): integer ids have no gradient; grads = {"wte": (V, C), "wpe": (n_ctx, C)}.
    """
    idx, position_ids, wte_shape, wpe_shape = cache
    xp = get_array_module(dx)
    B, T, C = dx.shape
    dx2 = dx.reshape(B * T, C)  # (N, C)
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)  # (V, C)
    scatter_add(dwte, idx.reshape(-1), dx2)
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)  # (n_ctx, C)
    if position_ids is None:
        dwpe[:T] = dx.sum(axis=0)  # positions 0..T-1 are distinct: a plain sum over B
    elif position_ids.ndim == 1:
        scatter_add(dwpe, position_ids, dx.sum(axis=0))  # (T,) ids, (T, C) values
    else:
        scatter_add(dwpe, position_ids.reshape(-1), dx2)  # (N,) ids, (N, C) values
    return None, {"wte": dwte, "wpe": dwpe}


# ---------------------------------------------------------------------------------------------
# linear (GPT-2 Conv1D layout: weight (in, out))
# ---------------------------------------------------------------------------------------------


def linear_forward(x, w, b=None):
    """Affine map in GPT-2's Conv1D layout: ``y = x @ w + b``.

    Args:
        x: (..., Cin), e.g. (B, T, Cin).
        w: (Cin, Cout).
        b: (Cout,) or None.

    Returns:
        y: (..., Cout).
        cache: (x, w, has_bias). ``x`` is referenced, not copied: do not modify it in place.
    """
    cin = x.shape[-1]
    x2 = x.reshape(-1, cin)  # (N, Cin)
    y = x2 @ w  # (N, Cout)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_backward(dy, cache):
    """Backward of :func:`linear_forward`.

    forward:  y = x @ w + b
    backward: dx = dy @ w^T;  dw = x^T @ dy;  db = sum over rows of dy

    Args:
        dy: (..., Cout).
        cache: from the forward.

    Returns:
        dx: (..., Cin).
        grads: {"w": (Cin, Cout), "b": (Cout,) or None when the forward had no bias}.
    """
    x, w, has_bias = cache
    cin, cout = w.shape
    x2 = x.reshape(-1, cin)  # (N, Cin)
    dy2 = dy.reshape(-1, cout)  # (N, Cout)
    dx = (dy2 @ w.T).reshape(x.shape)  # (N, Cin) -> (..., Cin)
    dw = x2.T @ dy2  # (Cin, Cout)
    db = dy2.sum(axis=0) if has_bias else None  # (Cout,)
    return dx, {"w": dw, "b": db}


# ---------------------------------------------------------------------------------------------
# layernorm
# ---------------------------------------------------------------------------------------------


def layernorm_forward(x, w, b, eps=1e-5):
    """Layer normalisation over the last axis:

        mean = mean_c x,  rstd = 1 / sqrt(mean_c (x - mean)^2 + eps)
        y = (x - mean) * rstd * w + b

    Caching choice (llm.c's): the cache keeps ``x`` (a reference to the residual stream, which
    the model keeps alive anyway), ``mean`` and ``rstd`` (N floats each); the backward recomputes
    x_hat = (x - mean) * rstd, instead of storing another (N, C) array.

    Args:
        x: (..., C).
        w, b: (C,) gain and bias.
        eps: added to the variance (GPT-2: 1e-5).

    Returns:
        y: (..., C).
        cache: (x, w, mean (N, 1), rstd (N, 1)).
    """
    C = x.shape[-1]
    xp = get_array_module(x)
    x2 = x.reshape(-1, C)  # (N, C)
    if kernels.use(x):  # CuPy: one fused kernel, one block per row; the lines below are its twin
        y, mean, rstd = kernels.layernorm_forward(x2, w, b, eps)  # (N, C), (N, 1), (N, 1)
        return y.reshape(x.shape), (x, w, mean, rstd)
    t = x.dtype.type
    # row sums as einsum: one read of the rows, no (N, C) temporary for y * y
    mean = xp.einsum("nc->n", x2)[:, None]  # (N, 1)
    mean *= t(1.0 / C)
    y = x2 - mean  # (N, C) centred; becomes the output in place below
    var = xp.einsum("nc,nc->n", y, y)[:, None]  # (N, 1) sum_c (x - mean)^2
    var *= t(1.0 / C)
    var += t(eps)
    rstd = xp.sqrt(var)
    xp.reciprocal(rstd, out=rstd)  # (N, 1) 1 / sqrt(var + eps)
    y *= rstd  # x_hat
    y *= w
    y += b
    return y.reshape(x.shape), (x, w, mean, rstd)


def layernorm_backward(dy, cache):
    """Backward of :func:`layernorm_forward`.

    forward:  x_hat = (x - mean) * rstd;  y = x_hat * w + b
    backward: dw = sum_n dy * x_hat;  db = sum_n dy;  with g = dy * w,
              dx = rstd * (g - mean_c(g) - x_hat * mean_c(g * x_hat))
    (the last line is d x_hat / dx applied to g: mean and rstd both depend on every x_c).

    Args:
        dy: (..., C).
        cache: from the forward.

    Returns:
        dx: (..., C).
        grads: {"w": (C,), "b": (C,)}.
    """
    x, w, mean, rstd = cache
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    dy2 = dy.reshape(-1, C)  # (N, C)
    if kernels.use(dy):  # CuPy: fused kernels (dx per row, dw as one reduction); twin below
        dx, dw, db = kernels.layernorm_backward(dy2, x2, w, mean, rstd)
        return dx.reshape(x.shape), {"w": dw, "b": db}
    xp = get_array_module(dy)
    t = dy.dtype.type
    xhat = x2 - mean  # (N, C)
    xhat *= rstd
    # the four reductions as einsum: each one read, no (N, C) product temporaries
    db = dy2.sum(axis=0)  # (C,)
    dw = xp.einsum("nc,nc->c", dy2, xhat)  # (C,) sum_n dy * x_hat
    g = dy2 * w  # (N, C)
    m_g = xp.einsum("nc->n", g)[:, None]  # (N, 1)
    m_g *= t(1.0 / C)  # mean_c(g)
    m_gx = xp.einsum("nc,nc->n", g, xhat)[:, None]  # (N, 1)
    m_gx *= t(1.0 / C)  # mean_c(g * x_hat)
    g -= m_g
    xhat *= m_gx
    g -= xhat
    g *= rstd
    return g.reshape(x.shape), {"w": dw, "b": db}


# ---------------------------------------------------------------------------------------------
# GELU, tanh form
# ---------------------------------------------------------------------------------------------

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715
_BLOCK = 1 << 16  # elements: 256 KiB of float32 per operand, so a block's temporaries stay in L2


def _cache_blocks(n: int, xp):
    """Slices covering 0..n for a chain of elementwise NumPy passes: run block by block, every
    pass after the first reads the cache, not memory (GELU's backward is 17 passes: on the C1
    shape this halves its time). On CuPy (the kernels' twin) the whole array is one block."""
    if xp is not np or n <= _BLOCK:
        return [slice(0, n)]
    return [slice(i, min(i + _BLOCK, n)) for i in range(0, n, _BLOCK)]


def gelu_forward(x):
    """GELU, tanh approximation (GPT-2's "gelu_new"):

        y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))),  k = sqrt(2 / pi)

    Args:
        x: any shape, floating.

    Returns:
        y: same shape and dtype as x.
        cache: x (referenced; the backward recomputes the tanh rather than storing it).
    """
    if kernels.use(x):  # CuPy: one fused elementwise kernel; the lines below are its twin
        return kernels.gelu_forward(x), x
    xp = get_array_module(x)
    t = x.dtype.type
    y = xp.empty(x.shape, dtype=x.dtype)
    xf, yf = x.reshape(-1), y.reshape(-1)  # flat views
    for s in _cache_blocks(xf.size, xp):  # elementwise: the same numbers in any blocking
        x_, u = xf[s], yf[s]
        xp.multiply(x_, x_, out=u)  # x^2
        u *= t(_GELU_C)
        u += t(1.0)
        u *= x_  # x + 0.044715 x^3
        u *= t(_GELU_K)
        xp.tanh(u, out=u)  # tanh(k (x + 0.044715 x^3))
        u += t(1.0)
        u *= x_
        u *= t(0.5)
    return y, x


def gelu_backward(dy, cache):
    """Backward of :func:`gelu_forward`.

    forward:  y = 0.5 x (1 + tanh(z)),  z = k (x + c x^3)
    backward: dy/dx = 0.5 (1 + tanh z) + 0.5 x (1 - tanh^2 z) k (1 + 3 c x^2)

    Args:
        dy: same shape as x.
        cache: x from the forward.

    Returns:
        dx: same shape and dtype as x.
        grads: {} (GELU has no parameters).
    """
    x = cache
    if kernels.use(x):  # CuPy: one fused elementwise kernel; the lines below are its twin
        return kernels.gelu_backward(dy, x), {}
    xp = get_array_module(x)
    t = x.dtype.type
    dx = xp.empty(x.shape, dtype=x.dtype)
    xf, dyf, dxf = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)  # flat views
    for s in _cache_blocks(xf.size, xp):  # elementwise: the same numbers in any blocking
        x_, d = xf[s], dxf[s]
        th = x_ * x_  # x^2
        xp.multiply(th, t(3.0 * _GELU_C * _GELU_K), out=d)
        d += t(_GELU_K)  # dz/dx = k (1 + 3 c x^2)
        th *= t(_GELU_C)
        th += t(1.0)
        th *= x_
        th *= t(_GELU_K)
        xp.tanh(th, out=th)  # tanh z
        # 1 - tanh^2 z = (1 - tanh z)(1 + tanh z), so
        # dy/dx = 0.5 (1 + tanh z) (1 + x dz/dx (1 - tanh z))
        d *= x_  # x dz/dx
        d -= d * th  # x dz/dx (1 - tanh z)
        d += t(1.0)
        th += t(1.0)
        d *= th
        d *= t(0.5)
        d *= dyf[s]
    return dx, {}


# ---------------------------------------------------------------------------------------------
# causal multi-head self-attention
# ---------------------------------------------------------------------------------------------

_BIAS_CACHE: dict = {}


def _device_key(xp):
    if xp.__name__ == "numpy":
        return ("numpy", 0)
    return (xp.__name__, xp.cuda.Device().id)  # pragma: no cover - needs a GPU


def attention_bias(xp, dtype, t_q, t_k, offset=0, key_mask=None):
    """Additive attention bias: 0 where a query may attend to a key, -inf where it may not.

    Query i sits at absolute position ``offset + i``; keys are positions 0..t_k-1. Allowed:
    ``j <= offset + i`` (causal) and ``key_mask[b, j] != 0`` (key padding). The query's own
    position ``j == offset + i`` is always allowed, so every row keeps at least one finite score
    and the softmax never divides by zero; a pad query then attends to itself only, and real
    queries never see pad keys.

    Built with ``xp`` on the device. Without a key mask the (t_q, t_k) array is computed once
    per (device, dtype, shape, offset) and reused: treat it as read-only.

    Args:
        xp: numpy or cupy.
        dtype: floating dtype of the scores.
        t_q, t_k: number of queries and keys (t_k = offset + t_q in every use here).
        offset: absolute position of the first query.
        key_mask: None, or (B, t_k) with 1 = keep, 0 = pad (any integer, bool or float dtype).

    Returns:
        (t_q, t_k) when key_mask is None, else (B, 1, t_q, t_k); dtype ``dtype``.
    """
    if key_mask is None:
        key = (_device_key(xp), np.dtype(dtype).str, t_q, t_k, offset)
        bias = _BIAS_CACHE.get(key)
        if bias is None:
            if len(_BIAS_CACHE) > 256:
                _BIAS_CACHE.clear()
            allowed = xp.arange(t_k)[None, :] <= (offset + xp.arange(t_q))[:, None]  # (t_q, t_k)
            bias = xp.where(allowed, np.dtype(dtype).type(0), np.dtype(dtype).type(-math.inf)).astype(dtype)
            if xp is np:
                bias.flags.writeable = False  # shared by every call: read-only
            _BIAS_CACHE[key] = bias
        return bias
    j = xp.arange(t_k)[None, :]  # (1, t_k)
    i_abs = (offset + xp.arange(t_q))[:, None]  # (t_q, 1)
    causal = j <= i_abs  # (t_q, t_k)
    diag = j == i_abs  # (t_q, t_k)
    keep = key_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, t_k)
    allowed = causal & (keep | diag)  # (B, 1, t_q, t_k)
    return xp.where(allowed, np.dtype(dtype).type(0), np.dtype(dtype).type(-math.inf)).astype(dtype)


def _split_heads(qkv, n_head):
    """(B, T, 3C) -> three (B, H, T, D) views of q, k, v (no copy)."""
    if qkv.ndim != 3 or qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % n_head:
        raise ValueError(
            f"qkv must have shape (B, T, 3C) with C divisible by n_head={n_head}, got {tuple(qkv.shape)}"
        )
    B, T, C3 = qkv.shape
    C = C3 // 3
    qkv5 = qkv.reshape(B, T, 3, n_head, C // n_head)  # (B, T, 3, H, D)
    return (qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # each (B, H, T, D)


def _softmax_lastaxis_(s):
    """In-place softmax over the last axis (max-subtracted)."""
    xp = get_array_module(s)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def attention_forward(qkv, n_head, attention_mask=None, *, bias=None):
    """Causal multi-head self-attention on packed q, k, v (the output of c_attn).

        q, k, v = split(qkv)                                   each (B, H, T, D)
        att = softmax(q k^T / sqrt(D) + bias)                  (B, H, T, T)
        y = att v, heads concatenated                          (B, T, C)

    ``bias`` is :func:`attention_bias`: causal, plus key padding when ``attention_mask`` is
    given. Heads are a batch axis: batched matmuls, no loop over heads or rows.

    Causal skip: the queries are cut into a few blocks (:func:`_query_blocks`; 2 for T = 256,
    4 for T = 512, 1 below 256) and the block of queries i0..i1-1 is scored against keys 0..i1-1
    only: every key after i1-1 is masked for all of them, so its scores and their softmax would be
    exact zeros. With 2 blocks this skips a quarter of the (T, T) work, with 4 three eighths.

    Args:
        qkv: (B, T, 3C), laid out [q | k | v] along the last axis, each split into H heads of D.
        n_head: H.
        attention_mask: None, or (B, T) key-padding mask, 1 = real token, 0 = pad (used with
            left-padded prompts in generation). Not needed for right-padded training batches.
        bias: optional precomputed ``attention_bias(xp, dtype, T, T, 0, attention_mask)`` (the
            model builds it once for all blocks); when given, ``attention_mask`` is not used.

    Returns:
        y: (B, T, C).
        cache: (qs, k, v, atts, y) with qs = q / sqrt(D) and atts the list of each query block's
            (B, H, i1 - i0, i1) softmax; ``y`` is the returned array itself, referenced (the
            backward uses it; do not modify it in place).
    """
    xp = get_array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    q, k, v = _split_heads(qkv, n_head)  # (B, H, T, D) views
    qs = q * qkv.dtype.type(1.0 / math.sqrt(D))  # (B, H, T, D)
    fused = bias is None and attention_mask is None and kernels.use(qkv)
    if bias is None and not fused:
        bias = attention_bias(xp, qkv.dtype, T, T, 0, attention_mask)  # (T, T) or (B, 1, T, T)
    yh = xp.empty((B, T, n_head, D), dtype=qkv.dtype)  # heads side by side: reshapes to (B, T, C)
    atts = []
    for i0, i1 in _query_blocks(T):  # queries i0..i1-1 see keys 0..i1-1 at most
        kt = k[:, :, :i1].transpose(0, 1, 3, 2)  # (B, H, D, i1)
        if fused:  # CuPy: softmax(q k^T / sqrt(D) + causal mask) in one kernel pass; twin: the else
            att = q[:, :, i0:i1] @ kt  # (B, H, i1 - i0, i1) unscaled scores
            kernels.causal_softmax_(att, 1.0 / math.sqrt(D))
        else:
            att = qs[:, :, i0:i1] @ kt  # (B, H, i1 - i0, i1)
            att += bias[..., i0:i1, :i1]
            _softmax_lastaxis_(att)
        yh[:, i0:i1] = (att @ v[:, :, :i1]).transpose(0, 2, 1, 3)  # (B, i1 - i0, H, D)
        atts.append(att)
    y = yh.reshape(B, T, C)  # (B, T, C)
    return y, (qs, k, v, atts, y)


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """[(i0, i1), ...]: T queries cut into T // 128 blocks (1 to 4) of near-equal size."""
    n = max(1, min(4, T // 128))
    edges = [round(j * T / n) for j in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def attention_backward(dy, cache):
    """Backward of :func:`attention_forward`.

    forward:  y = att v
    backward: datt = dy v^T;  dv = att^T dy
    forward:  att = softmax(s)   (row-wise)
    backward: ds = att * (datt - delta),  delta_i = sum_j datt_ij att_ij = dy_i . y_i
              (the row sum is taken on the (T, D) side: dy . y costs B H T D, not B H T T)
    forward:  s = qs k^T + bias,  qs = q / sqrt(D)   (bias is a constant; masked entries have
              att = 0 so ds = 0 there)
    backward: dqs = ds k;  dk = ds^T qs;  dq = dqs / sqrt(D)

    Query block by query block, as in the forward: block i0..i1-1 reaches keys and values
    0..i1-1 only, so dk and dv of those keys sum the contributions of every block that sees them
    (the last block, which sees all T keys, writes them; the earlier ones add into their prefix).

    Args:
        dy: (B, T, C).
        cache: from the forward.

    Returns:
        dqkv: (B, T, 3C), laid out like qkv.
        grads: {} (the projections are separate linear layers).
    """
    qs, k, v, atts, y = cache
    xp = get_array_module(dy)
    B, H, T, D = qs.shape
    C = H * D
    dyh = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    delta = (dy * y).reshape(B, T, H, D).sum(axis=-1)  # (B, T, H)
    delta = delta.transpose(0, 2, 1)[..., None]  # (B, H, T, 1)
    dqkv = xp.empty((B, T, 3, H, D), dtype=dy.dtype)
    d = dqkv.transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D) view: dq, dk, dv
    blocks = _query_blocks(T)
    for (i0, i1), att in reversed(list(zip(blocks, atts))):  # the last block sees every key: first
        dy_b = dyh[:, :, i0:i1]  # (B, H, nq, D), nq = i1 - i0
        dv = att.transpose(0, 1, 3, 2) @ dy_b  # (B, H, i1, D)
        ds = dy_b @ v[:, :, :i1].transpose(0, 1, 3, 2)  # datt (B, H, nq, i1)
        if kernels.use(ds):  # CuPy: the two lines below in one kernel pass
            kernels.softmax_backward_(ds, att, delta[:, :, i0:i1])
        else:
            ds -= delta[:, :, i0:i1]
            ds *= att  # ds (B, H, nq, i1)
        dk = ds.transpose(0, 1, 3, 2) @ qs[:, :, i0:i1]  # (B, H, i1, D)
        if i1 == T:
            d[2], d[1] = dv, dk
        else:
            d[2][:, :, :i1] += dv
            d[1][:, :, :i1] += dk
        dq = ds @ k[:, :, :i1]  # dqs (B, H, nq, D)
        dq *= dy.dtype.type(1.0 / math.sqrt(D))
        d[0][:, :, i0:i1] = dq
    return dqkv.reshape(B, T, 3 * C), {}


def attention_forward_kv(qkv, n_head, k_cache, v_cache, start, key_mask=None, *, bias=None):
    """Inference-only attention step with a key/value cache (no backward, nothing cached).

    The new tokens' keys and values are written into the caches at positions
    ``start .. start + T_new - 1``; the new queries then attend to all ``L = start + T_new``
    cached keys under :func:`attention_bias` with ``offset = start``. On the same tokens this
    computes what :func:`attention_forward` computes, one chunk at a time.

    Args:
        qkv: (B, T_new, 3C) for the new tokens.
        n_head: H.
        k_cache, v_cache: (B, H, capacity, D), written in place.
        start: number of tokens already cached.
        key_mask: None, or (B, L) key-padding mask over all cached tokens including the new ones.
        bias: optional precomputed ``attention_bias(xp, dtype, T_new, L, start, key_mask)``;
            when given, ``key_mask`` is not used.

    Returns:
        y: (B, T_new, C).
    """
    xp = get_array_module(qkv)
    B, Tn, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    L = start + Tn
    q, k, v = _split_heads(qkv, n_head)  # (B, H, Tn, D) views
    k_cache[:, :, start:L] = k
    v_cache[:, :, start:L] = v
    qs = q * qkv.dtype.type(1.0 / math.sqrt(D))  # (B, H, Tn, D)
    if bias is None and key_mask is None:
        # causal only: query i (position start + i) sees keys 0 .. start + i. As in
        # attention_forward, blocks of queries are scored against the keys they can see only,
        # and on CuPy the fused causal softmax runs (the array code is its twin).
        yh = xp.empty((B, Tn, n_head, D), dtype=qkv.dtype)
        for i0, i1 in _query_blocks(Tn):
            kt = k_cache[:, :, : start + i1].transpose(0, 1, 3, 2)  # (B, H, D, start + i1)
            if kernels.use(qkv):
                att = q[:, :, i0:i1] @ kt  # (B, H, i1 - i0, start + i1) unscaled scores
                kernels.causal_softmax_(att, 1.0 / math.sqrt(D))
            else:
                att = qs[:, :, i0:i1] @ kt
                if i1 - i0 > 1:  # one query sees every key before it: no bias
                    att += attention_bias(xp, qkv.dtype, i1 - i0, start + i1, start + i0)
                _softmax_lastaxis_(att)
            yh[:, i0:i1] = (att @ v_cache[:, :, : start + i1]).transpose(0, 2, 1, 3)
        return yh.reshape(B, Tn, C)  # (B, Tn, C)
    att = qs @ k_cache[:, :, :L].transpose(0, 1, 3, 2)  # (B, H, Tn, L)
    att += attention_bias(xp, qkv.dtype, Tn, L, start, key_mask) if bias is None else bias
    _softmax_lastaxis_(att)
    return (att @ v_cache[:, :, :L]).transpose(0, 2, 1, 3).reshape(B, Tn, C)  # (B, Tn, C)


# ---------------------------------------------------------------------------------------------
# output projection tied to the token embedding
# ---------------------------------------------------------------------------------------------


def unembed_forward(x, wte):
    """Logits from the tied token embedding: ``logits = x @ wte^T``.

    Args:
        x: (B, T, C), the final layernorm's output.
        wte: (V, C).

    Returns:
        logits: (B, T, V).
        cache: (x, wte), referenced.
    """
    B, T, C = x.shape
    logits = x.reshape(B * T, C) @ wte.T  # (N, V)
    return logits.reshape(B, T, wte.shape[0]), (x, wte)


def unembed_backward(dlogits, cache):
    """Backward of :func:`unembed_forward`.

    forward:  logits = x @ wte^T
    backward: dx = dlogits @ wte;  dwte = dlogits^T @ x   (this use's share of the tied weight)

    Args:
        dlogits: (B, T, V).
        cache: from the forward.

    Returns:
        dx: (B, T, C).
        grads: {"wte": (V, C)}.
    """
    x, wte = cache
    B, T, C = x.shape
    dl2 = dlogits.reshape(B * T, wte.shape[0])  # (N, V)
    dx = (dl2 @ wte).reshape(B, T, C)  # (N, C) -> (B, T, C)
    dwte = dl2.T @ x.reshape(B * T, C)  # (V, C)
    return dx, {"wte": dwte}
