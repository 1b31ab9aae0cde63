"""The fast paths (minidpo/fast.py) against the plain reference (layers.py, logprobs.py).

Every fast function is called with the same arguments as its plain twin, on drawn shapes (odd
sizes included) in float32 and float64, with the fast path's blocking made small enough that
drawn shapes cross block edges (GELU blocks, log-softmax pieces, attention query blocks). The
backwards are compared on the same upstream gradient. Then the switch: the model, a training
step and a whole run on either path, and the fast path's own memory options.
"""

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo import fast, layers, logprobs
from minidpo import runtime as rt
from minidpo.model import GPTConfig, gpt_backward, gpt_forward, gpt_forward_kv, init_params
from minidpo.packing import causal_layout, layout_from_attention_mask, pack_preferences, query_blocks

DTYPES = st.sampled_from([np.float32, np.float64])


def pytest_generate_tests(metafunc):
    """Every test here runs on the fast path's NumPy passes and, where Numba is installed, on its
    compiled CPU kernels; a test marked ``numpy_passes`` (it checks the NumPy passes' blocking)
    on the NumPy passes only."""
    if "cpu_path" in metafunc.fixturenames:
        only_numpy = metafunc.definition.get_closest_marker("numpy_passes") is not None
        metafunc.parametrize("cpu_path", ["numpy"] if only_numpy else ["numpy", "kernels"], indirect=True)


@pytest.fixture(autouse=True)
def cpu_path(request):
    if request.param == "numpy":
        with rt.no_cpu_kernels():
            yield
        return
    pytest.importorskip("numba", reason="the compiled CPU kernels need Numba (pip install minidpo[fast])")
    old = rt.set_cpu_kernels(True)
    old_gemm = rt.set_gemm("mkl")  # MKL's GEMM wherever it is installed, whatever its calibration here
    try:
        assert rt.cpu_kernels() is not None
        with mock.patch.object(fast, "_MKL_ATTENTION_T", 1):  # MKL's batched GEMM (if installed) at every T
            yield
    finally:
        rt.set_cpu_kernels(old)
        rt.set_gemm(old_gemm)
seeds = st.integers(0, 2**32 - 1)


def same(got, want, dtype, scale=1.0):
    """Bit for bit where both sides multiply with NumPy; to round-off where the fast path's
    products go through MKL's GEMM (mkl_blas.py)."""
    if rt.gemm_lib() is None:
        np.testing.assert_array_equal(got, want)
    else:
        close(got, want, dtype, scale)


def close(got, want, dtype, scale=1.0):
    assert got.dtype == want.dtype == dtype, (got.dtype, want.dtype, dtype)
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * scale)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * scale)


@contextlib.contextmanager
def small_blocks(gelu_block=7, piece=13, query_blocks=3):
    """Shrink the fast path's blocking so small arrays are cut into several pieces (a layout's own
    query blocks are drawn where the layout is made: :func:`random_layout`)."""
    def qb(T):
        n = max(1, min(query_blocks, T))
        edges = [round(j * T / n) for j in range(n + 1)]
        return tuple((i0, i1, 0) for i0, i1 in zip(edges[:-1], edges[1:]))

    with mock.patch.object(rt, "BLOCK", gelu_block), mock.patch.object(fast, "_PIECE", piece), \
            mock.patch.object(fast, "_causal_blocks", qb):
        yield


blocking = st.fixed_dictionaries({"gelu_block": st.integers(1, 40), "piece": st.integers(1, 60),
                                  "query_blocks": st.integers(1, 4)})


@st.composite
def random_layout(draw, max_pairs=4, max_len=6):
    """A batch layout as training makes them (packing.pack_preferences), from drawn pairs: one-token
    responses, a shared prompt whose last position predicts two first tokens, rows holding one
    sequence (pack=False), rows packed full to the last position (pack_length = the tokens in all),
    query blocks of a drawn size. Or the causal layout (None). Returns (layout or None, R, L)."""
    import dataclasses

    kind = draw(st.sampled_from(["causal", "padded", "shared", "packed", "shared_packed", "full"]))
    if kind == "causal":
        return None, draw(st.integers(1, 3)), draw(st.integers(1, 9))
    n = draw(st.integers(1, max_pairs))
    length = st.integers(1, max_len)
    pairs = [([1] * draw(length), [2] * draw(length), [3] * draw(length)) for _ in range(n)]
    share = kind in ("shared", "shared_packed", "full")
    pack = kind in ("packed", "shared_packed", "full")
    total = sum(len(x) + len(w) + len(r) for x, w, r in pairs) if share else \
        sum(2 * len(x) + len(w) + len(r) for x, w, r in pairs)
    batch = pack_preferences(pairs, 0, share, pack, pack_length=total if kind == "full" else None)
    layout = batch.layout
    block = draw(st.integers(1, 8))
    layout = dataclasses.replace(layout, blocks=query_blocks(np.asarray(layout.start), block))
    R, L = batch.shape
    if kind == "full":
        assert R == 1 and batch.n_tokens == L  # one row, full to its last position
    return layout, R, L


# ----------------------------------------------------------------------------------- layers


@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), dtype=DTYPES, seed=seeds, blocks=blocking)
def test_gelu_fast_equals_plain(shape, dtype, seed, blocks):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    with small_blocks(**blocks):
        y, c = fast.gelu_forward(x)
        dx, g = fast.gelu_backward(dy, c)
    y0, c0 = layers.gelu_forward(x)
    dx0, g0 = layers.gelu_backward(dy, c0)
    close(y, y0, dtype)
    close(dx, dx0, dtype)
    assert g == g0 == {}


@given(B=st.integers(1, 3), T=st.integers(1, 5), C=st.integers(1, 9), dtype=DTYPES, seed=seeds)
def test_layernorm_fast_equals_plain(B, T, C, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((B, T, C)) + 1).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal((B, T, C)).astype(dtype)
    y, c = fast.layernorm_forward(x, w, b, 1e-5)
    y0, c0 = layers.layernorm_forward(x, w, b, 1e-5)
    close(y, y0, dtype, scale=10)
    for got, want in zip(c[2:], c0[2:]):  # mean, rstd
        close(got.reshape(-1), want.reshape(-1), dtype, scale=10)
    dx, g = fast.layernorm_backward(dy, c)
    dx0, g0 = layers.layernorm_backward(dy, c0)
    close(dx, dx0, dtype, scale=100)
    close(g["w"], g0["w"], dtype, scale=10)
    close(g["b"], g0["b"], dtype, scale=10)


@given(B=st.integers(1, 3), T=st.integers(1, 5), cin=st.integers(1, 7), cout=st.integers(1, 7), bias=st.booleans(),
       dtype=DTYPES, seed=seeds)
def test_linear_fast_equals_plain(B, T, cin, cout, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, cin)).astype(dtype)
    w = rng.standard_normal((cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if bias else None
    y, c = fast.linear_forward(x, w, b)
    y0, c0 = layers.linear_forward(x, w, b)
    same(y, y0, dtype, scale=10)  # the same matmul; the bias added in place or not
    dy = rng.standard_normal(y.shape).astype(dtype)
    (dx, g), (dx0, g0) = fast.linear_backward(dy, c), layers.linear_backward(dy, c0)
    same(dx, dx0, dtype, scale=10)
    for k in ("w", "b"):
        assert (g[k] is None) == (g0[k] is None)
        if g[k] is not None:
            same(g[k], g0[k], dtype, scale=10)


@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(1, 5), C=st.integers(1, 4),
       pos_mode=st.sampled_from(["none", "shared", "per_row"]), dtype=DTYPES, seed=seeds)
def test_embedding_fast_equals_plain(B, T, V, C, pos_mode, dtype, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (B, T))
    wte, wpe = rng.standard_normal((V, C)).astype(dtype), rng.standard_normal((T + 2, C)).astype(dtype)
    pos = {"none": None, "shared": rng.integers(0, T + 2, T), "per_row": rng.integers(0, T + 2, (B, T))}[pos_mode]
    x, c = fast.embedding_forward(idx, wte, wpe, pos)
    x0, c0 = layers.embedding_forward(idx, wte, wpe, pos)
    np.testing.assert_array_equal(x, x0)
    dx = rng.standard_normal((B, T, C)).astype(dtype)
    g, g0 = fast.embedding_backward(dx, c)[1], layers.embedding_backward(dx, c0)[1]
    close(g["wte"], g0["wte"], dtype, scale=10)
    close(g["wpe"], g0["wpe"], dtype, scale=10)


@given(lay=random_layout(), H=st.integers(1, 3), D=st.integers(1, 5), dtype=DTYPES, seed=seeds, blocks=blocking)
def test_attention_fast_equals_plain(lay, H, D, dtype, seed, blocks):
    """On every layout (causal, padded, shared prompts, packed rows; query blocks of any size) the
    block-by-block attention with the layout's mask applied inside the softmax gives the plain
    attention, whose mask is layers.sees in one line."""
    layout, B, T = lay
    rng = np.random.default_rng(seed)
    qkv = (2 * rng.standard_normal((B, T, 3 * H * D))).astype(dtype)
    dy = rng.standard_normal((B, T, H * D)).astype(dtype)
    with small_blocks(**blocks):
        y, c = fast.attention_forward(qkv, H, layout)
        dqkv, _ = fast.attention_backward(dy, c)
    y0, c0 = layers.attention_forward(qkv, H, layout)
    dqkv0, _ = layers.attention_backward(dy, c0)
    close(y, y0, dtype, scale=10)
    close(dqkv, dqkv0, dtype, scale=10)


@given(B=st.integers(1, 2), T=st.integers(1, 9), H=st.integers(1, 2), D=st.integers(1, 4), padded=st.booleans(),
       dtype=DTYPES, seed=seeds, blocks=blocking, data=st.data())
def test_attention_kv_fast_equals_plain(B, T, H, D, padded, dtype, seed, blocks, data):
    """The KV-cache attention, fed in drawn chunks, with left-padded rows (each new query's first
    visible key, ``start``) or none."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D)).astype(dtype)
    first = rng.integers(0, T, B) if padded else np.zeros(B, np.int64)  # each row's first real token
    own = np.arange(T)
    start = np.where(own[None, :] >= first[:, None], first[:, None], own[None, :])  # a pad sees itself
    caches = {impl: (np.zeros((B, H, T, D), dtype), np.zeros((B, H, T, D), dtype)) for impl in ("fast", "plain")}
    offset = 0
    while offset < T:
        n = data.draw(st.integers(1, T - offset))
        st_ = start[:, offset : offset + n] if padded else None
        with small_blocks(**blocks):
            y = fast.attention_forward_kv(qkv[:, offset : offset + n], H, *caches["fast"], offset, st_)
        y0 = layers.attention_forward_kv(qkv[:, offset : offset + n], H, *caches["plain"], offset, st_)
        close(y, y0, dtype, scale=10)
        offset += n


def test_fast_causal_bias_is_reused_and_read_only():
    b1 = fast._causal_bias(np, np.float32, 5, 7, 2)
    assert b1 is fast._causal_bias(np, np.float32, 5, 7, 2) and not b1.flags.writeable
    np.testing.assert_array_equal(b1 == 0, layers.sees(7, offset=2, n_queries=5))


@given(B=st.integers(1, 4), T=st.integers(1, 7), dtype=DTYPES, seed=seeds)
def test_unembed_and_softmax_fast_equal_plain(B, T, dtype, seed):
    rng = np.random.default_rng(seed)
    s = (5 * rng.standard_normal((B, T, 6))).astype(dtype)
    close(fast.softmax(s), layers.softmax(s), dtype)
    x, wte = rng.standard_normal((B, T, 3)).astype(dtype), rng.standard_normal((6, 3)).astype(dtype)
    same(fast.unembed_forward(x, wte)[0], layers.unembed_forward(x, wte)[0], dtype, scale=10)


# ----------------------------------------------------------------------------------- log pi(y|x)


@st.composite
def lp_batches(draw):
    """Scored tokens as a batch gives them: logits (M, V), labels (M,), weights (E, M), dlogps (E,)."""
    E, V = draw(st.integers(1, 4)), draw(st.integers(1, 11))
    M = draw(st.integers(E, 3 * E + 4))
    dtype = draw(DTYPES)
    average = draw(st.booleans())
    rng = np.random.default_rng(draw(seeds))
    logits = (3 * rng.standard_normal((M, V))).astype(dtype)
    labels = rng.integers(0, V, M)
    example = np.concatenate([np.arange(E), rng.integers(0, E, M - E)])
    counts = np.bincount(example, minlength=E)
    w = np.zeros((E, M), dtype=dtype)
    w[example, np.arange(M)] = 1.0 / counts[example] if average else 1.0
    return logits, labels, w, rng.standard_normal(E).astype(dtype)


@given(batch=lp_batches(), overwrite=st.booleans(), blocks=blocking)
def test_sequence_logps_fast_equals_plain(batch, overwrite, blocks):
    logits, labels, w, dlogps = batch
    dtype = logits.dtype.type
    with small_blocks(**blocks):
        lp, c = fast.sequence_logps(logits.copy(), labels, w)
        d = fast.sequence_logps_backward(dlogps, c, overwrite_logits=overwrite)
    lp0, c0 = logprobs.sequence_logps(logits, labels, w)
    d0 = logprobs.sequence_logps_backward(dlogps, c0)
    close(lp, lp0, dtype, scale=10)
    close(d, d0, dtype)
    np.testing.assert_array_equal(c["labels"], c0["labels"])
    close(c["lse"], c0["lse"], dtype, scale=10)


@pytest.mark.numpy_passes
@pytest.mark.parametrize("piece", [1, 24, 64, 128, 10**9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logprobs_pieces_give_identical_numbers(monkeypatch, piece, dtype):
    """Every piece size of the fast log-softmax (one row, several rows, everything) gives
    bit-identical results."""
    rng = np.random.default_rng(6)
    M, V, E = 19, 8, 3
    logits = (3 * rng.standard_normal((M, V))).astype(dtype)
    labels = rng.integers(0, V, M)
    w = np.zeros((E, M), dtype=dtype)
    w[np.arange(M) % E, np.arange(M)] = 0.25
    dlogps = rng.standard_normal(E).astype(dtype)
    results = []
    for size in (10**9, piece):
        monkeypatch.setattr(fast, "_PIECE", size)
        lp, cache = fast.sequence_logps(logits, labels, w)
        d = fast.sequence_logps_backward(dlogps, cache)
        d2 = fast.sequence_logps_backward(dlogps, {**cache, "logits": logits.copy()}, overwrite_logits=True)
        results.append((lp, cache["lse"], d, d2))
    for a, b in zip(*results):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0][2], results[0][3])  # overwrite_logits: the same numbers


@pytest.mark.numpy_passes
@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_blocks_give_identical_numbers(monkeypatch, block, dtype):
    rng = np.random.default_rng(7)
    x = (3 * rng.standard_normal((4, 7, 11))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    xt, dyt = x.transpose(2, 0, 1), dy.transpose(2, 0, 1)  # non-contiguous inputs too
    run = lambda: [fast.gelu_forward(x)[0], fast.gelu_backward(dy, x)[0], fast.gelu_forward(xt)[0],  # noqa: E731
                   fast.gelu_backward(dyt, xt)[0]]
    want = run()
    monkeypatch.setattr(rt, "BLOCK", block)
    got = run()
    for a, b in zip(got, want):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got[2], got[0].transpose(2, 0, 1))


@given(R=st.integers(1, 3), L=st.integers(1, 1100), block=st.sampled_from([1, 7, 64]), seed=seeds)
def test_query_blocks_cover_every_query_and_its_keys(R, L, block, seed):
    """packing.query_blocks: L // block blocks (1 to 8) covering the queries once, in order; each
    block's first key k0 is the earliest key any of its queries sees (none is skipped)."""
    rng = np.random.default_rng(seed)
    start = np.minimum(rng.integers(0, L, (R, L)), np.arange(L))  # a query sees no later key
    bl = query_blocks(start, block)
    assert bl[0][0] == 0 and bl[-1][1] == L and all(a[1] == b[0] for a, b in zip(bl, bl[1:]))
    assert all(i1 > i0 for i0, i1, _ in bl) and len(bl) == max(1, min(8, L // block))
    assert all(k0 == start[:, i0:i1].min() for i0, i1, k0 in bl)
    assert [b[2] for b in fast._causal_blocks(L)] == [0] * len(fast._causal_blocks(L))


# ----------------------------------------------------------------------------------- the switch

CFG = GPTConfig(vocab_size=37, n_ctx=16, n_layer=2, n_head=2, n_embd=12)


def test_the_switch_picks_the_functions_and_restores_itself():
    assert fast.ops() is fast.FAST and not fast.is_plain()
    with fast.plain():
        assert fast.ops() is fast.PLAIN and fast.ops().gelu_forward is layers.gelu_forward
        with fast.plain(False):
            assert fast.ops() is fast.FAST
        assert fast.ops().sequence_logps is logprobs.sequence_logps
    assert fast.ops() is fast.FAST and fast.ops().gelu_forward is fast.gelu_forward
    assert set(vars(fast.PLAIN)) == set(vars(fast.FAST))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_on_either_path_gives_the_same_logits_and_gradients(dtype):
    params = init_params(CFG, seed=2, dtype=dtype)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, CFG.vocab_size, (3, 16))
    dlogits = rng.standard_normal((3, 16, CFG.vocab_size)).astype(dtype)
    out = {}
    for is_plain in (False, True):
        with small_blocks(), fast.plain(is_plain):
            logits, cache = gpt_forward(params, idx, CFG)
            assert cache["ops"] is (fast.PLAIN if is_plain else fast.FAST)
            grads = gpt_backward(dlogits, cache)
            kv_first, kv = gpt_forward_kv(params, idx[:, :5], CFG)
            kv_rest, _ = gpt_forward_kv(params, idx[:, 5:], CFG, kv)
            nograd, none = gpt_forward(params, idx, CFG, causal_layout(3, 16), keep_cache=False)
            assert none is None
            out[is_plain] = (logits, grads, nograd, np.concatenate([kv_first, kv_rest], 1))
    (l1, g1, i1, k1), (l0, g0, i0, k0) = out[False], out[True]
    close(l1, l0, dtype, scale=10)
    np.testing.assert_array_equal(i1, l1)  # the same forward, without the backward's cache
    np.testing.assert_array_equal(i0, l0)
    close(k1, l0, dtype, scale=10)
    close(k0, l0, dtype, scale=10)
    for k in g0:
        close(g1[k], g0[k], dtype, scale=float(np.abs(g0[k]).max()) + 1.0)


@given(lay=random_layout(max_pairs=3, max_len=5), seed=seeds)
def test_a_dpo_step_on_any_layout_is_the_same_on_either_path(lay, seed):
    """The whole training step (forward at the scored positions, eq. 7 log-probs, eq. 9 backward
    into every parameter) on drawn layouts: the fast path gives the plain reference's loss and
    gradients (float64)."""
    from minidpo.train import TrainConfig, dpo_step

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    ln = lambda: [int(t) for t in rng.integers(1, CFG.vocab_size, int(rng.integers(1, 5)))]  # noqa: E731
    pairs = [(ln(), ln(), ln()) for _ in range(n)]
    share, pack = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    batch = pack_preferences(pairs, 0, share, pack, average=bool(rng.integers(0, 2)))
    params = init_params(CFG, seed=int(rng.integers(0, 100)), dtype=np.float64)
    ref_c, ref_r = rng.normal(-8, 1, n), rng.normal(-8, 1, n)
    out = {}
    for is_plain in (False, True):
        with fast.plain(is_plain):
            loss, metrics, grads = dpo_step(params, CFG, batch, ref_c, ref_r, TrainConfig(beta=0.3))
        out[is_plain] = (float(loss), grads)
    assert out[False][0] == pytest.approx(out[True][0], rel=1e-12)
    for k, g in out[True][1].items():
        np.testing.assert_allclose(out[False][1][k], g, rtol=1e-9, atol=1e-12 * (np.abs(g).max() + 1), err_msg=k)


def test_train_config_plain_runs_the_stage_on_the_plain_path(tmp_path, monkeypatch):
    """TrainConfig(plain=True): every step runs the plain functions; the switch is restored after
    the stage; the two paths train to the same parameters (float64 round-off)."""
    import minidpo.train as T
    from minidpo.data import TokenizedSFT

    seen = []
    original = T.sft_step

    def step(*a, **kw):
        seen.append(fast.ops().name)
        return original(*a, **kw)

    monkeypatch.setattr(T, "sft_step", step)
    rng = np.random.default_rng(0)
    items = [TokenizedSFT(prompt_ids=[1, 2], response_ids=[int(t) for t in rng.integers(1, 37, 5)]) for _ in range(8)]
    out = {}
    for is_plain in (True, False):
        tc = T.TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, plain=is_plain)
        params = init_params(CFG, seed=1, dtype=np.float64)  # float64: no round-off sign flip in AdamW's first steps
        out[is_plain] = T.train_sft(params, CFG, items, 0, tc, tmp_path / str(is_plain)).params
        assert not fast.is_plain()
    assert seen == ["plain"] * 3 + ["fast"] * 3
    for k in out[True]:
        np.testing.assert_allclose(out[True][k], out[False][k], rtol=1e-8, atol=1e-10, err_msg=k)


def test_cli_plain_flag_switches_the_path(monkeypatch):
    from minidpo import cli

    seen = []
    monkeypatch.setattr(cli, "cmd_eval", lambda args: seen.append(fast.ops().name) or 0)
    args = ["eval", "--policy", "p", "--ref", "r", "--data", "d"]
    assert cli.main(args + ["--plain"]) == 0
    assert cli.main(args) == 0
    assert seen == ["plain", "fast"] and not fast.is_plain()


def _package_imports():
    """module -> the minidpo modules it imports (anywhere in the file, functions included)."""
    import ast
    from pathlib import Path

    root = Path(fast.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        mod = ".".join(path.relative_to(root).with_suffix("").parts)
        pkg = mod.rsplit(".", 1)[0] if "." in mod else ""
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)] if pkg else []
                target = ".".join([*base, node.module] if node.module else base)
                if node.module:
                    deps.add(target)
                else:
                    deps.update(".".join([*base, a.name]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minidpo."):
                deps.add(node.module[len("minidpo."):])
        graph[mod] = {d for d in deps if d and d != mod}
    return graph


def test_the_plain_reference_imports_no_fast_code_and_nothing_imports_in_a_circle():
    graph = _package_imports()
    assert graph["layers"] <= {"checks", "backend"} and graph["logprobs"] <= {"checks", "backend"}
    assert "fast" in graph["model"] and "kernels" in graph["fast"]
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in graph.get(m, ()):
            visit(d, path + [m])
        state[m] = "done"

    for m in graph:
        visit(m, [])


# ----------------------------------------------------------------------------------- the thread pool


@contextlib.contextmanager
def threaded(n):
    """n threads, and every pass cut into parts however small the array; attention copies k and v
    and runs its softmax in blocks at every size."""
    old = rt._THREADS
    rt.set_threads(n)
    try:
        with mock.patch.object(rt, "MIN_PAR", 1), mock.patch.object(fast, "_COPY_KV_T", 1), \
                mock.patch.object(fast, "_SOFTMAX_BLOCKED", 1):
            yield
    finally:
        rt.set_threads(old)


def test_parallel_for_runs_the_parts_at_once_and_reraises():
    import threading

    barrier = threading.Barrier(2, timeout=10)  # passes only if two parts run at the same time
    seen = []
    with threaded(2):
        rt.parallel_for(lambda i: seen.append((i, barrier.wait())), [0, 1])
        assert sorted(i for i, _ in seen) == [0, 1]

        def boom(i):
            if i == 3:
                raise ValueError("part 3")

        with pytest.raises(ValueError, match="part 3"):
            rt.parallel_for(boom, range(5))
    with pytest.raises(ValueError):
        rt.set_threads(0)
    assert rt.get_threads() >= 1 and rt.default_threads() >= 1


@given(n=st.integers(1, 200), threads=st.integers(1, 5), align=st.integers(1, 16), row=st.integers(1, 9))
def test_parts_cover_the_rows_once_in_order(n, threads, align, row):
    with threaded(threads):
        parts = rt.parts(n, row, align)
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:])) and all(p.stop > p.start for p in parts)
    assert all(p.start % align == 0 for p in parts) and len(parts) <= threads


@given(lay=random_layout(), H=st.integers(1, 2), D=st.integers(1, 4), threads=st.integers(2, 4), dtype=DTYPES,
       seed=seeds, blocks=blocking)
def test_threaded_fast_path_equals_plain(lay, H, D, threads, dtype, seed, blocks):
    """Every pass cut into parts on 2-4 threads (GELU, layernorm, attention, log-probs) gives the
    plain twins' numbers; the elementwise ones (GELU, log-probs) the one-thread numbers exactly."""
    layout, B, T = lay
    rng = np.random.default_rng(seed)
    C = H * D
    x = (3 * rng.standard_normal((B, T, 4 * C))).astype(dtype)
    dx_up = rng.standard_normal(x.shape).astype(dtype)
    h = (2 * rng.standard_normal((B, T, C)) + 1).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    qkv = (2 * rng.standard_normal((B, T, 3 * C))).astype(dtype)
    dy = rng.standard_normal((B, T, C)).astype(dtype)
    M, E = B * T + 3, 2
    logits = (3 * rng.standard_normal((M, 5))).astype(dtype)
    labels = rng.integers(0, 5, M)
    lw = np.zeros((E, M), dtype=dtype)
    lw[np.arange(M) % E, np.arange(M)] = 1.0
    dlogps = rng.standard_normal(E).astype(dtype)
    ulog = (3 * rng.standard_normal((B, T, 5))).astype(dtype)

    wl, bl = rng.standard_normal((C, 3 * C)).astype(dtype), rng.standard_normal(3 * C).astype(dtype)
    wte = rng.standard_normal((5, C)).astype(dtype)
    kv = (np.zeros((B, H, T, D), dtype), np.zeros((B, H, T, D), dtype))

    def run():
        g = [fast.gelu_forward(x)[0], fast.gelu_backward(dx_up, x)[0]]
        y, c = fast.layernorm_forward(h, w, b)
        dh, gln = fast.layernorm_backward(dy, c)
        a, ca = fast.attention_forward(qkv, H, layout)
        da = fast.attention_backward(dy, ca)[0]
        lp, cl = fast.sequence_logps(logits, labels, lw)
        dl = fast.sequence_logps_backward(dlogps, cl)
        lin, cli = fast.linear_forward(h, wl, bl)  # matrix products: rows, dw's rows, db's columns
        dlin, glin = fast.linear_backward(qkv, cli)
        un, cu = fast.unembed_forward(h, wte)
        dun, gun = fast.unembed_backward(ulog, cu)
        akv = fast.attention_forward_kv(qkv, H, *(a.copy() for a in kv), 0)
        return g, [lp, cl["lse"], dl], [y, dh, gln["w"], gln["b"], a, da, lin, dlin, glin["w"], glin["b"], un, dun,
                                        gun["wte"], akv]

    with small_blocks(**blocks):
        one = run()
        with threaded(threads):
            many = run()
    for p, q in zip(one[0] + one[1], many[0] + many[1]):
        np.testing.assert_array_equal(p, q)
    y0, c0 = layers.layernorm_forward(h, w, b)
    dh0, g0 = layers.layernorm_backward(dy, c0)
    a0, ca0 = layers.attention_forward(qkv, H, layout)
    da0 = layers.attention_backward(dy, ca0)[0]
    lin0, cli0 = layers.linear_forward(h, wl, bl)
    dlin0, glin0 = layers.linear_backward(qkv, cli0)
    un0, cu0 = layers.unembed_forward(h, wte)
    dun0, gun0 = layers.unembed_backward(ulog, cu0)
    akv0 = layers.attention_forward_kv(qkv, H, *(a.copy() for a in kv), 0)
    want = [y0, dh0, g0["w"], g0["b"], a0, da0, lin0, dlin0, glin0["w"], glin0["b"], un0, dun0, gun0["wte"], akv0]
    for got, w0, scale in zip(many[2], want, [10, 100, 10, 10, 10, 10] + [100] * 8):
        close(got, w0, dtype, scale=scale)


@pytest.mark.parametrize("threads", [1, 3])
def test_blocked_adamw_gives_the_plain_update_bit_for_bit(monkeypatch, threads):
    """optim's fast path (tensors cut into parts on the pool, each part in cache blocks) and the
    plain path (whole tensors) give identical parameters and moments, non-contiguous ones too."""
    from minidpo.optim import AdamW

    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal((37, 11)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
            "t": np.asfortranarray(rng.standard_normal((6, 9)).astype(np.float32))}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()} for _ in range(3)]
    out = {}
    for path in ("plain", "fast"):
        params = {k: v.copy(order="K") for k, v in base.items()}
        opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        with fast.plain(path == "plain"), threaded(threads), mock.patch.object(rt, "BLOCK", 7):
            for g in grads:
                opt.step(params, {k: v.copy() for k, v in g.items()})
        out[path] = (params, opt.m, opt.v)
    for a, b in zip(out["plain"], out["fast"]):
        for k in base:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(out["fast"][0]["w"], base["w"])  # it did update


def test_cpu_defaults_set_the_threads_and_hugepage_advice_unless_the_environment_says(monkeypatch):
    if rt.hugepage_advice() is None:
        pytest.skip("this NumPy has no hugepage switch")
    old_threads, old_advice = rt._THREADS, rt.hugepage_advice()
    try:
        monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
        rt.set_hugepage_advice(True)
        rt.cpu_defaults(3)
        assert rt.get_threads() == 3 and rt.hugepage_advice() is False
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")  # the user's explicit choice is kept
        rt.set_hugepage_advice(True)
        rt.cpu_defaults(None)
        assert rt.get_threads() == rt.default_threads() and rt.hugepage_advice() is True
        assert rt.set_hugepage_advice(False) is True and rt.hugepage_advice() is False
    finally:
        rt.set_threads(old_threads)
        rt.set_hugepage_advice(old_advice)
