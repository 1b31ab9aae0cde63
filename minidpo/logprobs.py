"""log pi(y|x), eq. (7)'s only model-dependent term, and its backward: the plain reference.

DPO sees a policy through four numbers per preference pair: log pi(y_w|x) and log pi(y_l|x)
under the policy and under the reference. For an autoregressive model each is a sum over the
response tokens,

    log pi(y|x) = sum_k log pi(y_k | x, y_<k),                                       (R)

read off the logits. Conventions (those of the official DPO code, `_get_batch_logps`):

- ``labels`` are the input ids themselves (B, T): the token at t+1 is scored by the logits at
  t, so the last position's logits score nothing and the token at position 0 is never scored.
- ``loss_mask`` (B, T) marks LABEL positions: loss_mask[b, t] says whether labels[b, t] counts.
  Other positions may hold any label, -100 included: they become 0 before the gather (-100 is
  a legal negative index in NumPy and CuPy) and their terms are masked out.

So, with lp[b, t] = log softmax(logits[b, t])[labels[b, t+1]] for t = 0 .. T-2,

    logps[b] = sum_t loss_mask[b, t+1] * lp[b, t]                         (R)
    logps[b] = (R) / n[b],   n[b] = sum_t loss_mask[b, t+1]               (average=True)

Shapes: B batch rows, T time, V vocabulary. Dtypes are preserved. minidpo/fast.py has the same
functions made fast (the log-softmax in cache-sized pieces, a fused CUDA kernel on the GPU).
"""

from __future__ import annotations

from . import checks
from .backend import get_array_module

__all__ = ["logsumexp", "log_softmax", "log_softmax_backward", "sequence_logps", "sequence_logps_backward"]


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    """log sum exp(x) along ``axis``, stable:  m + log sum exp(x - m),  m = max x.

    Every exponent is <= 0, so nothing overflows and the log never sees 0. A slice whose max is
    not finite returns that max (all -inf gives -inf, without an -inf - -inf = nan).
    Returns x's dtype and shape without ``axis`` (size 1 there with keepdims).
    """
    xp = get_array_module(x)
    m = xp.max(x, axis=axis, keepdims=True)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, x.dtype.type(0))  # an all -inf slice: shift by 0, not by -inf
    e = x - m0  # one temporary of x's size ...
    xp.exp(e, out=e)  # ... exponentiated in place
    s = xp.sum(e, axis=axis, keepdims=True)  # >= 1 wherever m is finite
    out = xp.where(finite, m0 + xp.log(xp.where(finite, s, x.dtype.type(1))), m)
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(x, axis: int = -1):
    """log softmax(x) = x - logsumexp(x) along ``axis``; x's shape and dtype."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def log_softmax_backward(dlogp, logp, axis: int = -1):
    """forward:  logp_k = x_k - logsumexp(x),  so d logp_k / d x_m = 1[k == m] - p_m,  p = exp(logp)
    backward: dx_m = dlogp_m - p_m * sum_k dlogp_k
    """
    xp = get_array_module(dlogp, logp)
    return dlogp - xp.exp(logp) * xp.sum(dlogp, axis=axis, keepdims=True)


def sequence_logps(logits, labels, loss_mask, average: bool = False, *, validate: bool = True,
                   allow_empty: bool = False):
    """(R) for each row: the masked sum (or mean) of its response tokens' log-probs.

        y[b, t]   = labels[b, t+1], or 0 where it does not count               (B, T-1)
        lse[b, t] = logsumexp_v logits[b, t, v]                                 (B, T-1)
        lp[b, t]  = logits[b, t, y[b, t]] - lse[b, t]                           (B, T-1)
        logps[b]  = sum_t w[b, t] lp[b, t],   w = mask (or mask / n)            (B,)

    ``average=False`` is eq. (7)'s log pi(y|x); True gives the per-token mean (the official
    code's IPO). A row with no counted token is an error unless ``allow_empty`` (its log pi would
    be 0 for any policy). ``validate`` checks the counted labels' range and empty rows (one host
    sync on a GPU); unchecked, labels are clipped into [0, V).

    Args: logits (B, T, V) float; labels (B, T) int; loss_mask (B, T) bool or 0/1 (column 0 unused).
    Returns: logps (B,), and the cache {"logits" (referenced), "labels" y, "lse", "weights" w,
        "token_counts" n (B,) int64}.
    """
    checks.sequence_logps_args(logits, labels, loss_mask, validate=validate, allow_empty=allow_empty)
    xp = get_array_module(logits, labels, loss_mask)
    V = logits.shape[-1]
    mask = loss_mask[:, 1:] != 0  # (B, T-1) the label at t+1 counts
    y = xp.clip(xp.where(mask, labels[:, 1:], 0), 0, V - 1)  # (B, T-1) never index with an ignored label
    lse = logsumexp(logits[:, :-1], axis=-1)  # (B, T-1)
    lp = xp.take_along_axis(logits[:, :-1], y[:, :, None], axis=-1)[:, :, 0] - lse  # (B, T-1)
    n = mask.sum(axis=1, dtype=xp.int64)  # (B,)
    w = mask.astype(logits.dtype)  # (B, T-1)
    if average:
        w = w / xp.maximum(n, 1).astype(logits.dtype)[:, None]
    logps = (xp.where(mask, lp, 0.0) * w).sum(axis=1)  # (B,) a masked lp may be anything: where, not *
    return logps, {"logits": logits, "labels": y, "lse": lse, "weights": w, "token_counts": n}


def sequence_logps_backward(dlogps, cache, *, overwrite_logits: bool = False):
    """forward:  logps[b] = sum_t w[b, t] (logits[b, t, y] - lse[b, t]),  y = labels[b, t+1]
    backward: d lse / d logits[b, t, v] = softmax(logits[b, t])_v = p[b, t, v], so
              dlogits[b, t, v] = dlogps[b] w[b, t] (1[v == y] - p[b, t, v])    t = 0 .. T-2
              dlogits[b, T-1, :] = 0                     (the last position scores nothing)

    dlogps (B,) -> dlogits (B, T, V), the logits' dtype. ``overwrite_logits`` is the fast twin's
    memory option; the plain code always writes a new array.
    """
    logits = cache["logits"]
    checks.dlogps(dlogps, logits.shape[0])
    xp = get_array_module(logits)
    V = logits.shape[-1]
    g = xp.asarray(dlogps).astype(logits.dtype)[:, None] * cache["weights"]  # (B, T-1)
    p = xp.exp(logits[:, :-1] - cache["lse"][:, :, None])  # (B, T-1, V) softmax
    onehot = xp.arange(V) == cache["labels"][:, :, None]  # (B, T-1, V)
    dlogits = xp.zeros_like(logits)  # (B, T, V)
    dlogits[:, :-1] = g[:, :, None] * (onehot - p)
    return dlogits
