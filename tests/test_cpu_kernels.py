"""The compiled CPU kernels (minidpo/cpu_kernels.py) against their plain twins, their exp, what
they do with NaN, how fast.py turns them on and off, and fast.keep_freed_memory.

tests/test_fast.py runs every fast-path test on the kernels too; here each kernel is called on
its own, on drawn shapes, including the row offsets and part ranges fast.py passes."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo import fast, layers, logprobs
from minidpo import runtime as rt

ck = pytest.importorskip("minidpo.cpu_kernels", reason="the compiled CPU kernels need Numba (pip install minidpo[fast])")

DTYPES = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


def close(got, want, dtype, scale=1.0):
    assert got.dtype == dtype, (got.dtype, dtype)
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * scale)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * scale)


# ----------------------------------------------------------------------------------- exp


def test_exp32_is_within_four_ulp_of_exp_over_the_float32_range():
    x = np.linspace(-87.3, 88.37, 2_000_001, dtype=np.float32)
    got = np.array([ck._exp32(v) for v in x[::97]], dtype=np.float32)  # a compiled scalar each
    want = np.exp(x[::97].astype(np.float64))
    assert np.max(np.abs(got - want) / want) <= 4 * np.finfo(np.float32).eps  # 4 ulp at a binade's start
    assert ck._exp32(np.float32(0.0)) == 1.0
    assert np.isfinite(ck._exp32(np.float32(88.37))) and ck._exp32(np.float32(88.4)) == np.inf
    assert ck._exp32(np.float32(-88.0)) == 0.0 and ck._exp32(np.float32(-1e30)) == 0.0  # below the normal range
    assert np.isnan(ck._exp32(np.float32("nan")))


def test_exp32_in_a_vectorized_loop_matches_numpy():
    rng = np.random.default_rng(0)
    x = (20 * rng.standard_normal(100_003)).astype(np.float32)  # odd length: the loop's tail too
    y = np.empty_like(x)
    ck.gelu_forward(x, y)  # GELU = x / (1 + exp(-2 z)): exp over the whole range of z
    np.testing.assert_allclose(y, layers.gelu_forward(x.astype(np.float64))[0], rtol=3e-6, atol=1e-10)


def test_row_max_of_every_length():
    rng = np.random.default_rng(1)
    for n in range(1, 40):
        row = rng.standard_normal(n).astype(np.float32)
        assert ck._row_max(row) == row.max()


# ----------------------------------------------------------------------------------- each kernel


@given(n=st.integers(0, 70), dtype=DTYPES, seed=seeds)
def test_gelu_kernels_equal_plain(n, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (4 * rng.standard_normal(n)).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    y, dx = np.empty_like(x), np.empty_like(x)
    ck.gelu_forward(x, y)
    ck.gelu_backward(dy, x, dx)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)  # the float32 kernel against the truth
    close(y, layers.gelu_forward(x64)[0], dtype, scale=4)
    close(dx, layers.gelu_backward(dy64, x64)[0], dtype)


@given(n=st.integers(1, 9), C=st.integers(1, 40), dtype=DTYPES, seed=seeds)
def test_layernorm_kernels_equal_plain(n, C, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((n, C)) + 2).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal((n, C)).astype(dtype)
    y, mean, rstd = np.empty_like(x), np.empty(n, dtype), np.empty(n, dtype)
    ck.layernorm_forward(x, w, b, 1e-5, y, mean, rstd)
    y0, c0 = layers.layernorm_forward(x, w, b, 1e-5)
    close(y, y0, dtype, scale=10)
    close(mean, c0[2][:, 0], dtype, scale=10)
    close(rstd, c0[3][:, 0], dtype, scale=10)
    dx = np.empty_like(x)
    dw, db = np.ones(C, dtype), np.full(C, 2, dtype)  # the kernel adds to what they hold
    ck.layernorm_backward(dy, x, w, mean, rstd, dx, dw, db)
    dx0, g0 = layers.layernorm_backward(dy, c0)
    close(dx, dx0, dtype, scale=100)
    close(dw, g0["w"] + 1, dtype, scale=10)
    close(db, g0["b"] + 2, dtype, scale=10)


@given(b=st.integers(1, 3), H=st.integers(1, 3), S=st.integers(1, 20), dtype=DTYPES, seed=seeds, data=st.data())
def test_masked_softmax_kernel_equals_plain(b, H, S, dtype, seed, data):
    """A block of queries q0.. (own key index self0 + i) over keys k0.., each seeing the keys of
    layers.sees (start <= j <= its own index, less its hidden range): the softmax of the scaled
    scores over exactly those keys, exact zeros elsewhere."""
    rng = np.random.default_rng(seed)
    q0 = data.draw(st.integers(0, S - 1))
    nq = data.draw(st.integers(1, S - q0))
    self0 = q0 + data.draw(st.integers(0, 5))  # queries after cached keys (a KV chunk) or not
    own = self0 - q0 + np.arange(S)  # (S,) each query's own key index
    start = np.minimum(rng.integers(0, own.max() + 1, (b, S)), own)
    lo = np.minimum(rng.integers(0, own.max() + 1, (b, S)), own)
    hi = np.minimum(lo + rng.integers(0, 4, (b, S)), own)  # a query always sees itself
    k0 = data.draw(st.integers(0, int(start[:, q0:q0 + nq].min())))
    nk = self0 + nq - k0  # up to the last query's own key
    scale = data.draw(st.floats(0.1, 2.0))
    s = (5 * rng.standard_normal((b, H, nq, nk))).astype(dtype)
    seen = layers.sees(k0 + nk, start[:, q0:q0 + nq], lo[:, q0:q0 + nq], hi[:, q0:q0 + nq], self0)[:, None, :, k0:]
    want = layers.softmax(np.where(seen, s * dtype(scale), -np.inf))
    got = s.copy()
    ck.masked_softmax_(got.reshape(b * H, nq, nk), H, scale, start, lo, hi, q0, self0, k0)
    close(got, want, dtype)
    assert np.all(got[~np.broadcast_to(seen, got.shape)] == 0)


@given(M=st.integers(1, 4), nq=st.integers(1, 6), L=st.integers(1, 9), dtype=DTYPES, seed=seeds)
def test_softmax_backward_kernel_equals_plain(M, nq, L, dtype, seed):
    rng = np.random.default_rng(seed)
    datt, att = rng.standard_normal((M, nq, L)).astype(dtype), rng.random((M, nq, L)).astype(dtype)
    delta = rng.standard_normal((M, nq)).astype(dtype)
    got = datt.copy()
    ck.softmax_backward_(got, att, delta)
    close(got, att * (datt - delta[..., None]), dtype)


@given(M=st.integers(1, 12), V=st.integers(1, 30), dtype=DTYPES, seed=seeds, data=st.data())
def test_logsoftmax_kernels_equal_plain_on_the_rows_given(M, V, dtype, seed, data):
    """lse and lp of rows m0..m1-1 of the scored logits (M, V) (the other rows untouched), and the
    backward in place on those rows: g (onehot - softmax)."""
    m0 = data.draw(st.integers(0, M - 1))
    m1 = data.draw(st.integers(m0 + 1, M))
    rng = np.random.default_rng(seed)
    logits = (4 * rng.standard_normal((M, V))).astype(dtype)
    labels = rng.integers(0, V, M)
    lp = np.full(M, 7, dtype)
    lse = np.full(M, 7, dtype)
    ck.logsoftmax_gather(logits, labels, lp, lse, m0, m1)
    lp0, cache = logprobs.token_logps(logits, labels)
    close(lse[m0:m1], cache["lse"][m0:m1], dtype, scale=10)
    close(lp[m0:m1], lp0[m0:m1], dtype, scale=10)
    assert np.all(lse[:m0] == 7) and np.all(lse[m1:] == 7)
    g = rng.standard_normal(M).astype(dtype)
    d = logits.copy()
    ck.logsoftmax_gather_backward_(d, cache["lse"], labels, g, m0, m1)
    want = logprobs.token_logps_backward(g, cache)
    close(d[m0:m1], want[m0:m1], dtype)
    np.testing.assert_array_equal(d[:m0], logits[:m0])
    np.testing.assert_array_equal(d[m1:], logits[m1:])


@given(V=st.integers(1, 6), M=st.integers(0, 20), C=st.integers(1, 9), dtype=DTYPES, seed=seeds)
def test_scatter_add_rows_accumulates_repeats_as_add_at(V, M, C, dtype, seed):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal((V, C)).astype(dtype)
    idx = rng.integers(0, V, M)  # repeats likely
    values = rng.standard_normal((M, C)).astype(dtype)
    want = target.copy()
    np.add.at(want, idx, values)
    ck.scatter_add_rows(target, idx, values)
    close(target, want, dtype)


def test_a_nan_reaches_the_output_of_every_kernel():
    """No 'nnan' fast-math: a diverged input stays visible to the trainer's finiteness checks."""
    f = np.float32
    x = np.array([1.0, np.nan, -2.0], f)
    y = np.empty_like(x)
    ck.gelu_forward(x, y)
    assert np.isnan(y[1]) and np.isfinite(y[[0, 2]]).all()
    ck.gelu_backward(np.ones_like(x), x, y)
    assert np.isnan(y[1]) and np.isfinite(y[[0, 2]]).all()
    h = np.array([[1.0, np.nan, 3.0], [1.0, 2.0, 3.0]], f)
    out, mean, rstd = np.empty_like(h), np.empty(2, f), np.empty(2, f)
    ck.layernorm_forward(h, np.ones(3, f), np.zeros(3, f), 1e-5, out, mean, rstd)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    s = np.array([[[0.5, np.nan, 0.1], [0.2, 0.3, 0.4]], [[0.5, 0.2, np.nan], [0.2, 0.3, np.nan]]], f)
    z = np.zeros((2, 2), np.int64)
    ck.masked_softmax_(s, 1, 1.0, z, z, z, 0, 1, 0)  # query 0 sees keys 0, 1; query 1 all three
    assert np.isnan(s[0, 0, :2]).all() and s[0, 0, 2] == 0 and np.isfinite(s[0, 1]).all()
    assert np.isfinite(s[1, 0]).all() and s[1, 0, 2] == 0  # the NaN is masked out for query 0
    assert np.isnan(s[1, 1]).all()
    lg = np.array([[0.0, np.nan], [0.0, 1.0]], f)
    lp, lse = np.empty(2, f), np.empty(2, f)
    ck.logsoftmax_gather(lg, np.zeros(2, np.int64), lp, lse, 0, 2)
    assert np.isnan(lse[0]) and np.isfinite(lse[1])


# ----------------------------------------------------------------------------------- runtime.py's switch


def test_fast_uses_the_kernels_only_on_numpy_float_arrays_and_when_on():
    x32 = np.zeros(3, np.float32)
    assert rt.cpu_kernels(x32) is ck and rt.cpu_kernels(x32, np.zeros(2)) is ck
    assert rt.cpu_kernels(np.zeros(3, np.float16)) is None
    assert rt.cpu_kernels(x32, np.zeros(3, np.int64)) is None
    with rt.no_cpu_kernels():
        assert rt.cpu_kernels(x32) is None
    assert rt.cpu_kernels(x32) is ck


def test_gelu_goes_through_the_kernel_and_not_when_off(monkeypatch):
    calls = []
    real = ck.gelu_forward
    monkeypatch.setattr(ck, "gelu_forward", lambda *a: (calls.append(1), real(*a))[1])
    x = np.linspace(-2, 2, 11, dtype=np.float32)
    y = fast.gelu_forward(x)[0]
    assert calls == [1]
    with rt.no_cpu_kernels():
        y2 = fast.gelu_forward(x)[0]
    assert calls == [1]
    np.testing.assert_allclose(y, y2, rtol=1e-6, atol=1e-7)


def test_a_kernel_that_fails_to_run_turns_them_off_with_one_warning(monkeypatch):
    monkeypatch.setattr(rt, "_CK", None)

    def broken(*a):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ck, "gelu_forward", broken)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernels are off.*no compiler"):
        assert rt.cpu_kernels(np.zeros(2, np.float32)) is None
    assert rt.cpu_kernels(np.zeros(2, np.float32)) is None  # decided once


def _run(code: str, **env) -> str:
    e = {**os.environ, **env}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_without_numba_or_with_the_environment_switch_the_numpy_passes_run():
    code = """
        import sys, numpy as np
        from minidpo import fast, runtime
        x = np.linspace(-2, 2, 5, dtype=np.float32)
        print(runtime.cpu_kernels(x) is None, float(fast.gelu_forward(x)[0][0]))
    """
    assert _run(code, MINIDPO_CPU_KERNELS="0").startswith("True -0.04")
    blocked = "import sys; sys.modules['numba'] = None\n" + textwrap.dedent(code)  # import numba fails
    out = _run(blocked)
    assert out.startswith("True -0.04") and _run(blocked + "\nprint(sys.modules['numba'])") .endswith("None")


# ----------------------------------------------------------------------------------- freed memory


def test_keep_freed_memory_stops_the_page_faults_of_a_reused_large_array():
    """A 64 MiB array freed and allocated again: glibc's default maps it afresh (about 16,000 page
    faults to touch it); kept memory is touched again with next to none."""
    code = """
        import resource, sys, numpy as np
        from minidpo import runtime
        runtime.set_hugepage_advice(False)
        if sys.argv[1] == "keep" and not runtime.keep_freed_memory(True):
            print("unsupported"); raise SystemExit
        def touch():
            a = np.empty(16 << 20, np.float32); a.fill(1.0); del a
        touch()
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touch()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    """
    def faults(mode):
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), mode], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    kept = faults("keep")
    if kept == "unsupported":
        pytest.skip("not glibc: runtime.keep_freed_memory does nothing here")
    assert int(faults("default")) > 10_000 and int(kept) < 100
