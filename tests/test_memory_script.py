"""bench/memory_dpo.py: the measurement runs train_dpo's calls in train_dpo's order, in both
layouts; the analytic model (a replay of every array minidpo makes) predicts each measured peak,
phase by phase, to within the Python objects tracemalloc also counts; and the measurement sees the
step's memory behaviour (one (M, V) buffer through the backward, no gradients carried into the
next step, no backward cache in the no-gradient passes)."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.memory_dpo import (
    COPY_KV_T,
    LAYOUTS,
    LOGSOFTMAX_PIECE,
    MODES,
    CodePath,
    Ledger,
    aligned_phases,
    analytic_breakdown,
    batch_bytes,
    comparisons,
    format_report,
    forward_cache_bytes,
    layer_cache_bytes,
    layout_batcher,
    main,
    max_pairs_that_fit,
    measure,
    padded_shape,
    param_bytes,
    pass_ledger,
    predicted_eval_chunk_peak,
    predicted_step_peak,
    reference_pass_batches,
    shape_of,
    step_ledger,
    synthetic_pairs,
)
from minidpo import runtime
from minidpo.data import collate_preferences
from minidpo.model import GPTConfig, init_params
from minidpo.train import TrainConfig, batch_for_step
from tests.conftest import requires_gpu

MICRO = GPTConfig(vocab_size=64, n_ctx=32, n_layer=2, n_head=2, n_embd=32)
# big enough that arrays, not Python objects, dominate the counts; still well under a second a step
SMALL = GPTConfig(vocab_size=1024, n_ctx=64, n_layer=2, n_head=2, n_embd=64)
# rows of L >= 256: attention copies k and v and its backward goes through MKL's batched GEMM;
# one (R, L, C) array (>= 0.2 MB) is larger than the Python objects' share of a count
LONG = GPTConfig(vocab_size=512, n_ctx=320, n_layer=2, n_head=2, n_embd=64)

# What tracemalloc counts beyond the arrays the model replays: Python objects (the caches' tuples
# and dicts, the phase records, the step list), measured 40 to 110 kB on these runs.
PY_OBJECTS = 160_000

MODE_KEYS = {"mode", "state_bytes", "step1_peak_bytes", "peak_bytes", "activation_peak_bytes",
             "resident_before_step_bytes", "params_bytes", "grads_bytes", "moments_bytes",
             "reference_params_bytes", "process_peak_rss_bytes", "steps", "phases", "meter_extra",
             "eval_reference_pass_peak_bytes", "evaluation_start_peak_bytes", "evaluation_peak_bytes", "eval_loss"}


@pytest.fixture(scope="module")
def micro():
    return measure(MICRO, pairs=2, seq=16, prompt=4, steps=2)  # held-out: one chunk of 16 pairs


@pytest.fixture(scope="module")
def small():  # held-out: 4 pairs in two chunks, so the hand-over between chunks is measured
    return {layout: measure(SMALL, pairs=2, seq=64, prompt=16, steps=2, eval_pairs=4, eval_batch_pairs=2,
                            layout=layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def long():
    return {layout: measure(LONG, pairs=2, seq=300, prompt=75, steps=2, eval_pairs=2, eval_batch_pairs=2,
                            layout=layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def ragged():
    """Pairs of random lengths: packed rows hold several sequences, so attention's query blocks
    start past key 0 (k0 > 0); on the compiled kernels and on the NumPy passes."""
    kw = dict(pairs=6, seq=300, prompt=150, steps=2, eval_pairs=6, eval_batch_pairs=3, ragged=True,
              layout="shared_packed")
    fused = measure(LONG, **kw)
    with runtime.no_cpu_kernels():
        numpy_passes = measure(LONG, **kw)
    return {"fused": fused, "numpy passes": numpy_passes}


def _runs(small, long, ragged):
    for layout, res in small.items():
        yield f"small {layout}", res
    for layout, res in long.items():
        yield f"long {layout}", res
    for name, res in ragged.items():
        yield f"ragged shared_packed, {name}", res


def test_result_has_the_expected_fields(micro):
    assert set(micro) >= {"config", "machine", "code", "meter", "analytic", "measured"}
    c = micro["config"]
    assert c["layout"] == "shared_packed" and c["pairs"] == 2 and c["train_pairs"] == 4 and c["seq"] == 16
    assert c["device"] == "cpu" and c["eval_pairs"] == c["eval_batch_pairs"] == TrainConfig().eval_batch_size == 16
    assert micro["machine"]["numpy"] == np.__version__ and micro["machine"]["cpu"]
    assert set(micro["code"]) == {"commit", "minidpo_last_commit", "minidpo_modified"}
    assert set(micro["measured"]) == set(MODES)
    for mode, r in micro["measured"].items():
        assert MODE_KEYS <= set(r), MODE_KEYS - set(r)
        assert r["mode"] == mode
        assert len(r["steps"]) == 2 and all(s["finite"] for s in r["steps"])
        assert r["process_peak_rss_bytes"] > 0 and math.isfinite(r["eval_loss"])
        stages = [p["stage"] for p in r["phases"]]
        # train_dpo's order: AdamW before prepare(), the evaluation at step 0 before the steps
        order = ["setup", "held-out reference pass", "held-out evaluation at step 0", "step 1", "step 2",
                 "held-out evaluation"]
        if mode == "cached":
            order.insert(1, "reference cache pass")
        assert [s for i, s in enumerate(stages) if s in order and (i == 0 or stages[i - 1] != s)] == order
        step1 = [p["phase"] for p in r["phases"] if p["stage"] == "step 1"]
        tail = ["gpt_forward", "sequence_logps", "dpo_step_loss", "sequence_logps_backward", "gpt_backward",
                "dpo_step (return)", "clip_grad_norm", "AdamW.step", "step done"]
        assert step1[-len(tail):] == tail
        # recompute: the reference's log-probs of the step's batch before the policy's forward
        assert step1[:-len(tail)] == (["Batcher.pairs"] if mode == "cached" else
                                      ["Batcher.pairs", "gpt_forward", "sequence_logps", "batch_logps"])
        # the no-gradient passes run gpt_forward (without a cache) and never a backward
        for stage in ("reference cache pass", "held-out reference pass", "held-out evaluation at step 0",
                      "held-out evaluation"):
            names = [p["phase"] for p in r["phases"] if p["stage"] == stage]
            assert bool(names) == (stage != "reference cache pass" or mode == "cached"), (mode, stage)
            assert "gpt_backward" not in names and names.count("batch_logps") == names.count("gpt_forward")
    assert "reference_pass_peak_bytes" in micro["measured"]["cached"]
    assert "reference_pass_peak_bytes" not in micro["measured"]["recompute"]
    # the analytic model read step 1's batch: the one batch_for_step(0) lays out
    pairs = synthetic_pairs(4, 16, 4, MICRO.vocab_size)
    batch = layout_batcher("shared_packed").pairs([pairs[i] for i in batch_for_step(0, 4, 2, 0)])
    s = micro["analytic"]["shapes"]
    assert (s["R"], s["L"], s["M"], s["E"]) == (*batch.shape, batch.host_example.size, 4)
    assert set(micro["analytic"]["peaks"]) >= {
        "cached", "recompute", "cached_as_train_dpo", "forward_side", "resident_cached", "resident_recompute",
        "reference_pass", "eval_reference_pass", "evaluation_cached", "evaluation_recompute",
        "evaluation_pass_train_dpo"}
    json.dumps(micro)  # JSON-able as it is


def test_analytic_prediction_matches_the_measurement(small, long, ragged):
    """Every measured peak (each step from its own batch, the passes, the two evaluations, and step
    1 phase by phase) is its prediction plus tracemalloc's Python objects: never below it, and
    above it by less than one (R, L, C) array of LONG, or a parameter-sized or (M, V) array of
    SMALL. Both layouts (shared_packed with k0 > 0), the compiled kernels and the NumPy passes."""
    checked = 0
    for name, res in _runs(small, long, ragged):
        for mode, what, got, want in comparisons(res):
            if what == "step 1 phase Batcher.pairs":  # packing's host temporaries are not replayed
                continue
            assert 0 <= got - want <= PY_OBJECTS, (name, mode, what, got, want, got - want)
            checked += 1
        # the bound is sharp: one (R, L, C) array more or less in the replay would break it (LONG),
        # one (M, V) or parameter-sized array (SMALL)
        s = res["analytic"]["shapes"]
        sharp = min(s["M"] * s["V"], s["P"]) * 4 if name.startswith("small") else s["R"] * s["L"] * s["C"] * 4
        assert sharp > PY_OBJECTS, (name, sharp)
    assert checked >= 150
    # the runs cover the branches the model follows
    long_shapes = [r["analytic"]["shapes"] for r in long.values()]
    assert all(s["copy_kv"] and s["mkl_attention"] == (runtime.gemm_lib() is not None) for s in long_shapes)
    assert not any(r["analytic"]["shapes"]["copy_kv"] for r in small.values())
    assert any(k0 > 0 for _, _, k0 in ragged["fused"]["analytic"]["shapes"]["blocks"])
    assert ragged["numpy passes"]["analytic"]["path"] == {"fused": False, "mkl": False, "gpu": False}


def test_recompute_costs_at_least_the_cached_mode(small, long):
    for res in [*small.values(), *long.values()]:
        a, b = res["measured"]["cached"], res["measured"]["recompute"]
        assert b["step1_peak_bytes"] >= a["step1_peak_bytes"]
        assert b["peak_bytes"] >= a["peak_bytes"]
        assert b["evaluation_peak_bytes"] >= a["evaluation_peak_bytes"]
        # the difference in state is exactly the reference copy
        assert b["state_bytes"] - a["state_bytes"] == b["reference_params_bytes"] == a["params_bytes"]
        # and at the step's peak (in the backward) it is that copy, less the cached log-probs
        pk = res["analytic"]["peaks"]
        n_train = res["config"]["train_pairs"]
        assert pk["resident_recompute"] - pk["resident_cached"] == a["params_bytes"] - 2 * n_train * 4


def test_state_and_peaks_are_consistent(small):
    for res in small.values():
        an = res["analytic"]["bytes"]
        for r in res["measured"].values():
            # state counted from the arrays' nbytes equals the analytic count
            assert r["params_bytes"] == r["grads_bytes"] == an["parameters"]
            assert r["moments_bytes"] == an["AdamW moments m, v"]
            assert r["step1_peak_bytes"] > r["state_bytes"] > 0
            assert r["activation_peak_bytes"] == r["step1_peak_bytes"] - r["state_bytes"]
            assert r["peak_bytes"] == max(s["peak_bytes"] for s in r["steps"])
            for p in r["phases"]:
                assert p["peak_bytes"] >= p["end_bytes"] >= 0


def test_dlogits_reuses_the_logits_buffer(small, long):
    """From the end of dpo_step_loss to the peak of sequence_logps_backward nothing (M, V)-sized is
    allocated: dlogits is written into the logits."""
    for res in [*small.values(), *long.values()]:
        logits = res["analytic"]["bytes"]["logits (M,V)"]
        assert logits == res["analytic"]["shapes"]["M"] * res["analytic"]["shapes"]["V"] * 4
        for r in res["measured"].values():
            ph = [p for p in r["phases"] if p["stage"] == "step 1"]
            names = [p["phase"] for p in ph]
            before = ph[names.index("dpo_step_loss")]["end_bytes"]
            during = ph[names.index("sequence_logps_backward")]["peak_bytes"]
            assert during - before < logits / 4, (during, before, logits)


def test_no_gradients_carried_into_the_next_step(small, long):
    """The loop frees each step's grads before the next step: step 2 peaks where its own batch's
    prediction says (holding step 1's grads would add P x 4 bytes), and after the last step only
    params, moments (and the reference) and the log-prob caches are held."""
    for res in [*small.values(), *long.values()]:
        for mode, r in res["measured"].items():
            got, want = r["steps"][1]["peak_bytes"], res["analytic"]["steps"][1][mode]
            assert abs(got - want) < r["params_bytes"] / 4, (got, want, r["params_bytes"])
            end = [p for p in r["phases"] if p["stage"] == "step 2"][-1]
            assert end["phase"] == "step done"
            assert 0 <= end["end_bytes"] - res["analytic"]["peaks"]["resident_" + mode] < r["params_bytes"] / 4


def test_nograd_passes_keep_no_backward_cache(small):
    """A held-out pass peaks far below what gpt_forward's backward cache alone would need, and
    above its chunk's logits."""
    for layout, res in small.items():
        p = res["analytic"]["bytes"]["parameters"]
        batcher = layout_batcher(layout)
        held_out = synthetic_pairs(4, 64, 16, SMALL.vocab_size, seed=1)
        shapes = [shape_of(batcher.pairs(held_out[i:i + 2])) for i in (0, 2)]
        cache = min(forward_cache_bytes(SMALL, s) for s in shapes)
        logits = max(s.M * SMALL.vocab_size * 4 for s in shapes)
        for r in res["measured"].values():
            above = r["eval_reference_pass_peak_bytes"] - 4 * p  # params, moments, reference
            assert logits <= above < cache, (layout, above, logits, cache)


@settings(deadline=None, max_examples=40)
@given(n_layer=st.integers(1, 3), n_head=st.integers(1, 3), head=st.integers(1, 8), vocab=st.integers(2, 300),
       pairs=st.integers(1, 5), seq=st.integers(2, 300), scored=st.floats(0.01, 1.0))
def test_analytic_sizes_follow_the_shapes(n_layer, n_head, head, vocab, pairs, seq, scored):
    cfg = GPTConfig(vocab_size=vocab, n_ctx=seq, n_layer=n_layer, n_head=n_head, n_embd=n_head * head)
    B, T, V, C, H = 2 * pairs, seq, vocab, n_head * head, n_head
    M = max(B, int(scored * B * (T - 1)))
    s = padded_shape(pairs, T, M)
    an = analytic_breakdown(cfg, [s], path=CodePath(fused=True))
    assert an["bytes"]["logits (M,V)"] == M * V * 4
    p_bytes = sum(a.nbytes for a in init_params(cfg).values())
    assert an["bytes"]["parameters"] == p_bytes and an["bytes"]["AdamW moments m, v"] == 2 * p_bytes
    layer = an["per_layer_bytes"]
    n_blocks = max(1, min(8, T // 64))
    probs = sum(v for k, v in layer.items() if k.startswith("attention probabilities"))
    assert len([k for k in layer if k.startswith("attention probabilities")]) == n_blocks
    assert B * H * T * (T + 1) // 2 * 4 <= probs <= B * H * T * T * 4
    assert layer["mlp.c_fc output (R,L,4C)"] == B * T * 4 * C * 4
    # below COPY_KV_T the k, v views keep qkv whole; from it on two copies are kept and qkv goes
    kv = layer.get("qkv (R,L,3C)", 0) + layer.get("k copy (R,L,C)", 0) + layer.get("v copy (R,L,C)", 0)
    assert kv == (2 if T >= COPY_KV_T else 3) * B * T * C * 4
    assert an["bytes"]["batch arrays (ids, layout, scored-token maps)"] == 8 * (4 * B * T + 4 * M + B)
    pk = an["peaks"]
    assert pk["cached_as_train_dpo"] - pk["cached"] == p_bytes
    assert pk["recompute"] >= pk["cached"] + p_bytes - 2 * pairs * 4
    assert pk["resident_cached"] == 3 * p_bytes + 2 * pairs * 4
    assert pk["cached"] >= pk["forward_side"] >= pk["resident_cached"] + M * V * 4
    # the step holds the cache, the logits (one (M, V) buffer) and, at its peak, some gradients
    kinds = an["backward_peak"]["kinds"]
    assert kinds["logits"] == M * V * 4 and kinds.get("grads", 0) <= p_bytes
    assert kinds["cache"] == forward_cache_bytes(cfg, s) + M * 4  # and lse (M,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", tuple(LAYOUTS))
def test_replayed_step_returns_to_its_state(layout, mode):
    """The ledger frees what it makes: after the step only the batch (with its weights and, in the
    recompute mode, the reference's log-probs) and the gradients are left above the state."""
    s = shape_of(layout_batcher(layout).pairs(synthetic_pairs(3, 40, 10, MICRO.vocab_size, ragged=True)))
    led = step_ledger(MICRO, s, mode, base=1000, path=CodePath(fused=False))
    P = sum(param_bytes(MICRO).values())
    consts = s.E * 4 if mode == "recompute" else 2 * (s.E // 2) * 4
    assert led.now - 1000 == batch_bytes(s) + s.E * s.M * 4 + consts + P
    assert led.kinds_now() == {"base": 1000, "batch": batch_bytes(s) + s.E * s.M * 4 + consts, "grads": P}
    # a no-gradient pass leaves its chosen and rejected log-probs only
    shapes = [s, s]
    assert pass_ledger(MICRO, shapes, 7).now == 7 + 2 * s.E * 4


def test_ledger_counts_assignments():
    led = Ledger(100)
    led.assign("dh", 10)
    led.assign("dh", 30, grads=(("g", 5),), temps=(7,))  # new 30 + g 5 + temp 7 beside the old 10
    assert led.peak == 100 + 10 + 30 + 5 + 7 and led.now == 100 + 30 + 5
    led.drop("dh")
    led.mark("x")
    assert led.phases == [{"phase": "x", "peak_bytes": 152, "end_bytes": 105}]
    with pytest.raises(KeyError):
        led.add("g", 1, "grads")


@pytest.mark.parametrize("T, fraction", [(64, 1.0), (128, 3 / 4), (192, 2 / 3), (256, 5 / 8), (512, 9 / 16),
                                         (1024, 9 / 16)])
def test_attention_keeps_the_causal_blocks_only(T, fraction):
    """The causal skip keeps queries i0..i1-1 against keys 0..i1-1, T // 64 blocks (at most 8):
    (n + 1) / 2n of the (T, T) square with n equal blocks."""
    B, H = 3, 2
    cfg = GPTConfig(vocab_size=10, n_ctx=T, n_layer=1, n_head=H, n_embd=8)
    layer = layer_cache_bytes(cfg, padded_shape(B, T, B * T), 4)  # R = 2B rows
    got = sum(v for k, v in layer.items() if k.startswith("attention probabilities")) // 4
    assert got == pytest.approx(fraction * 2 * B * H * T * T, rel=1e-2)


def test_packed_blocks_skip_the_keys_before_their_sequences():
    """In packed rows a query block sees keys from k0 = its earliest sequence start on: the model
    keeps (R, H, nq, i1 - k0) per block, less than the causal (R, H, nq, i1)."""
    pairs = synthetic_pairs(12, 300, 150, LONG.vocab_size, seed=3, ragged=True)
    batch = layout_batcher("shared_packed").pairs(pairs)
    s = shape_of(batch)
    assert s.blocks == tuple(batch.layout.blocks) and not s.causal and any(k0 > 0 for _, _, k0 in s.blocks)
    layer = layer_cache_bytes(LONG, s)
    probs = sum(v for k, v in layer.items() if k.startswith("attention probabilities"))
    assert probs == sum(s.R * LONG.n_head * (i1 - i0) * (i1 - k0) * 4 for i0, i1, k0 in s.blocks)
    assert probs < sum(s.R * LONG.n_head * (i1 - i0) * i1 * 4 for i0, i1, _ in s.blocks)
    # the layout's arrays: positions, start, hidden (R, L, 2) against the causal positions and zeros
    assert batch_bytes(s) - batch_bytes(s.__class__(s.R, s.L, s.M, s.E, s.blocks, True)) == 16 * s.R * s.L


def test_gpt2_small_sizes():
    cfg = GPTConfig.gpt2_small()
    pairs = synthetic_pairs(8, 512, 128, cfg.vocab_size)
    shapes = {layout: shape_of(layout_batcher(layout).pairs(pairs)) for layout in LAYOUTS}
    pad, packed = shapes["padded"], shapes["shared_packed"]
    assert (pad.R, pad.L) == (16, 512) and packed.R == 8 and pad.M == packed.M
    # one pair a row: the longest shared-prompt sequence, the prompt once
    assert packed.L == max(128 + 384 + len(p.rejected_ids) for p in pairs)
    for layout, s in shapes.items():
        an = analytic_breakdown(cfg, [s], path=CodePath(fused=True, mkl=True))
        assert an["shapes"]["P"] == 124_439_808
        assert an["bytes"]["logits (M,V)"] == s.M * 50257 * 4
        # the step peaks in block 0's backward, holding every block's cache, the one (M, V) buffer,
        # and all gradients but block 0's first layers' and wpe's
        where, kinds = an["backward_peak"]["where"], an["backward_peak"]["kinds"]
        assert where.startswith("transformer.h.0."), where
        assert kinds["cache"] == forward_cache_bytes(cfg, s) + s.M * 4 and kinds["logits"] == s.M * 50257 * 4
        pb = param_bytes(cfg)
        block0 = sum(v for k, v in pb.items() if k.startswith("transformer.h.0."))
        assert sum(pb.values()) - pb["transformer.wpe.weight"] - block0 < kinds["grads"] < sum(pb.values())
        assert an["peaks"]["cached"] == sum(kinds.values())
        assert 9e9 < an["peaks"]["cached"] < 10e9


@pytest.mark.parametrize("layout", tuple(LAYOUTS))
def test_max_pairs_that_fit_is_the_largest_that_fits(layout):
    gpu = CodePath(fused=True, gpu=True)
    for cap in (4e6, 1e7, 3e7):
        n = max_pairs_that_fit(MICRO, 16, cap, layout, path=gpu, prompt=4)
        assert n >= 1
        assert predicted_step_peak(MICRO, n, 16, layout, prompt=4, path=gpu) <= cap
        assert predicted_step_peak(MICRO, n + 1, 16, layout, prompt=4, path=gpu) > cap
        m = max_pairs_that_fit(MICRO, 16, cap, layout, "evaluation_pass_train_dpo", path=gpu, prompt=4)
        assert predicted_eval_chunk_peak(MICRO, m, 16, layout, prompt=4, path=gpu) <= cap
        assert predicted_eval_chunk_peak(MICRO, m + 1, 16, layout, prompt=4, path=gpu) > cap
    assert max_pairs_that_fit(MICRO, 16, 1.0, layout) == 0


def test_numpy_passes_keep_more_temporaries():
    """The NumPy passes (no compiled kernels) make the log-softmax piece, GELU's blocks and the
    layernorm's x_hat that the fused kernels do not; the arrays kept are the same."""
    cfg = GPTConfig.gpt2_small()
    s = shape_of(layout_batcher("padded").pairs(synthetic_pairs(8, 512, 128, cfg.vocab_size)))
    fused = analytic_breakdown(cfg, [s], path=CodePath(fused=True, gpu=True))
    numpy_ = analytic_breakdown(cfg, [s], path=CodePath(fused=False))
    assert numpy_["bytes"]["logits (M,V)"] == fused["bytes"]["logits (M,V)"]
    assert numpy_["bytes"]["activation cache (embedding, blocks, ln_f)"] == \
        fused["bytes"]["activation cache (embedding, blocks, ln_f)"]
    for key in fused["peaks"]:
        assert fused["peaks"][key] <= numpy_["peaks"][key], key
    # on top of the logits, the NumPy log-sum-exp's piece (whole rows of at most _PIECE elements)
    piece = LOGSOFTMAX_PIECE // cfg.vocab_size * cfg.vocab_size * 4
    for a, more in ((numpy_, True), (fused, False)):
        ph = {p["phase"]: p for p in a["phases"]["cached"]}
        assert (ph["sequence_logps"]["peak_bytes"] - ph["gpt_forward"]["end_bytes"] >= piece) == more


def test_synthetic_pairs_lay_out_as_documented():
    pairs = synthetic_pairs(3, 20, 5, 50, seed=1)
    batch = collate_preferences(pairs, 0)
    assert batch.shape == (6, 20) and batch.layout.causal
    assert (batch.host_at % 20 >= 5).all()  # prompts are never scored
    assert batch.host_token_counts[:3].tolist() == [15, 15, 15]  # chosen rows fill the row
    assert (batch.host_token_counts[3:] <= 15).all() and (batch.host_token_counts[3:] >= 7).all()
    assert (np.asarray(batch.labels) > 0).all()  # no pad id inside a response
    packed = layout_batcher("shared_packed").pairs(pairs)
    assert packed.shape[0] == 3 and packed.host_example.size == batch.host_example.size
    ragged = synthetic_pairs(40, 200, 100, 50, seed=2, ragged=True)
    assert all(1 <= len(p.prompt_ids) <= 100 and len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
               <= 200 for p in ragged)
    b = layout_batcher("shared_packed").pairs(ragged)  # several sequences a row
    assert b.shape[0] < 40 and any(k0 > 0 for _, _, k0 in b.layout.blocks)
    # reference_logps' batches: the first epoch's, then the pairs it leaves out
    got = reference_pass_batches(7, 3, 0)
    assert [len(b) for b in got] == [3, 3, 1] and sorted(np.concatenate(got).tolist()) == list(range(7))
    assert got[0].tolist() == batch_for_step(0, 7, 3, 0).tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq=40), "n_ctx"),
    (dict(prompt=16), "prompt"),
    (dict(modes=("cached", "bogus")), "modes"),
    (dict(train_pairs=1), "train_pairs"),
    (dict(steps=0), "steps"),
    (dict(eval_pairs=-1), "eval_pairs"),
    (dict(eval_batch_pairs=0), "eval_batch_pairs"),
    (dict(layout="packed"), "layout"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(pairs=2, seq=16, prompt=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        measure(MICRO, **args)


def test_command_line_writes_json_and_report(tmp_path, capsys):
    out = tmp_path / "mem.json"
    rc = main(["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab", "40", "--n-ctx", "16",
               "--pairs", "2", "--seq", "12", "--steps", "1", "--modes", "cached", "--eval-pairs", "0",
               "--layout", "padded", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["measured"]) == ["cached"] and res["config"]["layout"] == "padded"
    assert res["analytic"]["shapes"]["R"] == 4 and res["analytic"]["shapes"]["L"] == 12
    assert "evaluation_peak_bytes" not in res["measured"]["cached"] and "evaluation_cached" not in \
        res["analytic"]["peaks"]
    text = capsys.readouterr().out
    assert "Analytic breakdown" in text and "Measured and predicted" in text and "step 1 peak" in text
    assert main(["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab", "40", "--n-ctx", "16",
                 "--seq", "20"]) == 2  # T > n_ctx: an error message, not a traceback
    assert "n_ctx" in capsys.readouterr().err


def test_report_formats_every_mode(micro):
    text = format_report(micro)
    for mode in MODES:
        assert f"Step 1 of the {mode} mode, phase by phase" in text
    assert "reference cache pass" in text and "held-out evaluation at step 0" in text
    assert "Predicted for a GPU" in text and "layout shared_packed" in text
    for mode in MODES:  # every step 1 phase the model replays is in the table
        phases = [p["phase"] for p in aligned_phases(micro["measured"][mode]["phases"],
                                                     micro["analytic"]["phases"][mode])]
        assert phases == [p["phase"] for p in micro["analytic"]["phases"][mode]]


@requires_gpu
def test_cuda_measurement():  # pragma: no cover - needs a GPU
    res = measure(MICRO, pairs=2, seq=16, prompt=4, steps=2, device="cuda", eval_pairs=4, eval_batch_pairs=2)
    assert "CuPy" in res["meter"] and res["config"]["device"].startswith("cuda")
    assert "gpu" in res["machine"] and res["analytic"]["path"]["gpu"]
    a, b = res["measured"]["cached"], res["measured"]["recompute"]
    assert b["step1_peak_bytes"] >= a["step1_peak_bytes"] > a["state_bytes"]
    for r in (a, b):
        assert set(r["meter_extra"]) >= {"pool_reserved_bytes", "device_used_max_bytes"}
        # the pool keeps every block it allocated: its size bounds the live peak from above
        assert r["meter_extra"]["pool_reserved_bytes"] >= r["peak_bytes"]
        assert r["meter_extra"]["device_used_max_bytes"] >= r["meter_extra"]["pool_reserved_bytes"] // 2
        assert math.isfinite(r["steps"][0]["loss"]) and math.isfinite(r["eval_loss"])
