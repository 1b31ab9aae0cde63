"""bench/memory_dpo.py: the measurement runs, its fields are there, the recompute mode costs at
least what the cached mode does, and the analytic breakdown agrees with the shapes and with the
measurement."""

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.memory_dpo import (
    MODES,
    analytic_breakdown,
    format_report,
    main,
    max_pairs_that_fit,
    measure,
    synthetic_pairs,
)
from minidpo.data import collate_preferences
from minidpo.model import GPTConfig, init_params
from tests.conftest import requires_cuda

MICRO = GPTConfig(vocab_size=64, n_ctx=32, n_layer=2, n_head=2, n_embd=32)
# big enough that arrays, not Python objects, dominate the counts; still well under a second
SMALL = GPTConfig(vocab_size=1024, n_ctx=64, n_layer=2, n_head=2, n_embd=64)

MODE_KEYS = {"mode", "state_bytes", "step1_peak_bytes", "peak_bytes", "activation_peak_bytes",
             "resident_before_step_bytes", "params_bytes", "grads_bytes", "moments_bytes",
             "reference_params_bytes", "process_peak_rss_bytes", "steps", "phases", "meter_extra"}


@pytest.fixture(scope="module")
def micro():
    return measure(MICRO, pairs=2, seq=16, prompt=4, steps=2)


@pytest.fixture(scope="module")
def small():
    return measure(SMALL, pairs=2, seq=64, prompt=16, steps=2)


def test_result_has_the_expected_fields(micro):
    assert set(micro) >= {"config", "machine", "meter", "analytic", "measured"}
    assert micro["config"]["rows"] == 4 and micro["config"]["seq"] == 16 and micro["config"]["device"] == "cpu"
    assert micro["machine"]["numpy"] == np.__version__ and micro["machine"]["cpu"]
    assert set(micro["measured"]) == set(MODES)
    for mode, r in micro["measured"].items():
        assert MODE_KEYS <= set(r), MODE_KEYS - set(r)
        assert r["mode"] == mode
        assert len(r["steps"]) == 2 and all(s["finite"] for s in r["steps"])
        assert r["process_peak_rss_bytes"] > 0
        stages = {p["stage"] for p in r["phases"]}
        assert {"setup", "step 1", "step 2"} <= stages
        phases = [p["phase"] for p in r["phases"] if p["stage"] == "step 1"]
        for name in ("gpt_forward", "sequence_logps", "dpo_loss", "sequence_logps_backward", "gpt_backward",
                     "clip_grad_norm", "AdamW.step"):
            assert name in phases, (mode, phases)
    assert "reference_pass_peak_bytes" in micro["measured"]["cached"]
    assert "reference_pass_peak_bytes" not in micro["measured"]["recompute"]
    assert set(micro["analytic"]["peaks"]) >= {"cached", "recompute", "cached_steady", "recompute_steady",
                                               "cached_as_train_dpo", "reference_pass", "reference_pass_train_dpo"}
    json.dumps(micro)  # JSON-able as it is


def test_recompute_costs_at_least_the_cached_mode(micro, small):
    for res in (micro, small):
        a, b = res["measured"]["cached"], res["measured"]["recompute"]
        assert b["step1_peak_bytes"] >= a["step1_peak_bytes"]
        assert b["peak_bytes"] >= a["peak_bytes"]
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


def test_analytic_prediction_brackets_the_measurement(small):
    """The analytic peak is an upper estimate within 10%; the measured peak is at least what the
    end of the forward must hold (parameters, moments, the activation cache, the logits)."""
    an = small["analytic"]
    t = an["bytes"]
    floor = (t["parameters"] + t["AdamW moments m, v"] + t["activation cache (embedding, L blocks, ln_f)"]
             + t["logits (B,T,V)"])
    for mode, r in small["measured"].items():
        pred = an["peaks"][mode]
        assert floor <= r["step1_peak_bytes"] <= 1.10 * pred, (mode, r["step1_peak_bytes"], pred, floor)
    ref = small["measured"]["cached"]["reference_pass_peak_bytes"]
    assert 2 * t["parameters"] < ref <= 1.10 * an["peaks"]["reference_pass"]


@given(n_layer=st.integers(1, 3), n_head=st.integers(1, 3), head=st.integers(1, 8), vocab=st.integers(2, 300),
       pairs=st.integers(1, 5), seq=st.integers(2, 40))
def test_analytic_sizes_follow_the_shapes(n_layer, n_head, head, vocab, pairs, seq):
    cfg = GPTConfig(vocab_size=vocab, n_ctx=seq, n_layer=n_layer, n_head=n_head, n_embd=n_head * head)
    an = analytic_breakdown(cfg, pairs, seq)
    B, T, V, C = 2 * pairs, seq, vocab, n_head * head
    assert an["bytes"]["logits (B,T,V)"] == B * T * V * 4
    assert an["bytes"]["dlogits (B,T,V)"] == B * T * V * 4
    p_bytes = sum(a.nbytes for a in init_params(cfg).values())
    assert an["bytes"]["parameters"] == p_bytes and an["bytes"]["AdamW moments m, v"] == 2 * p_bytes
    assert an["per_layer_bytes"]["attention probabilities (B,H,T,T)"] == B * n_head * T * T * 4
    assert an["per_layer_bytes"]["mlp.c_fc output (B,T,4C)"] == B * T * 4 * C * 4
    pk = an["peaks"]
    assert pk["recompute"] - pk["cached"] == p_bytes
    assert pk["cached_steady"] - pk["cached"] == p_bytes
    assert pk["reference_pass"] >= 2 * p_bytes + an["bytes"]["logits (B,T,V)"] // 2


def test_gpt2_small_logits_size():
    an = analytic_breakdown(GPTConfig.gpt2_small(), 8, 512)
    assert an["shapes"]["P"] == 124_439_808
    assert an["bytes"]["logits (B,T,V)"] == 16 * 512 * 50257 * 4


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
    assert gpu["bytes"]["backward workspace"] < cpu["bytes"]["backward workspace"]
    assert gpu["bytes"]["logits (B,T,V)"] == cpu["bytes"]["logits (B,T,V)"]


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
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(pairs=2, seq=16, prompt=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        measure(MICRO, **args)


def test_command_line_writes_json_and_report(tmp_path, capsys):
    out = tmp_path / "mem.json"
    rc = main(["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab", "40", "--n-ctx", "16",
               "--pairs", "2", "--seq", "12", "--steps", "1", "--modes", "cached", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["measured"]) == ["cached"]
    text = capsys.readouterr().out
    assert "Analytic breakdown" in text and "Measured" in text and "step 1 peak" in text
    assert main(["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab", "40", "--n-ctx", "16",
                 "--seq", "20"]) == 2  # T > n_ctx: an error message, not a traceback
    assert "n_ctx" in capsys.readouterr().err


def test_report_formats_every_mode(micro):
    text = format_report(micro)
    for mode in MODES:
        assert f"Phases of the {mode} mode" in text
    assert "reference cache pass" in text


@requires_cuda
def test_cuda_measurement():  # pragma: no cover - needs a GPU
    res = measure(MICRO, pairs=2, seq=16, prompt=4, steps=2, device="cuda")
    assert "CuPy" in res["meter"] and res["config"]["device"].startswith("cuda")
    assert "gpu" in res["machine"]
    a, b = res["measured"]["cached"], res["measured"]["recompute"]
    assert b["step1_peak_bytes"] >= a["step1_peak_bytes"] > a["state_bytes"]
    for r in (a, b):
        assert set(r["meter_extra"]) >= {"pool_reserved_bytes", "device_used_max_bytes"}
        # the pool keeps every block it allocated: its size bounds the live peak from above
        assert r["meter_extra"]["pool_reserved_bytes"] >= r["peak_bytes"]
        assert r["meter_extra"]["device_used_max_bytes"] >= r["meter_extra"]["pool_reserved_bytes"] // 2
        assert math.isfinite(r["steps"][0]["loss"])
