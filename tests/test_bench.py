"""bench/bench_step.py: the correctness gate (minidpo's DPO step vs the same step in PyTorch) on a
micro shape, the gate's ability to fail, and the JSON rows. No timing is asserted."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import bench_step as bs  # noqa: E402

MICRO = bs.CONFIGS["micro"]


@pytest.fixture(scope="module")
def cpu():
    torch.set_num_threads(1)
    return bs.Device("cpu", "fp32")


def test_gate_passes_on_micro_and_checks_every_tensor(cpu):
    gate = bs.correctness_gate(MICRO, cpu, f64_check=True)
    assert gate["passed"], gate["failures"]
    n_params = len(bs.make_params(MICRO)[0])
    # loss, two log-prob vectors, every gradient, the norm, every parameter after AdamW
    assert gate["n_checked"] == 3 + n_params + 1 + n_params
    assert gate["train_step_checked"]
    assert gate["f64"]["minidpo"] < 1e-4 and gate["f64"]["torch"] < 1e-4
    assert all(r <= 1.0 for r, _ in gate["worst"])


def test_gate_fails_when_one_gradient_is_off(cpu, monkeypatch):
    original = bs.MinidpoStep.loss_and_grads

    def off_by_a_little(self, *args, **kw):
        loss, logps, grads = original(self, *args, **kw)
        grads["transformer.h.1.ln_2.bias"] = grads["transformer.h.1.ln_2.bias"] * np.float32(1.001)
        return loss, logps, grads

    monkeypatch.setattr(bs.MinidpoStep, "loss_and_grads", off_by_a_little)
    gate = bs.correctness_gate(MICRO, cpu, check_train_step=False)
    assert not gate["passed"]
    assert any(f.startswith("grad transformer.h.1.ln_2.bias") for f in gate["failures"])


def test_failing_gate_exits_nonzero_before_any_timing(monkeypatch, capsys, tmp_path):
    def failing(cfg, device, **kw):
        return {"config": cfg.name, "passed": False, "failures": ["grad x: made up"], "worst": [(2.0, "grad x")],
                "n_checked": 1, "atol_scale": 1e-5}

    monkeypatch.setattr(bs, "correctness_gate", failing)
    monkeypatch.setattr(bs, "time_pair", lambda *a, **k: pytest.fail("timed after a failed gate"))
    assert bs.main(["--configs", "micro", "--out", str(tmp_path), "--threads", "1"]) == 1
    out = capsys.readouterr()
    assert "FAIL" in out.out and "no timings" in out.err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def keep_fast_settings():
    """bench's CPU run calls runtime.cpu_defaults (threads, NumPy's hugepage advice) and may turn the
    CPU kernels off: restore them."""
    from minidpo import runtime

    threads, advice, kernels = runtime._THREADS, runtime.hugepage_advice(), runtime._CPU_KERNELS
    yield
    runtime.set_threads(threads)
    runtime.set_cpu_kernels(kernels)
    if advice is not None:
        runtime.set_hugepage_advice(advice)


def test_run_writes_the_table_and_json_rows(tmp_path, capsys, monkeypatch, keep_fast_settings):
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    rc = bs.main(["--configs", "micro", "--steps", "2", "--warmup", "0", "--threads", "1", "--ceiling-n", "128",
                  "--gap", "0", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gate micro: PASS" in printed and "micro  cpu" in printed
    (path,) = list(tmp_path.glob("cpu-*.json"))
    doc = json.loads(path.read_text())
    assert doc["machine"]["threads"] == 1 and doc["machine"]["numpy"] == np.__version__
    rows = doc["rows"]
    assert [(r["config"], r["device"], r["mode"], r["step"]) for r in rows] == [
        ("micro", "cpu", "fp32", "full"), ("micro", "cpu", "fp32", "cached_ref")]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["minidpo_ms"] / r["torch_ms"])
        assert r["steps"] == 2 and r["warmup"] == 0 and r["gap_s"] == 0 and r["tokens_per_step"] == MICRO.tokens
        for impl in ("minidpo", "torch"):
            s = r[impl]
            assert s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]
            assert s["tokens_per_s"] == pytest.approx(MICRO.tokens / (s["median_ms"] / 1e3))
            assert s["achieved_flops"] == pytest.approx(r["flops_per_step"] / (s["median_ms"] / 1e3))
            assert s["frac_of_ceiling"] == pytest.approx(s["achieved_flops"] / r["matmul_ceiling_flops"])
            assert set(s["phases_ms"]) == set(bs.PHASES) - ({"reference"} if r["step"] == "cached_ref" else set())
            assert s["peak_mem_mb"] >= 0 and s["mem_method"]
    assert rows[0]["flops_per_step"] > rows[1]["flops_per_step"]  # the full step adds a reference forward
    assert doc["gates"][0]["passed"] and doc["gates"][0]["config"] == "micro"
    from minidpo import runtime

    kern = runtime.cpu_kernels() is not None
    assert all(r["cpu_kernels"] is kern and r["blas_threads"] == 1 and r["fast_threads"] == 1 for r in rows)
    assert bs.main(["--show", str(path)]) == 0
    md = capsys.readouterr().out
    cell = "on" if kern else "off"
    assert md.count("| micro | cpu | fp32 |") == 2 and f"| micro | fp32 | {cell} | off | 1 | 1 | 1 | 0 | cached_ref | torch |" in md


def test_two_threads_run_minidpo_on_the_pool_with_one_blas_thread(tmp_path, capsys, monkeypatch, keep_fast_settings):
    """As the CLI's --threads 2: the fast path's pool on 2 threads, NumPy's BLAS on 1 (the rows
    say so); --fast-threads 1 --no-cpu-kernels: the pool on 1, the BLAS on 2, the NumPy passes."""
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    common = ["--configs", "micro", "--steps", "1", "--warmup", "0", "--threads", "2", "--ceiling-n", "128", "--gap",
              "0", "--variants", "cached_ref", "--out", str(tmp_path)]
    assert bs.main(common) == 0
    assert bs.main([*common, "--fast-threads", "1", "--no-cpu-kernels"]) == 0
    capsys.readouterr()
    rows = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())["rows"]
    got = sorted((r["threads"], r["fast_threads"], r["blas_threads"], r["cpu_kernels"]) for r in rows)
    assert got[0] == (2, 1, 2, False) and got[1][:3] == (2, 2, 1)


def test_results_merge_by_row_key(tmp_path):
    path = tmp_path / "r.json"
    row = {"config": "C0", "device": "cuda", "mode": "fp32", "step": "full", "kernels": True,
           "numpy_hugepage": "default", "minidpo_ms": 1.0}
    bs.write_results(path, {"m": 1}, [row, {**row, "mode": "tf32"}], [])
    doc = bs.write_results(path, {"m": 2}, [{**row, "minidpo_ms": 3.0}], [])
    assert doc["machine"] == {"m": 2}
    assert sorted((r["mode"], r["minidpo_ms"]) for r in doc["rows"]) == [("fp32", 3.0), ("tf32", 1.0)]
    assert json.loads(path.read_text()) == doc


def test_batch_layout_and_flop_count():
    ids, mask = bs.make_batch(bs.CONFIGS["C0"], seed=3)
    N, T = bs.CONFIGS["C0"].pairs, bs.CONFIGS["C0"].T
    assert ids.shape == mask.shape == (2 * N, T) and mask.dtype == bool
    assert (mask[:, 1:].sum(1) >= 1).all() and not mask[:, 0].any()
    end = T - np.argmax(mask[:, ::-1], axis=1)  # one past each row's last response token
    pad = np.arange(T)[None, :] >= end[:, None]
    assert (ids[pad] == 0).all() and (ids[~pad] > 0).all()  # right padding with 0; tokens are 1..V-1
    for i in range(N):  # chosen and rejected rows share the prompt (the tokens before the response)
        lp = int(np.argmax(mask[i]))
        assert lp == int(np.argmax(mask[N + i])) and (ids[i, :lp] == ids[N + i, :lp]).all()
    c = bs.CONFIGS["C2"]
    f = bs.flops_per_token(c, 124_000_000)
    assert f["fwd_bwd"] == 6 * 124_000_000 + 6 * 12 * 768 * 512
    assert bs.step_flops(c, 124_000_000, "full") == (f["fwd_bwd"] + f["fwd"]) * 16 * 512


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bs.parse_args(["--configs", "C2"])  # GPU-only on the CPU
    with pytest.raises(SystemExit):
        bs.parse_args(["--configs", "C9"])
    with pytest.raises(SystemExit):
        bs.parse_args(["--mode", "tf32"])
    with pytest.raises(SystemExit):
        bs.parse_args(["--steps", "0"])
    args = bs.parse_args(["--configs", "C0,C1"])
    assert [c.name for c in args.config_list] == ["C0", "C1"]


MICRO_LP = bs.CONFIGS["micro-lp"]


def test_long_prompt_batch_has_its_drawn_lengths():
    pairs = bs.make_pairs(bs.CONFIGS["LP"], seed=0)
    assert len(pairs) == 16
    assert all(64 <= len(p.prompt_ids) <= 192 and 8 <= len(p.chosen_ids) <= 64 and 8 <= len(p.rejected_ids) <= 64
               for p in pairs)
    ids, mask = bs.make_batch(bs.CONFIGS["LP"], seed=0)
    assert ids.shape[0] == 32 and ids.shape[1] == max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                                      for p in pairs)


def test_layout_gate_passes_and_catches_a_leaky_mask(cpu, monkeypatch):
    gate = bs.layout_gate(MICRO_LP, cpu, list(bs.LAYOUTS))
    assert gate["passed"], gate["failures"]
    n_params = len(bs.make_params(MICRO_LP)[0])
    assert gate["n_checked"] == (len(bs.LAYOUTS) - 1) * (3 + n_params)
    import dataclasses

    import minidpo.packing as packing

    real = packing.pack_preferences

    def leaky(*a, **k):  # the shared prompt's rejected response sees the chosen one
        b = real(*a, **k)
        zero = b.layout.hidden_lo * 0
        return dataclasses.replace(b, layout=dataclasses.replace(b.layout, hidden_lo=zero, hidden_hi=zero))

    monkeypatch.setattr(packing, "pack_preferences", leaky)
    assert not bs.layout_gate(MICRO_LP, cpu, ["shared"])["passed"]


def test_layout_run_writes_one_row_a_layout(tmp_path, capsys):
    rc = bs.main(["--configs", "micro-lp", "--layouts", "padded,shared,shared_packed", "--steps", "2", "--warmup",
                  "0", "--threads", "1", "--ceiling-n", "64", "--gap", "0", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layout gate micro-lp" in printed and "PASS" in printed
    (path,) = list(tmp_path.glob("cpu-*.json"))
    rows = json.loads(path.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["padded", "shared", "shared_packed"]
    for r in rows:
        assert r["speedup_vs_padded"] == pytest.approx(rows[0]["minidpo_ms"] / r["minidpo_ms"])
        assert r["ratio"] == pytest.approx(r["minidpo_ms"] / r["torch_ms"])
        assert set(r["minidpo"]["phases_ms"]) == set(bs.PHASES)
    shared = rows[1]["minidpo"]
    assert shared["rows_x_len"][0] == MICRO_LP.pairs  # one row a pair: the prompt once
    assert rows[0]["minidpo"]["rows_x_len"][0] == 2 * MICRO_LP.pairs
    assert bs.main(["--show", str(path)]) == 0
    md = capsys.readouterr().out
    assert "| micro-lp | 1 | minidpo shared_packed |" in md and md.count("torch padded") == 2  # header + row
    with pytest.raises(SystemExit):
        bs.parse_args(["--configs", "C0", "--layouts", "padded"])  # C0 has no per-pair lengths


def test_sft_packing_bench_times_the_same_step_on_both_layouts(monkeypatch, capsys):
    """bench/sft_packing.py on a tiny shape: both layouts run train.sft_step to the same loss (the
    packed batch is the padded one's examples, laid out differently), and the line it prints."""
    from bench import sft_packing
    from minidpo import train
    from minidpo.model import GPTConfig

    losses = {}
    real = train.sft_step

    def recording(params, cfg, batch, *a, **k):
        out = real(params, cfg, batch, *a, **k)
        losses.setdefault(batch.shape, []).append(float(out[0]))
        return out

    monkeypatch.setattr(sft_packing, "sft_step", recording)
    monkeypatch.setattr(sft_packing, "SHAPES", (("tiny", GPTConfig(64, 32, 2, 2, 16), (2, 9), (2, 9), 6, 2),))
    monkeypatch.setattr(sft_packing.time, "sleep", lambda s: None)
    sft_packing.main()
    line = capsys.readouterr().out
    assert line.startswith("tiny: padded (6, ") and "packed (" in line and line.rstrip().endswith("x)")
    (a, la), (b, lb) = losses.items()
    assert a != b and len(la) == len(lb) == 2
    np.testing.assert_allclose(la, lb, rtol=1e-5)
