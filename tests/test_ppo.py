"""PPO's pieces: the actions' log-probs and values at the states before them, GAE against a direct sum, the clipped surrogate at
ratio 1 (the plain policy gradient) and its clipping, the value loss's clipping region, the whole
PPO loss's gradient against float64 finite differences, and the Unlikelihood gradient."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.baselines import best_of_n_kl, best_of_n_select, unlikelihood_loss, unlikelihood_step
from minidpo.model import GPTConfig
from minidpo.ppo import (
    add_value_head,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    action_positions,
    policy_value_forward,
    ppo_loss_and_grads,
    whiten,
)
from tests.test_reward_model import TINY, fd_check, random_params


def contiguous_mask(rng, B, S):
    m = np.zeros((B, S), dtype=bool)
    for b in range(B):
        s = int(rng.integers(0, S))
        e = int(rng.integers(s + 1, S + 1))
        m[b, s:e] = True
    return m


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), S=st.integers(1, 9),
       gamma=st.floats(0.5, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_equals_the_direct_sum(seed, B, S, gamma, lam):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((B, S))
    v = rng.standard_normal((B, S))
    m = contiguous_mask(rng, B, S)
    adv, ret = gae(r, v, m, gamma, lam)
    for b in range(B):
        steps = np.flatnonzero(m[b])
        vv = np.append(v[b, steps], 0.0)  # the step after the episode is terminal
        deltas = r[b, steps] + gamma * vv[1:] - vv[:-1]
        for k, t in enumerate(steps):
            direct = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(steps) - k))
            assert adv[b, t] == pytest.approx(direct, rel=1e-10, abs=1e-10)
            assert ret[b, t] == pytest.approx(direct + v[b, t], rel=1e-10, abs=1e-10)
    assert np.all(adv[~m] == 0) and np.all(ret[~m] == 0)
    # lambda = 1, gamma = 1: the advantage is the reward-to-go minus the value
    adv1, _ = gae(r, v, m, 1.0, 1.0)
    togo = np.where(m, np.cumsum((r * m)[:, ::-1], axis=1)[:, ::-1], 0.0)
    np.testing.assert_allclose(adv1, (togo - v) * m, atol=1e-10)


def test_whiten():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)) * 4 + 2
    m = contiguous_mask(rng, 3, 5)
    w = whiten(x, m)
    assert abs(w[m].mean()) < 1e-10 and abs(w[m].std() - 1) < 1e-6 and np.all(w[~m] == 0)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), S=st.integers(1, 6))
def test_clipped_surrogate_at_ratio_one_is_the_policy_gradient(seed, B, S):
    rng = np.random.default_rng(seed)
    logp = rng.standard_normal((B, S))
    adv = rng.standard_normal((B, S))
    m = contiguous_mask(rng, B, S)
    loss, dlogp, clipfrac = clipped_surrogate(logp, logp.copy(), adv, m, clip=0.2)
    n = m.sum()
    assert loss == pytest.approx(-(adv * m).sum() / n)
    np.testing.assert_allclose(dlogp, -adv * m / n, atol=1e-15)  # REINFORCE with advantage A
    assert clipfrac == 0


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), S=st.integers(1, 6), clip=st.floats(0.05, 0.5))
def test_clipped_surrogate_gradient_matches_finite_differences_and_vanishes_when_clipped(seed, B, S, clip):
    rng = np.random.default_rng(seed)
    old = rng.standard_normal((B, S))
    logp = old + rng.uniform(-1, 1, (B, S))
    adv = rng.standard_normal((B, S))
    m = contiguous_mask(rng, B, S)
    rho = np.exp(logp - old)
    # stay away from the kinks |rho - 1| = clip, where the loss is not differentiable
    keep = np.abs(np.abs(rho - 1) - clip) > 1e-3
    _, dlogp, _ = clipped_surrogate(logp, old, adv, m, clip)
    eps = 1e-7
    for b in range(B):
        for t in range(S):
            if not keep[b, t]:
                continue
            lp, lm = logp.copy(), logp.copy()
            lp[b, t] += eps
            lm[b, t] -= eps
            num = (clipped_surrogate(lp, old, adv, m, clip)[0] - clipped_surrogate(lm, old, adv, m, clip)[0]) / (2 * eps)
            assert dlogp[b, t] == pytest.approx(num, rel=1e-5, abs=1e-8)
            # pessimistic bound: a ratio pushed past the clip in the advantage's direction gets no gradient
            if m[b, t] and ((adv[b, t] > 0 and rho[b, t] > 1 + clip) or (adv[b, t] < 0 and rho[b, t] < 1 - clip)):
                assert dlogp[b, t] == 0


def test_value_loss_clipping_region():
    old = np.zeros((1, 4))
    ret = np.array([[1.0, 1.0, -1.0, 1.0]])
    m = np.ones((1, 4), dtype=bool)
    # v moved past the clip towards the return: the clipped square is larger, v_c is flat -> no gradient
    # v inside the clip: both squares equal -> gradient (v - G)
    # v moved past the clip away from the return: the unclipped square is larger -> gradient (v - G)
    v = np.array([[0.5, 0.1, 0.5, -0.5]])
    loss, dv = clipped_value_loss(v, old, ret, m, clip=0.2)
    n = 4
    expect_loss = 0.5 * np.mean([(0.2 - 1) ** 2, (0.1 - 1) ** 2, (0.5 + 1) ** 2, (-0.5 - 1) ** 2])
    assert loss == pytest.approx(expect_loss)
    np.testing.assert_allclose(dv, [[0.0, (0.1 - 1) / n, (0.5 + 1) / n, (-0.5 - 1) / n]])


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), S=st.integers(1, 6), clip=st.floats(0.05, 0.5))
def test_value_loss_gradient_matches_finite_differences(seed, B, S, clip):
    rng = np.random.default_rng(seed)
    old = rng.standard_normal((B, S))
    v = old + rng.uniform(-1, 1, (B, S))
    ret = rng.standard_normal((B, S))
    m = contiguous_mask(rng, B, S)
    _, dv = clipped_value_loss(v, old, ret, m, clip)
    eps = 1e-7
    for b in range(B):
        for t in range(S):
            if abs(abs(v[b, t] - old[b, t]) - clip) < 1e-3:
                continue
            vp, vm = v.copy(), v.copy()
            vp[b, t] += eps
            vm[b, t] -= eps
            num = (clipped_value_loss(vp, old, ret, m, clip)[0] - clipped_value_loss(vm, old, ret, m, clip)[0]) / (2 * eps)
            assert dv[b, t] == pytest.approx(num, rel=1e-5, abs=1e-8)


def test_actions_log_probs_and_values_are_read_at_the_states_before_them():
    """logp[b, t] = log softmax(logits[b, t])[ids[b, t+1]] and V[b, t] = h[b, t] w + b_v, t = 0..T-2,
    from the full forward; policy_value_forward computes only those B (T-1) positions."""
    from minidpo.logprobs import log_softmax
    from minidpo.model import final_hidden, gpt_forward
    from minidpo.reward_model import split_head

    rng = np.random.default_rng(0)
    params = add_value_head(random_params(TINY, 0), TINY)
    params["value.weight"] = rng.standard_normal(TINY.n_embd)
    ids = rng.integers(0, TINY.vocab_size, (2, 5))
    assert action_positions(2, 5).tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    logp, v, _ = policy_value_forward(params, TINY, ids)
    trunk, head = split_head(params, "value")
    logits, cache = gpt_forward(trunk, ids, TINY)
    want = np.take_along_axis(log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(logp, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v, final_hidden(cache)[:, :-1] @ head["weight"] + head["bias"][0], rtol=1e-12)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), T=st.integers(2, 7), vf_coef=st.floats(0.05, 1.0))
def test_ppo_loss_gradient_matches_finite_differences(seed, B, T, vf_coef):
    """Every parameter tensor of policy + value head, with old log-probs and values drawn near the
    current ones so that some steps are clipped and some are not."""
    rng = np.random.default_rng(seed)
    params = add_value_head(random_params(TINY, seed), TINY)
    params["value.weight"] = rng.standard_normal(TINY.n_embd)
    params["value.bias"] = rng.standard_normal(1)
    S = T - 1
    ids = rng.integers(0, TINY.vocab_size, (B, T))
    mask = contiguous_mask(rng, B, S)
    logp, v, _ = policy_value_forward(params, TINY, ids)
    mb = {"input_ids": ids, "mask": mask, "old_logp": logp + rng.uniform(-0.5, 0.5, (B, S)),
          "old_values": v + rng.uniform(-0.5, 0.5, (B, S)), "advantages": rng.standard_normal((B, S)),
          "returns": rng.standard_normal((B, S))}
    loss, stats, grads = ppo_loss_and_grads(params, TINY, mb, 0.2, 0.2, vf_coef)
    assert set(grads) == set(params) and all(grads[k].dtype == np.float64 for k in grads)
    fd_check(params, lambda: float(ppo_loss_and_grads(params, TINY, mb, 0.2, 0.2, vf_coef)[0]), grads, rng,
             eps=1e-6, rtol=1e-4, atol=1e-7)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31), N=st.integers(1, 3), T=st.integers(2, 7), alpha=st.floats(0.0, 2.0))
def test_unlikelihood_gradient_matches_finite_differences(seed, N, T, alpha):
    from tests.test_reward_model import pref_batch

    rng = np.random.default_rng(seed)
    params = random_params(TINY, seed)
    batch = pref_batch(rng, N, T)
    loss, grads = unlikelihood_step(params, TINY, batch, alpha)
    fd_check(params, lambda: float(unlikelihood_step(params, TINY, batch, alpha)[0]), grads, rng,
             rtol=1e-5, atol=1e-8)


def test_unlikelihood_loss_values():
    lp = np.log(np.array([0.5, 0.25, 0.9]))  # two chosen tokens, one rejected
    chosen = np.array([True, True, False])
    loss, d = unlikelihood_loss(lp, chosen, alpha=0.5)
    assert loss == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2 - 0.5 * math.log(0.1))
    np.testing.assert_allclose(d, [-0.5, -0.5, 0.5 * 0.9 / 0.1], rtol=1e-9)
    # alpha = 0 is Preferred-FT's NLL on the chosen half
    _, d0 = unlikelihood_loss(lp, chosen, alpha=0.0)
    assert d0[2] == 0


def test_best_of_n_kl_matches_a_sampled_estimate():
    """For a continuous reward, the best of N draws from p has density N F^(N-1) p, so
    KL = E_BoN[log N + (N-1) log F(y)]; a Monte Carlo estimate of it from sampled best-of-N
    draws agrees with log N - (N-1)/N within 4 standard errors, for several N."""
    rng = np.random.default_rng(0)
    from math import erf, sqrt

    Phi = np.vectorize(lambda x: 0.5 * (1 + erf(x / sqrt(2))))
    for n in (1, 2, 4, 16, 64):
        y = rng.standard_normal((20000, n))  # reward = y itself; base policy N(0, 1)
        best = y[np.arange(len(y)), best_of_n_select(y)]
        log_ratio = math.log(n) + (n - 1) * np.log(Phi(best))
        est, se = log_ratio.mean(), log_ratio.std(ddof=1) / math.sqrt(len(log_ratio))
        assert abs(est - best_of_n_kl(n)) <= 4 * se + 1e-12, (n, est, best_of_n_kl(n), se)
    assert best_of_n_kl(1) == 0.0
    with pytest.raises(ValueError):
        best_of_n_kl(0)


def test_float32_in_float32_out():
    """No float64 creep: float32 inputs give float32 losses, gradients and GAE targets."""
    rng = np.random.default_rng(0)
    f = np.float32
    B, S = 2, 5
    r, v = rng.standard_normal((B, S)).astype(f), rng.standard_normal((B, S)).astype(f)
    m = contiguous_mask(rng, B, S)
    adv, ret = gae(r, v, m, 1.0, 0.95)
    assert adv.dtype == f and ret.dtype == f and whiten(adv, m).dtype == f
    loss, d, cf = clipped_surrogate(r, v, adv, m)
    assert loss.dtype == f and d.dtype == f
    loss, d = clipped_value_loss(r, v, ret, m)
    assert loss.dtype == f and d.dtype == f
    loss, d = unlikelihood_loss(-np.abs(r).reshape(-1), m.reshape(-1), 0.5)
    assert loss.dtype == f and d.dtype == f
    params = add_value_head(random_params(TINY, 0, dtype=f), TINY)
    ids = rng.integers(0, TINY.vocab_size, (B, S + 1))
    mb = {"input_ids": ids, "mask": m, "old_logp": r, "old_values": v, "advantages": adv, "returns": ret}
    loss, stats, grads = ppo_loss_and_grads(params, TINY, mb)
    assert loss.dtype == f and all(g.dtype == f for g in grads.values())
    assert all(s.dtype == f for s in stats.values())


def test_the_rollout_reward_is_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    """collect_rollout's per-token reward against one written here: -beta_KL (log pi - log pi_ref)
    on every response token, plus R(x, y) on the last one, with a stub score and a policy that is
    not the reference (so the penalty's sign shows)."""
    from minidpo.backend import get_backend
    from minidpo.model import gpt_forward
    from minidpo.ppo import PPOConfig, collect_rollout

    class Tok:  # ids are their own text; EOS = pad = 0
        eos_id = pad_id = 0

        def decode(self, ids):
            return " ".join(map(str, ids))

    policy, reference = random_params(TINY, 1), random_params(TINY, 2)
    prompts = [[1, 2], [3], [4, 5, 6]]
    scores = np.array([10.0, -20.0, 30.0])
    pc = PPOConfig(kl_coef=0.3, max_new_tokens=4)
    ro = collect_rollout(add_value_head(policy, TINY), reference, TINY, prompts, ["a", "b", "c"],
                         lambda texts_x, texts_y, items: scores, Tok(), pc, np.random.default_rng(0), get_backend("cpu"))

    def logp(params):  # log pi(y_t | ...) of every next token, written out: log_softmax and gather
        logits, _ = gpt_forward(params, ro.input_ids, TINY)
        z = logits[:, :-1] - logits[:, :-1].max(axis=-1, keepdims=True)
        lsm = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return np.take_along_axis(lsm, ro.input_ids[:, 1:, None], axis=-1)[..., 0]  # (B, S)

    mask = np.asarray(ro.mask, dtype=np.float64)
    want = -0.3 * (logp(policy) - logp(reference)) * mask
    for b in range(len(prompts)):
        last = int(np.flatnonzero(mask[b])[-1])  # the row's last response token
        want[b, last] += scores[b]
    assert np.abs(logp(policy) - logp(reference)).max() > 1e-2  # the penalty is not trivially 0
    np.testing.assert_allclose(np.asarray(ro.rewards), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(ro.scores, scores)
