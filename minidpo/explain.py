"""One real DPO step, drawn with its own numbers: the data behind ``minidpo explain``, and its page.

    expl = explain_step(policy, reference, config, tokenizer, pairs, beta=0.1, lr=1e-4)  # the numbers
    html = render_html(expl)                                                             # the page
    write_page("explain.html", html)                                                     # atomically

:func:`explain_step` runs one DPO step on a batch of N preference pairs (``pairs[0]`` is the pair
the page follows token by token) through the library's own functions, on the plain reference
(layers.py, logprobs.py: the code the README asks a reader to read):

    batch   = train.batcher_for(tc, pad_id).pairs(pairs)                     the layout the trainer uses
    logits  = model.gpt_forward(policy, batch..., logits_at=batch.logits_at) (M, V) scored positions
    lp      = logprobs.token_logps(logits, batch.labels)                     (M,)   log pi(y_k | x, y_<k)
    logps   = logprobs.sequence_logps(logits, batch.labels, weights)         (2N,)  eq. 7's log pi(y|x)
    ref     = scoring.batch_logps(reference, batch)                          (2N,)  log pi_ref(y|x)
    out, dlogps = losses.dpo_step_loss(logps, ..., ref, tc)                          eq. 7, 8, 9
    dlogits = logprobs.sequence_logps_backward(dlogps, ...)                  (M, V) where the gradient lands
    grads   = model.gpt_backward(dlogits, ...)                                       every parameter
    optim.clip_grad_norm(grads, ...); optim.AdamW(...).step(...)                     one optimizer step

then the same forward on the updated policy gives the log-probs after the step. ``train.dpo_step``
(the trainer's fast path) runs on the same batch, and the page states how closely its loss and
gradients agree with the numbers shown. :func:`bandit_world` adds the tabular world of
examples/bandit.py (theory.py): eq. 4's optimum against the policy DPO learns, and the implicit
reward against the true reward once beta log Z(x) is added back (eq. 5-6).

An :class:`Explanation` is plain JSON-able data; :data:`SOURCES` names, for every kind of number
on the page, the function and the equation that computed it. :func:`tiny_run` trains the small
model the page uses by default (a few seconds on a CPU). Letters: N pairs, E = 2N examples
[chosen; rejected], M scored tokens, V vocabulary, X prompts and Y responses of the tabular world.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["SOURCES", "PALETTE", "SLIDER_BETAS", "ExplainError", "Explanation", "tokenize_pair", "explain_step",
           "bandit_world", "tiny_run", "TINY", "render_html", "write_page", "page_weight"]


class ExplainError(ValueError):
    """An input the page cannot be made from (a pair that tokenizes to nothing, a run folder
    without a model): one line naming what and where."""


# ----------------------------------------------------------------------------------------------
# where each number comes from

SOURCES: dict[str, dict[str, str]] = {
    "token_logp": {"fn": "logprobs.token_logps", "eq": "7",
                   "what": "log pi(y_k | x, y_<k) of one response token under the policy: its logit minus the "
                           "log-sum-exp of the logits that predict it (one term of eq. 7's sum)"},
    "token_ref_logp": {"fn": "logprobs.token_logps", "eq": "7",
                       "what": "the same term under the frozen reference pi_ref"},
    "token_ratio": {"fn": "logprobs.token_logps", "eq": "8",
                    "what": "log pi - log pi_ref of one token; beta times their sum is the implicit reward"},
    "mask": {"fn": "packing.Batch.weights", "eq": "7",
             "what": "the loss mask: the token's weight in log pi(y|x), 1 for every response token (the prompt's "
                     "tokens are context, never scored)"},
    "seq_ratio": {"fn": "logprobs.sequence_logps", "eq": "8",
                  "what": "log pi(y|x) - log pi_ref(y|x); beta times it is the implicit reward"},
    "seq_logp": {"fn": "logprobs.sequence_logps", "eq": "7",
                 "what": "log pi(y|x) = sum over the response's tokens of log pi(y_k | x, y_<k)"},
    "seq_ref_logp": {"fn": "scoring.batch_logps", "eq": "7",
                     "what": "log pi_ref(y|x), the reference's sum (what train_dpo caches before training)"},
    "reward": {"fn": "losses.dpo_loss", "eq": "8",
               "what": "implicit reward r = beta (log pi(y|x) - log pi_ref(y|x)) (DPOOutput.chosen_rewards / "
                       ".rejected_rewards)"},
    "margin": {"fn": "losses.dpo_loss", "eq": "7",
               "what": "reward margin z = r_w - r_l (DPOOutput.chosen_rewards - .rejected_rewards)"},
    "loss": {"fn": "losses.dpo_loss", "eq": "7",
             "what": "the pair's loss -log sigma(z) (DPOOutput.losses, through losses.dpo_step_loss)"},
    "mean_loss": {"fn": "losses.dpo_loss", "eq": "7", "what": "the batch's loss, the mean over its N pairs"},
    "weight": {"fn": "losses.dpo_loss", "eq": "9",
               "what": "the pair's weight sigma(r_l - r_w) in the gradient (DPOOutput.gradient_weight)"},
    "grad_logp": {"fn": "losses.dpo_loss", "eq": "9",
                  "what": "d loss / d log pi(y|x) = -/+ beta sigma(r_l - r_w) / N "
                          "(DPOOutput.grad_policy_chosen_logps / .grad_policy_rejected_logps)"},
    "grad_row": {"fn": "logprobs.sequence_logps_backward", "eq": "9",
                 "what": "L2 norm of d loss / d logits on the row of logits that predicts this token"},
    "grad_label": {"fn": "logprobs.sequence_logps_backward", "eq": "9",
                   "what": "d loss / d logit of the token itself on that row: negative pushes the token up, "
                           "positive pushes it down (a descent step moves against the gradient)"},
    "grad_norm": {"fn": "optim.clip_grad_norm", "eq": "9",
                  "what": "global L2 norm of every parameter's gradient (model.gpt_backward), before clipping"},
    "update": {"fn": "optim.AdamW.step", "eq": "-",
               "what": "the largest change of any parameter in the optimizer step"},
    "token_logp_after": {"fn": "logprobs.token_logps", "eq": "7",
                         "what": "log pi(y_k | x, y_<k) under the policy after the optimizer step"},
    "seq_logp_after": {"fn": "logprobs.sequence_logps", "eq": "7",
                       "what": "log pi(y|x) under the policy after the optimizer step"},
    "delta": {"fn": "logprobs.sequence_logps", "eq": "7",
              "what": "log pi(y|x) after the step minus before it"},
    "token_delta": {"fn": "logprobs.token_logps", "eq": "7",
                    "what": "log pi(y_k | x, y_<k) after the step minus before it"},
    "change": {"fn": "losses.dpo_loss", "eq": "7-8",
               "what": "after the step minus before: losses.dpo_loss of the updated policy's log-probs against "
                       "those of the policy before it"},
    "check": {"fn": "train.dpo_step", "eq": "7-9",
              "what": "the trainer's own step (fast path) on the same batch, compared with the numbers shown"},
    "slider": {"fn": "losses.dpo_loss", "eq": "7-9",
               "what": "recomputed in the page from the log-probs above with the formulas of losses.dpo_loss"},
    "bt_reward": {"fn": "examples/bandit.py make_world", "eq": "1",
                  "what": "the true reward r(x, y) of the tabular world, which the preferences follow (eq. 1)"},
    "opt_policy": {"fn": "theory.optimal_policy", "eq": "4",
                   "what": "log pi_r(y|x) = log pi_ref + r / beta - log Z(x), the maximiser of eq. 3"},
    "log_Z": {"fn": "theory.log_partition", "eq": "4",
              "what": "beta log Z(x), the per-prompt shift no preference can see (eq. 6)"},
    "learned_policy": {"fn": "theory.expected_dpo_loss", "eq": "7",
                       "what": "log pi(y|x) learned by gradient descent on the DPO loss (losses.dpo_loss inside)"},
    "recovered_reward": {"fn": "theory.reward_from_policy", "eq": "5",
                         "what": "beta log pi/pi_ref + beta log Z(x): the implicit reward with the shift added back"},
    "gap": {"fn": "theory.optimal_policy", "eq": "4-5",
            "what": "the largest distance between the learned and the optimal table"},
}
"""Every kind of number on the page -> the function that computed it, its equation, what it is."""


# WCAG 2.1 contrast (tests/test_explain.py checks the ratios): text >= 4.5 against the page and
# the panels, the chart colours >= 3 against the page (non-text contrast).
PALETTE: dict[str, str] = {
    "bg": "#ffffff",
    "panel": "#f4f6f8",
    "text": "#1b1f24",
    "muted": "#4f5862",
    "chosen": "#1a6b34",      # y_w
    "rejected": "#a3261d",    # y_l
    "reference": "#4a4f9a",   # pi_ref
    "accent": "#0b5cad",      # links, focus, the slider
    "grid": "#7b848d",        # axes and guide lines (graphics)
    "prompt_bg": "#e3e7eb",   # prompt token chips
    "chosen_bg": "#e0f1e4",
    "rejected_bg": "#f9e1de",
}
TEXT_COLOURS = ("text", "muted", "chosen", "rejected", "reference", "accent")
BACKGROUNDS = ("bg", "panel", "prompt_bg", "chosen_bg", "rejected_bg")
GRAPHIC_COLOURS = ("chosen", "rejected", "reference", "accent", "grid")

SLIDER_BETAS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
"""The values the page's beta slider steps through (the step's own beta is added when missing)."""


# ----------------------------------------------------------------------------------------------
# the data


@dataclass
class Explanation:
    """Everything the page shows, as JSON-able data.

    data: {"meta": ..., "step": ..., "pairs": [...], "bandit": ... or None, "sources": SOURCES}.
    A number's key is its path, dot-separated (``pairs.0.chosen.logp``, ``pairs.0.chosen.tokens.logp.3``):
    the page marks each number it prints with that key, so a test can read it back (:meth:`value`)."""

    data: dict = field(default_factory=dict)

    def value(self, key: str) -> Any:
        """The value at a dot-separated path (list entries by index)."""
        v: Any = self.data
        for part in key.split("."):
            v = v[int(part)] if isinstance(v, list) else v[part]
        return v

    def to_json(self) -> str:
        return json.dumps(self.data, separators=(",", ":"), allow_nan=False)


def _floats(a) -> list:
    """A host array as a list of Python floats (float32 values are exact in a float)."""
    from .backend import to_numpy

    return [float(v) for v in np.asarray(to_numpy(a), dtype=np.float64).ravel()]


def _token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text (special tokens by name: the EOS the data appends shows as such)."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int, source: str = ""):
    """One preference pair (x, y_w, y_l) as the trainer tokenizes it (data.build_preference_dataset's rule:
    prompt and responses encoded apart, EOS after each response, the prompt cut to half of
    ``max_length`` first), or ExplainError naming the pair and why it cannot be used: a response
    that tokenizes to nothing, or chosen and rejected identical after truncation."""
    from .data import PreferenceExample, build_preference_dataset

    where = f"{source}: " if source else ""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not tokenizer.encode(text):
            raise ExplainError(f"{where}the {name} response {text!r} tokenizes to nothing (no token to score)")
    import warnings

    ex = PreferenceExample(prompt, chosen, rejected, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one reason is given below
        try:
            pairs, _ = build_preference_dataset([ex], tokenizer, max_length=max_length,
                                                max_prompt_length=max(1, max_length // 2))
        except ValueError:
            raise ExplainError(f"{where}chosen and rejected are identical after tokenization and truncation to "
                               f"{max_length} tokens: the pair has no gradient to show") from None
    return pairs[0]


def _step_config(beta: float, lr: float, n_pairs: int, train_config=None):
    """The TrainConfig of the explained step: the run's optimizer and layout settings where given,
    eq. 7's sigmoid loss at ``beta``, ``lr`` with no warmup (the step uses the full rate)."""
    from .train import TrainConfig

    keep = {}
    if train_config is not None:
        d = train_config.to_dict()
        keep = {k: d[k] for k in ("adam_betas", "weight_decay", "grad_clip", "share_prompt", "pack", "seed")}
    return TrainConfig(steps=1, batch_size=n_pairs, lr=lr, warmup_steps=0, beta=beta, loss_type="sigmoid",
                       progress=False, **keep)


def explain_step(policy: dict, reference: dict, config, tokenizer, pairs: Sequence, *, beta: float, lr: float,
                 train_config=None, backend=None, meta: dict | None = None, bandit: dict | None = None) -> Explanation:
    """One DPO step on ``pairs``, eq. 7 (loss), eq. 8 (implicit rewards) and eq. 9 (gradient), with
    every number the page shows (the module docstring gives the chain of calls).

    Args:
        policy, reference: parameter dicts of one model ``config``, on ``backend`` (the policy is
            not modified: the step is applied to a copy).
        tokenizer: the models' tokenizer (each token's text, for the page).
        pairs: N >= 1 data.TokenizedPair (see :func:`tokenize_pair`); the first is followed token
            by token, the step is taken on all N.
        beta: eq. 7's beta. lr: the optimizer step's learning rate.
        train_config: the policy's run's TrainConfig, whose AdamW betas, weight decay, gradient
            clipping and batch layout the step keeps (None: TrainConfig's defaults).
        meta: entries for the page's header. bandit: :func:`bandit_world`'s data, or None.
    Returns:
        :class:`Explanation`. Per pair i and response s (chosen, rejected) of n tokens: ``ids``,
        ``text``, ``mask`` and ``tokens.{logp, ref_logp, grad_row, grad_label, logp_after}``, each
        (n,); the sums ``logp``, ``ref_logp``, ``logp_after`` (eq. 7's log pi(y|x)), ``reward``,
        ``reward_after`` (eq. 8), ``grad_logp`` (eq. 9), ``delta``; per pair ``h``, ``margin``,
        ``loss``, ``weight`` and their values after the step; ``step``: the batch's mean loss
        before and after, the global gradient norm, the largest parameter change, the layout and
        ``check`` (train.dpo_step's loss and gradient against these).
    """
    from . import fast
    from .backend import get_backend, to_numpy
    from .logprobs import sequence_logps, sequence_logps_backward, token_logps
    from .losses import dpo_step_loss
    from .model import gpt_backward, gpt_forward, num_params
    from .optim import AdamW, clip_grad_norm, lr_at
    from .scoring import batch_logps
    from .train import batcher_for, dpo_step

    pairs = list(pairs)
    if not pairs:
        raise ExplainError("no preference pair to explain")
    if not (math.isfinite(beta) and beta > 0):
        raise ExplainError(f"beta must be a finite number > 0, got {beta!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ExplainError(f"lr must be a finite number > 0, got {lr!r}")
    N = len(pairs)
    be = get_backend(backend if backend is not None else "cpu")
    tc = _step_config(float(beta), float(lr), N, train_config)
    batch = batcher_for(tc, tokenizer.pad_id, be).pairs(pairs)  # the layout train_dpo would use
    labels = to_numpy(batch.labels)
    with fast.plain():  # layers.py and logprobs.py, the plain reference
        logits, mcache = gpt_forward(policy, batch.input_ids, config, batch.layout, logits_at=batch.logits_at)  # (M, V)
        weights = batch.weights(logits.dtype)  # (2N, M)
        lp, _ = token_logps(logits, batch.labels)  # (M,) log pi(y_k | x, y_<k)
        logps, lcache = sequence_logps(logits, batch.labels, weights)  # (2N,) eq. 7's log pi(y|x)
        ref_logps, _ = batch_logps(reference, config, batch)  # (2N,) log pi_ref(y|x)
        ref_logits, _ = gpt_forward(reference, batch.input_ids, config, batch.layout, logits_at=batch.logits_at,
                                    keep_cache=False)
        ref_lp, _ = token_logps(ref_logits, batch.labels)  # (M,)
        del ref_logits
        out, dlogps = dpo_step_loss(logps, batch.token_counts, ref_logps[:N], ref_logps[N:], tc)  # eq. 7, 8, 9
        dlogits = sequence_logps_backward(dlogps, lcache)  # (M, V) d loss / d logits, eq. 9 carried down
        xp = be.xp
        row_norm = xp.sqrt(xp.sum(dlogits * dlogits, axis=-1))  # (M,)
        label_grad = dlogits[xp.arange(dlogits.shape[0]), batch.labels]  # (M,)
        grads = gpt_backward(dlogits, mcache)
    del logits, mcache, lcache, dlogits
    # the trainer's own step on the same batch (its fast path): the same numbers, to round-off
    loss_fast, _, grads_fast = dpo_step(policy, config, batch, ref_logps[:N], ref_logps[N:], tc)
    gsq = sum(float(xp.vdot(g.ravel(), g.ravel())) for g in grads.values())
    dsq = sum(float(xp.vdot((grads[k] - grads_fast[k]).ravel(), (grads[k] - grads_fast[k]).ravel())) for k in grads)
    check = {"loss_abs_diff": abs(float(loss_fast) - float(out.loss)),
             "grad_rel_diff": math.sqrt(dsq) / max(math.sqrt(gsq), 1e-30)}
    del grads_fast
    # the optimizer step the trainer takes: global-norm clipping, then AdamW, on a copy
    grad_norm = float(clip_grad_norm(grads, tc.grad_clip if tc.grad_clip > 0 else math.inf))
    step_lr = lr_at(0, tc.lr, tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
    after = {k: v.copy() for k, v in policy.items()}
    AdamW(after, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay).step(after, grads, lr=step_lr)
    update = max(float(xp.max(xp.abs(after[k] - policy[k]))) for k in policy)
    del grads
    with fast.plain():
        logits, _ = gpt_forward(after, batch.input_ids, config, batch.layout, logits_at=batch.logits_at,
                                keep_cache=False)
        lp_after, _ = token_logps(logits, batch.labels)  # (M,)
        logps_after, _ = sequence_logps(logits, batch.labels, weights)  # (2N,)
        del logits
        out_after, _ = dpo_step_loss(logps_after, batch.token_counts, ref_logps[:N], ref_logps[N:], tc)

    host = {name: np.asarray(to_numpy(a), dtype=np.float64) for name, a in (
        ("lp", lp), ("ref_lp", ref_lp), ("lp_after", lp_after), ("row_norm", row_norm), ("label_grad", label_grad),
        ("logps", logps), ("ref_logps", ref_logps), ("logps_after", logps_after))}
    o, oa = ({k: np.asarray(to_numpy(getattr(x, k)), dtype=np.float64) for k in (
        "losses", "chosen_rewards", "rejected_rewards", "gradient_weight", "log_ratio_margin",
        "grad_policy_chosen_logps", "grad_policy_rejected_logps")} for x in (out, out_after))
    example = batch.host_example
    pair_data = []
    for i, p in enumerate(pairs):
        item = {"index": i, "source": getattr(p, "source", "") or "",
                "prompt": {"ids": [int(t) for t in p.prompt_ids], "text": _token_texts(tokenizer, p.prompt_ids),
                           "truncated": bool(getattr(p, "prompt_truncated", False))}}
        for side, e, ids in (("chosen", i, p.chosen_ids), ("rejected", N + i, p.rejected_ids)):
            m = np.flatnonzero(example == e)  # this response's scored tokens, in order
            if labels[m].tolist() != [int(t) for t in ids]:  # the batch scores exactly the response's tokens
                raise AssertionError(f"pair {i}: the batch's scored {side} tokens are not the response's")
            item[side] = {
                "ids": [int(t) for t in ids], "text": _token_texts(tokenizer, ids),
                "truncated": bool(getattr(p, f"{side}_truncated", False)),
                "mask": _floats(to_numpy(weights)[e, m]),  # the loss mask: packing.Batch.weights
                "tokens": {"logp": _floats(host["lp"][m]), "ref_logp": _floats(host["ref_lp"][m]),
                           "grad_row": _floats(host["row_norm"][m]), "grad_label": _floats(host["label_grad"][m]),
                           "logp_after": _floats(host["lp_after"][m])},
                "logp": float(host["logps"][e]), "ref_logp": float(host["ref_logps"][e]),
                "logp_after": float(host["logps_after"][e]),
                "reward": float(o[f"{side}_rewards"][i]), "reward_after": float(oa[f"{side}_rewards"][i]),
                "grad_logp": float(o[f"grad_policy_{side}_logps"][i]),
            }
            item[side]["delta"] = item[side]["logp_after"] - item[side]["logp"]
        item.update({"h": float(o["log_ratio_margin"][i]), "margin": float(o["chosen_rewards"][i] - o["rejected_rewards"][i]),
                     "loss": float(o["losses"][i]), "weight": float(o["gradient_weight"][i]),
                     "margin_after": float(oa["chosen_rewards"][i] - oa["rejected_rewards"][i]),
                     "loss_after": float(oa["losses"][i]), "weight_after": float(oa["gradient_weight"][i])})
        pair_data.append(item)
    R, L = batch.shape
    step = {"beta": float(beta), "lr": float(step_lr), "n_pairs": N, "loss": float(out.loss),
            "loss_after": float(out_after.loss), "grad_norm": grad_norm, "grad_clip": float(tc.grad_clip),
            "clipped": bool(tc.grad_clip > 0 and grad_norm > tc.grad_clip), "update": update,
            "adam_betas": list(tc.adam_betas), "weight_decay": float(tc.weight_decay),
            "dtype": str(np.dtype(next(iter(policy.values())).dtype)),
            "layout": {"share_prompt": bool(tc.share_prompt), "pack": bool(tc.pack), "rows": int(R), "length": int(L),
                       "scored": int(labels.size), "tokens": int(batch.n_tokens)},
            "check": check,
            "slider_betas": sorted(set(SLIDER_BETAS) | {float(beta)})}
    info = {"n_params": int(num_params(policy)), "model": config.to_dict(), "device": be.device}
    info.update(meta or {})
    return Explanation({"meta": info, "step": step, "pairs": pair_data, "bandit": bandit, "sources": SOURCES})


# ----------------------------------------------------------------------------------------------
# the tabular world of examples/bandit.py


def bandit_world(seed: int = 0, n_prompts: int = 3, n_responses: int = 5, beta: float = 0.5,
                 reward_scale: float = 1.0, n_pairs: int = 4000, steps: int = 600) -> dict:
    """examples/bandit.py's world and its two trainings, as data for the page: eq. 1 (the
    preferences), eq. 4 (the optimum), eq. 5 (the reward recovered with beta log Z(x)), eq. 7
    (the loss minimised). Tables are (X, Y) = (n_prompts, n_responses) nested lists.

    The world (bandit.make_world with ``default_rng(seed)``): a true reward r(x, y) and a
    reference pi_ref, (X, Y) tables. Two policies trained by full-batch gradient descent on the
    DPO loss (losses.dpo_loss; the step size bandit.step_size's): on ``n_pairs`` sampled
    Bradley-Terry pairs (eq. 1), and on the exact expected loss (theory.expected_dpo_loss), whose
    minimiser is eq. 4's pi_r. Each is compared with eq. 4 (theory.optimal_policy) and its
    implicit reward, with beta log Z(x) added back (theory.reward_from_policy), with r (eq. 5).
    The loops are bandit.py's train_on_samples and train_on_expectation, written again here (the
    library does not import the examples; tests/test_explain.py checks they agree)."""
    from .logprobs import log_softmax, log_softmax_backward
    from .losses import dpo_loss
    from .theory import (expected_dpo_loss, log_partition, optimal_policy, preference_distribution,
                         reward_from_policy)

    rng = np.random.default_rng(seed)
    X, Y = n_prompts, n_responses
    reward = reward_scale * rng.standard_normal((X, Y))  # (X, Y) r(x, y)
    log_ref = log_softmax(rng.standard_normal((X, Y)))  # (X, Y) log pi_ref(y|x)
    log_opt = optimal_policy(reward, log_ref, beta)  # (X, Y) eq. 4
    log_Z = log_partition(reward, log_ref, beta)  # (X,)

    def step_size(W):  # bandit.step_size: 1 / a bound on the loss's curvature
        return 2.0 / (beta**2 * float((W + W.transpose(0, 2, 1)).sum(axis=2).max()))

    # sampled pairs (bandit.sample_preferences, train_on_samples)
    x = rng.integers(0, X, size=n_pairs)  # (N,)
    y1 = rng.integers(0, Y, size=n_pairs)
    y2 = (y1 + rng.integers(1, Y, size=n_pairs)) % Y  # a uniform other response
    y1_wins = rng.random(n_pairs) < 1.0 / (1.0 + np.exp(-(reward[x, y1] - reward[x, y2])))  # eq. 1
    yw, yl = np.where(y1_wins, y1, y2), np.where(y1_wins, y2, y1)
    W_emp = np.zeros((X, Y, Y), dtype=np.float64)
    np.add.at(W_emp, (x, yw, yl), 1.0 / n_pairs)
    theta, lr = log_ref.copy(), step_size(W_emp)
    for _ in range(steps):
        log_pi = log_softmax(theta)  # (X, Y)
        out = dpo_loss(log_pi[x, yw], log_pi[x, yl], log_ref[x, yw], log_ref[x, yl], beta=beta)  # eq. 7
        dlog_pi = np.zeros_like(theta)
        np.add.at(dlog_pi, (x, yw), out.grad_policy_chosen_logps)  # eq. 9, onto the table
        np.add.at(dlog_pi, (x, yl), out.grad_policy_rejected_logps)
        theta -= lr * log_softmax_backward(dlog_pi, log_pi)
    sampled = log_softmax(theta)
    # the exact expected loss under Bradley-Terry (bandit.train_on_expectation)
    W = preference_distribution(reward)  # (X, Y, Y)
    theta, lr = log_ref.copy(), step_size(W)
    for _ in range(steps):
        _, dtheta = expected_dpo_loss(theta, log_ref, W, beta)
        theta -= lr * dtheta
    exact = log_softmax(theta)

    def summary(log_pi) -> dict:
        recovered = reward_from_policy(log_pi, log_ref, beta, log_Z=log_Z)  # (X, Y) eq. 5
        return {"log_pi": log_pi.tolist(), "recovered": recovered.tolist(),
                "policy_gap": float(np.abs(log_pi - log_opt).max()), "reward_gap": float(np.abs(recovered - reward).max())}

    return {"seed": seed, "X": X, "Y": Y, "beta": float(beta), "n_pairs": n_pairs, "steps": steps,
            "reward": reward.tolist(), "log_pi_ref": log_ref.tolist(), "log_pi_opt": log_opt.tolist(),
            "beta_log_Z": (beta * log_Z).tolist(), "sampled": summary(sampled), "exact": summary(exact)}


# ----------------------------------------------------------------------------------------------
# the small model the page uses by default

TINY = dict(n_reviews=800, vocab=700, n_layer=2, n_head=2, n_embd=48, n_ctx=64, sft_steps=150, sft_batch=16,
            sft_lr=3e-3, pair_reviews=1500, prompt_words=4, n_eval_pairs=32, dpo_steps=30, dpo_batch=16,
            dpo_lr=5e-4, beta=0.1)
"""The default model: the synthetic movie reviews of examples/train_tiny.py (minidpo.tasks.sentiment),
a 2-layer GPT-2 of 48 channels, SFT for 150 steps (pi_ref), then 30 DPO steps (the policy)."""

TINY_OUTPUTS = ("sft", "dpo_beta*", "tokenizer.json", "tokenizer_config.json", "pairs_train.jsonl", "pairs_eval.jsonl")


def tiny_pairs(seed: int, n_reviews: int, prompt_words: int) -> list[dict]:
    """Preference pairs that read well: synthetic reviews (a stream apart from the SFT corpus's)
    that open with the same ``prompt_words`` words are taken two at a time; the continuation the
    task's ground-truth reward (VADER, sentiment.SentimentReward) scores higher is chosen, ties
    are skipped. Returns [{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}]."""
    from .tasks import sentiment

    groups: dict[str, list[str]] = {}
    for text, _ in sentiment.make_labeled_reviews(n_reviews, seed=seed + 1):
        prompt, rest = sentiment.split_review(text, prompt_words)
        groups.setdefault(prompt, []).append(rest)
    cands = [(p, a, b) for p, rest in groups.items() for a, b in zip(rest[::2], rest[1::2]) if a != b]
    scores = sentiment.SentimentReward()([p + a for p, a, _ in cands] + [p + b for p, _, b in cands])
    n, out = len(cands), []
    for k, (p, a, b) in enumerate(cands):
        ra, rb = float(scores[k]), float(scores[n + k])
        if ra != rb:
            (cw, rw), (cl, rl) = sorted([(a, ra), (b, rb)], key=lambda t: -t[1])
            out.append({"prompt": p, "chosen": cw, "rejected": cl, "chosen_reward": rw, "rejected_reward": rl})
    return out


def tiny_run(out: str | Path, seed: int = 0, backend="cpu", overwrite: bool = False, progress: bool = False,
             say=print) -> Path:
    """Train the default model into ``out`` (seconds on a CPU) and return ``out``, a folder laid out
    as examples/train_tiny.py's: tokenizer.json, sft/ (pi_ref), dpo_beta0.1/ (the policy: a few
    DPO steps, so its implicit rewards are not all 0), pairs_train.jsonl and pairs_eval.jsonl
    (held-out pairs: the page's default data). A re-run with the same folder reuses what is
    finished (train.train_sft/train_dpo resume); run.json pins ``seed`` (train.check_run_options)."""
    from .checkpoint import atomic_write_text
    from .data import PreferenceExample, build_preference_dataset, build_sft_dataset
    from .model import GPTConfig, init_params
    from .tasks import sentiment
    from .tokenizer import BPETokenizer
    from .train import TrainConfig, check_run_options, fingerprint, run_lock, train_dpo, train_sft

    c, out = TINY, Path(out)
    with run_lock(out):
        check_run_options(out, {"seed": seed, "tiny": c}, overwrite, TINY_OUTPUTS)
        corpus = sentiment.sft_corpus(c["n_reviews"], seed=seed)
        if (out / "tokenizer.json").exists():
            tokenizer = BPETokenizer.load(out / "tokenizer.json")
        else:
            tokenizer = BPETokenizer.train([p + r for p, r in corpus], vocab_size=c["vocab"])
            tokenizer.save(out)
        config = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=c["n_ctx"], n_layer=c["n_layer"],
                           n_head=c["n_head"], n_embd=c["n_embd"])
        # the tokenizer's fingerprint as cli.tokenizer_fingerprint records it (cli.load_model checks it)
        inputs = {"tokenizer": fingerprint(tokenizer.backend_tokenizer.to_str())}
        items, _ = build_sft_dataset(corpus, tokenizer, max_length=config.n_ctx)
        reference = init_params(config, backend, seed=seed)
        say(f"[explain] SFT of a {config.n_layer}-layer GPT-2 on {len(items)} synthetic reviews, "
            f"{c['sft_steps']} steps -> {out / 'sft'}")
        sft_tc = TrainConfig(steps=c["sft_steps"], batch_size=c["sft_batch"], lr=c["sft_lr"], warmup_steps=10,
                             schedule="cosine", seed=seed, log_every=25, eval_every=10**6, save_every=10**6,
                             progress=progress)
        res = train_sft(reference, config, items, tokenizer.pad_id, sft_tc, out / "sft", backend=backend,
                        inputs={"start": f"random init, seed {seed}", **inputs}, stale="rebuild")
        if res.stopped_early:
            raise KeyboardInterrupt
        paths = {split: out / f"pairs_{split}.jsonl" for split in ("train", "eval")}
        if not all(p.exists() for p in paths.values()):
            raw = tiny_pairs(seed, c["pair_reviews"], c["prompt_words"])
            cut = len(raw) - c["n_eval_pairs"]
            for split, rows in (("train", raw[:cut]), ("eval", raw[cut:])):
                atomic_write_text(paths[split], "".join(json.dumps(r) + "\n" for r in rows))
        tokenized = {}
        for split, path in paths.items():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            ex = [PreferenceExample(r["prompt"], r["chosen"], r["rejected"], f"{path.name}:{i + 1}")
                  for i, r in enumerate(rows)]
            tokenized[split], _ = build_preference_dataset(ex, tokenizer, max_length=config.n_ctx,
                                                           max_prompt_length=config.n_ctx // 2)
        policy = {k: v.copy() for k, v in reference.items()}
        say(f"[explain] DPO (beta {c['beta']:g}) on {len(tokenized['train'])} preference pairs, {c['dpo_steps']} steps "
            f"-> {out / 'dpo_beta0.1'}")
        dpo_tc = TrainConfig(steps=c["dpo_steps"], batch_size=c["dpo_batch"], lr=c["dpo_lr"], warmup_steps=5,
                             seed=seed, beta=c["beta"], log_every=10, eval_every=10**6, save_every=10**6,
                             progress=progress)
        res = train_dpo(policy, reference, config, tokenized["train"], tokenizer.pad_id, dpo_tc,
                        out / f"dpo_beta{c['beta']:g}", backend=backend, inputs=inputs, stale="rebuild")
        if res.stopped_early:
            raise KeyboardInterrupt
    return out


# ----------------------------------------------------------------------------------------------
# the page

PAGE_TEMPLATE = Path(__file__).with_name("explain_page.html")
"""The page: HTML, CSS and the script that draws it from the data, one file (no network access)."""


def _rounded(v):
    """The data with every float to 9 significant digits (a float32 value survives exactly)."""
    if isinstance(v, float):
        return float(f"{v:.9g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x) for x in v]
    return v


def _json_for_html(data: dict) -> str:
    """JSON that may sit inside a <script> element: no "</" or "<!--" in it."""
    text = json.dumps(_rounded(data), separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def palette_css(palette: dict | None = None) -> str:
    return " ".join(f"--{k}: {v};" for k, v in (palette or PALETTE).items())


def render_html(expl: Explanation) -> str:
    """The page: the template with the palette and the data filled in. The page states its own
    weight (meta.page_kb, in KB of UTF-8), computed here until it no longer changes."""
    template = PAGE_TEMPLATE.read_text(encoding="utf-8")
    css = palette_css()

    def fill(kb: str) -> str:
        data = dict(expl.data, meta=dict(expl.data.get("meta", {}), page_kb=kb))
        return template.replace("{{PALETTE_CSS}}", css).replace("{{DATA}}", _json_for_html(data))

    kb, html = "?", ""
    for _ in range(5):
        html = fill(kb)
        now = f"{page_weight(html) / 1024:.0f}"
        if now == kb:
            break
        kb = now
    return html


def page_weight(html: str) -> int:
    """The page's size in bytes (UTF-8), all of it: nothing else is loaded."""
    return len(html.encode("utf-8"))


def write_page(path: str | Path, html: str) -> Path:
    """Write the page atomically (a temporary file renamed over ``path``: a reader never sees
    half a page); the folder is created when missing. ExplainError for a folder at ``path``."""
    from .checkpoint import atomic_write_text

    path = Path(path)
    if path.is_dir():
        raise ExplainError(f"{path} is a folder; give the page's file name, e.g. {path / 'explain.html'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return path
