"""runtime's choice of the CPU fast path's GEMM: MKL only where it loads and, by default, where its
one-time calibration measured it faster than NumPy's BLAS by more than GEMM_MARGIN; the verdict
cached beside Numba's cache, keyed by the machine, and re-measured when the key changes. The
calibration's timings are supplied here, so these tests hold the decision on any machine."""

import json

import numpy as np
import pytest

from minidpo import fast, mkl_blas, runtime

needs_mkl = pytest.mark.skipif(mkl_blas.load() is None, reason="needs the mkl package (pip install minidpo[mkl])")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The calibration cached in a temporary file; the choice decided afresh, restored after."""
    path = tmp_path / "gemm-calibration.json"
    monkeypatch.setattr(runtime, "calibration_path", lambda: str(path))
    old = runtime.set_gemm("auto")
    yield path
    runtime.set_gemm(old)


def timed(monkeypatch, mkl_s, numpy_s):
    """mkl_blas.calibrate replaced by one returning these timings; returns its call log."""
    calls = []

    def calibrate(*a, **k):
        calls.append(1)
        return {"shapes": [[1, 1, 1]] * len(mkl_s), "rounds": 1, "mkl_s": list(mkl_s), "numpy_s": list(numpy_s)}

    monkeypatch.setattr(mkl_blas, "calibrate", calibrate)
    return calls


@needs_mkl
@pytest.mark.parametrize("mkl_s, use", [([0.80, 0.10], True), ([0.90, 0.069], True), ([0.90, 0.071], False),
                                        ([1.00, 0.20], False)])
def test_mkl_only_where_it_measured_faster_by_the_margin(cache, monkeypatch, mkl_s, use):
    calls = timed(monkeypatch, mkl_s, [0.90, 0.10])  # NumPy: 1.00 s in all; the margin is 0.97
    assert (runtime.gemm_lib() is mkl_blas) == use
    assert runtime.gemm_choice()["gemm"] == ("mkl" if use else "numpy")
    assert runtime.gemm_choice()["mkl_over_numpy"] == pytest.approx(sum(mkl_s))
    assert calls == [1]


@needs_mkl
def test_the_verdict_is_cached_and_measured_again_when_the_machine_changes(cache, monkeypatch):
    calls = timed(monkeypatch, [0.5], [1.0])
    assert runtime.gemm_lib() is mkl_blas and calls == [1]
    rec = json.loads(cache.read_text())
    assert rec["key"] == runtime.gemm_machine_key() and rec["mkl_s"] == [0.5]
    first = runtime.gemm_choice()["why"]
    runtime.set_gemm("auto")  # a new process: decided again, from the cache
    assert runtime.gemm_lib() is mkl_blas and calls == [1] and runtime.gemm_choice()["cached"]
    assert runtime.gemm_choice()["why"] == first  # a run's log and summary say the same either way
    rec["key"]["numpy"] = "0.0.other"  # another NumPy (or CPU, BLAS, MKL) measured that
    cache.write_text(json.dumps(rec))
    calls2 = timed(monkeypatch, [2.0], [1.0])
    runtime.set_gemm("auto")
    assert runtime.gemm_lib() is None and calls2 == [1]
    assert json.loads(cache.read_text())["mkl_s"] == [2.0]


@needs_mkl
@pytest.mark.parametrize("text", ["", "{not json", json.dumps({"key": None}), json.dumps([1, 2])])
def test_a_damaged_cache_is_measured_again(cache, monkeypatch, text):
    cache.write_text(text)
    calls = timed(monkeypatch, [0.5], [1.0])
    assert runtime.gemm_lib() is mkl_blas and calls == [1]


@needs_mkl
def test_a_cache_folder_that_cannot_be_written_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(runtime, "calibration_path", lambda: str(blocker / "sub" / "gemm-calibration.json"))
    old = runtime.set_gemm("auto")
    try:
        calls = timed(monkeypatch, [0.5], [1.0])
        assert runtime.gemm_lib() is mkl_blas and calls == [1]
    finally:
        runtime.set_gemm(old)


@needs_mkl
def test_the_named_choices_decide_without_timing(cache, monkeypatch):
    calls = timed(monkeypatch, [2.0], [1.0])
    runtime.set_gemm("mkl")
    assert runtime.gemm_lib() is mkl_blas
    runtime.set_gemm("numpy")
    assert runtime.gemm_lib() is None and runtime.gemm_choice()["why"] == "MINIDPO_GEMM=numpy"
    assert calls == [] and not cache.exists()


def test_without_mkl_numpy_multiplies(cache, monkeypatch):
    monkeypatch.setattr(mkl_blas, "load", lambda: None)
    calls = timed(monkeypatch, [0.1], [1.0])
    for choice in ("auto", "mkl"):
        runtime.set_gemm(choice)
        assert runtime.gemm_lib() is None and "not installed" in runtime.gemm_choice()["why"]
    assert calls == []


def test_with_the_kernels_off_numpy_multiplies(cache):
    with runtime.no_cpu_kernels():
        assert runtime.gemm_lib() is None
        assert "MINIDPO_CPU_KERNELS=0" in runtime.gemm_choice()["why"]
        assert "NumPy passes" in runtime.describe_cpu_path()


def test_a_bad_choice_is_a_clear_error(cache, monkeypatch):
    with pytest.raises(ValueError, match="one of auto, mkl, numpy"):
        runtime.set_gemm("openblas")
    monkeypatch.setattr(runtime, "_GEMM", "fastest")  # as MINIDPO_GEMM=fastest sets it
    monkeypatch.setattr(runtime, "_MKL", None)
    with pytest.raises(ValueError, match="MINIDPO_GEMM must be one of auto, mkl, numpy, got 'fastest'"):
        runtime.gemm_lib()


def test_the_cache_lives_beside_numbas(monkeypatch, tmp_path):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert runtime.calibration_path() == str(tmp_path / "gemm-calibration.json")
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    path = runtime.calibration_path()
    assert path.endswith("gemm-calibration.json")
    assert "__pycache__" in path or ".cache" in path


@needs_mkl
def test_the_choice_changes_no_number_beyond_round_off(cache):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((64, 48)).astype(np.float32), rng.standard_normal((48, 40)).astype(np.float32)
    out = {}
    for choice in ("mkl", "numpy"):
        runtime.set_gemm(choice)
        out[choice] = fast.linear_forward(x, w)[0]
    np.testing.assert_allclose(out["mkl"], out["numpy"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["numpy"], x @ w)
