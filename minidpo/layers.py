"""GPT-2's layers, the plain reference: each forward directly above its backward, math only.

    out, cache = name_forward(x, ...)        # cache holds only what the backward needs
    dx, grads  = name_backward(dout, cache)  # grads: a dict keyed by the forward's parameter names

Each backward restates its forward line, then the derivative. Nothing here is tuned: no blocking,
no in-place updates, no GPU kernels. minidpo/fast.py has the same functions made fast, and the
tests check that the two agree. ``xp`` (numpy or cupy) comes from the inputs; outputs keep the
input dtype (constants are Python floats, which NumPy and CuPy do not let widen float32).

Shapes: B batch, T time, C channels, V vocabulary, H heads, D head size (C = H * D),
N = B * T rows. Residual connections need no layer: for x + f(x) the model adds f's input
gradient into the residual gradient (model.py).
"""

from __future__ import annotations

import math

import numpy as np

from . import checks
from .backend import get_array_module, scatter_add

__all__ = [
    "embedding_forward", "embedding_backward",
    "linear_forward", "linear_backward",
    "layernorm_forward", "layernorm_backward",
    "gelu_forward", "gelu_backward",
    "attention_forward", "attention_backward", "attention_forward_kv",
    "unembed_forward", "unembed_backward",
    "sees", "split_heads", "softmax",
]


# --------------------------------------------------------------------- token + position embedding


def embedding_forward(idx, wte, wpe, position_ids=None):
    """x[b, t] = wte[idx[b, t]] + wpe[pos[b, t]].

    idx (B, T) int in [0, V); wte (V, C); wpe (n_ctx, C); position_ids None (0..T-1), (T,) or (B, T).
    Returns x (B, T, C) and the cache (idx, position_ids, wte.shape, wpe.shape).
    """
    T = idx.shape[1]
    pos = wpe[:T] if position_ids is None else wpe[position_ids]  # (T, C) or (B, T, C)
    x = wte[idx] + pos  # (B, T, C)
    return x, (idx, position_ids, wte.shape, wpe.shape)


def embedding_backward(dx, cache, dwte=None):
    """forward:  x[b, t] = wte[idx[b, t]] + wpe[pos[b, t]]
    backward: dwte[v] = sum of dx[b, t] over the (b, t) with idx[b, t] == v (a scatter-add:
              a repeated id gets every contribution), and dwpe[p] likewise over positions.

    dx (B, T, C). ``dwte``: an optional (V, C) array to add into, in place (the tied output
    projection's share, so the tied weight's gradient is the sum of its two uses).
    Returns (None, {"wte": (V, C), "wpe": (n_ctx, C)}).
    """
    idx, position_ids, wte_shape, wpe_shape = cache
    xp = get_array_module(dx)
    B, T, C = dx.shape
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)  # (V, C)
    scatter_add(dwte, idx.reshape(-1), dx.reshape(B * T, C))
    pos = xp.broadcast_to(xp.arange(T) if position_ids is None else position_ids, (B, T))  # (B, T)
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)  # (n_ctx, C)
    scatter_add(dwpe, pos.reshape(-1), dx.reshape(B * T, C))
    return None, {"wte": dwte, "wpe": dwpe}


# --------------------------------------------------------------------- linear (GPT-2's Conv1D: w is (in, out))


def linear_forward(x, w, b=None):
    """y = x @ w + b.   x (..., Cin), w (Cin, Cout), b (Cout,) or None -> y (..., Cout).

    The matmul runs on the (N, Cin) view. The cache references x (do not modify it in place).
    """
    y = x.reshape(-1, w.shape[0]) @ w  # (N, Cout)
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_backward(dy, cache):
    """forward:  y = x @ w + b
    backward: dx = dy @ w^T;  dw = x^T @ dy;  db = sum over rows of dy

    dy (..., Cout) -> dx (..., Cin), {"w": (Cin, Cout), "b": (Cout,) or None}.
    """
    x, w, has_bias = cache
    x2 = x.reshape(-1, w.shape[0])  # (N, Cin)
    dy2 = dy.reshape(-1, w.shape[1])  # (N, Cout)
    dx = (dy2 @ w.T).reshape(x.shape)  # (..., Cin)
    dw = x2.T @ dy2  # (Cin, Cout)
    db = dy2.sum(axis=0) if has_bias else None  # (Cout,)
    return dx, {"w": dw, "b": db}


# --------------------------------------------------------------------- layernorm


def layernorm_forward(x, w, b, eps=1e-5):
    """y = (x - mean) * rstd * w + b,  mean = mean_c x,  rstd = 1 / sqrt(mean_c (x - mean)^2 + eps)

    x (..., C); w, b (C,). The cache keeps x (referenced), mean and rstd (..., 1) (llm.c's choice:
    the backward recomputes x_hat rather than storing another (..., C) array).
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / get_array_module(x).sqrt(var + eps)  # (..., 1)
    y = (x - mean) * rstd * w + b  # (..., C)
    return y, (x, w, mean, rstd)


def layernorm_backward(dy, cache):
    """forward:  x_hat = (x - mean) * rstd;  y = x_hat * w + b
    backward: dw = sum_n dy * x_hat;  db = sum_n dy;  with g = dy * w,
              dx = rstd * (g - mean_c(g) - x_hat * mean_c(g * x_hat))
    (mean and rstd depend on every x_c: the two means are their share).

    dy (..., C) -> dx (..., C), {"w": (C,), "b": (C,)}.
    """
    x, w, mean, rstd = cache
    C = x.shape[-1]
    xhat = (x - mean) * rstd  # (..., C)
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    db = dy.reshape(-1, C).sum(axis=0)  # (C,)
    g = dy * w  # (..., C)
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, {"w": dw, "b": db}


# --------------------------------------------------------------------- GELU, tanh form (GPT-2's "gelu_new")

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(z)),  z = k (x + c x^3),  k = sqrt(2 / pi), c = 0.044715.

    Any shape. The cache is x (the backward recomputes tanh z).
    """
    z = GELU_K * (x + GELU_C * x**3)
    y = 0.5 * x * (1.0 + get_array_module(x).tanh(z))
    return y, x


def gelu_backward(dy, cache):
    """forward:  y = 0.5 x (1 + tanh(z)),  z = k (x + c x^3)
    backward: dy/dx = 0.5 (1 + tanh z) + 0.5 x (1 - tanh^2 z) k (1 + 3 c x^2)

    Returns dx (x's shape) and {} (no parameters).
    """
    x = cache
    th = get_array_module(x).tanh(GELU_K * (x + GELU_C * x**3))  # tanh z
    dz = GELU_K * (1.0 + 3.0 * GELU_C * x**2)  # dz/dx
    return dy * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dz), {}


# --------------------------------------------------------------------- causal multi-head self-attention


def softmax(s):
    """softmax over the last axis, max-subtracted: exp(s - max) / sum exp(s - max)."""
    e = get_array_module(s).exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sees(n_keys, start=None, hidden_lo=None, hidden_hi=None, offset=0, n_queries=None, xp=None):
    """The attention mask: may query i see key j?  (a batch's layout, packing.Layout)

        sees[i, j] = start[i] <= j <= offset + i  and not  hidden_lo[i] <= j < hidden_hi[i]

    Query i sits at key index offset + i (a KV cache's new tokens come after ``offset`` cached
    ones) and never sees a later key. start, hidden_lo, hidden_hi: (..., Tq) ints, or None for the
    causal mask (start 0, nothing hidden; then n_queries gives Tq, and xp the array module).
    Returns bool (..., Tq, n_keys), or (Tq, n_keys) for the causal mask.
    """
    xp = get_array_module(start) if start is not None else (xp or np)
    Tq = start.shape[-1] if start is not None else n_queries
    j = xp.arange(n_keys)  # (n_keys,) key index
    i = offset + xp.arange(Tq)[:, None]  # (Tq, 1) each query's own index among the keys
    if start is None:
        return j <= i
    start, lo, hi = start[..., None], hidden_lo[..., None], hidden_hi[..., None]  # (..., Tq, 1)
    return (start <= j) & (j <= i) & ~((lo <= j) & (j < hi))


def split_heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v, each (B, H, T, D) (views)."""
    B, T, C3 = qkv.shape
    qkv5 = qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head)  # (B, T, 3, H, D)
    return [qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def attention_forward(qkv, n_head, layout=None):
    """q, k, v = split(qkv)                          each (B, H, T, D)
    att = softmax(q k^T / sqrt(D)) over the keys each query sees     (B, H, T, T)
    y = att v, heads side by side                    (B, T, C)

    qkv (B, T, 3C) = [q | k | v]; layout: None for causal attention (query i sees keys 0..i), or
    a packing.Layout of the batch (its start, hidden_lo, hidden_hi: :func:`sees`).
    """
    checks.qkv(qkv, n_head)
    B, T, _ = qkv.shape
    q, k, v = split_heads(qkv, n_head)  # (B, H, T, D)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if layout is None or layout.causal:
        mask = sees(T, n_queries=T, xp=get_array_module(qkv))  # (T, T)
    else:
        mask = sees(T, layout.start, layout.hidden_lo, layout.hidden_hi)[:, None]  # (B, 1, T, T)
    s = q @ k.transpose(0, 1, 3, 2) * scale  # (B, H, T, T)
    att = softmax(get_array_module(s).where(mask, s, -math.inf))  # a hidden key: exp(-inf) = 0
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)  # (B, T, C)
    return y, (q, k, v, att)


def attention_backward(dy, cache):
    """forward:  y = att v
    backward: datt = dy v^T;  dv = att^T dy
    forward:  att = softmax(s)   (row-wise, over the keys the query sees)
    backward: ds = att * (datt - sum_j datt_j att_j)   (0 where att is 0: a hidden key gets none)
    forward:  s = q k^T / sqrt(D)
    backward: dq = ds k / sqrt(D);  dk = ds^T q / sqrt(D)

    dy (B, T, C) -> dqkv (B, T, 3C) laid out like qkv, and {} (the projections are linear layers).
    """
    q, k, v, att = cache
    xp = get_array_module(dy)
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D)
    dyh = dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    datt = dyh @ v.transpose(0, 1, 3, 2)  # (B, H, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dyh  # (B, H, T, D)
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, H, T, T)
    dq = ds @ k * scale  # (B, H, T, D)
    dk = ds.transpose(0, 1, 3, 2) @ q * scale  # (B, H, T, D)
    dqkv = xp.stack([dq, dk, dv], axis=2)  # (B, H, 3, T, D)
    return dqkv.transpose(0, 3, 2, 1, 4).reshape(B, T, 3 * H * D), {}  # (B, T, 3, H, D) -> (B, T, 3C)


def attention_forward_kv(qkv, n_head, k_cache, v_cache, offset, start=None):
    """Inference-only attention of T_new new tokens against every cached one (no backward).

    The new keys and values are written into the caches at offset .. offset + T_new - 1; then
        att = softmax(q K^T / sqrt(D)) over the keys each query sees,  y = att V
    over all L = offset + T_new keys, new query i (key index offset + i) seeing keys start[b, i]
    .. offset + i (:func:`sees`; start None: all of them, the causal mask). On the same tokens
    this is attention_forward, one chunk at a time.

    qkv (B, T_new, 3C); k_cache, v_cache (B, H, capacity, D), written in place; start None or
    (B, T_new) ints (a left-padded row's first real token; a pad's own index). Returns y (B, T_new, C).
    """
    checks.qkv(qkv, n_head)
    xp = get_array_module(qkv)
    B, Tn, _ = qkv.shape
    L = offset + Tn
    q, k, v = split_heads(qkv, n_head)  # (B, H, Tn, D)
    k_cache[:, :, offset:L] = k
    v_cache[:, :, offset:L] = v
    if start is None:
        mask = sees(L, offset=offset, n_queries=Tn, xp=xp)  # (Tn, L)
    else:
        zero = xp.zeros_like(start)
        mask = sees(L, start, zero, zero, offset)[:, None]  # (B, 1, Tn, L)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = q @ k_cache[:, :, :L].transpose(0, 1, 3, 2) * scale  # (B, H, Tn, L)
    att = softmax(xp.where(mask, s, -math.inf))
    return (att @ v_cache[:, :, :L]).transpose(0, 2, 1, 3).reshape(B, Tn, -1)  # (B, Tn, C)


# --------------------------------------------------------------------- output projection, tied to wte


def unembed_forward(x, wte):
    """logits = x @ wte^T.   x (..., C), wte (V, C) -> logits (..., V); the cache is (x, wte)."""
    C = x.shape[-1]
    logits = x.reshape(-1, C) @ wte.T  # (N, V)
    return logits.reshape(*x.shape[:-1], wte.shape[0]), (x, wte)


def unembed_backward(dlogits, cache):
    """forward:  logits = x @ wte^T
    backward: dx = dlogits @ wte;  dwte = dlogits^T @ x   (this use's share of the tied weight)

    dlogits (..., V) -> dx (..., C), {"wte": (V, C)}.
    """
    x, wte = cache
    C = x.shape[-1]
    dl2 = dlogits.reshape(-1, wte.shape[0])  # (N, V)
    dx = (dl2 @ wte).reshape(x.shape)  # (..., C)
    dwte = dl2.T @ x.reshape(-1, C)  # (V, C)
    return dx, {"wte": dwte}
