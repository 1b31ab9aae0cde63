"""bench/memory_dpo.py: the measurement runs, its fields are there, the recompute mode costs at
least what the cached mode does, the analytic breakdown agrees with the shapes and with the
measurement, and the measurement sees the step's memory behaviour (one (B, T, V) buffer through
the backward, no gradients carried into the next step, no backward cache in no-gradient passes)."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.memory_dpo import (
    MODES,
    analytic_breakdown,
    attention_backward_workspace_elems,
    attention_prob_elems,
    forward_cache_bytes,
    format_report,
    logits_bytes,
    main,
    max_pairs_that_fit,
    measure,
    synthetic_pairs,
)
from minidpo.data import collate_preferences
from minidpo.model import GPTConfig, init_params
from tests.conftest import requires_gpu

MICRO = GPTConfig(vocab_size=64, n_ctx=32, n_layer=2, n_head=2, n_embd=32)
# big enough that arrays, not Python objects, dominate the counts; still well under a second
SMALL = GPTConfig(vocab_size=1024, n_ctx=64, n_layer=2, n_head=2, n_embd=64)

MODE_KEYS = {"mode", "state_bytes", "step1_peak_bytes", "peak_bytes", "activation_peak_bytes",
             "resident_before_step_bytes", "params_bytes", "grads_bytes", "moments_bytes",
             "reference_params_bytes", "process_peak_rss_bytes", "steps", "phases", "meter_extra",
             "eval_reference_pass_peak_bytes", "evaluation_peak_bytes", "eval_loss"}


@pytest.fixture(scope="module")
def micro():
    return measure(MICRO, pairs=2, seq=16, prompt=4, steps=2)  # held-out: one chunk of 16 pairs


@pytest.fixture(scope="module")
def small():  # held-out: 4 pairs in two chunks, so the hand-over between chunks is measured
    return measure(SMALL, pairs=2, seq=64, prompt=16, steps=2, eval_pairs=4, eval_batch_pairs=2)


def test_result_has_the_expected_fields(micro):
    assert set(micro) >= {"config", "machine", "code", "meter", "analytic", "measured"}
    assert micro["config"]["rows"] == 4 and micro["config"]["seq"] == 16 and micro["config"]["device"] == "cpu"
    assert micro["config"]["eval_pairs"] == micro["config"]["eval_batch_pairs"] == 16  # TrainConfig's default
    assert micro["machine"]["numpy"] == np.__version__ and micro["machine"]["cpu"]
    assert set(micro["code"]) == {"commit", "minidpo_last_commit", "minidpo_modified"}
    assert set(micro["measured"]) == set(MODES)
    for mode, r in micro["measured"].items():
        assert MODE_KEYS <= set(r), MODE_KEYS - set(r)
        assert r["mode"] == mode
        assert len(r["steps"]) == 2 and all(s["finite"] for s in r["steps"])
        assert r["process_peak_rss_bytes"] > 0 and math.isfinite(r["eval_loss"])
        stages = {p["stage"] for p in r["phases"]}
        assert {"setup", "held-out reference pass", "step 1", "step 2", "held-out evaluation"} <= stages
        phases = [p["phase"] for p in r["phases"] if p["stage"] == "step 1"]
        for name in ("gpt_forward", "sequence_logps", "dpo_loss", "sequence_logps_backward", "gpt_backward",
                     "clip_grad_norm", "AdamW.step"):
            assert name in phases, (mode, phases)
        # the no-gradient passes go through the KV-cache forward, never the training forward
        for stage in ("held-out reference pass", "held-out evaluation", "reference cache pass"):
            names = [p["phase"] for p in r["phases"] if p["stage"] == stage]
            assert "gpt_forward" not in names, (mode, stage, names)
            assert "inference_logits" in names or stage == "reference cache pass" and mode == "recompute"
    ref_phases = [p["phase"] for p in micro["measured"]["recompute"]["phases"] if p["stage"] == "step 1 reference"]
    assert "inference_logits" in ref_phases and "gpt_forward" not in ref_phases
    assert "reference_pass_peak_bytes" in micro["measured"]["cached"]
    assert "reference_pass_peak_bytes" not in micro["measured"]["recompute"]
    assert set(micro["analytic"]["peaks"]) >= {
        "cached", "recompute", "cached_steady", "recompute_steady", "cached_as_train_dpo", "reference_pass",
        "eval_reference_pass", "evaluation_cached", "evaluation_recompute", "reference_pass_train_dpo",
        "evaluation_pass_train_dpo"}
    json.dumps(micro)  # JSON-able as it is


def test_recompute_costs_at_least_the_cached_mode(micro, small):
    for res in (micro, small):
        a, b = res["measured"]["cached"], res["measured"]["recompute"]
        assert b["step1_peak_bytes"] >= a["step1_peak_bytes"]
        assert b["peak_bytes"] >= a["peak_bytes"]
        assert b["evaluation_peak_bytes"] >= a["evaluation_peak_bytes"]
        # the difference in state is exactly the reference copy
        assert b["state_bytes"] - a["state_bytes"] == b["reference_params_bytes"] == a["params_bytes"]


def test_state_and_peaks_are_consistent(micro, small):
    for res in (micro, small):
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


def test_analytic_prediction_matches_the_measurement(small):
    """Each measured peak is within 5% of its prediction, and closer than half the logits: a second
    (B, T, V) buffer in the step, or a no-gradient pass keeping a backward cache, would show."""
    an = small["analytic"]
    t, pk = an["bytes"], an["peaks"]
    floor = (t["parameters"] + t["AdamW moments m, v"] + t["activation cache (embedding, L blocks, ln_f)"]
             + t["logits (B,T,V)"])
    half_logits = t["logits (B,T,V)"] / 2
    for mode, r in small["measured"].items():
        checks = [(r["step1_peak_bytes"], pk[mode]), (r["peak_bytes"], pk[mode + "_steady"]),
                  (r["eval_reference_pass_peak_bytes"], pk["eval_reference_pass"]),
                  (r["evaluation_peak_bytes"], pk["evaluation_" + mode])]
        if mode == "cached":
            checks.append((r["reference_pass_peak_bytes"], pk["reference_pass"]))
        for got, want in checks:
            assert abs(got - want) <= min(0.05 * want, half_logits), (mode, got, want)
        assert r["step1_peak_bytes"] >= floor


def test_dlogits_reuses_the_logits_buffer(small):
    """From the end of dpo_loss to the peak of sequence_logps_backward nothing (B, T, V)-sized is
    allocated: dlogits is written into the logits."""
    logits = small["analytic"]["bytes"]["logits (B,T,V)"]
    for r in small["measured"].values():
        ph = [p for p in r["phases"] if p["stage"] == "step 1"]
        names = [p["phase"] for p in ph]
        before = ph[names.index("dpo_loss")]["end_bytes"]
        during = ph[names.index("sequence_logps_backward")]["peak_bytes"]
        assert during - before < logits / 4, (during, before, logits)


def test_no_gradients_carried_into_the_next_step(small, micro):
    """The loop frees each step's grads before the next step: step 2 peaks where step 1 does
    (holding step 1's grads would add exactly P x 4 bytes)."""
    for res in (small, micro):
        for r in res["measured"].values():
            s1, s2 = r["steps"][0]["peak_bytes"], r["steps"][1]["peak_bytes"]
            assert abs(s2 - s1) < r["params_bytes"] / 4, (s1, s2, r["params_bytes"])
    for r in small["measured"].values():  # (MICRO's parameters are as small as the Python objects)
        end = [p for p in r["phases"] if p["stage"] == "held-out evaluation"][0]
        # entering the evaluation, only params, moments (and the reference) are held
        held = r["params_bytes"] + r["moments_bytes"] + r["reference_params_bytes"]
        assert 0 <= end["end_bytes"] - held < r["params_bytes"] / 2, (end, held)


def test_nograd_passes_keep_no_backward_cache(small):
    """A held-out pass peaks far below what gpt_forward's backward cache alone would need."""
    t = small["analytic"]["shapes"]
    rows = 2 * min(t["eval_pairs"], t["eval_batch_pairs"])
    p = small["analytic"]["bytes"]["parameters"]
    cache = forward_cache_bytes(SMALL, rows, t["T"])
    for r in small["measured"].values():
        assert r["eval_reference_pass_peak_bytes"] - 2 * p < cache
        assert r["eval_reference_pass_peak_bytes"] - 2 * p >= logits_bytes(SMALL, rows, t["T"])


@given(n_layer=st.integers(1, 3), n_head=st.integers(1, 3), head=st.integers(1, 8), vocab=st.integers(2, 300),
       pairs=st.integers(1, 5), seq=st.integers(2, 40))
def test_analytic_sizes_follow_the_shapes(n_layer, n_head, head, vocab, pairs, seq):
    cfg = GPTConfig(vocab_size=vocab, n_ctx=seq, n_layer=n_layer, n_head=n_head, n_embd=n_head * head)
    an = analytic_breakdown(cfg, pairs, seq)
    B, T, V, C, H = 2 * pairs, seq, vocab, n_head * head, n_head
    assert an["bytes"]["logits (B,T,V)"] == B * T * V * 4
    p_bytes = sum(a.nbytes for a in init_params(cfg).values())
    assert an["bytes"]["parameters"] == p_bytes and an["bytes"]["AdamW moments m, v"] == 2 * p_bytes
    # below T = 256 the attention keeps one (B, H, T, T) block
    assert an["per_layer_bytes"]["attention probabilities, per query block (B,H,nq,i1)"] == B * H * T * T * 4
    assert an["per_layer_bytes"]["mlp.c_fc output (B,T,4C)"] == B * T * 4 * C * 4
    # one query block: residual dx, dy, dqkv (3), delta; then dv, ds, dk, dq side by side
    assert attention_backward_workspace_elems(B, T, H, head) == 8 * B * T * C + B * T * H + B * H * T * T
    pk = an["peaks"]
    assert pk["cached_steady"] == pk["cached"] and pk["recompute_steady"] == pk["recompute"]
    assert pk["cached_as_train_dpo"] - pk["cached"] == p_bytes
    assert pk["recompute"] >= pk["cached"] + p_bytes
    assert pk["reference_pass"] >= 2 * p_bytes + an["bytes"]["logits (B,T,V)"]
    assert pk["evaluation_recompute"] - pk["evaluation_cached"] == p_bytes
    assert pk["evaluation_cached"] - pk["eval_reference_pass"] == p_bytes
    assert pk["cached"] >= pk["forward_side"]


@pytest.mark.parametrize("T, fraction", [(64, 1.0), (128, 3 / 4), (255, 2 / 3), (256, 5 / 8), (1024, 5 / 8)])
def test_attention_keeps_the_causal_blocks_only(T, fraction):
    """The causal skip keeps queries i0..i1-1 against keys 0..i1-1: between the causal triangle and
    the full square, 3/4 of it with 2 equal blocks, 2/3 with 3, 5/8 with 4."""
    B, H = 3, 2
    got = attention_prob_elems(B, H, T)
    assert B * H * T * (T + 1) // 2 <= got <= B * H * T * T
    assert got == pytest.approx(fraction * B * H * T * T, rel=1e-2)


def test_gpt2_small_sizes():
    an = analytic_breakdown(GPTConfig.gpt2_small(), 8, 512)
    assert an["shapes"]["P"] == 124_439_808
    assert an["bytes"]["logits (B,T,V)"] == 16 * 512 * 50257 * 4
    assert an["bytes"]["KV cache of a no-gradient pass over the batch"] == 2 * 12 * 16 * 512 * 768 * 4 + 16 * 512
    assert an["backward_peak"]["where"] in ("block 0 GELU backward", "block 0 attention backward")
    # the step holds the logits once (dlogits is the same buffer), no previous grads
    t, pk = an["bytes"], an["peaks"]
    resident = t["parameters"] + t["AdamW moments m, v"]
    held = (resident + t["activation cache (embedding, L blocks, ln_f)"] + t["logits (B,T,V)"]
            + t["log-prob cache (labels, lse, weights)"] + t["batch (input_ids int64, loss_mask bool)"])
    assert pk["cached"] == held + t["backward workspace"] + t["gradients alive at the backward's peak"]
    assert t["gradients alive at the backward's peak"] < t["gradients"]


@pytest.mark.parametrize("gpu", [False, True])
def test_max_pairs_that_fit_is_the_largest_that_fits(gpu):
    cfg = MICRO
    for cap in (2e6, 5e6, 2e7):
        n = max_pairs_that_fit(cfg, 16, cap, gpu=gpu)
        assert n >= 1
        assert analytic_breakdown(cfg, n, 16, gpu=gpu)["peaks"]["cached_steady"] <= cap
        assert analytic_breakdown(cfg, n + 1, 16, gpu=gpu)["peaks"]["cached_steady"] > cap
        m = max_pairs_that_fit(cfg, 16, cap, "evaluation_pass_train_dpo", gpu=gpu)
        assert analytic_breakdown(cfg, 1, 16, eval_batch_pairs=m, gpu=gpu)["peaks"]["evaluation_pass_train_dpo"] <= cap
        assert analytic_breakdown(cfg, 1, 16, eval_batch_pairs=m + 1, gpu=gpu)["peaks"][
            "evaluation_pass_train_dpo"] > cap
    assert max_pairs_that_fit(cfg, 16, 1.0, gpu=gpu) == 0


def test_gpu_count_keeps_fewer_temporaries():
    cpu = analytic_breakdown(GPTConfig.gpt2_small(), 8, 512)
    gpu = analytic_breakdown(GPTConfig.gpt2_small(), 8, 512, gpu=True)
    assert gpu["bytes"]["log-softmax piece"] == 0 < cpu["bytes"]["log-softmax piece"] <= 1 << 20
    assert gpu["bytes"]["logits (B,T,V)"] == cpu["bytes"]["logits (B,T,V)"]
    for key in cpu["peaks"]:
        assert gpu["peaks"][key] <= cpu["peaks"][key], key


def test_synthetic_pairs_collate_to_the_asked_length():
    pairs = synthetic_pairs(3, 20, 5, 50, seed=1)
    batch = collate_preferences(pairs, 0)
    assert batch["input_ids"].shape == (6, 20)
    assert not batch["loss_mask"][:, :5].any()  # prompts are never scored
    assert batch["loss_mask"][:3, 5:].all()  # chosen rows fill the row
    assert (batch["input_ids"][batch["loss_mask"]] > 0).all()  # no pad id inside a response
    assert (batch["loss_mask"][3:].sum(axis=1) <= 15).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq=40), "n_ctx"),
    (dict(prompt=16), "prompt"),
    (dict(modes=("cached", "bogus")), "modes"),
    (dict(ref_batch_pairs=3), "ref_batch_pairs"),
    (dict(steps=0), "steps"),
    (dict(eval_pairs=-1), "eval_pairs"),
    (dict(eval_batch_pairs=0), "eval_batch_pairs"),
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
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["measured"]) == ["cached"]
    assert "evaluation_peak_bytes" not in res["measured"]["cached"] and "evaluation_cached" not in \
        res["analytic"]["peaks"]
    text = capsys.readouterr().out
    assert "Analytic breakdown" in text and "Measured" in text and "step 1 peak" in text
    assert main(["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab", "40", "--n-ctx", "16",
                 "--seq", "20"]) == 2  # T > n_ctx: an error message, not a traceback
    assert "n_ctx" in capsys.readouterr().err


def test_report_formats_every_mode(micro):
    text = format_report(micro)
    for mode in MODES:
        assert f"Phases of the {mode} mode" in text
    assert "reference cache pass" in text and "held-out evaluation" in text and "Predicted for a GPU" in text


@requires_gpu
def test_cuda_measurement():  # pragma: no cover - needs a GPU
    res = measure(MICRO, pairs=2, seq=16, prompt=4, steps=2, device="cuda", eval_pairs=4, eval_batch_pairs=2)
    assert "CuPy" in res["meter"] and res["config"]["device"].startswith("cuda")
    assert "gpu" in res["machine"]
    a, b = res["measured"]["cached"], res["measured"]["recompute"]
    assert b["step1_peak_bytes"] >= a["step1_peak_bytes"] > a["state_bytes"]
    for r in (a, b):
        assert set(r["meter_extra"]) >= {"pool_reserved_bytes", "device_used_max_bytes"}
        # the pool keeps every block it allocated: its size bounds the live peak from above
        assert r["meter_extra"]["pool_reserved_bytes"] >= r["peak_bytes"]
        assert r["meter_extra"]["device_used_max_bytes"] >= r["meter_extra"]["pool_reserved_bytes"] // 2
        assert math.isfinite(r["steps"][0]["loss"]) and math.isfinite(r["eval_loss"])
