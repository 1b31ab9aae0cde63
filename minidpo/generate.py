"""Text continuation for evaluation: greedy or temperature / top-k sampling, batched, KV-cached.

Prompts of different lengths are left-padded into one (B, P) batch. A key-padding attention
mask hides the pads and position ids restart at 0 on each row's first real token, so every row
computes exactly what it would alone. The prompt is fed once; each new token then costs one
single-position forward that reuses the cached keys and values (:func:`gpt_forward_kv`).

Sampling: the probabilities are computed on the params' device (softmax of logits / temperature,
restricted to the top_k logits), copied to the host, and one uniform number per row from the
host NumPy generator picks a token by inverse CDF. The same seed therefore gives the same tokens
on CPU and GPU (up to the devices' rounding of the probabilities), and the generator's state can
be saved as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .backend import get_array_module, get_backend, to_numpy
from .layers import softmax
from .model import GPTConfig, check_params, gpt_forward_kv, init_kv_cache

__all__ = ["generate", "left_pad", "next_token_probs", "sample_from_probs"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Left-pad token lists into one batch.

    Args:
        prompts: B non-empty lists of token ids.
        pad_id: the id written at pad positions (masked out, so any valid id works).

    Returns:
        idx: (B, P) int64, P = longest prompt, each row ``[pad]*(P - len) + prompt``.
        attention_mask: (B, P) int64, 1 = real token, 0 = pad.
        position_ids: (B, P) int64, 0 at each row's first real token (0 at its pads too).
    """
    B = len(prompts)
    P = max(len(p) for p in prompts)
    idx = np.full((B, P), pad_id, dtype=np.int64)
    mask = np.zeros((B, P), dtype=np.int64)
    for b, p in enumerate(prompts):
        if len(p):
            idx[b, P - len(p):] = p
            mask[b, P - len(p):] = 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (B, P)
    return idx, mask, pos


def next_token_probs(logits, temperature: float = 1.0, top_k: int | None = None):
    """Sampling distribution over the vocabulary, computed on the logits' device.

        p = softmax(z / temperature) over the top_k largest z, 0 elsewhere

    Logits tied with the k-th largest are kept as well (so a row may keep more than k tokens).

    Args:
        logits: (B, V) floating.
        temperature: > 0.
        top_k: None (no filtering) or an int >= 1; values >= V mean no filtering.

    Returns:
        probs: (B, V), the logits' dtype, rows summing to 1.
    """
    xp = get_array_module(logits)
    dt = logits.dtype.type
    V = logits.shape[-1]
    z = logits / dt(temperature)  # (B, V), new array
    if top_k is not None and top_k < V:
        k = int(V - top_k)  # a Python int: CuPy iterates any other kth (a NumPy integer fails)
        kth = xp.partition(z, k, axis=-1)[:, k][:, None]  # (B, 1) k-th largest
        z = xp.where(z < kth, dt(-math.inf), z)
    return softmax(z)  # (B, V)


def sample_from_probs(probs, rng: np.random.Generator) -> np.ndarray:
    """One token per row by inverse CDF with one host uniform per row.

    The token is the first index whose cumulative probability exceeds ``u * total``, so
    tokens of probability 0 are never drawn.

    Args:
        probs: (B, V) host or device array of non-negative weights.
        rng: NumPy Generator (draws exactly B uniforms).

    Returns:
        (B,) int64 host array.
    """
    p = to_numpy(probs).astype(np.float64)  # (B, V)
    cdf = np.cumsum(p, axis=1)  # (B, V)
    u = rng.random(p.shape[0]) * cdf[:, -1]  # (B,)
    tok = (cdf <= u[:, None]).sum(axis=1)  # (B,) first index with cdf > u
    last_nonzero = p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)  # guard u rounding to total
    return np.minimum(tok, last_nonzero).astype(np.int64)


def _check_prompts(prompts, vocab_size):
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of lists of token ids, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, np.ndarray):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        row = []
        for t in p:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"prompts[{i}] holds {t!r} ({type(t).__name__}); token ids must be ints")
            if not 0 <= t < vocab_size:
                raise ValueError(f"prompts[{i}] holds token id {t}, outside [0, {vocab_size})")
            row.append(int(t))
        out.append(row)
    return out


def generate(
    params,
    config: GPTConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    rng: np.random.Generator | None = None,
    backend=None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        params: the model's parameters (dict of :func:`minidpo.model.param_shapes`).
        config: the model size.
        prompts: B non-empty lists of token ids, any lengths. The longest prompt plus
            ``max_new_tokens`` must fit in ``n_ctx``; longer prompts are rejected (truncate them
            before calling, keeping the end you want).
        max_new_tokens: most tokens generated per prompt (>= 0).
        temperature: > 0; logits are divided by it before the softmax (ignored when greedy).
        top_k: sample only among the top_k most likely tokens (None: all; 1: greedy).
        greedy: take the argmax of the logits (exact, ties to the lowest id) instead of sampling.
        eos_id: a row stops after generating this id; the EOS token is included in its
            continuation and nothing after it.
        rng: NumPy Generator for sampling (None: a fresh unseeded one). Unused when greedy.
        backend: None to run where the params are; else 'cpu', 'cuda[:N]' or a Backend, and the
            params are placed there first.

    Returns:
        B lists: the generated continuation of each prompt (prompt not included).
    """
    if backend is not None:
        be = get_backend(backend)
        params = {k: be.asarray(v, dtype=v.dtype) for k, v in params.items()}
    check_params(params, config)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not greedy:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
            raise TypeError(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        if rng is None:
            rng = np.random.default_rng()
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if eos_id is not None and (
        isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or not 0 <= eos_id < config.vocab_size
    ):
        raise ValueError(f"eos_id must be None or a token id in [0, {config.vocab_size}), got {eos_id!r}")
    prompts = _check_prompts(prompts, config.vocab_size)
    B = len(prompts)
    if B == 0 or max_new_tokens == 0:
        return [[] for _ in range(B)]
    lens = np.array([len(p) for p in prompts], dtype=np.int64)  # (B,)
    P = int(lens.max())
    if P + max_new_tokens > config.n_ctx:
        longest = int(np.argmax(lens))
        raise ValueError(
            f"prompt {longest} has {P} tokens; with max_new_tokens={max_new_tokens} that exceeds n_ctx="
            f"{config.n_ctx} (prompts may have at most {config.n_ctx - max_new_tokens} tokens)"
        )

    padded = bool((lens < P).any())
    idx, mask, pos = left_pad(prompts)  # (B, P) each
    cache = init_kv_cache(params, config, B, capacity=P + max_new_tokens)
    logits, cache = gpt_forward_kv(
        params, idx, config, cache,
        attention_mask=mask if padded else None,
        position_ids=pos if padded else None,
        last_only=True,
    )  # (B, 1, V)
    next_pos = lens.copy()  # (B,) position id of each row's next token
    out = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        last = logits[:, -1, :]  # (B, V)
        if greedy:
            tok = to_numpy(get_array_module(last).argmax(last, axis=-1)).astype(np.int64)  # (B,)
        else:
            tok = sample_from_probs(next_token_probs(last, temperature, top_k), rng)  # (B,)
        for b in np.flatnonzero(~done):
            out[b].append(int(tok[b]))
            if eos_id is not None and tok[b] == eos_id:
                done[b] = True
        if done.all() or step == max_new_tokens - 1:
            break
        # finished rows keep being fed (their outputs are ignored): the batch stays rectangular
        logits, cache = gpt_forward_kv(
            params, tok[:, None], config, cache,
            position_ids=next_pos[:, None] if padded else None,
            last_only=True,
        )  # (B, 1, V)
        next_pos += 1
    return out
