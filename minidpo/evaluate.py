"""Evaluation from samples: what the policy writes, what it scores, and what it cost in KL.

The paper judges a policy by two numbers (Sec. 6.1, Fig. 2 left): the expected ground-truth
reward of its samples, E_{x, y ~ pi}[r(x, y)], and its divergence from the reference,

    KL(pi || pi_ref)(x) = E_{y ~ pi(.|x)} [ log pi(y|x) - log pi_ref(y|x) ]           (eq. 3's KL)

estimated here by Monte Carlo: sample y from pi, then sum the per-token log-ratios over the
sampled tokens (:func:`kl_from_samples`). Each sample's sum is an unbiased estimate of the KL of
its prompt; the mean over prompts estimates the KL of eq. (3), and its standard error is
reported beside it.

Samples are decoded continuations; their token ids are kept, so log-probs are computed on
exactly the tokens that were sampled (decoding and re-encoding could change them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backend import Backend, get_backend
from .data import TokenizedSFT
from .packing import Batcher
from .generate import generate
from .model import GPTConfig
from .scoring import chunked_logps


@dataclass
class Samples:
    """Continuations of prompts: ``texts[i]`` and ``ids[i]`` belong to ``prompts[i]``
    (``prompt_ids[i]`` its tokens). A prompt sampled k times appears k times."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    ids: list[list[int]]
    texts: list[str]


def mean_and_stderr(values) -> tuple[float, float]:
    """Sample mean and its standard error s / sqrt(n) (0 for n < 2)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def sample_continuations(
    params: dict, config: GPTConfig, tokenizer, prompts: Sequence[str], n_samples: int = 1, *,
    max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None, greedy: bool = False,
    rng: np.random.Generator | None = None, batch_size: int = 64, backend: Backend | str = "cpu",
    progress: str | None = None, on_batch=None,
) -> Samples:
    """Sample ``n_samples`` continuations of every prompt from the model (KV-cached, batched).

    Returns a :class:`Samples` of len(prompts) * n_samples rows, prompt-major
    (prompt 0's samples first). Continuations end at EOS (which is kept in ``ids`` and dropped
    from ``texts``) or after ``max_new_tokens`` tokens. ``progress``: the name of a progress
    bar over the samples (None: no bar); ``on_batch``: called after each batch."""
    backend = get_backend(backend)
    rng = rng if rng is not None else np.random.default_rng(0)
    eos = tokenizer.eos_id
    rows_prompts = [p for p in prompts for _ in range(n_samples)]
    encoded = {p: tokenizer.encode(p) or [eos] for p in set(rows_prompts)}  # empty prompt: EOS as BOS
    rows_ids = [encoded[p] for p in rows_prompts]
    out_ids: list[list[int]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows_ids), desc=progress, disable=progress is None, dynamic_ncols=True, unit="sample")
    for s in range(0, len(rows_ids), batch_size):
        out_ids += generate(params, config, rows_ids[s : s + batch_size], max_new_tokens, temperature=temperature,
                            top_k=top_k, greedy=greedy, eos_id=eos, rng=rng, backend=backend)
        bar.update(len(rows_ids[s : s + batch_size]))
        if on_batch is not None:
            on_batch()
    bar.close()
    texts = [tokenizer.decode([t for t in ids if t != eos]) for ids in out_ids]
    return Samples(prompts=rows_prompts, prompt_ids=rows_ids, ids=out_ids, texts=texts)


def continuation_logps(
    params: dict, config: GPTConfig, samples: Samples, pad_id: int, *, batch_size: int = 64,
    backend: Backend | str = "cpu",
) -> np.ndarray:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) of each sampled continuation, (N,) float64 on the host.

    Rows with an empty continuation get 0."""
    backend = get_backend(backend)
    out = np.zeros(len(samples.ids), dtype=np.float64)
    rows = [i for i, ids in enumerate(samples.ids) if ids]
    items = [TokenizedSFT(prompt_ids=list(samples.prompt_ids[i]), response_ids=list(samples.ids[i])) for i in rows]
    start = 0
    batcher = Batcher(pad_id, backend=backend)  # the continuations packed into rows
    for logps, _ in chunked_logps(params, config, items, batcher.sft, batch_size):
        out[rows[start : start + len(logps)]] = logps.astype(np.float64)
        start += len(logps)
    return out


def kl_from_samples(
    policy: dict, reference: dict, config: GPTConfig, samples: Samples, pad_id: int, *, batch_size: int = 64,
    backend: Backend | str = "cpu",
) -> np.ndarray:
    """Per-sample KL estimates log pi(y|x) - log pi_ref(y|x) for y ~ pi (the samples must come
    from ``policy``), (N,) float64. Their mean estimates KL(pi || pi_ref)."""
    lp = continuation_logps(policy, config, samples, pad_id, batch_size=batch_size, backend=backend)
    lp_ref = continuation_logps(reference, config, samples, pad_id, batch_size=batch_size, backend=backend)
    return lp - lp_ref
