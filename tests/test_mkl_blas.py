"""minidpo/mkl_blas.py: MKL's GEMM through ctypes against np.matmul, in every operand layout the
fast path passes (C- and F-ordered, row-strided views, transposed views), float32 and float64;
its calibration (tests/test_gemm_choice.py holds the choice made from it)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo import fast, mkl_blas, runtime

pytestmark = pytest.mark.skipif(mkl_blas.load() is None,
                                reason="MKL's GEMM needs the mkl package (pip install minidpo[mkl])")

seeds = st.integers(0, 2**32 - 1)


def _view(rng, shape, layout, dtype):
    """A (rows, cols) array in a layout: 'c' contiguous, 'f' Fortran, 'rows' a column slice of a
    wider array (row stride > cols), 't' the transpose of a C array, 'tcols' a transposed column slice."""
    r, c = shape
    if layout == "c":
        return rng.standard_normal((r, c)).astype(dtype)
    if layout == "f":
        return np.asfortranarray(rng.standard_normal((r, c)).astype(dtype))
    if layout == "rows":
        return rng.standard_normal((r, c + 3)).astype(dtype)[:, 1:c + 1]
    if layout == "t":
        return rng.standard_normal((c, r)).astype(dtype).T
    return rng.standard_normal((r + 2, c)).astype(dtype)[1:r + 1].T.T  # rows of a taller array
LAYOUTS = st.sampled_from(["c", "f", "rows", "t", "tslice"])


@given(M=st.integers(1, 9), K=st.integers(1, 9), N=st.integers(1, 9), la=LAYOUTS, lb=LAYOUTS,
       dtype=st.sampled_from([np.float32, np.float64]), seed=seeds)
def test_matmul_equals_numpy_in_every_layout(M, K, N, la, lb, dtype, seed):
    rng = np.random.default_rng(seed)
    a, b = _view(rng, (M, K), la, dtype), _view(rng, (K, N), lb, dtype)
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    out = np.full((M, N), np.nan, dtype)
    got = mkl_blas.matmul(a, b, out)
    assert got is out and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, want, **tol)


def test_the_layouts_it_reads_itself_and_the_ones_it_leaves_to_numpy():
    x = np.zeros((6, 8), np.float32)
    assert mkl_blas._as_gemm_operand(x) == (mkl_blas._NO_TRANS, 8)
    assert mkl_blas._as_gemm_operand(x.T) == (mkl_blas._TRANS, 8)
    assert mkl_blas._as_gemm_operand(x[:, 2:5]) == (mkl_blas._NO_TRANS, 8)
    assert mkl_blas._as_gemm_operand(x[:, 2:5].T) == (mkl_blas._TRANS, 8)
    assert mkl_blas._as_gemm_operand(x[:, ::2]) is None  # no unit stride: np.matmul
    a = np.arange(12.0).reshape(3, 4)[:, ::2]
    b = np.ones((2, 3))
    np.testing.assert_array_equal(mkl_blas.matmul(a, b), a @ b)
    np.testing.assert_array_equal(mkl_blas.matmul(a.astype(np.float32), b), a @ b)  # mixed dtypes: NumPy


@pytest.fixture
def mkl_chosen():
    old = runtime.set_gemm("mkl")  # whatever this machine's calibration says
    yield
    runtime.set_gemm(old)


def test_the_fast_path_uses_it_and_the_switches_turn_it_off(monkeypatch, mkl_chosen):
    calls = []
    real = mkl_blas.matmul
    monkeypatch.setattr(mkl_blas, "matmul", lambda *a: (calls.append(1), real(*a))[1])
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    y = fast.linear_forward(x, w)[0]
    assert calls == [1]
    with runtime.no_cpu_kernels():
        y2 = fast.linear_forward(x, w)[0]
    assert calls == [1]
    np.testing.assert_allclose(y, y2, rtol=1e-6, atol=1e-6)
    runtime.set_gemm("numpy")
    fast.linear_forward(x, w)
    assert calls == [1]
    runtime.set_gemm("mkl")
    fast.linear_forward(x, w)
    assert calls == [1, 1]


def test_calibrate_times_both_libraries_on_every_shape():
    shapes = ((64, 32, 48), (32, 64, 16))
    r = mkl_blas.calibrate(shapes, rounds=2)
    assert r["shapes"] == [list(s) for s in shapes] and r["rounds"] == 2
    assert len(r["mkl_s"]) == len(r["numpy_s"]) == 2
    assert all(t > 0 for t in r["mkl_s"] + r["numpy_s"])


@given(P=st.integers(1, 3), Q=st.integers(1, 4), M=st.integers(1, 6), K=st.integers(1, 6), N=st.integers(1, 6),
       ta=st.booleans(), tb=st.booleans(), out_view=st.booleans(), beta=st.sampled_from([0.0, 1.0]),
       alpha=st.sampled_from([1.0, 0.125]), dtype=st.sampled_from([np.float32, np.float64]), seed=seeds)
def test_bmm_equals_numpy_on_transposed_and_strided_views(P, Q, M, K, N, ta, tb, out_view, beta, alpha, dtype, seed):
    """The attention's shapes: (B, H, T, D) arrays and their transposes, outputs written into a
    (B, T, H, D) array's (B, H, T, D) view, accumulated (beta 1) or not, scaled (alpha)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((P, Q, K, M) if ta else (P, Q, M, K)).astype(dtype)
    b = rng.standard_normal((P, Q, N, K) if tb else (P, Q, K, N)).astype(dtype)
    a, b = (a.transpose(0, 1, 3, 2) if ta else a), (b.transpose(0, 1, 3, 2) if tb else b)
    base = rng.standard_normal((P, M, Q, N)).astype(dtype)  # heads side by side, as yh
    out = base.transpose(0, 2, 1, 3) if out_view else np.ascontiguousarray(base.transpose(0, 2, 1, 3))
    want = alpha * np.matmul(a.astype(np.float64), b.astype(np.float64)) + beta * out.astype(np.float64)
    got = mkl_blas.bmm(a, b, out, alpha=alpha, beta=beta)
    assert got is out
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, want, **tol)
    if out_view:  # written through the view into the (P, M, Q, N) array
        np.testing.assert_allclose(base.transpose(0, 2, 1, 3), want, **tol)
