"""The paper's cheaper baselines (Sec. 6) and online DPO, on the same model code as DPO.

- **Preferred-FT**: supervised fine-tuning of pi_ref on the chosen responses y_w only
  (:func:`preferred_ft_step`, the SFT loss on y_w).
- **Unlikelihood** (Welleck et al. 2019): raise the likelihood of y_w's tokens, lower that of
  y_l's, with coefficient alpha on the unlikelihood term (:func:`unlikelihood_loss`).
- **Best-of-N**: N samples from pi_ref, the reward model keeps the best; its KL from pi_ref
  is log N - (N - 1)/N (:func:`best_of_n_kl`).
- **Online (iterative) DPO**: rounds of fresh pairs sampled from the current policy, labelled by
  the ground truth, each followed by DPO steps against the fixed pi_ref (:func:`online_dpo`).

Shape letters: N pairs, B rows, T time, M scored tokens, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from . import fast
from .backend import Backend, get_array_module, get_backend, to_numpy
from .data import PreferenceExample, build_preference_dataset, collate_sft
from .model import GPTConfig, gpt_backward, gpt_forward
from .optim import AdamW, clip_grad_norm, lr_at
from .scoring import batched_sequence_logps
from .train import TrainConfig, batch_for_step, batcher_for, dpo_step, sft_step

__all__ = [
    "optimize",
    "preferred_ft_step",
    "unlikelihood_loss",
    "unlikelihood_step",
    "best_of_n_kl",
    "best_of_n_select",
    "online_dpo",
]


def optimize(params: dict, n_items: int, step_fn: Callable, steps: int, batch_size: int, lr: float, seed: int = 0,
             grad_clip: float = 1.0, warmup_steps: int = 0, weight_decay: float = 0.0, opt: AdamW | None = None,
             on_log: Callable[[int, float], None] | None = None, log_every: int = 10) -> AdamW:
    """A plain AdamW loop: ``step_fn(params, idx) -> (loss 0-d, grads)`` on the batch of example
    indices :func:`minidpo.train.batch_for_step` gives (a pure function of seed and step).
    ``params`` are updated in place; a non-finite loss or gradient norm raises
    FloatingPointError. Returns the optimizer (its moments carry over if passed back in)."""
    opt = opt or AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    acc, n = 0.0, 0
    for step in range(steps):
        idx = batch_for_step(step, n_items, batch_size, seed)
        loss, grads = step_fn(params, idx)
        gnorm = clip_grad_norm(grads, grad_clip if grad_clip > 0 else math.inf)
        opt.step(params, grads, lr=lr_at(step, lr, warmup_steps, steps, "constant"))
        acc += float(loss)
        n += 1
        if not (math.isfinite(float(loss)) and math.isfinite(float(gnorm))):
            raise FloatingPointError(f"non-finite loss or gradient at step {step + 1}; lower the learning rate")
        if on_log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            on_log(step + 1, acc / n)
            acc, n = 0.0, 0
    return opt


# ---------------------------------------------------------------------------------------------
# Preferred-FT
# ---------------------------------------------------------------------------------------------


def preferred_ft_step(params: dict, config: GPTConfig, pairs: Sequence, idx, pad_id: int, backend: Backend):
    """The SFT loss (per-token mean NLL) on the chosen responses of ``pairs[idx]``:
    L = -sum log pi(y_w | x) / (number of y_w tokens). Returns (loss, grads)."""
    from .data import TokenizedSFT

    items = [TokenizedSFT(prompt_ids=pairs[i].prompt_ids, response_ids=pairs[i].chosen_ids) for i in idx]
    return sft_step(params, config, collate_sft(items, pad_id, backend=backend))


# ---------------------------------------------------------------------------------------------
# Unlikelihood
# ---------------------------------------------------------------------------------------------

_UL_CAP = -1e-5  # log p is clamped here in the unlikelihood term: -log(1 - p) stays finite


def unlikelihood_loss(logp, chosen, alpha: float):
    """The unlikelihood objective on the token log-probs of a [chosen; rejected] batch, and dL/dlogp.

        L = -1/n_w sum_{t in y_w} log p_t  +  alpha * 1/n_l sum_{t in y_l} -log(1 - p_t)
        dL/dlogp_t = -1/n_w                          (t in y_w)
        dL/dlogp_t = alpha/n_l * p_t / (1 - p_t) = alpha/n_l / expm1(-logp_t)   (t in y_l)

    with n_w, n_l the token counts of the two halves and -log(1 - p) computed as
    -log(-expm1(logp)); log p is clamped at -1e-5 there (gradient 0 above: p > 0.99999).

    Args: logp (M,) the scored tokens' log-probs (logprobs.token_logps), chosen (M,) bool: the
        token belongs to a chosen response; alpha >= 0.
    Returns: loss 0-d, dlogp (M,), both logp's dtype.
    """
    xp = get_array_module(logp)
    dt = logp.dtype.type
    w = chosen.astype(logp.dtype)  # (M,) 1 on y_w's tokens
    r = dt(1) - w  # (M,) 1 on y_l's tokens
    nw = xp.maximum(w.sum(), dt(1))
    nl = xp.maximum(r.sum(), dt(1))
    lp_c = xp.minimum(logp, dt(_UL_CAP))
    neg_log_1mp = -xp.log(-xp.expm1(lp_c))  # (M,) -log(1 - p)
    loss = -(logp * w).sum() / nw + dt(alpha) * (neg_log_1mp * r).sum() / nl
    d = -w / nw + dt(alpha) / nl * r * (logp < dt(_UL_CAP)) / xp.expm1(-lp_c)
    return loss, d.astype(logp.dtype, copy=False)


def unlikelihood_step(params: dict, config: GPTConfig, batch, alpha: float):
    """Loss and gradients of :func:`unlikelihood_loss` on a preference packing.Batch (any layout;
    examples 0..N-1 chosen, N..2N-1 rejected)."""
    ops = fast.ops()
    logits, mcache = gpt_forward(params, batch.input_ids, config, batch.layout, logits_at=batch.logits_at,
                                 validate=False)  # (M, V)
    logp, lcache = ops.token_logps(logits, batch.labels)  # (M,)
    del logits
    loss, dlogp = unlikelihood_loss(logp, batch.example < batch.n_examples // 2, alpha)
    return loss, gpt_backward(ops.token_logps_backward(dlogp, lcache, overwrite_logits=True), mcache)


# ---------------------------------------------------------------------------------------------
# Best-of-N
# ---------------------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi_ref) = log N - (N - 1)/N for the best of N i.i.d. draws under a reward with
    no ties (Stiennon et al. 2020, App. G.3; exact for a continuous reward, an upper bound when
    ties occur). n >= 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"N must be an int >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def best_of_n_select(scores) -> np.ndarray:
    """Index of the best of each row's N candidates: scores (P, N) -> (P,) int64 (first on ties)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"scores must have shape (prompts, N >= 1), got {s.shape}")
    return np.argmax(s, axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Online DPO
# ---------------------------------------------------------------------------------------------


def online_dpo(policy: dict, reference: dict, config: GPTConfig, tokenizer, prompts: Sequence[str],
               sample_fn: Callable, label_fn: Callable, tc: TrainConfig, rounds: int, prompts_per_round: int,
               steps_per_round: int, backend: Backend | str = "cpu", seed: int = 0,
               on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Online (iterative) DPO: for each round, fresh pairs from the CURRENT policy, labelled by
    the ground truth, then ``steps_per_round`` DPO steps (eq. 7) against the fixed ``reference``.

    Args:
        sample_fn: ``(policy, prompts, n) -> list of len(prompts) lists of n continuations``.
        label_fn: ``(prompts, sampler) -> (pairs, stats)``, e.g. a partial of
            :func:`minidpo.tasks.sentiment.build_preference_pairs` (``sampler(prompts, n)``
            samples from the current policy).
        tc: the DPO step's settings (beta, loss_type, lr, batch_size, grad_clip).
    Returns one record per round (pairs made, mean sampled reward, mean DPO loss).
    """
    backend = get_backend(backend)
    batcher = batcher_for(tc, tokenizer.pad_id, backend)
    rng = np.random.default_rng([seed, 61])
    opt = None
    history = []
    for r in range(rounds):
        sel = rng.choice(len(prompts), size=min(prompts_per_round, len(prompts)), replace=False)
        round_prompts = [prompts[i] for i in sel]
        pairs, stats = label_fn(round_prompts, lambda ps, n: sample_fn(policy, ps, n))
        examples = [PreferenceExample(p["prompt"], p["chosen"], p["rejected"], f"round{r + 1}:{i + 1}")
                    for i, p in enumerate(pairs)]
        tokenized, _ = build_preference_dataset(examples, tokenizer, max_length=config.n_ctx,
                                                max_prompt_length=config.n_ctx // 2)
        rec = {"round": r + 1, "pairs": len(tokenized), "mean_sample_reward": stats.get("mean_reward")}
        if tokenized:
            ref_c, ref_r = batched_sequence_logps(reference, config, tokenized, batcher, tc.eval_batch_size)
            ref_c = backend.asarray(ref_c, dtype=ref_c.dtype)
            ref_r = backend.asarray(ref_r, dtype=ref_r.dtype)
            losses = []

            def step_fn(p, idx):
                batch = batcher.pairs([tokenized[i] for i in idx])
                didx = backend.asarray(idx)
                loss, _, grads = dpo_step(p, config, batch, ref_c[didx], ref_r[didx], tc)
                return loss, grads

            opt = optimize(policy, len(tokenized), step_fn, steps_per_round, tc.batch_size, tc.lr,
                           seed=seed * 1000 + r, grad_clip=tc.grad_clip, opt=opt,
                           on_log=lambda s, l: losses.append(l), log_every=max(steps_per_round, 1))
            rec["dpo_loss"] = losses[-1] if losses else None
        history.append(rec)
        if on_round is not None:
            on_round(rec)
    return history
