"""log pi(y|x) of many sequences without gradients: collate, forward, log-probs, to the host.

The one loop behind the reference log-probs (cached before DPO, or recomputed per batch), the
held-out evaluation of both stages and the KL estimate of evaluate.py. The forward is
model.inference_logits (keys and values only, no backward cache); each chunk's (b, T, V)
logits are freed before the next chunk's forward.

Shapes: B rows of a collated batch, T time, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from .backend import Backend, to_numpy
from .data import collate_preferences
from .fast import ops
from .model import GPTConfig, inference_logits


def batch_logps(params: dict, config: GPTConfig, batch: dict, average: bool = False, *, validate: bool = True):
    """log pi(y|x) of every row of a collated batch (``input_ids``, ``loss_mask`` (B, T)), no
    gradient. Returns (logps (B,), token_counts (B,) int64), device arrays."""
    logits = inference_logits(params, batch["input_ids"], config)  # (B, T, V)
    logps, cache = ops().sequence_logps(logits, batch["input_ids"], batch["loss_mask"], average=average,
                                        validate=validate)
    return logps, cache["token_counts"]  # the logits go with the cache here


def chunked_logps(params: dict, config: GPTConfig, items: Sequence, collate: Callable, pad_id: int,
                  batch_size: int, backend: Backend, average: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, chunk by chunk of ``batch_size`` items, the host arrays (logps (b,), token_counts (b,))
    of ``collate(chunk, pad_id, backend=backend)``'s rows (logps in the model's dtype)."""
    for start in range(0, len(items), batch_size):
        batch = collate(list(items[start : start + batch_size]), pad_id, backend=backend)
        logps, counts = batch_logps(params, config, batch, average)
        yield to_numpy(logps), to_numpy(counts)


def batched_sequence_logps(
    params: dict, config: GPTConfig, pairs: Sequence, pad_id: int, batch_size: int,
    backend: Backend, average: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """log pi(y_w|x) and log pi(y_l|x) for every preference pair, in chunks of ``batch_size`` pairs.

    Returns (chosen_logps (N,), rejected_logps (N,)) as float64 NumPy arrays."""
    chosen, rejected = [], []
    for logps, _ in chunked_logps(params, config, pairs, collate_preferences, pad_id, batch_size, backend, average):
        n = len(logps) // 2  # a chunk's rows are [chosen; rejected]
        chosen.append(logps[:n].astype(np.float64))
        rejected.append(logps[n:].astype(np.float64))
    return np.concatenate(chosen), np.concatenate(rejected)
