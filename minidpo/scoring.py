"""log pi(y|x) of many sequences without gradients: collate, forward, log-probs, to the host.

The one loop behind the reference log-probs (cached before DPO, or recomputed per batch), the
held-out evaluation of both stages and the KL estimate of evaluate.py. The forward is
model.inference_logits (keys and values only, no backward cache); each chunk's (b, T, V)
logits are freed before the next chunk's forward. A chunk laid out by minidpo.packing (shared
prompts, packed rows) runs packed_model.packed_logps instead: the same numbers, and the same
discipline (ids checked once on the host, one read-back a chunk, token counts from the host).

Shapes: B rows of a collated batch, T time, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import numpy as np

from .backend import Backend, to_numpy
from .data import check_token_ids, collate_preferences
from .fast import ops
from .model import GPTConfig, inference_logits
from .packed_model import packed_logps
from .packing import pack_preferences, packed_of


def batch_logps(params: dict, config: GPTConfig, batch: dict, average: bool = False, *, validate: bool = True):
    """log pi(y|x) of every row of a collated batch (``input_ids``, ``loss_mask`` (B, T)), no
    gradient. Returns (logps (B,), token_counts (B,) int64), device arrays. ``validate=False``
    skips the device-side checks of ids and masks (each a read-back on a GPU) for rows already
    checked on the host.

    A packed batch (a packing.PackedBatch, or a dict holding one as ``"packed"``) gives the same
    for each of its E examples (DPO: [chosen; rejected], as the collated rows); it was built with
    its ``average``, which must be this one. Its ids are not checked here (packing's host arrays
    come from items the caller checked)."""
    packed = packed_of(batch)
    if packed is not None:
        if packed.average != bool(average):
            raise ValueError(f"the packed batch was built with average={packed.average}, asked for average={average}")
        return packed_logps(params, config, packed), packed.token_counts
    logits = inference_logits(params, batch["input_ids"], config, validate=validate)  # (B, T, V)
    logps, cache = ops().sequence_logps(logits, batch["input_ids"], batch["loss_mask"], average=average,
                                        validate=validate)
    return logps, cache["token_counts"]  # the logits go with the cache here


def _response_lengths(items: Sequence) -> np.ndarray:
    """Tokens each collated row scores (its loss mask's count), from the host items: SFT items
    give one row each, preference pairs two ([chosen; rejected] over the chunk)."""
    if items and hasattr(items[0], "response_ids"):
        return np.array([len(t.response_ids) for t in items], dtype=np.int64)
    return np.array([len(t.chosen_ids) for t in items] + [len(t.rejected_ids) for t in items], dtype=np.int64)


def chunked_logps(params: dict, config: GPTConfig, items: Sequence, collate: Callable, pad_id: int,
                  batch_size: int, backend: Backend, average: bool = False,
                  progress=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, chunk by chunk of ``batch_size`` items, the host arrays (logps (b,), token_counts (b,))
    of ``collate(chunk, pad_id, backend=backend)``'s rows (logps in the model's dtype). ``collate``
    may also lay the chunk out by minidpo.packing (packing.pack_sft, or pack_preferences with the
    same ``average``): its examples come in the collated rows' order.

    The token ids are checked once, on the host, before the first chunk; each chunk then costs
    one device read-back (its log-probs), the token counts being counted on the host.
    ``progress``: an object with ``update(n)``, told the items of each chunk."""
    check_token_ids(items, config.vocab_size, "scored item")
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        batch = collate(chunk, pad_id, backend=backend)
        logps, _ = batch_logps(params, config, batch, average, validate=False)
        yield to_numpy(logps), _response_lengths(chunk)
        if progress is not None:
            progress.update(len(chunk))


def batched_sequence_logps(
    params: dict, config: GPTConfig, pairs: Sequence, pad_id: int, batch_size: int,
    backend: Backend, average: bool = False, desc: str | None = None, comm=None, *,
    share_prompt: bool = False, pack: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """log pi(y_w|x) and log pi(y_l|x) (eq. 7's log-probs) for every preference pair, in chunks of
    ``batch_size`` pairs; with ``desc``, a progress bar of that name counts the pairs. With a
    ``comm`` of K ranks (minidpo.distributed) each rank scores its share of the pairs (rank 0
    shows the bar of its share; each rank lays out its own share) and every rank gets all N.
    ``share_prompt`` / ``pack``: each chunk in minidpo.packing's layout (prompt once per pair,
    sequences packed into rows) instead of collated and padded; the same numbers to round-off.

    Returns (chosen_logps (N,), rejected_logps (N,)) as float64 NumPy arrays."""
    from tqdm.auto import tqdm

    if comm is not None and comm.size > 1:
        from .distributed import gather_rows

        return gather_rows(comm, lambda lo, hi: batched_sequence_logps(
            params, config, pairs[lo:hi], pad_id, batch_size, backend, average,
            desc if comm.rank == 0 else None, share_prompt=share_prompt, pack=pack), len(pairs))

    collate = collate_preferences
    if share_prompt or pack:
        collate = functools.partial(pack_preferences, share_prompt=share_prompt, pack=pack, average=average)
    chosen, rejected = [], []
    with tqdm(total=len(pairs), desc=desc, disable=desc is None, dynamic_ncols=True) as bar:
        for logps, _ in chunked_logps(params, config, pairs, collate, pad_id, batch_size, backend,
                                      average, progress=bar):
            n = len(logps) // 2  # a chunk's rows are [chosen; rejected]
            chosen.append(logps[:n].astype(np.float64))
            rejected.append(logps[n:].astype(np.float64))
    return np.concatenate(chosen), np.concatenate(rejected)
