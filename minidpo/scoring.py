"""log pi(y|x) of many sequences without gradients: lay out, forward, log-probs, to the host.

The one loop behind the reference log-probs (cached before DPO, or recomputed per batch), the
held-out evaluation of both stages and the KL estimate of evaluate.py. Each chunk is laid out by
the caller's packing.Batcher (the layout the stage trains with: the same numbers the training
forward gives on the same batch), run through model.gpt_forward without a backward cache, and
its (M, V) logits are freed before the next chunk's forward.

Shapes: E examples of a batch, M scored tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from .backend import get_array_module, to_numpy
from .data import check_token_ids
from .distributed import gather_concat, shard_range
from .fast import ops
from .logprobs import token_log_sum_sq
from .losses import wpo_pair_weights
from .model import GPTConfig, gpt_forward
from .packing import Batch, Batcher


def batch_logps(params: dict, config: GPTConfig, batch: Batch):
    """log pi(y|x) of every example of ``batch`` (eq. 7's sum, or the per-token mean the batch was
    built with), no gradient: the training step's forward and log-probs, without the backward's
    cache. Returns (logps (E,), token_counts (E,) int64), device arrays."""
    logits, _ = gpt_forward(params, batch.input_ids, config, batch.layout, logits_at=batch.logits_at,
                            keep_cache=False, validate=False)  # (M, V)
    logps, _ = ops().sequence_logps(logits, batch.labels, batch.weights(logits.dtype))  # (E,)
    return logps, batch.token_counts


def chunked_logps(params: dict, config: GPTConfig, items: Sequence, make_batch: Callable[[list], Batch],
                  batch_size: int, progress=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, chunk by chunk of ``batch_size`` items, the host arrays (logps (E,), token_counts (E,))
    of ``make_batch(chunk)``'s examples (a packing.Batcher's ``pairs`` or ``sft``: [chosen;
    rejected] of the chunk's pairs, or one per SFT item; logps in the model's dtype).

    The token ids are checked once, on the host, before the first chunk; each chunk then costs
    one device read-back (its log-probs), the token counts coming from the host.
    ``progress``: an object with ``update(n)``, told the items of each chunk."""
    check_token_ids(items, config.vocab_size, "scored item")
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        batch = make_batch(chunk)
        logps, _ = batch_logps(params, config, batch)
        yield to_numpy(logps), batch.host_token_counts
        if progress is not None:
            progress.update(len(chunk))


def batched_sequence_logps(
    params: dict, config: GPTConfig, pairs: Sequence, batcher: Batcher, batch_size: int,
    desc: str | None = None, comm=None,
) -> tuple[np.ndarray, np.ndarray]:
    """log pi(y_w|x) and log pi(y_l|x) (eq. 7's log-probs) of every preference pair, in chunks of
    ``batch_size`` pairs laid out by ``batcher``; with ``desc``, a progress bar of that name counts
    the pairs. With a ``comm`` of K ranks (minidpo.distributed) each rank scores its contiguous
    share of the pairs (rank 0 shows the bar of its share) and every rank gets all N.

    Returns (chosen_logps (N,), rejected_logps (N,)), NumPy arrays in the model's dtype."""
    from tqdm.auto import tqdm

    lo, hi = (0, len(pairs)) if comm is None else shard_range(len(pairs), comm.rank, comm.size)
    show = desc is not None and (comm is None or comm.rank == 0)
    chosen, rejected = [], []
    with tqdm(total=hi - lo, desc=desc, disable=not show, dynamic_ncols=True) as bar:
        for logps, _ in chunked_logps(params, config, pairs[lo:hi], batcher.pairs, batch_size, progress=bar):
            n = len(logps) // 2  # a chunk's examples are [chosen; rejected]
            chosen.append(logps[:n])
            rejected.append(logps[n:])
    dt = np.result_type(*chosen) if chosen else np.float64
    c = np.concatenate(chosen) if chosen else np.zeros(0, dtype=dt)
    r = np.concatenate(rejected) if rejected else np.zeros(0, dtype=dt)
    if comm is None or comm.size == 1:
        return c, r
    return gather_concat(comm, c), gather_concat(comm, r)


def item_logps(params: dict, config: GPTConfig, items: Sequence, batcher: Batcher, batch_size: int,
               desc: str | None = None, comm=None) -> np.ndarray:
    """log pi(y|x) (summed) of every SFT-like item (prompt_ids, response_ids: data.TokenizedSFT,
    TokenizedKTO), in chunks of ``batch_size`` laid out by ``batcher.sft``; with a ``comm`` of K
    ranks each scores its contiguous share and every rank gets all. (E,) NumPy, the model's dtype."""
    from tqdm.auto import tqdm

    lo, hi = (0, len(items)) if comm is None else shard_range(len(items), comm.rank, comm.size)
    show = desc is not None and (comm is None or comm.rank == 0)
    parts = []
    with tqdm(total=hi - lo, desc=desc, disable=not show, dynamic_ncols=True) as bar:
        for logps, _ in chunked_logps(params, config, items[lo:hi], batcher.sft, batch_size, progress=bar):
            parts.append(logps)
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=next(iter(params.values())).dtype)
    if comm is None or comm.size == 1:
        return out
    return gather_concat(comm, out)



def wpo_step_weights(lp_cache: dict, batch: Batch):
    """WPO's (N,) pair weights (losses.wpo_pair_weights, Zhou et al. 2024 eq. 2) from a forward's
    log-prob cache (token_logps': logits (M, V), labels, lse): each token's log pi(y_t|.) and
    log sum_v pi(v|.)^2 (logprobs.token_log_sum_sq), averaged per response. Constants: nothing
    flows back through them. Device arrays."""
    logits, labels, lse = lp_cache["logits"], lp_cache["labels"], lp_cache["lse"]
    xp = get_array_module(logits)
    lp = logits[xp.arange(logits.shape[0]), labels] - lse  # (M,) log pi(y_t|.)
    lss = token_log_sum_sq(logits, lse)  # (M,)
    return wpo_pair_weights(lp, lss, batch.mean_weights(logits.dtype), batch.n_examples // 2)


def batched_wpo_weights(params: dict, config: GPTConfig, pairs: Sequence, batcher: Batcher, batch_size: int,
                        comm=None) -> np.ndarray:
    """WPO's weight of every preference pair under the policy ``params`` (:func:`wpo_step_weights`),
    in chunks of ``batch_size`` pairs, no gradient; with a ``comm`` of K ranks each scores its
    share and every rank gets all. (N,) NumPy."""
    lo, hi = (0, len(pairs)) if comm is None else shard_range(len(pairs), comm.rank, comm.size)
    out = []
    for start in range(lo, hi, batch_size):
        batch = batcher.pairs(list(pairs[start:min(start + batch_size, hi)]))
        logits, _ = gpt_forward(params, batch.input_ids, config, batch.layout, logits_at=batch.logits_at,
                                keep_cache=False, validate=False)  # (M, V)
        _, cache = ops().sequence_logps(logits, batch.labels, batch.weights(logits.dtype))
        out.append(to_numpy(wpo_step_weights(cache, batch)))
    w = np.concatenate(out) if out else np.zeros(0, dtype=next(iter(params.values())).dtype)
    return w if comm is None or comm.size == 1 else gather_concat(comm, w)
