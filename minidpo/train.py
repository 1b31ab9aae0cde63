"""SFT, then DPO against a frozen reference: the two training loops.

The DPO recipe of the paper (Sec. 4, "DPO outline"):
  1. pi_ref = pi_SFT: fine-tune on the preferred responses with negative log-likelihood
     (:func:`train_sft`);
  2. optimise the DPO loss, eq. (7), of a policy initialised at pi_ref, with pi_ref frozen
     (:func:`train_dpo`).

One DPO step (:func:`dpo_step`), with N preference pairs, E = 2N examples [chosen; rejected], on a
batch (packing.Batch) of R rows of L tokens whose M scored tokens are the responses':

    logits = gpt_forward(policy, batch.input_ids, batch.layout, logits_at=batch.logits_at)  # (M, V)
    logps  = sequence_logps(logits, batch.labels, batch.weights)      # (2N,)  log pi(y|x), eq. 7
    out    = dpo_loss(logps[:N], logps[N:], ref_w, ref_l, beta)       # eq. 7, eq. 8, eq. 9
    dlogps = [out.grad_policy_chosen_logps; out.grad_policy_rejected_logps]   # (2N,)
    dlogits = sequence_logps_backward(dlogps, ...)                    # (M, V)
    grads  = gpt_backward(dlogits, ...)                               # same keys as params

The layout is the batch's data, decided once (:func:`batcher_for`: ``share_prompt``, ``pack``
and the loss's log-prob rule): by default each pair runs its prompt once with both responses
after it, and the sequences are packed into rows instead of padded; ``share_prompt=False,
pack=False`` is the padded batch [x; y_w] / [x; y_l]. The same step, the same model, computes
every layout; the loss, log-probs and gradients are those of the padded batch
(tests/test_packing.py).

The reference log-probs log pi_ref(y|x) are constants of each example, so by default they are
computed once, before training, on the batches the first epoch trains on (:func:`reference_logps`:
at step 0 they equal the policy's bit for bit), and cached in the model's dtype
(``TrainConfig.cache_reference=True``); the alternative recomputes them every step, which costs
one extra forward pass per step and gives the same numbers.

Robustness a user can rely on:
- the batch order is a pure function of (seed, step), so a resumed run replays exactly the
  batches the uninterrupted run would have seen, and resume matches step for step;
- Ctrl-C (SIGINT) finishes the current step, saves a checkpoint, then stops
  (``StageResult.stopped_early``; the command-line tools then exit with status 130);
- a non-finite loss, gradient or updated parameter stops training with
  :class:`NonFiniteError`; checkpoints are only written after a finiteness check of all three,
  so the last one on disk is good, and the message names it;
- a run folder records what its stage was built from (model, training options, fingerprints
  of the data and, for DPO, the reference; see :func:`check_run_folder`): a different run is
  refused (or rebuilt, ``stale="rebuild"``) instead of being resumed under the wrong options;
- metrics go to ``metrics.jsonl`` (one JSON object a line, appended) and a tqdm progress bar;
  device values are read back to the host only once per ``log_every`` steps, and the running
  sums are saved in each checkpoint, so a resumed log equals an uninterrupted one;
- data parallel (``comm=``, :mod:`minidpo.distributed`, ``mpiexec -n K``): every rank takes its
  weighted share of each global batch and K ranks train what one process trains; rank 0 alone
  holds the run folder's lock, checks and writes it, and a Ctrl-C stops every rank after the same step.

The loop (:func:`_run_loop`) is a few small functions: :func:`_resume`, :func:`_train_step`,
:func:`_log`, :func:`_evaluate`, :func:`_save`, and :class:`_StopRequested` for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import fast
from .backend import Backend, get_array_module, get_backend, to_numpy
from .checkpoint import (STATE_FILE, CheckpointError, atomic_write_text, has_checkpoint, is_integer, is_number,
                         load_checkpoint, read_checkpoint_state, save_checkpoint, verify_optimizer_state, verify_params)
from .data import check_token_ids
from .distributed import (SingleProcess, all_reduce_step, collective, gather_concat, gather_scatter, local_shard,
                          make_optimizer, on_rank0, shard_range)
from .losses import dpo_step_loss, preference_metrics
from .model import GPTConfig, gpt_backward, gpt_forward
from .optim import AdamW, clip_grad_norm, lr_at
from .packing import Batch, Batcher
from .scoring import batch_logps, batched_sequence_logps, chunked_logps, wpo_step_weights


class NonFiniteError(RuntimeError):
    """Raised when the loss, the gradient norm or an updated parameter stops being finite."""

    same_on_every_rank = True  # data parallel: decided from all-reduced values (distributed.abort_on_error)


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: it holds a run made with other options or
    inputs, its checkpoint is damaged, or another process is writing to it."""


# options of TrainConfig that change what training computes; the others (logging, evaluation
# and checkpoint cadence, the progress bar) may change between an interrupted run and its resumption
_BOOKKEEPING = ("progress", "log_every", "eval_every", "save_every", "eval_batch_size",
                "share_prompt", "pack")  # the batch layout: the same numbers to float32 round-off


@dataclass
class TrainConfig:
    """Hyperparameters of one training stage (SFT or DPO).

    DPO-specific fields (ignored by SFT): beta, loss_type, loss_options, rpo_alpha, reference_free,
    average_logps, ld_alpha (LD-DPO), wpo (WPO), cache_reference. The defaults follow the paper's
    (beta 0.1, sigmoid loss). What a loss accepts (its options, their ranges, its log-prob rule,
    whether it has a reference) comes from its row of losses.LOSS_TABLE.
    ``adam_betas`` are AdamW's moment decay rates (beta1, beta2), unrelated to DPO's ``beta``.
    Every field is checked on construction (a ValueError names the field).
    """

    steps: int = 200
    batch_size: int = 16  # pairs for DPO (the batch has 2x this many rows), sequences for SFT
    lr: float = 1e-3
    warmup_steps: int = 10
    schedule: str = "constant"  # or "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 100
    eval_batch_size: int = 16  # pairs (or sequences) per no-gradient forward: reference cache, eval
    # DPO
    beta: float = 0.1
    loss_type: str = "sigmoid"  # a row of losses.LOSS_TABLE
    loss_options: dict = field(default_factory=dict)  # that row's options (e.g. label_smoothing); unset: defaults
    rpo_alpha: float = 0.0
    reference_free: bool = False  # treat log pi_ref as 0 (the reference-free variant)
    average_logps: bool | None = None  # per-token mean log-probs; None: the loss's own rule (IPO: True)
    ld_alpha: float = 1.0  # LD-DPO: weight of a pair's longer response past the shorter's length (1: off)
    wpo: bool = False  # WPO: each pair's loss weighted by its responses' length-normalised probability
    cache_reference: bool = True
    # layout (minidpo.packing): the prompt once per pair, and sequences packed into rows instead
    # of padded to the longest; the same numbers as the padded batch, less work
    share_prompt: bool = True  # DPO: [x | y_w | y_l] with a block mask (policy, reference, eval)
    pack: bool = True  # SFT and DPO: sequences packed into rows, block-diagonal mask
    progress: bool = True
    plain: bool = False  # run the plain reference (layers.py, logprobs.py) instead of the fast paths

    def __post_init__(self):
        from .losses import LOSS_TABLE

        self.adam_betas = tuple(float(b) for b in self.adam_betas)

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.steps) and self.steps >= 0, "steps", "an integer >= 0")
        for name in ("batch_size", "log_every", "eval_every", "save_every", "eval_batch_size"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(is_int(self.seed), "seed", "an integer")
        need(is_num(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(self.schedule in ("constant", "cosine"), "schedule", "'constant' or 'cosine'")
        need(is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
             "two numbers in [0, 1) (AdamW's beta1, beta2)")
        need(is_num(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0: no clipping)")
        need(is_num(self.beta) and self.beta > 0, "beta", "a finite number > 0")
        need(self.loss_type in LOSS_TABLE, "loss_type", f"one of {', '.join(LOSS_TABLE)}")
        need(isinstance(self.loss_options, dict), "loss_options", "a dict of the loss's options")
        # the row's checks (names, ranges); only what was set is kept, so a default stays a default
        try:
            checked = LOSS_TABLE[self.loss_type].resolve(self.loss_options)
        except ValueError as err:
            raise ValueError(f"loss_options: {err}") from None
        self.loss_options = {k: checked[k] for k in self.loss_options}
        need(is_num(self.rpo_alpha) and self.rpo_alpha >= 0, "rpo_alpha", "a finite number >= 0")
        need(self.average_logps is None or isinstance(self.average_logps, (bool, np.bool_)), "average_logps",
             "True, False or None (the loss's own rule)")
        need(is_num(self.ld_alpha) and 0 <= self.ld_alpha <= 1, "ld_alpha", "a number in [0, 1] (LD-DPO; 1: off)")
        self.ld_alpha = float(self.ld_alpha)
        need(isinstance(self.wpo, (bool, np.bool_)), "wpo", "True or False")
        row = LOSS_TABLE[self.loss_type]
        if self.wpo and any(r.couples for r in row.components(self.loss_options)):
            raise ValueError(f"wpo: WPO's per-pair weights do not apply to the {self.loss_type!r} loss, which sorts "
                             "the batch's pairs (its per-pair losses are not the pairs')")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss reads log pi_ref: not for reference_free, nor for a loss without a
        reference (SimPO, CPO, ORPO, ...), whose runs skip the reference model entirely."""
        from .losses import LOSS_TABLE

        row = LOSS_TABLE[self.loss_type]
        return not self.reference_free and row.needs_reference(row.resolve(self.loss_options))

    @property
    def logps_averaged(self) -> bool:
        """Whether the DPO log-probs are per-token means: ``average_logps``, or the loss's own rule."""
        from .losses import LOSS_TABLE

        return LOSS_TABLE[self.loss_type].average_logps if self.average_logps is None else bool(self.average_logps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "betas" in d:  # the name of adam_betas in checkpoints written before the rename
            d["adam_betas"] = d.pop("betas")
        if "label_smoothing" in d:  # a top-level field before the loss table held each loss's options
            eps = d.pop("label_smoothing")
            if eps:
                d.setdefault("loss_options", {})["label_smoothing"] = eps
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
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


def batcher_for(tc: TrainConfig, pad_id: int, backend) -> Batcher:
    """The one place a stage's batch layout is decided: ``tc.share_prompt`` and ``tc.pack``, and
    for DPO the log-prob rule (the loss's ``tc.logps_averaged``, LD-DPO's ``tc.ld_alpha``). Every batch of the stage, its
    steps, its reference log-probs and its held-out evaluation, comes from the returned Batcher."""
    return Batcher(pad_id, share_prompt=tc.share_prompt, pack=tc.pack, average=tc.logps_averaged,
                   backend=get_backend(backend), ld_alpha=tc.ld_alpha)


def evaluate_preferences(
    policy: dict, model_config: GPTConfig, pairs: Sequence, ref_chosen: np.ndarray,
    ref_rejected: np.ndarray, batcher: Batcher, tc: TrainConfig, comm=None, inputs: dict | None = None,
) -> dict:
    """The DPO loss (the training step's: :func:`losses.dpo_step_loss`) and the preference metrics
    (rewards/accuracies, margins, ...) on held-out pairs, as host floats; keys are prefixed with
    ``eval/``. The pairs are laid out by ``batcher`` in chunks of ``tc.eval_batch_size``; with a
    ``comm`` of K ranks the log-probs are computed in shares and gathered: every rank returns the
    same numbers. ``inputs``: what the loss's row needs (KTO's z0, BCO's mean: constants); with
    ``tc.wpo`` the pairs' WPO weights are computed here, as the step computes them."""
    pc, pr = batched_sequence_logps(policy, model_config, pairs, batcher, tc.eval_batch_size, comm=comm)
    counts = np.array([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs], dtype=np.int64)
    inputs = dict(inputs or {})
    if tc.wpo:
        from .scoring import batched_wpo_weights

        inputs["pair_weights"] = batched_wpo_weights(policy, model_config, pairs, batcher, tc.eval_batch_size, comm)
    out, _ = dpo_step_loss(np.concatenate([pc, pr]), counts, ref_chosen, ref_rejected, tc, inputs)  # the step's loss
    m = {"loss": float(np.mean(out.losses))}
    m.update({k: float(v) for k, v in preference_metrics(out, pc, pr).items()})
    return {f"eval/{k}": v for k, v in m.items()}


# ---------------------------------------------------------------------------------------------
# one step of each stage: forward, loss, backward
# ---------------------------------------------------------------------------------------------


def dpo_step(params: dict, model_config: GPTConfig, batch: Batch, ref_chosen, ref_rejected, tc: TrainConfig,
             inputs: dict | None = None, before_loss: Callable | None = None):
    """Loss, metrics and gradients of one DPO step on a batch of N pairs, in any layout.

    batch: packing.Batch with E = 2N examples [chosen; rejected] (Batcher.pairs).
    ref_chosen, ref_rejected: (N,) device arrays of log pi_ref(y|x), constants (None for a loss
        without a reference: ``tc.uses_reference`` False).
    inputs: the constants of the step the loss's row names (losses.Loss.inputs: KTO's
        reference_point); with ``tc.wpo`` the step adds WPO's pair_weights from its own logits.
    before_loss: (logps (2N,), ref_chosen, ref_rejected) -> more inputs, called between the forward
        and the loss on the step's own log-probs (BCO's running reward mean is updated there).
    Returns (loss (0-d device array), metrics dict of 0-d device arrays, grads dict)."""
    n = batch.n_examples // 2
    ops = fast.ops()
    # token ids and non-empty responses were checked once for the whole dataset
    # (check_token_ids), so the per-step value checks, a host sync each on a GPU, are skipped
    logits, model_cache = gpt_forward(params, batch.input_ids, model_config, batch.layout,
                                      logits_at=batch.logits_at, validate=False)  # (M, V)
    logps, lp_cache = ops.sequence_logps(logits, batch.labels, batch.weights(logits.dtype))  # (2N,) eq. 7
    del logits
    inputs = dict(inputs or {})
    if tc.wpo:  # WPO: a constant weight per pair from the policy's own token distribution
        inputs["pair_weights"] = wpo_step_weights(lp_cache, batch)
    if before_loss is not None:
        inputs.update(before_loss(logps, ref_chosen, ref_rejected))
    out, dlogps = dpo_step_loss(logps, batch.token_counts, ref_chosen, ref_rejected, tc, inputs)  # eq. 7, eq. 9
    # the logits are not needed again: their buffer becomes dlogits (one (M, V) array, not two)
    dlogits = ops.sequence_logps_backward(dlogps, lp_cache, overwrite_logits=True)  # (M, V)
    grads = gpt_backward(dlogits, model_cache)
    return out.loss, preference_metrics(out, logps[:n], logps[n:]), grads


def sft_step(params: dict, model_config: GPTConfig, batch: Batch):
    """Negative log-likelihood of the response tokens (per-token mean over the batch):
    L = -sum_b logps_b / sum_b n_b, on a packing.Batch of B items (Batcher.sft), any layout.
    Returns (loss (0-d device array), grads dict)."""
    ops = fast.ops()
    logits, model_cache = gpt_forward(params, batch.input_ids, model_config, batch.layout,
                                      logits_at=batch.logits_at, validate=False)  # (M, V)
    logps, lp_cache = ops.sequence_logps(logits, batch.labels, batch.weights(logits.dtype))  # (B,) summed
    del logits
    xp = get_array_module(logps)
    n_tokens = logps.dtype.type(max(int(batch.host_token_counts.sum()), 1))  # counted on the host
    loss = -logps.sum() / n_tokens
    dlogps = xp.full(logps.shape, -1.0, dtype=logps.dtype) / n_tokens  # (B,)
    dlogits = ops.sequence_logps_backward(dlogps, lp_cache, overwrite_logits=True)  # reuses the logits buffer
    return loss, gpt_backward(dlogits, model_cache)


# ---------------------------------------------------------------------------------------------
# the loop shared by both stages
# ---------------------------------------------------------------------------------------------


class _StopRequested:
    """SIGINT sets a flag; the loop checks it between steps, so parameters are never saved
    half-updated. A second SIGINT raises KeyboardInterrupt at once (nothing more is saved; the
    last checkpoint on disk stays as it was)."""

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


TEST_INTERRUPT_ENV = "MINIDPO_TEST_INTERRUPT_AT"


def interrupt_hook(name: str) -> None:
    """For tests only: when the environment variable ``MINIDPO_TEST_INTERRUPT_AT`` equals
    ``name`` (e.g. ``sft:step=5``: after SFT's 5th step; ``dpo:start``; ``pairs``,
    ``evaluation``, ``evaluation-dpo`` in examples/train_tiny.py), the process sends itself a
    real SIGINT, exactly as a Ctrl-C at that moment would. Unset (always, outside tests), it
    does nothing."""
    if os.environ.get(TEST_INTERRUPT_ENV) == name:
        os.kill(os.getpid(), signal.SIGINT)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def say(msg: str) -> None:
    """One status line on stdout (resume notes, interrupts), flushed at once."""
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# run folders: what a stage was built from, one writer at a time, metrics.jsonl
# ---------------------------------------------------------------------------------------------


def fingerprint(obj) -> str:
    """A short content hash (16 hex digits of SHA-256) of a parameter dict (names, dtypes, shapes,
    bytes), of tokenized examples (their token ids), or of any JSON-able value. Two runs built
    from equal inputs get equal fingerprints."""
    h = hashlib.sha256()
    if isinstance(obj, dict) and obj and all(hasattr(v, "dtype") for v in obj.values()):
        for k in sorted(obj):
            a = np.ascontiguousarray(to_numpy(obj[k]))
            h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    elif isinstance(obj, (list, tuple)) and obj and hasattr(obj[0], "prompt_ids"):
        for r in obj:
            seqs = [r.prompt_ids, r.response_ids] if hasattr(r, "response_ids") else [r.prompt_ids, r.chosen_ids, r.rejected_ids]
            h.update(json.dumps([list(map(int, q)) for q in seqs]).encode())
    else:
        h.update(json.dumps(obj, sort_keys=True).encode())
    return h.hexdigest()[:16]


_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): the lock is re-entrant within a process


@contextlib.contextmanager
def run_lock(out_dir: str | Path):
    """Hold ``out_dir/.lock`` (an advisory ``flock``, holding our pid) while a stage writes the
    folder; another process asking for it gets a RunFolderError naming the holder's pid. The file
    is removed when the lock is released (a finished run leaves no .lock behind); the lock itself
    goes with the process, so a killed run never leaves the folder locked. (No-op where
    ``fcntl`` is missing.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = str((out_dir / ".lock").resolve())
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    while True:
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"{out_dir} is in use by another process (pid {holder}); wait for it to finish, "
                                 f"or use another --out") from None
        try:
            if os.stat(key).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a .lock its holder removed on release: lock the file now in its place
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(key)  # removed while still held, so no other process holds a lock on a removed file
        os.close(fd)  # releases the flock


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A torn last line (a write cut short by a kill or a full
    disk) is dropped with a warning naming the file; a bad line before the last one is an error
    naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if all(not rest.strip() for rest in lines[i:]):  # the last record: torn
                warnings.warn(f"{path}:{i}: dropped a torn last record ({len(line)} characters)", stacklevel=2)
                break
            raise RunFolderError(f"{path}:{i}: corrupt metrics record ({err})") from None
        records.append(rec)
    return records


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def discard_stage(out_dir: str | Path) -> None:
    """Remove what a stage wrote in ``out_dir`` (its checkpoint and metrics.jsonl), for a rebuild
    or ``--overwrite``; other files are left alone."""
    out_dir = Path(out_dir)
    for d in (out_dir / "checkpoint", out_dir / "checkpoint.old"):
        if d.is_dir():
            shutil.rmtree(d)
    for f in (out_dir / "metrics.jsonl",):
        f.unlink(missing_ok=True)


def _differences(saved: dict, stage: str, model_config: GPTConfig, tc: TrainConfig, inputs: dict,
                 at_step: int) -> list[str]:
    """What makes a saved run (its checkpoint's config) a different run from this one: one
    phrase per differing stage, model, input or training option. Only ``steps`` may grow, and
    only with the constant schedule (the cosine schedule of the steps already taken depends on
    it); the options in ``_BOOKKEEPING`` may change freely."""
    diffs = []
    if saved.get("stage", stage) != stage:
        diffs.append(f"stage ({saved.get('stage')} there, {stage} now)")
    if saved.get("model") != model_config.to_dict():
        diffs.append("model configuration")
    saved_inputs = saved.get("inputs", {})
    for k in sorted(set(saved_inputs) | set(inputs)):
        if saved_inputs.get(k) != inputs.get(k):
            diffs.append(f"{k} ({saved_inputs.get(k, 'absent')} there, {inputs.get(k, 'absent')} now)")
    saved_tc = dict(saved.get("train", {}))
    try:  # in today's field names (a checkpoint written before a rename reads the same)
        saved_tc = TrainConfig.from_dict(saved_tc).to_dict()
    except (TypeError, ValueError):
        pass  # an option that is no longer valid: compared as saved, so it shows as a difference
    now = tc.to_dict()
    for k, v in now.items():
        if k in _BOOKKEEPING or k not in saved_tc or saved_tc[k] == v:
            continue
        if k == "steps":
            if at_step > v:
                diffs.append(f"steps (the checkpoint is at step {at_step}, beyond {v}: nothing to train)")
            elif tc.schedule == "cosine":
                diffs.append(f"steps ({saved_tc[k]} there, {v} now; the cosine schedule of the steps taken depends on it)")
            continue
        diffs.append(f"{k} ({saved_tc[k]!r} there, {v!r} now)")
    return diffs


def check_run_folder(out_dir: str | Path, stage: str, model_config: GPTConfig, tc: TrainConfig,
                     inputs: dict | None = None) -> int | None:
    """Can a ``stage`` run with these settings use ``out_dir``? Reads only trainer_state.json.

    Returns None when the folder holds no checkpoint (a fresh run), else the checkpoint's step
    (the run resumes there, or is already complete when it is >= tc.steps). Raises
    RunFolderError naming every difference when the checkpoint was made by a run with other
    options or inputs (see :func:`_differences`), and CheckpointError for a damaged checkpoint
    (for instance weights without a trainer_state.json: never treated as absent, never overwritten).
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoint"
    if not has_checkpoint(ckpt_dir):
        if ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(ckpt_dir.iterdir())):
            raise CheckpointError(f"{ckpt_dir} exists but holds no trainer_state.json: a damaged checkpoint, left as "
                                  f"it is; move it away to start afresh, or use --overwrite")
        return None
    state = read_checkpoint_state(ckpt_dir)
    step = int(state["step"])
    diffs = _differences(state["config"], stage, model_config, tc, inputs or {}, step)
    if diffs:
        raise RunFolderError(f"{out_dir}: its {state['config'].get('stage', stage)} run was made with other settings: "
                             + "; ".join(diffs) + ". Use a new --out, or --overwrite to discard that run")
    return step


def check_run_options(out_dir: str | Path, options: dict, overwrite: bool, owned: Sequence[str]) -> None:
    """A script's run folder (examples/train_tiny.py, frontier.py): ``out_dir/run.json`` records
    the options that change its results. A re-run with other values raises RunFolderError naming
    each, before anything is written; so does a folder holding the script's outputs (the entries
    matching a pattern of ``owned``, fnmatch style) but no run.json. ``overwrite`` removes those
    outputs and run.json first. Writes run.json when absent."""
    import fnmatch

    out_dir, path = Path(out_dir), Path(out_dir) / "run.json"
    outputs = [c for c in (out_dir.iterdir() if out_dir.is_dir() else []) if any(fnmatch.fnmatch(c.name, p) for p in owned)]
    if not overwrite and path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:
            raise RunFolderError(f"{path}: corrupt JSON ({err}); use another --out, or --overwrite") from None
        diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} there, {v!r} now"
                 for k, v in options.items() if saved.get(k) != v]
        if diffs:
            raise RunFolderError(f"{out_dir} holds a run made with other options ({'; '.join(diffs)}); "
                                 f"use another --out, or --overwrite to discard it")
        return
    if not overwrite and outputs:
        raise RunFolderError(f"{out_dir} holds a run without run.json (its options are unknown); "
                             f"use another --out, or --overwrite to discard it")
    for child in outputs + ([path] if path.exists() else []):  # --overwrite: only what the script writes
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(options, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# the loop shared by both stages, in small pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    """What a stage returns. ``stopped_early``: interrupted (Ctrl-C) after saving a checkpoint at
    ``step``; ``resumed_from``: the checkpoint step it continued from (None for a fresh start);
    ``already_complete``: the folder's checkpoint had reached ``tc.steps``, nothing was trained."""

    params: dict
    step: int
    history: list = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int | None = None
    already_complete: bool = False


class _Accumulator:
    """Sums of the per-step device scalars (loss, grad norm, DPO metrics) between two log records,
    read back to the host once per record. Its state is saved in each checkpoint, so the record
    spanning an interruption averages the same steps, in the same order, as an uninterrupted run."""

    def __init__(self, xp):
        self.xp = xp
        self.sums: dict = {}
        self.n = 0
        self.finite = xp.ones((), dtype=bool)  # every loss and grad norm finite since the last check

    def add(self, values: dict) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.finite = self.finite & self.xp.isfinite(values["loss"]) & self.xp.isfinite(values["grad_norm"])
        self.n += 1

    def means(self) -> dict:
        out = {k: float(v) / self.n for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out

    def state_dict(self) -> dict:
        # a float32 device scalar read as a Python float is exact, and adding the next float32
        # step value to it rounds to float32 again: resumed sums equal uninterrupted ones bit for bit
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        self.sums = {k: self.xp.asarray(v, dtype=self.xp.float32) for k, v in d.get("sums", {}).items()}
        self.n = int(d.get("n", 0))


@dataclass
class _Loop:
    """Everything one stage's loop carries between its small functions."""

    stage: str
    params: dict
    model_config: GPTConfig
    tc: TrainConfig
    out_dir: Path
    backend: Backend
    inputs: dict
    comm: SingleProcess = None  # or an MPI/NCCL communicator (distributed.py): rank 0 alone writes the folder
    opt: AdamW = None  # made by distributed.make_optimizer: AdamW, or ZeroAdamW (moments sharded over the ranks)
    acc: _Accumulator = None
    step: int = 0
    elapsed_s: float = 0.0  # training time before this process (restored from the checkpoint)
    t0: float = 0.0
    last_saved: int | None = None  # step of the last good checkpoint on disk
    history: list = field(default_factory=list)
    state: dict | None = None  # the stage's own numbers carried across steps (BCO's running mean), checkpointed

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def kept_checkpoint(self) -> str:
        if self.last_saved is None:
            return "no checkpoint of this run was written yet"
        return f"the last good checkpoint is {self.ckpt_dir} (step {self.last_saved}), intact"


def _resume(L: _Loop, resume: bool, stale: str) -> int | None:
    """Restore parameters, optimizer, logging accumulators and the step from ``L.out_dir``'s
    checkpoint when it holds one made by the same run; returns that step (None: fresh start).

    stale: what to do when the checkpoint was made by a different run (see check_run_folder):
    "raise" (RunFolderError) or "rebuild" (discard it and start afresh).

    With K ranks, rank 0 alone checks and changes the folder; every rank then loads the same
    checkpoint (the other ranks never write to the folder)."""

    def decide() -> int | None:
        if resume:
            try:
                at = check_run_folder(L.out_dir, L.stage, L.model_config, L.tc, L.inputs)
            except RunFolderError as err:
                if stale != "rebuild":
                    raise
                say(f"[{L.stage}] {L.out_dir} was built from other inputs or options; rebuilding it ({err})")
                discard_stage(L.out_dir)
                at = None
        else:  # start afresh; a checkpoint already there is replaced only by this run's first save
            at = None
        if at is None:
            L.metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        return at

    at = on_rank0(L.comm, decide)  # rank 0's verdict, on every rank (its error, raised on every rank)
    if at is None:
        return None
    ck = load_checkpoint(L.ckpt_dir, backend=L.backend)
    verify_params(ck.params, L.model_config, L.ckpt_dir, like=L.params)
    _verify_loop_state(ck)
    verify_optimizer_state(ck, L.params, {k: getattr(L.opt, k) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")})
    for k in L.params:
        L.params[k][...] = ck.params[k]  # same shape and dtype: checked above
    L.opt.load_state_dict(ck.optimizer_state)
    L.step = L.last_saved = int(ck.step)
    L.acc.load_state_dict(ck.extra.get("log_accumulator", {}))
    L.elapsed_s = float(ck.extra.get("elapsed_s", 0.0))
    if L.state is not None:
        _restore_stage_state(L, ck)
    if L.comm.rank == 0:  # drop records logged after the checkpoint (they will be redone), through a temporary file
        kept = [r for r in read_metrics(L.metrics_path) if r.get("step", 0) <= L.step]
        atomic_write_text(L.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    return L.step


def _verify_loop_state(ck) -> None:
    """The loop's own entries of a checkpoint, checked before they are restored: its step within
    the steps the run planned, the elapsed time a number, the logging sums numbers over a count.
    CheckpointError naming trainer_state.json and the key."""
    where = ck.path / STATE_FILE
    train = ck.config.get("train")
    planned = train.get("steps") if isinstance(train, dict) else None
    if is_integer(planned) and ck.step > planned:
        raise CheckpointError(f"{where}: 'step' is {ck.step}, beyond the {planned} steps the run planned "
                              f"('train.steps')")
    elapsed, acc = ck.extra.get("elapsed_s", 0.0), ck.extra.get("log_accumulator", {})
    if not (is_number(elapsed) and elapsed >= 0):
        raise CheckpointError(f"{where}: 'extra.elapsed_s' must be a number >= 0, got {elapsed!r}")
    sums, n = (acc.get("sums", {}), acc.get("n", 0)) if isinstance(acc, dict) else (None, None)
    if not (isinstance(sums, dict) and all(map(is_number, sums.values())) and is_integer(n) and n >= 0):
        raise CheckpointError(f"{where}: 'extra.log_accumulator' must be {{\"sums\": {{name: number}}, \"n\": "
                              f"integer >= 0}}, got {acc!r:.80}")


def _restore_stage_state(L: _Loop, ck) -> None:
    """The stage's state (its keys, each a number; "count" an integer >= 0) from the checkpoint,
    into L.state; CheckpointError naming trainer_state.json and the key otherwise."""
    where = ck.path / STATE_FILE
    saved = ck.extra.get("stage_state")
    if not isinstance(saved, dict) or set(saved) != set(L.state):
        raise CheckpointError(f"{where}: 'extra.stage_state' must hold {sorted(L.state)} (this loss's state), "
                              f"got {saved!r:.80}")
    for k, v in saved.items():
        ok = is_integer(v) and v >= 0 if k == "count" else is_number(v)
        if not ok:
            raise CheckpointError(f"{where}: 'extra.stage_state.{k}' must be "
                                  f"{'an integer >= 0' if k == 'count' else 'a finite number'}, got {v!r}")
        L.state[k] = v


def _check_finite(L: _Loop, since: int) -> None:
    """The device flag of the accumulator: every loss and gradient norm since ``since`` finite."""
    if not bool(L.acc.finite):
        raise NonFiniteError(
            f"{L.stage}: non-finite loss or gradient between steps {since} and {L.step}; training stopped. "
            f"{L.kept_checkpoint()[0].upper()}{L.kept_checkpoint()[1:]}; try a lower learning rate or a smaller beta.")


def _save(L: _Loop) -> None:
    """Checkpoint at L.step, after checking that the loss, gradients and every updated parameter
    are finite (a non-finite update is never saved over the last good checkpoint). With K ranks
    (identical parameters, so every rank decides alike) rank 0 alone writes, and the others wait
    until the checkpoint is whole."""
    _check_finite(L, L.last_saved or 0)
    xp = L.backend.xp
    bad = [k for k, v in L.params.items() if not bool(xp.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"{L.stage}: parameter {bad[0]} is not finite after step {L.step} "
                             f"({len(bad)} parameter(s) in all); training stopped, nothing saved. "
                             f"{L.kept_checkpoint()[0].upper()}{L.kept_checkpoint()[1:]}; try a lower learning rate.")
    config = {"model": L.model_config.to_dict(), "train": L.tc.to_dict(), "stage": L.stage, "inputs": L.inputs}
    extra = {"log_accumulator": L.acc.state_dict(), "elapsed_s": L.elapsed_s + time.perf_counter() - L.t0}
    if L.state is not None:  # a float32 device scalar read as a Python float is exact: resume is bit for bit
        extra["stage_state"] = {k: int(v) if k == "count" else float(v) for k, v in L.state.items()}
    opt_state = L.opt.state_dict()  # with ZeRO-1 a collective (the moments gathered): every rank calls it
    if L.comm.rank == 0:
        try:
            save_checkpoint(L.ckpt_dir, L.params, config, step=L.step, optimizer_state=opt_state, extra=extra)
        except OSError as err:
            raise OSError(err.errno, f"cannot write the checkpoint {L.ckpt_dir} ({err.strerror or err}); "
                          f"{L.kept_checkpoint()}") from err
    L.comm.barrier()
    L.last_saved = L.step


def _write_record(L: _Loop, rec: dict) -> None:
    """Append ``rec`` to metrics.jsonl (rank 0 alone writes) and to the history (every rank)."""
    try:
        if L.comm.rank == 0:
            _append_jsonl(L.metrics_path, rec)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {L.metrics_path} ({err.strerror or err}); {L.kept_checkpoint()}") from err
    L.history.append(rec)


def _train_step(L: _Loop, n_items: int, make_batch: Callable, step_fn: Callable) -> float:
    """One optimizer step on batch number L.step; returns the learning rate used."""
    tc, xp = L.tc, L.backend.xp
    batch = make_batch(batch_for_step(L.step, n_items, tc.batch_size, tc.seed))
    loss, metrics, grads = step_fn(L.params, batch)
    # the global norm before clipping (max_norm inf: measured only)
    gnorm = clip_grad_norm(grads, tc.grad_clip if tc.grad_clip > 0 else math.inf)
    lr = lr_at(L.step, tc.lr, tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
    L.opt.step(L.params, grads, lr=lr)
    del grads, batch  # free them before the next step's forward, not after it
    L.step += 1
    L.acc.add({"loss": loss, "grad_norm": gnorm, **metrics})  # device scalars; read once per record
    return lr


def _log(L: _Loop, lr: float, bar) -> None:
    """One metrics record: the means over the steps since the previous record."""
    _check_finite(L, L.step - L.acc.n)
    rec = {"stage": L.stage, "step": L.step, "lr": lr,
           "time_s": round(L.elapsed_s + time.perf_counter() - L.t0, 3), **L.acc.means()}
    _write_record(L, rec)
    post = {"loss": f"{rec['loss']:.4f}"}
    if "rewards/accuracies" in rec:
        post["acc"] = f"{rec['rewards/accuracies']:.2f}"
        post["margin"] = f"{rec['rewards/margins']:.3f}"
    bar.set_postfix(post)


def _evaluate(L: _Loop, eval_fn: Callable, bar) -> None:
    rec = {"stage": L.stage, "step": L.step, **eval_fn(L.params)}
    _write_record(L, rec)
    if L.step > 0 and L.comm.rank == 0:
        bar.write(f"[{L.stage} step {L.step}] held-out " + "  ".join(
            f"{k[5:]}={v:.4f}" for k, v in rec.items() if k.startswith("eval/")))


def _run_loop(
    stage: str, params: dict, model_config: GPTConfig, tc: TrainConfig, n_items: int,
    make_batch: Callable[[np.ndarray], object], step_fn: Callable, out_dir: Path, backend: Backend,
    eval_fn: Callable[[dict], dict] | None = None, resume: bool = True, inputs: dict | None = None,
    stale: str = "raise", prepare: Callable[[], None] | None = None, comm=None, state: dict | None = None,
) -> StageResult:
    """Train ``params`` in place from the folder's checkpoint (if any) to ``tc.steps``: each step
    :func:`_train_step`, then a metrics record every ``log_every`` steps, a held-out evaluation
    every ``eval_every``, a checkpoint every ``save_every`` and at the end; Ctrl-C saves and stops.

    With a ``comm`` of K ranks every rank runs this loop in step; rank 0 alone holds the folder's
    lock and writes (metrics, checkpoints, messages), and the Ctrl-C flag is all-reduced after
    each step, so every rank stops after the same one.

    ``state``: the stage's numbers carried from step to step (a dict the step functions update in
    place, e.g. BCO's running reward mean): saved in every checkpoint and restored on resume."""
    comm = comm if comm is not None else SingleProcess()
    L = _Loop(stage, params, model_config, tc, Path(out_dir), backend, dict(inputs or {}), comm, state=state)
    if comm.rank == 0:
        L.out_dir.mkdir(parents=True, exist_ok=True)
    # AdamW, or ZeRO-1's sharded AdamW (its params[k] become views of one flat buffer)
    L.opt = make_optimizer(comm, params, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
    L.acc = _Accumulator(backend.xp)
    note = say if comm.rank == 0 else (lambda msg: None)
    with contextlib.ExitStack() as held:
        if tc.plain:  # the stage runs the plain reference (layers.py, logprobs.py), and only the stage
            held.enter_context(fast.plain())
        on_rank0(comm, lambda: held.enter_context(run_lock(L.out_dir)))  # one writer: rank 0
        resumed = _resume(L, resume, stale)
        comm.barrier()  # rank 0 has trimmed (or removed) metrics.jsonl before any rank reads it
        if resumed is not None and resumed >= tc.steps:
            note(f"[{stage}] already complete at step {resumed} ({L.ckpt_dir}); nothing to train")
            return StageResult(params, resumed, read_metrics(L.metrics_path), resumed_from=resumed, already_complete=True)
        if resumed is not None:
            note(f"[{stage}] resuming at step {resumed} of {tc.steps} from {L.ckpt_dir}")
        if prepare is not None:  # work only a run that trains needs (DPO: the reference log-probs)
            prepare()
        L.history = read_metrics(L.metrics_path)
        L.t0 = time.perf_counter()
        stopped = False
        with _StopRequested() as stop:
            bar = _progress(tc.steps, L.step, stage, tc.progress and comm.rank == 0)
            interrupt_hook(f"{stage}:start")
            try:
                at_start = L.step == 0 and not any(r.get("step") == 0 for r in L.history)
                if eval_fn is not None and at_start and tc.steps > 0:  # the starting point, for the curves
                    _evaluate(L, eval_fn, bar)
                stopping = comm.any(stop.requested)  # one rank's Ctrl-C stops every rank, after the same step
                while L.step < tc.steps and not stopping:
                    lr = _train_step(L, n_items, make_batch, step_fn)
                    bar.update(1)
                    interrupt_hook(f"{stage}:step={L.step}")
                    is_last = L.step == tc.steps
                    if L.step % tc.log_every == 0 or is_last:
                        _log(L, lr, bar)
                    if eval_fn is not None and (L.step % tc.eval_every == 0 or is_last):
                        _evaluate(L, eval_fn, bar)
                    if L.step % tc.save_every == 0 and not is_last:
                        _save(L)
                    stopping = comm.any(stop.requested)
                stopped = stopping and L.step < tc.steps
                if stopped and L.last_saved != L.step:
                    _save(L)
            finally:
                bar.close()
        if stopped:
            note(f"[{stage}] interrupted: checkpoint saved at step {L.step} of {tc.steps} in {L.ckpt_dir}; "
                 f"run the same command again to resume.")
        else:
            _save(L)
    return StageResult(params=params, step=L.step, history=L.history, stopped_early=stopped, resumed_from=resumed)


# ---------------------------------------------------------------------------------------------
# the two stages
# ---------------------------------------------------------------------------------------------


def stage_inputs(items: Sequence, eval_items: Sequence | None, inputs: dict | None, **more) -> dict:
    """What a stage is built from, recorded in its checkpoints and compared on every re-run:
    fingerprints of the training and held-out examples (and of the reference for DPO), plus the
    caller's own entries (a CLI records its data files, tokenizer and starting model there)."""
    d = {"data": fingerprint(list(items)), "eval_data": fingerprint(list(eval_items)) if eval_items else None}
    d.update(more)
    d.update(inputs or {})
    return d


@collective
def train_sft(
    params: dict, model_config: GPTConfig, items: Sequence, pad_id: int, tc: TrainConfig,
    out_dir: str | Path, backend: Backend | str = "cpu", eval_items: Sequence | None = None, resume: bool = True,
    inputs: dict | None = None, stale: str = "raise", comm=None,
) -> StageResult:
    """Stage 1, pi_SFT: minimise the per-token NLL of the responses of ``items``
    (tokenized (prompt, response) pairs from :func:`minidpo.data.tokenize_sft`).

    ``params`` are updated in place and also returned. Checkpoints and ``metrics.jsonl`` go to
    ``out_dir``. An existing checkpoint there is resumed from (``resume=True``) when it was made
    by the same run (same model, data, ``inputs`` and training options; more ``steps`` extend
    it); otherwise ``stale="raise"`` raises RunFolderError and ``stale="rebuild"`` discards it.

    ``comm`` (minidpo.distributed): with K ranks each takes its share of every global batch; its
    gradient is weighted by its share of the batch's response tokens, N_r / N (the token-weighted
    mean), before the one all-reduce of the step. Rank 0 alone writes ``out_dir``."""
    backend = get_backend(backend)
    if not items:
        raise ValueError("SFT needs at least one example")
    check_token_ids(items, model_config.vocab_size, "SFT")
    if eval_items:
        check_token_ids(eval_items, model_config.vocab_size, "held-out SFT")
    batcher = batcher_for(tc, pad_id, backend)

    # response tokens of each item, what sft_step's loss counts: the shard weights N_r / N
    item_tokens = np.array([len(t.response_ids) for t in items], dtype=np.int64) if comm.size > 1 else None

    def make_batch(idx):
        idx, weight = local_shard(idx, comm, item_tokens)  # this rank's share of the global batch
        return batcher.sft([items[i] for i in idx]), weight

    def step_fn(p, step_batch):
        batch, weight = step_batch
        loss, grads = sft_step(p, model_config, batch)
        loss, _ = all_reduce_step(comm, loss, {}, grads, weight)  # grads: reduced in place
        return loss, {}, grads

    eval_fn = None
    if eval_items:
        def eval_fn(p):
            tot, ntok = 0.0, 0
            lo, hi = (0, len(eval_items)) if comm.size == 1 else shard_range(len(eval_items), comm.rank, comm.size)
            for logps, counts in chunked_logps(p, model_config, eval_items[lo:hi], batcher.sft, tc.eval_batch_size):
                tot += float(logps.sum())  # host arrays: one read-back a chunk
                ntok += int(counts.sum())
            if comm.size > 1:
                tot, ntok = comm.allreduce_host([tot, ntok])  # sums over the ranks' shares
            nll = -tot / max(ntok, 1)
            return {"eval/nll": nll, "eval/perplexity": math.exp(min(nll, 50.0))}

    return _run_loop("sft", params, model_config, tc, len(items), make_batch, step_fn, Path(out_dir), backend,
                     eval_fn=eval_fn, resume=resume, inputs=stage_inputs(items, eval_items, inputs), stale=stale,
                     comm=comm)


def reference_logps(reference: dict, model_config: GPTConfig, items: Sequence, to_batch: Callable[[list], Batch],
                    tc: TrainConfig, comm=None, desc: str | None = None):
    """log pi_ref(y|x) of every training item, computed once (the cache of ``tc.cache_reference``),
    on the very batches the first epoch trains on (batch_for_step 0 .. steps_per_epoch - 1, each
    rank its share), then the items that epoch leaves out. So at step 0, where policy = reference,
    the step's log-probs of its batch equal the cached ones bit for bit (the same forward on the
    same batch) and every implicit reward is exactly 0.

    items: preference pairs with ``to_batch`` = Batcher.pairs (2 examples an item: returns
    (chosen (N,), rejected (N,))), or unpaired KTO examples with Batcher.sft (returns (N,)).
    Host arrays in the model's dtype (a float64 model keeps float64)."""
    comm = comm if comm is not None else SingleProcess()
    n = len(items)
    bs = min(tc.batch_size, n)
    epoch = [batch_for_step(s, n, tc.batch_size, tc.seed) for s in range(n // bs)]
    left = np.setdiff1d(np.arange(n, dtype=np.int64), np.concatenate(epoch))
    batches = epoch + [left[i:i + bs] for i in range(0, len(left), bs)]
    k = to_batch([items[0]]).n_examples  # examples an item: 2 for a pair, 1 for an unpaired example
    mine, cols = [], []
    bar = _progress(n, 0, desc, desc is not None and comm.rank == 0)
    for idx in batches:
        lo, hi = shard_range(len(idx), comm.rank, comm.size)  # this rank's share, as local_shard cuts it
        local = idx[lo:hi]
        if len(local):
            logps, _ = batch_logps(reference, model_config, to_batch([items[i] for i in local]))
            logps = to_numpy(logps)
            mine.append(local)
            cols.append(logps.reshape(k, len(local)))
        bar.update(len(idx))
    bar.close()
    dt = next((c.dtype for c in cols), np.dtype(np.float64))
    idx = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    out = []
    for j in range(k):
        v = np.concatenate([c[j] for c in cols]) if cols else np.zeros(0, dtype=dt)
        out.append(gather_scatter(comm, idx, v, n, dt))
    return tuple(out) if len(out) > 1 else out[0]


def mismatched_logps(params: dict, model_config: GPTConfig, prompts: list, responses: list, batcher: Batcher,
                     batch_size: int, comm=None, desc: str | None = None) -> np.ndarray:
    """log pi(y_m(i)|x_i) (summed) of KTO's mismatched examples of the given ones (example i's prompt
    with example i-1's completion, data.kto_mismatched_items), no gradient, in the order of the
    examples; with a ``comm`` of K ranks each scores its share and every rank gets all. (E,) host."""
    from .data import kto_mismatched_items
    from .scoring import item_logps

    items = kto_mismatched_items(prompts, responses, model_config.n_ctx)
    return item_logps(params, model_config, items, batcher, batch_size, desc=desc, comm=comm)


def kto_batch_reference_point(policy: dict, reference: dict | None, model_config: GPTConfig, prompts: list,
                              responses: list, batcher: Batcher, tc: TrainConfig, comm=None, ref_mismatched=None):
    """KTO's reference point z0 for one set of examples (losses.kto_reference_point, Ethayarajh et al.
    2024 eq. 7): the policy's KL from pi_ref estimated on their mismatched prompt/completion pairs,
    clamped at 0, a constant (no gradient). ``ref_mismatched``: the reference's log-probs of the same
    mismatched examples when they were cached (held-out sets); a reference-free run takes pi_ref = 1.
    Returns a host float."""
    from .losses import kto_reference_point

    pol = mismatched_logps(policy, model_config, prompts, responses, batcher, tc.eval_batch_size, comm)
    if ref_mismatched is None:
        ref_mismatched = (mismatched_logps(reference, model_config, prompts, responses, batcher, tc.eval_batch_size,
                                           comm) if tc.uses_reference else np.zeros_like(pol))
    return float(kto_reference_point(pol, ref_mismatched))


def pair_examples(pairs: Sequence) -> tuple[list, list]:
    """The 2N examples of N pairs, [chosen; rejected], as (prompts, responses) (KTO on pairs)."""
    prompts = [p.prompt_ids for p in pairs] * 2
    return prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]


@collective
def train_dpo(
    policy: dict, reference: dict | None, model_config: GPTConfig, pairs: Sequence, pad_id: int, tc: TrainConfig,
    out_dir: str | Path, backend: Backend | str = "cpu", eval_pairs: Sequence | None = None, resume: bool = True,
    inputs: dict | None = None, stale: str = "raise", comm=None,
) -> StageResult:
    """Stage 2: minimise the DPO loss (eq. 7, or the loss ``tc.loss_type`` of losses.LOSS_TABLE)
    of ``policy`` against the frozen ``reference`` on tokenized preference ``pairs``.

    ``policy`` is updated in place; ``reference`` is never written. With
    ``tc.cache_reference`` the reference log-probs of every training and held-out pair are
    computed once, before the first step (with a progress bar; :func:`reference_logps`);
    otherwise each step runs the reference forward pass on its batch. A loss without a reference
    (``tc.uses_reference`` False: SimPO, CPO, ORPO, reference_free, ...) runs no reference pass at
    all, and ``reference`` may be None. The reference's fingerprint is one of the recorded inputs,
    so a run folder built against another reference is never resumed (see train_sft for
    ``resume``, ``inputs`` and ``stale``).

    What a loss's row needs each step besides the log-probs (losses.Loss.inputs) is made here:
    KTO's reference point z0 from the batch's mismatched examples (:func:`kto_batch_reference_point`),
    BCO's running reward mean (kept across steps and in the checkpoints); WPO's weights (``tc.wpo``)
    come from the step's own logits (:func:`dpo_step`).

    ``comm`` (minidpo.distributed): with K ranks each takes its share of every global batch,
    weighted n_r / B before the step's all-reduce; the reference cache and the held-out
    evaluation are computed in shares and gathered; z0 and BCO's mean are taken over the whole
    global batch. Rank 0 alone writes ``out_dir``."""
    from .losses import LOSS_TABLE, bco_update_reward_mean

    backend = get_backend(backend)
    if not pairs:
        raise ValueError("DPO needs at least one preference pair")
    uses_ref = tc.uses_reference
    if uses_ref and reference is None:
        raise ValueError(f"the {tc.loss_type!r} loss needs the reference model (reference=None given)")
    check_token_ids(pairs, model_config.vocab_size, "preference pair")
    if eval_pairs:
        check_token_ids(eval_pairs, model_config.vocab_size, "held-out preference pair")
    batcher = batcher_for(tc, pad_id, backend)
    row = LOSS_TABLE[tc.loss_type]
    needs = row.required_inputs(row.resolve(tc.loss_options))
    cache: dict = {}
    state = {"reward_mean": 0.0, "count": 0} if "reward_mean" in needs else None  # BCO's running mean
    comm_ = comm if comm is not None else SingleProcess()

    def prepare():
        show = "reference log-probs" if tc.progress else None
        if uses_ref and tc.cache_reference:
            c, r = reference_logps(reference, model_config, pairs, batcher.pairs, tc, comm, desc=show)
            cache["c"], cache["r"] = backend.asarray(c, dtype=c.dtype), backend.asarray(r, dtype=r.dtype)
        if eval_pairs:
            cache["eval"] = (batched_sequence_logps(reference, model_config, eval_pairs, batcher, tc.eval_batch_size,
                                                    desc=show and "held-out " + show, comm=comm)
                             if uses_ref else (None, None))
            if "reference_point" in needs and uses_ref:  # the held-out set's mismatched examples, once
                cache["eval_mismatched"] = mismatched_logps(reference, model_config, *pair_examples(eval_pairs),
                                                            batcher, tc.eval_batch_size, comm)

    def make_batch(idx):
        global_idx = idx
        idx, weight = local_shard(idx, comm)  # this rank's share of the global batch
        batch = batcher.pairs([pairs[i] for i in idx])
        if not uses_ref:
            ref = None, None
        elif tc.cache_reference:
            didx = backend.asarray(idx)
            ref = cache["c"][didx], cache["r"][didx]
        else:
            logps, _ = batch_logps(reference, model_config, batch)
            ref = logps[: len(idx)], logps[len(idx):]
        return batch, ref, weight, global_idx

    def bco_mean(logps, ref_c, ref_r):
        """BCO's delta: the running mean of every reward seen, this global batch's included."""
        xp = get_array_module(logps)
        rewards = tc.beta * (logps if ref_c is None else logps - xp.concatenate([ref_c, ref_r]))  # (2N,) eq. 8
        if comm_.size > 1:  # the whole global batch's rewards, in its order, on every rank
            rewards = backend.asarray(gather_concat(comm_, to_numpy(rewards)))
        state["reward_mean"], state["count"] = bco_update_reward_mean(state["reward_mean"], state["count"],
                                                                      rewards, rewards[:0])
        return {"reward_mean": state["reward_mean"]}

    def step_fn(p, step_batch):
        batch, (ref_c, ref_r), weight, global_idx = step_batch
        step_inputs = {}
        if "reference_point" in needs:  # KTO: z0 of this global batch, before the step moves p
            step_inputs["reference_point"] = kto_batch_reference_point(
                p, reference, model_config, *pair_examples([pairs[i] for i in global_idx]), batcher, tc, comm)
        loss, metrics, grads = dpo_step(p, model_config, batch, ref_c, ref_r, tc, step_inputs,
                                        before_loss=bco_mean if state is not None else None)
        loss, metrics = all_reduce_step(comm, loss, metrics, grads, weight)  # grads: in place
        return loss, metrics, grads

    eval_fn = None
    if eval_pairs:
        def eval_fn(p):
            eval_inputs = {}
            if "reference_point" in needs:
                eval_inputs["reference_point"] = kto_batch_reference_point(
                    p, reference, model_config, *pair_examples(eval_pairs), batcher, tc, comm,
                    ref_mismatched=cache.get("eval_mismatched"))
            if state is not None:
                eval_inputs["reward_mean"] = float(state["reward_mean"])
            return evaluate_preferences(p, model_config, eval_pairs, *cache["eval"], batcher, tc, comm=comm,
                                        inputs=eval_inputs)

    return _run_loop("dpo", policy, model_config, tc, len(pairs), make_batch, step_fn, Path(out_dir), backend,
                     eval_fn=eval_fn, resume=resume, stale=stale, prepare=prepare, comm=comm, state=state,
                     inputs=stage_inputs(pairs, eval_pairs, inputs,
                                         reference=fingerprint(reference) if uses_ref else None))


# ---------------------------------------------------------------------------------------------
# KTO on unpaired examples
# ---------------------------------------------------------------------------------------------


def kto_step(params: dict, model_config: GPTConfig, batch: Batch, ref_logps, desirable, reference_point,
             tc: TrainConfig):
    """Loss, metrics and gradients of one KTO step (Ethayarajh et al. 2024, eq. 7) on B unpaired
    examples laid out as SFT items (Batcher.sft), each completion desirable or not:

        rho_b  = log pi(y_b|x_b) - log pi_ref(y_b|x_b)                       (B,)
        loss_b = losses.kto_loss(rho, desirable, beta, z0, lambda_D, lambda_U)
        L      = mean_b loss_b,   dL/d log pi(y_b|x_b) = dloss_b/drho_b / B

    ref_logps: (B,) constants (None: reference-free, pi_ref = 1); desirable: (B,) bool device
    array; reference_point: z0 (a float, no gradient). Returns (loss, metrics, grads) as
    :func:`dpo_step`: metrics "rewards/desirable", "rewards/undesirable" (beta rho's means over
    each kind in the batch, 0 where the batch has none) and "kl" (z0)."""
    from .losses import LOSS_TABLE, kto_loss

    ops = fast.ops()
    logits, model_cache = gpt_forward(params, batch.input_ids, model_config, batch.layout,
                                      logits_at=batch.logits_at, validate=False)  # (M, V)
    logps, lp_cache = ops.sequence_logps(logits, batch.labels, batch.weights(logits.dtype))  # (B,)
    del logits
    xp = get_array_module(logps)
    rho = logps if ref_logps is None else logps - xp.asarray(ref_logps).astype(logps.dtype, copy=False)
    opts = LOSS_TABLE["kto"].resolve(tc.loss_options)
    losses, dloss = kto_loss(rho, desirable, tc.beta, reference_point, opts["desirable_weight"],
                             opts["undesirable_weight"])
    B = logps.shape[0]
    dlogits = ops.sequence_logps_backward(dloss / B, lp_cache, overwrite_logits=True)  # (M, V)
    grads = gpt_backward(dlogits, model_cache)
    d = desirable.astype(logps.dtype)
    n_d, n_u = xp.maximum(d.sum(), 1), xp.maximum((1 - d).sum(), 1)
    r = tc.beta * rho  # (B,) eq. 8's implicit rewards
    metrics = {"rewards/desirable": (r * d).sum() / n_d, "rewards/undesirable": (r * (1 - d)).sum() / n_u,
               "kl": xp.asarray(reference_point, dtype=logps.dtype)}
    return losses.mean(), metrics, grads


@collective
def train_kto(
    policy: dict, reference: dict | None, model_config: GPTConfig, examples: Sequence, pad_id: int, tc: TrainConfig,
    out_dir: str | Path, backend: Backend | str = "cpu", eval_examples: Sequence | None = None, resume: bool = True,
    inputs: dict | None = None, stale: str = "raise", comm=None,
) -> StageResult:
    """KTO (``tc.loss_type == "kto"``) on unpaired examples (data.TokenizedKTO: a prompt, a
    completion and whether it is desirable), against the frozen ``reference``: each step
    :func:`kto_step` on a batch of ``tc.batch_size`` examples, its reference point z0 the policy's
    KL from pi_ref on the batch's mismatched examples (:func:`kto_batch_reference_point`).

    The loop, the run folder, resume, Ctrl-C, the reference cache on the first epoch's batches and
    data parallelism are train_dpo's (see it and train_sft). Held-out: the loss with the held-out
    set's own z0, and each kind's mean reward."""
    from .losses import LOSS_TABLE, kto_loss

    backend = get_backend(backend)
    if tc.loss_type != "kto":
        raise ValueError(f"train_kto trains the 'kto' loss, got loss_type {tc.loss_type!r}")
    if not examples:
        raise ValueError("KTO needs at least one example")
    if len(examples) < 2 or min(tc.batch_size, len(examples)) < 2:
        raise ValueError("KTO's reference point needs batches of at least 2 examples (batch_size >= 2)")
    uses_ref = tc.uses_reference
    if uses_ref and reference is None:
        raise ValueError("KTO needs the reference model (reference=None given)")
    check_token_ids(examples, model_config.vocab_size, "KTO example")
    if eval_examples:
        check_token_ids(eval_examples, model_config.vocab_size, "held-out KTO example")
        if len(eval_examples) < 2:
            raise ValueError("KTO's held-out reference point needs at least 2 held-out examples")
    batcher = batcher_for(tc, pad_id, backend)
    cache: dict = {}

    def split(items):
        return [t.prompt_ids for t in items], [t.response_ids for t in items]

    def prepare():
        show = "reference log-probs" if tc.progress else None
        if uses_ref and tc.cache_reference:
            ref = reference_logps(reference, model_config, examples, batcher.sft, tc, comm, desc=show)
            cache["ref"] = backend.asarray(ref, dtype=ref.dtype)
        if eval_examples:
            from .scoring import item_logps

            cache["eval"] = (item_logps(reference, model_config, eval_examples, batcher, tc.eval_batch_size,
                                        desc=show and "held-out " + show, comm=comm) if uses_ref else None)
            cache["eval_mismatched"] = (mismatched_logps(reference, model_config, *split(eval_examples), batcher,
                                                         tc.eval_batch_size, comm) if uses_ref else None)

    def make_batch(idx):
        global_idx = idx
        idx, weight = local_shard(idx, comm)
        items = [examples[i] for i in idx]
        batch = batcher.sft(items)
        if not uses_ref:
            ref = None
        elif tc.cache_reference:
            ref = cache["ref"][backend.asarray(idx)]
        else:
            ref, _ = batch_logps(reference, model_config, batch)
        desirable = backend.asarray(np.array([t.desirable for t in items], dtype=bool))
        return batch, ref, desirable, weight, global_idx

    def step_fn(p, step_batch):
        batch, ref, desirable, weight, global_idx = step_batch
        z0 = kto_batch_reference_point(p, reference, model_config, *split([examples[i] for i in global_idx]),
                                       batcher, tc, comm)
        loss, metrics, grads = kto_step(p, model_config, batch, ref, desirable, z0, tc)
        loss, metrics = all_reduce_step(comm, loss, metrics, grads, weight)
        return loss, metrics, grads

    eval_fn = None
    if eval_examples:
        def eval_fn(p):
            from .scoring import item_logps

            pol = item_logps(p, model_config, eval_examples, batcher, tc.eval_batch_size, comm=comm)
            z0 = kto_batch_reference_point(p, reference, model_config, *split(eval_examples), batcher, tc, comm,
                                           ref_mismatched=cache["eval_mismatched"])
            rho = pol - cache["eval"] if cache["eval"] is not None else pol
            d = np.array([t.desirable for t in eval_examples], dtype=bool)
            opts = LOSS_TABLE["kto"].resolve(tc.loss_options)
            losses, _ = kto_loss(rho, d, tc.beta, z0, opts["desirable_weight"], opts["undesirable_weight"])
            r = tc.beta * rho
            out = {"eval/loss": float(losses.mean()), "eval/kl": z0}
            out["eval/rewards/desirable"] = float(r[d].mean()) if d.any() else 0.0
            out["eval/rewards/undesirable"] = float(r[~d].mean()) if (~d).any() else 0.0
            return out

    return _run_loop("kto", policy, model_config, tc, len(examples), make_batch, step_fn, Path(out_dir), backend,
                     eval_fn=eval_fn, resume=resume, stale=stale, prepare=prepare, comm=comm,
                     inputs=stage_inputs(examples, eval_examples, inputs,
                                         reference=fingerprint(reference) if uses_ref else None))
