"""SFT, then DPO against a frozen reference: the two training loops.

The DPO recipe of the paper (Sec. 4, "DPO outline"):
  1. pi_ref = pi_SFT: fine-tune on the preferred responses with negative log-likelihood
     (:func:`train_sft`);
  2. optimise the DPO loss, eq. (7), of a policy initialised at pi_ref, with pi_ref frozen
     (:func:`train_dpo`).

One DPO step (:func:`dpo_step`), with N preference pairs and B = 2N rows:

    input_ids, loss_mask   (2N, T)      rows 0..N-1 = [x; y_w], rows N..2N-1 = [x; y_l]
    logits = gpt_forward(policy, input_ids)                           # (2N, T, V)
    logps  = sequence_logps(logits, input_ids, loss_mask)             # (2N,)  log pi(y|x)
    out    = dpo_loss(logps[:N], logps[N:], ref_w, ref_l, beta)       # eq. 7, eq. 8, eq. 9
    dlogps = [out.grad_policy_chosen_logps; out.grad_policy_rejected_logps]   # (2N,)
    dlogits = sequence_logps_backward(dlogps, ...)                    # (2N, T, V)
    grads  = gpt_backward(dlogits, ...)                               # same keys as params

Layout (minidpo.packing, packed_model). By default (``share_prompt``, ``pack``) the batch is not
the padded (2N, T) above: each pair runs its prompt once with both responses after it under a
block mask, and the sequences are packed into rows instead of padded; the loss, log-probs and
gradients are those of the padded batch (tests/test_packing.py), for less work.

The reference log-probs log pi_ref(y|x) are constants of each example, so by default they are
computed once, before training, and cached (``TrainConfig.cache_reference=True``); the
alternative recomputes them every step, which costs one extra forward pass per step and gives
the same numbers.

Robustness a user can rely on:
- the batch order is a pure function of (seed, step), so a resumed run replays exactly the
  batches the uninterrupted run would have seen, and resume matches step for step;
- Ctrl-C (SIGINT) finishes the current step, saves a checkpoint, then stops;
- a non-finite loss or gradient stops training with :class:`NonFiniteError`; checkpoints are
  only written after a finiteness check, so the last one on disk is good;
- metrics go to ``metrics.jsonl`` (one JSON object a line, appended) and a tqdm progress bar;
  device values are read back to the host only once per ``log_every`` steps.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backend import Backend, get_array_module, get_backend, to_numpy
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .data import collate_preferences, collate_sft
from .logprobs import sequence_logps, sequence_logps_backward
from .losses import dpo_loss, preference_metrics
from .model import GPTConfig, gpt_backward, gpt_forward, gpt_forward_kv, init_kv_cache
from .optim import AdamW, clip_grad_norm, lr_at
from .packed_model import packed_dpo_step, packed_logps, packed_sft_step
from .packing import PackedBatch, pack_preferences, pack_sft


class NonFiniteError(RuntimeError):
    """Raised when the loss or the gradient norm stops being finite."""


@dataclass
class TrainConfig:
    """Hyperparameters of one training stage (SFT or DPO).

    DPO-specific fields (ignored by SFT): beta, loss_type, label_smoothing, rpo_alpha,
    average_logps, cache_reference. The defaults follow the paper's (beta 0.1, sigmoid loss).
    """

    steps: int = 200
    batch_size: int = 16  # pairs for DPO (the batch has 2x this many rows), sequences for SFT
    lr: float = 1e-3
    warmup_steps: int = 10
    schedule: str = "constant"  # or "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 100
    eval_batch_size: int = 16  # pairs (or sequences) per no-gradient forward: reference cache, eval
    # DPO
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    reference_free: bool = False  # treat log pi_ref as 0 (the reference-free variant)
    average_logps: bool = False  # per-token mean log-probs (IPO's official convention)
    cache_reference: bool = True
    # layout (minidpo.packing): the prompt once per pair, and sequences packed into rows instead
    # of padded to the longest; the same numbers as the padded batch, less work
    share_prompt: bool = True  # DPO: [x | y_w | y_l] with a block mask (policy, reference, eval)
    pack: bool = True  # SFT and DPO: sequences packed into rows, block-diagonal mask
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training options: {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# batch order: a pure function of (seed, step)
# ---------------------------------------------------------------------------------------------


def batch_for_step(step: int, n_items: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the examples in batch number ``step``: epoch e = step // steps_per_epoch is a
    permutation drawn from ``default_rng([seed, e])``, cut into batches (the last partial batch
    of an epoch is dropped). Shape (batch_size,) int64, or fewer if n_items < batch_size."""
    if n_items <= 0:
        raise ValueError("no training examples")
    bs = min(batch_size, n_items)
    per_epoch = n_items // bs
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)
    return perm[k * bs : (k + 1) * bs]


# ---------------------------------------------------------------------------------------------
# forward passes without gradients (reference log-probs, evaluation)
# ---------------------------------------------------------------------------------------------


def inference_logits(params: dict, idx, model_config: GPTConfig, validate: bool = True):
    """The logits of :func:`minidpo.model.gpt_forward` for a forward pass that will not be
    differentiated (reference log-probs, evaluation): through the KV-cache forward, which keeps
    only each layer's keys and values (2 of the ~20 (B, T, C)-sized arrays a layer's backward
    cache holds). idx (B, T) int -> logits (B, T, V). ``validate=False`` skips the id range
    check (a device read-back on a GPU) for ids already checked on the host."""
    kv = init_kv_cache(params, model_config, idx.shape[0], capacity=idx.shape[1])
    logits, _ = gpt_forward_kv(params, idx, model_config, kv, validate=validate)  # (B, T, V)
    return logits


def batched_sequence_logps(
    params: dict, model_config: GPTConfig, pairs: Sequence, pad_id: int, batch_size: int,
    backend: Backend, average: bool = False, share_prompt: bool = False, pack: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """log pi(y_w|x) and log pi(y_l|x) for every pair, in minibatches, on the host.

    Returns (chosen_logps (N,), rejected_logps (N,)) as float64 NumPy arrays (read-outs): one
    device read-back a minibatch (the token ids are checked once, on the host, first).
    ``share_prompt`` / ``pack``: the minibatches in minidpo.packing's layout (same numbers)."""
    check_token_ids(pairs, model_config.vocab_size, "preference pair")
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        if share_prompt or pack:
            pb = pack_preferences(chunk, pad_id, share_prompt, pack, backend=backend, average=average)
            logps = to_numpy(packed_logps(params, model_config, pb)).astype(np.float64)  # (2n,)
            chosen.append(logps[: len(chunk)])
            rejected.append(logps[len(chunk) :])
            continue
        batch = collate_preferences(chunk, pad_id, backend=backend)
        logits = inference_logits(params, batch["input_ids"], model_config, validate=False)  # (2n, T, V)
        logps, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], average=average,
                                  validate=False)  # (2n,)
        del logits, _  # free this chunk's (2n, T, V) logits before the next chunk's forward
        logps = to_numpy(logps).astype(np.float64)
        n = len(chunk)
        chosen.append(logps[:n])
        rejected.append(logps[n:])
    return np.concatenate(chosen), np.concatenate(rejected)


def evaluate_preferences(
    policy: dict, model_config: GPTConfig, pairs: Sequence, ref_chosen: np.ndarray,
    ref_rejected: np.ndarray, pad_id: int, tc: TrainConfig, backend: Backend,
) -> dict:
    """The DPO loss and the preference metrics (rewards/accuracies, margins, ...) on held-out
    pairs, as host floats; keys are prefixed with ``eval/``."""
    pc, pr = batched_sequence_logps(policy, model_config, pairs, pad_id, tc.eval_batch_size, backend, tc.average_logps,
                                    tc.share_prompt, tc.pack)
    out = dpo_loss(pc, pr, ref_chosen, ref_rejected, beta=tc.beta, loss_type=tc.loss_type,
                   label_smoothing=tc.label_smoothing, reference_free=tc.reference_free)
    m = {"loss": float(np.mean(out.losses))}
    m.update({k: float(v) for k, v in preference_metrics(out, pc, pr).items()})
    return {f"eval/{k}": v for k, v in m.items()}


# ---------------------------------------------------------------------------------------------
# one step of each stage: forward, loss, backward
# ---------------------------------------------------------------------------------------------


def dpo_step(params: dict, model_config: GPTConfig, batch: dict, ref_chosen, ref_rejected, tc: TrainConfig):
    """Loss, metrics and gradients of one DPO step on a concatenated batch.

    batch: ``input_ids`` (2N, T) int, ``loss_mask`` (2N, T) bool; rows [chosen; rejected].
    ref_chosen, ref_rejected: (N,) device arrays of log pi_ref(y|x), constants.
    Returns (loss (0-d device array), metrics dict of 0-d device arrays, grads dict).

    A batch {"packed": packing.PackedBatch} (shared prompts, packed rows) runs
    packed_model.packed_dpo_step: the same loss and gradients."""
    if "packed" in batch:
        return packed_dpo_step(params, model_config, batch["packed"], ref_chosen, ref_rejected, tc)
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    n = input_ids.shape[0] // 2
    # token ids and non-empty responses were checked once for the whole dataset
    # (check_token_ids), so the per-step value checks, a host sync each on a GPU, are skipped
    logits, model_cache = gpt_forward(params, input_ids, model_config, validate=False)  # (2N, T, V)
    logps, lp_cache = sequence_logps(logits, input_ids, loss_mask, average=tc.average_logps, validate=False)  # (2N,)
    del logits
    policy_chosen, policy_rejected = logps[:n], logps[n:]  # (N,), (N,)
    xp = get_array_module(logps)
    kwargs = {}
    if tc.rpo_alpha:
        # the NLL term is a per-token mean: summed log-probs are divided by their token counts;
        # per-token-mean log-probs (average_logps) already are, so their counts are ones
        counts = lp_cache["token_counts"][:n]
        kwargs["rpo_alpha"] = tc.rpo_alpha
        kwargs["chosen_token_counts"] = xp.ones_like(counts) if tc.average_logps else counts
    out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=tc.beta,
                   loss_type=tc.loss_type, label_smoothing=tc.label_smoothing,
                   reference_free=tc.reference_free, **kwargs)
    # eq. 9: the gradient reaches the two log-probs with weight sigma(r_l - r_w), opposite signs
    dlogps = xp.concatenate([out.grad_policy_chosen_logps, out.grad_policy_rejected_logps])  # (2N,)
    # the logits are not needed again: their buffer becomes dlogits (one (2N, T, V) array, not two)
    dlogits = sequence_logps_backward(dlogps.astype(logps.dtype, copy=False), lp_cache, overwrite_logits=True)
    grads = gpt_backward(dlogits, model_cache)
    metrics = preference_metrics(out, policy_chosen, policy_rejected)
    return out.loss, metrics, grads


def sft_step(params: dict, model_config: GPTConfig, batch: dict):
    """Negative log-likelihood of the response tokens (per-token mean over the batch).

    batch: ``input_ids`` (B, T) int, ``loss_mask`` (B, T) bool over response tokens.
    Returns (loss (0-d device array), grads dict). A packing.PackedBatch runs
    packed_model.packed_sft_step (the same loss and gradients)."""
    if isinstance(batch, PackedBatch):
        return packed_sft_step(params, model_config, batch)
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    logits, model_cache = gpt_forward(params, input_ids, model_config, validate=False)  # (B, T, V)
    logps, lp_cache = sequence_logps(logits, input_ids, loss_mask, validate=False)  # (B,) summed
    del logits
    xp = get_array_module(logps)
    # per-token mean over the whole batch: L = -sum_b logps_b / sum_b n_b
    n_tokens = xp.maximum(loss_mask[:, 1:].sum(), 1).astype(logps.dtype)
    loss = -logps.sum() / n_tokens
    dlogps = xp.full(logps.shape, -1.0, dtype=logps.dtype) / n_tokens  # (B,)
    dlogits = sequence_logps_backward(dlogps, lp_cache, overwrite_logits=True)  # reuses the logits buffer
    return loss, gpt_backward(dlogits, model_cache)


# ---------------------------------------------------------------------------------------------
# the loop shared by both stages
# ---------------------------------------------------------------------------------------------


class _StopRequested:
    """SIGINT sets a flag; the loop checks it between steps, so parameters are never saved
    half-updated."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# options that may change between an interrupted run and its resumption without a warning
_RESUMABLE_CHANGES = {"steps", "progress", "log_every", "eval_every", "save_every", "eval_batch_size",
                      "share_prompt", "pack"}  # the layout changes float32 round-off only


@dataclass
class StageResult:
    params: dict
    step: int
    history: list = field(default_factory=list)
    stopped_early: bool = False


def _run_loop(
    stage: str, params: dict, model_config: GPTConfig, tc: TrainConfig, n_items: int,
    make_batch: Callable[[np.ndarray], dict], step_fn: Callable, out_dir: Path, backend: Backend,
    eval_fn: Callable[[dict], dict] | None = None, resume: bool = True,
) -> StageResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoint"
    metrics_path = out_dir / "metrics.jsonl"
    opt = AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    step = 0
    if resume and has_checkpoint(ckpt_dir):
        ck = load_checkpoint(ckpt_dir, backend=backend)
        if ck.config.get("model") != model_config.to_dict():
            raise ValueError(f"{ckpt_dir}: checkpoint model config differs from this run's; use a new --out")
        saved_tc = ck.config.get("train", {})
        changed = sorted(k for k, v in tc.to_dict().items()
                         if k not in _RESUMABLE_CHANGES and k in saved_tc and saved_tc[k] != v)
        if changed:
            warnings.warn(f"{ckpt_dir}: resuming with training options that differ from the checkpoint's: "
                          + ", ".join(f"{k} {saved_tc[k]!r} -> {tc.to_dict()[k]!r}" for k in changed), stacklevel=3)
        for k in params:
            params[k][...] = ck.params[k]
        if ck.optimizer_state is not None:
            opt.load_state_dict(ck.optimizer_state)
        step = int(ck.step)
        if metrics_path.exists():  # drop records logged after the checkpoint: they will be redone
            kept = [l for l in metrics_path.read_text(encoding="utf-8").splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= step]
            metrics_path.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    def save(at_step: int) -> None:
        save_checkpoint(ckpt_dir, params, {"model": model_config.to_dict(), "train": tc.to_dict(), "stage": stage},
                        step=at_step, optimizer_state=opt.state_dict())

    xp = backend.xp
    history = []
    finite = xp.ones((), dtype=bool)  # device flag: all losses and grad norms finite since last check
    sums: dict = {}
    n_acc = 0
    last_good_step = step
    t0 = time.perf_counter()
    stopped = False
    bar = _progress(tc.steps, step, stage, tc.progress)

    def check_finite(at_step: int) -> None:
        if not bool(finite):
            raise NonFiniteError(
                f"{stage}: non-finite loss or gradient between steps {last_good_step} and {at_step}; "
                f"training stopped. The last good checkpoint is {ckpt_dir} (step {last_good_step}); "
                f"try a lower learning rate or a smaller beta."
            )

    if eval_fn is not None and step == 0 and tc.steps > 0:  # the starting point, for the curves
        rec = {"stage": stage, "step": 0, **eval_fn(params)}
        _append_jsonl(metrics_path, rec)
        history.append(rec)
    with _StopRequested() as stop:
        try:
            while step < tc.steps:
                idx = batch_for_step(step, n_items, tc.batch_size, tc.seed)
                batch = make_batch(idx)
                loss, metrics, grads = step_fn(params, batch)
                # the global norm before clipping (max_norm inf: measured only)
                gnorm = clip_grad_norm(grads, tc.grad_clip if tc.grad_clip > 0 else math.inf)
                finite = finite & xp.isfinite(loss) & xp.isfinite(gnorm)
                lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
                opt.step(params, grads, lr=lr)
                del grads, batch  # free them before the next step's forward, not after it
                step += 1
                # accumulate device scalars; read them back once per log interval
                for k, v in {"loss": loss, "grad_norm": gnorm, **metrics}.items():
                    sums[k] = sums[k] + v if k in sums else v
                n_acc += 1
                bar.update(1)
                is_last = step == tc.steps
                if step % tc.log_every == 0 or is_last or stop.requested:
                    check_finite(step)
                    last_good_step = step
                    rec = {"stage": stage, "step": step, "lr": lr, "time_s": round(time.perf_counter() - t0, 3)}
                    rec.update({k: float(v) / n_acc for k, v in sums.items()})
                    sums, n_acc = {}, 0
                    _append_jsonl(metrics_path, rec)
                    history.append(rec)
                    post = {"loss": f"{rec['loss']:.4f}"}
                    if "rewards/accuracies" in rec:
                        post["acc"] = f"{rec['rewards/accuracies']:.2f}"
                        post["margin"] = f"{rec['rewards/margins']:.3f}"
                    bar.set_postfix(post)
                if eval_fn is not None and (step % tc.eval_every == 0 or is_last):
                    rec = {"stage": stage, "step": step, **eval_fn(params)}
                    _append_jsonl(metrics_path, rec)
                    history.append(rec)
                    bar.write(f"[{stage} step {step}] " + "  ".join(
                        f"{k[5:]}={v:.4f}" for k, v in rec.items() if k.startswith("eval/")))
                if (step % tc.save_every == 0 and not is_last) or stop.requested:
                    check_finite(step)
                    save(step)
                if stop.requested:
                    bar.write(f"[{stage}] interrupted: checkpoint saved at step {step} in {ckpt_dir}; "
                              f"run the same command again to resume.")
                    stopped = True
                    break
        finally:
            bar.close()
    if not stopped:
        check_finite(step)
        save(step)
    return StageResult(params=params, step=step, history=history, stopped_early=stopped)


def check_token_ids(rows, vocab_size: int, what: str) -> None:
    """Once per dataset, on the host: every token id fits the model's vocabulary and every
    response has at least one token (what the training step then no longer checks).

    rows: TokenizedSFT items or TokenizedPair items."""
    for i, r in enumerate(rows):
        seqs = [r.prompt_ids, r.response_ids] if hasattr(r, "response_ids") else [r.prompt_ids, r.chosen_ids, r.rejected_ids]
        if any(len(s) == 0 for s in seqs[1:]):
            raise ValueError(f"{what} item {i} ({getattr(r, 'source', '')}): empty response")
        hi = max(max(s) for s in seqs if s)
        lo = min(min(s) for s in seqs if s)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{what} item {i} ({getattr(r, 'source', '')}): token id {hi if hi >= vocab_size else lo} "
                             f"outside the model's vocabulary [0, {vocab_size}); was it tokenized with another tokenizer?")


# ---------------------------------------------------------------------------------------------
# the two stages
# ---------------------------------------------------------------------------------------------


def train_sft(
    params: dict, model_config: GPTConfig, items: Sequence, pad_id: int, tc: TrainConfig,
    out_dir: str | Path, backend: Backend | str = "cpu", eval_items: Sequence | None = None, resume: bool = True,
) -> StageResult:
    """Stage 1, pi_SFT: minimise the per-token NLL of the responses of ``items``
    (tokenized (prompt, response) pairs from :func:`minidpo.data.tokenize_sft`).

    ``params`` are updated in place and also returned. Checkpoints and ``metrics.jsonl`` go to
    ``out_dir``; an existing checkpoint there is resumed from (``resume=True``)."""
    backend = get_backend(backend)
    if not items:
        raise ValueError("SFT needs at least one example")
    check_token_ids(items, model_config.vocab_size, "SFT")
    if eval_items:
        check_token_ids(eval_items, model_config.vocab_size, "held-out SFT")

    def make_batch(idx):
        if tc.pack:
            return pack_sft([items[i] for i in idx], pad_id, backend=backend)
        return collate_sft([items[i] for i in idx], pad_id, backend=backend)

    def step_fn(p, batch):
        loss, grads = sft_step(p, model_config, batch)
        return loss, {}, grads

    eval_fn = None
    if eval_items:
        def eval_fn(p):
            tot, ntok = 0.0, 0
            for s in range(0, len(eval_items), tc.eval_batch_size):
                chunk = list(eval_items[s : s + tc.eval_batch_size])
                if tc.pack:
                    logps = packed_logps(p, model_config, pack_sft(chunk, pad_id, backend=backend))
                else:
                    batch = collate_sft(chunk, pad_id, backend=backend)
                    logits = inference_logits(p, batch["input_ids"], model_config, validate=False)  # ids checked above
                    logps, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], validate=False)
                    del logits
                tot += float(logps.sum())  # one read-back a chunk
                ntok += sum(len(t.response_ids) for t in chunk)  # the loss mask's tokens, counted on the host
            nll = -tot / max(ntok, 1)
            return {"eval/nll": nll, "eval/perplexity": math.exp(min(nll, 50.0))}

    return _run_loop("sft", params, model_config, tc, len(items), make_batch, step_fn, Path(out_dir), backend,
                     eval_fn=eval_fn, resume=resume)


def train_dpo(
    policy: dict, reference: dict, model_config: GPTConfig, pairs: Sequence, pad_id: int, tc: TrainConfig,
    out_dir: str | Path, backend: Backend | str = "cpu", eval_pairs: Sequence | None = None, resume: bool = True,
) -> StageResult:
    """Stage 2: minimise the DPO loss (eq. 7, or the variant ``tc.loss_type``) of ``policy``
    against the frozen ``reference`` on tokenized preference ``pairs``.

    ``policy`` is updated in place; ``reference`` is never written. With
    ``tc.cache_reference`` the reference log-probs of every training and held-out pair are
    computed once here; otherwise each step runs the reference forward pass on its batch."""
    backend = get_backend(backend)
    if not pairs:
        raise ValueError("DPO needs at least one preference pair")
    check_token_ids(pairs, model_config.vocab_size, "preference pair")
    if eval_pairs:
        check_token_ids(eval_pairs, model_config.vocab_size, "held-out preference pair")
    if tc.cache_reference:
        ref_c, ref_r = batched_sequence_logps(reference, model_config, pairs, pad_id, tc.eval_batch_size,
                                              backend, tc.average_logps, tc.share_prompt, tc.pack)
        ref_c = backend.asarray(ref_c.astype(np.float32))
        ref_r = backend.asarray(ref_r.astype(np.float32))

    packed = tc.share_prompt or tc.pack

    def make_batch(idx):
        if packed:
            pb = pack_preferences([pairs[i] for i in idx], pad_id, tc.share_prompt, tc.pack, backend=backend,
                                  average=tc.average_logps)
            if tc.cache_reference:
                didx = backend.asarray(idx)
                ref = ref_c[didx], ref_r[didx]
            else:
                logps = packed_logps(reference, model_config, pb)  # (2N,)
                ref = logps[: len(idx)], logps[len(idx) :]
            return {"packed": pb, "ref_chosen": ref[0], "ref_rejected": ref[1]}
        batch = collate_preferences([pairs[i] for i in idx], pad_id, backend=backend)
        if tc.cache_reference:
            didx = backend.asarray(idx)
            batch["ref_chosen"], batch["ref_rejected"] = ref_c[didx], ref_r[didx]
        else:
            logits = inference_logits(reference, batch["input_ids"], model_config, validate=False)
            logps, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], average=tc.average_logps,
                                      validate=False)
            del logits
            n = len(idx)
            batch["ref_chosen"], batch["ref_rejected"] = logps[:n], logps[n:]
        return batch

    def step_fn(p, batch):
        return dpo_step(p, model_config, batch, batch["ref_chosen"], batch["ref_rejected"], tc)

    eval_fn = None
    if eval_pairs:
        e_ref_c, e_ref_r = batched_sequence_logps(reference, model_config, eval_pairs, pad_id, tc.eval_batch_size,
                                                  backend, tc.average_logps, tc.share_prompt, tc.pack)

        def eval_fn(p):
            return evaluate_preferences(p, model_config, eval_pairs, e_ref_c, e_ref_r, pad_id, tc, backend)

    return _run_loop("dpo", policy, model_config, tc, len(pairs), make_batch, step_fn, Path(out_dir), backend,
                     eval_fn=eval_fn, resume=resume)
