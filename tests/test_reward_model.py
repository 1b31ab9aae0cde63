"""The reward model (eq. 2): scalar head on the last response token, its gradient against float64
finite differences (every parameter tensor, hypothesis-drawn shapes), the hidden-state gradient
of gpt_backward, and the accuracy / correlation read-outs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.model import GPTConfig, final_hidden, gpt_backward, gpt_forward, init_params
from minidpo.packing import Batcher, padded_batch
from minidpo.reward_model import (
    init_reward_model,
    pair_accuracy,
    pearson,
    reward_forward,
    reward_model_step,
)

TINY = GPTConfig(vocab_size=7, n_ctx=8, n_layer=2, n_head=2, n_embd=6)


def random_params(config, seed, dtype=np.float64, scale=0.3):
    rng = np.random.default_rng(seed)
    p = init_params(config, seed=seed, dtype=dtype)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}


def fd_check(params, loss, grads, rng, n_entries=3, eps=1e-6, rtol=1e-5, atol=1e-8):
    """Central differences on a few random entries of every tensor."""
    for name, p in params.items():
        flat = p.reshape(-1)
        for j in rng.choice(flat.size, size=min(n_entries, flat.size), replace=False):
            old = flat[j]
            flat[j] = old + eps
            lp = loss()
            flat[j] = old - eps
            lm = loss()
            flat[j] = old
            num = (lp - lm) / (2 * eps)
            ana = grads[name].reshape(-1)[j]
            assert abs(num - ana) <= atol + rtol * max(abs(num), abs(ana)), (name, j, num, ana)


def pref_batch(rng, N, T):
    """A padded batch of rows [chosen; rejected] with prompts of 1..T-1 tokens and responses to the
    row's end or padded before it (packing.padded_batch)."""
    ids = rng.integers(0, TINY.vocab_size, (2 * N, T))
    mask = np.zeros((2 * N, T), dtype=bool)
    for b in range(2 * N):
        p = int(rng.integers(1, T))
        end = int(rng.integers(p + 1, T + 1))
        mask[b, p:end] = True
    return padded_batch(ids, mask)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31), N=st.integers(1, 3), T=st.integers(2, 7))
def test_reward_model_gradient_matches_finite_differences(seed, N, T):
    rng = np.random.default_rng(seed)
    params = init_reward_model(random_params(TINY, seed), TINY, seed=seed)
    batch = pref_batch(rng, N, T)
    loss, _, grads = reward_model_step(params, TINY, batch)
    assert set(grads) == set(params)
    assert all(grads[k].shape == params[k].shape and grads[k].dtype == np.float64 for k in params)
    fd_check(params, lambda: float(reward_model_step(params, TINY, batch)[0]), grads, rng)


def test_gpt_backward_hidden_gradient_adds_to_the_logits_gradient():
    """L = <G, logits> + <H, h>: gpt_backward(G, cache, dhidden=H) is its gradient (FD), and
    dlogits=None means the logits term is absent."""
    rng = np.random.default_rng(3)
    params = random_params(TINY, 3)
    idx = rng.integers(0, TINY.vocab_size, (2, 5))
    G = rng.standard_normal((2, 5, TINY.vocab_size))
    H = rng.standard_normal((2, 5, TINY.n_embd))

    def loss(with_logits=True):
        logits, cache = gpt_forward(params, idx, TINY)
        return float((G * logits).sum() * with_logits + (H * final_hidden(cache)).sum())

    _, cache = gpt_forward(params, idx, TINY)
    fd_check(params, loss, gpt_backward(G, cache, dhidden=H), rng)
    _, cache = gpt_forward(params, idx, TINY)
    fd_check(params, lambda: loss(False), gpt_backward(None, cache, dhidden=H), rng)
    with pytest.raises(ValueError, match="dhidden"):
        gpt_backward(None, cache, dhidden=H[:, :3])
    with pytest.raises(ValueError, match="dlogits, dhidden"):
        gpt_backward(None, cache)


def test_reward_is_read_at_the_last_response_token():
    rng = np.random.default_rng(0)
    params = init_reward_model(random_params(TINY, 0, dtype=np.float32), TINY)
    ids = rng.integers(0, TINY.vocab_size, (1, 6))
    mask = np.array([[False, False, True, True, False, False]])
    r, _ = reward_forward(params, TINY, padded_batch(ids, mask))
    assert r.dtype == np.float32 and r.shape == (1,)
    ids2 = ids.copy()
    ids2[0, 4:] = (ids2[0, 4:] + 1) % TINY.vocab_size  # change only what comes after the last response token
    r2, _ = reward_forward(params, TINY, padded_batch(ids2, mask))
    np.testing.assert_array_equal(r, r2)
    ids3 = ids.copy()
    ids3[0, 3] = (ids3[0, 3] + 1) % TINY.vocab_size  # the last response token itself
    r3, _ = reward_forward(params, TINY, padded_batch(ids3, mask))
    assert r3[0] != r[0]
    last = padded_batch(np.zeros((2, 4), np.int64), np.array([[0, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)).last_token_at()
    np.testing.assert_array_equal(last, [2, 4 + 3])  # flat positions r * L + t


def test_reward_is_the_same_in_every_layout():
    """The reward of each response, read at its last token, is the same whether the pairs are padded
    or share their prompt in packed rows (where a rejected response's last token is not at the end
    of its own row), and so is the gradient of eq. 2 (float64)."""
    rng = np.random.default_rng(4)
    params = init_reward_model(random_params(TINY, 4), TINY, seed=4)
    ln = lambda: [int(t) for t in rng.integers(0, TINY.vocab_size, int(rng.integers(1, 3)))]  # noqa: E731
    pairs = [(ln(), ln(), ln()) for _ in range(3)]
    out = {}
    for share, pack in ((False, False), (True, True), (True, False)):
        batch = Batcher(0, share, pack).pairs(pairs)
        r, _ = reward_forward(params, TINY, batch)
        loss, _, grads = reward_model_step(params, TINY, batch)
        out[share, pack] = (r, float(loss), grads)
    r0, l0, g0 = out[False, False]
    for r, loss, g in out.values():
        np.testing.assert_allclose(r, r0, rtol=1e-12)
        assert loss == pytest.approx(l0, rel=1e-12)
        for k in g0:
            np.testing.assert_allclose(g[k], g0[k], rtol=1e-9, atol=1e-13, err_msg=k)


def test_training_separates_a_learnable_preference():
    """A few AdamW steps of eq. 2 on pairs whose chosen response ends in token 1 and rejected in 2
    reach held-out accuracy 1."""
    from minidpo.optim import AdamW

    rng = np.random.default_rng(1)
    params = init_reward_model(init_params(TINY, seed=1), TINY)

    def batch(n):
        ids = rng.integers(3, TINY.vocab_size, (2 * n, 5))
        ids[:n, 4], ids[n:, 4] = 1, 2
        mask = np.zeros((2 * n, 5), dtype=bool)
        mask[:, 2:] = True
        return padded_batch(ids, mask)

    opt = AdamW(params, lr=1e-2)
    for _ in range(60):
        loss, m, g = reward_model_step(params, TINY, batch(8))
        opt.step(params, g)
    _, m, _ = reward_model_step(params, TINY, batch(32))
    assert float(m["accuracy"]) == 1.0
    assert float(loss) < 0.2


def test_accuracy_and_correlation():
    assert pair_accuracy([1.0, 2.0, 0.0], [0.0, 3.0, 0.0]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
