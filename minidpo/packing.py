"""The batch: token rows, their layout as data, and where eq. (7)'s log-probs are read.

Every batch the model sees, in training and evaluation, for SFT and DPO, is one :class:`Batch`:

    input_ids     (R, L)   R rows of L tokens
    layout        Layout   each token's position, and which keys each query may see
    logits_at     (M,)     the flat row position r * L + t whose logits predict scored token m
    labels        (M,)     the scored token m itself
    example       (M,)     the example token m belongs to (DPO: chosen 0..N-1, rejected N..2N-1)
    weights       (E, M)   log pi(y_e|x) = sum_m weights[e, m] lp[m]    eq. (7)'s sum (1 / n_e: the mean;
                           LD-DPO: ld_alpha on a response's tokens past its pair's shorter length)

How the rows are filled is the batch's layout, decided once (:class:`Batcher`, from
TrainConfig's ``share_prompt`` and ``pack``); nothing downstream asks which one it holds:

- padded: each sequence [x | y] in its own row, right-padded to the longest (data.collate_*);
  the trivial layout: positions 0..L-1, query i sees keys 0..i.
- shared prompt (prefix sharing: Wang & Hegde 2024, arXiv:2410.20305): pair i is ONE sequence,
  the prompt once, then both responses,

      tokens     x_1 .. x_P | w_1 .. w_C     | l_1 .. l_R
      positions  0  .. P-1  | P .. P+C-1     | P .. P+R-1     (the rejected restarts at P)

  and a rejected token sees the prompt and its own response but not the chosen one, so every
  token sees exactly the context it has in its own padded row, at the same position: the
  logits, log-probs and loss are those of the padded batch. The prompt's keys and values are
  computed once and read by both responses (the backward sums both responses' gradients there).
- packed: sequences placed into rows of ``pack_length`` tokens, first fit in decreasing length,
  each with its own positions (restarting at 0); a token sees only its own sequence.

The attention structure is three integers per token (:class:`Layout`), not an (L, L) mask:

    query i sees key j   iff   start[i] <= j <= i   and not   hidden_lo[i] <= j < hidden_hi[i]

(start: where its sequence begins in the row; [hidden_lo, hidden_hi): the chosen response, for a
rejected token of a shared-prompt pair; empty otherwise). layers.attention_forward writes this
rule as one line; the fused kernels apply it inside the softmax.

With y_l no longer right after its prompt, "the token at t+1 is scored by the logits at t" no
longer holds, so the batch carries the explicit map ``logits_at`` (both responses' first tokens
are predicted by the prompt's last position, so it may repeat).

Letters: N pairs, E examples (2N for DPO, B for SFT), R rows, L row length, M scored tokens.
Everything here runs once per batch on the host (NumPy), then the arrays are copied to the
device; a training step never reads them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import get_array_module, get_backend

__all__ = ["Layout", "Batch", "Batcher", "Sequence", "pair_sequences", "sft_sequences", "pack_sequences",
           "pack_preferences", "pack_sft", "padded_batch", "causal_layout", "layout_from_attention_mask", "layout_of",
           "query_blocks"]


# ---------------------------------------------------------------------------------------------
# the layout: positions, and who may see whom
# ---------------------------------------------------------------------------------------------


def query_blocks(start: np.ndarray, block: int = 64) -> tuple[tuple[int, int, int], ...]:
    """((i0, i1, k0), ...): the L queries cut into L // block blocks (1 to 8) of near-equal size;
    the queries i0..i1-1 see keys k0..i1-1 at most, k0 = the smallest ``start`` among them (no
    query sees a later key). Attention scores each block against those keys only.

    start: (R, L) host ints, the layout's first visible key of every query.
    (Measured for causal attention, forward + backward, one thread, 32 rows x 6 heads: T 128 45 ms
    with 2 blocks against 56 with 1; T 256 155 ms with 4 against 160 with 2 and 168 with 8.)"""
    L = start.shape[1]
    n = max(1, min(8, L // block))
    edges = [round(j * L / n) for j in range(n + 1)]
    return tuple((i0, i1, int(start[:, i0:i1].min())) for i0, i1 in zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class Layout:
    """Where each token of R rows of L sits, and which keys each query may see (module docstring).

    positions: (R, L) int64, each token's position id (pads: 0).
    start, hidden_lo, hidden_hi: (R, L) int64: query i sees key j iff start[i] <= j <= i and not
        hidden_lo[i] <= j < hidden_hi[i] (a pad sees itself only: start = its own index).
    blocks: :func:`query_blocks` (host ints).
    causal: (host) every query i sees keys 0..i and positions are 0..L-1: the padded layout,
        which the model runs without reading the arrays above (the same numbers).
    max_position: (host) the largest position id (the model's n_ctx must exceed it).
    """

    positions: Any
    start: Any
    hidden_lo: Any
    hidden_hi: Any
    blocks: tuple
    causal: bool
    max_position: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.start.shape)


def layout_of(start, hidden_lo, hidden_hi, positions=None, backend=None, causal=None) -> Layout:
    """A Layout from host (R, L) int arrays (positions None: 0..L-1 in every row), copied to
    ``backend`` (None: NumPy). Every query must see itself: start[i] <= i, i outside [hidden_lo,
    hidden_hi)."""
    start, hidden_lo, hidden_hi = (np.asarray(a, dtype=np.int64) for a in (start, hidden_lo, hidden_hi))
    if positions is None:
        positions = np.tile(np.arange(start.shape[1], dtype=np.int64), (start.shape[0], 1))
    own = np.arange(start.shape[1], dtype=np.int64)
    if (start > own).any() or ((hidden_lo <= own) & (own < hidden_hi)).any():
        raise ValueError("a layout must let every query see itself (start <= its index, itself not hidden)")
    return _layout(np.asarray(positions, dtype=np.int64), start, hidden_lo, hidden_hi, backend, causal)


def _layout(positions, start, hidden_lo, hidden_hi, backend=None, causal=None) -> Layout:
    """A Layout from host (R, L) arrays, copied to ``backend`` (None: NumPy)."""
    R, L = start.shape
    if causal is None:
        causal = bool((start == 0).all() and (hidden_lo == hidden_hi).all()
                      and (positions == np.arange(L, dtype=np.int64)).all())
    be = get_backend(backend) if backend is not None else None
    dev = (lambda a: a) if be is None else (lambda a: be.asarray(a, dtype=np.int64))
    return Layout(dev(positions), dev(start), dev(hidden_lo), dev(hidden_hi), query_blocks(start), causal,
                  int(positions.max()) if positions.size else 0)


def causal_layout(R: int, L: int, backend=None) -> Layout:
    """The padded (trivial) layout of R rows of L tokens: positions 0..L-1, query i sees keys 0..i."""
    zeros = np.zeros((R, L), dtype=np.int64)
    return _layout(np.tile(np.arange(L, dtype=np.int64), (R, 1)), zeros, zeros, zeros, backend, causal=True)


def layout_from_attention_mask(attention_mask, position_ids=None, backend=None) -> Layout:
    """The layout of a padded batch given as a (B, T) key mask (1 real token, 0 pad), as
    Hugging Face models take it: each row's real tokens must be one contiguous run (left or right
    padding). A real token sees the real tokens up to itself; a pad sees itself and the real
    tokens before it. position_ids: None (0..T-1) or (T,) / (B, T) ints."""
    m = np.asarray(attention_mask) != 0  # (B, T)
    B, T = m.shape
    idx = np.arange(T, dtype=np.int64)
    first = np.where(m.any(axis=1), m.argmax(axis=1), T).astype(np.int64)  # (B,)
    last = np.where(m.any(axis=1), T - 1 - m[:, ::-1].argmax(axis=1), -1).astype(np.int64)  # (B,)
    if not (m == ((idx >= first[:, None]) & (idx <= last[:, None]))).all():
        raise ValueError("attention_mask: each row's real tokens must be one contiguous run (left or right "
                         "padding); a pad between real tokens has no layout here")
    before = idx[None, :] < first[:, None]  # left pads: they see themselves only
    start = np.where(before, idx[None, :], np.minimum(first[:, None], idx[None, :]))
    after = idx[None, :] > last[:, None]  # right pads: the real run and themselves
    hidden_lo = np.where(after, last[:, None] + 1, 0).astype(np.int64)
    hidden_hi = np.where(after, idx[None, :], 0).astype(np.int64)
    if position_ids is None:
        pos = np.tile(idx, (B, 1))
    else:
        pos = np.broadcast_to(np.asarray(position_ids, dtype=np.int64), (B, T)).copy()
    return _layout(pos, start.astype(np.int64), hidden_lo, hidden_hi, backend)


# ---------------------------------------------------------------------------------------------
# sequences, before they are laid out in rows
# ---------------------------------------------------------------------------------------------

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # a token's part of a shared-prompt sequence


@dataclass
class Sequence:
    """One attention-connected run of S tokens before it is laid out (host NumPy, all 1-D).

    tokens, positions: (S,) ints; hidden: (S, 2) ints, each token's hidden key range [lo, hi)
    local to the sequence ([0, 0): none); part: (S,) PROMPT / CHOSEN / REJECTED. Scored tokens
    (K,): ``src`` the local position whose logits predict each, ``at`` the token's own local
    position, ``labels`` the token, ``example`` its example."""

    tokens: np.ndarray
    positions: np.ndarray
    hidden: np.ndarray
    part: np.ndarray
    src: np.ndarray
    at: np.ndarray
    labels: np.ndarray
    example: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.size)


def _i64(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]) if parts else np.zeros(0, dtype=np.int64)


def _check_pair(i, prompt, chosen, rejected):
    if len(prompt) < 1:
        raise ValueError(f"pair {i}: empty prompt (the first response token needs a context; data.py "
                         f"prepends EOS to an empty prompt)")
    if len(chosen) < 1 or len(rejected) < 1:
        raise ValueError(f"pair {i}: empty {'chosen' if len(chosen) < 1 else 'rejected'} response")


def _one(x, y, e) -> Sequence:
    """[x | y] as its own sequence: y's tokens scored, example e."""
    P, n = len(x), len(y)
    return Sequence(tokens=_i64(x, y), positions=np.arange(P + n, dtype=np.int64),
                    hidden=np.zeros((P + n, 2), dtype=np.int64), part=_i64([PROMPT] * P, [CHOSEN] * n),
                    src=P - 1 + np.arange(n, dtype=np.int64), at=P + np.arange(n, dtype=np.int64), labels=_i64(y),
                    example=np.full(n, e, dtype=np.int64))


def pair_sequences(pairs, share_prompt: bool = True) -> list[Sequence]:
    """The sequences of N tokenized pairs (data.TokenizedPair or (prompt, chosen, rejected)).

    share_prompt: one sequence [x | y_w | y_l] per pair (positions and visibility as in the
    module docstring); otherwise two, [x | y_w] and [x | y_l], as the padded rows hold them
    (all chosen first, then all rejected). Example ids: chosen of pair i -> i, rejected -> N + i."""
    pairs = list(pairs)
    N = len(pairs)
    out = []
    for i, p in enumerate(pairs):
        x, yw, yl = (p.prompt_ids, p.chosen_ids, p.rejected_ids) if hasattr(p, "prompt_ids") else p
        _check_pair(i, x, yw, yl)
        P, C, R = len(x), len(yw), len(yl)
        if not share_prompt:
            out.append((_one(x, yw, i), _one(x, yl, N + i)))
            continue
        hidden = np.zeros((P + C + R, 2), dtype=np.int64)
        hidden[P + C:] = (P, P + C)  # a rejected token does not see the chosen response
        out.append(Sequence(
            tokens=_i64(x, yw, yl),
            positions=_i64(range(P), range(P, P + C), range(P, P + R)),
            hidden=hidden,
            part=_i64([PROMPT] * P, [CHOSEN] * C, [REJECTED] * R),
            # chosen token j is predicted at P-1+j; rejected token 0 at P-1 (the prompt's end),
            # rejected token j > 0 at P+C+j-1 (its own previous token)
            src=_i64(range(P - 1, P - 1 + C), [P - 1], range(P + C, P + C + R - 1)),
            at=_i64(range(P, P + C), range(P + C, P + C + R)),
            labels=_i64(yw, yl),
            example=_i64([i] * C, [N + i] * R),
        ))
    if share_prompt:
        return out
    return [c for c, _ in out] + [r for _, r in out]


def sft_sequences(items) -> list[Sequence]:
    """One sequence [x | y] per SFT item (data.TokenizedSFT or (prompt, response)); example b."""
    out = []
    for b, t in enumerate(items):
        x, y = (t.prompt_ids, t.response_ids) if hasattr(t, "prompt_ids") else t
        _check_pair(b, x, y, y)
        out.append(_one(x, y, b))
    return out


# ---------------------------------------------------------------------------------------------
# the batch
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch in any layout (module docstring); arrays on the backend's device.

    input_ids: (R, L) int64 (pads: pad_id).
    layout: the :class:`Layout`.
    logits_at: (M,) int64 flat row positions whose logits predict the scored tokens.
    labels, example: (M,) int64, each scored token and its example.
    token_counts: (E,) int64 on the device; ``host_token_counts``, ``host_example`` and
        ``host_at`` (each scored token's own flat position) on the host.
    parts: (R, L) host ints, PROMPT / CHOSEN / REJECTED of each token (pads: PROMPT).
    n_examples: E. n_tokens: real tokens in the rows. average: whether :meth:`weights` averages.
    ld_alpha: LD-DPO's weight on the tokens of a preference pair's longer response past the shorter
        one's length (1: eq. 7's plain sum; a pairs batch only).
    """

    input_ids: Any
    layout: Layout
    logits_at: Any
    labels: Any
    example: Any
    token_counts: Any
    host_token_counts: np.ndarray
    host_example: np.ndarray
    host_at: np.ndarray
    parts: np.ndarray
    n_examples: int
    n_tokens: int
    average: bool = False
    ld_alpha: float = 1.0
    _weights: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def n_padded(self) -> int:
        """R * L, the positions the rows hold (real tokens and pads)."""
        R, L = self.shape
        return R * L

    def last_token_at(self):
        """(E,) the flat row position of each example's last scored token (its own position, not
        the one predicting it), on the batch's device: where a reward model reads its state."""
        last = np.zeros(self.n_examples, dtype=np.int64)
        np.maximum.at(last, self.host_example, self.host_at)  # an example's tokens come in order
        return last if isinstance(self.logits_at, np.ndarray) else get_array_module(self.logits_at).asarray(last)

    def response_positions(self) -> np.ndarray:
        """(M,) host int64: each scored token's index within its own response (0, 1, ...), the
        tokens of an example coming in order."""
        order = np.lexsort((self.host_at, self.host_example))  # by example, then left to right
        first = np.concatenate([[0], np.cumsum(self.host_token_counts)[:-1]])  # (E,) each example's first slot
        pos = np.empty(self.host_example.size, dtype=np.int64)
        pos[order] = np.arange(order.size, dtype=np.int64) - first[self.host_example[order]]
        return pos

    def token_scale(self) -> np.ndarray:
        """(M,) host float64: what each scored token's log-prob counts for in its example's sum.
        1, except under LD-DPO (Liu et al. 2024, arXiv:2409.06411): in pair i, with l_p =
        min(|y_w|, |y_l|), a response's tokens past l_p count ld_alpha,

            log pi_ld(y|x) = sum_{k < l_p} log pi(y_k|.) + ld_alpha sum_{k >= l_p} log pi(y_k|.)"""
        scale = np.ones(self.host_example.size, dtype=np.float64)
        if self.ld_alpha != 1.0:
            n = self.host_token_counts  # (2N,) [chosen; rejected]
            half = self.n_examples // 2
            shared = np.minimum(n, np.roll(n, half))  # (2N,) l_p of each example's pair
            scale[self.response_positions() >= shared[self.host_example]] = self.ld_alpha
        return scale

    def weights(self, dtype):
        """(E, M) of ``dtype`` on the batch's device: weights[e, m] = token_scale[m] if scored token
        m belongs to example e (divided by n_e when the batch averages), else 0. Built on the host,
        once per dtype."""
        key = np.dtype(dtype).str
        if key not in self._weights:
            E, M = self.n_examples, self.host_example.size
            val = self.token_scale()
            if self.average:
                val /= np.maximum(self.host_token_counts, 1)[self.host_example]
            w = np.zeros((E, M), dtype=dtype)
            w[self.host_example, np.arange(M)] = val.astype(dtype)
            self._weights[key] = self._on_device(w)
        return self._weights[key]

    def mean_weights(self, dtype):
        """(E, M): 1 / n_e where scored token m belongs to example e, else 0: each example's plain
        per-token mean, whatever the batch's own rule (WPO's length-normalised weight reads it)."""
        key = "mean" + np.dtype(dtype).str
        if key not in self._weights:
            E, M = self.n_examples, self.host_example.size
            w = np.zeros((E, M), dtype=dtype)
            w[self.host_example, np.arange(M)] = (1.0 / np.maximum(self.host_token_counts, 1)[self.host_example]).astype(dtype)
            self._weights[key] = self._on_device(w)
        return self._weights[key]

    def _on_device(self, a):
        return a if isinstance(self.logits_at, np.ndarray) else get_array_module(self.logits_at).asarray(a)


def pack_sequences(seqs: list[Sequence], n_examples: int, pad_id: int, pack: bool = True,
                   pack_length: int | None = None, backend=None, average: bool = False) -> Batch:
    """Lay sequences out in rows: one a row (``pack=False``; right-padded to the longest), or
    packed first fit in decreasing length into rows of at most ``pack_length`` tokens (default:
    1.5 times the longest sequence; on the bench's long-prompt batches this left 15% of the
    positions empty where rows of the longest sequence's length left 28%, and stepped faster;
    longer rows pay more masked attention).

    Returns a :class:`Batch` whose arrays are on ``backend`` (None: NumPy)."""
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
    start = np.tile(np.arange(L, dtype=np.int64), (R, 1))  # a pad sees itself only
    hidden = np.zeros((R, L, 2), dtype=np.int64)
    parts = np.zeros((R, L), dtype=np.int64)
    src, at, labels, example = [], [], [], []
    for r, members in enumerate(rows):
        off = 0
        for j in members:
            s, n = seqs[j], int(lengths[j])
            ids[r, off:off + n] = s.tokens
            pos[r, off:off + n] = s.positions
            start[r, off:off + n] = off
            hidden[r, off:off + n] = np.where(s.hidden[:, 1:] > s.hidden[:, :1], s.hidden + off, 0)
            parts[r, off:off + n] = s.part
            src.append(r * L + off + s.src)
            at.append(r * L + off + s.at)
            labels.append(s.labels)
            example.append(s.example)
            off += n
    src, at = np.concatenate(src), np.concatenate(at)
    labels, example = np.concatenate(labels), np.concatenate(example)
    counts = np.bincount(example, minlength=n_examples).astype(np.int64)
    be = get_backend(backend) if backend is not None else None

    def dev(a):
        return a if be is None else be.asarray(a, dtype=a.dtype)

    if not pack and _plain_rows(seqs):  # one plain [x | y] a row: the padded layout
        layout = causal_layout(R, L, backend)
    else:
        layout = _layout(pos, start, hidden[..., 0], hidden[..., 1], backend, causal=False)
    return Batch(dev(ids), layout, dev(src), dev(labels), dev(example), dev(counts), counts, example, at, parts,
                 int(n_examples), int(lengths.sum()), bool(average))


def _plain_rows(seqs) -> bool:
    """Whether one-sequence-a-row rows are the padded layout: every sequence starts at position 0,
    counts up and hides nothing (no shared prompt)."""
    return all(not s.hidden.any() and (s.positions == np.arange(len(s), dtype=np.int64)).all() for s in seqs)


def pack_preferences(pairs, pad_id: int, share_prompt: bool = True, pack: bool = True, backend=None,
                     pack_length: int | None = None, average: bool = False, ld_alpha: float = 1.0) -> Batch:
    """N preference pairs as a :class:`Batch` with E = 2N examples (chosen 0..N-1, then rejected
    N..2N-1). ``share_prompt=False, pack=False`` is the padded batch of data.collate_preferences.
    ``ld_alpha``: LD-DPO's weight on the longer response's excess tokens (Batch.token_scale)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pack_preferences: no pairs given")
    if not (isinstance(ld_alpha, (int, float, np.floating)) and 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha must be a number in [0, 1], got {ld_alpha!r}")
    batch = pack_sequences(pair_sequences(pairs, share_prompt), 2 * len(pairs), pad_id, pack, pack_length,
                           backend, average)
    batch.ld_alpha = float(ld_alpha)
    return batch


def pack_sft(items, pad_id: int, pack: bool = True, backend=None, pack_length: int | None = None) -> Batch:
    """B SFT items as a :class:`Batch` with E = B examples (``pack=False``: data.collate_sft's)."""
    items = list(items)
    if not items:
        raise ValueError("pack_sft: no items given")
    return pack_sequences(sft_sequences(items), len(items), pad_id, pack, pack_length, backend)


def padded_batch(input_ids, loss_mask, average: bool = False, backend=None) -> Batch:
    """The batch of right-padded (B, T) rows given as arrays: ``loss_mask`` (B, T, bool or 0/1)
    marks the scored label positions (the token at t is predicted by the logits at t - 1; column
    0 is never scored, whatever the mask holds there). Each row is one example and must score at
    least one token; the ids of positions not scored are never read as labels."""
    ids = np.asarray(input_ids).astype(np.int64, copy=False)
    mask = np.asarray(loss_mask) != 0
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids and loss_mask must be (B, T) of one shape, got {ids.shape} and {mask.shape}")
    B, T = ids.shape
    mask = mask.copy()
    mask[:, 0] = False  # the first token has no logits before it: never scored
    counts = mask.sum(axis=1).astype(np.int64)
    if (counts == 0).any():
        raise ValueError(f"rows {', '.join(map(str, np.flatnonzero(counts == 0)[:8]))} have no scored token "
                         f"(loss_mask[:, 1:] is all zero): their log pi(y|x) would be 0 for any policy")
    b, t = np.nonzero(mask)  # row-major: example by example, in order
    at = b * T + t
    be = get_backend(backend) if backend is not None else None

    def dev(a):
        return a if be is None else be.asarray(a, dtype=a.dtype)

    return Batch(dev(ids), causal_layout(B, T, backend), dev(at - 1), dev(ids[b, t]), dev(b.astype(np.int64)),
                 dev(counts), counts, b.astype(np.int64), at, np.where(mask, CHOSEN, PROMPT), B, B * T,
                 bool(average))


# ---------------------------------------------------------------------------------------------
# the layout decided once
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batcher:
    """How every batch of a stage is laid out, decided once (TrainConfig's ``share_prompt`` and
    ``pack``, and the loss's log-prob rule ``average``): the training steps, the reference
    log-probs and the held-out evaluation all take their batches from here.

    pad_id: the padding token. share_prompt: DPO pairs as one [x | y_w | y_l] sequence. pack:
    sequences packed into rows (else one a row, right-padded). average: DPO log-probs as
    per-token means. ld_alpha: LD-DPO's weight on a pair's longer response past the shorter's
    length (1: plain sums). backend: where the arrays go (None: NumPy)."""

    pad_id: int
    share_prompt: bool = True
    pack: bool = True
    average: bool = False
    backend: Any = None
    ld_alpha: float = 1.0

    def pairs(self, pairs) -> Batch:
        """N tokenized preference pairs -> a Batch of 2N examples [chosen; rejected]."""
        return pack_preferences(pairs, self.pad_id, self.share_prompt, self.pack, self.backend, average=self.average,
                                ld_alpha=self.ld_alpha)

    def sft(self, items) -> Batch:
        """B tokenized SFT items -> a Batch of B examples (summed log-probs)."""
        return pack_sft(items, self.pad_id, self.pack, self.backend)
