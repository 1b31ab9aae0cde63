"""The whole GPT-2: gradient of every parameter tensor against finite differences (float64),
dtypes, the KV-cache path against the full forward, GPT-2 names and shapes, input errors."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.model import (
    GPTConfig,
    KVCache,
    check_params,
    gpt_backward,
    gpt_forward,
    gpt_forward_kv,
    init_kv_cache,
    init_params,
    num_params,
    param_names,
    param_shapes,
)
from minidpo.packing import layout_from_attention_mask, pack_preferences
from tests.conftest import requires_cuda

TINY = GPTConfig(vocab_size=7, n_ctx=8, n_layer=2, n_head=2, n_embd=6)  # head size D = 3


def random_params(config, seed, dtype=np.float64, scale=0.3):
    """GPT-2 init plus noise, so biases and layernorm parameters are not trivially 0 / 1."""
    rng = np.random.default_rng(seed)
    p = init_params(config, seed=seed, dtype=dtype)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}


def tokens(config, B, T, seed):
    idx = np.random.default_rng(seed).integers(0, config.vocab_size, (B, T))
    if B * T > 1:
        idx.reshape(-1)[-1] = idx.reshape(-1)[0]  # at least one repeated id
    return idx


# ------------------------------------------------------------------- gradient of every tensor


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), T=st.integers(1, 6),
       mode=st.sampled_from(["causal", "left_padded", "shared_packed"]))
def test_gradient_of_every_parameter_matches_finite_differences(seed, B, T, mode):
    """Every layout through the one model: causal rows with logits everywhere; left padding (the
    generation path: per-row first keys and positions); shared prompts packed into rows with the
    logits at the scored positions only (a prompt's last position scores two tokens: its two
    gradients add)."""
    rng = np.random.default_rng(seed)
    params = random_params(TINY, seed)
    idx = tokens(TINY, B, T, seed)
    layout = at = None
    if mode == "left_padded":
        lens = rng.integers(1, T + 1, B)
        mask = (np.arange(T)[None, :] >= (T - lens)[:, None]).astype(np.int64)
        layout = layout_from_attention_mask(mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    elif mode == "shared_packed":
        ln = lambda: rng.integers(0, TINY.vocab_size, int(rng.integers(1, 3))).tolist()  # noqa: E731
        batch = pack_preferences([(ln(), ln(), ln()) for _ in range(B)], 0)
        idx, layout, at = batch.input_ids, batch.layout, batch.logits_at
    n_out = (len(at),) if at is not None else idx.shape
    G = rng.standard_normal((*n_out, TINY.vocab_size))

    def loss():
        return float((gpt_forward(params, idx, TINY, layout, logits_at=at)[0] * G).sum())

    logits, cache = gpt_forward(params, idx, TINY, layout, logits_at=at)
    grads = gpt_backward(G, cache)
    assert list(grads) == list(params)
    eps = 1e-6
    for name, p in params.items():
        assert grads[name].shape == p.shape and grads[name].dtype == p.dtype
        flat, gflat = p.reshape(-1), grads[name].reshape(-1)
        for i in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            fp = loss()
            flat[i] = old - eps
            fm = loss()
            flat[i] = old
            num = (fp - fm) / (2 * eps)
            assert math.isclose(gflat[i], num, rel_tol=1e-5, abs_tol=1e-7), (name, i, gflat[i], num)


def test_tied_wte_gradient_is_the_sum_of_both_uses():
    """Setting dlogits = 0 except through the embedding is impossible, so check the pieces:
    the wte gradient equals (output-projection share) + (embedding scatter-add share)."""
    params = random_params(TINY, 0)
    idx = np.array([[1, 1, 3, 1]])
    G = np.random.default_rng(0).standard_normal((1, 4, TINY.vocab_size))
    _, cache = gpt_forward(params, idx, TINY)
    g = gpt_backward(G, cache)
    # output projection share: dlogits^T @ ln_f(x)
    xf = cache["unembed"][0].reshape(4, -1)
    share_out = G.reshape(4, -1).T @ xf
    # embedding share: the wpe gradient at positions 0..3 is exactly dx (one row, distinct positions)
    dx = g["transformer.wpe.weight"][:4]
    share_emb = np.zeros_like(share_out)
    np.add.at(share_emb, idx[0], dx)
    np.testing.assert_allclose(g["transformer.wte.weight"], share_out + share_emb, rtol=1e-12, atol=1e-12)
    assert np.abs(share_emb[1]).sum() > 0 and np.abs(share_out).sum() > 0


def test_backward_leaves_dlogits_and_cache_untouched():
    params = random_params(TINY, 1)
    idx = tokens(TINY, 2, 5, 1)
    G = np.random.default_rng(1).standard_normal((2, 5, TINY.vocab_size))
    G0 = G.copy()
    _, cache = gpt_forward(params, idx, TINY)
    g1 = gpt_backward(G, cache)
    g2 = gpt_backward(G, cache)
    np.testing.assert_array_equal(G, G0)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])


# -------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_backward_keep_the_params_dtype(dtype):
    params = init_params(TINY, seed=0, dtype=dtype)
    assert all(v.dtype == dtype for v in params.values())
    idx = tokens(TINY, 2, 5, 0)
    for mask in (None, np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])):
        logits, cache = gpt_forward(params, idx, TINY, None if mask is None else layout_from_attention_mask(mask))
        assert logits.dtype == dtype and logits.shape == (2, 5, TINY.vocab_size)
        grads = gpt_backward(np.ones_like(logits), cache)
        assert {k: v.dtype for k, v in grads.items()} == {k: np.dtype(dtype) for k in params}
        assert {k: v.shape for k, v in grads.items()} == {k: v.shape for k, v in params.items()}
    kv_logits, _ = gpt_forward_kv(params, idx, TINY)
    assert kv_logits.dtype == dtype


def test_float32_forward_agrees_with_float64():
    p64 = random_params(TINY, 2)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    idx = tokens(TINY, 2, 6, 2)
    l64, c64 = gpt_forward(p64, idx, TINY)
    l32, c32 = gpt_forward(p32, idx, TINY)
    np.testing.assert_allclose(l32, l64, rtol=1e-4, atol=1e-4)
    G = np.random.default_rng(2).standard_normal(l64.shape)
    g64, g32 = gpt_backward(G, c64), gpt_backward(G.astype(np.float32), c32)
    for k in g64:
        scale = np.abs(g64[k]).max() + 1e-6
        np.testing.assert_allclose(g32[k] / scale, g64[k] / scale, atol=2e-4, err_msg=k)


# ------------------------------------------------------------------------------ padding rules


def test_right_padding_needs_no_mask():
    """Causal attention: tokens after position t never change the logits at positions <= t."""
    params = random_params(TINY, 3)
    idx = tokens(TINY, 2, 7, 3)
    other = idx.copy()
    other[:, 4:] = (other[:, 4:] + 1) % TINY.vocab_size
    a, _ = gpt_forward(params, idx, TINY)
    b, _ = gpt_forward(params, other, TINY)
    np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-12, atol=1e-12)
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_left_padding_with_mask_and_positions_equals_each_row_alone():
    params = random_params(TINY, 4)
    rows = [[1, 2, 3, 4, 5], [6, 0], [3]]
    P = 5
    idx = np.zeros((3, P), dtype=np.int64) + 2  # pad id 2: an ordinary token, hidden by the mask
    mask = np.zeros((3, P), dtype=np.int64)
    for b, r in enumerate(rows):
        idx[b, P - len(r):] = r
        mask[b, P - len(r):] = 1
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    batch, _ = gpt_forward(params, idx, TINY, layout_from_attention_mask(mask, pos))
    for b, r in enumerate(rows):
        alone, _ = gpt_forward(params, np.array([r]), TINY)
        np.testing.assert_allclose(batch[b, P - len(r):], alone[0], rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------------- KV cache


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), T=st.integers(1, 8), left_padded=st.booleans(),
       data=st.data())
def test_kv_cache_chunks_equal_full_forward(seed, B, T, left_padded, data):
    rng = np.random.default_rng(seed)
    params = random_params(TINY, seed)
    idx = tokens(TINY, B, T, seed)
    mask = pos = None
    if left_padded:
        lens = rng.integers(1, T + 1, B)
        mask = (np.arange(T)[None, :] >= (T - lens)[:, None]).astype(np.int64)
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full, _ = gpt_forward(params, idx, TINY, None if mask is None else layout_from_attention_mask(mask, pos))
    cache = init_kv_cache(params, TINY, B, capacity=T)
    start, outs = 0, []
    while start < T:
        n = data.draw(st.integers(1, T - start))
        sl = slice(start, start + n)
        logits, cache = gpt_forward_kv(
            params, idx[:, sl], TINY, cache,
            attention_mask=None if mask is None else mask[:, sl],
            position_ids=None if pos is None else pos[:, sl],
        )
        outs.append(logits)
        start += n
    assert cache.length == T
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-11, atol=1e-11)


def test_kv_last_only_and_default_cache():
    params = random_params(TINY, 5)
    idx = tokens(TINY, 2, 6, 5)
    full, _ = gpt_forward(params, idx, TINY)
    last, cache = gpt_forward_kv(params, idx, TINY, last_only=True)
    assert isinstance(cache, KVCache) and cache.capacity == TINY.n_ctx and cache.length == 6
    assert last.shape == (2, 1, TINY.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-12, atol=1e-12)


def test_kv_cache_errors():
    params = init_params(TINY, dtype=np.float64)
    cache = init_kv_cache(params, TINY, 2, capacity=4)
    _, cache = gpt_forward_kv(params, np.zeros((2, 3), dtype=np.int64), TINY, cache)
    with pytest.raises(ValueError, match="capacity"):
        gpt_forward_kv(params, np.zeros((2, 2), dtype=np.int64), TINY, cache)
    with pytest.raises(ValueError, match="batch size"):
        gpt_forward_kv(params, np.zeros((3, 1), dtype=np.int64), TINY, cache)
    with pytest.raises(ValueError, match="n_ctx"):
        gpt_forward_kv(params, np.zeros((1, 9), dtype=np.int64), TINY, init_kv_cache(params, TINY, 1, 9))
    with pytest.raises(TypeError, match="KVCache"):
        gpt_forward_kv(params, np.zeros((1, 1), dtype=np.int64), TINY, {"k": []})


# ------------------------------------------------------------------------ names, shapes, init


def test_param_names_and_shapes_are_gpt2s():
    cfg = GPTConfig.gpt2_small()
    shapes = param_shapes(cfg)
    assert len(shapes) == 2 + 12 * 12 + 2
    assert list(shapes)[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert list(shapes)[-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    layer0 = {k[len("transformer.h.0."):]: v for k, v in shapes.items() if k.startswith("transformer.h.0.")}
    assert layer0 == {
        "ln_1.weight": (768,), "ln_1.bias": (768,),
        "attn.c_attn.weight": (768, 2304), "attn.c_attn.bias": (2304,),
        "attn.c_proj.weight": (768, 768), "attn.c_proj.bias": (768,),
        "ln_2.weight": (768,), "ln_2.bias": (768,),
        "mlp.c_fc.weight": (768, 3072), "mlp.c_fc.bias": (3072,),
        "mlp.c_proj.weight": (3072, 768), "mlp.c_proj.bias": (768,),
    }
    assert shapes["transformer.wte.weight"] == (50257, 768) and shapes["transformer.wpe.weight"] == (1024, 768)
    assert "lm_head.weight" not in shapes  # tied to wte
    assert sum(math.prod(s) for s in shapes.values()) == 124_439_808  # GPT-2 small's published count
    assert param_names(cfg) == list(shapes)


def test_init_statistics_and_reproducibility():
    cfg = GPTConfig(vocab_size=300, n_ctx=64, n_layer=3, n_head=4, n_embd=64)
    p = init_params(cfg, seed=7)
    assert all(v.dtype == np.float32 for v in p.values())
    assert num_params(p) == sum(math.prod(s) for s in param_shapes(cfg).values())
    for name, v in p.items():
        if name.endswith(".bias"):
            assert (v == 0).all(), name
        elif ".ln_" in name:
            assert (v == 1).all(), name
        elif name.endswith("c_proj.weight"):
            assert abs(v.std() - 0.02 / math.sqrt(2 * 3)) < 0.1 * 0.02 / math.sqrt(6), name
        else:
            assert abs(v.std() - 0.02) < 0.002 and abs(v.mean()) < 0.002, name
    again = init_params(cfg, seed=7)
    other = init_params(cfg, seed=8)
    assert all(np.array_equal(p[k], again[k]) for k in p)
    assert not np.array_equal(p["transformer.wte.weight"], other["transformer.wte.weight"])
    assert init_params(cfg, seed=7, dtype=np.float64)["transformer.wte.weight"].dtype == np.float64
    with pytest.raises(TypeError, match="floating"):
        init_params(cfg, dtype=np.int32)


def test_config_validation_and_json_round_trip():
    d = TINY.to_dict()
    assert GPTConfig.from_dict(json.loads(json.dumps(d))) == TINY
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=5, n_ctx=4, n_layer=1, n_head=4, n_embd=6)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(vocab_size=5, n_ctx=4, n_layer=0, n_head=1, n_embd=6)
    with pytest.raises(TypeError, match="n_embd"):
        GPTConfig(vocab_size=5, n_ctx=4, n_layer=1, n_head=1, n_embd=6.0)
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        GPTConfig(vocab_size=5, n_ctx=4, n_layer=1, n_head=1, n_embd=6, layer_norm_epsilon=-1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({**d, "n_positions": 8})
    with pytest.raises(ValueError, match="missing keys"):
        GPTConfig.from_dict({"vocab_size": 5})


# ------------------------------------------------------------------------------ input errors


def test_bad_idx_and_inputs_fail_clearly():
    params = init_params(TINY, dtype=np.float64)
    ok = np.zeros((1, 3), dtype=np.int64)
    with pytest.raises(TypeError, match="integer"):
        gpt_forward(params, ok.astype(np.float32), TINY)
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 7\).*vocab_size.*\[0, 7\]"):
        gpt_forward(params, np.array([[0, 7, 1]]), TINY)
    with pytest.raises(ValueError, match="idx must lie"):
        gpt_forward(params, np.array([[0, -1]]), TINY)
    with pytest.raises(ValueError, match="dimensions"):
        gpt_forward(params, np.array([1, 2]), TINY)
    with pytest.raises(ValueError, match="n_ctx=8"):
        gpt_forward(params, np.zeros((1, 9), dtype=np.int64), TINY)
    with pytest.raises(ValueError, match="at least one"):
        gpt_forward(params, np.zeros((1, 0), dtype=np.int64), TINY)
    with pytest.raises(ValueError, match="reaches position 8, beyond the model's n_ctx=8"):
        gpt_forward(params, ok, TINY, layout_from_attention_mask(np.ones((1, 3)), np.array([0, 1, 8])))
    with pytest.raises(ValueError, match=r"the layout is for a batch of shape \(1, 4\), not \(1, 3\)"):
        gpt_forward(params, ok, TINY, layout_from_attention_mask(np.ones((1, 4))))
    with pytest.raises(ValueError, match="one contiguous run"):
        layout_from_attention_mask(np.array([[1, 0, 1]]))
    with pytest.raises(ValueError, match="position_ids must lie"):
        gpt_forward_kv(params, ok, TINY, position_ids=np.array([0, 1, 8]))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        gpt_forward_kv(params, ok, TINY, position_ids=np.array([0, 1]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        gpt_forward_kv(params, ok, TINY, attention_mask=np.ones((1, 4)))
    with pytest.raises(ValueError, match="left-padded"):
        gpt_forward_kv(params, ok, TINY, attention_mask=np.array([[1, 0, 1]]))
    logits, cache = gpt_forward(params, [[1, 2, 3]], TINY)  # nested lists of ints are accepted
    with pytest.raises(TypeError, match="dlogits has dtype float32"):
        gpt_backward(logits.astype(np.float32), cache)
    with pytest.raises(ValueError, match="dlogits must have"):
        gpt_backward(logits[:, :2], cache)


def test_bad_params_fail_clearly():
    params = init_params(TINY, dtype=np.float64)
    idx = np.zeros((1, 2), dtype=np.int64)
    missing = dict(params)
    del missing["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match="transformer.h.1.mlp.c_fc.bias"):
        gpt_forward(missing, idx, TINY)
    with pytest.raises(KeyError, match="tied"):
        gpt_forward({**params, "lm_head.weight": params["transformer.wte.weight"]}, idx, TINY)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight.*\(6, 18\)"):
        gpt_forward({**params, "transformer.h.0.attn.c_attn.weight": np.zeros((18, 6))}, idx, TINY)
    with pytest.raises(TypeError, match="share one dtype"):
        gpt_forward({**params, "transformer.ln_f.bias": np.zeros(6, dtype=np.float32)}, idx, TINY)
    with pytest.raises(TypeError, match="floating"):
        check_params({k: v.astype(np.int64) for k, v in params.items()}, TINY)


# ---------------------------------------------------------------------------------------- GPU


@requires_cuda
def test_cupy_matches_numpy():  # pragma: no cover - needs a GPU
    import cupy

    cfg = GPTConfig(vocab_size=50, n_ctx=16, n_layer=2, n_head=2, n_embd=12)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 2e-4)):
        p_cpu = init_params(cfg, "cpu", seed=3, dtype=dtype)
        p_gpu = init_params(cfg, "cuda", seed=3, dtype=dtype)
        for k in p_cpu:  # the same host draws on both devices
            assert isinstance(p_gpu[k], cupy.ndarray)
            np.testing.assert_array_equal(cupy.asnumpy(p_gpu[k]), p_cpu[k])
        idx = tokens(cfg, 3, 9, 0)
        mask = np.array([[1] * 9, [0, 0] + [1] * 7, [0] * 8 + [1]])
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        G = np.random.default_rng(0).standard_normal((3, 9, cfg.vocab_size)).astype(dtype)
        for m, ps in ((None, None), (mask, pos)):
            lay = None if m is None else layout_from_attention_mask(m, ps)
            lc, cc = gpt_forward(p_cpu, idx, cfg, lay)
            lay_gpu = None if m is None else layout_from_attention_mask(m, ps, backend="cuda")
            lg, cg = gpt_forward(p_gpu, cupy.asarray(idx), cfg, lay_gpu)
            assert isinstance(lg, cupy.ndarray) and lg.dtype == dtype
            np.testing.assert_allclose(cupy.asnumpy(lg), lc, rtol=tol, atol=tol)
            gc, gg = gpt_backward(G, cc), gpt_backward(cupy.asarray(G), cg)
            for k in gc:
                assert gg[k].dtype == dtype
                scale = float(np.abs(gc[k]).max()) + 1e-6
                np.testing.assert_allclose(cupy.asnumpy(gg[k]) / scale, gc[k] / scale, atol=tol, err_msg=k)
            kv, _ = gpt_forward_kv(p_gpu, idx, cfg, attention_mask=m, position_ids=ps)
            np.testing.assert_allclose(cupy.asnumpy(kv), lc, rtol=tol, atol=tol)
