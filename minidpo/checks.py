"""Argument checks, kept out of the math: each public function calls one of these on its first line.

Shape and dtype checks are free. Value checks (a label out of range, an empty response) read one
value back from a GPU; the functions that make them say so and take ``validate=False``.

Shape letters: B batch, T time, V vocabulary, C channels, H heads, N preference pairs.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module


def first_bad_rows(bad_rows, limit: int = 8) -> str:
    """'0, 3, 7, ...': the indices where a (B,) bool array is true, for an error message."""
    rows = np.flatnonzero(np.asarray(bad_rows.get() if hasattr(bad_rows, "get") else bad_rows))
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (", ..." if rows.size > limit else "")


def positive_beta(beta) -> float:
    """beta as a Python float; TypeError/ValueError unless it is a finite number > 0."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise TypeError(f"beta must be a positive number, got {beta!r}") from None
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return b


def vector(x, name: str, n: int | None = None):
    """x as a 1-D floating array of N > 0 per-example values (N = n when given)."""
    xp = get_array_module(x)
    x = xp.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-example values (N,), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one example")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries but the chosen log-probs have {n}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    return x


def qkv(qkv_array, n_head: int) -> None:
    """qkv must be (B, T, 3C) with C divisible by n_head."""
    s = tuple(qkv_array.shape)
    if len(s) != 3 or s[-1] % 3 or (s[-1] // 3) % n_head:
        raise ValueError(f"qkv must have shape (B, T, 3C) with C divisible by n_head={n_head}, got {s}")


def token_logps_args(logits, labels) -> tuple[int, int]:
    """logits (M, V) floating, labels (M,) integer token ids; returns (M, V). Shapes and dtypes
    only (the ids' range is checked once per dataset on the host: data.check_token_ids)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (M, V), the logits that predict the M scored tokens, got shape "
                         f"{tuple(logits.shape)}")
    if logits.dtype.kind != "f":
        raise TypeError(f"logits must be a floating array, got dtype {logits.dtype}")
    M, V = logits.shape
    if tuple(labels.shape) != (M,):
        raise ValueError(f"labels must be (M,) = ({M},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    return M, V


def sequence_logps_args(logits, labels, weights) -> None:
    """All of sequence_logps' checks (plain and fast): logits (M, V), labels (M,), weights (E, M)
    of the logits' dtype."""
    M, _ = token_logps_args(logits, labels)
    if weights.ndim != 2 or weights.shape[1] != M:
        raise ValueError(f"weights must be (E, M) with M = {M} scored tokens, got shape {tuple(weights.shape)}")
    if weights.dtype != logits.dtype:
        raise TypeError(f"weights are {weights.dtype} but the logits {logits.dtype}: use batch.weights(logits.dtype)")


def dlogps(dlogps_array, E: int) -> None:
    """The upstream gradient of sequence_logps: (E,)."""
    if tuple(dlogps_array.shape) != (E,):
        raise ValueError(f"dlogps must be (E,) = ({E},), got {tuple(dlogps_array.shape)}")
