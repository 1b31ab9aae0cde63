"""Peak memory of one DPO training step, measured and predicted from shapes.

The step is minidpo's own (the calls of minidpo.train's training loop, in its order):

    [recompute]  log pi_ref(y|x) of the 2N rows by the frozen reference     inference_logits +
                 (the KV-cache forward: keys and values only, no backward cache)  sequence_logps
    dpo_step     policy logits (2N, T, V) -> log-probs (2N,) -> DPO loss, eq. (7) ->
                 dlogits, eq. (9), written into the logits' own buffer -> gpt_backward -> grads
    clip_grad_norm, AdamW.step, then ``del grads, batch`` (as _run_loop does)

in two modes:

    cached     reference log-probs computed once before training by
               minidpo.scoring.batched_sequence_logps (train_dpo's default, cache_reference=True);
               the step sees them as constants. The reference parameters are freed once the caches
               are built, which is what caching allows (train_dpo itself keeps them: see MEMORY.md).
    recompute  the reference parameters stay in memory and every step runs the reference forward
               on its batch first, as train_dpo does with cache_reference=False.

Around the steps, as train_dpo does with held-out pairs: the held-out pairs' reference log-probs
(batched_sequence_logps in chunks of eval_batch_size) before training, and after the last step
one held-out evaluation of the policy (evaluate_preferences, the same chunks).

What is measured: on the CPU, tracemalloc (NumPy reports every array buffer to it), so "bytes" are
the bytes of live arrays plus a few Python objects; the process's peak resident set (Linux VmHWM,
reset before each mode; ru_maxrss otherwise) is reported beside it. On CUDA, a CuPy memory hook
adds up the (512-byte rounded) blocks handed out by the memory pool, the exact analogue; the
pool's reserved size and the device's used memory (cudaMemGetInfo) are reported beside it.
Phase boundaries come from a profile hook on the return of minidpo's functions (gpt_forward,
sequence_logps, dpo_loss, ...), so the step measured is the library's code, not a copy of it.

The analytic breakdown (:func:`analytic_breakdown`) counts every array minidpo keeps, from the
shapes alone, and predicts each peak; the report compares the two.

    python bench/memory_dpo.py                                # GPT-2 small, 8 pairs x 512 tokens, CPU
    python bench/memory_dpo.py --device cuda --json $OUT/memory_cuda.json
    python bench/memory_dpo.py --n-layer 2 --n-embd 64 --n-head 2 --vocab 512 --pairs 2 --seq 32

Shape letters: N preference pairs, B = 2N rows, T time, C channels, V vocabulary, H heads,
D = C / H head size, L layers, P parameters. Sizes are printed in GB = 10^9 bytes (MB or kB for
small models); the JSON has bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import dataclasses
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.bench_step import cpu_model  # noqa: E402
from minidpo.backend import Backend, to_numpy  # noqa: E402
from minidpo.data import TokenizedPair, collate_preferences  # noqa: E402
# the analytic model follows two blockings of the array code: attention's query blocks (the causal
# skip) and the size of the NumPy log-softmax pieces and GELU blocks (a rename fails loudly here)
from minidpo.fast import _BLOCK as GELU_BLOCK  # noqa: E402
from minidpo.fast import _PIECE as LOGSOFTMAX_PIECE  # noqa: E402
from minidpo.fast import _query_blocks  # noqa: E402
from minidpo.fast import sequence_logps, sequence_logps_backward  # noqa: E402  (the default path's)
from minidpo.losses import dpo_loss, preference_metrics  # noqa: E402
from minidpo.model import GPTConfig, gpt_backward, gpt_forward, inference_logits, init_params, param_shapes  # noqa: E402
from minidpo.optim import AdamW, clip_grad_norm, lr_at  # noqa: E402
from minidpo.scoring import batched_sequence_logps  # noqa: E402
from minidpo.train import TrainConfig, batch_for_step, dpo_step, evaluate_preferences  # noqa: E402

MODES = ("cached", "recompute")
PAD_ID = 0


# ---------------------------------------------------------------------------------------------
# the synthetic preference batch
# ---------------------------------------------------------------------------------------------


def synthetic_pairs(pairs: int, seq: int, prompt: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    """N preference pairs of random token ids in [1, V) (0 is the pad id).

    Every prompt has ``prompt`` tokens; every chosen response fills the row to exactly ``seq``
    tokens and every rejected one is shorter (between half and all of seq - prompt tokens), so
    collate_preferences gives T = seq with right-padded rejected rows, the padding convention of
    real batches. Any chunk of these pairs collates to T = seq as well.
    """
    rng = np.random.default_rng(seed)
    resp = seq - prompt
    out = []
    for i in range(pairs):
        rejected_len = int(rng.integers(max(1, resp // 2), resp + 1))
        out.append(TokenizedPair(
            prompt_ids=rng.integers(1, vocab, prompt).tolist(),
            chosen_ids=rng.integers(1, vocab, resp).tolist(),
            rejected_ids=rng.integers(1, vocab, rejected_len).tolist(),
            source=f"synthetic:{i}",
        ))
    return out


# ---------------------------------------------------------------------------------------------
# the analytic model: every array minidpo keeps, from the shapes
# ---------------------------------------------------------------------------------------------


def attention_prob_elems(rows: int, n_head: int, T: int) -> int:
    """Elements of the softmax probabilities one attention_forward keeps for its backward: one
    (B, H, i1 - i0, i1) array per query block (the causal skip scores queries i0..i1-1 against
    keys 0..i1-1 only). B H T^2 below T = 128 (one block); 5/8 of it from T = 256 on (four blocks)."""
    return sum(rows * n_head * (i1 - i0) * i1 for i0, i1 in _query_blocks(T))


def layer_cache_elems(config: GPTConfig, rows: int, T: int) -> dict[str, int]:
    """Elements one transformer block leaves in gpt_forward's cache for ``rows`` x ``T`` tokens
    (what minidpo.model.gpt_forward keeps alive for the backward):

        ln_1 out (B, T, C); qkv (B, T, 3C), kept whole by the k, v views; q / sqrt(D) (B, H, T, D);
        softmax probabilities, one (B, H, i1 - i0, i1) per query block; attention output (B, T, C);
        residual after attention (B, T, C); ln_2 out (B, T, C); c_fc out (B, T, 4C); gelu out
        (B, T, 4C); residual after the MLP (B, T, C); two layernorms' mean and rstd, 4 x (B, T).
    """
    B, C, H = rows, config.n_embd, config.n_head
    BTC = B * T * C
    return {
        "ln_1 output (B,T,C)": BTC,
        "qkv (B,T,3C), kept by the k, v views": 3 * BTC,
        "q / sqrt(D) (B,H,T,D)": BTC,
        "attention probabilities, per query block (B,H,nq,i1)": attention_prob_elems(B, H, T),
        "attention output (B,T,C)": BTC,
        "residual after attention (B,T,C)": BTC,
        "ln_2 output (B,T,C)": BTC,
        "mlp.c_fc output (B,T,4C)": 4 * BTC,
        "gelu output (B,T,4C)": 4 * BTC,
        "residual after the MLP (B,T,C)": BTC,
        "layernorm mean, rstd (4 x (B,T))": 4 * B * T,
    }


def forward_cache_bytes(config: GPTConfig, rows: int, T: int, itemsize: int = 4) -> int:
    """Bytes of gpt_forward's whole cache: the embedding output (B, T, C), L blocks, and ln_f's
    output plus its mean and rstd. The logits are not included."""
    BT, C = rows * T, config.n_embd
    per_layer = sum(layer_cache_elems(config, rows, T).values())
    return itemsize * (BT * C + config.n_layer * per_layer + BT * C + 2 * BT)


def logits_bytes(config: GPTConfig, rows: int, T: int, itemsize: int = 4) -> int:
    """(B, T, V) x itemsize: the logits; in a training step the same buffer becomes dlogits."""
    return rows * T * config.vocab_size * itemsize


def logps_cache_bytes(rows: int, T: int, itemsize: int = 4) -> int:
    """sequence_logps' cache besides the logits: int64 labels, lse and weights (B, T-1) each."""
    return rows * (T - 1) * (8 + 2 * itemsize)


def logsoftmax_piece_bytes(config: GPTConfig, rows: int, T: int, itemsize: int = 4, gpu: bool = False) -> int:
    """The temporary of sequence_logps' log-sum-exp: on NumPy one piece of at most
    LOGSOFTMAX_PIECE elements of the (B, T-1, V) scoring rows (1 MiB of float32); on CuPy the
    fused kernel keeps none."""
    return 0 if gpu else itemsize * min(rows * (T - 1) * config.vocab_size, LOGSOFTMAX_PIECE)


def batch_bytes(rows: int, T: int) -> int:
    """collate_preferences' batch: input_ids (B, T) int64 and loss_mask (B, T) bool."""
    return rows * T * 9


def kv_cache_bytes(config: GPTConfig, rows: int, T: int, itemsize: int = 4) -> int:
    """init_kv_cache(capacity=T) of inference_logits: every layer's keys and values,
    2 L x (B, H, T, D), and the (B, T) bool key mask."""
    return 2 * config.n_layer * rows * T * config.n_embd * itemsize + rows * T


def attention_backward_workspace_elems(rows: int, T: int, n_head: int, head_size: int) -> int:
    """The most elements live at once in attention_backward, with the model's residual gradient
    around it (the caches excluded):

        residual dx (B,T,C), its input dy (B,T,C), dqkv (B,T,3C), delta (B,H,T), and per query
        block, last block first: dv (B,H,i1,D), ds (B,H,nq,i1), dk (B,H,i1,D), dq (B,H,nq,D),
        nq = i1 - i0, each made while the previous block's array of that name is still bound.
    """
    H, D = n_head, head_size
    base = 5 * rows * T * H * D + rows * T * H
    live = {"dv": 0, "ds": 0, "dk": 0, "dq": 0}
    peak = base
    for i0, i1 in reversed(_query_blocks(T)):
        nq = i1 - i0
        for name, size in (("dv", rows * H * i1 * D), ("ds", rows * H * nq * i1), ("dk", rows * H * i1 * D),
                           ("dq", rows * H * nq * D)):
            peak = max(peak, base + sum(live.values()) + size)  # the new array beside the old one
            live[name] = size
    return peak


def gelu_backward_workspace_elems(rows: int, T: int, C: int, gpu: bool = False) -> int:
    """gelu_backward with the model's residual gradient around it: residual dx (B,T,C), its input
    dh (B,T,4C), its output (B,T,4C), and on NumPy two blocks of the elementwise chain (tanh z and
    a product), GELU_BLOCK elements each; the CuPy kernel writes its output only."""
    n = rows * T * C
    return 9 * n + (0 if gpu else 2 * min(GELU_BLOCK, 4 * n))


def backward_peak_bytes(config: GPTConfig, rows: int, T: int, itemsize: int = 4, gpu: bool = False) -> dict:
    """Where gpt_backward peaks, above the caches, dlogits and the state: the largest of

        block 0's GELU backward       its workspace + every gradient but block 0's c_fc, ln_2,
                                      attention and ln_1 ones and wpe's
        block 0's attention backward  its workspace + every gradient but block 0's c_attn and
                                      ln_1 ones and wpe's
        the embedding's backward      dx (B,T,C), dwpe (n_ctx, C), dx summed over B (T, C) +
                                      every gradient

    Block 0 is the last one done; every block's cache, and dlogits, stay alive until
    gpt_backward returns, so the peak is there and not at block L-1.

    Returns:
        {"where": the winning candidate, "workspace": its bytes, "gradients": the gradient bytes
         alive then, "total": their sum}.
    """
    sizes = {k: math.prod(s) for k, s in param_shapes(config).items()}
    total = sum(sizes.values())
    b0 = "transformer.h.0."
    att_pending = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias")
    gelu_pending = att_pending + ("attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                  "mlp.c_fc.weight", "mlp.c_fc.bias")
    wpe = sizes["transformer.wpe.weight"]
    C = config.n_embd
    cands = [
        ("block 0 GELU backward", gelu_backward_workspace_elems(rows, T, C, gpu),
         total - wpe - sum(sizes[b0 + n] for n in gelu_pending)),
        ("block 0 attention backward", attention_backward_workspace_elems(rows, T, config.n_head, config.head_size),
         total - wpe - sum(sizes[b0 + n] for n in att_pending)),
        ("embedding backward", rows * T * C + config.n_ctx * C + T * C, total),
    ]
    where, ws, grads = max(cands, key=lambda c: c[1] + c[2])
    return {"where": where, "workspace": ws * itemsize, "gradients": grads * itemsize,
            "total": (ws + grads) * itemsize}


def inference_pass_bytes(config: GPTConfig, rows: int, T: int, itemsize: int = 4, gpu: bool = False) -> int:
    """Peak of one no-gradient chunk (inference_logits + sequence_logps, as batched_sequence_logps
    runs it), above whatever else is alive, for ``rows`` rows of T tokens:

        in a block      KV cache + the block's working set: x, ln_1 out, qkv (3), q / sqrt(D),
                        attention output + the query blocks' scores (each made while the
                        previous is bound), or x, ln_2 out, c_fc out (4), gelu out (4): 10 (B,T,C)
        the logits      KV cache + ln_f's input and output (2 (B,T,C)) + logits (B,T,V)
        sequence_logps  logits + its cache + one log-sum-exp piece (the KV cache is gone)

    plus the chunk's batch. The previous chunk's logits are freed before the next forward
    (``del logits, _``), so a pass over many chunks peaks at its largest chunk.
    """
    C, H, D = config.n_embd, config.n_head, config.head_size
    n = rows * T * C
    att, prev = 7 * n, 0
    for i0, i1 in _query_blocks(T):
        scores = rows * H * (i1 - i0) * i1
        att = max(att, 7 * n + prev + scores, 7 * n + scores + rows * H * (i1 - i0) * D)
        prev = scores
    block = itemsize * max(att, 10 * n)
    kv, lg = kv_cache_bytes(config, rows, T, itemsize), logits_bytes(config, rows, T, itemsize)
    forward = kv + max(block, 2 * n * itemsize + lg)
    logps = lg + logps_cache_bytes(rows, T, itemsize) + logsoftmax_piece_bytes(config, rows, T, itemsize, gpu)
    return batch_bytes(rows, T) + max(forward, logps)


def nograd_pass_peak_bytes(config: GPTConfig, pairs: int, chunk_pairs: int, T: int, itemsize: int = 4,
                           gpu: bool = False) -> int:
    """Peak above the parameters of batched_sequence_logps over ``pairs`` pairs in chunks of
    ``chunk_pairs`` (2 chunk_pairs rows, every chunk padded to T): its largest, first chunk."""
    return inference_pass_bytes(config, 2 * min(chunk_pairs, pairs), T, itemsize, gpu)


def analytic_breakdown(config: GPTConfig, pairs: int, seq: int, *, ref_batch_pairs: int | None = None,
                       eval_batch_pairs: int | None = None, eval_pairs: int | None = None, itemsize: int = 4,
                       gpu: bool = False) -> dict:
    """Where the memory of one DPO step goes, from the shapes alone.

    Args:
        config: the model (P parameters, L layers, C, H, V).
        pairs: N; the step's batch has B = 2N rows of T = ``seq`` tokens.
        seq: T.
        ref_batch_pairs: chunk size of the measured reference cache pass (default N).
        eval_batch_pairs: chunk size of the held-out passes, train_dpo's eval_batch_size
            (default TrainConfig().eval_batch_size).
        eval_pairs: held-out pairs measured (default eval_batch_pairs; 0: none, and the
            "eval_reference_pass", "evaluation_cached" and "evaluation_recompute" peaks are absent).
        itemsize: bytes per float (4 for float32).
        gpu: count the fused kernels' temporaries (CuPy's kernels, or the compiled CPU kernels of
            cpu_kernels.py: the fused log-softmax and GELU keep fewer).

    Returns:
        dict with
          "bytes": {term: bytes} for parameters, grads, AdamW moments, the reference copy, the
              activation cache, the logits (whose buffer becomes dlogits), the log-softmax
              piece, the log-prob cache, the batch, the backward workspace and the gradients
              alive at the backward's peak, and a step-sized no-gradient pass's KV cache;
          "per_layer_bytes": {array: bytes} of one block's cache;
          "backward_peak": where gpt_backward peaks (see :func:`backward_peak_bytes`);
          "peaks": predicted peak bytes: "cached" and "recompute" for a step (the loop frees
              each step's grads before the next, so "cached_steady" and "recompute_steady", the
              later steps, are the same numbers), "cached_as_train_dpo" (train_dpo keeps the
              reference parameters), "forward_side" (the forward + log-softmax part of a cached
              step), "reference_pass" (the measured cache pass: chunks of ref_batch_pairs over
              N pairs, both parameter copies alive), "eval_reference_pass" (the held-out pairs'
              reference pass), "evaluation_cached" / "evaluation_recompute" (the held-out
              evaluation after the last step as measured: params + moments [+ reference]), and
              train_dpo's passes over a large dataset: "reference_pass_train_dpo" (chunks of
              eval_batch_pairs) and "evaluation_pass_train_dpo" (params, moments and the kept
              reference alive);
          "shapes": the letters' values.
    """
    if pairs < 1 or seq < 2:
        raise ValueError(f"need pairs >= 1 and seq >= 2, got pairs={pairs}, seq={seq}")
    ref_batch_pairs = pairs if ref_batch_pairs is None else ref_batch_pairs
    eval_batch_pairs = TrainConfig().eval_batch_size if eval_batch_pairs is None else eval_batch_pairs
    eval_pairs = eval_batch_pairs if eval_pairs is None else eval_pairs
    if ref_batch_pairs < 1 or eval_batch_pairs < 1 or eval_pairs < 0:
        raise ValueError(f"need ref_batch_pairs >= 1, eval_batch_pairs >= 1, eval_pairs >= 0, got "
                         f"{ref_batch_pairs}, {eval_batch_pairs}, {eval_pairs}")
    B, T = 2 * pairs, seq
    P = sum(math.prod(s) for s in param_shapes(config).values())
    p_bytes = P * itemsize
    per_layer = {k: v * itemsize for k, v in layer_cache_elems(config, B, T).items()}
    bw = backward_peak_bytes(config, B, T, itemsize, gpu)
    terms = {
        "parameters": p_bytes,
        "gradients": p_bytes,
        "AdamW moments m, v": 2 * p_bytes,
        "reference parameters": p_bytes,
        "activation cache (embedding, L blocks, ln_f)": forward_cache_bytes(config, B, T, itemsize),
        "logits (B,T,V)": logits_bytes(config, B, T, itemsize),
        "log-softmax piece": logsoftmax_piece_bytes(config, B, T, itemsize, gpu),
        "log-prob cache (labels, lse, weights)": logps_cache_bytes(B, T, itemsize),
        "batch (input_ids int64, loss_mask bool)": batch_bytes(B, T),
        "backward workspace": bw["workspace"],
        "gradients alive at the backward's peak": bw["gradients"],
        "KV cache of a no-gradient pass over the batch": kv_cache_bytes(config, B, T, itemsize),
    }
    t = terms
    resident = t["parameters"] + t["AdamW moments m, v"]
    held = (resident + t["activation cache (embedding, L blocks, ln_f)"] + t["logits (B,T,V)"]
            + t["log-prob cache (labels, lse, weights)"] + t["batch (input_ids int64, loss_mask bool)"])
    forward_side = held + t["log-softmax piece"]
    step = max(forward_side, held + bw["total"])  # dlogits is the logits' buffer: no second (B,T,V)
    ref = t["reference parameters"]
    # the reference forward (recompute mode) runs before the policy's, beside the whole state
    recompute = max(step + ref, resident + ref + inference_pass_bytes(config, B, T, itemsize, gpu))
    peaks = {
        "cached": step,
        "recompute": recompute,
        "cached_steady": step,
        "recompute_steady": recompute,
        "cached_as_train_dpo": step + ref,
        "forward_side": forward_side,
        "reference_pass": 2 * p_bytes + nograd_pass_peak_bytes(config, pairs, ref_batch_pairs, T, itemsize, gpu),
        "reference_pass_train_dpo": 2 * p_bytes + inference_pass_bytes(config, 2 * eval_batch_pairs, T, itemsize,
                                                                       gpu),
        "evaluation_pass_train_dpo": 4 * p_bytes + inference_pass_bytes(config, 2 * eval_batch_pairs, T, itemsize,
                                                                        gpu),
    }
    if eval_pairs:
        e_pass = nograd_pass_peak_bytes(config, eval_pairs, eval_batch_pairs, T, itemsize, gpu)
        peaks["eval_reference_pass"] = 2 * p_bytes + e_pass
        peaks["evaluation_cached"] = 3 * p_bytes + e_pass
        peaks["evaluation_recompute"] = 4 * p_bytes + e_pass
    return {
        "bytes": terms,
        "per_layer_bytes": per_layer,
        "backward_peak": bw,
        "peaks": peaks,
        "shapes": {"N": pairs, "B": B, "T": T, "C": config.n_embd, "V": config.vocab_size, "H": config.n_head,
                   "D": config.head_size, "L": config.n_layer, "P": P, "itemsize": itemsize,
                   "ref_batch_pairs": ref_batch_pairs, "eval_batch_pairs": eval_batch_pairs,
                   "eval_pairs": eval_pairs},
    }


def max_pairs_that_fit(config: GPTConfig, seq: int, capacity_bytes: float, key: str = "cached_steady",
                       limit: int = 4096, gpu: bool = True) -> int:
    """Largest N <= ``limit`` whose predicted peak ``key`` (see :func:`analytic_breakdown`) fits
    in ``capacity_bytes``; 0 if none. For the train_dpo passes ("reference_pass_train_dpo",
    "evaluation_pass_train_dpo") N is the chunk size, eval_batch_size."""
    def peak(n):
        if key in ("reference_pass_train_dpo", "evaluation_pass_train_dpo"):
            return analytic_breakdown(config, 1, seq, eval_batch_pairs=n, eval_pairs=0, gpu=gpu)["peaks"][key]
        return analytic_breakdown(config, n, seq, eval_pairs=0, gpu=gpu)["peaks"][key]

    lo, hi = 0, limit
    while lo < hi:  # the peaks grow with N: bisect
        mid = (lo + hi + 1) // 2
        if peak(mid) <= capacity_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------------------------
# meters: bytes of live arrays now and at their peak
# ---------------------------------------------------------------------------------------------


class TracemallocMeter:
    """NumPy's array buffers (and Python objects) allocated since :meth:`start`, via tracemalloc.

    NumPy reports every data buffer it allocates to tracemalloc, so ``current()`` is the bytes of
    live arrays created since the start, and ``read()`` gives it with its high-water mark since
    the last ``reset_peak()``."""

    name = "tracemalloc (NumPy array buffers + Python objects)"

    def start(self) -> None:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        tracemalloc.start()

    def stop(self) -> None:
        tracemalloc.stop()

    def current(self) -> int:
        return tracemalloc.get_traced_memory()[0]

    def read(self) -> tuple[int, int]:
        """(current, peak since the last reset), read together."""
        return tracemalloc.get_traced_memory()

    def reset_peak(self) -> None:
        tracemalloc.reset_peak()

    def extra(self) -> dict:
        return {}


class CupyPoolMeter:  # pragma: no cover - needs a GPU
    """Bytes handed out by CuPy's memory pool since :meth:`start` (512-byte rounded blocks), via a
    ``cupy.cuda.MemoryHook`` on every pool malloc and free. Frees of blocks handed out before the
    start are ignored. ``extra()`` adds the pool's reserved bytes and the device's used bytes."""

    name = "CuPy memory hook (pool blocks in use)"

    def __init__(self):
        import cupy

        self.cp = cupy
        meter = self

        class _Hook(cupy.cuda.MemoryHook):
            name = "minidpo_memory_meter"

            def malloc_postprocess(self, **kw):
                meter._sizes[kw["mem_ptr"]] = kw["mem_size"]
                meter._live += kw["mem_size"]
                if meter._live > meter._peak:
                    meter._peak = meter._live

            def free_postprocess(self, **kw):
                size = meter._sizes.pop(kw["mem_ptr"], None)
                if size is not None:
                    meter._live -= size

        self._hook = _Hook()
        self._sizes: dict[int, int] = {}
        self._live = self._peak = 0
        self._device_used_max = 0

    def start(self) -> None:
        self.cp.get_default_memory_pool().free_all_blocks()
        self._sizes.clear()
        self._live = self._peak = 0
        self._device_used_max = self._device_used()
        self._hook.__enter__()

    def stop(self) -> None:
        self._hook.__exit__(None, None, None)

    def _device_used(self) -> int:
        free, total = self.cp.cuda.runtime.memGetInfo()
        return int(total - free)

    def current(self) -> int:
        return self._live

    def read(self) -> tuple[int, int]:
        """(current, peak since the last reset); also samples the device's used memory."""
        self._device_used_max = max(self._device_used_max, self._device_used())
        return self._live, self._peak

    def reset_peak(self) -> None:
        self._peak = self._live

    def extra(self) -> dict:
        pool = self.cp.get_default_memory_pool()
        free, total = self.cp.cuda.runtime.memGetInfo()
        return {"pool_reserved_bytes": int(pool.total_bytes()), "device_used_max_bytes": self._device_used_max,
                "device_total_bytes": int(total)}


# ---------------------------------------------------------------------------------------------
# phases: boundaries at the return of minidpo's functions
# ---------------------------------------------------------------------------------------------

WATCHED = {
    collate_preferences: "collate_preferences",
    batched_sequence_logps: "batched_sequence_logps",
    inference_logits: "inference_logits",
    gpt_forward: "gpt_forward",
    sequence_logps: "sequence_logps",
    dpo_loss: "dpo_loss",
    sequence_logps_backward: "sequence_logps_backward",
    gpt_backward: "gpt_backward",
    preference_metrics: "preference_metrics",
    dpo_step: "dpo_step (return)",
    clip_grad_norm: "clip_grad_norm",
    AdamW.step: "AdamW.step",
    evaluate_preferences: "evaluate_preferences",
}


class PhaseRecorder:
    """Split a run into phases, each ending when one of :data:`WATCHED` returns (a profile hook,
    ``sys.setprofile``), or at :meth:`mark`. Each phase records the meter's peak during it and
    its value at the end; ``stage`` (set by the caller) tags the phases of one step.

    Use as a context manager around the code to measure."""

    def __init__(self, meter):
        self.meter = meter
        self.stage = ""
        self.phases: list[dict] = []
        self._labels = {f.__code__: name for f, name in WATCHED.items()}
        self._previous = None

    def __enter__(self):
        self._previous = sys.getprofile()
        self.meter.reset_peak()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        return False

    def _profile(self, frame, event, arg):
        if event == "return":
            label = self._labels.get(frame.f_code)
            if label is not None:
                self.mark(label)

    def mark(self, label: str) -> None:
        current, peak = self.meter.read()
        self.phases.append({"stage": self.stage, "phase": label, "peak_bytes": peak, "end_bytes": current})
        self.meter.reset_peak()

    def peak_of(self, *stages: str) -> int:
        """Highest peak over the phases tagged with one of ``stages``."""
        return max(p["peak_bytes"] for p in self.phases if p["stage"] in stages)


# ---------------------------------------------------------------------------------------------
# process memory
# ---------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset Linux's peak resident set (VmHWM) to the current RSS; False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def peak_rss_bytes(reset_ok: bool) -> tuple[int, str]:
    """(bytes, what): VmHWM since the last reset, else ru_maxrss over the process's life."""
    if reset_ok:
        kb = _status_kb("VmHWM")
        if kb is not None:
            return kb * 1024, "VmHWM since this mode began"
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r if sys.platform == "darwin" else r * 1024), "ru_maxrss over the whole process"


# ---------------------------------------------------------------------------------------------
# one mode: the training loop's lines, measured
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """What one measurement runs (see :func:`measure`)."""

    config: GPTConfig
    pairs: int
    seq: int
    prompt: int
    steps: int
    ref_batch_pairs: int
    eval_pairs: int
    eval_batch_pairs: int
    seed: int


def _nbytes(tree: dict) -> int:
    return int(sum(a.nbytes for a in tree.values()))


def run_mode(mode: str, spec: RunSpec, backend: Backend, meter) -> dict:
    """Measure ``spec.steps`` training steps in ``mode`` ('cached' or 'recompute').

    The lines follow minidpo.train (mirrored, not imported: _run_loop also writes checkpoints and
    logs, which are not part of a step):

        train_dpo   [cached] the training pairs' reference log-probs, batched_sequence_logps in
                    chunks of ref_batch_pairs; the held-out pairs' reference log-probs in chunks of
                    eval_batch_pairs (either mode)
        _run_loop   AdamW; each step batch_for_step, make_batch ([recompute] the reference forward
                    through inference_logits, as train_dpo's make_batch), dpo_step, clip_grad_norm,
                    lr_at, AdamW.step, then ``del grads, batch``; after the last step the held-out
                    evaluation (evaluate_preferences, eval_fn of train_dpo)

    In the cached mode the reference parameters are dropped once both caches are built (what
    caching allows; train_dpo keeps them).
    """
    cfg = spec.config
    # the padded (2N, T) layout this script's analytic model describes (share_prompt and pack
    # lay batches out otherwise; bench/bench_step.py --layouts measures them)
    tc = TrainConfig(steps=spec.steps, batch_size=spec.pairs, eval_batch_size=spec.eval_batch_pairs,
                     cache_reference=mode == "cached", share_prompt=False, pack=False)
    pairs = synthetic_pairs(spec.pairs, spec.seq, spec.prompt, cfg.vocab_size, seed=spec.seed)
    eval_pairs = synthetic_pairs(spec.eval_pairs, spec.seq, spec.prompt, cfg.vocab_size, seed=spec.seed + 1)
    gc.collect()
    rss_reset = reset_peak_rss()
    meter.start()
    try:
        rec = PhaseRecorder(meter)
        out: dict = {"mode": mode}
        xp = backend.xp
        with rec:
            rec.stage = "setup"
            policy = init_params(cfg, backend, seed=spec.seed)
            reference = {k: v.copy() for k, v in policy.items()}  # DPO starts at pi = pi_ref
            rec.mark("parameters")
            if tc.cache_reference:  # train_dpo: log pi_ref of every training pair, once
                rec.stage = "reference cache pass"
                ref_c, ref_r = batched_sequence_logps(reference, cfg, pairs, PAD_ID, spec.ref_batch_pairs, backend,
                                                      tc.logps_averaged)  # (N,), (N,) host float64
                ref_c = backend.asarray(ref_c.astype(np.float32))  # (N,) as train_dpo stores them
                ref_r = backend.asarray(ref_r.astype(np.float32))  # (N,)
                out["reference_pass_peak_bytes"] = rec.peak_of("reference cache pass")
            if eval_pairs:  # train_dpo: log pi_ref of every held-out pair, in either mode
                rec.stage = "held-out reference pass"
                e_ref_c, e_ref_r = batched_sequence_logps(reference, cfg, eval_pairs, PAD_ID, tc.eval_batch_size,
                                                          backend, tc.logps_averaged)  # (E,), (E,) host float64
                out["eval_reference_pass_peak_bytes"] = rec.peak_of("held-out reference pass")
            out["reference_params_bytes"] = _nbytes(reference) if mode == "recompute" else 0
            if tc.cache_reference:
                del reference  # what caching allows (train_dpo keeps it: see the report)

            def make_batch(idx):  # train_dpo's make_batch
                batch = collate_preferences([pairs[i] for i in idx], PAD_ID, backend=backend)  # (2N, T) ids, mask
                if tc.cache_reference:
                    didx = backend.asarray(idx)
                    batch["ref_chosen"], batch["ref_rejected"] = ref_c[didx], ref_r[didx]  # (N,), (N,)
                else:
                    logits = inference_logits(reference, batch["input_ids"], cfg)  # (2N, T, V)
                    logps, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"],
                                              average=tc.logps_averaged, validate=False)  # (2N,)
                    del logits
                    n = len(idx)
                    batch["ref_chosen"], batch["ref_rejected"] = logps[:n], logps[n:]  # (N,), (N,)
                return batch

            rec.stage = "setup"
            opt = AdamW(policy, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
            rec.mark("AdamW moments")
            out["resident_before_step_bytes"] = meter.current()
            steps = []
            for step in range(spec.steps):
                backend.synchronize()
                t0 = time.perf_counter()
                idx = batch_for_step(step, len(pairs), tc.batch_size, tc.seed)  # (N,) every pair, shuffled
                rec.stage = f"step {step + 1}" if tc.cache_reference else f"step {step + 1} reference"
                batch = make_batch(idx)
                rec.stage = f"step {step + 1}"
                loss, metrics, grads = dpo_step(policy, cfg, batch, batch["ref_chosen"], batch["ref_rejected"], tc)
                gnorm = clip_grad_norm(grads, tc.grad_clip)
                lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
                opt.step(policy, grads, lr=lr)
                out["grads_bytes"] = _nbytes(grads)
                del grads, batch  # as _run_loop: freed before the next step's forward
                finite = bool(xp.isfinite(loss)) and bool(xp.isfinite(gnorm))
                backend.synchronize()
                wall = time.perf_counter() - t0
                peak = rec.peak_of(f"step {step + 1}", f"step {step + 1} reference")
                steps.append({"peak_bytes": peak, "wall_s": wall, "loss": float(to_numpy(loss)), "finite": finite})
            if eval_pairs:  # _run_loop after the last step: eval_fn(params)
                rec.stage = "held-out evaluation"
                ev = evaluate_preferences(policy, cfg, eval_pairs, e_ref_c, e_ref_r, PAD_ID, tc, backend)
                out["evaluation_peak_bytes"] = rec.peak_of("held-out evaluation")
                out["eval_loss"] = ev["eval/loss"]
            out["params_bytes"] = _nbytes(policy)
            out["moments_bytes"] = _nbytes(opt.m) + _nbytes(opt.v)
            rec.stage = "end"
            rec.mark("after the last step")
        out["meter_extra"] = meter.extra()
    finally:
        meter.stop()
    rss, rss_what = peak_rss_bytes(rss_reset)
    out["steps"] = steps
    out["phases"] = rec.phases
    out["step1_peak_bytes"] = steps[0]["peak_bytes"]
    out["peak_bytes"] = max(s["peak_bytes"] for s in steps)
    # "state" = params + grads + AdamW moments (+ the reference copy when it is held)
    out["state_bytes"] = out["params_bytes"] + out["grads_bytes"] + out["moments_bytes"] + out["reference_params_bytes"]
    out["activation_peak_bytes"] = out["step1_peak_bytes"] - out["state_bytes"]
    out["process_peak_rss_bytes"] = rss
    out["process_peak_rss_what"] = rss_what
    return out


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def measure(config: GPTConfig, pairs: int = 8, seq: int = 512, *, prompt: int | None = None, device: str = "cpu",
            steps: int = 2, ref_batch_pairs: int | None = None, modes=MODES, seed: int = 0,
            eval_batch_pairs: int | None = None, eval_pairs: int | None = None) -> dict:
    """Measure the peak memory of DPO training steps in each mode, and the analytic breakdown.

    Args:
        config: the model (GPTConfig.gpt2_small() for GPT-2 small).
        pairs: N preference pairs per step (B = 2N rows).
        seq: T, tokens per row (every chunk of pairs pads to it).
        prompt: prompt tokens per pair (default min(128, T // 4), at least 1).
        device: 'cpu' (tracemalloc) or 'cuda[:N]' (CuPy memory hook).
        steps: training steps per mode; step 2 on shows whether anything of the step before lingers.
        ref_batch_pairs: chunk size of the cached mode's reference pass (default N // 2, so the
            pass runs two chunks and the hand-over between chunks is measured).
        modes: a subset of ('cached', 'recompute').
        seed: parameters and tokens.
        eval_batch_pairs: chunk size of the held-out passes, train_dpo's eval_batch_size (default
            TrainConfig().eval_batch_size); also the chunk of the predicted train_dpo passes.
        eval_pairs: held-out pairs (default eval_batch_pairs: one full chunk); 0 measures no
            held-out pass.

    Returns:
        {"config", "machine", "code", "meter", "analytic" (see :func:`analytic_breakdown`),
         "measured": {mode: {...}}} with byte counts; each mode has
         state_bytes (params + grads + moments [+ reference]), step1_peak_bytes, peak_bytes (over
         all steps), activation_peak_bytes (step 1 peak - state), resident_before_step_bytes,
         process_peak_rss_bytes, per-step peaks and wall times, and the phase table; the cached
         mode also reference_pass_peak_bytes; with held-out pairs, eval_reference_pass_peak_bytes
         and evaluation_peak_bytes.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    pairs, seq, steps = _positive_int("pairs", pairs), _positive_int("seq", seq), _positive_int("steps", steps)
    if seq < 2:
        raise ValueError(f"seq must be >= 2 (a prompt token and a response token), got {seq}")
    if seq > config.n_ctx:
        raise ValueError(f"seq={seq} exceeds the model's n_ctx={config.n_ctx}")
    prompt = max(1, min(128, seq // 4)) if prompt is None else prompt
    if isinstance(prompt, bool) or not isinstance(prompt, (int, np.integer)) or not 1 <= prompt < seq:
        raise ValueError(f"prompt must be an int in [1, seq) = [1, {seq}), got {prompt!r}")
    ref_batch_pairs = max(1, pairs // 2) if ref_batch_pairs is None else ref_batch_pairs
    if isinstance(ref_batch_pairs, bool) or not isinstance(ref_batch_pairs, (int, np.integer)) \
            or not 1 <= ref_batch_pairs <= pairs:
        raise ValueError(f"ref_batch_pairs must be an int in [1, pairs={pairs}], got {ref_batch_pairs!r}")
    eval_batch_pairs = _positive_int("eval_batch_pairs", TrainConfig().eval_batch_size
                                     if eval_batch_pairs is None else eval_batch_pairs)
    eval_pairs = _positive_int("eval_pairs", eval_batch_pairs if eval_pairs is None else eval_pairs, minimum=0)
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES} without repeats, got {modes}")

    code = code_info()  # before the run: the tree may change while it runs
    backend = Backend(device)
    meter = TracemallocMeter() if not backend.is_cuda else CupyPoolMeter()
    spec = RunSpec(config, pairs, seq, prompt, steps, int(ref_batch_pairs), eval_pairs, eval_batch_pairs, seed)
    # one unmeasured step first: the modules a step imports on first use (tqdm, threadpoolctl) and
    # the compiled CPU kernels' first load are then not counted in the first mode's figures
    run_mode(modes[0], dataclasses.replace(spec, steps=1), backend, meter)
    gc.collect()
    measured = {}
    for mode in modes:
        measured[mode] = run_mode(mode, spec, backend, meter)
        gc.collect()  # the mode's arrays are gone before the next one starts
    from minidpo import fast

    fused = backend.is_cuda or fast.cpu_kernels() is not None
    analytic = analytic_breakdown(config, pairs, seq, ref_batch_pairs=spec.ref_batch_pairs,
                                  eval_batch_pairs=eval_batch_pairs, eval_pairs=eval_pairs, gpu=fused)
    return {
        "config": {"model": config.to_dict(), "pairs": pairs, "rows": 2 * pairs, "seq": seq, "prompt": prompt,
                   "steps": steps, "ref_batch_pairs": spec.ref_batch_pairs, "eval_pairs": eval_pairs,
                   "eval_batch_pairs": eval_batch_pairs, "device": backend.device, "dtype": "float32",
                   "seed": seed, "num_params": analytic["shapes"]["P"]},
        "machine": machine_info(backend),
        "code": code,
        "meter": meter.name,
        "analytic": analytic,
        "measured": measured,
    }


def code_info() -> dict:
    """The commit measured, the last commit that changed minidpo/, and whether minidpo/ differs
    from it (None where git is unavailable)."""
    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    last = git("log", "-1", "--format=%H", "--", "minidpo")
    status = git("status", "--porcelain", "--", "minidpo")
    return {"commit": commit, "minidpo_last_commit": last, "minidpo_modified": None if status is None else bool(status)}


def machine_info(backend: Backend) -> dict:
    """CPU model (as lscpu prints it), cores, RAM, NumPy and Python versions; CuPy and the GPU."""
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "ram_bytes": _ram_bytes(),
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:  # BLAS library and its thread count (the meter does not see its per-thread buffers)
        from threadpoolctl import threadpool_info

        info["blas"] = [f"{d.get('internal_api')} {d.get('version')}, {d.get('num_threads')} threads"
                        for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        pass
    if backend.is_cuda:  # pragma: no cover - needs a GPU
        cp = backend.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        info.update(cupy=cp.__version__, gpu=name.decode() if isinstance(name, bytes) else str(name),
                    gpu_memory_bytes=int(props["totalGlobalMem"]))
    return info


def _ram_bytes() -> int | None:
    kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kb = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None if kb is None else kb * 1024


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _unit(nbytes: float) -> tuple[float, str]:
    """GB for GPT-2-sized runs, MB or kB for small ones: (divisor, name)."""
    for div, name in ((1e9, "GB"), (1e6, "MB")):
        if nbytes >= div:
            return div, name
    return 1e3, "kB"


STEP_PHASES_SHOWN = ("setup", "reference cache pass", "held-out reference pass", "step 1 reference", "step 1",
                     "held-out evaluation")


def format_report(res: dict, gpu_gb: float = 80.0) -> str:
    """The analytic breakdown, the measurements and their comparison, as text."""
    c, a, m = res["config"], res["analytic"], res["measured"]
    s, t, pk, bw = a["shapes"], a["bytes"], a["peaks"], a["backward_peak"]
    mc, mach, code = c["model"], res["machine"], res.get("code", {})
    div, unit = _unit(pk["recompute_steady"])

    def num(b, width=10):
        return f"{'-':>{width}}" if b is None else f"{b / div:{width}.3f}"

    lines = [
        f"DPO step memory: GPT-2 L={mc['n_layer']} C={mc['n_embd']} H={mc['n_head']} V={mc['vocab_size']} "
        f"(P = {s['P']:,} parameters), {c['pairs']} pairs = {c['rows']} rows x {c['seq']} tokens "
        f"(prompt {c['prompt']}), float32, {c['device']}",
        f"machine: {mach['cpu']} ({mach['cpu_count']} cores, {(mach['ram_bytes'] or 0) / 1e9:.1f} GB RAM), "
        f"numpy {mach['numpy']} ({'; '.join(mach.get('blas') or ['BLAS unknown'])}), python {mach['python']}"
        + (f"; {mach['gpu']}, cupy {mach['cupy']}" if "gpu" in mach else ""),
        f"code: commit {(code.get('commit') or 'unknown')[:12]}, minidpo/ last changed in "
        f"{(code.get('minidpo_last_commit') or 'unknown')[:12]}"
        + (" (and modified since)" if code.get("minidpo_modified") else ""),
        f"meter: {res['meter']}; sizes in {unit} (1 GB = 1e9 bytes)",
        "",
        f"Analytic breakdown from the shapes (B={s['B']} T={s['T']} C={s['C']} H={s['H']} V={s['V']} "
        f"L={s['L']}), {unit}",
    ]
    rows = [
        ("parameters, P x 4 bytes", t["parameters"]),
        ("gradients", t["gradients"]),
        ("AdamW moments m, v", t["AdamW moments m, v"]),
        ("reference parameters (a second copy)", t["reference parameters"]),
        (f"activation cache: embedding + {s['L']} blocks + ln_f", t["activation cache (embedding, L blocks, ln_f)"]),
    ]
    for label, b in rows:
        lines.append(f"  {label:<60}{num(b)}")
    lines.append(f"    {'one block:':<58}{num(sum(a['per_layer_bytes'].values()))}")
    for label, b in a["per_layer_bytes"].items():
        lines.append(f"      {label:<56}{num(b)}")
    for label, key in (("logits (B,T,V); the same buffer becomes dlogits", "logits (B,T,V)"),
                       ("log-softmax piece (sequence_logps' temporary)", "log-softmax piece"),
                       ("log-prob cache (labels, lse, weights)", "log-prob cache (labels, lse, weights)"),
                       ("batch (input_ids int64, loss_mask bool)", "batch (input_ids int64, loss_mask bool)"),
                       (f"backward workspace at its peak ({bw['where']})", "backward workspace"),
                       ("gradients alive then", "gradients alive at the backward's peak"),
                       ("KV cache of a no-gradient forward of the same batch",
                        "KV cache of a no-gradient pass over the batch")):
        lines.append(f"  {label:<60}{num(t[key])}")

    lines += ["", f"Predicted peaks, {unit}"]
    predicted = [
        ("cached step (state + cache + logits/dlogits + workspace)", "cached"),
        ("  its forward side (up to sequence_logps)", "forward_side"),
        ("cached step as train_dpo runs it (+ reference kept)", "cached_as_train_dpo"),
        ("recompute step (+ reference parameters)", "recompute"),
        (f"reference cache pass, chunks of {s['ref_batch_pairs']} pairs", "reference_pass"),
    ]
    if "eval_reference_pass" in pk:
        predicted += [
            (f"held-out reference pass, {s['eval_pairs']} pairs in chunks of {s['eval_batch_pairs']}",
             "eval_reference_pass"),
            ("held-out evaluation, cached mode (params + moments)", "evaluation_cached"),
            ("held-out evaluation, recompute mode (+ reference)", "evaluation_recompute"),
        ]
    predicted += [
        (f"train_dpo's reference cache pass, chunks of {s['eval_batch_pairs']} pairs", "reference_pass_train_dpo"),
        (f"train_dpo's held-out evaluation, chunks of {s['eval_batch_pairs']} pairs", "evaluation_pass_train_dpo"),
    ]
    for label, key in predicted:
        lines.append(f"  {label:<60}{num(pk[key])}")

    modes = list(m)
    lines += ["", f"Measured, {unit}", f"  {'':<50}" + "".join(f"{mode:>12}" for mode in modes)]

    def row(label, get):
        lines.append(f"  {label:<50}" + "".join(num(get(m[mode]), 12) for mode in modes))

    row("state: params + grads + moments (+ reference)", lambda r: r["state_bytes"])
    row("step 1 peak", lambda r: r["step1_peak_bytes"])
    row("  activation peak = step 1 peak - state", lambda r: r["activation_peak_bytes"])
    row("  predicted step peak", lambda r: pk[r["mode"]])
    for i in range(1, c["steps"]):
        row(f"step {i + 1} peak", lambda r, i=i: r["steps"][i]["peak_bytes"])
    row("reference cache pass peak", lambda r: r.get("reference_pass_peak_bytes"))
    row("  predicted", lambda r: pk["reference_pass"] if r["mode"] == "cached" else None)
    if "eval_reference_pass" in pk:
        row("held-out reference pass peak", lambda r: r.get("eval_reference_pass_peak_bytes"))
        row("  predicted", lambda r: pk["eval_reference_pass"])
        row("held-out evaluation peak (after the last step)", lambda r: r.get("evaluation_peak_bytes"))
        row("  predicted", lambda r: pk["evaluation_" + r["mode"]])
    row("process peak RSS", lambda r: r["process_peak_rss_bytes"])
    if any(r["meter_extra"] for r in m.values()):
        row("CuPy pool reserved at the end", lambda r: r["meter_extra"].get("pool_reserved_bytes"))
        row("device memory used, max at phase ends", lambda r: r["meter_extra"].get("device_used_max_bytes"))
    lines.append(f"  {'step 1 wall time, s':<50}" + "".join(f"{m[x]['steps'][0]['wall_s']:12.1f}" for x in modes))
    lines.append(f"  (process RSS: {m[modes[0]]['process_peak_rss_what']})")

    for mode in modes:
        lines += ["", f"Phases of the {mode} mode ({unit}: peak during the phase, live at its end)"]
        for p in m[mode]["phases"]:
            if p["stage"] in STEP_PHASES_SHOWN:
                lines.append(f"  {p['stage']:<24}{p['phase']:<26}{num(p['peak_bytes'])}{num(p['end_bytes'])}")

    cap = gpu_gb * 1e9
    cfg = GPTConfig(**mc)
    g = analytic_breakdown(cfg, c["pairs"], c["seq"], ref_batch_pairs=s["ref_batch_pairs"],
                           eval_batch_pairs=s["eval_batch_pairs"], eval_pairs=0, gpu=True)["peaks"]

    def verdict(b):
        return "fits" if b <= cap else "does NOT fit"

    def most(key):
        n = max_pairs_that_fit(cfg, c["seq"], cap, key)
        return f"{n}+" if n == 4096 else str(n)

    lines += [
        "",
        f"Predicted for a GPU with {gpu_gb:g} GB (CuPy: the same arrays; fused log-softmax, GELU and AdamW keep "
        f"fewer temporaries; CUDA context and pool rounding not counted)",
        f"  training step: {g['cached_steady'] / 1e9:.2f} GB cached, {g['cached_as_train_dpo'] / 1e9:.2f} GB as "
        f"train_dpo runs it, {g['recompute_steady'] / 1e9:.2f} GB recompute: {verdict(g['recompute_steady'])}; "
        f"at T={c['seq']} up to {most('cached_steady')} pairs (cached) / {most('cached_as_train_dpo')} "
        f"(as train_dpo) fit",
        f"  train_dpo's reference cache pass in chunks of {s['eval_batch_pairs']} pairs: "
        f"{g['reference_pass_train_dpo'] / 1e9:.2f} GB, {verdict(g['reference_pass_train_dpo'])}; "
        f"its held-out evaluation: {g['evaluation_pass_train_dpo'] / 1e9:.2f} GB, "
        f"{verdict(g['evaluation_pass_train_dpo'])}; chunks of up to {most('evaluation_pass_train_dpo')} pairs "
        f"fit both",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--pairs", type=int, default=8, help="N preference pairs per step (B = 2N rows)")
    ap.add_argument("--seq", type=int, default=512, help="T tokens per row")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per pair (default min(128, T/4))")
    ap.add_argument("--n-layer", type=int, default=None, help="layers (default GPT-2 small's 12)")
    ap.add_argument("--n-embd", type=int, default=None, help="channels C (default 768)")
    ap.add_argument("--n-head", type=int, default=None, help="heads H (default 12)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary V (default 50257)")
    ap.add_argument("--n-ctx", type=int, default=None, help="context length (default 1024)")
    ap.add_argument("--steps", type=int, default=2,
                    help="steps per mode (step 2 on shows whether anything of the previous step lingers)")
    ap.add_argument("--modes", default=",".join(MODES), help="cached, recompute or both")
    ap.add_argument("--ref-batch-pairs", type=int, default=None,
                    help="chunk size of the measured reference cache pass (default pairs // 2: two chunks)")
    ap.add_argument("--eval-batch-pairs", type=int, default=None,
                    help="chunk size of the held-out passes, train_dpo's eval_batch_size (default TrainConfig's)")
    ap.add_argument("--eval-pairs", type=int, default=None,
                    help="held-out pairs measured through the reference pass and one evaluation "
                         "(default: one chunk of --eval-batch-pairs; 0: none)")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory for the fit prediction, in GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)

    base = GPTConfig.gpt2_small().to_dict()
    for key, val in (("n_layer", args.n_layer), ("n_embd", args.n_embd), ("n_head", args.n_head),
                     ("vocab_size", args.vocab), ("n_ctx", args.n_ctx)):
        if val is not None:
            base[key] = val
    try:
        if not args.gpu_gb > 0:
            raise ValueError(f"--gpu-gb must be > 0, got {args.gpu_gb}")
        config = GPTConfig(**base)
        modes = tuple(x.strip() for x in args.modes.split(",") if x.strip())
        res = measure(config, args.pairs, args.seq, prompt=args.prompt, device=args.device, steps=args.steps,
                      ref_batch_pairs=args.ref_batch_pairs, modes=modes, seed=args.seed,
                      eval_batch_pairs=args.eval_batch_pairs, eval_pairs=args.eval_pairs)
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"memory_dpo.py: {err}", file=sys.stderr)
        return 2
    print(format_report(res, gpu_gb=args.gpu_gb))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
