"""PPO-RLHF, the baseline DPO replaces (Sec. 3 "RL fine-tuning phase"; Sec. 6 "PPO", "PPO-GT").

The RL phase maximises eq. (3), E[r(x, y)] - beta KL(pi || pi_ref), with PPO (Schulman et al.
2017) as in Ziegler et al. 2019 / Stiennon et al. 2020, the setup the paper's baseline follows:

- policy and value head start from the SFT model: the value head V(s_t) = h_t @ w_v + b_v reads
  the policy's own final hidden states (shared trunk);
- per-token reward: the KL penalty on every response token, the scalar score on the last one,

      r_t = -beta_KL * (log pi_old(y_t | s_t) - log pi_ref(y_t | s_t)) + 1[t = last] * R(x, y)

  with R the reward model's r_phi (PPO) or the ground-truth reward (PPO-GT);
- advantages by GAE (:func:`gae`), returns G_t = A_t + V_old(s_t), advantages whitened;
- several epochs of minibatches per batch of rollouts, minimising

      L = L_clip + vf_coef * L_V                                         (:func:`ppo_loss_and_grads`)
      L_clip = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),   rho_t = pi / pi_old
      L_V    = mean_t 1/2 max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2)

Every gradient is written out: the clipped surrogate's and the value loss's per-token
derivatives, then the token log-prob backward into the logits and the value head's backward into
the final hidden states, then :func:`minidpo.model.gpt_backward` with both.

Token coordinates. For rows [x; y] (B, T), "step" t = 0..T-2 is the state after token t, whose
action is token t+1: logp[b, t] = log pi(ids[b, t+1] | ids[b, :t+1]), V[b, t] = V(h[b, t]),
mask[b, t] = loss_mask[b, t+1] (y's tokens, EOS included). Shapes: B rows, T time, S = T - 1
steps, V vocabulary, C channels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from .backend import Backend, get_array_module, get_backend, to_numpy
from . import fast
from .data import TokenizedSFT, right_pad
from .generate import generate
from .model import GPTConfig, final_hidden, gpt_backward, gpt_forward
from .optim import AdamW, clip_grad_norm
from .reward_model import scalar_head_backward, scalar_head_forward, split_head

__all__ = [
    "PPOConfig",
    "action_positions",
    "gae",
    "whiten",
    "clipped_surrogate",
    "clipped_value_loss",
    "add_value_head",
    "ppo_loss_and_grads",
    "Rollout",
    "collect_rollout",
    "train_ppo",
]


# ---------------------------------------------------------------------------------------------
# the states before each action
# ---------------------------------------------------------------------------------------------


def action_positions(B: int, T: int, xp=np):
    """(B S,) flat positions b T + t, t = 0..T-2: the state after token t, whose logits predict
    the action token t+1 (model.gpt_forward's ``logits_at``), row by row."""
    t = xp.arange(T - 1)[None, :]  # (1, S)
    return (xp.arange(B)[:, None] * T + t).reshape(-1)  # (B S,)


# ---------------------------------------------------------------------------------------------
# GAE, whitening
# ---------------------------------------------------------------------------------------------


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over each row's response steps.

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}  =  sum_{l >= 0} (gamma lam)^l delta_{t+l}
        G_t     = A_t + V_t                                   (the value target)

    The episode of a row is its contiguous run of masked steps; the step after the last one is
    terminal (value 0). Outside the mask A = G = 0.

    Args: rewards, values (B, S) float; mask (B, S) bool/0-1. Host or device arrays.
    Returns: advantages (B, S), returns (B, S), the rewards' dtype.
    """
    xp = get_array_module(rewards)
    m = mask.astype(rewards.dtype)
    B, S = rewards.shape
    adv = xp.zeros((B, S), dtype=rewards.dtype)
    nxt_a = xp.zeros((B,), dtype=rewards.dtype)
    nxt_v = xp.zeros((B,), dtype=rewards.dtype)
    nxt_m = xp.zeros((B,), dtype=rewards.dtype)
    g, gl = rewards.dtype.type(gamma), rewards.dtype.type(gamma * lam)
    for t in range(S - 1, -1, -1):
        delta = rewards[:, t] + g * nxt_v * nxt_m - values[:, t]  # (B,)
        a = (delta + gl * nxt_m * nxt_a) * m[:, t]
        adv[:, t] = a
        nxt_a, nxt_v, nxt_m = a, values[:, t], m[:, t]
    return adv, (adv + values) * m


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the masked entries (population std); 0 outside the mask."""
    xp = get_array_module(x)
    m = mask.astype(x.dtype)
    n = xp.maximum(m.sum(), 1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) / xp.sqrt(var + x.dtype.type(eps)) * m


# ---------------------------------------------------------------------------------------------
# the two PPO losses and their gradients
# ---------------------------------------------------------------------------------------------


def clipped_surrogate(logp, old_logp, adv, mask, clip: float = 0.2):
    """PPO's clipped surrogate, averaged over the masked steps, and d loss / d logp.

        rho_t = exp(logp_t - old_logp_t)
        l_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
        L     = sum_t m_t l_t / sum_t m_t
        dL/dlogp_t = m_t / n * (-A_t rho_t)   where the unclipped term is the max (ties: unclipped)
                                               or rho_t lies inside [1 - eps, 1 + eps]
                   = 0                         otherwise (the clipped term is a constant there)

    At rho = 1 this is the plain policy gradient: dL/dlogp_t = -A_t m_t / n.

    Args: logp, old_logp, adv (B, S) float; mask (B, S). Returns (loss 0-d, dlogp (B, S),
    clip fraction 0-d).
    """
    xp = get_array_module(logp)
    dt = logp.dtype.type
    m = mask.astype(logp.dtype)
    n = xp.maximum(m.sum(), dt(1))
    rho = xp.exp(logp - old_logp)
    lo, hi = dt(1 - clip), dt(1 + clip)
    l1 = -adv * rho
    l2 = -adv * xp.clip(rho, lo, hi)
    use_unclipped = (l1 >= l2) | ((rho >= lo) & (rho <= hi))
    loss = (xp.maximum(l1, l2) * m).sum() / n
    dlogp = xp.where(use_unclipped, l1, dt(0)) * m / n
    clipfrac = ((~use_unclipped) * m).sum() / n
    return loss, dlogp, clipfrac


def clipped_value_loss(v, old_v, returns, mask, clip: float = 0.2):
    """The clipped value loss, averaged over the masked steps, and d loss / d v.

        v_c = old_v + clip(v - old_v, -eps_v, eps_v)
        l_t = 1/2 max((v - G)^2, (v_c - G)^2)
        dL/dv_t = m_t / n * (v - G)                  where the unclipped square is the max (ties too)
                = m_t / n * (v_c - G) * 1[|v - old_v| < eps_v]   otherwise (v_c is flat outside)

    Args: v, old_v, returns (B, S); mask (B, S). Returns (loss 0-d, dv (B, S)).
    """
    xp = get_array_module(v)
    dt = v.dtype.type
    m = mask.astype(v.dtype)
    n = xp.maximum(m.sum(), dt(1))
    diff = v - old_v
    inside = xp.abs(diff) < dt(clip)
    vc = old_v + xp.clip(diff, dt(-clip), dt(clip))
    l1 = (v - returns) ** 2
    l2 = (vc - returns) ** 2
    loss = dt(0.5) * (xp.maximum(l1, l2) * m).sum() / n
    dv = xp.where(l1 >= l2, v - returns, xp.where(inside, vc - returns, dt(0))) * m / n
    return loss, dv


# ---------------------------------------------------------------------------------------------
# the policy with its value head
# ---------------------------------------------------------------------------------------------


def add_value_head(policy: dict, config: GPTConfig) -> dict:
    """``policy`` (a GPT-2 dict) plus ``value.weight`` (C,) = 0 and ``value.bias`` (1,) = 0:
    the value head starts on the SFT trunk, predicting 0. Same dtype and device; not a copy of
    the trunk arrays (the dict is new, the arrays are shared)."""
    wte = policy["transformer.wte.weight"]
    xp = get_array_module(wte)
    out = dict(policy)
    out["value.weight"] = xp.zeros((config.n_embd,), dtype=wte.dtype)
    out["value.bias"] = xp.zeros((1,), dtype=wte.dtype)
    return out


def policy_value_forward(params: dict, config: GPTConfig, input_ids):
    """logp (B, S), values (B, S) and the caches for the backward: the model's logits and final
    hidden states at the B S states before each action only (:func:`action_positions`), the
    actions' token log-probs (logprobs.token_logps) and the value head on the same states."""
    trunk, head = split_head(params, "value")
    B, T = input_ids.shape
    xp = get_array_module(input_ids)
    logits, mcache = gpt_forward(trunk, input_ids, config, logits_at=action_positions(B, T, xp),
                                 validate=False)  # (B S, V)
    logp, lcache = fast.ops().token_logps(logits, input_ids[:, 1:].reshape(-1))  # (B S,)
    v, hcache = scalar_head_forward(final_hidden(mcache), head["weight"], head["bias"])  # (B S,)
    return logp.reshape(B, T - 1), v.reshape(B, T - 1), (mcache, lcache, hcache)


def ppo_loss_and_grads(params: dict, config: GPTConfig, mb: dict, clip: float = 0.2, clip_value: float = 0.2,
                       vf_coef: float = 0.1):
    """L = L_clip + vf_coef * L_V on a minibatch of rollout steps, and dL/dparams.

    mb: ``input_ids`` (B, T), ``mask`` (B, S), ``old_logp``, ``old_values``, ``advantages``,
    ``returns`` (B, S). Returns (loss 0-d, stats dict of 0-d, grads with the keys of params).
    """
    logp, v, (mcache, lcache, hcache) = policy_value_forward(params, config, mb["input_ids"])
    pl, dlogp, clipfrac = clipped_surrogate(logp, mb["old_logp"], mb["advantages"], mb["mask"], clip)
    vl, dv = clipped_value_loss(v, mb["old_values"], mb["returns"], mb["mask"], clip_value)
    dt = logp.dtype.type
    dlogits = fast.ops().token_logps_backward(dlogp.reshape(-1), lcache, overwrite_logits=True)  # (B S, V)
    dh, g_head = scalar_head_backward((dv * dt(vf_coef)).reshape(-1), hcache)  # (B S, C)
    xp = get_array_module(dh)
    grads = gpt_backward(dlogits, mcache, dhidden=dh)
    grads["value.weight"], grads["value.bias"] = g_head["weight"], g_head["bias"]
    m = mb["mask"].astype(logp.dtype)
    approx_kl = ((mb["old_logp"] - logp) * m).sum() / xp.maximum(m.sum(), dt(1))
    stats = {"policy_loss": pl, "value_loss": vl, "clipfrac": clipfrac, "approx_kl": approx_kl}
    return pl + dt(vf_coef) * vl, stats, grads


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """PPO's settings. kl_coef is beta_KL of the per-token reward; the rest as in Ziegler et al."""

    kl_coef: float = 0.1
    lr: float = 1e-4
    iterations: int = 20  # batches of rollouts
    rollout_batch: int = 64  # prompts per batch of rollouts (one sample each)
    minibatch: int = 16
    epochs: int = 4
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    grad_clip: float = 1.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rollout:
    """One batch of rollouts (host arrays unless noted): input_ids (B, T) and mask (B, S) on the
    device; old_logp, old_values, ref_logp, rewards, advantages, returns (B, S) on the device;
    scores (B,) host float64; texts (B,) the decoded continuations."""

    input_ids: object
    mask: object
    old_logp: object
    old_values: object
    ref_logp: object
    rewards: object
    advantages: object
    returns: object
    scores: np.ndarray
    texts: list


def collect_rollout(params: dict, reference: dict, config: GPTConfig, prompt_ids: Sequence[Sequence[int]],
                    prompt_texts: Sequence[str], score_fn: Callable, tokenizer, pc: PPOConfig,
                    rng: np.random.Generator, backend: Backend) -> Rollout:
    """Sample one continuation per prompt from pi_old, score it, and build GAE targets.

    ``score_fn(prompt_texts, texts, items) -> (B,) float`` is R(x, y): the reward model's score
    (items are TokenizedSFT rows of the sampled ids) or the ground truth (from the texts)."""
    trunk, _ = split_head(params, "value")
    eos = tokenizer.eos_id
    ids = generate(trunk, config, [list(p) for p in prompt_ids], pc.max_new_tokens, temperature=pc.temperature,
                   eos_id=eos, rng=rng, backend=backend)
    items = [TokenizedSFT(prompt_ids=list(p), response_ids=list(y)) for p, y in zip(prompt_ids, ids)]
    texts = [tokenizer.decode([t for t in y if t != eos]) for y in ids]
    ids_host, mask_host = right_pad([list(p) for p in prompt_ids], [list(y) for y in ids], tokenizer.pad_id)
    input_ids = backend.asarray(ids_host, dtype=np.int64)  # (B, T)
    mask = backend.asarray(mask_host[:, 1:])  # (B, S) the actions that are response tokens
    old_logp, old_v, _ = policy_value_forward(params, config, input_ids)  # (B, S) each, no backward
    B, T = ids_host.shape
    ref_logits, _ = gpt_forward(reference, input_ids, config, logits_at=action_positions(B, T, backend.xp),
                                keep_cache=False, validate=False)  # (B S, V)
    ref_logp = fast.ops().token_logps(ref_logits, input_ids[:, 1:].reshape(-1))[0].reshape(B, T - 1)  # (B, S)
    del ref_logits
    scores = np.asarray(score_fn(list(prompt_texts), texts, items), dtype=np.float64)  # (B,)
    xp = backend.xp
    dt = old_logp.dtype
    m = mask.astype(dt)
    rewards = -dt.type(pc.kl_coef) * (old_logp - ref_logp) * m  # (B, S)
    last = xp.asarray(np.array([len(p) + len(y) - 2 for p, y in zip(prompt_ids, ids)], dtype=np.int64))
    rows = xp.arange(len(ids))
    rewards[rows, last] += xp.asarray(scores.astype(dt))
    adv, ret = gae(rewards, old_v, mask, pc.gamma, pc.lam)
    adv = whiten(adv, mask)
    return Rollout(input_ids, mask, old_logp, old_v, ref_logp, rewards, adv, ret, scores, texts)


def train_ppo(params: dict, reference: dict, config: GPTConfig, prompt_ids: Sequence[Sequence[int]],
              prompt_texts: Sequence[str], score_fn: Callable, tokenizer, pc: PPOConfig,
              backend: Backend | str = "cpu", progress: Callable[[dict], None] | None = None) -> list[dict]:
    """PPO on eq. (3): ``pc.iterations`` batches of rollouts, each followed by ``pc.epochs``
    passes of minibatches. ``params`` (policy + value head, :func:`add_value_head`) are updated
    in place; ``reference`` is frozen. Prompts are drawn without replacement, reshuffled each
    pass over them. Returns one stats record per iteration (host floats)."""
    backend = get_backend(backend)
    xp = backend.xp
    opt = AdamW(params, lr=pc.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng([pc.seed, 31])
    order = rng.permutation(len(prompt_ids))
    pos = 0
    history = []
    for it in range(pc.iterations):
        t0 = time.perf_counter()
        if pos + pc.rollout_batch > len(order):
            order, pos = rng.permutation(len(prompt_ids)), 0
        sel = order[pos : pos + pc.rollout_batch]
        pos += pc.rollout_batch
        ro = collect_rollout(params, reference, config, [prompt_ids[i] for i in sel], [prompt_texts[i] for i in sel],
                             score_fn, tokenizer, pc, rng, backend)
        B = len(sel)
        sums: dict = {}
        n_mb = 0
        for _ in range(pc.epochs):
            perm = rng.permutation(B)
            for s in range(0, B, pc.minibatch):
                j = xp.asarray(perm[s : s + pc.minibatch])
                mb = {"input_ids": ro.input_ids[j], "mask": ro.mask[j], "old_logp": ro.old_logp[j],
                      "old_values": ro.old_values[j], "advantages": ro.advantages[j], "returns": ro.returns[j]}
                loss, stats, grads = ppo_loss_and_grads(params, config, mb, pc.clip, pc.clip_value, pc.vf_coef)
                clip_grad_norm(grads, pc.grad_clip if pc.grad_clip > 0 else math.inf)
                opt.step(params, grads, lr=pc.lr)
                for k, v in {"loss": loss, **stats}.items():
                    sums[k] = sums[k] + v if k in sums else v
                n_mb += 1
        m = to_numpy(ro.mask).astype(np.float64)
        kl_tok = (to_numpy(ro.old_logp) - to_numpy(ro.ref_logp)).astype(np.float64) * m
        rec = {"iteration": it + 1, "score": float(ro.scores.mean()), "kl": float(kl_tok.sum(axis=1).mean()),
               "time_s": round(time.perf_counter() - t0, 3)}
        rec.update({k: float(v) / n_mb for k, v in sums.items()})
        if not all(math.isfinite(v) for v in rec.values()):
            raise FloatingPointError(f"PPO iteration {it + 1}: non-finite statistics {rec}; lower the learning rate")
        history.append(rec)
        if progress is not None:
            progress(rec)
    return history
