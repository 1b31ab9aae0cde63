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

import functools
import inspect
import json
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import fast
from .backend import Backend, get_array_module, get_backend
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .data import check_token_ids, collate_preferences, collate_sft
from .losses import dpo_loss, preference_metrics
from .model import GPTConfig, gpt_backward, gpt_forward
from .optim import AdamW, clip_grad_norm, lr_at
from .scoring import batch_logps, batched_sequence_logps, chunked_logps


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
    progress: bool = True
    plain: bool = False  # run the plain reference (layers.py, logprobs.py) instead of the fast paths

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


def evaluate_preferences(
    policy: dict, model_config: GPTConfig, pairs: Sequence, ref_chosen: np.ndarray,
    ref_rejected: np.ndarray, pad_id: int, tc: TrainConfig, backend: Backend,
) -> dict:
    """The DPO loss and the preference metrics (rewards/accuracies, margins, ...) on held-out
    pairs, as host floats; keys are prefixed with ``eval/``."""
    pc, pr = batched_sequence_logps(policy, model_config, pairs, pad_id, tc.eval_batch_size, backend, tc.average_logps)
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
    Returns (loss (0-d device array), metrics dict of 0-d device arrays, grads dict)."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    n = input_ids.shape[0] // 2
    # token ids and non-empty responses were checked once for the whole dataset
    # (check_token_ids), so the per-step value checks, a host sync each on a GPU, are skipped
    logits, model_cache = gpt_forward(params, input_ids, model_config, validate=False)  # (2N, T, V)
    ops = fast.ops()
    logps, lp_cache = ops.sequence_logps(logits, input_ids, loss_mask, average=tc.average_logps, validate=False)  # (2N,)
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
    dlogits = ops.sequence_logps_backward(dlogps.astype(logps.dtype, copy=False), lp_cache, overwrite_logits=True)
    grads = gpt_backward(dlogits, model_cache)
    metrics = preference_metrics(out, policy_chosen, policy_rejected)
    return out.loss, metrics, grads


def sft_step(params: dict, model_config: GPTConfig, batch: dict):
    """Negative log-likelihood of the response tokens (per-token mean over the batch).

    batch: ``input_ids`` (B, T) int, ``loss_mask`` (B, T) bool over response tokens.
    Returns (loss (0-d device array), grads dict)."""
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    logits, model_cache = gpt_forward(params, input_ids, model_config, validate=False)  # (B, T, V)
    ops = fast.ops()
    logps, lp_cache = ops.sequence_logps(logits, input_ids, loss_mask, validate=False)  # (B,) summed
    del logits
    xp = get_array_module(logps)
    # per-token mean over the whole batch: L = -sum_b logps_b / sum_b n_b
    n_tokens = xp.maximum(loss_mask[:, 1:].sum(), 1).astype(logps.dtype)
    loss = -logps.sum() / n_tokens
    dlogps = xp.full(logps.shape, -1.0, dtype=logps.dtype) / n_tokens  # (B,)
    dlogits = ops.sequence_logps_backward(dlogps, lp_cache, overwrite_logits=True)  # reuses the logits buffer
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
_RESUMABLE_CHANGES = {"steps", "progress", "log_every", "eval_every", "save_every", "eval_batch_size"}


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


# ---------------------------------------------------------------------------------------------
# the two stages
# ---------------------------------------------------------------------------------------------


def _on_configured_path(train_fn):
    """Run a stage on the path its TrainConfig names (``tc.plain``: the plain reference)."""
    sig = inspect.signature(train_fn)

    @functools.wraps(train_fn)
    def run(*args, **kwargs):
        with fast.plain(sig.bind(*args, **kwargs).arguments["tc"].plain):
            return train_fn(*args, **kwargs)

    return run


@_on_configured_path
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
        return collate_sft([items[i] for i in idx], pad_id, backend=backend)

    def step_fn(p, batch):
        loss, grads = sft_step(p, model_config, batch)
        return loss, {}, grads

    eval_fn = None
    if eval_items:
        def eval_fn(p):
            tot, ntok = 0.0, 0
            for logps, counts in chunked_logps(p, model_config, eval_items, collate_sft, pad_id, tc.eval_batch_size,
                                               backend):
                tot += float(logps.sum())
                ntok += int(counts.sum())
            nll = -tot / max(ntok, 1)
            return {"eval/nll": nll, "eval/perplexity": math.exp(min(nll, 50.0))}

    return _run_loop("sft", params, model_config, tc, len(items), make_batch, step_fn, Path(out_dir), backend,
                     eval_fn=eval_fn, resume=resume)


@_on_configured_path
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
                                              backend, tc.average_logps)
        ref_c = backend.asarray(ref_c.astype(np.float32))
        ref_r = backend.asarray(ref_r.astype(np.float32))

    def make_batch(idx):
        batch = collate_preferences([pairs[i] for i in idx], pad_id, backend=backend)
        if tc.cache_reference:
            didx = backend.asarray(idx)
            batch["ref_chosen"], batch["ref_rejected"] = ref_c[didx], ref_r[didx]
        else:
            logps, _ = batch_logps(reference, model_config, batch, tc.average_logps, validate=False)
            n = len(idx)
            batch["ref_chosen"], batch["ref_rejected"] = logps[:n], logps[n:]
        return batch

    def step_fn(p, batch):
        return dpo_step(p, model_config, batch, batch["ref_chosen"], batch["ref_rejected"], tc)

    eval_fn = None
    if eval_pairs:
        e_ref_c, e_ref_r = batched_sequence_logps(reference, model_config, eval_pairs, pad_id, tc.eval_batch_size,
                                                  backend, tc.average_logps)

        def eval_fn(p):
            return evaluate_preferences(p, model_config, eval_pairs, e_ref_c, e_ref_r, pad_id, tc, backend)

    return _run_loop("dpo", policy, model_config, tc, len(pairs), make_batch, step_fn, Path(out_dir), backend,
                     eval_fn=eval_fn, resume=resume)
