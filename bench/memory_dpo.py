"""Peak memory of DPO training, measured and predicted from shapes.

What is measured is minidpo's own code, called in the order of minidpo.train.train_dpo
(_run_loop makes AdamW's moments, then train_dpo's prepare(), then the steps):

    AdamW(...)                    the moments m, v
    [cached] reference_logps      log pi_ref of every training pair, on the first epoch's batches
                                  (batch_size pairs each), by scoring.batch_logps: gpt_forward
                                  without a backward cache (keep_cache=False) + sequence_logps
    batched_sequence_logps        log pi_ref of the held-out pairs, chunks of eval_batch_size
    evaluate_preferences          the held-out evaluation at step 0 (the curves' starting point)
    each step (_train_step):      make_batch: Batcher.pairs ([recompute] + batch_logps of the
                                  reference on the step's batch), dpo_step: gpt_forward (logits
                                  of the M scored positions only, (M, V)) -> sequence_logps ->
                                  dpo_step_loss, eq. (7) -> sequence_logps_backward, eq. (9),
                                  written into the logits' own buffer -> gpt_backward; then
                                  clip_grad_norm, lr_at, AdamW.step, ``del grads, batch``
    evaluate_preferences          the held-out evaluation after the last step

in two modes: ``cached`` (train_dpo's default, cache_reference=True; the reference parameters
are dropped once the caches are built, which is what caching allows: train_dpo itself keeps
them, see bench/MEMORY.md) and ``recompute`` (cache_reference=False: the reference parameters
stay and every step runs the reference forward on its batch).

and in one of two batch layouts (packing.Batcher, from TrainConfig's share_prompt and pack):

    shared_packed  train_dpo's default: each pair one sequence [x | y_w | y_l] (the prompt once),
                   sequences packed into rows of 1.5x the longest: R rows of L tokens
    padded         [x | y] in its own row, right-padded: R = 2N rows of T tokens, causal

What is measured: on the CPU, tracemalloc (NumPy reports every array buffer to it), so "bytes" are
the bytes of live arrays plus a few Python objects; the process's peak resident set (Linux VmHWM,
reset before each mode; ru_maxrss otherwise) is reported beside it. On CUDA, a CuPy memory hook
adds up the (512-byte rounded) blocks handed out by the memory pool; the pool's reserved size and
the device's used memory (cudaMemGetInfo) are reported beside it. Phase boundaries come from a
profile hook on the return of minidpo's functions (gpt_forward, sequence_logps, gpt_backward, ...),
so the code measured is the library's, not a copy of it.

The analytic model (:func:`analytic_breakdown`) replays every allocation minidpo makes, from the
shapes alone (a :class:`Ledger` of the arrays each function makes and frees, line by line of
model.py, fast.py, logprobs.py, scoring.py and train.py), for either layout: a batch enters it as
its :class:`BatchShape` (rows R, length L, scored tokens M, examples E, attention's query blocks),
read off the packing.Batch the run trains on. It predicts every phase's peak; the report compares.

    python bench/memory_dpo.py                                # GPT-2 small, 8 pairs x 512, shared_packed
    python bench/memory_dpo.py --layout padded
    python bench/memory_dpo.py --device cuda --json $OUT/memory_cuda.json
    python bench/memory_dpo.py --n-layer 2 --n-embd 64 --n-head 2 --vocab 512 --pairs 2 --seq 32

Shape letters: N preference pairs, E = 2N examples, R rows, L row length (T for the padded
layout: R = 2N, L = T), M scored tokens, C channels, V vocabulary, H heads, D = C / H head size,
P parameters. Sizes are printed in GB = 10^9 bytes (MB or kB for small models); the JSON has bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.bench_step import cpu_model  # noqa: E402
from minidpo import runtime  # noqa: E402
from minidpo.backend import Backend, to_numpy  # noqa: E402
from minidpo.data import TokenizedPair  # noqa: E402
# the analytic model follows the array code's blockings and thresholds (a rename fails loudly
# here): attention's query blocks and when it copies k, v and calls MKL's batched GEMM, the size
# of the NumPy log-softmax pieces and of the elementwise blocks
from minidpo.fast import _COPY_KV_T as COPY_KV_T  # noqa: E402
from minidpo.fast import _MKL_ATTENTION_T as MKL_ATTENTION_T  # noqa: E402
from minidpo.fast import _PIECE as LOGSOFTMAX_PIECE  # noqa: E402
from minidpo.fast import _SOFTMAX_BLOCKED as SOFTMAX_BLOCKED  # noqa: E402
from minidpo.fast import _causal_blocks  # noqa: E402
from minidpo.fast import sequence_logps, sequence_logps_backward  # noqa: E402  (the default path's)
from minidpo.losses import dpo_step_loss  # noqa: E402
from minidpo.model import GPTConfig, gpt_backward, gpt_forward, init_params, param_shapes  # noqa: E402
from minidpo.optim import AdamW, clip_grad_norm, lr_at  # noqa: E402
from minidpo.packing import Batch, Batcher  # noqa: E402
from minidpo.runtime import BLOCK as ELEMENTWISE_BLOCK  # noqa: E402
from minidpo.scoring import batch_logps, batched_sequence_logps  # noqa: E402
from minidpo.train import (TrainConfig, batch_for_step, batcher_for, dpo_step, evaluate_preferences,  # noqa: E402
                           reference_logps)

MODES = ("cached", "recompute")
LAYOUTS = {"shared_packed": dict(share_prompt=True, pack=True), "padded": dict(share_prompt=False, pack=False)}
DEFAULT_LAYOUT = "shared_packed"  # TrainConfig's defaults: what train_dpo runs
PAD_ID = 0


# ---------------------------------------------------------------------------------------------
# the synthetic preference pairs, and the shapes of their batches
# ---------------------------------------------------------------------------------------------


def synthetic_pairs(pairs: int, seq: int, prompt: int, vocab: int, seed: int = 0,
                    ragged: bool = False) -> list[TokenizedPair]:
    """N preference pairs of random token ids in [1, V) (0 is the pad id).

    Every prompt has ``prompt`` tokens; every chosen response fills [x | y_w] to exactly ``seq``
    tokens and every rejected one is shorter (between half and all of seq - prompt tokens), so
    the padded layout gives T = seq with right-padded rejected rows, the padding convention of
    real batches; the shared-prompt sequences [x | y_w | y_l] are then too alike in length for
    two to share a packed row (R = N rows).

    ``ragged``: lengths vary as in real data: each prompt 1..``prompt`` tokens, each response
    1..seq - its prompt's tokens; packed rows then hold several sequences, and attention's query
    blocks start past key 0. Every position stays below seq either way.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(pairs):
        if ragged:
            p = int(rng.integers(1, prompt + 1))
            chosen_len, rejected_len = (int(v) for v in rng.integers(1, seq - p + 1, 2))
        else:
            p, chosen_len = prompt, seq - prompt
            rejected_len = int(rng.integers(max(1, chosen_len // 2), chosen_len + 1))
        out.append(TokenizedPair(
            prompt_ids=rng.integers(1, vocab, p).tolist(),
            chosen_ids=rng.integers(1, vocab, chosen_len).tolist(),
            rejected_ids=rng.integers(1, vocab, rejected_len).tolist(),
            source=f"synthetic:{i}",
        ))
    return out


@dataclass(frozen=True)
class BatchShape:
    """What the analytic model reads off a packing.Batch.

    R, L: the rows and their length (input_ids (R, L)); M: scored tokens (the logits are (M, V));
    E: examples (2N); blocks: attention's query blocks ((i0, i1, k0), ...): queries i0..i1-1
    scored against keys k0..i1-1 (fast.attention_forward: the layout's blocks, or
    fast._causal_blocks(L) for the causal layout); causal: the padded layout (positions 0..L-1,
    query i sees keys 0..i), which the model runs without reading the layout's arrays."""

    R: int
    L: int
    M: int
    E: int
    blocks: tuple
    causal: bool

    def to_dict(self) -> dict:
        return {"R": self.R, "L": self.L, "M": self.M, "E": self.E, "blocks": [list(b) for b in self.blocks],
                "causal": self.causal}

    @classmethod
    def from_dict(cls, d: dict) -> "BatchShape":
        return cls(d["R"], d["L"], d["M"], d["E"], tuple(tuple(b) for b in d["blocks"]), d["causal"])


def shape_of(batch: Batch) -> BatchShape:
    """The :class:`BatchShape` of a packing.Batch (host ints only: no device read-back)."""
    R, L = batch.shape
    causal = bool(batch.layout.causal)
    blocks = _causal_blocks(L) if causal else batch.layout.blocks
    return BatchShape(int(R), int(L), int(batch.host_example.size), int(batch.n_examples),
                      tuple(tuple(int(v) for v in b) for b in blocks), causal)


def padded_shape(pairs: int, T: int, M: int) -> BatchShape:
    """The padded layout's shape for N pairs of rows of T tokens with M scored tokens in all."""
    return BatchShape(2 * pairs, T, M, 2 * pairs, tuple(_causal_blocks(T)), True)


def layout_batcher(layout: str, backend=None, average: bool = False) -> Batcher:
    """The packing.Batcher of ``layout`` ('shared_packed' or 'padded')."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    return Batcher(PAD_ID, average=average, backend=backend, **LAYOUTS[layout])


def shapes_of_chunks(pairs, batcher: Batcher, chunk: int) -> list[BatchShape]:
    """The shapes of batched_sequence_logps' batches: ``pairs`` in chunks of ``chunk`` pairs."""
    return [shape_of(batcher.pairs(pairs[i:i + chunk])) for i in range(0, len(pairs), chunk)]


def reference_pass_batches(n_train: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """train.reference_logps' batches (one process): the first epoch's batch_for_step 0 ..
    steps_per_epoch - 1, then the pairs that epoch leaves out."""
    bs = min(batch_size, n_train)
    epoch = [batch_for_step(s, n_train, batch_size, seed) for s in range(n_train // bs)]
    left = np.setdiff1d(np.arange(n_train), np.concatenate(epoch))
    return epoch + [left[i:i + bs] for i in range(0, len(left), bs)]


# ---------------------------------------------------------------------------------------------
# the analytic model: every array minidpo makes, replayed from the shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodePath:
    """Which of the fast path's branches the arrays go through (each keeps other temporaries).

    fused: the fused kernels run (the compiled CPU kernels of cpu_kernels.py on NumPy arrays, or
        kernels.py's on CuPy arrays): no log-softmax piece, no GELU blocks, no layernorm x_hat,
        no softmax mask temporaries.
    mkl: MKL's GEMM does NumPy's products (runtime.gemm_lib()): from L = MKL_ATTENTION_T on,
        attention's backward writes dv, dk, dq through contiguous temporaries.
    gpu: CuPy arrays (then fused, and no MKL)."""

    fused: bool = False
    mkl: bool = False
    gpu: bool = False

    @classmethod
    def of(cls, backend: Backend) -> "CodePath":
        """The branches this process takes on ``backend`` now."""
        if backend.is_cuda:
            return cls(True, False, True)
        return cls(runtime.cpu_kernels() is not None, runtime.gemm_lib() is not None, False)


class Ledger:
    """The arrays alive at each moment of a replayed computation, and their high-water mark.

    Every array has a key, a size in bytes and a kind ("state", "batch", "cache", "logits",
    "grads", "workspace", "pass"). ``bind(var)`` makes a variable's new value while the old one
    is still bound and ``rebind(var)`` completes the assignment (the old value goes), as
    ``dh = f(dh)`` does; ``temp`` is an array made and freed inside one call. ``mark(phase)``
    closes a phase (the peak during it and the bytes live at its end), as PhaseRecorder does
    for the measurement."""

    def __init__(self, base: int = 0):
        self.live: dict[str, tuple[int, str]] = {}
        self.by_kind: dict[str, int] = {"base": base}
        self.now = self.peak = self._phase_peak = base
        self.peak_at: tuple[str, dict] = ("start", dict(self.by_kind))
        self.phases: list[dict] = []
        self.vars: dict[str, str] = {}
        self._pending: dict[str, str] = {}
        self._n = 0
        self.where = ""  # what the replay is in (a layer's forward or backward), for peak_at

    def add(self, key: str, nbytes: int, kind: str) -> str:
        if key in self.live:
            raise KeyError(f"ledger: {key!r} is already live")
        nbytes = int(nbytes)
        self.live[key] = (nbytes, kind)
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes
        self.now += nbytes
        self._phase_peak = max(self._phase_peak, self.now)
        if self.now > self.peak:
            self.peak = self.now
            what = key.split(" #")[0]
            self.peak_at = (f"{self.where}: {what}" if self.where else what,
                            {k: v for k, v in self.by_kind.items() if v})
        return key

    def free(self, *keys: str) -> None:
        for key in keys:
            nbytes, kind = self.live.pop(key)
            self.by_kind[kind] -= nbytes
            self.now -= nbytes

    def relabel(self, key: str, kind: str) -> None:
        nbytes, old = self.live[key]
        self.by_kind[old] -= nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes
        self.live[key] = (nbytes, kind)

    def free_kind(self, *kinds: str) -> None:
        self.free(*[k for k, (_, kind) in self.live.items() if kind in kinds])

    def temp(self, nbytes: int, key: str = "temporary", kind: str = "workspace") -> None:
        if nbytes:
            self.add(key, nbytes, kind)
            self.free(key)

    def bind(self, var: str, nbytes: int, kind: str = "workspace") -> str:
        self._n += 1
        self._pending[var] = self.add(f"{var} #{self._n}", nbytes, kind)
        return self._pending[var]

    def rebind(self, var: str) -> None:
        old = self.vars.get(var)
        if old is not None:
            self.free(old)
        self.vars[var] = self._pending.pop(var)

    def assign(self, var: str, nbytes: int, kind: str = "workspace", grads=(), temps=()) -> None:
        """``var, g = f(var)``: the new array, then ``grads`` ((key, bytes) gradients) and
        ``temps`` made while the old value is bound; then the old value goes."""
        self.bind(var, nbytes, kind)
        for key, nb in grads:
            self.add(key, nb, "grads")
        for t in temps:
            self.temp(t)
        self.rebind(var)

    def drop(self, *vars_: str) -> None:
        for var in vars_:
            key = self.vars.pop(var, None)
            if key is not None:
                self.free(key)

    def mark(self, phase: str) -> None:
        self.phases.append({"phase": phase, "peak_bytes": self._phase_peak, "end_bytes": self.now})
        self._phase_peak = self.now

    def kinds_now(self) -> dict:
        return {k: v for k, v in self.by_kind.items() if v}


@dataclass(frozen=True)
class _Geometry:
    """The sizes one batch gives the model's arrays (bytes unless named elements)."""

    cfg: GPTConfig
    s: BatchShape
    it: int
    path: CodePath

    @property
    def RL(self) -> int:
        return self.s.R * self.s.L

    @property
    def n(self) -> int:  # one (R, L, C) array
        return self.RL * self.cfg.n_embd * self.it

    @property
    def copy_kv(self) -> bool:  # fast.attention_forward copies k and v (and lets qkv go)
        return self.s.L >= COPY_KV_T

    @property
    def mkl_attention(self) -> bool:  # fast.attention_backward's products through MKL's bmm
        return self.path.mkl and not self.path.gpu and self.s.L >= MKL_ATTENTION_T


def param_bytes(config: GPTConfig, itemsize: int = 4) -> dict[str, int]:
    """Every parameter's bytes, in checkpoint order."""
    return {k: math.prod(v) * itemsize for k, v in param_shapes(config).items()}


def batch_bytes(s: BatchShape) -> int:
    """The arrays a packing.Batch keeps (host int64; on NumPy the Batch holds them as made):
    input_ids and parts (R, L); the layout: positions and one zeros array for start, hidden_lo
    and hidden_hi (causal_layout), or positions, start and hidden (R, L, 2) (the packed layout);
    logits_at, labels, example and host_at (M,); token_counts (E,). Not the weights (E, M), made
    by the first Batch.weights call (see :func:`_weights`)."""
    return 8 * (s.R * s.L * (2 + (2 if s.causal else 4)) + 4 * s.M + s.E)


def _weights(led: Ledger, g: _Geometry, tag: str = "") -> None:
    """Batch.weights(dtype)'s first call: ones (M,) float64, the (E, M) weights, and while they
    are filled, (M,) of the dtype and np.arange(M); the weights stay with the batch."""
    M, E, it = g.s.M, g.s.E, g.it
    led.add(tag + "weights: ones (M,) float64", 8 * M, "workspace")
    led.add(tag + "weights (E, M)", E * M * it, "batch")
    led.temp(M * it + 8 * M)
    led.free(tag + "weights: ones (M,) float64")


def _softmax_temporaries(g: _Geometry, nq: int, nk: int, k0: int) -> int:
    """Bytes fast._masked_softmax_ makes for one query block on the NumPy passes (the fused
    kernels make none). Causal: the softmax's max and sum, (R, H, nq, 1), or one (m, nq, 1) block
    of them when the scores reach _SOFTMAX_BLOCKED elements (the (nq, k0 + nk) bias is cached
    across calls). A packed layout: layers.sees' (R, nq, K) bools, four at once at most (K = k0 +
    nk keys), then the mask, its (R, 1, nq, nk) -inf bias and the softmax's (R, H, nq, 1)."""
    if g.path.fused:
        return 0
    R, H, it = g.s.R, g.cfg.n_head, g.it
    if g.s.causal:
        if R * H * nq * nk >= SOFTMAX_BLOCKED:
            return min(max(1, ELEMENTWISE_BLOCK // (nq * nk)), R * H) * nq * it
        return R * H * nq * it
    K = k0 + nk
    return max(4 * R * nq * K + 8 * K + 16 * nq, R * nq * K + R * nq * nk * it + R * H * nq * it)


def _attention_forward(led: Ledger, g: _Geometry, kind: str, p: str) -> list[str]:
    """fast.attention_forward: q / sqrt(D), contiguous copies of k and v (L >= COPY_KV_T; else
    views of qkv), the output, and every query block's probabilities (R, H, nq, nk), kept for
    the backward; per block the mask's temporaries and the (R, H, nq, D) product with v (or
    MKL's contiguous target), copied into the heads-side-by-side output. Returns the cache's keys."""
    R, H, D, it, n = g.s.R, g.cfg.n_head, g.cfg.head_size, g.it, g.n
    cache = [led.add(p + "q / sqrt(D) (R,L,C)", n, kind)]
    if g.copy_kv:
        cache += [led.add(p + "k copy (R,L,C)", n, kind), led.add(p + "v copy (R,L,C)", n, kind)]
    led.add(p + "attention output (R,L,C)", n, kind)
    for j, (i0, i1, k0) in enumerate(g.s.blocks):
        cache.append(led.add(p + f"attention probabilities, block {j} (R,H,nq,nk)",
                             R * H * (i1 - i0) * (i1 - k0) * it, kind))
    for i0, i1, k0 in g.s.blocks:
        led.temp(_softmax_temporaries(g, i1 - i0, i1 - k0, k0))
        led.temp(R * H * (i1 - i0) * D * it)
    return cache


def _block_forward(led: Ledger, g: _Geometry, keep: bool, p: str) -> str:
    """model.block_forward. keep (training): every layer's cache stays; otherwise (keep_cache=False)
    each array goes when the variable holding it (h, or the last layer's cache c) is rebound, the
    block's input being held by gpt_forward's loop until the block returns. Returns the key of
    the block's output."""
    kind = "cache" if keep else "pass"
    n, st = g.n, 2 * g.RL * g.it
    led.where = p + "forward"
    led.add(p + "ln_1 output (R,L,C)", n, kind)
    led.add(p + "ln_1 mean, rstd", st, kind)
    led.add(p + "qkv (R,L,3C)", 3 * n, kind)
    if not keep:
        led.free(p + "ln_1 mean, rstd")
    att = _attention_forward(led, g, kind, p)
    if g.copy_kv:  # nothing references qkv any more: the copies of k and v are what is kept
        led.free(p + "qkv (R,L,3C)")
    if not keep:
        led.free(p + "ln_1 output (R,L,C)")
    led.add(p + "residual after attention (R,L,C)", n, kind)  # c_proj's output, x added in place
    if not keep:
        led.free(*att, *(() if g.copy_kv else (p + "qkv (R,L,3C)",)))
    led.add(p + "ln_2 output (R,L,C)", n, kind)
    led.add(p + "ln_2 mean, rstd", st, kind)
    if not keep:
        led.free(p + "attention output (R,L,C)")
    led.add(p + "mlp.c_fc output (R,L,4C)", 4 * n, kind)
    if not keep:
        led.free(p + "ln_2 mean, rstd")
    led.add(p + "gelu output (R,L,4C)", 4 * n, kind)
    if not keep:
        led.free(p + "ln_2 output (R,L,C)")
    out = led.add(p + "residual after the MLP (R,L,C)", n, kind)  # the block's output
    if not keep:
        led.free(p + "mlp.c_fc output (R,L,4C)", p + "gelu output (R,L,4C)", p + "residual after attention (R,L,C)")
    return out


def _forward(led: Ledger, g: _Geometry, keep: bool, tag: str = "") -> None:
    """model.gpt_forward(..., logits_at=batch.logits_at, keep_cache=keep): the embedding (a
    packed layout adds the position rows gathered per token), the blocks, the M scored rows
    gathered (the last block's (R, L, C) output then goes), ln_f and the (M, V) logits."""
    M, C, V, it = g.s.M, g.cfg.n_embd, g.cfg.vocab_size, g.it
    kind = "cache" if keep else "pass"
    x = led.add(tag + "embedding output (R,L,C)", g.n, kind)
    if not g.s.causal:
        led.temp(g.n)  # x += wpe[positions]
    for i in range(g.cfg.n_layer):
        out = _block_forward(led, g, keep, f"{tag}h.{i}.")
        if not keep:
            led.free(x)
        x = out
    led.where = "ln_f, unembedding"
    led.add(tag + "ln_f input (M,C)", M * C * it, kind)
    led.free(x)
    led.add(tag + "ln_f output (M,C)", M * C * it, kind)
    led.add(tag + "ln_f mean, rstd", 2 * M * it, kind)
    led.add(tag + "logits (M,V)", M * V * it, "logits")
    if not keep:
        led.free(tag + "ln_f input (M,C)", tag + "ln_f output (M,C)", tag + "ln_f mean, rstd")


def _token_logps(led: Ledger, g: _Geometry, tag: str = "") -> str:
    """fast.token_logps: lse (M,) and lp (M,); on the NumPy passes also the log-sum-exp of one
    piece (at most LOGSOFTMAX_PIECE elements, and its row vectors) and the gather's arange (M,)
    int64 and values. Returns lp's key."""
    M, V, it = g.s.M, g.cfg.vocab_size, g.it
    led.where = "sequence_logps"
    led.add(tag + "lse (M,)", M * it, "cache")
    if not g.path.fused:
        rows = M if M * V <= LOGSOFTMAX_PIECE else max(1, LOGSOFTMAX_PIECE // V)
        led.temp(rows * V * it + 6 * rows * it + rows)
        led.add(tag + "gather: arange (M,), values (M,)", 8 * M + M * it, "workspace")
    lp = led.add(tag + "lp (M,)", M * it, "workspace")
    if not g.path.fused:
        led.free(tag + "gather: arange (M,), values (M,)")
    return lp


def _nograd_pass(led: Ledger, g: _Geometry, weights_made: bool, tag: str = "", mark: bool = False) -> str:
    """scoring.batch_logps: gpt_forward without a backward cache, then sequence_logps (the
    batch's weights made first, unless it has them); the logits and lse go when it returns.
    Returns the key of the (E,) log-probs."""
    _forward(led, g, keep=False, tag=tag)
    if not weights_made:
        _weights(led, g, tag)
    lp = _token_logps(led, g, tag)
    logps = led.add(tag + "logps (E,)", g.s.E * g.it, "pass")
    led.free(lp)
    if mark:
        led.mark("batch_logps")
    led.free(tag + "logits (M,V)", tag + "lse (M,)")
    return logps


def _layernorm_backward(led: Ledger, g: _Geometry, var: str, rows: int, name: str) -> None:
    """fast.layernorm_backward on ``rows`` rows: dx; fused, one partial dw and db per thread
    part (summed into dw, db); on the NumPy passes a row block's x_hat and then the whole
    x_hat (rows, C) for dw."""
    C, it = g.cfg.n_embd, g.it
    grads = ((name + "weight", C * it), (name + "bias", C * it))
    if g.path.gpu:
        led.assign(var, rows * C * it, grads=grads)
        return
    led.bind(var, rows * C * it)
    if g.path.fused:
        parts = len(runtime.parts(rows, C))
        led.add("layernorm partial sums", 2 * parts * C * it, "workspace")
        for key, nb in grads:
            led.add(key, nb, "grads")
        led.free("layernorm partial sums")
    else:
        nb_rows = min(rows, max(1, ELEMENTWISE_BLOCK // C))
        led.temp(nb_rows * C * it + 2 * nb_rows * it)
        led.add("layernorm x_hat", rows * C * it, "workspace")
        for key, nb in grads:
            led.add(key, nb, "grads")
        led.free("layernorm x_hat")
    led.rebind(var)


def _attention_backward(led: Ledger, g: _Geometry) -> None:
    """fast.attention_backward: dqkv (R, L, 3C); delta (R, L, H) summed from the (R, L, C)
    product dy * y; then per query block, last first: with MKL (L >= MKL_ATTENTION_T) a
    contiguous target for each of dv, dk (R, H, nk, D) and dq (R, H, nq, D), added into dqkv's
    strided views, and ds (R, H, nq, nk) made while the previous block's is still bound; without
    it dv, ds, dk, dq as new arrays, each made while the previous block's of that name is bound.
    The compiled softmax backward reads a contiguous copy of delta's rows (R, H, nq)."""
    R, H, D, it, n = g.s.R, g.cfg.n_head, g.cfg.head_size, g.it, g.n
    led.bind("dh", 3 * n)
    led.add("dy * y (R,L,C)", n, "workspace")
    led.add("delta (R,L,H)", g.RL * H * it, "workspace")
    led.free("dy * y (R,L,C)")
    delta_copy = g.path.fused and not g.path.gpu
    where = led.where
    for i0, i1, k0 in reversed(g.s.blocks):
        led.where = f"{where}, query block (i0, i1, k0) = ({i0}, {i1}, {k0})"
        nq, nk = i1 - i0, i1 - k0
        kd, qd, sc = R * H * nk * D * it, R * H * nq * D * it, R * H * nq * nk * it
        if g.mkl_attention:
            led.temp(kd)  # dv
            led.assign("ds", sc)
            led.temp(R * H * nq * it if delta_copy else 0)
            led.temp(kd)  # dk
            led.temp(qd)  # dq
        else:
            led.assign("dv", kd)
            led.assign("ds", sc)
            led.temp(R * H * nq * it if delta_copy else 0)
            led.assign("dk", kd)
            led.assign("dq", qd)
    led.where = where
    led.free("delta (R,L,H)")
    led.drop("dv", "ds", "dk", "dq")
    led.rebind("dh")


def _block_backward(led: Ledger, g: _Geometry, pb: dict, p: str) -> None:
    """model.block_backward, each ``dh, g = f(dh)`` an assignment (the residual dx is updated in
    place): mlp.c_proj, GELU (on the NumPy passes two elementwise blocks), c_fc, ln_2,
    attn.c_proj, attention, c_attn, ln_1. Each linear backward makes dx, dw and db."""
    n, it, C = g.n, g.it, g.cfg.n_embd

    def gr(*names):
        return tuple((p + nm, pb[p + nm]) for nm in names)

    led.where = p + "mlp.c_proj backward"
    led.assign("dh", 4 * n, grads=gr("mlp.c_proj.weight", "mlp.c_proj.bias"))
    led.where = p + "GELU backward"
    gelu_blocks = 0 if g.path.fused else 2 * min(ELEMENTWISE_BLOCK, 4 * g.RL * C) * it
    led.assign("dh", 4 * n, temps=(gelu_blocks,))
    led.where = p + "mlp.c_fc backward"
    led.assign("dh", n, grads=gr("mlp.c_fc.weight", "mlp.c_fc.bias"))
    led.where = p + "ln_2 backward"
    _layernorm_backward(led, g, "dh", g.RL, p + "ln_2.")
    led.where = p + "attn.c_proj backward"
    led.assign("dh", n, grads=gr("attn.c_proj.weight", "attn.c_proj.bias"))
    led.where = p + "attention backward"
    _attention_backward(led, g)
    led.where = p + "attn.c_attn backward"
    led.assign("dh", n, grads=gr("attn.c_attn.weight", "attn.c_attn.bias"))
    led.where = p + "ln_1 backward"
    _layernorm_backward(led, g, "dh", g.RL, p + "ln_1.")
    led.drop("dh")


def _backward(led: Ledger, g: _Geometry, pb: dict) -> None:
    """model.gpt_backward(dlogits, cache) (dlogits is the logits' buffer, already counted): the
    unembedding's dx (M, C) and dwte, ln_f, the (R L, C) residual gradient the M rows are
    scatter-added into, the blocks last first, then dwpe (a causal layout: dx summed over the
    rows, an (L, C) temporary)."""
    M, C, L, it = g.s.M, g.cfg.n_embd, g.s.L, g.it
    led.where = "unembedding backward"
    led.assign("dx", M * C * it, grads=(("transformer.wte.weight", pb["transformer.wte.weight"]),))
    led.where = "ln_f backward"
    _layernorm_backward(led, g, "dx", M, "transformer.ln_f.")
    led.where = "logits_at scatter-add"
    led.assign("dx", g.n)
    for i in reversed(range(g.cfg.n_layer)):
        _block_backward(led, g, pb, f"transformer.h.{i}.")
    led.where = "embedding backward"
    led.add("transformer.wpe.weight", pb["transformer.wpe.weight"], "grads")
    if g.s.causal:
        led.temp(L * C * it)
    led.where = ""


# ---------------------------------------------------------------------------------------------
# the ledgers of a step and of a no-gradient pass
# ---------------------------------------------------------------------------------------------


def step_ledger(config: GPTConfig, s: BatchShape, mode: str, base: int, itemsize: int = 4,
                path: CodePath = CodePath()) -> Ledger:
    """One training step (train._train_step with train_dpo's make_batch and step_fn), replayed
    above ``base`` bytes (params, moments, [reference], the log-prob caches), phase by phase as
    :class:`PhaseRecorder` marks the measurement."""
    g = _Geometry(config, s, itemsize, path)
    pb = param_bytes(config, itemsize)
    it, N = itemsize, s.E // 2
    led = Ledger(base)
    led.add("batch", batch_bytes(s), "batch")  # make_batch: Batcher.pairs
    led.mark("Batcher.pairs")
    if mode == "recompute":  # the reference's log-probs of this batch: the batch's weights made here
        logps = _nograd_pass(led, g, weights_made=False, tag="reference ", mark=True)
        led.relabel(logps, "batch")  # its two halves are the step's constants
    else:
        led.add("ref_chosen, ref_rejected (N,)", 2 * N * it, "batch")  # cache["c"][didx], cache["r"][didx]
    _forward(led, g, keep=True)
    led.mark("gpt_forward")
    if mode != "recompute":
        _weights(led, g)
    lp = _token_logps(led, g)
    led.add("logps (E,)", s.E * it, "workspace")
    led.mark("sequence_logps")  # (a phase ends at its function's return event, before its locals go)
    led.free(lp)
    led.mark("dpo_step_loss")
    led.add("dlp (M,)", s.M * it, "workspace")  # dlp = weights^T dlogps; dlogits is the logits' buffer
    led.mark("sequence_logps_backward")
    led.free("dlp (M,)")
    _backward(led, g, pb)
    led.mark("gpt_backward")
    led.drop("dx")
    led.mark("dpo_step (return)")
    led.free_kind("cache", "logits")  # dpo_step's caches, lse and the logits' buffer (dlogits) go
    led.free("logps (E,)")
    return led


def pass_ledger(config: GPTConfig, shapes: list[BatchShape], base: int, itemsize: int = 4,
                path: CodePath = CodePath(), chunked: bool = True) -> Ledger:
    """A no-gradient pass over batches of ``shapes``, replayed above ``base``: scoring.chunked_logps
    (``chunked``: batched_sequence_logps and evaluate_preferences; a chunk's batch goes when the
    next one is made) or train.reference_logps (the batch is batch_logps' argument only); each
    chunk's (E,) log-probs are kept (host views), then concatenated into chosen and rejected (N,)."""
    it = itemsize
    led = Ledger(base)
    kept = []
    prev = None
    for k, s in enumerate(shapes):
        g = _Geometry(config, s, it, path)
        b = led.add(f"batch {k}", batch_bytes(s), "batch")
        if prev is not None:
            led.free(*prev)
        kept.append(_nograd_pass(led, g, weights_made=False, tag=f"chunk {k} "))
        prev = (b, f"chunk {k} weights (E, M)")
        if not chunked:
            led.free(*prev)
            prev = None
    n = sum(s.E for s in shapes) // 2
    led.add("chosen, rejected (N,)", 2 * n * it, "state")
    led.free(*kept)
    if prev is not None:
        led.free(*prev)
    return led


def layer_cache_bytes(config: GPTConfig, s: BatchShape, itemsize: int = 4) -> dict[str, int]:
    """Bytes one transformer block leaves in gpt_forward's cache for a batch of shape ``s`` (what
    model.block_forward keeps alive for the backward): ln_1's output, mean and rstd; qkv (L <
    COPY_KV_T: kept whole by the k, v views) or the k, v copies (then qkv goes); q / sqrt(D);
    each query block's probabilities (R, H, nq, nk); the attention output; the residual after
    attention; ln_2's output, mean and rstd; c_fc's output and GELU's (R, L, 4C); the residual
    after the MLP (the next block's input; the last block's goes once its M rows are gathered)."""
    led = Ledger()
    _block_forward(led, _Geometry(config, s, itemsize, CodePath(fused=True)), True, "")
    return {k: nb for k, (nb, _) in led.live.items()}


def forward_cache_bytes(config: GPTConfig, s: BatchShape, itemsize: int = 4) -> int:
    """Bytes of gpt_forward's cache for a training step (the logits not included): the embedding
    output, the blocks, the M gathered rows, ln_f's output, mean and rstd."""
    led = Ledger()
    _forward(led, _Geometry(config, s, itemsize, CodePath(fused=True)), keep=True)
    return led.by_kind["cache"]


def _peak_of(led: Ledger, *phases: str) -> int:
    return max(p["peak_bytes"] for p in led.phases if not phases or p["phase"] in phases)


def analytic_breakdown(config: GPTConfig, steps: list[BatchShape], *, reference_batches: list[BatchShape] = (),
                       eval_batches: list[BatchShape] = (), eval_chunk: BatchShape | None = None,
                       n_train: int | None = None, itemsize: int = 4, path: CodePath = CodePath()) -> dict:
    """Where the memory of DPO training goes, from the shapes alone.

    Args:
        config: the model (P parameters, n_layer blocks, C, H, V).
        steps: the shape of each measured step's batch (step 1 first).
        reference_batches: the shapes of train.reference_logps' batches (the cached mode's
            reference pass over the training pairs); empty: no prediction for it.
        eval_batches: the shapes of the held-out chunks (batched_sequence_logps, chunks of
            eval_batch_size pairs); empty: no held-out pass.
        eval_chunk: the shape of one full held-out chunk, for train_dpo's passes on a large
            held-out set ("evaluation_pass_train_dpo"); default the largest of eval_batches.
        n_train: training pairs (the reference log-prob cache holds 2 n_train floats); default
            the pairs of reference_batches, else of step 1.
        itemsize: bytes per float (4 for float32).
        path: the code path's branches (:class:`CodePath`).

    Returns:
        dict with
          "bytes": {term: bytes} for step 1's batch: parameters, gradients, AdamW moments, the
              reference copy, the activation cache, the (M, V) logits (whose buffer becomes
              dlogits), the batch's arrays and weights, and at the step's peak the backward's
              workspace and the gradients alive then;
          "per_layer_bytes": {array: bytes} of one block's cache (step 1's batch);
          "backward_peak": {"where": the array made at the cached step's peak, "kinds": bytes by
              kind then, "workspace", "gradients"};
          "phases": {"cached", "recompute"}: step 1's predicted phases ({"phase", "peak_bytes",
              "end_bytes"}, the labels of the measured ones);
          "steps": per step {"shape", "cached", "recompute", "forward_side"} predicted peaks;
          "peaks": "cached" and "recompute" (the highest step), "cached_as_train_dpo" (train_dpo
              keeps the reference parameters: + P), "forward_side" (up to sequence_logps_backward,
              cached), "resident_cached" / "resident_recompute" (what a step starts from),
              "reference_pass" (params, moments and the reference alive), "eval_reference_pass",
              "evaluation_cached" / "evaluation_recompute" (the held-out evaluation), and
              "evaluation_pass_train_dpo" (one full held-out chunk with the reference kept);
          "shapes": the letters' values (step 1's batch).
    """
    if not steps:
        raise ValueError("analytic_breakdown needs the shape of at least one step's batch")
    it = itemsize
    pb = param_bytes(config, it)
    P = sum(pb.values())
    n_train = (sum(s.E for s in reference_batches) // 2 or steps[0].E // 2) if n_train is None else n_train
    n_eval = sum(s.E for s in eval_batches) // 2
    eval_cache = 2 * n_eval * it  # the held-out reference log-probs (host, the model's dtype)
    resident = {"cached": 3 * P + 2 * n_train * it + eval_cache,  # params, moments, the caches
                "recompute": 4 * P + eval_cache}  # params, moments, the reference kept
    per_step, ledgers = [], {}
    for k, s in enumerate(steps):
        row = {"shape": s.to_dict()}
        for mode in MODES:
            led = step_ledger(config, s, mode, resident[mode], it, path)
            row[mode] = led.peak
            if k == 0:
                ledgers[mode] = led
        row["forward_side"] = _peak_of(step_ledger(config, s, "cached", resident["cached"], it, path), "Batcher.pairs",
                                       "gpt_forward", "sequence_logps", "dpo_step_loss", "sequence_logps_backward")
        per_step.append(row)
    s0, cl = steps[0], ledgers["cached"]
    kinds = cl.peak_at[1]
    g0 = _Geometry(config, s0, it, path)
    weights_b = s0.E * s0.M * it
    terms = {
        "parameters": P,
        "gradients": P,
        "AdamW moments m, v": 2 * P,
        "reference parameters": P,
        "activation cache (embedding, blocks, ln_f)": forward_cache_bytes(config, s0, it),
        "logits (M,V)": s0.M * config.vocab_size * it,
        "lse (M,)": s0.M * it,
        "batch arrays (ids, layout, scored-token maps)": batch_bytes(s0),
        "batch weights (E,M)": weights_b,
        "backward workspace at the peak": kinds.get("workspace", 0),
        "gradients alive at the peak": kinds.get("grads", 0),
        "one no-gradient pass over the batch, above its state": 0,
    }
    nog = Ledger()
    _nograd_pass(nog, g0, weights_made=False)
    terms["one no-gradient pass over the batch, above its state"] = nog.peak
    peaks = {
        "cached": max(r["cached"] for r in per_step),
        "recompute": max(r["recompute"] for r in per_step),
        "forward_side": per_step[0]["forward_side"],
        "resident_cached": resident["cached"],
        "resident_recompute": resident["recompute"],
    }
    peaks["cached_as_train_dpo"] = peaks["cached"] + P
    if reference_batches:  # prepare(): after AdamW, with the reference alive
        peaks["reference_pass"] = pass_ledger(config, list(reference_batches), 4 * P, it, path, chunked=False).peak
    if eval_batches:
        peaks["eval_reference_pass"] = pass_ledger(config, list(eval_batches), 4 * P + 2 * n_train * it, it, path).peak
        peaks["evaluation_cached"] = pass_ledger(config, list(eval_batches), resident["cached"], it, path).peak
        peaks["evaluation_recompute"] = pass_ledger(config, list(eval_batches), resident["recompute"], it, path).peak
    chunk = eval_chunk or (max(eval_batches, key=lambda s: s.M * config.vocab_size + s.R * s.L)
                           if eval_batches else None)
    if chunk is not None:
        peaks["evaluation_pass_train_dpo"] = pass_ledger(config, [chunk], 4 * P, it, path).peak
    return {
        "bytes": terms,
        "per_layer_bytes": layer_cache_bytes(config, s0, it),
        "backward_peak": {"where": cl.peak_at[0], "kinds": kinds, "workspace": kinds.get("workspace", 0),
                          "gradients": kinds.get("grads", 0)},
        "phases": {mode: led.phases for mode, led in ledgers.items()},
        "steps": per_step,
        "eval_chunk": None if chunk is None else chunk.to_dict(),
        "peaks": peaks,
        "path": dataclasses.asdict(path),
        "shapes": {"N": s0.E // 2, "E": s0.E, "R": s0.R, "L": s0.L, "M": s0.M, "C": config.n_embd,
                   "V": config.vocab_size, "H": config.n_head, "D": config.head_size, "layers": config.n_layer,
                   "P": P // it, "itemsize": it, "blocks": [list(b) for b in s0.blocks], "causal": s0.causal,
                   "copy_kv": g0.copy_kv, "mkl_attention": g0.mkl_attention, "n_train": n_train, "n_eval": n_eval},
    }


def predicted_step_peak(config: GPTConfig, pairs: int, seq: int, layout: str, *, prompt: int | None = None,
                        mode: str = "cached", path: CodePath = CodePath(fused=True, gpu=True), seed: int = 0,
                        itemsize: int = 4, ragged: bool = False) -> int:
    """The predicted peak of a step on ``pairs`` synthetic pairs of ``seq`` tokens laid out as
    ``layout``, with params and moments (and, mode "as_train_dpo" or "recompute", the reference)."""
    prompt = default_prompt(seq) if prompt is None else prompt
    s = shape_of(layout_batcher(layout).pairs(synthetic_pairs(pairs, seq, prompt, config.vocab_size, seed, ragged)))
    P = sum(param_bytes(config, itemsize).values())
    base = (4 if mode in ("recompute", "as_train_dpo") else 3) * P + 2 * pairs * itemsize
    return step_ledger(config, s, "recompute" if mode == "recompute" else "cached", base, itemsize, path).peak


def predicted_eval_chunk_peak(config: GPTConfig, pairs: int, seq: int, layout: str, *, prompt: int | None = None,
                              path: CodePath = CodePath(fused=True, gpu=True), seed: int = 0, itemsize: int = 4,
                              ragged: bool = False) -> int:
    """The predicted peak of a held-out pass in chunks of ``pairs`` pairs, with params, moments
    and the reference alive (train_dpo keeps it)."""
    prompt = default_prompt(seq) if prompt is None else prompt
    s = shape_of(layout_batcher(layout).pairs(synthetic_pairs(pairs, seq, prompt, config.vocab_size, seed, ragged)))
    return pass_ledger(config, [s], 4 * sum(param_bytes(config, itemsize).values()), itemsize, path).peak


def max_pairs_that_fit(config: GPTConfig, seq: int, capacity_bytes: float, layout: str = DEFAULT_LAYOUT,
                       key: str = "cached", limit: int = 1024, path: CodePath = CodePath(fused=True, gpu=True),
                       prompt: int | None = None, ragged: bool = False, seed: int = 0) -> int:
    """Largest N <= ``limit`` whose predicted peak fits in ``capacity_bytes`` (0 if none): a
    step's ("cached", "as_train_dpo", "recompute": see :func:`predicted_step_peak`) or a held-out
    chunk's ("evaluation_pass_train_dpo": N is then eval_batch_size). The batches are the
    synthetic pairs' (of ``seed``), laid out by ``layout``; the peaks grow with N: gallop, then bisect."""
    def fits(n):
        kw = dict(prompt=prompt, path=path, ragged=ragged, seed=seed)
        if key == "evaluation_pass_train_dpo":
            peak = predicted_eval_chunk_peak(config, n, seq, layout, **kw)
        else:
            peak = predicted_step_peak(config, n, seq, layout, mode=key, **kw)
        return peak <= capacity_bytes

    if not fits(1):
        return 0
    lo = 1
    while lo < limit and fits(min(2 * lo, limit)):
        lo = min(2 * lo, limit)
    hi = min(2 * lo, limit) if lo < limit else limit
    while lo < hi:  # fits(lo), and not fits(hi) unless hi == limit == lo
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def default_prompt(seq: int) -> int:
    """The prompt length the script uses unless told: min(128, T // 4), at least 1."""
    return max(1, min(128, seq // 4))


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
    Batcher.pairs: "Batcher.pairs",
    reference_logps: "reference_logps",
    batched_sequence_logps: "batched_sequence_logps",
    batch_logps: "batch_logps",
    gpt_forward: "gpt_forward",
    sequence_logps: "sequence_logps",
    dpo_step_loss: "dpo_step_loss",
    sequence_logps_backward: "sequence_logps_backward",
    gpt_backward: "gpt_backward",
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
# one mode: train_dpo's lines, measured
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """What one measurement runs (see :func:`measure`)."""

    config: GPTConfig
    pairs: int
    seq: int
    prompt: int
    steps: int
    train_pairs: int
    eval_pairs: int
    eval_batch_pairs: int
    seed: int
    layout: str = DEFAULT_LAYOUT
    ragged: bool = False

    def train_config(self, mode: str) -> TrainConfig:
        """train_dpo's TrainConfig for ``mode``: batch_size N, the layout's share_prompt and pack."""
        return TrainConfig(steps=self.steps, batch_size=self.pairs, eval_batch_size=self.eval_batch_pairs,
                           cache_reference=mode == "cached", seed=self.seed, progress=False, **LAYOUTS[self.layout])

    def training_pairs(self) -> list[TokenizedPair]:
        return synthetic_pairs(self.train_pairs, self.seq, self.prompt, self.config.vocab_size, self.seed, self.ragged)

    def held_out_pairs(self, n: int | None = None) -> list[TokenizedPair]:
        return synthetic_pairs(self.eval_pairs if n is None else n, self.seq, self.prompt, self.config.vocab_size,
                               self.seed + 1, self.ragged)


def _nbytes(tree: dict) -> int:
    return int(sum(a.nbytes for a in tree.values()))


def run_mode(mode: str, spec: RunSpec, backend: Backend, meter) -> dict:
    """Measure ``spec.steps`` training steps in ``mode`` ('cached' or 'recompute').

    The lines follow minidpo.train (mirrored, not imported: _run_loop also writes checkpoints and
    logs, which are not part of a step):

        _run_loop   AdamW (make_optimizer on one process), then train_dpo's prepare():
                    [cached] reference_logps over the training pairs (the first epoch's batches);
                    batched_sequence_logps over the held-out pairs (chunks of eval_batch_size);
                    the held-out evaluation at step 0 (evaluate_preferences)
        _train_step make_batch(batch_for_step(...)) (train_dpo's: Batcher.pairs, the cached
                    reference log-probs or [recompute] batch_logps of the reference), step_fn
                    (dpo_step, all_reduce_step), clip_grad_norm, lr_at, AdamW.step, then
                    ``del grads, batch``; after the last step the held-out evaluation

    In the cached mode the reference parameters are dropped once both caches are built (what
    caching allows; train_dpo keeps them).
    """
    from minidpo.distributed import SingleProcess, all_reduce_step, local_shard

    cfg = spec.config
    tc = spec.train_config(mode)
    pairs, eval_pairs = spec.training_pairs(), spec.held_out_pairs()
    comm = SingleProcess()
    gc.collect()
    rss_reset = reset_peak_rss()
    meter.start()
    try:
        rec = PhaseRecorder(meter)
        out: dict = {"mode": mode}
        xp = backend.xp
        with rec:
            rec.stage = "setup"
            batcher = batcher_for(tc, PAD_ID, backend)
            policy = init_params(cfg, backend, seed=spec.seed)
            reference = {k: v.copy() for k, v in policy.items()}  # DPO starts at pi = pi_ref
            rec.mark("parameters")
            opt = AdamW(policy, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
            rec.mark("AdamW moments")
            cache: dict = {}
            if tc.cache_reference:  # prepare(): log pi_ref of every training pair, once
                rec.stage = "reference cache pass"
                c, r = reference_logps(reference, cfg, pairs, batcher.pairs, tc, comm)  # (N,), (N,) host
                cache["c"], cache["r"] = backend.asarray(c, dtype=c.dtype), backend.asarray(r, dtype=r.dtype)
                out["reference_pass_peak_bytes"] = rec.peak_of("reference cache pass")
            if eval_pairs:  # prepare(): log pi_ref of every held-out pair, in either mode
                rec.stage = "held-out reference pass"
                cache["eval"] = batched_sequence_logps(reference, cfg, eval_pairs, batcher, tc.eval_batch_size,
                                                       comm=comm)  # (E,), (E,) host
                out["eval_reference_pass_peak_bytes"] = rec.peak_of("held-out reference pass")
            out["reference_params_bytes"] = _nbytes(reference) if mode == "recompute" else 0
            if tc.cache_reference:
                del reference  # what caching allows (train_dpo keeps it: see the report)
                rec.stage = "reference dropped"
                rec.mark("del reference")

            def make_batch(idx):  # train_dpo's make_batch
                idx, weight = local_shard(idx, comm)
                batch = batcher.pairs([pairs[i] for i in idx])
                if tc.cache_reference:
                    didx = backend.asarray(idx)
                    ref = cache["c"][didx], cache["r"][didx]
                else:
                    logps, _ = batch_logps(reference, cfg, batch)
                    ref = logps[: len(idx)], logps[len(idx):]
                return batch, ref, weight

            def step_fn(p, step_batch):  # train_dpo's step_fn
                batch, (ref_c, ref_r), weight = step_batch
                loss, metrics, grads = dpo_step(p, cfg, batch, ref_c, ref_r, tc)
                loss, metrics = all_reduce_step(comm, loss, metrics, grads, weight)
                return loss, metrics, grads

            if eval_pairs:  # _run_loop: the starting point's evaluation
                rec.stage = "held-out evaluation at step 0"
                evaluate_preferences(policy, cfg, eval_pairs, *cache["eval"], batcher, tc, comm=comm)
                out["evaluation_start_peak_bytes"] = rec.peak_of("held-out evaluation at step 0")
            out["resident_before_step_bytes"] = meter.current()
            steps = []
            for step in range(spec.steps):
                backend.synchronize()
                t0 = time.perf_counter()
                rec.stage = f"step {step + 1}"
                # _train_step
                batch = make_batch(batch_for_step(step, len(pairs), tc.batch_size, tc.seed))
                loss, metrics, grads = step_fn(policy, batch)
                gnorm = clip_grad_norm(grads, tc.grad_clip if tc.grad_clip > 0 else math.inf)
                lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
                opt.step(policy, grads, lr=lr)
                out["grads_bytes"] = _nbytes(grads)
                del grads, batch  # as _train_step: freed before the next step's forward
                finite = bool(xp.isfinite(loss)) and bool(xp.isfinite(gnorm))
                backend.synchronize()
                wall = time.perf_counter() - t0
                rec.mark("step done")
                steps.append({"peak_bytes": rec.peak_of(f"step {step + 1}"), "wall_s": wall,
                              "loss": float(to_numpy(loss)), "finite": finite})
            if eval_pairs:  # _run_loop after the last step: eval_fn(params)
                rec.stage = "held-out evaluation"
                ev = evaluate_preferences(policy, cfg, eval_pairs, *cache["eval"], batcher, tc, comm=comm)
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


def _int_in(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {rng}, got {v!r}")
    return int(v)


def run_shapes(spec: RunSpec) -> dict:
    """The shapes of the batches a run of ``spec`` lays out (host packing only, nothing on the
    device): each step's, reference_logps' and the held-out chunks'."""
    batcher = layout_batcher(spec.layout)
    pairs, eval_pairs = spec.training_pairs(), spec.held_out_pairs()
    n = len(pairs)

    def shape(idx):
        return shape_of(batcher.pairs([pairs[i] for i in idx]))

    return {
        "steps": [shape(batch_for_step(k, n, spec.pairs, spec.seed)) for k in range(spec.steps)],
        "reference": [shape(idx) for idx in reference_pass_batches(n, spec.pairs, spec.seed)],
        "eval": shapes_of_chunks(eval_pairs, batcher, spec.eval_batch_pairs) if eval_pairs else [],
        "eval_chunk": shape_of(batcher.pairs(spec.held_out_pairs(spec.eval_batch_pairs))),
    }


def measure(config: GPTConfig, pairs: int = 8, seq: int = 512, *, prompt: int | None = None, device: str = "cpu",
            steps: int = 2, train_pairs: int | None = None, layout: str = DEFAULT_LAYOUT, modes=MODES, seed: int = 0,
            eval_batch_pairs: int | None = None, eval_pairs: int | None = None, ragged: bool = False) -> dict:
    """Measure the peak memory of DPO training in each mode, and predict it from the shapes.

    Args:
        config: the model (GPTConfig.gpt2_small() for GPT-2 small).
        pairs: N preference pairs per step (TrainConfig.batch_size).
        seq: T: every [x | y_w] has exactly T tokens, every [x | y_l] fewer (synthetic_pairs).
        prompt: prompt tokens per pair (default min(128, T // 4), at least 1).
        device: 'cpu' (tracemalloc) or 'cuda[:N]' (CuPy memory hook).
        steps: training steps per mode; each step's peak is predicted from its own batch.
        train_pairs: training pairs (default 2N: reference_logps then runs two batches, and steps
            1 and 2 train on different batches, as an epoch does).
        layout: 'shared_packed' (train_dpo's default) or 'padded'.
        modes: a subset of ('cached', 'recompute').
        seed: parameters, tokens and the batch order.
        eval_batch_pairs: chunk size of the held-out passes, train_dpo's eval_batch_size (default
            TrainConfig().eval_batch_size).
        eval_pairs: held-out pairs (default eval_batch_pairs: one full chunk); 0 measures no
            held-out pass.
        ragged: pairs of random lengths (see :func:`synthetic_pairs`).

    Returns:
        {"config", "machine", "code", "meter", "analytic" (see :func:`analytic_breakdown`),
         "measured": {mode: {...}}} with byte counts; each mode has state_bytes (params + grads
         + moments [+ reference]), step1_peak_bytes, peak_bytes (over all steps),
         activation_peak_bytes (step 1 peak - state), resident_before_step_bytes,
         process_peak_rss_bytes, per-step peaks and wall times, and the phase table; the cached
         mode also reference_pass_peak_bytes; with held-out pairs, eval_reference_pass_peak_bytes,
         evaluation_start_peak_bytes and evaluation_peak_bytes.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    pairs, steps = _int_in("pairs", pairs, 1), _int_in("steps", steps, 1)
    seq = _int_in("seq", seq, 2)
    if seq > config.n_ctx:
        raise ValueError(f"seq={seq} exceeds the model's n_ctx={config.n_ctx}")
    prompt = _int_in("prompt", default_prompt(seq) if prompt is None else prompt, 1, seq - 1)
    train_pairs = _int_in("train_pairs", 2 * pairs if train_pairs is None else train_pairs, pairs)
    eval_batch_pairs = _int_in("eval_batch_pairs", TrainConfig().eval_batch_size
                               if eval_batch_pairs is None else eval_batch_pairs, 1)
    eval_pairs = _int_in("eval_pairs", eval_batch_pairs if eval_pairs is None else eval_pairs, 0)
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES} without repeats, got {modes}")

    code = code_info()  # before the run: the tree may change while it runs
    backend = Backend(device)
    meter = TracemallocMeter() if not backend.is_cuda else CupyPoolMeter()
    spec = RunSpec(config, pairs, seq, prompt, steps, train_pairs, eval_pairs, eval_batch_pairs, seed, layout,
                   bool(ragged))
    # one unmeasured step first: the modules a step imports on first use, the compiled CPU
    # kernels' first load and fast.py's per-shape caches (zero rows, masks) are then not counted
    run_mode(modes[0], dataclasses.replace(spec, steps=1), backend, meter)
    gc.collect()
    measured = {}
    for mode in modes:
        measured[mode] = run_mode(mode, spec, backend, meter)
        gc.collect()  # the mode's arrays are gone before the next one starts
    shapes = run_shapes(spec)
    analytic = analytic_breakdown(config, shapes["steps"], reference_batches=shapes["reference"],
                                  eval_batches=shapes["eval"], eval_chunk=shapes["eval_chunk"],
                                  n_train=train_pairs, path=CodePath.of(backend))
    return {
        "config": {"model": config.to_dict(), "pairs": pairs, "seq": seq, "prompt": prompt, "layout": layout,
                   "ragged": bool(ragged),
                   "steps": steps, "train_pairs": train_pairs, "eval_pairs": eval_pairs,
                   "eval_batch_pairs": eval_batch_pairs, "device": backend.device, "dtype": "float32",
                   "seed": seed, "num_params": analytic["shapes"]["P"], "threads": runtime.get_threads()},
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


def aligned_phases(measured: list[dict], predicted: list[dict], stage: str = "step 1") -> list[dict]:
    """Step ``stage``'s measured phases next to the predicted ones: each predicted phase matched
    to the next measured phase of its name, its measured peak the highest since the previous
    match (a measured phase the ledger does not mark, such as the reference's gpt_forward inside
    batch_logps, folds into the next one). Returns [{"phase", "measured_peak", "measured_end",
    "predicted_peak", "predicted_end"}]."""
    ph = [p for p in measured if p["stage"] == stage]
    out, i = [], 0
    for q in predicted:
        j = next((k for k in range(i, len(ph)) if ph[k]["phase"] == q["phase"]), None)
        if j is None:
            continue
        out.append({"phase": q["phase"], "measured_peak": max(p["peak_bytes"] for p in ph[i:j + 1]),
                    "measured_end": ph[j]["end_bytes"], "predicted_peak": q["peak_bytes"],
                    "predicted_end": q["end_bytes"]})
        i = j + 1
    return out


def comparisons(res: dict) -> list[tuple[str, str, int, int]]:
    """Every measured peak with its prediction: [(mode, what, measured, predicted)]."""
    a, out = res["analytic"], []
    pk = a["peaks"]
    for mode, r in res["measured"].items():
        out.append((mode, "resident before step 1", r["resident_before_step_bytes"], pk["resident_" + mode]))
        for k, s in enumerate(r["steps"]):
            out.append((mode, f"step {k + 1} peak", s["peak_bytes"], a["steps"][k][mode]))
        for key, what, want in (("reference_pass_peak_bytes", "reference cache pass", "reference_pass"),
                                ("eval_reference_pass_peak_bytes", "held-out reference pass", "eval_reference_pass"),
                                ("evaluation_start_peak_bytes", "held-out evaluation at step 0", "evaluation_" + mode),
                                ("evaluation_peak_bytes", "held-out evaluation after the last step",
                                 "evaluation_" + mode)):
            if key in r:
                out.append((mode, what, r[key], pk[want]))
        for p in aligned_phases(r["phases"], a["phases"][mode]):
            out.append((mode, f"step 1 phase {p['phase']}", p["measured_peak"], p["predicted_peak"]))
    return out


def format_report(res: dict, gpu_gb: float = 80.0) -> str:
    """The analytic breakdown, the measurements and their comparison, as text."""
    c, a, m = res["config"], res["analytic"], res["measured"]
    s, t, pk, bw = a["shapes"], a["bytes"], a["peaks"], a["backward_peak"]
    mc, mach, code = c["model"], res["machine"], res.get("code", {})
    div, unit = _unit(max(pk["recompute"], pk["cached"]))

    def num(b, width=10):
        return f"{'-':>{width}}" if b is None else f"{b / div:{width}.3f}"

    path = a["path"]
    lines = [
        f"DPO memory: GPT-2 n_layer={mc['n_layer']} C={mc['n_embd']} H={mc['n_head']} V={mc['vocab_size']} "
        f"(P = {s['P']:,} parameters), layout {c['layout']}, {c['pairs']} pairs a step of T = {c['seq']} tokens "
        f"(prompt {c['prompt']}), {c['train_pairs']} training pairs, float32, {c['device']}",
        f"machine: {mach['cpu']} ({mach['cpu_count']} cores, {(mach['ram_bytes'] or 0) / 1e9:.1f} GB RAM), "
        f"numpy {mach['numpy']} ({'; '.join(mach.get('blas') or ['BLAS unknown'])}), python {mach['python']}"
        + (f"; {mach['gpu']}, cupy {mach['cupy']}" if "gpu" in mach else ""),
        f"code: commit {(code.get('commit') or 'unknown')[:12]}, minidpo/ last changed in "
        f"{(code.get('minidpo_last_commit') or 'unknown')[:12]}"
        + (" (and modified since)" if code.get("minidpo_modified") else ""),
        f"meter: {res['meter']}; fused kernels {'on' if path['fused'] else 'off'}, MKL's GEMM "
        f"{'on' if path['mkl'] else 'off'}, {c.get('threads', 1)} thread(s); sizes in {unit} (1 GB = 1e9 bytes)",
        "",
        f"Step 1's batch: R={s['R']} rows x L={s['L']} ({'causal' if s['causal'] else 'packed'} layout), "
        f"M={s['M']} scored tokens, E={s['E']} examples; query blocks (i0, i1, k0): "
        + " ".join(f"({i0},{i1},{k0})" for i0, i1, k0 in s["blocks"])
        + f"; k, v {'copied' if s['copy_kv'] else 'views of qkv'}; attention backward through "
          f"{'MKL' if s['mkl_attention'] else 'matmul'}",
        "",
        f"Analytic breakdown from the shapes (step 1's batch), {unit}",
    ]
    for label in ("parameters", "gradients", "AdamW moments m, v", "reference parameters",
                  "activation cache (embedding, blocks, ln_f)"):
        lines.append(f"  {label:<62}{num(t[label])}")
    lines.append(f"    {'one block:':<60}{num(sum(a['per_layer_bytes'].values()))}")
    for label, b in a["per_layer_bytes"].items():
        lines.append(f"      {label:<58}{num(b)}")
    batch_arrays = "batch arrays (ids, layout, scored-token maps)"
    for label, key in (("logits (M,V); the same buffer becomes dlogits", "logits (M,V)"),
                       ("lse (M,)", "lse (M,)"),
                       (batch_arrays, batch_arrays),
                       ("batch weights (E,M)", "batch weights (E,M)"),
                       ("backward workspace at the cached step's peak", "backward workspace at the peak"),
                       ("gradients alive then", "gradients alive at the peak"),
                       ("one no-gradient pass over the batch, above its state",
                        "one no-gradient pass over the batch, above its state")):
        lines.append(f"  {label:<62}{num(t[key])}")
    lines.append(f"  (the cached step peaks as {bw['where']!r} is made)")

    lines += ["", f"Predicted peaks, {unit}"]
    predicted = [
        ("cached step, the highest of the measured steps", "cached"),
        ("  its forward side (up to sequence_logps_backward), step 1", "forward_side"),
        ("cached step as train_dpo runs it (+ reference kept)", "cached_as_train_dpo"),
        ("recompute step (+ reference parameters and its forward)", "recompute"),
        ("reference cache pass (params, moments, reference)", "reference_pass"),
        ("held-out reference pass", "eval_reference_pass"),
        ("held-out evaluation, cached mode", "evaluation_cached"),
        ("held-out evaluation, recompute mode", "evaluation_recompute"),
        (f"train_dpo's held-out chunk of {c['eval_batch_pairs']} pairs (reference kept)", "evaluation_pass_train_dpo"),
    ]
    for label, key in predicted:
        if key in pk:
            lines.append(f"  {label:<62}{num(pk[key])}")

    modes = list(m)
    lines += ["", f"Measured and predicted, {unit}",
              f"  {'':<50}" + "".join(f"{mode:>12}{'predicted':>12}" for mode in modes)]
    table: dict[str, dict] = {}
    for mode, what, got, want in comparisons(res):
        if not what.startswith("step 1 phase"):
            table.setdefault(what, {})[mode] = (got, want)
    for what, row in table.items():
        cells = "".join(num(row[x][0], 12) + num(row[x][1], 12) if x in row else f"{'-':>12}{'-':>12}"
                        for x in modes)
        lines.append(f"  {what:<50}{cells}")
    for label, key in (("state: params + grads + moments (+ reference)", "state_bytes"),
                       ("activation peak = step 1 peak - state", "activation_peak_bytes"),
                       ("process peak RSS", "process_peak_rss_bytes")):
        lines.append(f"  {label:<50}" + "".join(num(m[x][key], 12) + f"{'':>12}" for x in modes))
    if any(r["meter_extra"] for r in m.values()):
        for label, key in (("CuPy pool reserved at the end", "pool_reserved_bytes"),
                           ("device memory used, max at phase ends", "device_used_max_bytes")):
            lines.append(f"  {label:<50}" + "".join(num(m[x]["meter_extra"].get(key), 12) + f"{'':>12}"
                                                    for x in modes))
    lines.append(f"  {'step 1 wall time, s':<50}" + "".join(f"{m[x]['steps'][0]['wall_s']:12.1f}{'':>12}"
                                                             for x in modes))
    lines.append(f"  (process RSS: {m[modes[0]]['process_peak_rss_what']})")

    for mode in modes:
        lines += ["", f"Step 1 of the {mode} mode, phase by phase ({unit}: peak during the phase, live at its end; "
                      f"measured, then predicted)"]
        for p in aligned_phases(m[mode]["phases"], a["phases"][mode]):
            lines.append(f"  {p['phase']:<26}{num(p['measured_peak'])}{num(p['measured_end'])}"
                         f"{num(p['predicted_peak'])}{num(p['predicted_end'])}")
        rest = [p for p in m[mode]["phases"] if p["stage"] == "step 1"][-3:]
        for p in rest:
            if p["phase"] in ("clip_grad_norm", "AdamW.step", "step done"):
                lines.append(f"  {p['phase']:<26}{num(p['peak_bytes'])}{num(p['end_bytes'])}")

    cap = gpu_gb * 1e9
    cfg = GPTConfig(**mc)
    gpu = CodePath(fused=True, gpu=True)
    P = s["P"] * s["itemsize"]
    step1 = BatchShape.from_dict(a["steps"][0]["shape"])  # the measured batches, on CuPy's path
    g_c = step_ledger(cfg, step1, "cached", pk["resident_cached"], s["itemsize"], gpu).peak
    g_t = g_c + P
    chunk = a.get("eval_chunk")
    g_e = None if chunk is None else pass_ledger(cfg, [BatchShape.from_dict(chunk)], 4 * P, s["itemsize"], gpu).peak

    def verdict(b):
        return "fits" if b <= cap else "does NOT fit"

    def most(key):
        n = max_pairs_that_fit(cfg, c["seq"], cap, c["layout"], key, prompt=c["prompt"], ragged=c.get("ragged", False),
                               seed=c["seed"] + (key == "evaluation_pass_train_dpo"))
        return f"{n}+" if n == 1024 else str(n)

    lines += [
        "",
        f"Predicted for a GPU with {gpu_gb:g} GB (CuPy: the same arrays; its fused kernels keep no NumPy "
        f"temporaries; CUDA context, cuBLAS workspace and pool rounding not counted), {c['layout']} layout",
        f"  training step 1 ({c['pairs']} pairs): {g_c / 1e9:.2f} GB cached, {g_t / 1e9:.2f} GB as train_dpo runs it: "
        f"{verdict(g_t)}; at T={c['seq']} up to {most('cached')} pairs (cached) / {most('as_train_dpo')} "
        f"(as train_dpo) fit",
    ]
    if g_e is not None:
        lines.append(f"  held-out chunk of {c['eval_batch_pairs']} pairs with the reference kept: {g_e / 1e9:.2f} GB, "
                     f"{verdict(g_e)}; chunks of up to {most('evaluation_pass_train_dpo')} pairs fit")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--layout", default=DEFAULT_LAYOUT, choices=tuple(LAYOUTS),
                    help="the batches' layout (default: train_dpo's, shared prompts in packed rows)")
    ap.add_argument("--pairs", type=int, default=8, help="N preference pairs per step")
    ap.add_argument("--seq", type=int, default=512, help="T: tokens of every [x | y_w] (rejected ones are shorter)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per pair (default min(128, T/4))")
    ap.add_argument("--ragged", action="store_true",
                    help="random lengths (prompts up to --prompt, responses up to T - prompt): packed rows then "
                         "hold several sequences")
    ap.add_argument("--train-pairs", type=int, default=None,
                    help="training pairs (default 2N: a reference pass of two batches, a new batch each step)")
    ap.add_argument("--n-layer", type=int, default=None, help="layers (default GPT-2 small's 12)")
    ap.add_argument("--n-embd", type=int, default=None, help="channels C (default 768)")
    ap.add_argument("--n-head", type=int, default=None, help="heads H (default 12)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary V (default 50257)")
    ap.add_argument("--n-ctx", type=int, default=None, help="context length (default 1024)")
    ap.add_argument("--steps", type=int, default=2, help="steps per mode (each predicted from its own batch)")
    ap.add_argument("--modes", default=",".join(MODES), help="cached, recompute or both")
    ap.add_argument("--eval-batch-pairs", type=int, default=None,
                    help="chunk size of the held-out passes, train_dpo's eval_batch_size (default TrainConfig's)")
    ap.add_argument("--eval-pairs", type=int, default=None,
                    help="held-out pairs measured through the reference pass and the two evaluations "
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
                      train_pairs=args.train_pairs, layout=args.layout, modes=modes, seed=args.seed,
                      eval_batch_pairs=args.eval_batch_pairs, eval_pairs=args.eval_pairs, ragged=args.ragged)
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
