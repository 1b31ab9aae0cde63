"""Shared prompts and packed rows: the layout of a batch without repeated prompts or padding.

A right-padded DPO batch (data.collate_preferences) holds every prompt twice, [x; y_w] and
[x; y_l], and pads every row to the longest. This module lays the same tokens out so that
neither happens (prefix sharing: Wang & Hegde 2024, arXiv:2410.20305):

Shared prompt. Pair i becomes ONE sequence, the prompt once, then both responses:

    tokens     x_1 .. x_P | w_1 .. w_C     | l_1 .. l_R
    positions  0  .. P-1  | P .. P+C-1     | P .. P+R-1     (the rejected restarts at P)
    branch     0  .. 0    | 1 .. 1         | 2 .. 2

and attention allows query q to see key k iff they are in the same sequence, k is not after q
in the row, and k is a prompt token or in q's own response (branch_k == 0 or branch_k ==
branch_q). So y_l never sees y_w and every token sees exactly the context it has in its own
padded row, at the same position: the logits, log-probs and DPO loss (eq. 7) are those of the
padded batch. The prompt's keys and values are computed once and read by both responses, so the
backward sums both responses' gradients into the prompt's activations by itself.

Packing. Sequences (shared pairs, or the 2N separate [x; y] rows, or SFT items) are placed into
rows of ``pack_length`` tokens, first fit in decreasing length, each with its own positions
(restarting at 0) and a block-diagonal mask: a token sees only its own sequence.

Scoring. With y_l no longer right after its prompt, "the token at t+1 is scored by the logits at
t" no longer holds, so the layout carries explicit index maps: scored token m (m = 0 .. M-1) has
label ``score_labels[m]``, is predicted by the logits of row position ``score_src[m]`` (a flat
index into the (R * L) positions) and belongs to example ``score_example[m]`` (DPO: 0..N-1
chosen, N..2N-1 rejected, as the rows of collate_preferences; SFT: the item). Both responses'
first tokens are scored by the prompt's last position, so ``score_src`` may repeat.

Letters: N pairs, E examples (2N for DPO, B for SFT), R packed rows, L row length, M scored
tokens. Everything here runs once per batch on the host (NumPy), then the arrays are copied to
the device; the step itself never reads them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .backend import get_backend

__all__ = ["Sequence", "PackedBatch", "pair_sequences", "sft_sequences", "pack_sequences",
           "pack_preferences", "pack_sft", "packed_of", "attention_allowed", "query_blocks"]

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch ids


@dataclass
class Sequence:
    """One attention-connected run of tokens before packing (host NumPy, all 1-D).

    tokens, positions, branch: (S,) ints; src, labels, example: (K,) ints, src local to the
    sequence (0 .. S-1)."""

    tokens: np.ndarray
    positions: np.ndarray
    branch: np.ndarray
    src: np.ndarray
    labels: np.ndarray
    example: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.size)


def _i64(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]) if parts else np.zeros(0, np.int64)


def _check_pair(i, prompt, chosen, rejected):
    if len(prompt) < 1:
        raise ValueError(f"pair {i}: empty prompt (the first response token needs a context; data.py "
                         f"prepends EOS to an empty prompt)")
    if len(chosen) < 1 or len(rejected) < 1:
        raise ValueError(f"pair {i}: empty {'chosen' if len(chosen) < 1 else 'rejected'} response")


def pair_sequences(pairs, share_prompt: bool = True) -> list[Sequence]:
    """The sequences of N tokenized pairs (data.TokenizedPair or (prompt, chosen, rejected)).

    share_prompt: one sequence [x | y_w | y_l] per pair (positions and branches as in the module
    docstring); otherwise two, [x | y_w] and [x | y_l], as the padded rows hold them.
    Example ids: chosen of pair i -> i, rejected -> N + i."""
    pairs = list(pairs)
    N = len(pairs)
    out = []
    for i, p in enumerate(pairs):
        x, yw, yl = (p.prompt_ids, p.chosen_ids, p.rejected_ids) if hasattr(p, "prompt_ids") else p
        _check_pair(i, x, yw, yl)
        P, C, R = len(x), len(yw), len(yl)
        if share_prompt:
            out.append(Sequence(
                tokens=_i64(x, yw, yl),
                positions=_i64(np.arange(P, dtype=np.int64), P + np.arange(C, dtype=np.int64), P + np.arange(R, dtype=np.int64)),
                branch=_i64(np.full(P, PROMPT, dtype=np.int64), np.full(C, CHOSEN, dtype=np.int64), np.full(R, REJECTED, dtype=np.int64)),
                # chosen token j is scored at P-1+j; rejected token 0 at P-1 (the prompt's end),
                # rejected token j > 0 at P+C+j-1 (its own previous token)
                src=_i64(P - 1 + np.arange(C, dtype=np.int64), [P - 1], P + C + np.arange(R - 1, dtype=np.int64)),
                labels=_i64(yw, yl),
                example=_i64(np.full(C, i, dtype=np.int64), np.full(R, N + i, dtype=np.int64)),
            ))
        else:
            for y, e in ((yw, i), (yl, N + i)):
                n = len(y)
                out.append(Sequence(tokens=_i64(x, y), positions=np.arange(P + n, dtype=np.int64),
                                    branch=np.zeros(P + n, np.int64), src=P - 1 + np.arange(n, dtype=np.int64),
                                    labels=_i64(y), example=np.full(n, e, dtype=np.int64)))
    if share_prompt:
        return out
    return out[0::2] + out[1::2]  # all chosen first, then all rejected: the padded rows' order


def sft_sequences(items) -> list[Sequence]:
    """One sequence [x | y] per SFT item (data.TokenizedSFT or (prompt, response)); example b."""
    out = []
    for b, t in enumerate(items):
        x, y = (t.prompt_ids, t.response_ids) if hasattr(t, "prompt_ids") else t
        _check_pair(b, x, y, y)
        P, n = len(x), len(y)
        out.append(Sequence(tokens=_i64(x, y), positions=np.arange(P + n, dtype=np.int64),
                            branch=np.zeros(P + n, np.int64), src=P - 1 + np.arange(n, dtype=np.int64),
                            labels=_i64(y), example=np.full(n, b, dtype=np.int64)))
    return out


def query_blocks(L: int, seq_start: np.ndarray, block: int = 64) -> list[tuple[int, int, int]]:
    """[(i0, i1, k0), ...]: the L queries cut into blocks of about ``block``; block i0..i1-1
    needs keys k0..i1-1 only, k0 = the earliest start of a sequence any of its queries is in
    (every mask here is causal within a row and block-diagonal across sequences).

    seq_start: (R, L) the row index where each position's sequence starts (a pad: itself)."""
    n = max(1, min(8, math.ceil(L / block)))
    edges = [round(j * L / n) for j in range(n + 1)]
    return [(i0, i1, int(seq_start[:, i0:i1].min())) for i0, i1 in zip(edges[:-1], edges[1:])]


@dataclass
class PackedBatch:
    """A batch laid out by :func:`pack_sequences`; arrays on the backend's device.

    input_ids, position_ids: (R, L) int64 (pads: pad_id, position 0).
    seq_id: (R, L) int64, the sequence of each position, unique over the batch; -1 - t on the
        pad at row position t (so a pad matches no other token).
    branch: (R, L) int64, 0 prompt / shared, 1 chosen, 2 rejected.
    score_src, score_labels, score_example: (M,) int64 (the module docstring's index maps).
    score_weight: (E, M) of ``dtype``: logps = score_weight @ lp (the sum of each example's
        token log-probs, or their mean with average=True); built on the host.
    token_counts: (E,) int64 on the device, and ``host_token_counts`` the same on the host;
        ``host_example`` is score_example on the host.
    blocks: :func:`query_blocks` (host ints).
    n_examples: E. n_tokens: real tokens in the rows; n_padded: R * L.
    max_position: the largest position id (host int; the model's n_ctx must exceed it).
    """

    input_ids: object
    position_ids: object
    seq_id: object
    branch: object
    score_src: object
    score_labels: object
    score_example: object
    token_counts: object
    host_token_counts: np.ndarray
    host_example: np.ndarray
    blocks: list
    n_examples: int
    n_tokens: int
    n_padded: int
    max_position: int = 0
    average: bool = False
    _weights: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def score_weight(self, dtype, xp):
        """(E, M) weights of ``dtype`` on the device (cached per dtype)."""
        key = np.dtype(dtype).str
        if key not in self._weights:
            E, M = self.n_examples, int(self.score_src.shape[0])
            ex = self.host_example
            w = np.zeros((E, M), dtype=dtype)
            val = np.ones(M, dtype=np.float64)
            if self.average:
                val /= np.maximum(self.host_token_counts, 1)[ex]
            w[ex, np.arange(M)] = val.astype(dtype)
            self._weights[key] = w if xp is np else xp.asarray(w)
        return self._weights[key]


def pack_sequences(seqs: list[Sequence], n_examples: int, pad_id: int, pack: bool = True,
                   pack_length: int | None = None, backend=None, average: bool = False,
                   block: int = 64) -> PackedBatch:
    """Lay sequences out in rows: one a row (``pack=False``; right-padded to the longest), or
    packed first fit in decreasing length into rows of at most ``pack_length`` tokens (default:
    1.5 times the longest sequence; on the bench's long-prompt batches this left 15% of the
    positions empty where rows of the longest sequence's length left 28%, and stepped faster;
    longer rows pay more masked attention).

    Returns a :class:`PackedBatch` whose arrays are on ``backend`` (None: NumPy)."""
    if not seqs:
        raise ValueError("pack_sequences: no sequences")
    if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    longest = int(lengths.max())
    if pack:
        cap = longest + longest // 2 if pack_length is None else int(pack_length)
        if cap < longest:
            raise ValueError(f"pack_length {cap} is shorter than the longest sequence ({longest} tokens)")
        rows: list[list[int]] = []
        free: list[int] = []
        for j in sorted(range(len(seqs)), key=lambda j: (-lengths[j], j)):  # stable: deterministic
            for r, f in enumerate(free):
                if lengths[j] <= f:
                    rows[r].append(j)
                    free[r] -= int(lengths[j])
                    break
            else:
                rows.append([j])
                free.append(cap - int(lengths[j]))
        L = max(cap - f for f in free)
    else:
        rows = [[j] for j in range(len(seqs))]
        L = longest
    R = len(rows)
    ids = np.full((R, L), pad_id, dtype=np.int64)
    pos = np.zeros((R, L), dtype=np.int64)
    seq_id = -1 - np.tile(np.arange(L, dtype=np.int64), (R, 1))  # pads: unique negatives
    branch = np.zeros((R, L), dtype=np.int64)
    seq_start = np.tile(np.arange(L, dtype=np.int64), (R, 1))
    src, labels, example = [], [], []
    for r, members in enumerate(rows):
        off = 0
        for j in members:
            s, n = seqs[j], int(lengths[j])
            ids[r, off:off + n] = s.tokens
            pos[r, off:off + n] = s.positions
            seq_id[r, off:off + n] = j
            branch[r, off:off + n] = s.branch
            seq_start[r, off:off + n] = off
            src.append(r * L + off + s.src)
            labels.append(s.labels)
            example.append(s.example)
            off += n
    src, labels, example = np.concatenate(src), np.concatenate(labels), np.concatenate(example)
    counts = np.bincount(example, minlength=n_examples).astype(np.int64)
    be = get_backend(backend) if backend is not None else None

    def dev(a):
        return a if be is None else be.asarray(a, dtype=a.dtype)

    pb = PackedBatch(dev(ids), dev(pos), dev(seq_id), dev(branch), dev(src), dev(labels), dev(example),
                     dev(counts), counts, example, query_blocks(L, seq_start, block), int(n_examples),
                     int(lengths.sum()), R * L, int(pos.max()), bool(average))
    return pb


def pack_preferences(pairs, pad_id: int, share_prompt: bool = True, pack: bool = True, backend=None,
                     pack_length: int | None = None, average: bool = False) -> PackedBatch:
    """N preference pairs as a :class:`PackedBatch` with E = 2N examples (chosen 0..N-1, then
    rejected N..2N-1: the order of data.collate_preferences' rows)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pack_preferences: no pairs given")
    return pack_sequences(pair_sequences(pairs, share_prompt), 2 * len(pairs), pad_id, pack, pack_length,
                          backend, average)


def pack_sft(items, pad_id: int, pack: bool = True, backend=None, pack_length: int | None = None) -> PackedBatch:
    """B SFT items as a :class:`PackedBatch` with E = B examples."""
    items = list(items)
    if not items:
        raise ValueError("pack_sft: no items given")
    return pack_sequences(sft_sequences(items), len(items), pad_id, pack, pack_length, backend)


def packed_of(batch) -> PackedBatch | None:
    """The :class:`PackedBatch` a step's batch holds: the batch itself, or ``batch["packed"]`` of
    a dict (which then also carries the step's other entries: reference log-probs, shard weight);
    None for a collated, padded batch (data.collate_preferences / collate_sft)."""
    if isinstance(batch, PackedBatch):
        return batch
    if isinstance(batch, dict):
        return batch.get("packed")
    return None


def attention_allowed(seq_id, branch, xp=None):
    """(R, L, L) bool: query q may attend to key k.

        allowed[r, q, k] = (seq[q] == seq[k]) & (k <= q) & (branch[k] == 0 | branch[k] == branch[q])

    Pads have a sequence id of their own, so a pad sees itself only and no real token sees a pad;
    every query sees at least itself, so no softmax row is empty."""
    xp = xp or np
    L = seq_id.shape[1]
    same = seq_id[:, :, None] == seq_id[:, None, :]  # (R, L, L)
    causal = xp.arange(L)[None, :] <= xp.arange(L)[:, None]  # (L, L) k <= q
    bq, bk = branch[:, :, None], branch[:, None, :]
    return same & causal[None] & ((bk == PROMPT) | (bk == bq))
