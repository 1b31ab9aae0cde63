"""log pi(y|x): the summed log-probability of a response, eq. (7)'s only model-dependent term.

DPO never looks at a token on its own: the loss (eq. 7) sees a policy through four numbers per
preference pair, log pi(y_w|x) and log pi(y_l|x) under the policy and under the reference. For
an autoregressive model each is a sum over the response tokens,

    log pi(y|x) = sum_{k} log pi(y_k | x, y_<k),                                    (R)

read off the model's logits. This module computes (R) for a batch of rows, and its backward.

Conventions (those of the official DPO code, trainers.py `_get_batch_logps`):

- ``labels`` are the input token ids themselves (B, T). The token at position t+1 is scored by
  the logits at position t, so the logits at the last position score nothing and the token at
  position 0 is never scored (a prompt is never empty).
- ``loss_mask`` (B, T) marks LABEL positions: ``loss_mask[b, t]`` is true iff token
  ``labels[b, t]`` belongs to the response and its log-prob counts. ``loss_mask[:, 0]`` is
  ignored. Prompt and padding positions may hold any label value, -100 included: they are
  replaced by 0 before the gather (-100 is a legal *negative* index in NumPy and CuPy, and
  would silently read the vocabulary's tail) and their terms are masked out.

So, with lp[b, t] = log softmax(logits[b, t])[labels[b, t+1]]  for t = 0 .. T-2,

    logps[b] = sum_{t=0}^{T-2} loss_mask[b, t+1] * lp[b, t]                         (R)
    logps[b] = (R) / n[b],    n[b] = sum_{t=1}^{T-1} loss_mask[b, t]     (average=True)

Letters: B batch rows, T time (sequence length), V vocabulary size.

One code path serves NumPy and CuPy: every function finds its array module from its inputs.
Dtypes are preserved: float32 logits give float32 log-probs and gradients, float64 give float64.

Speed. The (B, T, V) logits are the largest array of a step. On NumPy the log-softmax passes over
them run in pieces of about 1 MiB (a few scoring rows at a time), so each pass after the first
reads the cache, not memory, and no (B, T, V) temporary is made; every row is computed exactly as
in one whole-array pass. On CuPy, one fused kernel reads each scoring row once for the forward,
and one writes the (B, T, V) gradient once for the backward (minidpo/kernels.py); the array
code here is their twin.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .backend import get_array_module

__all__ = [
    "logsumexp",
    "log_softmax",
    "log_softmax_backward",
    "count_response_tokens",
    "token_logps",
    "sequence_logps",
    "sequence_logps_backward",
]


# ----------------------------------------------------------------------------------------------
# the stable log-sum-exp, shared by everything below (and by theory.py's tables)


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    """Stable log(sum(exp(x), axis)).

        logsumexp(x) = m + log(sum(exp(x - m))),   m = max(x)

    Subtracting the max keeps every exponent <= 0, so nothing overflows; the largest term is
    exp(0) = 1, so the log never sees 0. A slice whose max is not finite returns that max: an
    all -inf slice gives -inf (log 0) with no -inf - -inf = nan and no divide-by-zero event. Terms far below the max underflow to 0
    in ``exp``, which is harmless: they are below the result's precision.

    Args:
        x: float array of any shape.
        axis: the axis to reduce.
        keepdims: keep the reduced axis with size 1.
    Returns:
        an array of x's dtype, x's shape without ``axis`` (or with size 1 there if keepdims).
    """
    xp = get_array_module(x)
    m = xp.max(x, axis=axis, keepdims=True)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, x.dtype.type(0))  # an all -inf slice: shift by 0, not by -inf (nan)
    e = x - m0  # one temporary of x's size ...
    xp.exp(e, out=e)  # ... exponentiated in place
    s = xp.sum(e, axis=axis, keepdims=True)  # >= 1 wherever m is finite
    out = xp.where(finite, m0 + xp.log(xp.where(finite, s, x.dtype.type(1))), m)  # else the max itself
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(x, axis: int = -1):
    """log softmax(x) = x - logsumexp(x) along ``axis``; same shape and dtype as x."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def log_softmax_backward(dlogp, logp, axis: int = -1):
    """The backward of logp = log_softmax(x), given the forward's output.

    Forward:  logp_k = x_k - logsumexp(x),  so  d logp_k / d x_m = 1[k == m] - p_m,  p = exp(logp)
    Backward: dx_m = sum_k dlogp_k (1[k == m] - p_m) = dlogp_m - p_m * sum_k dlogp_k

    Args:
        dlogp: upstream gradient, logp's shape.
        logp: the forward's output.
        axis: the softmax axis.
    Returns:
        dx, logp's shape and dtype.
    """
    xp = get_array_module(dlogp, logp)
    return dlogp - xp.exp(logp) * xp.sum(dlogp, axis=axis, keepdims=True)


# ----------------------------------------------------------------------------------------------
# input checks (shapes are free to check; values cost a host sync on a GPU)


def _check_logits_labels(logits, labels):
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if logits.dtype.kind != "f":
        raise TypeError(f"logits must be a floating array, got dtype {logits.dtype}")
    B, T, V = logits.shape
    if labels.shape != (B, T):
        raise ValueError(f"labels must be (B, T) = {(B, T)} to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if T < 2:
        raise ValueError(f"need T >= 2 positions (the token at t+1 is scored by the logits at t), got T = {T}")
    return B, T, V


def _shifted_mask(loss_mask, B: int, T: int, xp):
    """(B, T) loss mask over label positions -> (B, T-1) bool, aligned with the logits at 0..T-2."""
    if loss_mask.shape != (B, T):
        raise ValueError(f"loss_mask must be (B, T) = {(B, T)}, got {tuple(loss_mask.shape)}")
    if loss_mask.dtype.kind not in "biuf":
        raise TypeError(f"loss_mask must be bool or 0/1 numbers, got dtype {loss_mask.dtype}")
    m = loss_mask[:, 1:]  # (B, T-1): m[b, t] says whether the label at t+1 counts
    return m if m.dtype == np.bool_ else (m != 0)


def _first_bad_rows(bad_rows, limit: int = 8) -> str:
    rows = np.flatnonzero(np.asarray(bad_rows.get() if hasattr(bad_rows, "get") else bad_rows))
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (", ..." if rows.size > limit else "")


# ----------------------------------------------------------------------------------------------
# the core: per-token log-probs of the shifted labels


def _token_logps(logits, safe_labels):
    """lp[b, t] = log softmax(logits[b, t])[safe_labels[b, t]] for t = 0 .. T-2, and the lse.

    This is the only place the log-softmax of the (B, T, V) logits is evaluated; both public
    forward functions call it. The full log-softmax is never materialised: only its value at the
    one label per position, lp = logits[label] - lse, is needed.

    Args:
        logits: (B, T, V) float.
        safe_labels: (B, T-1) int, every entry in [0, V): the labels already shifted left by one
            (safe_labels[b, t] is the token at t+1) and with ignored positions set to 0.
    Returns:
        lp: (B, T-1) log-probs, logits' dtype.
        lse: (B, T-1) log-sum-exp of each scoring row (kept for the backward).
    """
    if kernels.use(logits):  # CuPy: one fused kernel, one read of each row; the lines below are its twin
        return kernels.logsoftmax_gather(logits, safe_labels)
    xp = get_array_module(logits)
    B, T, V = logits.shape
    scoring = logits[:, :-1]  # (B, T-1, V) a view: the rows that score a next token
    lse = xp.empty((B, T - 1), dtype=logits.dtype)  # (B, T-1)
    for bs, ts in _row_pieces(B, T - 1, V, xp):  # logsumexp's temporary: one piece, not (B, T-1, V)
        lse[bs, ts] = logsumexp(scoring[bs, ts], axis=-1)
    b_idx = xp.arange(B)[:, None]  # (B, 1)
    t_idx = xp.arange(T - 1)[None, :]  # (1, T-1)
    picked = scoring[b_idx, t_idx, safe_labels]  # (B, T-1) the logit of each label
    return picked - lse, lse


_PIECE = 1 << 18  # elements (1 MiB of float32) per piece of the (B, T-1, V) loops


def _row_pieces(B: int, rows: int, V: int, xp):
    """(batch slice, row slice) pieces covering the (B, rows) scoring rows, each about _PIECE
    elements of the (B, rows, V) logits: several batch rows when a whole row of the batch is
    small, else some of one batch row's positions. On CuPy: one piece, the whole array."""
    if xp is not np or B * rows * V <= _PIECE:
        return [(slice(None), slice(None))]
    if rows * V <= _PIECE:
        nb = _PIECE // (rows * V)
        return [(slice(b, b + nb), slice(None)) for b in range(0, B, nb)]
    nt = max(1, _PIECE // V)
    return [(slice(b, b + 1), slice(t, t + nt)) for b in range(B) for t in range(0, rows, nt)]


def count_response_tokens(loss_mask):
    """n[b] = the number of label positions that count, sum_{t=1}^{T-1} loss_mask[b, t].

    ``loss_mask[:, 0]`` is excluded: the first token has no logits before it to score it.

    Args:
        loss_mask: (B, T) bool or 0/1.
    Returns:
        (B,) int64 counts, on loss_mask's device.
    """
    xp = get_array_module(loss_mask)
    if loss_mask.ndim != 2:
        raise ValueError(f"loss_mask must be (B, T), got shape {tuple(loss_mask.shape)}")
    return xp.sum(loss_mask[:, 1:] != 0, axis=1, dtype=xp.int64)  # (B,)


def token_logps(logits, labels, loss_mask=None, *, validate: bool = True):
    """Per-token log-probs of the shifted labels, for KL estimates and diagnostics.

        out[b, t] = log softmax(logits[b, t])[labels[b, t+1]],   t = 0 .. T-2

    Without ``loss_mask`` every label at positions 1 .. T-1 must be a valid token id. With it,
    positions whose label does not count get label 0 for the gather and output 0, so -100 or
    padding labels are safe there (the caller multiplies by ``loss_mask[:, 1:]`` as needed).

    Args:
        logits: (B, T, V) float32 or float64.
        labels: (B, T) int, the input ids.
        loss_mask: optional (B, T) bool or 0/1 over label positions (see the module docstring).
        validate: check that every counted label lies in [0, V) (one host sync on a GPU);
            unchecked, out-of-range labels are clipped into [0, V) rather than reported.
    Returns:
        (B, T-1) array of logits' dtype.
    """
    xp = get_array_module(logits, labels)
    B, T, V = _check_logits_labels(logits, labels)
    shifted = labels[:, 1:]  # (B, T-1) the token each scoring position predicts
    if loss_mask is None:
        if validate and bool(xp.any((shifted < 0) | (shifted >= V))):
            bad = xp.any((shifted < 0) | (shifted >= V), axis=1)
            raise ValueError(
                f"token_logps: labels at positions 1..T-1 must lie in [0, V={V}) when no loss_mask is "
                f"given; rows {_first_bad_rows(bad)} do not (pass loss_mask to ignore -100/padding)"
            )
        if not validate:
            shifted = xp.clip(shifted, 0, V - 1)  # never read outside the vocabulary, even unchecked
        lp, _ = _token_logps(logits, shifted)
        return lp
    mask = _shifted_mask(loss_mask, B, T, xp)  # (B, T-1) bool
    if validate:
        _check_counted_labels(shifted, mask, V, xp)
    safe = xp.where(mask, shifted, 0)  # (B, T-1) never index with an ignored label
    if not validate:
        safe = xp.clip(safe, 0, V - 1)
    lp, _ = _token_logps(logits, safe)
    return xp.where(mask, lp, logits.dtype.type(0))


def _check_counted_labels(shifted, mask, V: int, xp) -> None:
    out_of_range = mask & ((shifted < 0) | (shifted >= V))  # (B, T-1)
    if bool(xp.any(out_of_range)):
        raise ValueError(
            f"labels counted by loss_mask must be token ids in [0, V={V}); rows "
            f"{_first_bad_rows(xp.any(out_of_range, axis=1))} have a counted label outside it "
            f"(-100 or padding inside the response?)"
        )


# ----------------------------------------------------------------------------------------------
# (R) forward and backward


def sequence_logps(logits, labels, loss_mask, average: bool = False, *, validate: bool = True, allow_empty: bool = False):
    """log pi(y|x) for each row: the (masked) sum, or mean, of its response-token log-probs.

        lp[b, t]  = logits[b, t, labels[b, t+1]] - logsumexp_v logits[b, t, v]     t = 0..T-2
        logps[b]  = sum_t loss_mask[b, t+1] * lp[b, t]                      (R), eq. (7)'s log pi
        logps[b] /= n[b]                                                    if average=True

    ``average=False`` is what eq. (7) means by log pi(y|x). ``average=True`` gives the
    per-token mean, which the official DPO code uses for IPO (see losses.average_logps_for).

    Empty rows. A row with no counted token (n[b] = 0) has log pi = 0 whatever the policy, so
    its DPO loss would sit at ln 2 with zero gradient: a silent non-training example. By
    default such rows are an error (ValueError naming them). With ``allow_empty=True`` they
    give logps 0 (the mean divides by max(n, 1)) and the caller must check
    ``cache["token_counts"]`` itself.

    Validation. ``validate=True`` also checks that every counted label is in [0, V). The value
    checks (counted labels, empty rows) cost one device-to-host sync on a GPU; a training loop
    whose data pipeline already guarantees them may pass ``validate=False`` (then empty rows
    behave as with ``allow_empty=True``, and out-of-range counted labels are clipped by the
    gather rather than reported). Shape and dtype checks are always made.

    Args:
        logits: (B, T, V) float32 or float64, the model's output for the input ids.
        labels: (B, T) int, the input ids themselves; ignored positions may hold anything.
        loss_mask: (B, T) bool or 0/1; loss_mask[b, t] = 1 iff labels[b, t] is a counted
            response token. Column 0 is ignored.
        average: divide each row's sum by its count of counted tokens.
        validate: check counted labels and empty rows (see above).
        allow_empty: let rows with zero counted tokens through (see above).
    Returns:
        logps: (B,) logits' dtype.
        cache: dict for sequence_logps_backward, with
            "token_counts" (B,) int64: n[b], the counted tokens per row;
            "logits" (B, T, V): a reference (not a copy) to the input logits;
            "labels" (B, T-1) int: the shifted labels with ignored entries set to 0;
            "lse" (B, T-1): logsumexp of each scoring row;
            "weights" (B, T-1): d logps[b] / d lp[b, t] = mask (or mask / n).
    """
    xp = get_array_module(logits, labels, loss_mask)
    B, T, V = _check_logits_labels(logits, labels)
    dt = logits.dtype
    mask = _shifted_mask(loss_mask, B, T, xp)  # (B, T-1) bool
    counts = xp.sum(mask, axis=1, dtype=xp.int64)  # (B,) n[b]
    if validate:
        _check_counted_labels(labels[:, 1:], mask, V, xp)
        if not allow_empty and bool(xp.any(counts == 0)):
            raise ValueError(
                f"sequence_logps: rows {_first_bad_rows(counts == 0)} have no counted response token "
                f"(loss_mask[:, 1:] is all zero); their log pi(y|x) would be 0 for any policy and their "
                f"DPO loss stuck at ln 2. Fix the data (truncation? empty response?) or pass allow_empty=True "
                f"and check cache['token_counts']"
            )
    safe = xp.where(mask, labels[:, 1:], 0)  # (B, T-1) ignored labels -> 0 before gathering
    if not validate:
        safe = xp.clip(safe, 0, V - 1)  # never read outside the vocabulary, even unchecked
    lp, lse = _token_logps(logits, safe)  # (B, T-1), (B, T-1)
    weights = mask.astype(dt)  # (B, T-1) 1 where the label counts
    if average:
        weights /= xp.maximum(counts, 1).astype(dt)[:, None]  # (B, T-1) 1/n where it counts
    # where(), not a product: a masked position's lp may be anything (even inf), it must not leak.
    logps = xp.sum(xp.where(mask, lp, dt.type(0)) * weights, axis=1)  # (B,)
    cache = {"logits": logits, "labels": safe, "lse": lse, "weights": weights, "token_counts": counts}
    return logps, cache


def sequence_logps_backward(dlogps, cache, *, overwrite_logits: bool = False):
    """dlogits from dlogps: the gradient of sum_b dlogps[b] * logps[b] with respect to the logits.

    Forward, for t = 0 .. T-2:   logps[b] = sum_t w[b, t] * (logits[b, t, y] - lse[b, t]),
                                 y = labels[b, t+1],  w = mask (or mask / n when averaged)
    Backward, since d lse[b, t] / d logits[b, t, v] = softmax(logits[b, t])[v] = p[b, t, v]:

        dlogits[b, t, v] = dlogps[b] * w[b, t] * (1[v == y] - p[b, t, v])      t = 0 .. T-2
        dlogits[b, T-1, :] = 0                          (the last position scores nothing)

    Memory: exactly one (B, T, V) array is written. The softmax is computed into it
    (p = exp(logits - lse) with the forward's lse, no second max/sum pass), the one-hot is
    subtracted in place at the B*(T-1) gathered indices, and the row scale is applied in place.
    Masked positions come out as exact zeros provided their logits are finite (model logits are).

    Args:
        dlogps: (B,) upstream gradient d loss / d logps (cast to the logits' dtype).
        cache: from sequence_logps.
        overwrite_logits: reuse the forward's logits array as the output buffer, saving one
            (B, T, V) allocation. The logits are destroyed: use only when nothing else reads them
            afterwards (e.g. the model keeps no reference to them) and call at most once per
            cache; the logits must be a writable array the caller owns.
    Returns:
        dlogits: (B, T, V), the logits' dtype.
    """
    logits = cache["logits"]
    xp = get_array_module(logits)
    B, T, V = logits.shape
    dt = logits.dtype
    if dlogps.shape != (B,):
        raise ValueError(f"dlogps must be (B,) = ({B},), got {tuple(dlogps.shape)}")
    g = xp.asarray(dlogps).astype(dt, copy=False)[:, None] * cache["weights"]  # (B, T-1) dlogps * w
    if kernels.use(logits) and logits.flags.c_contiguous:  # CuPy: (B, T, V) written in one pass
        return kernels.logsoftmax_gather_backward(logits, cache["lse"], cache["labels"], g,
                                                  out=logits if overwrite_logits else None)

    if overwrite_logits:
        if xp is np and not logits.flags.writeable:
            raise ValueError("overwrite_logits=True needs writable logits, got a read-only array")
        dlogits = logits  # (B, T, V) the forward's buffer, reused
    else:
        dlogits = xp.empty_like(logits)  # (B, T, V) the one buffer

    lse, labels = cache["lse"], cache["labels"]
    for bs, ts in _row_pieces(B, T - 1, V, xp):  # ~1 MiB pieces: each is written once, then cached
        body = dlogits[:, :-1][bs, ts]  # (b, t, V) view of some scoring rows
        # p = softmax(logits) = exp(logits - lse), written into the buffer (in place when reused)
        xp.subtract(logits[:, :-1][bs, ts], lse[bs, ts][:, :, None], out=body)  # log p
        xp.exp(body, out=body)  # p
        # p - onehot(y): subtract 1 at the label of every scoring row (each (b, t) appears once)
        nb, nt = body.shape[:2]
        body[xp.arange(nb)[:, None], xp.arange(nt)[None, :], labels[bs, ts]] -= dt.type(1)
        # times -g:  g * (onehot - p)
        body *= (-g[bs, ts])[:, :, None]
    dlogits[:, -1] = 0  # (B, V) the last position's logits score no token
    return dlogits
