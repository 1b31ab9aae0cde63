"""The RLHF reward model: a GPT-2 trunk with a scalar head, trained with eq. (2).

The pipeline DPO replaces (Sec. 3, "Reward modelling phase") first fits a reward model
r_phi(x, y) to the preference pairs by maximum likelihood under Bradley-Terry, eq. (1):

    L_R(r_phi) = -E_{(x, y_w, y_l)} [ log sigma(r_phi(x, y_w) - r_phi(x, y_l)) ]      eq. (2)

As in the paper ("a linear layer on top of the final transformer layer that produces a scalar
prediction"), r_phi reads the final hidden state h = ln_f(x) of the LAST response token of each
example of a batch (packing.Batch, any layout: a shared prompt's two responses are read in one
row):

    h_last = final_hidden(gpt_forward(trunk, batch, logits_at=last))     (E, C)   last: y's last token
    r      = h_last @ w + b                                              (E,)

and its backward is the head's, then the trunk's with a gradient on those hidden states only:

    dw = h_last^T dr;   db = sum_e dr_e;   dh_last = dr_e * w
    trunk grads = gpt_backward(None, cache, dhidden=dh_last)

The parameters are the trunk's GPT-2 names plus ``score.weight`` (C,) and ``score.bias`` (1,).
Shape letters: E examples (2N for N pairs: [chosen; rejected]), C channels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .backend import Backend, get_array_module, get_backend, to_numpy
from .losses import reward_model_loss
from .model import GPTConfig, final_hidden, gpt_backward, gpt_forward
from .packing import Batcher

__all__ = [
    "HEAD_KEYS",
    "init_reward_model",
    "split_head",
    "scalar_head_forward",
    "scalar_head_backward",
    "reward_forward",
    "reward_backward",
    "reward_model_step",
    "score_batch",
    "score_pairs",
    "pair_accuracy",
    "pearson",
]

HEAD_KEYS = ("score.weight", "score.bias")


def init_reward_model(trunk: dict, config: GPTConfig, seed: int = 0, prefix: str = "score") -> dict:
    """A copy of ``trunk`` (e.g. the SFT model) plus a scalar head ``{prefix}.weight`` (C,) ~
    Normal(0, 1/C) and ``{prefix}.bias`` (1,) = 0, in the trunk's dtype and device."""
    xp = get_array_module(trunk["transformer.wte.weight"])
    dt = trunk["transformer.wte.weight"].dtype
    out = {k: v.copy() for k, v in trunk.items()}
    w = np.random.default_rng([seed, 77]).standard_normal(config.n_embd) / math.sqrt(config.n_embd)
    out[f"{prefix}.weight"] = xp.asarray(w.astype(dt))  # (C,)
    out[f"{prefix}.bias"] = xp.zeros((1,), dtype=dt)  # (1,)
    return out


def split_head(params: dict, prefix: str = "score") -> tuple[dict, dict]:
    """(trunk params without the head, {"weight": (C,), "bias": (1,)})."""
    head = {"weight": params[f"{prefix}.weight"], "bias": params[f"{prefix}.bias"]}
    trunk = {k: v for k, v in params.items() if not k.startswith(prefix + ".")}
    return trunk, head


def scalar_head_forward(h, w, b):
    """s = h @ w + b over the last axis: h (..., C), w (C,), b (1,) -> s (...), cache."""
    return h @ w + b[0], (h, w)


def scalar_head_backward(ds, cache):
    """Backward of :func:`scalar_head_forward`: forward s = h @ w + b, so
    dh = ds[..., None] * w,  dw = sum ds * h,  db = sum ds.  Returns (dh, {"weight", "bias"})."""
    h, w = cache
    C = h.shape[-1]
    dh = ds[..., None] * w  # (..., C)
    dw = ds.reshape(-1) @ h.reshape(-1, C)  # (C,)
    db = ds.sum(keepdims=True).reshape(1)  # (1,)
    return dh, {"weight": dw, "bias": db}


def reward_forward(params: dict, config: GPTConfig, batch, *, validate: bool = False, prefix: str = "score"):
    """r_phi(x, y) of each example of ``batch``: the scalar head on its last response token's
    final hidden state (the trunk's logits and states are computed at those E positions only).

    Args:
        params: trunk + head (:func:`init_reward_model`).
        batch: a packing.Batch (data.collate_*, or a Batcher's) whose E examples are scored.
    Returns:
        rewards: (E,) params' dtype.
        cache: for :func:`reward_backward`.
    """
    trunk, head = split_head(params, prefix)
    _, mcache = gpt_forward(trunk, batch.input_ids, config, batch.layout, logits_at=batch.last_token_at(),
                            validate=validate)  # logits (E, V) unused
    r, hcache = scalar_head_forward(final_hidden(mcache), head["weight"], head["bias"])  # (E,)
    return r, {"model": mcache, "head": hcache, "prefix": prefix}


def reward_backward(dr, cache) -> dict:
    """Gradients of a loss with respect to trunk and head, given dr = dloss/dr (E,).
    Returns a dict with the keys of params (trunk names, then the head's)."""
    dh_last, g = scalar_head_backward(dr, cache["head"])  # (E, C): only the last response tokens are read
    grads = gpt_backward(None, cache["model"], dhidden=dh_last)
    p = cache["prefix"]
    grads[f"{p}.weight"], grads[f"{p}.bias"] = g["weight"], g["bias"]
    return grads


def reward_model_step(params: dict, config: GPTConfig, batch):
    """One step of eq. (2) on a preference batch (examples [chosen; rejected]: collate_preferences
    or a Batcher's ``pairs``). Returns (loss 0-d, metrics {"accuracy": 0-d}, grads)."""
    r, cache = reward_forward(params, config, batch)  # (2N,)
    n = r.shape[0] // 2
    losses, g_w, g_l = reward_model_loss(r[:n], r[n:])  # eq. (2), mean-loss gradients (N,) each
    xp = get_array_module(r)
    grads = reward_backward(xp.concatenate([g_w, g_l]).astype(r.dtype, copy=False), cache)
    acc = (r[:n] > r[n:]).astype(r.dtype).mean()
    return losses.mean(), {"accuracy": acc}, grads


def score_batch(params: dict, config: GPTConfig, items: Sequence, pad_id: int, backend: Backend | str = "cpu",
                batch_size: int = 64) -> np.ndarray:
    """r_phi of TokenizedSFT-like items (``prompt_ids``, ``response_ids``), (N,) float64 host."""
    batcher = Batcher(pad_id, backend=get_backend(backend))
    out = []
    for s in range(0, len(items), batch_size):
        r, _ = reward_forward(params, config, batcher.sft(list(items[s : s + batch_size])))
        out.append(to_numpy(r).astype(np.float64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


def score_pairs(params: dict, config: GPTConfig, pairs: Sequence, pad_id: int, backend: Backend | str = "cpu",
                batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(r_phi(x, y_w), r_phi(x, y_l)) of TokenizedPairs, each (N,) float64 host."""
    batcher = Batcher(pad_id, backend=get_backend(backend))
    cw, cl = [], []
    for s in range(0, len(pairs), batch_size):
        chunk = list(pairs[s : s + batch_size])
        r, _ = reward_forward(params, config, batcher.pairs(chunk))
        r = to_numpy(r).astype(np.float64)
        cw.append(r[: len(chunk)])
        cl.append(r[len(chunk):])
    return np.concatenate(cw), np.concatenate(cl)


def pair_accuracy(r_chosen: np.ndarray, r_rejected: np.ndarray) -> float:
    """Fraction of pairs with r(y_w) > r(y_l) (ties count half)."""
    d = np.asarray(r_chosen, dtype=np.float64) - np.asarray(r_rejected, dtype=np.float64)
    return float(np.mean((d > 0) + 0.5 * (d == 0)))


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length vectors (nan if either is constant)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else float("nan")
