"""minidpo's DPO training step against the same step in PyTorch: one process, one run, A B A B.

What is timed (one "step", both implementations, the same numbers in and out):

    [reference]  log pi_ref(y|x) of the 2N rows by the frozen reference model  (full step only)
    forward      policy logits of the concatenated batch [chosen; rejected]    (2N, T, V)
    logps_loss   summed response log-probs (2N,) and the sigmoid DPO loss, eq. (7)
    backward     d loss / d every parameter (log-softmax backward, eq. (9), the model's backward)
    optimizer    global-norm gradient clipping + AdamW

minidpo runs minidpo.train.dpo_step's calls (gpt_forward -> sequence_logps -> dpo_loss ->
sequence_logps_backward -> gpt_backward -> clip_grad_norm -> AdamW.step); PyTorch runs
bench/torch_reference.TorchDPOStep (autograd, torch.optim.AdamW, clip_grad_norm_). Two rows per
(config, device, mode): ``full`` (the reference forward inside the step) and ``cached_ref``
(reference log-probs computed once before training, minidpo's default).

Before any time is printed, a correctness gate runs one step of each from the same parameters
and the same batch and requires the loss, the policy log-probs, every gradient, the gradient
norm and every parameter after the AdamW update to agree (fp32; rtol 1e-4, atol scaled to each
tensor); it also requires minidpo.train.dpo_step itself to give what the benchmarked step
gives. A failing gate prints the worst mismatches and exits with status 1.

    python bench/bench_step.py                          # CPU, C0 and C1 (a few minutes on 2 cores)
    python bench/bench_step.py --configs C0 --steps 50 --threads 2
    python bench/bench_step.py --device cuda --configs C0,C1,C2 --mode tf32

Shape letters: N preference pairs, B = 2N rows, T time, C channels, V vocabulary, L layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

PHASES = ("reference", "forward", "logps_loss", "backward", "optimizer")
RESULTS_DIR = ROOT / "bench" / "results"


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark shape: a GPT-2 of n_layer/n_embd/n_head on batches of ``pairs`` preference
    pairs (2 * pairs rows) of T tokens, vocabulary V.

    cpu_steps / cpu_warmup: the default step counts on a CPU when --steps / --warmup are not
    given (C1 is slow on a small CPU); None means the global defaults.
    """

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    T: int
    vocab: int
    pairs: int
    gpu_only: bool = False
    cpu_steps: int | None = None
    cpu_warmup: int | None = None
    # long-prompt (HH-style) batches: each pair draws its prompt length from prompt_range and each
    # response's from response_range (inclusive); None: make_batch's random fill of T
    prompt_range: tuple[int, int] | None = None
    response_range: tuple[int, int] | None = None

    @property
    def rows(self) -> int:
        """B = 2N."""
        return 2 * self.pairs

    @property
    def tokens(self) -> int:
        """Tokens the policy processes per step, B * T."""
        return self.rows * self.T

    def model_config(self):
        from minidpo.model import GPTConfig

        return GPTConfig(vocab_size=self.vocab, n_ctx=self.T, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd)


CONFIGS = {
    "C0": BenchConfig("C0", n_layer=4, n_embd=128, n_head=4, T=64, vocab=512, pairs=16),
    "C1": BenchConfig("C1", n_layer=6, n_embd=384, n_head=6, T=256, vocab=8192, pairs=16, cpu_steps=6, cpu_warmup=1),
    "C2": BenchConfig("C2", n_layer=12, n_embd=768, n_head=12, T=512, vocab=50257, pairs=8, gpu_only=True),
    # long prompts, shorter responses of varied lengths (HH-style): C1's model, prompts of 64-192
    # tokens, each response 8-64; the padded batch is as long as its longest prompt + response
    "LP": BenchConfig("LP", n_layer=6, n_embd=384, n_head=6, T=256, vocab=8192, pairs=16, cpu_steps=5, cpu_warmup=1,
                      prompt_range=(64, 192), response_range=(8, 64)),
    # a few-millisecond shape for the tests (not in the default list)
    "micro": BenchConfig("micro", n_layer=2, n_embd=32, n_head=2, T=16, vocab=64, pairs=2),
    "micro-lp": BenchConfig("micro-lp", n_layer=2, n_embd=32, n_head=2, T=16, vocab=64, pairs=3,
                            prompt_range=(1, 8), response_range=(1, 8)),
}
DEFAULT_STEPS, DEFAULT_WARMUP = 20, 2
HPARAMS = dict(beta=0.1, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=1.0)


def flops_per_token(cfg: BenchConfig, n_params: int) -> dict:
    """llm.c's estimate (train_gpt2.cu, gpt2_estimate_mfu): 6 N + 6 L C T FLOPs per token for a
    forward+backward (6 N for the weight matmuls, the tied wte counted once and used as the
    classifier; 6 L C T for causal attention). A forward alone is a third of it."""
    fwd_bwd = 6 * n_params + 6 * cfg.n_layer * cfg.n_embd * cfg.T
    return {"fwd_bwd": fwd_bwd, "fwd": fwd_bwd // 3}


def step_flops(cfg: BenchConfig, n_params: int, variant: str) -> int:
    """FLOPs of one step: the policy's forward+backward on B*T tokens, plus the reference's
    forward on the same tokens when it runs inside the step."""
    f = flops_per_token(cfg, n_params)
    per_token = f["fwd_bwd"] + (f["fwd"] if variant == "full" else 0)
    return per_token * cfg.tokens


def make_batch(cfg: BenchConfig, seed: int = 0):
    """A right-padded preference batch of random tokens, as minidpo.data.collate_preferences
    lays one out: rows [chosen; rejected], pair i's two rows share a prompt.

    Returns:
        input_ids: (2N, T) int64, 0 = pad; loss_mask: (2N, T) bool over response tokens.
    """
    if cfg.prompt_range is not None:
        from minidpo.data import right_pad

        pairs = make_pairs(cfg, seed)
        return right_pad([p.prompt_ids for p in pairs] * 2,
                         [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], 0)
    rng = np.random.default_rng(seed)
    N, T, V = cfg.pairs, cfg.T, cfg.vocab
    ids = np.zeros((2 * N, T), dtype=np.int64)
    mask = np.zeros((2 * N, T), dtype=bool)
    for i in range(N):
        lp = int(rng.integers(max(1, T // 8), max(2, T // 2)))  # prompt length
        prompt = rng.integers(1, V, lp)
        for row in (i, N + i):
            lr = int(rng.integers(max(1, (T - lp) // 2), T - lp + 1))  # response length >= 1
            ids[row, :lp] = prompt
            ids[row, lp:lp + lr] = rng.integers(1, V, lr)
            mask[row, lp:lp + lr] = True
    return ids, mask


def make_pairs(cfg: BenchConfig, seed: int = 0) -> list:
    """N tokenized pairs of a long-prompt config (minidpo.data.TokenizedPair, random token ids
    1..V-1): prompt length uniform in cfg.prompt_range, each response's in cfg.response_range."""
    from minidpo.data import TokenizedPair

    rng = np.random.default_rng(seed)
    (p0, p1), (r0, r1) = cfg.prompt_range, cfg.response_range
    if p1 + r1 > cfg.T:
        raise ValueError(f"{cfg.name}: prompt_range + response_range exceed T={cfg.T}")
    out = []
    for _ in range(cfg.pairs):
        P, C, R = int(rng.integers(p0, p1 + 1)), int(rng.integers(r0, r1 + 1)), int(rng.integers(r0, r1 + 1))
        out.append(TokenizedPair(rng.integers(1, cfg.vocab, P).tolist(), rng.integers(1, cfg.vocab, C).tolist(),
                                 rng.integers(1, cfg.vocab, R).tolist()))
    return out


# ---------------------------------------------------------------------------------------------
# device helpers: synchronisation, timing clock, peak memory
# ---------------------------------------------------------------------------------------------


class Device:
    """The pieces of the run that depend on CPU vs CUDA: array module, syncs, memory."""

    def __init__(self, kind: str, mode: str, kernels: bool = True):
        import torch

        self.kind, self.mode = kind, mode
        self.kernels = kernels and kind == "cuda"  # the fused kernels only exist on CuPy
        self.torch = torch
        if kind == "cuda":
            if mode == "tf32":
                os.environ["CUPY_TF32"] = "1"  # read by CuPy the first time it picks a compute type
            from minidpo.backend import Backend

            self.backend = Backend("cuda")
            self.xp = self.backend.xp
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: torch sees no CUDA device (is a CUDA build of torch installed?)")
            self.torch_device = torch.device("cuda")
            torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
            torch.backends.cudnn.allow_tf32 = mode == "tf32"
            if mode == "tf32" and os.environ.get("CUPY_TF32") != "1":
                raise SystemExit("tf32 mode needs CUPY_TF32=1")
        else:
            if mode != "fp32":
                raise SystemExit(f"--device cpu runs fp32 only, got --mode {mode}")
            self.backend = None
            self.xp = np
            self.torch_device = torch.device("cpu")

    def asarray(self, a):
        return a if self.xp is np else self.xp.asarray(a)

    def sync(self):
        if self.kind == "cuda":
            self.xp.cuda.get_current_stream().synchronize()
            self.torch.cuda.synchronize()

    def name(self) -> str:
        if self.kind == "cuda":
            return self.torch.cuda.get_device_name(0)
        return cpu_model()

    # ---- peak memory of one call, above what was in use before it
    def peak_memory_mb(self, fn, impl: str):
        """(peak MB above the start, method) for running ``fn()`` once."""
        self.sync()
        if self.kind == "cuda":
            if impl == "minidpo":
                pool = self.xp.get_default_memory_pool()
                pool.free_all_blocks()
                before = pool.used_bytes()
                fn()
                self.sync()
                # the pool keeps every block it had to allocate: its size after the call is the
                # high-water mark of live arrays (plus rounding and fragmentation)
                return (pool.total_bytes() - before) / 2**20, "cupy memory pool size"
            t = self.torch
            t.cuda.empty_cache()
            before = t.cuda.memory_allocated()
            t.cuda.reset_peak_memory_stats()
            fn()
            self.sync()
            return (t.cuda.max_memory_allocated() - before) / 2**20, "torch.cuda.max_memory_allocated"
        return _rss_peak_mb(fn)


def _read_status_kb(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _malloc_trim():
    """glibc keeps freed small blocks in its heap (resident); malloc_trim(0) returns them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_peak_mb(fn):
    """Peak resident memory during ``fn()`` above the resident memory before it, for both
    implementations alike: Linux's VmHWM (peak RSS) is reset to the current RSS by writing 5 to
    /proc/self/clear_refs. Elsewhere, tracemalloc (which sees NumPy's buffers, not torch's)."""
    gc.collect()
    _malloc_trim()  # hand freed heap pages back, so the baseline is what is live now
    rss0 = _read_status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        ok = rss0 is not None
    except OSError:
        ok = False
    if ok:
        fn()
        return (_read_status_kb("VmHWM") - rss0) / 1024, "peak RSS (VmHWM reset) above start"
    import tracemalloc

    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, "tracemalloc peak (NumPy buffers only)"


class Clock:
    """Phase times of one step. With ``sync_each`` the device is synchronised at every mark (a
    no-op on the CPU); otherwise only ``total`` is meaningful."""

    def __init__(self, device: Device, sync_each: bool):
        self.device, self.sync_each = device, sync_each
        self.phases: dict[str, float] = {}

    def start(self):
        self.device.sync()
        self.phases = {}
        self.t0 = self.t = time.perf_counter()

    def mark(self, name: str):
        if self.sync_each:
            self.device.sync()
            now = time.perf_counter()
            self.phases[name] = self.phases.get(name, 0.0) + now - self.t
            self.t = now

    def stop(self) -> float:
        self.device.sync()
        self.total = time.perf_counter() - self.t0
        return self.total


class _NoClock:
    def mark(self, name):
        pass


# ---------------------------------------------------------------------------------------------
# the two implementations of one step
# ---------------------------------------------------------------------------------------------


class MinidpoStep:
    """One minidpo training step: minidpo.train.dpo_step itself, then clipping and AdamW, on the
    padded batch torch runs (packing.padded_batch of the same ids and loss mask).

    Timed steps call ``train.dpo_step`` (what training runs). For the phase split,
    :meth:`loss_and_grads` repeats dpo_step's calls with a clock mark between them (the same
    calls and options: validate=False, the logits' buffer reused for dlogits); the gate checks
    that the two give the same loss and gradients.
    """

    name = "minidpo"

    def __init__(self, cfg: BenchConfig, policy: dict, reference: dict, device: Device):
        from minidpo.optim import AdamW

        self.cfg, self.mc, self.device = cfg, cfg.model_config(), device
        self.params = {k: device.xp.array(v, dtype=np.float32) for k, v in policy.items()}
        self.reference = {k: device.xp.array(v, dtype=np.float32) for k, v in reference.items()}
        h = HPARAMS
        self.opt = AdamW(self.params, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])
        from minidpo.train import TrainConfig, dpo_step

        self.dpo_step, self.tc = dpo_step, TrainConfig(beta=h["beta"], progress=False)

    def _backend(self):
        return None if self.device.xp is np else self.device.backend

    def batch(self, ids, mask):
        """(packing.Batch,): the padded rows' scored tokens, on the device."""
        from minidpo.packing import padded_batch

        return (padded_batch(ids, mask, backend=self._backend()),)

    def reference_logps(self, batch):
        """(2N,) log pi_ref(y|x): a forward pass of the frozen reference, nothing kept, as
        minidpo.train computes it (scoring.batch_logps: gpt_forward without the backward's cache)."""
        from minidpo.scoring import batch_logps

        logps, _ = batch_logps(self.reference, self.mc, batch)
        return logps

    def loss_and_grads(self, batch, ref_logps, clock=_NoClock()):
        """dpo_step's lines, a clock mark between phases: loss (0-d), policy log-probs (2N,), grads."""
        from minidpo.fast import sequence_logps, sequence_logps_backward  # the default (fast) path, as dpo_step
        from minidpo.losses import dpo_loss
        from minidpo.model import gpt_backward, gpt_forward

        xp = self.device.xp
        n = batch.n_examples // 2
        logits, model_cache = gpt_forward(self.params, batch.input_ids, self.mc, batch.layout,
                                          logits_at=batch.logits_at, validate=False)  # (M, V)
        clock.mark("forward")
        logps, lp_cache = sequence_logps(logits, batch.labels, batch.weights(logits.dtype))  # (2N,)
        del logits
        out = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=HPARAMS["beta"])
        clock.mark("logps_loss")
        dlogps = xp.concatenate([out.grad_policy_chosen_logps, out.grad_policy_rejected_logps])  # (2N,)
        dlogits = sequence_logps_backward(dlogps.astype(logps.dtype, copy=False), lp_cache,
                                          overwrite_logits=True)  # (M, V), in the logits' buffer
        grads = gpt_backward(dlogits, model_cache)
        clock.mark("backward")
        return out.losses.mean(), logps, grads

    def clip_and_update(self, grads):
        from minidpo.optim import clip_grad_norm

        norm = clip_grad_norm(grads, HPARAMS["grad_clip"])
        self.opt.step(self.params, grads)
        return norm

    def step(self, batch, ref_logps=None, clock=None):
        """One training step; with a ``clock``, the phase-split lines and a mark after each phase."""
        if ref_logps is None:
            ref_logps = self.reference_logps(batch)
            if clock is not None:
                clock.mark("reference")
        if clock is None:
            n = batch.n_examples // 2
            loss, _, grads = self.dpo_step(self.params, self.mc, batch, ref_logps[:n], ref_logps[n:], self.tc)
        else:
            loss, _, grads = self.loss_and_grads(batch, ref_logps, clock or _NoClock())
        self.clip_and_update(grads)
        if clock is not None:
            clock.mark("optimizer")
        return loss

    def params_numpy(self):
        from minidpo.backend import to_numpy

        return {k: to_numpy(v) for k, v in self.params.items()}


class TorchStep:
    """bench/torch_reference.TorchDPOStep, phase by phase."""

    name = "torch"

    def __init__(self, cfg: BenchConfig, policy: dict, reference: dict, device: Device, attn_impl: str):
        import torch

        from bench.torch_reference import TorchDPOStep

        h = HPARAMS
        self.torch = torch
        self.impl = TorchDPOStep(cfg.model_config(), policy, reference, beta=h["beta"], lr=h["lr"],
                                 betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"],
                                 grad_clip=h["grad_clip"], device=device.torch_device, attn_impl=attn_impl)

    def batch(self, ids, mask):
        return self.impl.as_tensors(ids, mask)

    def reference_logps(self, ids, mask):
        return self.impl.reference_logps(ids, mask)

    def loss_and_grads(self, ids, mask, ref_logps, clock=_NoClock()):
        logits = self.impl.policy(ids)  # (2N, T, V)
        clock.mark("forward")
        loss, logps = self.impl.loss(ids, mask, ref_logps, logits)
        del logits
        clock.mark("logps_loss")
        loss.backward()
        clock.mark("backward")
        return loss, logps, None

    def grads_numpy(self):
        return self.impl.policy.grads_numpy()

    def clip_and_update(self, grads=None):
        return self.impl.clip_and_update()

    def step(self, ids, mask, ref_logps=None, clock=None):
        clock = clock or _NoClock()
        if ref_logps is None:
            ref_logps = self.reference_logps(ids, mask)
            clock.mark("reference")
        loss, _, _ = self.loss_and_grads(ids, mask, ref_logps, clock)
        self.clip_and_update()
        clock.mark("optimizer")
        return loss

    def params_numpy(self):
        return self.impl.policy.params_numpy()


LAYOUTS = {"padded": (False, False), "packed": (False, True), "shared": (True, False), "shared_packed": (True, True)}


class LayoutStep(MinidpoStep):
    """minidpo's step on one batch layout (minidpo.packing, as train_dpo's Batcher builds it):
    ``padded`` is the right-padded batch of the pairs (MinidpoStep's, torch's); ``packed`` packs the
    2N [x | y] sequences into rows; ``shared`` runs the prompt once per pair with both responses
    after it (the rejected response does not see the chosen one); ``shared_packed`` (the default)
    also packs those sequences into rows. The same model and step run every layout: only the
    batch differs."""

    def __init__(self, cfg, policy, reference, device, layout: str, pairs):
        super().__init__(cfg, policy, reference, device)
        self.layout, self.pairs = layout, pairs
        self.name = "minidpo " + layout

    def batch(self, ids, mask):
        if self.layout == "padded":
            return super().batch(ids, mask)
        from minidpo.packing import pack_preferences

        share, pack = LAYOUTS[self.layout]
        return (pack_preferences(self.pairs, 0, share, pack, backend=self._backend()),)


def layout_gate(cfg: BenchConfig, device: Device, layouts, seed: int = 0, rtol: float | None = None) -> dict:
    """Each layout's step against the padded minidpo step (which the torch gate checks), same
    parameters, same pairs, float32: loss, policy log-probs and every gradient, under the torch
    gate's tolerances. Returns {"passed", "failures", "worst", "n_checked"}."""
    from minidpo.backend import to_numpy

    rtol = GATE_RTOL if rtol is None else rtol
    policy, reference = make_params(cfg, seed)
    pairs = make_pairs(cfg, seed)
    ids, mask = make_batch(cfg, seed)
    pad = LayoutStep(cfg, policy, reference, device, "padded", pairs)
    b0 = pad.batch(ids, mask)
    ref0 = pad.reference_logps(*b0)
    loss0, lp0, g0 = pad.loss_and_grads(*b0, ref0)
    g0 = {k: to_numpy(v).copy() for k, v in g0.items()}
    failures, worst, n = [], [], 0
    for layout in layouts:
        if layout == "padded":
            continue
        impl = LayoutStep(cfg, policy, reference, device, layout, pairs)
        b = impl.batch(ids, mask)
        ref = impl.reference_logps(*b)
        _compare(f"{layout} reference logps", to_numpy(ref), to_numpy(ref0), rtol, 1e-6, failures, worst)
        loss, lp, g = impl.loss_and_grads(*b, ref0)
        _compare(f"{layout} loss", to_numpy(loss), to_numpy(loss0), rtol, 1e-6, failures, worst)
        _compare(f"{layout} policy logps", to_numpy(lp), to_numpy(lp0), rtol, 1e-6, failures, worst)
        for k in g0:
            _compare(f"{layout} grad {k}", to_numpy(g[k]), g0[k], rtol, default_atol_scale(cfg), failures, worst)
        n += 3 + len(g0)
    worst.sort(reverse=True)
    return {"passed": not failures, "failures": failures, "worst": worst[:5], "n_checked": n}


def _interleave(impls, batches, refs, device: Device, warmup: int, steps: int, phase_steps: int, gap: float,
                time_reference: bool = False):
    """Run the implementations' steps interleaved, A B A B ..., ``warmup`` untimed rounds then
    ``steps`` timed ones (one sync per step), then ``phase_steps`` rounds synced at every phase
    (with ``time_reference``, each preceded by the reference log-prob pass, marked "reference").
    Returns ({name: [seconds]}, {name: [phase dicts]})."""
    times = {impl.name: [] for impl in impls}
    phases = {impl.name: [] for impl in impls}
    clock = Clock(device, sync_each=False)
    for i in range(warmup + steps):
        for impl, b, r in zip(impls, batches, refs):
            if gap:
                time.sleep(gap)
            clock.start()
            impl.step(*b, ref_logps=r)
            dt = clock.stop()
            if i >= warmup:
                times[impl.name].append(dt)
    pclock = Clock(device, sync_each=True)
    for _ in range(phase_steps):
        for impl, b, r in zip(impls, batches, refs):
            if gap:
                time.sleep(gap)
            pclock.start()
            if time_reference:
                impl.reference_logps(*b)
                pclock.mark("reference")
            impl.step(*b, ref_logps=r, clock=pclock)
            pclock.stop()
            phases[impl.name].append(dict(pclock.phases))
    return times, phases


def time_layouts(cfg: BenchConfig, device: Device, layouts, steps: int, warmup: int, attn_impl: str,
                 seed: int = 0, phase_steps: int = 2, gap: float = 0.0) -> dict:
    """minidpo in each of ``layouts`` and torch (padded) on the same pairs, interleaved A B C D A
    B C D ..., cached reference (the reference log-probs of each layout are timed separately, in the
    phase steps, as "reference": the once-per-dataset cache pass). Returns, per implementation,
    what :func:`time_pair` returns, plus the layout's row and token counts."""
    policy, reference = make_params(cfg, seed)
    pairs = make_pairs(cfg, seed)
    ids, mask = make_batch(cfg, seed)
    impls = [LayoutStep(cfg, policy, reference, device, lay, pairs) for lay in layouts]
    impls.append(TorchStep(cfg, policy, reference, device, attn_impl))
    impls[-1].name = "torch padded"
    batches = [impl.batch(ids, mask) for impl in impls]
    refs = [impl.reference_logps(*b) for impl, b in zip(impls, batches)]
    times, phases = _interleave(impls, batches, refs, device, warmup, steps, phase_steps, gap,
                                time_reference=True)
    out = {}
    real = int(mask.sum() + sum(len(p.prompt_ids) for p in pairs) * 2)  # the padded rows' non-pad tokens
    for impl, b, r in zip(impls, batches, refs):
        mem = device.peak_memory_mb(lambda: impl.step(*b, ref_logps=r), "torch" if impl is impls[-1] else "minidpo")
        ts = times[impl.name]
        shape = tuple(b[0].shape) if hasattr(b[0], "shape") else tuple(ids.shape)
        out[impl.name] = {
            "median_ms": statistics.median(ts) * 1e3, "p10_ms": _percentile(ts, 10) * 1e3,
            "p90_ms": _percentile(ts, 90) * 1e3, "times_ms": [t * 1e3 for t in ts],
            "phases_ms": {p: statistics.median([d.get(p, 0.0) for d in phases[impl.name]]) * 1e3 for p in PHASES},
            "peak_mem_mb": mem[0], "mem_method": mem[1], "rows_x_len": list(shape),
            "positions": int(np.prod(shape)), "pair_tokens": real,
            "tokens_per_s": real / statistics.median(ts),
        }
    return out


def layout_rows(cfg: BenchConfig, device: Device, res: dict, layouts, steps, warmup, threads, gap) -> list[dict]:
    """One row per layout: minidpo in that layout against torch padded, from one interleaved run;
    ``speedup_vs_padded`` = minidpo padded ms / this layout's ms."""
    torch_r = res["torch padded"]
    pad_ms = res["minidpo padded"]["median_ms"] if "padded" in layouts else None
    rows = []
    for lay in layouts:
        m = res["minidpo " + lay]
        rows.append({
            "config": cfg.name, "device": device.kind, "mode": device.mode, "step": "cached_ref", "layout": lay,
            "kernels": device.kernels, "numpy_hugepage": numpy_hugepage(),
            "minidpo_ms": m["median_ms"], "torch_ms": torch_r["median_ms"], "ratio": m["median_ms"] / torch_r["median_ms"],
            "speedup_vs_padded": None if pad_ms is None else pad_ms / m["median_ms"],
            "shape": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "vocab": cfg.vocab,
                      "pairs": cfg.pairs, "prompt_range": list(cfg.prompt_range),
                      "response_range": list(cfg.response_range)},
            "steps": steps, "warmup": warmup, "threads": threads, "gap_s": gap,
            "minidpo": m, "torch": torch_r,
        })
    return rows


def format_layout_table(rows: list[dict]) -> str:
    head = (f"{'config':6} {'layout':14} {'rows x len':>10} {'minidpo ms':>11} {'(p10-p90)':>17} {'torch pad ms':>12} "
            f"{'vs torch':>8} {'vs padded':>9} {'ref ms':>8} {'fwd':>7} {'loss':>6} {'bwd':>7} {'opt':>6} {'MB':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["minidpo"]
        ph = m["phases_ms"]
        sp = "-" if r["speedup_vs_padded"] is None else f"{r['speedup_vs_padded']:.2f}x"
        lines.append(f"{r['config']:6} {r['layout']:14} {'x'.join(map(str, m['rows_x_len'])):>10} {m['median_ms']:11.1f} "
                     f"{'(%.1f-%.1f)' % (m['p10_ms'], m['p90_ms']):>17} {r['torch_ms']:12.1f} {r['ratio']:8.2f} {sp:>9} "
                     f"{ph['reference']:8.1f} {ph['forward']:7.1f} {ph['logps_loss']:6.1f} {ph['backward']:7.1f} "
                     f"{ph['optimizer']:6.1f} {m['peak_mem_mb']:6.0f}")
    if rows:
        t = rows[0]["torch"]
        ph = t["phases_ms"]
        lines.append(f"{rows[0]['config']:6} {'torch padded':14} {'x'.join(map(str, t['rows_x_len'])):>10} "
                     f"{t['median_ms']:11.1f} {'(%.1f-%.1f)' % (t['p10_ms'], t['p90_ms']):>17} {t['median_ms']:12.1f} "
                     f"{1.0:8.2f} {'':>9} {ph['reference']:8.1f} {ph['forward']:7.1f} {ph['logps_loss']:6.1f} "
                     f"{ph['backward']:7.1f} {ph['optimizer']:6.1f} {t['peak_mem_mb']:6.0f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the correctness gate
# ---------------------------------------------------------------------------------------------

GATE_RTOL = 1e-4


def _compare(name, ours, theirs, rtol, atol_scale, failures, worst):
    """Record a mismatch of ``ours`` vs ``theirs`` under |a - b| <= atol + rtol |b|, with
    atol = atol_scale * max|b| (a gradient's small entries are judged on its own scale)."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    if ours.shape != theirs.shape:
        failures.append(f"{name}: shape {ours.shape} vs torch {theirs.shape}")
        return
    scale = float(np.max(np.abs(theirs))) if theirs.size else 0.0
    atol = atol_scale * max(scale, 1e-30)
    err = np.abs(ours - theirs)
    excess = err - (atol + rtol * np.abs(theirs))
    if not np.all(np.isfinite(ours)):
        failures.append(f"{name}: non-finite values in minidpo's result")
        return
    k = int(np.argmax(excess)) if excess.size else 0
    rel = float(np.max(err / (atol + rtol * np.abs(theirs)))) if err.size else 0.0
    worst.append((rel, name))
    if excess.size and excess.flat[k] > 0:
        failures.append(
            f"{name}: {int(np.sum(excess > 0))} of {excess.size} entries off; worst at flat index {k}: "
            f"minidpo {ours.flat[k]:.8g} vs torch {theirs.flat[k]:.8g} (atol {atol:.3g}, rtol {rtol:g})"
        )


def default_atol_scale(cfg: BenchConfig) -> float:
    """The gradients' absolute tolerance, as a fraction of each tensor's largest entry.

    A weight gradient is a sum over the B*T rows of the batch; two float32 implementations that
    add in different orders differ by about eps32 * sqrt(B*T) of the summands' size (measured on
    C1: minidpo and torch are each ~1e-5 of max|g| away from a float64 torch run). The gate allows
    4 eps32 sqrt(B*T), and never less than 1e-5."""
    return max(1e-5, 4 * float(np.finfo(np.float32).eps) * math.sqrt(cfg.tokens))


def correctness_gate(cfg: BenchConfig, device: Device, attn_impl: str = "sdpa", seed: int = 0,
                     rtol: float = GATE_RTOL, atol_scale: float | None = None, check_train_step: bool = True,
                     f64_check: bool = False) -> dict:
    """One full DPO step of each implementation from the same parameters and batch.

    Compared (float64 on the host): the loss, the (2N,) policy and reference log-probs, every
    parameter gradient, the pre-clipping gradient norm, and every parameter after clipping and
    AdamW. Tolerance |a - b| <= atol + rtol |b| with rtol = 1e-4 and atol = atol_scale * max|b|
    per tensor (default :func:`default_atol_scale`). With ``check_train_step``,
    minidpo.train.dpo_step must give the benchmarked step's loss and gradients (to rtol 1e-6):
    the bench times what training runs. With ``f64_check``, a float64 torch run on the CPU is the
    truth both float32 results are measured against: minidpo's largest gradient error (relative
    to each tensor's max) must be at most 4x torch's.

    Returns a dict: passed (bool), failures (list of str), worst (the five largest
    error/tolerance ratios), n_checked, atol_scale, and with f64_check "f64" (the two errors).
    """
    from minidpo.backend import to_numpy

    if atol_scale is None:
        atol_scale = default_atol_scale(cfg)

    policy, reference = make_params(cfg, seed)
    ids, mask = make_batch(cfg, seed)
    mini = MinidpoStep(cfg, policy, reference, device)
    tor = TorchStep(cfg, policy, reference, device, attn_impl)
    failures: list[str] = []
    worst: list[tuple[float, str]] = []

    (m_batch,) = mini.batch(ids, mask)
    m_ref = mini.reference_logps(m_batch)
    m_loss, m_logps, m_grads = mini.loss_and_grads(m_batch, m_ref)
    m_grads_host = {k: to_numpy(v).copy() for k, v in m_grads.items()}

    t_ids, t_mask = tor.batch(ids, mask)
    t_ref = tor.reference_logps(t_ids, t_mask)
    t_loss, t_logps, _ = tor.loss_and_grads(t_ids, t_mask, t_ref)
    t_grads = {k: v.copy() for k, v in tor.grads_numpy().items()}  # clipping scales them in place

    def host(t):
        return t.detach().cpu().numpy()

    _compare("loss", to_numpy(m_loss), host(t_loss), rtol, 1e-6, failures, worst)
    _compare("reference logps", to_numpy(m_ref), host(t_ref), rtol, 1e-6, failures, worst)
    _compare("policy logps", to_numpy(m_logps), host(t_logps), rtol, 1e-6, failures, worst)
    if set(m_grads_host) != set(t_grads):
        failures.append(f"gradient names differ: {sorted(set(m_grads_host) ^ set(t_grads))[:5]}")
    for name in t_grads:
        if name in m_grads_host:
            _compare(f"grad {name}", m_grads_host[name], t_grads[name], rtol, atol_scale, failures, worst)

    from minidpo.train import TrainConfig, dpo_step

    if check_train_step:
        n = cfg.pairs
        tc = TrainConfig(beta=HPARAMS["beta"], progress=False)
        params_before = {k: v.copy() for k, v in mini.params.items()}
        loss2, _, grads2 = dpo_step(params_before, mini.mc, m_batch, m_ref[:n], m_ref[n:], tc)
        g_fail: list[str] = []
        _compare("train.dpo_step loss", to_numpy(loss2), to_numpy(m_loss), 1e-6, 1e-7, g_fail, [])
        for name, g in grads2.items():
            _compare(f"train.dpo_step grad {name}", to_numpy(g), m_grads_host[name], 1e-6, 1e-7, g_fail, [])
        failures += g_fail

    m_norm = float(to_numpy(mini.clip_and_update(m_grads)))
    t_norm = float(tor.clip_and_update())
    _compare("gradient norm", m_norm, t_norm, rtol, 1e-6, failures, worst)
    # AdamW's first step moves every entry by lr * g / (|g| + eps), about lr * sign(g): where
    # |g| is within the gradient's own tolerance (atol_scale * max|g|) its sign is round-off, and
    # the two updates may differ by up to 2 lr; everywhere else they agree to 5% of lr
    m_p, t_p = mini.params_numpy(), tor.params_numpy()
    lr = HPARAMS["lr"]
    for name in t_p:
        a, b = np.asarray(m_p[name], np.float64), np.asarray(t_p[name], np.float64)
        g = np.abs(np.asarray(t_grads[name], np.float64))
        undetermined = g <= atol_scale * max(float(g.max()), 1e-30)
        err = np.abs(a - b)
        tol = np.where(undetermined, 2.05 * lr, 0.05 * lr) + rtol * np.abs(b)
        worst.append((float(np.max(err / tol)), f"param {name} after AdamW"))
        if np.any(err > tol):
            k = int(np.argmax(err - tol))
            failures.append(f"param {name} after AdamW: {int(np.sum(err > tol))} of {err.size} entries off; "
                            f"worst minidpo {a.flat[k]:.8g} vs torch {b.flat[k]:.8g}")
    result = {"config": cfg.name, "atol_scale": atol_scale, "train_step_checked": check_train_step}
    if f64_check:
        result["f64"] = _f64_errors(cfg, policy, reference, ids, mask, m_grads_host, t_grads)
        if result["f64"]["minidpo"] > 4 * result["f64"]["torch"] + 1e-7:
            failures.append(f"against float64, minidpo's worst gradient error {result['f64']['minidpo']:.3g} "
                            f"(of max|g|) is over 4x torch float32's {result['f64']['torch']:.3g}")
    worst.sort(reverse=True)
    result.update(passed=not failures, failures=failures, worst=worst[:5], n_checked=len(worst))
    return result


def _f64_errors(cfg, policy, reference, ids, mask, m_grads, t_grads) -> dict:
    """max over tensors of max|g - g64| / max|g64| for minidpo's and torch's float32 gradients,
    g64 from a float64 torch run (explicit attention) on the CPU."""
    import torch

    from bench.torch_reference import TorchDPOStep

    h = HPARAMS
    ref64 = TorchDPOStep(cfg.model_config(), policy, reference, beta=h["beta"], dtype=torch.float64,
                         attn_impl="math")
    i64, m64 = ref64.as_tensors(ids, mask)
    loss, _ = ref64.loss(i64, m64, ref64.reference_logps(i64, m64))
    loss.backward()
    g64 = ref64.policy.grads_numpy()
    errs = {"minidpo": 0.0, "torch": 0.0}
    for name, g in g64.items():
        scale = max(float(np.abs(g).max()), 1e-30)
        errs["minidpo"] = max(errs["minidpo"], float(np.abs(m_grads[name] - g).max()) / scale)
        errs["torch"] = max(errs["torch"], float(np.abs(t_grads[name] - g).max()) / scale)
    return errs


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def make_params(cfg: BenchConfig, seed: int = 0):
    """Policy and reference parameters: two GPT-2 initialisations (different seeds, so the
    reference log-probs differ from the policy's and the loss is not exactly ln 2), NumPy."""
    from minidpo.model import init_params

    mc = cfg.model_config()
    return init_params(mc, seed=seed), init_params(mc, seed=seed + 1)


def matmul_ceiling(device: Device, n: int | None = None, repeats: int = 5) -> dict:
    """The machine's fp32 (or TF32) matmul rate, measured now: median of ``repeats`` (n, n) @ (n, n)
    products (2 n^3 FLOPs each) in NumPy/CuPy and in torch, into a preallocated output (the rate
    of the multiply itself, not of allocating its result)."""
    torch = device.torch
    n = n or (8192 if device.kind == "cuda" else 2048)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = {}
    xa, xb = device.asarray(a), device.asarray(b)
    xc = device.xp.empty((n, n), dtype=np.float32)
    ta, tb = torch.as_tensor(a, device=device.torch_device), torch.as_tensor(b, device=device.torch_device)
    tc = torch.empty((n, n), dtype=torch.float32, device=device.torch_device)
    products = (("array", lambda: device.xp.matmul(xa, xb, out=xc)), ("torch", lambda: torch.matmul(ta, tb, out=tc)))
    for name, f in products:
        f()
        ts = []
        for _ in range(repeats):
            device.sync()
            t0 = time.perf_counter()
            f()
            device.sync()
            ts.append(time.perf_counter() - t0)
        out[name] = 2 * n**3 / statistics.median(ts)
    return {"n": n, "array_flops": out["array"], "torch_flops": out["torch"]}


def _percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def time_pair(cfg: BenchConfig, device: Device, variant: str, steps: int, warmup: int, attn_impl: str,
              seed: int = 0, phase_steps: int = 3, gap: float = 0.0) -> dict:
    """Time minidpo and torch on the same batch, interleaved: warm-up, then A B A B ... .

    ``gap`` seconds of idle time separate the steps (not timed): after a BLAS call OpenBLAS's
    worker threads keep spinning for up to ~0.1 s, and torch's OpenMP threads briefly too; on a
    2-core machine the spinning threads of the implementation that just ran would otherwise slow
    the first phase of the other one (measured on C0: torch's forward 111.6 ms without a gap, 28.0
    ms with 0.2 s).

    Each implementation trains its own copy of the same initial parameters. The timed steps run
    the training code as it is (minidpo: train.dpo_step) and sync only at the end; ``phase_steps``
    more steps per implementation, synced at every phase, give the split into phases.
    """
    policy, reference = make_params(cfg, seed)
    ids, mask = make_batch(cfg, seed)
    impls = [MinidpoStep(cfg, policy, reference, device), TorchStep(cfg, policy, reference, device, attn_impl)]
    batches = [impl.batch(ids, mask) for impl in impls]
    refs = [None, None]
    if variant == "cached_ref":
        refs = [impl.reference_logps(*b) for impl, b in zip(impls, batches)]
    times, phases = _interleave(impls, batches, refs, device, warmup, steps, phase_steps, gap)
    mem = {}
    for impl, b, r in zip(impls, batches, refs):
        mem[impl.name] = device.peak_memory_mb(lambda: impl.step(*b, ref_logps=r), impl.name)
    out = {}
    for impl in impls:
        ts = times[impl.name]
        ph = {p: statistics.median([d.get(p, 0.0) for d in phases[impl.name]]) * 1e3 for p in PHASES}
        if variant != "full":
            ph.pop("reference")
        out[impl.name] = {
            "median_ms": statistics.median(ts) * 1e3,
            "p10_ms": _percentile(ts, 10) * 1e3,
            "p90_ms": _percentile(ts, 90) * 1e3,
            "tokens_per_s": cfg.tokens / statistics.median(ts),
            "phases_ms": ph,
            "peak_mem_mb": mem[impl.name][0],
            "mem_method": mem[impl.name][1],
        }
    return out


# ---------------------------------------------------------------------------------------------
# the machine, the table, the JSON
# ---------------------------------------------------------------------------------------------


def numpy_hugepage() -> str:
    """NumPy's transparent-hugepage advice for its large arrays, as it is now: "default" (on, on
    Linux) or "off" (NUMPY_MADVISE_HUGEPAGE=0 before NumPy was imported, or minidpo.runtime.cpu_defaults,
    which the CPU run calls, unless NUMPY_MADVISE_HUGEPAGE is set)."""
    from minidpo import runtime

    if runtime.hugepage_advice() is False:
        return "off"
    return "off" if os.environ.get("NUMPY_MADVISE_HUGEPAGE", "").strip() == "0" else "default"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Device, threads: int | None) -> dict:
    import torch

    info = {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "numpy_hugepage": numpy_hugepage(),
    }
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage")
        info["thp"] = {k: (thp / k).read_text().strip() for k in ("enabled", "defrag")}
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: d.get(k) for k in ("internal_api", "prefix", "version", "num_threads", "architecture")}
            for d in threadpool_info()
        ]
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    if device.kind == "cuda":
        info["gpu"] = device.name()
        info["cupy"] = device.xp.__version__
        info["torch_cuda"] = torch.version.cuda
    return info


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "unknown"


def results_path(out_dir: Path, device: Device) -> Path:
    """bench/results/cpu-<cpu model>.json or cuda-<gpu name>.json."""
    return Path(out_dir) / f"{device.kind}-{_slug(device.name())}.json"


ROW_KEYS = ("config", "device", "mode", "step", "kernels", "numpy_hugepage", "layout", "threads", "fast_threads",
            "blas_threads", "cpu_kernels", "gap_s")
# fast_threads: minidpo.runtime's thread pool (absent in rows measured before it existed: those rows
# are kept as the baseline); blas_threads: NumPy's BLAS threads during minidpo's step (absent: the
# same as threads); cpu_kernels: minidpo's compiled CPU kernels on or off (absent: before they existed);
# gap_s: the idle time between steps (a run with --gap 0 keeps the default run's rows)


def write_results(path: Path, machine: dict, rows: list[dict], gates: list[dict]) -> dict:
    """Merge ``rows`` into the JSON at ``path`` (a row with the same config, device, mode and
    step replaces the old one), so separate runs (e.g. fp32 then tf32) fill one file."""
    path = Path(path)
    doc = {"machine": machine, "rows": [], "gates": []}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            doc["rows"] = list(old.get("rows", []))
            doc["gates"] = list(old.get("gates", []))
        except (OSError, ValueError):
            pass
    new_keys = {tuple(r.get(k) for k in ROW_KEYS) for r in rows}
    doc["rows"] = [r for r in doc["rows"] if tuple(r.get(k) for k in ROW_KEYS) not in new_keys] + rows
    gk = ("config", "device", "mode", "kernels", "numpy_hugepage")
    gate_keys = {tuple(g.get(k) for k in gk) for g in gates}
    doc["gates"] = [g for g in doc["gates"] if tuple(g.get(k) for k in gk) not in gate_keys]
    doc["gates"] += gates
    doc["machine"] = machine
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return doc


def format_table(rows: list[dict]) -> str:
    head = (f"{'config':6} {'device':6} {'mode':5} {'kern':4} {'step':10} {'minidpo ms':>11} {'(p10-p90)':>15} "
            f"{'torch ms':>9} {'(p10-p90)':>15} {'ratio':>6} {'mini tok/s':>10} {'torch tok/s':>11} "
            f"{'mini %peak':>10} {'torch %peak':>11} {'mini MB':>8} {'torch MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        m, t = r["minidpo"], r["torch"]
        kern = _kernels_cell(r)
        lines.append(
            f"{r['config']:6} {r['device']:6} {r['mode']:5} {kern:4} {r['step']:10} {r['minidpo_ms']:11.1f} "
            f"{'(%.1f-%.1f)' % (m['p10_ms'], m['p90_ms']):>15} {r['torch_ms']:9.1f} "
            f"{'(%.1f-%.1f)' % (t['p10_ms'], t['p90_ms']):>15} {r['ratio']:6.2f} {m['tokens_per_s']:10.0f} "
            f"{t['tokens_per_s']:11.0f} {100 * m['frac_of_ceiling']:10.1f} {100 * t['frac_of_ceiling']:11.1f} "
            f"{m['peak_mem_mb']:8.0f} {t['peak_mem_mb']:8.0f}"
        )
    lines.append("")
    lines.append("phases (median ms)   " + "  ".join(f"{p:>10}" for p in PHASES))
    for r in rows:
        for impl in ("minidpo", "torch"):
            ph = r[impl]["phases_ms"]
            cells = "  ".join(f"{ph[p]:10.1f}" if p in ph else f"{'-':>10}" for p in PHASES)
            lines.append(f"{r['config']:3} {r['step']:10} {impl:7} {cells}")
    return "\n".join(lines)


def _kernels_cell(r: dict) -> str:
    """CUDA: its fused kernels on/off; CPU: the compiled CPU kernels on/off ("-" before they existed)."""
    if r["device"] == "cuda":
        return "on" if r.get("kernels") else "off"
    return "-" if r.get("cpu_kernels") is None else ("on" if r["cpu_kernels"] else "off")


def _blas_cell(r: dict) -> str:
    return str(r.get("blas_threads") or r.get("threads", "-"))


def _fast_cell(r: dict) -> str:
    """The fast threads column: the count, "-" on CUDA, "none" for rows from before the pool."""
    if "fast_threads" not in r:
        return "none" if r["device"] == "cpu" else "-"
    return "-" if r["fast_threads"] is None else str(r["fast_threads"])


def markdown_table(doc: dict) -> str:
    """The rows of a results JSON as a Markdown table (for bench/README.md)."""
    cols = ["config", "device", "mode", "kernels", "NumPy hugepages", "threads", "fast threads", "BLAS threads", "gap s",
            "step",
            "minidpo ms (p10-p90)",
            "torch ms (p10-p90)", "ratio", "minidpo tok/s", "torch tok/s", "minidpo % of ceiling",
            "torch % of ceiling", "minidpo MB", "torch MB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    layout_rows_ = [r for r in doc["rows"] if r.get("layout")]
    doc = dict(doc, rows=[r for r in doc["rows"] if not r.get("layout")])
    for r in doc["rows"]:
        m, t = r["minidpo"], r["torch"]
        cells = [r["config"], r["device"], r["mode"], _kernels_cell(r), r.get("numpy_hugepage", "-"),
                 str(r.get("threads", "-")), _fast_cell(r), _blas_cell(r), f"{r.get('gap_s', 0):g}", r["step"],
                 f"{m['median_ms']:.1f} ({m['p10_ms']:.1f}-{m['p90_ms']:.1f})",
                 f"{t['median_ms']:.1f} ({t['p10_ms']:.1f}-{t['p90_ms']:.1f})", f"**{r['ratio']:.2f}**",
                 f"{m['tokens_per_s']:.0f}", f"{t['tokens_per_s']:.0f}", f"{100 * m['frac_of_ceiling']:.1f}",
                 f"{100 * t['frac_of_ceiling']:.1f}", f"{m['peak_mem_mb']:.0f}", f"{t['peak_mem_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["config", "mode", "kernels", "NumPy hugepages", "threads", "fast threads", "BLAS threads", "gap s", "step",
            "impl"]
    head += [f"{p} ms" for p in PHASES]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        for impl in ("minidpo", "torch"):
            ph = r[impl]["phases_ms"]
            cells = [r["config"], r["mode"], _kernels_cell(r), r.get("numpy_hugepage", "-"), str(r.get("threads", "-")),
                     _fast_cell(r), _blas_cell(r), f"{r.get('gap_s', 0):g}", r["step"], impl]
            cells += [f"{ph[p]:.1f}" if p in ph else "-" for p in PHASES]
            lines.append("| " + " | ".join(cells) + " |")
    if layout_rows_:
        lines += ["", markdown_layout_table(layout_rows_)]
    return "\n".join(lines)


def markdown_layout_table(rows: list[dict]) -> str:
    """Rows of --layouts runs: one per layout, then torch padded from the same run."""
    head = ["config", "threads", "layout", "rows x len", "step ms (p10-p90)", "vs minidpo padded", "vs torch padded",
            "pair tokens/s", "reference ms", "forward ms", "logps_loss ms", "backward ms", "optimizer ms", "MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(r, name, m, vs_pad, vs_torch):
        ph = m["phases_ms"]
        return "| " + " | ".join([r["config"], str(r["threads"]), name, "x".join(map(str, m["rows_x_len"])),
                                  f"{m['median_ms']:.0f} ({m['p10_ms']:.0f}-{m['p90_ms']:.0f})", vs_pad, vs_torch,
                                  f"{m['tokens_per_s']:.0f}"] + [f"{ph[p]:.0f}" for p in PHASES]
                                 + [f"{m['peak_mem_mb']:.0f}"]) + " |"

    for i, r in enumerate(rows):
        sp = "-" if r.get("speedup_vs_padded") is None else f"**{r['speedup_vs_padded']:.2f}x**"
        lines.append(line(r, "minidpo " + r["layout"], r["minidpo"], sp, f"{1 / r['ratio']:.2f}x"))
        if i + 1 == len(rows) or rows[i + 1]["torch"] != r["torch"]:  # the run's torch padded, once
            lines.append(line(r, "torch padded", r["torch"], "", "1.00x"))
    return "\n".join(lines)


def _fast_threads(device: Device):
    """minidpo.runtime's CPU thread count (None on CUDA: the pool is not used there)."""
    from minidpo import runtime

    return runtime.get_threads() if device.kind == "cpu" else None


def _blas_threads(device: Device):
    """NumPy's BLAS threads during minidpo's step, as this run set them (threadpoolctl), or None."""
    return getattr(device, "blas_threads", None) if device.kind == "cpu" else None


def _cpu_kernels_on(device: Device):
    """Whether minidpo's compiled CPU kernels run (None on CUDA)."""
    from minidpo import runtime

    return runtime.cpu_kernels() is not None if device.kind == "cpu" else None


def _gemm(device: Device):
    """Which library did minidpo's CPU matrix products ("mkl" or "numpy"; None on CUDA)."""
    from minidpo import runtime

    return runtime.gemm_choice()["gemm"] if device.kind == "cpu" else None


def make_row(cfg: BenchConfig, device: Device, variant: str, res: dict, n_params: int, ceiling: dict,
             steps: int, warmup: int, threads, gap: float = 0.0) -> dict:
    flops = step_flops(cfg, n_params, variant)
    row = {
        "config": cfg.name, "device": device.kind, "mode": device.mode, "step": variant,
        "kernels": device.kernels, "numpy_hugepage": numpy_hugepage(),
        "minidpo_ms": res["minidpo"]["median_ms"], "torch_ms": res["torch"]["median_ms"],
        "ratio": res["minidpo"]["median_ms"] / res["torch"]["median_ms"],
        "shape": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "T": cfg.T,
                  "vocab": cfg.vocab, "pairs": cfg.pairs, "rows": cfg.rows},
        "n_params": n_params, "tokens_per_step": cfg.tokens, "flops_per_step": flops,
        "matmul_ceiling_flops": ceiling["array_flops"], "torch_matmul_flops": ceiling["torch_flops"],
        "steps": steps, "warmup": warmup, "threads": threads, "gap_s": gap,
        "fast_threads": _fast_threads(device), "blas_threads": _blas_threads(device),
        "cpu_kernels": _cpu_kernels_on(device), "gemm": _gemm(device),
    }
    for impl in ("minidpo", "torch"):
        r = dict(res[impl])
        r["achieved_flops"] = flops / (r["median_ms"] / 1e3)
        r["frac_of_ceiling"] = r["achieved_flops"] / ceiling["array_flops"]
        row[impl] = r
    return row


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None,
                    help="comma-separated among %s (default: C0,C1 on cpu, C0,C1,C2 on cuda)" % ",".join(CONFIGS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--mode", default="fp32", choices=["fp32", "tf32"],
                    help="cuda only: tf32 sets CUPY_TF32=1 and torch.backends.cuda.matmul.allow_tf32")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed steps per implementation (default {DEFAULT_STEPS}; C1 on cpu: "
                         f"{CONFIGS['C1'].cpu_steps})")
    ap.add_argument("--warmup", type=int, default=None, help=f"untimed steps first (default {DEFAULT_WARMUP})")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for NumPy's BLAS and for torch alike (default: all cores)")
    ap.add_argument("--fast-threads", type=int, default=None,
                    help="cpu: threads of minidpo.runtime's pool (default: --threads, as the CLI's --threads: "
                         "the pool shares every pass and matrix product, NumPy's BLAS on one thread); 1: the "
                         "pool on one thread and the BLAS on --threads")
    ap.add_argument("--variants", default="full,cached_ref", help="full, cached_ref or both")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "math"], help="torch's attention")
    ap.add_argument("--gap", type=float, default=None,
                    help="idle seconds between steps, untimed, so one library's spinning worker threads "
                         "do not slow the other's step (default 0.2 on cpu, 0 on cuda)")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON results")
    ap.add_argument("--gate-only", action="store_true", help="run the correctness gate and stop")
    ap.add_argument("--ceiling-n", type=int, default=None,
                    help="size n of the (n, n) @ (n, n) ceiling matmul (default 2048 cpu, 8192 cuda)")
    ap.add_argument("--gate-f64", action="store_true",
                    help="also measure both float32 gradients against a float64 torch run")
    ap.add_argument("--no-json", action="store_true", help="print the table only")
    ap.add_argument("--show", metavar="JSON", help="print a results file as a Markdown table and exit")
    ap.add_argument("--no-cpu-kernels", action="store_true",
                    help="cpu: run the fast path's NumPy passes instead of the compiled CPU kernels "
                         "(rows get cpu_kernels=false)")
    ap.add_argument("--no-kernels", action="store_true",
                    help="cuda: run minidpo's array code instead of its fused kernels (rows get kernels=false)")
    ap.add_argument("--layouts", default=None,
                    help="long-prompt configs (LP): time minidpo in these batch layouts, comma-separated among "
                         f"{','.join(LAYOUTS)}, against torch padded, interleaved, cached reference (one row a "
                         "layout) instead of the full/cached_ref rows")
    args = ap.parse_args(argv)
    names = (args.configs or ("C0,C1,C2" if args.device == "cuda" else "C0,C1")).split(",")
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {bad}; choose among {sorted(CONFIGS)}")
    args.config_list = [CONFIGS[n] for n in names]
    gpu_only = [c.name for c in args.config_list if c.gpu_only and args.device == "cpu"]
    if gpu_only:
        ap.error(f"config(s) {gpu_only} are GPU-only (GPT-2 124M shape); use --device cuda")
    if args.device == "cpu" and args.mode != "fp32":
        ap.error("--mode tf32 needs --device cuda")
    args.layout_list = args.layouts.split(",") if args.layouts else None
    if args.layout_list:
        bad = [x for x in args.layout_list if x not in LAYOUTS]
        if bad:
            ap.error(f"unknown layout(s) {bad}; choose among {list(LAYOUTS)}")
        flat = [c.name for c in args.config_list if c.prompt_range is None]
        if flat:
            ap.error(f"--layouts needs long-prompt configs (pairs with their own lengths), not {flat}")
    args.variant_list = args.variants.split(",")
    if not args.variant_list or any(v not in ("full", "cached_ref") for v in args.variant_list):
        ap.error(f"--variants takes full and/or cached_ref, got {args.variants!r}")
    for k in ("steps", "warmup", "threads"):
        v = getattr(args, k)
        if v is not None and v < (1 if k != "warmup" else 0):
            ap.error(f"--{k} must be positive, got {v}")
    return args


def run(args) -> int:
    import torch

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    from minidpo import runtime

    blas_threads = threads
    if args.device == "cpu":  # what the CLI's --threads runs with (runtime.use_threads): the fast path's pool
        # on `threads` threads sharing every matrix product, NumPy's BLAS on one thread; --fast-threads 1:
        # the pool on one thread and the BLAS on all `threads` (how minidpo ran before the pool shared them)
        fast_threads = args.fast_threads if args.fast_threads is not None else threads
        runtime.cpu_defaults(fast_threads)  # also NumPy's hugepage advice off, freed memory kept (see runtime.py)
        if args.no_cpu_kernels:
            runtime.set_cpu_kernels(False)
        blas_threads = 1 if fast_threads > 1 else threads
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=blas_threads, user_api="blas")
    except ImportError:
        limiter = None
        print("note: threadpoolctl is not installed; NumPy's BLAS threads are not pinned "
              "(pip install threadpoolctl)", file=sys.stderr)
    device = Device(args.device, args.mode, kernels=not args.no_kernels)
    device.blas_threads = blas_threads if limiter is not None else None
    if args.no_kernels:
        from minidpo import kernels

        kernels._ENABLED = False  # the whole run uses the array code (the fast path without kernels)
    machine = machine_info(device, threads)
    what = device.kind + " " + device.mode
    if device.kind == "cuda":
        what += " kernels " + ("on" if device.kernels else "off")
    if numpy_hugepage() == "off":
        what += " NumPy hugepage advice off"
    print(f"# {what}: {device.name()} | numpy {np.__version__} | torch {torch.__version__} | "
          f"threads {threads} (torch {torch.get_num_threads()}) | load {machine['load_avg_1m']}")
    if isinstance(machine["threadpools"], list):
        print("# threadpools: " + "; ".join(f"{d['prefix']} {d['version'] or ''} x{d['num_threads']}"
                                            for d in machine["threadpools"]))

    # 1. the correctness gate, before any time is printed (always in fp32)
    gates = []
    tf32 = device.mode == "tf32"
    for cfg in args.config_list:
        # TF32 rounds matmul inputs to 10 mantissa bits: its gate is a sanity check (rtol 5e-2);
        # the 1e-4 gate is the fp32 run's (bench/gpu_check.sh runs fp32 first)
        gate = correctness_gate(cfg, device, attn_impl=args.attn, rtol=5e-2 if tf32 else GATE_RTOL,
                                atol_scale=5e-2 if tf32 else None, f64_check=args.gate_f64)
        gate.update(device=device.kind, mode=device.mode, kernels=device.kernels, numpy_hugepage=numpy_hugepage(),
                    rtol=5e-2 if tf32 else GATE_RTOL)
        gates.append(gate)
        worst = ", ".join(f"{n} {r:.2f}" for r, n in gate["worst"][:3])
        print(f"# gate {cfg.name}: {'PASS' if gate['passed'] else 'FAIL'} ({gate['n_checked']} checks, rtol "
              f"{gate['rtol']:g}, atol {gate['atol_scale']:.2g} x max; largest error/tolerance: {worst})")
        if "f64" in gate:
            print(f"#   vs float64 torch: worst gradient error / max|g|: minidpo {gate['f64']['minidpo']:.2e}, "
                  f"torch float32 {gate['f64']['torch']:.2e}")
        if gate.get("note"):
            print(f"#   note: {gate['note']}")
        if not gate["passed"]:
            for f in gate["failures"][:20]:
                print("#   " + f)
            print("correctness gate failed: minidpo and torch disagree; no timings reported", file=sys.stderr)
            return 1
        if tf32:
            print("#   (tf32: a loose sanity gate, rtol 5e-2; the rtol 1e-4 gate is the fp32 run's)")
        if args.layout_list:
            lg = layout_gate(cfg, device, args.layout_list, rtol=5e-2 if tf32 else GATE_RTOL)
            worst = ", ".join(f"{n} {r:.2f}" for r, n in lg["worst"][:3])
            print(f"# layout gate {cfg.name} ({', '.join(args.layout_list)} vs minidpo padded): "
                  f"{'PASS' if lg['passed'] else 'FAIL'} ({lg['n_checked']} checks; largest error/tolerance: {worst})")
            if not lg["passed"]:
                for f in lg["failures"][:20]:
                    print("#   " + f)
                print("layout gate failed: a layout changes the numbers; no timings reported", file=sys.stderr)
                return 1
    if args.gate_only:
        return 0

    # 2. the matmul ceiling, measured in this run
    if limiter is not None:  # the ceiling on all `threads`, whatever minidpo's step runs the BLAS on
        with threadpool_limits(limits=threads, user_api="blas"):
            ceiling = matmul_ceiling(device, n=args.ceiling_n)
    else:
        ceiling = matmul_ceiling(device, n=args.ceiling_n)
    print(f"# matmul ceiling ({ceiling['n']}^3 fp32{'/tf32' if device.mode == 'tf32' else ''}): "
          f"{'numpy' if device.kind == 'cpu' else 'cupy'} {ceiling['array_flops'] / 1e9:.1f} GFLOP/s, "
          f"torch {ceiling['torch_flops'] / 1e9:.1f} GFLOP/s")

    # 3. timings
    from minidpo.model import num_params

    rows = []
    for cfg in args.config_list:
        steps = args.steps or (cfg.cpu_steps if device.kind == "cpu" and cfg.cpu_steps else DEFAULT_STEPS)
        warmup = args.warmup if args.warmup is not None else (
            cfg.cpu_warmup if device.kind == "cpu" and cfg.cpu_warmup is not None else DEFAULT_WARMUP)
        n_params = num_params(make_params(cfg)[0])
        if args.layout_list:
            t0 = time.perf_counter()
            gap = args.gap if args.gap is not None else (0.2 if device.kind == "cpu" else 0.0)
            res = time_layouts(cfg, device, args.layout_list, steps, warmup, args.attn, gap=gap,
                               phase_steps=2 if device.kind == "cpu" and cfg.cpu_steps else 3)
            lrows = layout_rows(cfg, device, res, args.layout_list, steps, warmup, threads, gap)
            rows += lrows
            print(f"# {cfg.name} layouts: " + ", ".join(f"{r['layout']} {r['minidpo_ms']:.1f} ms" for r in lrows)
                  + f", torch padded {lrows[0]['torch_ms']:.1f} ms ({steps} steps + {warmup} warm-up each, "
                  f"{time.perf_counter() - t0:.0f} s)")
            continue
        for variant in args.variant_list:
            t0 = time.perf_counter()
            gap = args.gap if args.gap is not None else (0.2 if device.kind == "cpu" else 0.0)
            res = time_pair(cfg, device, variant, steps, warmup, args.attn, gap=gap,
                            phase_steps=2 if device.kind == "cpu" and cfg.cpu_steps else 3)
            row = make_row(cfg, device, variant, res, n_params, ceiling, steps, warmup, threads, gap)
            rows.append(row)
            print(f"# {cfg.name} {variant}: minidpo {row['minidpo_ms']:.1f} ms, torch {row['torch_ms']:.1f} ms, "
                  f"ratio {row['ratio']:.2f} ({steps} steps + {warmup} warm-up each, {time.perf_counter() - t0:.0f} s)")
    machine["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print()
    if any(not r.get("layout") for r in rows):
        print(format_table([r for r in rows if not r.get("layout")]))
    if any(r.get("layout") for r in rows):
        print()
        print(format_layout_table([r for r in rows if r.get("layout")]))
    if not args.no_json:
        path = results_path(Path(args.out), device)
        write_results(path, machine, rows, gates)
        print(f"\n# wrote {path}")
    if limiter is not None:
        limiter.restore_original_limits()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show:
        print(markdown_table(json.loads(Path(args.show).read_text())))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
