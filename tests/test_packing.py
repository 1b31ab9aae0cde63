"""Shared prompts and packed rows (minidpo.packing): the layout as data, the layout's attention
against finite differences, and every step on every layout against the padded batch (float64:
the loss, the log-probs and every parameter gradient). One model runs them all."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dataclasses

from minidpo import layers
from minidpo.data import TokenizedPair, TokenizedSFT, collate_preferences, collate_sft
from minidpo.layers import attention_backward, attention_forward
from minidpo.model import GPTConfig, init_params
from minidpo.packing import (CHOSEN, PROMPT, REJECTED, Batcher, causal_layout, pack_preferences, pack_sft,
                             pair_sequences, query_blocks)
from minidpo.scoring import batch_logps, batched_sequence_logps
from minidpo.train import TrainConfig, dpo_step, sft_step
from tests.conftest import requires_cuda

CFG = GPTConfig(vocab_size=37, n_ctx=24, n_layer=2, n_head=2, n_embd=8)
LAYOUTS = [(True, True), (True, False), (False, True)]  # (share_prompt, pack)


def _pairs(rng, n, max_p=6, max_r=6):
    out = []
    for _ in range(n):
        P, C, R = int(rng.integers(1, max_p + 1)), int(rng.integers(1, max_r + 1)), int(rng.integers(1, max_r + 1))
        out.append(TokenizedPair(rng.integers(0, CFG.vocab_size, P).tolist(), rng.integers(0, CFG.vocab_size, C).tolist(),
                                 rng.integers(0, CFG.vocab_size, R).tolist()))
    return out


def _assert_grads_equal(g0, g1, rtol=1e-10, zero=False):
    """Each gradient to rtol, entries near 0 judged on the scale of the largest gradient entry of
    the step (a whole tensor may be ~1e-9 where the loss is saturated). ``zero``: the gradient is
    0 in exact arithmetic (every pair's chosen and rejected are the same tokens, so their terms
    cancel), and what is left is the round-off of O(0.01-1) terms: held to 1e-14 absolute."""
    assert list(g0) == list(g1)
    top = max(float(np.abs(g).max()) for g in g0.values())
    for k in g0:
        assert g1[k].dtype == g0[k].dtype, k
        scale = max(float(np.abs(g0[k]).max()), 1e-6 * top, 1e-300)
        np.testing.assert_allclose(g1[k], g0[k], rtol=rtol, atol=1e-14 if zero else rtol * scale, err_msg=k)


# ---------------------------------------------------------------------------------------------
# the layout


def test_shared_layout_positions_visibility_and_scores():
    x, yw, yl = [5, 6, 7], [8, 9], [10, 11, 12, 13]
    (s,) = pair_sequences([TokenizedPair(x, yw, yl)], share_prompt=True)
    assert s.tokens.tolist() == x + yw + yl
    assert s.positions.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]  # the rejected restarts at len(prompt)
    assert s.part.tolist() == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 4
    assert s.hidden.tolist() == [[0, 0]] * 5 + [[3, 5]] * 4  # a rejected token never sees the chosen ones
    # chosen: predicted at 2, 3; rejected: its first token at the prompt's end (2), then at 5, 6, 7
    assert s.src.tolist() == [2, 3, 2, 5, 6, 7]
    assert s.at.tolist() == [3, 4, 5, 6, 7, 8]
    assert s.labels.tolist() == yw + yl
    assert s.example.tolist() == [0, 0, 1, 1, 1, 1]


def _allowed(layout):
    """(R, L, L) the layout's mask by layers.sees, the plain attention's rule."""
    return layers.sees(layout.shape[1], layout.start, layout.hidden_lo, layout.hidden_hi)


def test_mask_keeps_responses_apart_and_sequences_apart():
    pairs = [TokenizedPair([1, 2], [3], [4, 5]), TokenizedPair([6], [7, 8], [9]), TokenizedPair([1], [2], [3])]
    pb = pack_preferences(pairs, pad_id=0, pack=True, pack_length=10)
    assert pb.shape == (2, 9)  # pairs 0 and 1 in row 0; pair 2 in row 1, then 6 pads
    allowed = _allowed(pb.layout)[0]  # (L, L)
    parts = pb.parts[0]
    seq = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])  # row 0: pair 0 at 0..4, pair 1 at 5..8
    for q in range(9):
        for k in range(9):
            want = seq[q] == seq[k] and k <= q and (parts[k] == PROMPT or parts[k] == parts[q])
            assert allowed[q, k] == want, (q, k)
    assert allowed.diagonal().all()  # every softmax row has a key
    assert not allowed[3, 2] and not allowed[4, 2]  # pair 0's rejected tokens never see its chosen token
    assert allowed[4, 3] and allowed[4, 0] and allowed[2, 1]  # their own earlier tokens and the prompt
    assert not allowed[5, 0]  # pair 1's prompt never sees pair 0
    assert pb.layout.positions[0].tolist() == [0, 1, 2, 2, 3, 0, 1, 2, 1]
    pads = _allowed(pb.layout)[1]
    assert (pads[3:] == np.eye(9, dtype=bool)[3:]).all()  # a pad sees itself only
    assert not pads[:3, 3:].any()  # no real token sees a pad
    assert not pb.layout.causal and collate_preferences(pairs, 0).layout.causal


def test_packing_fills_rows_and_never_splits_a_sequence():
    rng = np.random.default_rng(1)
    pairs = _pairs(rng, 9, max_p=8, max_r=8)
    pad = CFG.vocab_size  # no token id: the real positions are the others
    pb = pack_preferences(pairs, pad, share_prompt=True, pack=True)
    padded = pack_preferences(pairs, pad, share_prompt=True, pack=False)
    assert pb.n_tokens == padded.n_tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                                 for p in pairs)
    assert pb.n_padded < padded.n_padded and pb.shape[1] <= padded.shape[1] * 3 // 2
    real = pb.input_ids != pad
    starts = {(r, int(pb.layout.start[r, t])) for r, t in zip(*np.nonzero(real))}
    assert len(starts) == 9  # nine sequences, each one run of a row from its start
    for r, s0 in starts:
        run = np.nonzero((pb.layout.start[r] == s0) & real[r])[0]
        assert run[0] == s0 and (np.diff(run) == 1).all()
    with pytest.raises(ValueError, match="shorter than the longest"):
        pack_preferences(pairs, 0, pack_length=3)


def test_the_padded_layout_is_collate_and_causal():
    """pack=False, share_prompt=False is the padded batch: one [x | y] a row, [chosen; rejected],
    the trivial layout (positions 0..L-1, query i sees keys 0..i)."""
    rng = np.random.default_rng(2)
    pairs = _pairs(rng, 4)
    b = pack_preferences(pairs, 0, share_prompt=False, pack=False)
    c = collate_preferences(pairs, 0)
    for f in ("input_ids", "logits_at", "labels", "example", "token_counts"):
        np.testing.assert_array_equal(getattr(b, f), getattr(c, f), err_msg=f)
    assert b.layout.causal and b.layout.blocks == causal_layout(*b.shape).blocks
    for row, p in enumerate(pairs + pairs):
        y = p.chosen_ids if row < len(pairs) else p.rejected_ids
        n = len(p.prompt_ids) + len(y)
        assert b.input_ids[row, :n].tolist() == p.prompt_ids + y and (b.input_ids[row, n:] == 0).all()


def test_empty_response_and_prompt_are_refused():
    with pytest.raises(ValueError, match="pair 0: empty rejected"):
        pack_preferences([TokenizedPair([1], [2], [])], 0)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_preferences([TokenizedPair([], [2], [3])], 0)
    with pytest.raises(ValueError, match="empty chosen"):
        pack_sft([TokenizedSFT([1], [])], 0)


def test_positions_beyond_n_ctx_are_refused(params64):
    long = TokenizedPair(list(range(1, 20)), [1, 2, 3, 4, 5, 6], [7])  # positions up to 24 > n_ctx 24 - 1
    pb = pack_preferences([long], 0)
    assert pb.layout.max_position == 24
    with pytest.raises(ValueError, match="beyond the model's n_ctx=24"):
        dpo_step(params64, CFG, pb, np.zeros(1), np.zeros(1), TrainConfig())
    ok = pack_preferences([TokenizedPair(list(range(1, 19)), [1, 2, 3, 4, 5, 6], [7])], 0)  # shared row of 25
    assert ok.layout.max_position == 23 and ok.shape[1] == 25  # longer than n_ctx as a row, fine as positions
    dpo_step(params64, CFG, ok, np.zeros(1), np.zeros(1), TrainConfig())


def test_query_blocks_skip_only_keys_no_query_of_the_block_sees():
    start = np.array([[0, 0, 0, 3, 3, 3, 3, 7], [0, 0, 2, 2, 2, 2, 2, 2]])
    assert query_blocks(start, block=4) == ((0, 4, 0), (4, 8, 2))


# ---------------------------------------------------------------------------------------------
# the layout's attention (layers.attention_forward with a Layout)


def _random_layout(rng, max_pairs=4):
    """The layout of drawn pairs, shared prompts and packed rows: (layout, R, L)."""
    pairs = _pairs(rng, int(rng.integers(1, max_pairs + 1)), 4, 4)
    b = pack_preferences(pairs, 0, share_prompt=True, pack=True)
    return b.layout, *b.shape


def test_layout_attention_equals_causal_attention_on_the_causal_layout():
    rng = np.random.default_rng(0)
    R, L, C, H = 2, 9, 8, 2
    qkv = rng.standard_normal((R, L, 3 * C))
    lay = dataclasses.replace(causal_layout(R, L), causal=False)  # its arrays read, not skipped
    y, _ = attention_forward(qkv, H, lay)
    y_ref, _ = attention_forward(qkv, H)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-14)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), H=st.sampled_from([1, 2]))
def test_layout_attention_backward_matches_finite_differences(seed, H):
    rng = np.random.default_rng(seed)
    layout, R, L = _random_layout(rng, 2)
    C = 2 * H
    qkv = rng.standard_normal((R, L, 3 * C))
    w = rng.standard_normal((R, L, C))  # loss = sum(w * y)
    y, cache = attention_forward(qkv, H, layout)
    assert y.dtype == np.float64
    dqkv, _ = attention_backward(w, cache)
    num = np.zeros_like(qkv)
    eps = 1e-6
    for i in np.ndindex(qkv.shape):
        a, b = qkv.copy(), qkv.copy()
        a[i] += eps
        b[i] -= eps
        num[i] = (np.sum(w * attention_forward(a, H, layout)[0]) - np.sum(w * attention_forward(b, H, layout)[0])) / (2 * eps)
    np.testing.assert_allclose(dqkv, num, rtol=1e-6, atol=1e-8)


def test_layout_attention_keeps_float32():
    rng = np.random.default_rng(0)
    layout, R, L = _random_layout(rng)
    qkv = rng.standard_normal((R, L, 12)).astype(np.float32)
    y, cache = attention_forward(qkv, 2, layout)
    dq, _ = attention_backward(np.ones_like(y), cache)
    assert y.dtype == dq.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# the steps equal the padded path (float64)


@pytest.fixture(scope="module")
def params64():
    return init_params(CFG, seed=3, dtype=np.float64)


def _near_policy_reference(params, pairs, rng):
    """Reference log-probs within ~1 of the policy's: the DPO loss is then far from saturation
    and the gradients are O(beta), so comparing them to rtol 1e-10 means something."""
    pc, pr = batched_sequence_logps(params, CFG, pairs, Batcher(0, False, False), 8)
    return pc + rng.standard_normal(len(pairs)), pr + rng.standard_normal(len(pairs))


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), layout=st.sampled_from(LAYOUTS),
       max_p=st.sampled_from([1, 3, 8]), max_r=st.sampled_from([1, 2, 7]))
def test_packed_dpo_step_equals_the_padded_step(params64, seed, n, layout, max_p, max_r):
    """One-token prompts and one-token responses included (max_p = 1, max_r = 1)."""
    rng = np.random.default_rng(seed)
    pairs = _pairs(rng, n, max_p, max_r)
    tc = TrainConfig(beta=0.3)
    ref_c, ref_r = _near_policy_reference(params64, pairs, rng)
    loss0, m0, g0 = dpo_step(params64, CFG, collate_preferences(pairs, 0), ref_c, ref_r, tc)
    pb = pack_preferences(pairs, 0, *layout)
    loss1, m1, g1 = dpo_step(params64, CFG, pb, ref_c, ref_r, tc)
    assert loss1.dtype == np.float64
    np.testing.assert_allclose(loss1, loss0, rtol=1e-12)
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-10, atol=1e-12, err_msg=k)
    _assert_grads_equal(g0, g1, zero=all(p.chosen_ids == p.rejected_ids for p in pairs))


@pytest.mark.parametrize("kw", [dict(average_logps=True, loss_type="ipo"), dict(rpo_alpha=0.5),
                                dict(loss_type="hinge")])
def test_packed_dpo_step_equals_the_padded_step_for_the_variants(params64, kw):
    rng = np.random.default_rng(7)
    pairs = _pairs(rng, 3, 5, 5)
    tc = TrainConfig(beta=0.2, **kw)
    ref_c, ref_r = _near_policy_reference(params64, pairs, rng)
    loss0, _, g0 = dpo_step(params64, CFG, collate_preferences(pairs, 0, average=tc.logps_averaged), ref_c, ref_r, tc)
    pb = pack_preferences(pairs, 0, average=tc.logps_averaged)
    loss1, _, g1 = dpo_step(params64, CFG, pb, ref_c, ref_r, tc)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-12)
    _assert_grads_equal(g0, g1)


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
def test_a_wrong_mask_is_caught(params64, monkeypatch, plain):
    """The equality tests can fail: let the rejected response see the chosen one (the layout's
    hidden ranges emptied), and the rejected log-probs (hence loss and gradients) move, on the
    fast path (the mask inside the kernel) and on the plain one (layers.sees)."""
    from minidpo import fast

    rng = np.random.default_rng(2)
    pairs = _pairs(rng, 2, 4, 4)
    pairs = [TokenizedPair(p.prompt_ids, p.chosen_ids + [1], p.rejected_ids) for p in pairs]
    tc = TrainConfig(beta=0.3)
    ref = np.zeros(2)
    with fast.plain(plain):
        loss0, _, _ = dpo_step(params64, CFG, collate_preferences(pairs, 0), ref, ref, tc)
        good = pack_preferences(pairs, 0)
        loss1, _, _ = dpo_step(params64, CFG, good, ref, ref, tc)
        zero = np.zeros_like(good.layout.hidden_lo)
        leaky = dataclasses.replace(good, layout=dataclasses.replace(good.layout, hidden_lo=zero, hidden_hi=zero))
        loss2, _, _ = dpo_step(params64, CFG, leaky, ref, ref, tc)
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-12)
    assert abs(float(loss2) - float(loss0)) > 1e-6


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), pack=st.booleans())
def test_packed_sft_step_equals_the_padded_step(params64, seed, n, pack):
    rng = np.random.default_rng(seed)
    items = [TokenizedSFT(rng.integers(0, 37, int(rng.integers(1, 7))).tolist(),
                          rng.integers(0, 37, int(rng.integers(1, 9))).tolist()) for _ in range(n)]
    loss0, g0 = sft_step(params64, CFG, collate_sft(items, 0))
    loss1, g1 = sft_step(params64, CFG, pack_sft(items, 0, pack=pack))
    np.testing.assert_allclose(loss1, loss0, rtol=1e-12)
    _assert_grads_equal(g0, g1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("average", [False, True])
def test_reference_logps_equal_the_padded_ones(params64, layout, average):
    rng = np.random.default_rng(4)
    pairs = _pairs(rng, 7, 6, 6)
    c0, r0 = batched_sequence_logps(params64, CFG, pairs, Batcher(0, False, False, average), 3)
    c1, r1 = batched_sequence_logps(params64, CFG, pairs, Batcher(0, *layout, average), 3)
    assert c1.dtype == np.float64
    np.testing.assert_allclose(c1, c0, rtol=1e-12)
    np.testing.assert_allclose(r1, r0, rtol=1e-12)


def test_float32_step_stays_float32():
    p32 = init_params(CFG, seed=1)
    rng = np.random.default_rng(0)
    pairs = _pairs(rng, 3)
    ref = np.zeros(3, dtype=np.float32)
    loss, m, g = dpo_step(p32, CFG, pack_preferences(pairs, 0), ref, ref, TrainConfig())
    assert loss.dtype == np.float32 and all(v.dtype == np.float32 for v in g.values())
    lp, counts = batch_logps(p32, CFG, pack_preferences(pairs, 0))
    assert lp.dtype == np.float32 and lp.shape == (6,) and counts.dtype == np.int64


# ---------------------------------------------------------------------------------------------
# the CuPy path (a GPU, or the strict stand-in)


@requires_cuda
def test_packed_steps_on_cupy_equal_numpy(cuda_or_standin):
    from minidpo.backend import Backend, to_numpy

    cp = cuda_or_standin
    be = Backend("cuda")
    rng = np.random.default_rng(5)
    pairs = _pairs(rng, 3, 5, 5)
    p64 = init_params(CFG, seed=2, dtype=np.float64)
    p_gpu = {k: cp.asarray(v) for k, v in p64.items()}
    tc = TrainConfig(beta=0.2)
    ref = rng.standard_normal(3) - 3
    loss0, _, g0 = dpo_step(p64, CFG, pack_preferences(pairs, 0), ref, ref + 0.5, tc)
    loss1, _, g1 = dpo_step(p_gpu, CFG, pack_preferences(pairs, 0, backend=be), cp.asarray(ref),
                            cp.asarray(ref + 0.5), tc)
    np.testing.assert_allclose(to_numpy(loss1), loss0, rtol=1e-10)
    _assert_grads_equal(g0, {k: to_numpy(v) for k, v in g1.items()}, rtol=1e-9)
    items = [TokenizedSFT(p.prompt_ids, p.chosen_ids) for p in pairs]
    l0, _ = sft_step(p64, CFG, pack_sft(items, 0))
    l1, _ = sft_step(p_gpu, CFG, pack_sft(items, 0, backend=be))
    np.testing.assert_allclose(to_numpy(l1), l0, rtol=1e-10)
    c0, r0 = batched_sequence_logps(p64, CFG, pairs, Batcher(0), 2)
    c1, r1 = batched_sequence_logps(p_gpu, CFG, pairs, Batcher(0, backend=be), 2)
    np.testing.assert_allclose(c1, c0, rtol=1e-10)
    np.testing.assert_allclose(r1, r0, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# the training loops, layout on and off


@pytest.mark.parametrize("cache_reference", [True, False])
def test_train_dpo_with_and_without_the_layout_agree(tmp_path, cache_reference):
    from minidpo.train import train_dpo

    rng = np.random.default_rng(9)
    pairs, held = _pairs(rng, 24, 6, 6), _pairs(rng, 6, 6, 6)
    ref = init_params(CFG, seed=4)
    runs = {}
    for on in (True, False):
        policy = {k: v.copy() for k, v in ref.items()}
        tc = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, log_every=2, eval_every=3, progress=False,
                         cache_reference=cache_reference, share_prompt=on, pack=on)
        res = train_dpo(policy, ref, CFG, pairs, 0, tc, tmp_path / str(on), eval_pairs=held)
        runs[on] = res
    a, b = runs[True], runs[False]
    for k in a.params:  # float32 round-off apart after 6 AdamW steps, not more
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=0, atol=2e-4, err_msg=k)
    for ra, rb in zip(a.history, b.history):
        for key in ra:
            if key in ("loss", "eval/loss", "eval/rewards/margins"):  # accuracies flip on near-ties
                assert ra[key] == pytest.approx(rb[key], rel=1e-3, abs=1e-4), key
    assert any(p > 1e-3 for p in (np.abs(a.params[k] - ref[k]).max() for k in ref))  # it trained


def test_train_sft_with_and_without_packing_agree(tmp_path):
    from minidpo.train import train_sft

    rng = np.random.default_rng(10)
    items = [TokenizedSFT(rng.integers(0, 37, int(rng.integers(1, 8))).tolist(),
                          rng.integers(0, 37, int(rng.integers(1, 10))).tolist()) for _ in range(30)]
    runs = {}
    for on in (True, False):
        params = init_params(CFG, seed=6)
        tc = TrainConfig(steps=5, batch_size=6, lr=1e-2, warmup_steps=1, log_every=1, eval_every=5, progress=False,
                         pack=on)
        runs[on] = train_sft(params, CFG, items, 0, tc, tmp_path / str(on), eval_items=items[:7])
    for k in runs[True].params:
        np.testing.assert_allclose(runs[True].params[k], runs[False].params[k], rtol=0, atol=2e-4, err_msg=k)
    ev = [[r["eval/nll"] for r in runs[on].history if "eval/nll" in r] for on in (True, False)]
    assert len(ev[0]) == 2 and ev[0] == pytest.approx(ev[1], rel=1e-5)


def test_cli_flags_turn_the_layout_off():
    from minidpo.cli import _train_config, build_parser

    def parse(argv):  # as cli.main: an unset --lr takes the stage's default
        args = build_parser().parse_args(argv)
        if getattr(args, "lr", "absent") is None:
            args.lr = args.lr_default
        return args

    base = ["dpo", "--data", "d.jsonl", "--model", "m", "--out", "o"]
    args = parse(base)
    tc = _train_config(args, share_prompt=not args.no_share_prompt)
    assert tc.pack and tc.share_prompt
    args = parse(base + ["--no-pack", "--no-share-prompt"])
    tc = _train_config(args, share_prompt=not args.no_share_prompt)
    assert not tc.pack and not tc.share_prompt
    args = parse(["sft", "--data", "d.jsonl", "--tokenizer", "t", "--out", "o", "--no-pack"])
    assert not _train_config(args).pack
    args = parse(["eval", "--policy", "p", "--ref", "r", "--data", "d", "--no-pack", "--no-share-prompt"])
    assert args.no_pack and args.no_share_prompt


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
def test_every_layout_runs_the_one_model_on_the_chosen_path(params64, plain, monkeypatch):
    """One block function for every layout: under fast.plain() the plain reference runs (counted:
    the same number of layernorm calls for the padded and the packed batch, the same blocks), by
    default the fast paths; on both the packed steps are the padded ones (float64)."""
    from minidpo import fast

    space = fast.PLAIN if plain else fast.FAST
    calls = []
    real = space.layernorm_forward
    monkeypatch.setattr(space, "layernorm_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(11)
    pairs = _pairs(rng, 3, 5, 5)
    items = [TokenizedSFT(p.prompt_ids, p.rejected_ids) for p in pairs]
    tc = TrainConfig(beta=0.3)
    ref_c, ref_r = rng.standard_normal(3) - 8, rng.standard_normal(3) - 8
    with fast.plain(plain):
        loss0, _, g0 = dpo_step(params64, CFG, collate_preferences(pairs, 0), ref_c, ref_r, tc)
        n_padded = len(calls)
        loss1, _, g1 = dpo_step(params64, CFG, pack_preferences(pairs, 0), ref_c, ref_r, tc)
        assert len(calls) == 2 * n_padded == 2 * (2 * CFG.n_layer + 1)  # ln_1, ln_2 a block, and ln_f
        l0, h0 = sft_step(params64, CFG, collate_sft(items, 0))
        l1, h1 = sft_step(params64, CFG, pack_sft(items, 0))
    np.testing.assert_allclose(loss1, loss0, rtol=1e-12)
    _assert_grads_equal(g0, g1)
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    _assert_grads_equal(h0, h1)


def test_a_run_resumes_across_a_layout_change(tmp_path):
    """share_prompt and pack are bookkeeping (train._BOOKKEEPING): a run started packed resumes
    padded, and ends where the run that stayed packed ends, to float32 round-off."""
    from minidpo.train import _BOOKKEEPING, train_dpo

    assert {"share_prompt", "pack"} <= set(_BOOKKEEPING)
    rng = np.random.default_rng(12)
    pairs = _pairs(rng, 12, 5, 5)
    ref = init_params(CFG, seed=4)

    def run(out, steps, on):
        tc = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, log_every=1, eval_every=100,
                         save_every=100, progress=False, share_prompt=on, pack=on)
        return train_dpo({k: v.copy() for k, v in ref.items()}, ref, CFG, pairs, 0, tc, out)

    whole = run(tmp_path / "whole", 5, True)
    run(tmp_path / "split", 3, True)
    split = run(tmp_path / "split", 5, False)
    assert split.resumed_from == 3 and split.step == 5
    for k in whole.params:
        np.testing.assert_allclose(split.params[k], whole.params[k], rtol=0, atol=2e-4, err_msg=k)
    assert any(np.abs(whole.params[k] - ref[k]).max() > 1e-3 for k in ref)  # it trained
