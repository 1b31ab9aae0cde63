"""log pi(y|x), eq. (7)'s only model-dependent term, and its backward: the plain reference.

DPO sees a policy through four numbers per preference pair: log pi(y_w|x) and log pi(y_l|x)
under the policy and under the reference. For an autoregressive model each is a sum over the
response tokens,

    log pi(y|x) = sum_k log pi(y_k | x, y_<k),                                       (R)

each term read off the logits of the position just before y_k. A batch (packing.Batch) says
which: the logits of M positions (``logits_at``) predict the M scored tokens (``labels``), and
``weights`` (E, M) say which tokens make up each of the E examples (1, or 1/n_e for the
per-token mean that IPO's official code uses). So, with the model's logits at those positions,

    lp[m]    = log softmax(logits[m])[labels[m]]          log pi(y_k | x, y_<k)     (M,)
    logps[e] = sum_m weights[e, m] lp[m]                   (R), or its mean          (E,)

Only the scored positions reach the output projection, so no logits of the prompt or the
padding are computed, and there is nothing to mask. Shapes: M scored tokens, V vocabulary, E
examples. Dtypes are preserved. minidpo/fast.py has the same functions made fast (the
log-softmax in cache-sized pieces, fused CPU and CUDA kernels).
"""

from __future__ import annotations

from . import checks
from .backend import get_array_module

__all__ = ["logsumexp", "log_softmax", "log_softmax_backward", "token_logps", "token_logps_backward",
           "sequence_logps", "sequence_logps_backward", "token_log_sum_sq"]


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


def token_logps(logits, labels):
    """The log-prob of each scored token:

        lse[m] = logsumexp_v logits[m, v]                  (M,)
        lp[m]  = logits[m, labels[m]] - lse[m]             (M,)   log pi(y_k | x, y_<k)

    logits (M, V) float, the logits that predict each token; labels (M,) int in [0, V).
    Returns lp (M,) and the cache {"logits" (referenced), "labels", "lse"}.
    """
    checks.token_logps_args(logits, labels)
    xp = get_array_module(logits, labels)
    M = logits.shape[0]
    lse = logsumexp(logits, axis=-1)  # (M,)
    lp = logits[xp.arange(M), labels] - lse  # (M,)
    return lp, {"logits": logits, "labels": labels, "lse": lse}


def token_logps_backward(dlp, cache, *, overwrite_logits: bool = False):
    """forward:  lp[m] = logits[m, y_m] - lse[m]
    backward: d lse[m] / d logits[m, v] = softmax(logits[m])_v = p[m, v], so
              dlogits[m, v] = dlp[m] (1[v == y_m] - p[m, v])

    dlp (M,) -> dlogits (M, V), the logits' dtype. ``overwrite_logits`` is the fast twin's memory
    option; the plain code always writes a new array.
    """
    logits, labels, lse = cache["logits"], cache["labels"], cache["lse"]
    xp = get_array_module(logits)
    V = logits.shape[-1]
    p = xp.exp(logits - lse[:, None])  # (M, V) softmax
    onehot = xp.arange(V) == labels[:, None]  # (M, V)
    return xp.asarray(dlp).astype(logits.dtype)[:, None] * (onehot - p)


def sequence_logps(logits, labels, weights):
    """(R) for each example: its tokens' log-probs summed (or averaged), eq. (7)'s log pi(y|x).

        lp       = token_logps(logits, labels)             (M,)
        logps[e] = sum_m weights[e, m] lp[m]                (E,)

    logits (M, V) at the scored positions; labels (M,) int; weights (E, M) of the logits' dtype
    (packing.Batch.weights). Returns logps (E,) and the cache (token_logps' plus "weights").
    """
    checks.sequence_logps_args(logits, labels, weights)
    lp, cache = token_logps(logits, labels)  # (M,)
    cache["weights"] = weights
    return weights @ lp, cache


def sequence_logps_backward(dlogps, cache, *, overwrite_logits: bool = False):
    """forward:  logps = weights @ lp
    backward: dlp = weights^T @ dlogps  (M,), then token_logps_backward.

    dlogps (E,) -> dlogits (M, V)."""
    w = cache["weights"]
    checks.dlogps(dlogps, w.shape[0])
    dlp = w.T @ get_array_module(w).asarray(dlogps).astype(w.dtype)  # (M,)
    return token_logps_backward(dlp, cache, overwrite_logits=overwrite_logits)


def token_log_sum_sq(logits, lse):
    """log sum_v pi(v|.)^2 at each scored position, a constant for WPO's weights (Zhou et al. 2024):

        pi(v|.) = exp(logits[m, v] - lse[m])  so  log sum_v pi(v|.)^2 = logsumexp_v(2 logits[m, v]) - 2 lse[m]

    logits (M, V), lse (M,) (token_logps' cache). Returns (M,) in the logits' dtype. No backward:
    WPO's weights carry no gradient."""
    return logsumexp(2 * logits, axis=-1) - 2 * lse
