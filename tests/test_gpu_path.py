"""The GPU code path end to end, on real CuPy where a GPU is visible and otherwise on the strict
CuPy stand-in: the `minidpo` command with ``--device cuda`` (tokenizer, sft, dpo, sample, eval,
export, resume), and the main job ``examples/train_tiny.py --device cuda --quick`` with the
fused kernels on and off, against the CPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from minidpo import kernels, runtime
from minidpo.cli import main
from minidpo.tasks import sentiment
from tests import cupy_standin
from tests.conftest import CUDA_OK, requires_cuda

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--batch-size", 4, "--log-every", 2, "--eval-every", 4, "--warmup-steps", 1, "--no-progress"]
MODEL = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--n-ctx", 64]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-cli")
    corpus = sentiment.sft_corpus(120, seed=1)
    with open(d / "sft.jsonl", "w") as f:
        for p, r in corpus:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    rng = np.random.default_rng(1)
    with open(d / "prefs.jsonl", "w") as f:
        for i in range(40):
            p, r = corpus[i]
            f.write(json.dumps({"prompt": p, "chosen": r, "rejected": corpus[int(rng.integers(60, 120))][1]}) + "\n")
    return d


def run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@requires_cuda
def test_cli_on_cuda(files, tmp_path, capsys, monkeypatch):
    d, t = files, tmp_path
    assert run(["tokenizer", "--corpus", d / "sft.jsonl", "--vocab-size", 300, "--out", t / "tok"], capsys)[0] == 0
    sft = ["sft", "--data", d / "sft.jsonl", "--tokenizer", t / "tok", *MODEL, *TRAIN, "--device", "cuda", "--steps", 8]
    code, out, err = run([*sft, "--out", t / "sft"], capsys)
    assert code == 0, err
    # an interruption at step 3 (Ctrl-C: checkpoint, exit 130), then the same command resumes
    # and ends where the uninterrupted run ended, bit for bit
    monkeypatch.setenv("MINIDPO_TEST_INTERRUPT_AT", "sft:step=3")
    code, out, err = run([*sft, "--out", t / "sft-resumed"], capsys)
    assert code == 130 and "done:" not in out, (out, err)
    monkeypatch.delenv("MINIDPO_TEST_INTERRUPT_AT")
    code, out, err = run([*sft, "--out", t / "sft-resumed"], capsys)
    assert code == 0 and "resuming at step 3 of 8" in out, (out, err)
    a, b = weights(t / "sft"), weights(t / "sft-resumed")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    dpo = ["dpo", "--data", d / "prefs.jsonl", "--ref", t / "sft", *TRAIN, "--steps", 6, "--device", "cuda"]
    code, out, err = run([*dpo, "--out", t / "dpo"], capsys)
    assert code == 0, err
    log = [json.loads(line) for line in (t / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r) and any("eval/loss" in r for r in log)
    code, out, err = run(["sample", "--model", t / "dpo", "--prompt", "the movie was", "--n", 2, "--max-new-tokens", 8,
                          "--top-k", 5, "--jsonl", "--device", "cuda"], capsys)
    assert code == 0, err
    assert len([json.loads(line) for line in out.splitlines()]) == 2
    code, out, err = run(["eval", "--policy", t / "sft", "--ref", t / "sft", "--data", d / "prefs.jsonl",
                          "--device", "cuda"], capsys)
    assert code == 0, err
    m = json.loads(out)
    assert abs(m["loss"] - np.log(2)) < 1e-6 and m["n_pairs"] == 40  # the policy against itself: ln 2
    code, out, err = run(["export", "--model", t / "dpo", "--out", t / "hf"], capsys)  # a host-side copy
    assert code == 0, err
    hf = load_file(str(t / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(hf["transformer.wte.weight"], weights(t / "dpo")["transformer.wte.weight"])


@pytest.mark.skipif(CUDA_OK, reason="compares the stand-in's array code with NumPy's")
def test_cuda_sft_without_kernels_equals_cpu_bit_for_bit(files, tmp_path, capsys, cuda_or_standin):
    """Same seed, same array code: the CuPy path with the kernels off computes what NumPy does
    (the CPU run on the fast path's NumPy passes, without the compiled CPU kernels)."""
    t = tmp_path
    run(["tokenizer", "--corpus", files / "sft.jsonl", "--vocab-size", 300, "--out", t / "tok"], capsys)
    sft = ["sft", "--data", files / "sft.jsonl", "--tokenizer", t / "tok", *MODEL, *TRAIN, "--steps", 4]
    with runtime.no_cpu_kernels():
        assert run([*sft, "--out", t / "cpu", "--device", "cpu"], capsys)[0] == 0
    with kernels.disabled():
        assert run([*sft, "--out", t / "cuda", "--device", "cuda"], capsys)[0] == 0
    a, b = weights(t / "cpu"), weights(t / "cuda")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _train_tiny(out: Path, device: str, kernels_on: bool = True) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if device == "cuda" and not CUDA_OK:
        env = cupy_standin.subprocess_env(env)
    if not kernels_on:
        env["MINIDPO_KERNELS"] = "0"
    if device == "cpu":  # the NumPy passes, the array code the stand-in runs (no compiled CPU kernels)
        env["MINIDPO_CPU_KERNELS"] = "0"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--quick", "--device", device,
                        "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def _strip(summary: dict) -> dict:
    """The summary without what names the device or the folders, or times the run."""
    s = json.loads(json.dumps(summary))
    s.pop("device", None)
    s.pop("cpu_path", None)
    s.pop("timings_s", None)
    for rec in [s.get("dpo", {}), *s.get("sweep", [])]:
        rec.pop("dir", None)
    return s


@pytest.mark.slow
def test_train_tiny_on_cuda_matches_the_cpu_run(tmp_path):
    cpu = _train_tiny(tmp_path / "cpu", "cpu")
    off = _train_tiny(tmp_path / "cuda-plain", "cuda", kernels_on=False)
    on = _train_tiny(tmp_path / "cuda", "cuda")
    assert off["device"].startswith("cuda") and on["device"].startswith("cuda")
    if not CUDA_OK:  # the stand-in runs NumPy's array code: bit for bit
        assert _strip(off) == _strip(cpu)
    # the fused kernels round differently, so sampled tokens may part ways: the figures agree
    # within sampling noise (four combined standard errors)
    for stage in ("sft", "dpo"):
        a, b = cpu[stage], on[stage]
        assert abs(a["reward_mean"] - b["reward_mean"]) < 4 * np.hypot(a["reward_se"], b["reward_se"]), (a, b)
    assert abs(cpu["dpo"]["kl"] - on["dpo"]["kl"]) < 4 * np.hypot(cpu["dpo"]["kl_se"], on["dpo"]["kl_se"])
    assert abs(cpu["dpo"]["accuracy"] - on["dpo"]["accuracy"]) < 0.15


@pytest.mark.slow
def test_frontier_quick_on_cuda(tmp_path):
    """Every method of examples/frontier.py (reward model, PPO, PPO-GT, baselines, online DPO)
    runs on the CuPy path and gives finite points."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if not CUDA_OK:
        env = cupy_standin.subprocess_env(env)
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "frontier.py"), "--quick", "--device", "cuda",
                        "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    runs = json.loads((tmp_path / "frontier.json").read_text())["runs"]
    assert len({x["method"] for x in runs}) >= 7
    assert all(np.isfinite(x["reward_mean"]) and np.isfinite(x["kl"]) for x in runs)
