"""The fused CuPy kernels (minidpo/kernels.py) and their twins, the plain functions.

Without a GPU: the twins are checked against independent definitions, the module is shown not
to import CuPy, and every CUDA source is compiled with nvcc (skipped when nvcc is absent).
@requires_cuda: every kernel against its plain twin, both run on CuPy arrays, in float32 and
float64, and the model with kernels against the model without. On a GPU that runs the CUDA C;
elsewhere the strict CuPy stand-in checks each launch (grid, block, argument types and widths)
and runs its own array-code twin of the kernel in place of the CUDA C, so these check everything
around the CUDA C, which only a GPU runs.
"""

import math
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from minidpo import kernels
from minidpo.fast import attention_forward, gelu_forward, layernorm_forward, sequence_logps, sequence_logps_backward
from minidpo.optim import AdamW
from tests.conftest import requires_cuda

# ------------------------------------------------------------------------------- no GPU needed


def test_importing_minidpo_does_not_import_cupy():
    code = ("import sys, minidpo.kernels, minidpo.layers, minidpo.model, minidpo.optim, minidpo.logprobs, "
            "minidpo.fast, minidpo.train; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_use_is_false_for_numpy_and_disabled_restores_itself():
    x = np.ones(3, dtype=np.float32)
    assert not kernels.use(x)
    assert kernels._ENABLED
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.disabled():
            assert not kernels._ENABLED
            raise RuntimeError("boom")
    assert kernels._ENABLED


def test_every_kernel_has_a_twin_and_a_source_for_both_dtypes():
    srcs = kernels.cuda_sources()
    for name in list(kernels.RAW_SOURCES) + list(kernels.ELEMENTWISE_SOURCES) + list(kernels.REDUCTION_SOURCES):
        assert f"{name}_f32" in srcs and f"{name}_f64" in srcs
    assert "typedef float real;" in srcs["masked_softmax_f32"] and "typedef double real;" in srcs["masked_softmax_f64"]
    for kernel, twin in kernels.TWINS.values():
        assert callable(kernel) and callable(twin)


def _layout_rows(rng, B, S):
    """start, hidden_lo, hidden_hi (B, S) as a shared-prompt layout makes them: query q sees keys
    start..q but not a hidden range inside it (every query still sees itself)."""
    own = np.arange(S)
    start = np.minimum(rng.integers(0, S, (B, S)), own)
    lo = np.minimum(rng.integers(0, S, (B, S)), own)
    hi = np.minimum(lo + rng.integers(0, 4, (B, S)), own)  # never past the query itself
    return start, lo, hi


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_twin_masked_softmax_is_the_softmax_over_the_visible_keys(dtype):
    """kernels.masked_softmax_'s twin, against the rule written out one query at a time: a block
    of queries q0.. (own key index self0 + i) over keys k0.., each seeing start <= j <= its own
    index, less its hidden range."""
    rng = np.random.default_rng(0)
    B, H, S, nq, nk, q0, k0 = 2, 3, 12, 4, 7, 5, 3
    self0 = q0
    start, lo, hi = _layout_rows(rng, B, S)
    start = np.maximum(start, k0)  # the block holds every key its queries may see
    s = rng.standard_normal((B, H, nq, nk)).astype(dtype)
    scale = 0.37
    want = np.zeros_like(s, dtype=np.float64)
    for b in range(B):
        for i in range(nq):
            q = q0 + i
            keys = [j for j in range(k0, k0 + nk) if start[b, q] <= j <= self0 + i and not lo[b, q] <= j < hi[b, q]]
            z = scale * s[b, :, i, [j - k0 for j in keys]].astype(np.float64).T  # (H, visible)
            e = np.exp(z - z.max(-1, keepdims=True))
            want[b, :, i, [j - k0 for j in keys]] = (e / e.sum(-1, keepdims=True)).T
    got = kernels._twin_masked_softmax_(s.copy(), scale, start, lo, hi, q0, self0, k0)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-7)


def test_twin_logsoftmax_backward_is_token_logps_backward():
    from minidpo.logprobs import token_logps, token_logps_backward

    rng = np.random.default_rng(1)
    M, V = 13, 11
    logits = rng.standard_normal((M, V))
    labels = rng.integers(0, V, M)
    g = rng.standard_normal(M)
    _, cache = token_logps(logits, labels)
    want = token_logps_backward(g, cache)
    got = kernels._twin_logsoftmax_gather_backward(logits, cache["lse"], labels, g)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    lp, lse = kernels._twin_logsoftmax_gather(logits, labels)
    np.testing.assert_allclose(lse, cache["lse"], rtol=1e-13)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, ref[np.arange(M), labels], rtol=1e-12)


def test_twin_adamw_is_the_optimizer_step():
    rng = np.random.default_rng(2)
    params = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    opt = AdamW({k: v.copy() for k, v in params.items()}, lr=1e-2, weight_decay=0.1)
    p1 = {k: v.copy() for k, v in params.items()}
    opt.step(p1, grads)
    p2 = {k: v.copy() for k, v in params.items()}
    ms = [np.zeros_like(v) for v in p2.values()]
    vs = [np.zeros_like(v) for v in p2.values()]
    b1, b2 = opt.beta1, opt.beta2
    twin = kernels.TWINS["adamw_multi_tensor"][1]
    twin(list(p2.values()), list(grads.values()), ms, vs, [True, False], b1, b2, opt.eps, 1e-2 / (1 - b1),
         math.sqrt(1 - b2), 1e-2 * 0.1)
    for k in params:
        np.testing.assert_array_equal(p2[k], p1[k])
        assert not np.array_equal(p2[k], params[k])


def test_elementwise_and_reduction_wrappers_bind_params_like_cupy():
    src = kernels._elementwise_unit(kernels.SOFTMAX_BACKWARD, "float")
    assert "const T att = _in_att[i];" in src and "T& ds = _out_ds[i];" in src
    src = kernels._reduction_unit(kernels.LAYERNORM_DW, "double")
    assert "typedef double T;" in src and "a = (a + b)" in src and "dw = a" in src


NVCC = shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_every_cuda_source_compiles_with_nvcc(tmp_path):
    """Every RawKernel source as it is, and every ElementwiseKernel/ReductionKernel body wrapped
    in an equivalent __global__ function, in float and double; warnings are errors."""
    srcs = kernels.cuda_sources()

    def compile_one(item):
        name, src = item
        path = tmp_path / f"{name}.cu"
        path.write_text(src)
        r = subprocess.run([NVCC, "-c", "-arch=sm_80", "-Werror", "all-warnings", "-o", str(tmp_path / f"{name}.o"),
                            str(path)], capture_output=True, text=True)
        return name, r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(compile_one, sorted(srcs.items())))
    failed = [f"{name}:\n{log}" for name, rc, log in results if rc != 0]
    assert not failed, "\n\n".join(failed)
    assert len(results) == len(srcs) >= 18


# ------------------------------------------------------------------------------- on a GPU


def _cp():
    import cupy

    return cupy


def _close(a, b, dtype, rtol32=2e-5, atol32=2e-6):
    a, b = _cp().asnumpy(a), _cp().asnumpy(b)
    assert a.dtype == b.dtype == dtype
    if dtype == np.float64:
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    else:
        np.testing.assert_allclose(a, b, rtol=rtol32, atol=atol32)


DTYPES = [np.float32, np.float64]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 64), (2, 33, 3072)])
def test_cuda_gelu_matches_twin(dtype, shape):  # pragma: no cover - needs a GPU
    cp = _cp()
    rng = np.random.default_rng(0)
    x = cp.asarray((3 * rng.standard_normal(shape)).astype(dtype))
    dy = cp.asarray(rng.standard_normal(shape).astype(dtype))
    _close(kernels.gelu_forward(x), kernels._twin_gelu_forward(x), dtype)
    _close(kernels.gelu_backward(dy, x), kernels._twin_gelu_backward(dy, x), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", [(1, 5), (37, 128), (300, 768), (4, 1500)])
def test_cuda_layernorm_matches_twin(dtype, N, C):  # pragma: no cover - needs a GPU
    cp = _cp()
    rng = np.random.default_rng(1)
    x = cp.asarray((rng.standard_normal((N, C)) * 3 + 1).astype(dtype))
    w = cp.asarray(rng.standard_normal(C).astype(dtype))
    b = cp.asarray(rng.standard_normal(C).astype(dtype))
    dy = cp.asarray(rng.standard_normal((N, C)).astype(dtype))
    y, mean, rstd = kernels.layernorm_forward(x, w, b, 1e-5)
    y2, mean2, rstd2 = kernels._twin_layernorm_forward(x, w, b, 1e-5)
    for a, b_ in ((y, y2), (mean, mean2), (rstd, rstd2)):
        _close(a, b_, dtype, rtol32=1e-4, atol32=1e-5)
    out = kernels.layernorm_backward(dy, x, w, mean2, rstd2)
    want = kernels._twin_layernorm_backward(dy, x, w, mean2, rstd2)
    for a, b_ in zip(out, want):
        _close(a, b_, dtype, rtol32=1e-4, atol32=1e-4)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,nq,nk,S,q0,self0,k0", [(2, 3, 1, 1, 1, 0, 0, 0), (2, 4, 17, 17, 17, 0, 0, 0),
                                                     (1, 2, 5, 40, 5, 0, 35, 0), (2, 12, 100, 300, 300, 200, 200, 0),
                                                     (3, 2, 9, 12, 40, 20, 20, 17)])
def test_cuda_masked_softmax_and_backward_match_twins(dtype, B, H, nq, nk, S, q0, self0, k0):  # pragma: no cover
    """Causal blocks, a KV-cache chunk (queries after 35 cached keys), a late block of a long row,
    and a packed shared-prompt block (keys from 17, hidden ranges): the kernel equals its twin,
    and the keys a query does not see get exactly 0."""
    cp = _cp()
    rng = np.random.default_rng(2)
    start, lo, hi = _layout_rows(rng, B, S)
    own = self0 - q0 + np.arange(S)  # every query's own key index
    start = np.clip(np.maximum(start - q0 + self0, k0), 0, own)
    lo, hi = lo - q0 + self0, hi - q0 + self0
    if k0 == 0 and self0 == q0 == 0 and S == nk:  # a plain causal block: nothing hidden, from key 0
        start, lo, hi = (np.zeros((B, S), np.int64),) * 3
    d = [cp.asarray(a.astype(np.int64)) for a in (start, lo, hi)]
    s = cp.asarray((4 * rng.standard_normal((B, H, nq, nk))).astype(dtype))
    scale = 1 / math.sqrt(64)
    att = kernels.masked_softmax_(s.copy(), scale, *d, q0, self0, k0)
    want = kernels._twin_masked_softmax_(s.copy(), scale, *d, q0, self0, k0)
    _close(att, want, dtype)
    assert bool((cp.where(want == 0, att, 0) == 0).all())  # exactly zero where a key is not seen
    datt = cp.asarray(rng.standard_normal((B, H, nq, nk)).astype(dtype))
    delta = (datt * att).sum(-1, keepdims=True)
    _close(kernels.softmax_backward_(datt.copy(), att, delta),
           kernels._twin_softmax_backward_(datt.copy(), att, delta), dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,V", [(1, 1), (27, 50), (34, 50257)])
def test_cuda_logsoftmax_gather_and_backward_match_twins(dtype, M, V):  # pragma: no cover - needs a GPU
    cp = _cp()
    rng = np.random.default_rng(3)
    logits = cp.asarray((5 * rng.standard_normal((M, V))).astype(dtype))
    labels = cp.asarray(rng.integers(0, V, M))
    g = cp.asarray(rng.standard_normal(M).astype(dtype))
    lp, lse = kernels.logsoftmax_gather(logits, labels)
    lp2, lse2 = kernels._twin_logsoftmax_gather(logits, labels)
    _close(lse, lse2, dtype, rtol32=1e-5, atol32=1e-5)
    _close(lp, lp2, dtype, rtol32=1e-5, atol32=1e-5)
    want = kernels._twin_logsoftmax_gather_backward(logits, lse2, labels, g)
    _close(kernels.logsoftmax_gather_backward(logits, lse2, labels, g), want, dtype)
    inplace = logits.copy()
    out = kernels.logsoftmax_gather_backward(inplace, lse2, labels, g, out=inplace)
    assert out is inplace
    _close(out, want, dtype)


@requires_cuda
def test_cuda_logsoftmax_gather_handles_masked_rows():  # pragma: no cover - needs a GPU
    cp = _cp()
    logits = cp.zeros((2, 4), dtype=np.float32)
    logits[0] = -np.inf
    logits[1, 2] = np.inf
    labels = cp.zeros(2, dtype=cp.int64)
    lp, lse = kernels.logsoftmax_gather(logits, labels)
    lp2, lse2 = kernels._twin_logsoftmax_gather(logits, labels)
    np.testing.assert_array_equal(cp.asnumpy(lse), cp.asnumpy(lse2))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_adamw_multi_tensor_matches_twin(dtype):  # pragma: no cover - needs a GPU
    cp = _cp()
    rng = np.random.default_rng(4)
    shapes = [(1,), (7, 3), (513,), (64, 65), (2, 3, 4)]
    p = [cp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]
    p2 = [a.copy() for a in p]
    ms = [cp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]
    vs = [cp.asarray(rng.random(s).astype(dtype)) for s in shapes]
    ms2, vs2 = [a.copy() for a in ms], [a.copy() for a in vs]
    g = [cp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]
    g[1] = cp.asfortranarray(g[1])  # a non-contiguous gradient is accepted
    decay = [True, False, True, False, True]
    args = (0.9, 0.95, 1e-8, 3e-3, 0.7, 1e-3)
    kernels.adamw_multi_tensor(p, g, ms, vs, decay, *args)
    kernels.TWINS["adamw_multi_tensor"][1](p2, g, ms2, vs2, decay, *args)
    for a, b in zip(p + ms + vs, p2 + ms2 + vs2):
        _close(a, b, dtype, rtol32=1e-5, atol32=1e-6)


@requires_cuda
def test_cuda_layers_dispatch_to_kernels(monkeypatch):  # pragma: no cover - needs a GPU
    cp = _cp()
    calls = []
    for name in ("gelu_forward", "layernorm_forward", "masked_softmax_"):
        f = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=f, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    x = cp.ones((2, 4, 6), dtype=np.float32)
    gelu_forward(x)
    layernorm_forward(x, cp.ones(6, np.float32), cp.zeros(6, np.float32))
    attention_forward(cp.ones((2, 4, 18), dtype=np.float32), 2)
    assert calls == ["gelu_forward", "layernorm_forward", "masked_softmax_"]
    calls.clear()
    with kernels.disabled():
        gelu_forward(x)
    assert calls == []


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 2e-4)])
@pytest.mark.parametrize("share,pack", [(False, False), (True, True)], ids=["padded", "shared_packed"])
def test_cuda_model_with_kernels_matches_array_code(dtype, tol, share, pack):  # pragma: no cover - needs a GPU
    """gpt_forward -> sequence_logps -> backward -> gpt_backward -> AdamW, kernels on vs off, on the
    padded and the default (shared-prompt, packed) layout."""
    cp = _cp()
    from minidpo.model import GPTConfig, gpt_backward, gpt_forward, init_params
    from minidpo.packing import pack_preferences

    cfg = GPTConfig(vocab_size=97, n_ctx=48, n_layer=2, n_head=3, n_embd=48)
    rng = np.random.default_rng(5)
    ids = lambda k: [int(t) for t in rng.integers(1, cfg.vocab_size, k)]  # noqa: E731
    pairs = [(ids(int(rng.integers(1, 9))), ids(int(rng.integers(1, 9))), ids(int(rng.integers(1, 9))))
             for _ in range(4)]
    batch = pack_preferences(pairs, 0, share, pack, backend="cuda")
    dlogps = cp.asarray(rng.standard_normal(8).astype(dtype))
    out = []
    for enabled in (True, False):
        params = init_params(cfg, "cuda", seed=1, dtype=dtype)
        opt = AdamW(params, lr=1e-3, weight_decay=0.1)
        ctx = kernels.disabled() if not enabled else _null()
        with ctx:
            logits, cache = gpt_forward(params, batch.input_ids, cfg, batch.layout, logits_at=batch.logits_at)
            logps, lpc = sequence_logps(logits, batch.labels, batch.weights(dtype))
            grads = gpt_backward(sequence_logps_backward(dlogps, lpc), cache)
            opt.step(params, grads)
        out.append((logps, grads, params))
    (l1, g1, p1), (l2, g2, p2) = out
    np.testing.assert_allclose(cp.asnumpy(l1), cp.asnumpy(l2), rtol=tol, atol=tol)
    for k in g1:
        scale = float(cp.abs(g2[k]).max()) + 1e-12
        np.testing.assert_allclose(cp.asnumpy(g1[k]) / scale, cp.asnumpy(g2[k]) / scale, atol=tol, err_msg=k)
        if dtype == np.float64:  # AdamW's first step is ~lr * sign(g): float32 round-off may flip a tiny g
            np.testing.assert_allclose(cp.asnumpy(p1[k]), cp.asnumpy(p2[k]), rtol=tol, atol=tol, err_msg=k)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------ the causal skip changes no number (fast.py)


@pytest.mark.parametrize("blocks", [[(0, 3), (3, 4), (4, 9)], [(0, 1), (1, 9)], [(0, 5), (5, 9)]])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_query_blocks_give_the_same_numbers(monkeypatch, blocks, packed):
    """The causal skip (queries in blocks, each scored only against the keys it can see: for packed
    rows from its sequences' start) gives the whole-matrix attention's output and gradient
    (float64, to round-off)."""
    import dataclasses

    from minidpo import fast as layers
    from minidpo.packing import pack_preferences

    rng = np.random.default_rng(8)
    T, H, D = 9, 3, 4
    layout = None
    if packed:  # two shared-prompt pairs in one row of 9: keys of the second from position 4
        layout = pack_preferences([([1, 2], [3], [4]), ([5, 6], [7, 8], [9])], 0, pack_length=9).layout
        assert layout.shape == (1, 9)
    B = 1 if packed else 2
    qkv = rng.standard_normal((B, T, 3 * H * D))
    dy = rng.standard_normal((B, T, H * D))
    y1, c1 = layers.attention_forward(qkv, H, layout)
    d1, _ = layers.attention_backward(dy, c1)
    start = np.zeros((B, T), np.int64) if layout is None else layout.start
    chosen = tuple((i0, i1, int(start[:, i0:i1].min())) for i0, i1 in blocks)
    if packed:
        layout = dataclasses.replace(layout, blocks=chosen)
    else:
        monkeypatch.setattr(layers, "_causal_blocks", lambda t: chosen if t == T else ((0, t, 0),))
    y2, c2 = layers.attention_forward(qkv, H, layout)
    d2, _ = layers.attention_backward(dy, c2)
    assert [a.shape[2:] for a in c2[3]] == [(i1 - i0, i1 - k0) for i0, i1, k0 in chosen]
    np.testing.assert_allclose(y2, y1, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(d2, d1, rtol=1e-12, atol=1e-13)


def test_kv_forward_with_query_blocks_matches_the_full_forward(monkeypatch):
    """The KV-cache forward takes the causal skip too (chunks fed after a cached prefix)."""
    from minidpo import fast as layers
    from minidpo.model import GPTConfig, gpt_forward, gpt_forward_kv, init_params

    cfg = GPTConfig(vocab_size=31, n_ctx=12, n_layer=2, n_head=2, n_embd=8)
    params = init_params(cfg, seed=4, dtype=np.float64)
    idx = np.random.default_rng(9).integers(0, cfg.vocab_size, (3, 11))
    want, _ = gpt_forward(params, idx, cfg)
    monkeypatch.setattr(layers, "_causal_blocks", lambda t: ((0, 1, 0), (1, 3, 0), (3, t, 0)) if t >= 4 else ((0, t, 0),))
    first, kv = gpt_forward_kv(params, idx[:, :6], cfg)
    second, kv = gpt_forward_kv(params, idx[:, 6:], cfg, kv)
    third, _ = gpt_forward_kv(params, idx, cfg)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(third, want, rtol=1e-10, atol=1e-12)


def test_every_kernel_constructs_with_real_cupy():
    """Regression: the ElementwiseKernel specs used ``body=``, which CuPy's constructor does not
    take (its keyword is ``operation``), so every CuPy forward died at the first GELU. Building a
    kernel object compiles nothing, so this runs with real CuPy on a machine without a GPU."""
    cupy = pytest.importorskip("cupy")
    K = kernels
    for name, spec in K.ELEMENTWISE_SOURCES.items():
        assert isinstance(cupy.ElementwiseKernel(**spec), cupy.ElementwiseKernel), name
    for name, spec in K.REDUCTION_SOURCES.items():
        assert isinstance(cupy.ReductionKernel(**spec), cupy.ReductionKernel), name
    for name, (_, entry) in K.RAW_SOURCES.items():
        for dtype in ("float32", "float64"):
            assert isinstance(cupy.RawKernel(K.raw_source(name, dtype), entry), cupy.RawKernel), name
