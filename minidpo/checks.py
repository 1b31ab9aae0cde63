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


def logits_labels(logits, labels) -> tuple[int, int, int]:
    """logits (B, T, V) floating, labels (B, T) integer, T >= 2; returns (B, T, V)."""
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


def loss_mask(mask, B: int, T: int) -> None:
    """mask (B, T) bool or 0/1 numbers."""
    if mask.shape != (B, T):
        raise ValueError(f"loss_mask must be (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    if mask.dtype.kind not in "biuf":
        raise TypeError(f"loss_mask must be bool or 0/1 numbers, got dtype {mask.dtype}")


def counted_labels(shifted, counted, V: int) -> None:
    """Every label that counts lies in [0, V). shifted, counted: (B, T-1). One host sync on a GPU."""
    xp = get_array_module(shifted, counted)
    out_of_range = counted & ((shifted < 0) | (shifted >= V))  # (B, T-1)
    if bool(xp.any(out_of_range)):
        raise ValueError(
            f"labels counted by loss_mask must be token ids in [0, V={V}); rows "
            f"{first_bad_rows(xp.any(out_of_range, axis=1))} have a counted label outside it "
            f"(-100 or padding inside the response?)"
        )


def sequence_logps_args(logits, labels, mask, *, validate: bool, allow_empty: bool) -> None:
    """All of sequence_logps' checks (plain and fast): shapes and dtypes always; with ``validate``
    also the counted labels' range and, unless ``allow_empty``, that every row counts a token."""
    B, T, V = logits_labels(logits, labels)
    loss_mask(mask, B, T)
    if not validate:
        return
    xp = get_array_module(logits, labels, mask)
    counted = mask[:, 1:] != 0  # (B, T-1)
    counted_labels(labels[:, 1:], counted, V)
    empty = ~xp.any(counted, axis=1)  # (B,)
    if not allow_empty and bool(xp.any(empty)):
        raise ValueError(
            f"sequence_logps: rows {first_bad_rows(empty)} have no counted response token "
            f"(loss_mask[:, 1:] is all zero); their log pi(y|x) would be 0 for any policy and their "
            f"DPO loss stuck at ln 2. Fix the data (truncation? empty response?) or pass allow_empty=True "
            f"and check cache['token_counts']"
        )


def dlogps(dlogps_array, B: int) -> None:
    """The upstream gradient of sequence_logps: (B,)."""
    if tuple(dlogps_array.shape) != (B,):
        raise ValueError(f"dlogps must be (B,) = ({B},), got {tuple(dlogps_array.shape)}")
