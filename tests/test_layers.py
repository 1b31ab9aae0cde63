"""The plain reference (layers.py): every layer's backward against central finite differences
(float64), forwards against independent naive code, and dtype preservation (float32 in ->
float32 out, on the fast twins too). tests/test_fast.py checks the fast twins against these."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo import fast
from minidpo import layers as L
from minidpo.packing import layout_from_attention_mask, layout_of
from tests.conftest import numeric_grad

seeds = st.integers(0, 2**32 - 1)
BOTH = pytest.mark.parametrize("impl", [fast.PLAIN, fast.FAST], ids=["plain", "fast"])


def num_grad(f, x):
    """Central differences of the scalar f() w.r.t. the entries of x (perturbed in place)."""
    return numeric_grad(lambda _: f(), x)


def close(analytic, numeric, rtol=1e-6, atol=1e-8):
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- linear


@given(B=st.integers(1, 3), T=st.integers(1, 4), cin=st.integers(1, 5), cout=st.integers(1, 5),
       bias=st.booleans(), seed=seeds)
def test_linear_backward_matches_finite_differences(B, T, cin, cout, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, cin))
    w = rng.standard_normal((cin, cout))
    b = rng.standard_normal(cout) if bias else None
    G = rng.standard_normal((B, T, cout))

    def loss():
        return float((L.linear_forward(x, w, b)[0] * G).sum())

    y, cache = L.linear_forward(x, w, b)
    close(y, np.einsum("btc,cd->btd", x, w) + (b if bias else 0))
    dx, grads = L.linear_backward(G, cache)
    close(dx, num_grad(loss, x))
    close(grads["w"], num_grad(loss, w))
    if bias:
        close(grads["b"], num_grad(loss, b))
    else:
        assert grads["b"] is None


# ---------------------------------------------------------------------------------- layernorm


@given(B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(2, 7), scale=st.floats(0.5, 4.0),
       seed=seeds)
def test_layernorm_backward_matches_finite_differences(B, T, C, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C)) * scale + rng.standard_normal()
    w = rng.standard_normal(C)
    b = rng.standard_normal(C)
    G = rng.standard_normal((B, T, C))

    def loss():
        return float((L.layernorm_forward(x, w, b, 1e-5)[0] * G).sum())

    y, cache = L.layernorm_forward(x, w, b, 1e-5)
    mu = x.mean(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    close(y, ref, rtol=1e-10, atol=1e-12)
    dx, grads = L.layernorm_backward(G, cache)
    close(dx, num_grad(loss, x), rtol=1e-5, atol=1e-7)
    close(grads["w"], num_grad(loss, w))
    close(grads["b"], num_grad(loss, b))


def test_layernorm_single_channel_is_constant():
    """C = 1: x - mean = 0, so y = b whatever x is, and dx = 0."""
    x = np.array([[[3.0]], [[-2.0]]])
    w, b = np.array([2.0]), np.array([0.5])
    y, cache = L.layernorm_forward(x, w, b)
    np.testing.assert_array_equal(y, np.full_like(x, 0.5))
    dx, _ = L.layernorm_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(dx, np.zeros_like(x))


# --------------------------------------------------------------------------------------- gelu


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), scale=st.floats(0.1, 6.0), seed=seeds)
def test_gelu_forward_formula_and_backward(shape, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    G = rng.standard_normal(shape)
    y, cache = L.gelu_forward(x)
    k = math.sqrt(2 / math.pi)
    ref = np.vectorize(lambda v: 0.5 * v * (1 + math.tanh(k * (v + 0.044715 * v**3))))(x)
    close(y, ref, rtol=1e-12, atol=1e-14)
    dx, grads = L.gelu_backward(G, cache)
    assert grads == {}
    # the central difference's rounding error grows with the sum it differences (about
    # 1e-16 * sum |y G| / h, h = 1e-6): the tolerance follows it, the gradients themselves are O(1)
    close(dx, num_grad(lambda: float((L.gelu_forward(x)[0] * G).sum()), x), atol=1e-8 + 1e-9 * np.abs(y * G).sum())


# ---------------------------------------------------------------------------------- attention


def naive_attention(qkv, H, layout=None):
    """Loops over batch, heads and queries: the definition, written independently: query i sees the
    keys j <= i from its start on, less its hidden range."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // H
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    y = np.zeros((B, T, C))
    for b in range(B):
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            for i in range(T):
                if layout is None:
                    keys = list(range(i + 1))
                else:
                    lo, hi = layout.hidden_lo[b, i], layout.hidden_hi[b, i]
                    keys = [j for j in range(layout.start[b, i], i + 1) if not lo <= j < hi]
                s = np.array([q[b, i, sl] @ k[b, j, sl] / math.sqrt(D) for j in keys])
                p = np.exp(s - s.max())
                p /= p.sum()
                y[b, i, sl] = sum(pj * v[b, j, sl] for pj, j in zip(p, keys))
    return y


def random_layout(rng, B, T):
    """Random start and hidden ranges (every query sees itself): any layout the rule allows."""
    own = np.arange(T)
    start = np.minimum(rng.integers(0, T, (B, T)), own)
    lo = rng.integers(0, T, (B, T))
    hi = np.minimum(lo + rng.integers(0, 3, (B, T)), np.where(lo <= own, own, lo))  # never hides itself
    return layout_of(start, lo, hi)


attn_shapes = dict(B=st.integers(1, 2), T=st.integers(1, 5), H=st.integers(1, 3), D=st.integers(1, 4))


@given(**attn_shapes, masked=st.booleans(), seed=seeds)
def test_attention_forward_matches_naive_loops(B, T, H, D, masked, seed):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D)) * 2
    layout = random_layout(rng, B, T) if masked else None
    y, _ = L.attention_forward(qkv, H, layout)
    close(y, naive_attention(qkv, H, layout), rtol=1e-10, atol=1e-12)


@given(**attn_shapes, masked=st.booleans(), seed=seeds)
def test_attention_backward_matches_finite_differences(B, T, H, D, masked, seed):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D))
    layout = random_layout(rng, B, T) if masked else None
    G = rng.standard_normal((B, T, H * D))

    def loss():
        return float((L.attention_forward(qkv, H, layout)[0] * G).sum())

    _, cache = L.attention_forward(qkv, H, layout)
    dqkv, grads = L.attention_backward(G, cache)
    assert grads == {}
    assert dqkv.shape == qkv.shape
    close(dqkv, num_grad(loss, qkv), rtol=1e-6, atol=1e-8)


@given(B=st.integers(1, 3), T=st.integers(1, 6), H=st.integers(1, 2), D=st.integers(1, 3), seed=seeds, data=st.data())
def test_left_padding_with_mask_leaves_real_positions_unchanged(B, T, H, D, seed, data):
    """Rows of different lengths left-padded to T, with the layout of their key-padding mask, give at
    their real positions exactly what each row gives alone, unpadded."""
    rng = np.random.default_rng(seed)
    lens = [data.draw(st.integers(1, T)) for _ in range(B)]
    padded = rng.standard_normal((B, T, 3 * H * D)) * 5  # garbage at pad positions
    mask = np.zeros((B, T), dtype=np.int64)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1
    y_pad, _ = L.attention_forward(padded, H, layout_from_attention_mask(mask))
    assert np.isfinite(y_pad).all()
    for b, n in enumerate(lens):
        y_alone, _ = L.attention_forward(padded[b:b + 1, T - n:], H)
        close(y_pad[b, T - n:], y_alone[0], rtol=1e-12, atol=1e-12)


def test_attention_with_every_other_key_hidden_gives_finite_output():
    """Every query sees itself only (start = its own index): y = v, and a finite backward."""
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 4, 3 * 6))
    own = np.tile(np.arange(4), (2, 1))
    y, cache = L.attention_forward(qkv, 2, layout_of(own, own * 0, own * 0))
    np.testing.assert_allclose(y, qkv[..., 12:], rtol=1e-12)  # attends to itself only: y = v
    dqkv, _ = L.attention_backward(np.ones_like(y), cache)
    assert np.isfinite(dqkv).all()


@given(B=st.integers(1, 2), T=st.integers(1, 6), H=st.integers(1, 2), D=st.integers(1, 3), padded=st.booleans(),
       seed=seeds, data=st.data())
def test_attention_kv_chunks_equal_full_attention(B, T, H, D, padded, seed, data):
    """The KV-cache attention, fed in chunks, is the full attention of the same left-padded rows."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * D))
    first = rng.integers(0, T, B) if padded else np.zeros(B, np.int64)
    mask = (np.arange(T)[None, :] >= first[:, None]).astype(np.int64)
    layout = layout_from_attention_mask(mask) if padded else None
    y_full, _ = L.attention_forward(qkv, H, layout)
    kc = np.zeros((B, H, T + 2, D))
    vc = np.zeros_like(kc)
    offset, outs = 0, []
    while offset < T:
        n = data.draw(st.integers(1, T - offset))
        st_ = None if layout is None else layout.start[:, offset:offset + n]
        outs.append(L.attention_forward_kv(qkv[:, offset:offset + n], H, kc, vc, offset, st_))
        offset += n
    close(np.concatenate(outs, axis=1), y_full, rtol=1e-12, atol=1e-12)


@BOTH
def test_attention_rejects_badly_shaped_qkv(impl):
    with pytest.raises(ValueError, match="n_head=4"):
        impl.attention_forward(np.zeros((1, 2, 18)), 4)
    with pytest.raises(ValueError, match="3C"):
        impl.attention_forward(np.zeros((1, 2, 10)), 1)


def test_the_mask_rule_sees():
    """layers.sees: causal (query i sees keys 0..i, at an offset after cached keys), and a layout's
    start and hidden range (a packed row: two sequences; a shared prompt's rejected token)."""
    from minidpo.layers import sees

    c = sees(5, n_queries=5, xp=np)
    np.testing.assert_array_equal(c, np.tril(np.ones((5, 5), bool)))
    kv = sees(5, n_queries=3, offset=2, xp=np)  # queries at key indices 2, 3, 4
    np.testing.assert_array_equal(kv, np.tril(np.ones((3, 5), bool), k=2))
    # a row [x0 x1 | w0 | l0 l1] then [x0' w0']: the rejected tokens (3, 4) skip the chosen one (2)
    start = np.array([[0, 0, 0, 0, 0, 5, 5]])
    lo = np.array([[0, 0, 0, 2, 2, 0, 0]])
    hi = np.array([[0, 0, 0, 3, 3, 0, 0]])
    got = sees(7, start, lo, hi)[0]
    want = np.array([[1, 0, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0, 0],
                     [1, 1, 0, 1, 0, 0, 0],
                     [1, 1, 0, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0, 1, 0],
                     [0, 0, 0, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="see itself"):
        layout_of(np.array([[1, 1]]), np.zeros((1, 2)), np.zeros((1, 2)))


# ---------------------------------------------------------------------------------- embedding


@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(1, 4), C=st.integers(1, 4),
       pos_mode=st.sampled_from(["none", "shared", "per_row"]), seed=seeds)
def test_embedding_backward_matches_finite_differences(B, T, V, C, pos_mode, seed):
    """V <= 4 with B*T up to 15 tokens: token ids repeat, and so may position ids."""
    rng = np.random.default_rng(seed)
    n_ctx = T + 2
    idx = rng.integers(0, V, (B, T))
    wte = rng.standard_normal((V, C))
    wpe = rng.standard_normal((n_ctx, C))
    pos = {"none": None, "shared": rng.integers(0, n_ctx, T), "per_row": rng.integers(0, n_ctx, (B, T))}[pos_mode]
    G = rng.standard_normal((B, T, C))

    def loss():
        return float((L.embedding_forward(idx, wte, wpe, pos)[0] * G).sum())

    x, cache = L.embedding_forward(idx, wte, wpe, pos)
    p = np.broadcast_to(np.arange(T) if pos is None else pos, (B, T))
    close(x, wte[idx] + wpe[p], rtol=0, atol=0)
    dx, grads = L.embedding_backward(G, cache)
    assert dx is None
    close(grads["wte"], num_grad(loss, wte))
    close(grads["wpe"], num_grad(loss, wpe))


def test_embedding_repeated_ids_accumulate():
    idx = np.array([[2, 2, 2], [0, 2, 1]])
    G = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2)
    _, cache = L.embedding_forward(idx, np.zeros((4, 2)), np.zeros((3, 2)))
    _, grads = L.embedding_backward(G, cache)
    expect = np.zeros((4, 2))
    for b in range(2):
        for t in range(3):
            expect[idx[b, t]] += G[b, t]
    np.testing.assert_array_equal(grads["wte"], expect)
    np.testing.assert_array_equal(grads["wte"][2], G[0, 0] + G[0, 1] + G[0, 2] + G[1, 1])
    np.testing.assert_array_equal(grads["wpe"], G.sum(0))


def test_embedding_backward_accumulates_into_given_dwte():
    idx = np.array([[1, 1]])
    G = np.ones((1, 2, 3))
    _, cache = L.embedding_forward(idx, np.zeros((2, 3)), np.zeros((2, 3)))
    acc = np.full((2, 3), 10.0)
    _, grads = L.embedding_backward(G, cache, dwte=acc)
    assert grads["wte"] is acc
    np.testing.assert_array_equal(acc, [[10, 10, 10], [12, 12, 12]])


# ------------------------------------------------------------------------------------ unembed


@given(B=st.integers(1, 3), T=st.integers(1, 4), V=st.integers(1, 6), C=st.integers(1, 4), seed=seeds)
def test_unembed_backward_matches_finite_differences(B, T, V, C, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C))
    wte = rng.standard_normal((V, C))
    G = rng.standard_normal((B, T, V))

    def loss():
        return float((L.unembed_forward(x, wte)[0] * G).sum())

    logits, cache = L.unembed_forward(x, wte)
    close(logits, np.einsum("btc,vc->btv", x, wte))
    dx, grads = L.unembed_backward(G, cache)
    close(dx, num_grad(loss, x))
    close(grads["wte"], num_grad(loss, wte))


# -------------------------------------------------------------------------------------- dtypes


def _run_all_layers(L, dtype, rng):
    """Forward and backward of every layer at ``dtype``; yields (name, array) of every output."""
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    B, T, C, H, V = 2, 3, 6, 2, 5
    idx = rng.integers(0, V, (B, T))
    x, c = L.embedding_forward(idx, f(V, C), f(T, C))
    yield "embedding.out", x
    _, g = L.embedding_backward(f(B, T, C), c)
    yield "embedding.dwte", g["wte"]
    yield "embedding.dwpe", g["wpe"]
    x, c = L.embedding_forward(idx, f(V, C), f(T, C), rng.integers(0, T, (B, T)))
    _, g = L.embedding_backward(f(B, T, C), c)
    yield "embedding[pos].dwpe", g["wpe"]
    y, c = L.linear_forward(f(B, T, C), f(C, 3 * C), f(3 * C))
    yield "linear.out", y
    dx, g = L.linear_backward(f(B, T, 3 * C), c)
    yield "linear.dx", dx
    yield "linear.dw", g["w"]
    yield "linear.db", g["b"]
    y, c = L.layernorm_forward(f(B, T, C), f(C), f(C), 1e-5)
    yield "layernorm.out", y
    dx, g = L.layernorm_backward(f(B, T, C), c)
    yield "layernorm.dx", dx
    yield "layernorm.dw", g["w"]
    yield "layernorm.db", g["b"]
    y, c = L.gelu_forward(f(B, T, C))
    yield "gelu.out", y
    dx, _ = L.gelu_backward(f(B, T, C), c)
    yield "gelu.dx", dx
    for mask in (None, np.array([[0, 1, 1], [1, 1, 1]])):
        lay = None if mask is None else layout_from_attention_mask(mask)
        y, c = L.attention_forward(f(B, T, 3 * C), H, lay)
        yield f"attention(mask={mask is not None}).out", y
        dx, _ = L.attention_backward(f(B, T, C), c)
        yield f"attention(mask={mask is not None}).dx", dx
    kc = np.zeros((B, H, T, C // H), dtype=dtype)
    yield "attention_kv.out", L.attention_forward_kv(f(B, T, 3 * C), H, kc, kc.copy(), 0, np.zeros((B, T), np.int64))
    y, c = L.unembed_forward(f(B, T, C), f(V, C))
    yield "unembed.out", y
    dx, g = L.unembed_backward(f(B, T, V), c)
    yield "unembed.dx", dx
    yield "unembed.dwte", g["wte"]


@BOTH
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layer_keeps_the_input_dtype(impl, dtype):
    outs = list(_run_all_layers(impl, dtype, np.random.default_rng(0)))
    assert len(outs) > 20
    wrong = [(name, a.dtype) for name, a in outs if a.dtype != dtype]
    assert not wrong, f"dtype drift at {dtype.__name__}: {wrong}"
    assert all(np.isfinite(a).all() for _, a in outs)


@BOTH
def test_forwards_and_backwards_do_not_modify_their_inputs(impl):
    L = impl
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 6))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    qkv = rng.standard_normal((2, 3, 18))
    dy = rng.standard_normal((2, 3, 6))
    saved = [a.copy() for a in (x, w, b, qkv, dy)]
    _, c = L.layernorm_forward(x, w, b)
    L.layernorm_backward(dy, c)
    _, c = L.gelu_forward(x)
    L.gelu_backward(dy, c)
    _, c = L.attention_forward(qkv, 3)
    L.attention_backward(dy, c)
    _, c = L.linear_forward(x, rng.standard_normal((6, 6)), b)
    L.linear_backward(dy, c)
    for a, s in zip((x, w, b, qkv, dy), saved):
        np.testing.assert_array_equal(a, s)
