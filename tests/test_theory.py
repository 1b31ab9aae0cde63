"""The paper's theory, checked exactly on random tables of X prompts x Y responses."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo.logprobs import log_softmax
from minidpo.losses import dpo_loss, reward_model_loss
from minidpo.theory import (
    bradley_terry_prob,
    expected_dpo_loss,
    kl_regularized_objective,
    log_partition,
    optimal_policy,
    preference_distribution,
    reward_from_policy,
)
from tests.conftest import numeric_grad

betas = st.sampled_from([0.05, 0.1, 0.5, 1.0, 4.0])


@st.composite
def worlds(draw, max_X=4, max_Y=6):
    """(reward (X, Y), log_pi_ref (X, Y), rng) with rewards on a few scales."""
    X = draw(st.integers(1, max_X))
    Y = draw(st.integers(2, max_Y))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    reward = scale * rng.standard_normal((X, Y))
    log_pi_ref = log_softmax(rng.standard_normal((X, Y)))
    return reward, log_pi_ref, rng


# ----------------------------------------------------------------------------------------------
# eq. (4), (5), (6): the optimum, Z(x), and the reward recovered from the policy


@given(worlds(), betas)
def test_optimal_policy_matches_eq4_written_out(world, beta):
    """pi_r = pi_ref exp(r / beta) / Z(x), computed here in probability space for moderate values."""
    reward, log_pi_ref, _ = world
    log_pi = optimal_policy(reward, log_pi_ref, beta)
    unnorm = np.exp(log_pi_ref) * np.exp(reward / beta)  # (X, Y)
    Z = unnorm.sum(axis=1)  # (X,)
    np.testing.assert_allclose(np.exp(log_pi), unnorm / Z[:, None], rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(log_partition(reward, log_pi_ref, beta), np.log(Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.exp(log_pi).sum(1), 1.0, rtol=1e-12)


@given(worlds(), betas)
def test_log_Z_is_the_per_prompt_shift_and_cancels(world, beta):
    """Eq. (5): r - beta log(pi_r / pi_ref) = beta log Z(x), the same for every y of a prompt;
    so reward differences, and hence Bradley-Terry probabilities (eq. 6), are unchanged."""
    reward, log_pi_ref, _ = world
    log_pi = optimal_policy(reward, log_pi_ref, beta)
    log_Z = log_partition(reward, log_pi_ref, beta)
    r_hat = reward_from_policy(log_pi, log_pi_ref, beta)  # eq. (8), no log Z
    shift = reward - r_hat  # (X, Y) should be beta log Z(x) in every column
    np.testing.assert_allclose(shift, np.broadcast_to(beta * log_Z[:, None], shift.shape), rtol=1e-9, atol=1e-9)
    # sign check: eq. (5) is r = beta log(pi/pi_ref) + beta log Z, not minus
    np.testing.assert_allclose(reward_from_policy(log_pi, log_pi_ref, beta, log_Z=log_Z), reward, rtol=1e-9, atol=1e-9)
    # differences and Bradley-Terry probabilities agree for all pairs
    d_true = reward[:, :, None] - reward[:, None, :]
    d_hat = r_hat[:, :, None] - r_hat[:, None, :]
    np.testing.assert_allclose(d_hat, d_true, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        bradley_terry_prob(r_hat[:, :, None], r_hat[:, None, :]),
        bradley_terry_prob(reward[:, :, None], reward[:, None, :]),
        rtol=1e-9,
        atol=1e-12,
    )


@given(worlds(), betas, st.integers(0, 2**32 - 1))
def test_theorem1_a_function_of_x_changes_nothing(world, beta, seed):
    """Theorem 1 / Lemma 1-2: r and r + f(x) have the same optimal policy and the same preferences."""
    reward, log_pi_ref, _ = world
    f = 10.0 * np.random.default_rng(seed).standard_normal(reward.shape[0])  # (X,)
    shifted = reward + f[:, None]
    np.testing.assert_allclose(optimal_policy(shifted, log_pi_ref, beta), optimal_policy(reward, log_pi_ref, beta), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        bradley_terry_prob(shifted[:, :, None], shifted[:, None, :]),
        bradley_terry_prob(reward[:, :, None], reward[:, None, :]),
        rtol=1e-9,
        atol=1e-12,
    )
    # what does move is log Z(x), by exactly f(x) / beta
    np.testing.assert_allclose(
        log_partition(shifted, log_pi_ref, beta) - log_partition(reward, log_pi_ref, beta), f / beta, rtol=1e-9, atol=1e-8
    )


@given(worlds())
def test_tiny_and_huge_beta_are_stable(world):
    """beta -> 0: pi_r -> the argmax of r (r / beta ~ 1e8 must not overflow);
    beta -> inf: pi_r -> pi_ref."""
    reward, log_pi_ref, _ = world
    reward = reward + 1e-3 * np.arange(reward.shape[1])  # break ties
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        tiny = optimal_policy(reward, log_pi_ref, 1e-8)
        log_Z = log_partition(reward, log_pi_ref, 1e-8)
    assert np.all(np.isfinite(log_Z))
    best = np.argmax(reward, axis=1)
    np.testing.assert_allclose(np.exp(tiny)[np.arange(len(best)), best], 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(tiny).sum(1), 1.0, rtol=1e-12)
    # beta log Z -> max_y r as beta -> 0
    np.testing.assert_allclose(1e-8 * log_Z, reward.max(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(optimal_policy(reward, log_pi_ref, 1e8), log_pi_ref, rtol=1e-6, atol=1e-6)


def test_optimal_policy_rejects_probabilities_with_a_hint():
    pi_ref = np.array([[0.2, 0.3, 0.5]])
    with pytest.raises(ValueError, match="look like probabilities"):
        optimal_policy(np.zeros((1, 3)), pi_ref, 0.1)
    np.testing.assert_allclose(np.exp(optimal_policy(np.zeros((1, 3)), np.log(pi_ref), 0.1)), pi_ref)
    with pytest.raises(ValueError, match="beta"):
        optimal_policy(np.zeros((1, 3)), np.log(pi_ref), 0.0)
    with pytest.raises(ValueError, match="shape"):
        optimal_policy(np.zeros((2, 3)), np.log(pi_ref), 0.1)
    with pytest.raises(ValueError, match="log_Z"):
        reward_from_policy(np.log(pi_ref), np.log(pi_ref), 0.1, log_Z=np.zeros(3))


# ----------------------------------------------------------------------------------------------
# eq. (3): pi_r is its maximiser


@given(worlds(), betas, st.integers(0, 2**32 - 1))
def test_eq4_maximises_eq3(world, beta, seed):
    """No perturbation of pi_r scores higher on the KL-regularised objective; pi_r scores
    beta log Z(x) exactly (the objective's value at the optimum)."""
    reward, log_pi_ref, _ = world
    rng = np.random.default_rng(seed)
    log_pi = optimal_policy(reward, log_pi_ref, beta)
    J = kl_regularized_objective(log_pi, reward, log_pi_ref, beta)  # (X,)
    np.testing.assert_allclose(J, beta * log_partition(reward, log_pi_ref, beta), rtol=1e-9, atol=1e-9)
    for size in (1e-4, 1e-2, 1.0, 5.0):
        other = log_softmax(log_pi + size * rng.standard_normal(log_pi.shape))
        assert np.all(kl_regularized_objective(other, reward, log_pi_ref, beta) <= J + 1e-12)
    assert kl_regularized_objective(log_pi_ref, reward, log_pi_ref, beta, mean=True) <= J.mean() + 1e-12


@given(worlds(), betas)
def test_objective_is_expected_reward_minus_beta_kl(world, beta):
    """Eq. (3) written out term by term; pi_ref itself scores its expected reward (KL = 0)."""
    reward, log_pi_ref, rng = world
    log_pi = log_softmax(rng.standard_normal(reward.shape))
    pi = np.exp(log_pi)
    expected_r = (pi * reward).sum(1)
    kl = (pi * (log_pi - log_pi_ref)).sum(1)
    np.testing.assert_allclose(kl_regularized_objective(log_pi, reward, log_pi_ref, beta), expected_r - beta * kl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kl_regularized_objective(log_pi_ref, reward, log_pi_ref, beta), (np.exp(log_pi_ref) * reward).sum(1), rtol=1e-12)


def test_objective_handles_zero_probabilities():
    """0 log 0 = 0: a policy may put no mass on a response; mass where pi_ref has none is -inf."""
    reward = np.array([[1.0, 2.0, 3.0]])
    with np.errstate(divide="ignore"):
        log_pi_ref = np.log(np.array([[0.5, 0.5, 0.0]]))  # the third response is impossible under pi_ref
        log_pi = np.log(np.array([[0.25, 0.75, 0.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        J = kl_regularized_objective(log_pi, reward, log_pi_ref, 1.0)
        opt = optimal_policy(reward, log_pi_ref, 1.0)
    expect = 0.25 * (1 - math.log(0.25 / 0.5)) + 0.75 * (2 - math.log(0.75 / 0.5))
    assert J[0] == pytest.approx(expect, rel=1e-12)
    assert np.exp(opt[0, 2]) == 0.0  # the optimum stays inside pi_ref's support
    with np.errstate(divide="ignore"):
        bad = np.log(np.array([[0.25, 0.25, 0.5]]))
    assert kl_regularized_objective(bad, reward, log_pi_ref, 1.0)[0] == -np.inf


# ----------------------------------------------------------------------------------------------
# eq. (1): Bradley-Terry, and the distribution of labelled pairs


@given(st.floats(-50, 50), st.floats(-50, 50))
def test_bradley_terry(r1, r2):
    p = float(bradley_terry_prob(np.array(r1), np.array(r2)))
    q = float(bradley_terry_prob(np.array(r2), np.array(r1)))
    assert p + q == pytest.approx(1.0, abs=1e-15)
    assert p == pytest.approx(math.exp(r1) / (math.exp(r1) + math.exp(r2)), rel=1e-12, abs=1e-300)


@given(worlds())
def test_preference_distribution(world):
    reward, _, rng = world
    X, Y = reward.shape
    W = preference_distribution(reward)
    assert W.shape == (X, Y, Y) and np.all(W >= 0)
    assert W.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_array_equal(np.diagonal(W, axis1=1, axis2=2), 0.0)
    # the odds of i beating j are exp(r_i - r_j), eq. (1)
    i, j = np.triu_indices(Y, 1)
    np.testing.assert_allclose(W[:, i, j] / W[:, j, i], np.exp(reward[:, i] - reward[:, j]), rtol=1e-10)
    # each unordered pair shown with probability 1 / C(Y, 2) per prompt, prompts uniform
    np.testing.assert_allclose(W[:, i, j] + W[:, j, i], 1.0 / (X * len(i)), rtol=1e-12)
    # non-uniform prompts and pairs
    rho = rng.dirichlet(np.ones(X))
    u = rng.random((Y, Y)) * (1 - np.eye(Y))
    u /= u.sum()
    W2 = preference_distribution(reward, prompt_probs=rho, pair_probs=u)
    np.testing.assert_allclose(W2.sum(axis=(1, 2)), rho, rtol=1e-12)
    with pytest.raises(ValueError, match="zero diagonal"):
        preference_distribution(reward, pair_probs=np.full((Y, Y), 1.0 / Y**2))
    with pytest.raises(ValueError, match="prompt_probs"):
        preference_distribution(reward, prompt_probs=np.full(X, 2.0))


# ----------------------------------------------------------------------------------------------
# the DPO loss of a policy is the eq. (2) loss of its implicit reward


@given(worlds(), betas)
def test_dpo_loss_of_a_policy_is_the_reward_loss_of_its_implicit_reward(world, beta):
    """Over every ordered pair of a table: L_DPO(pi) = L_R(beta log pi/pi_ref) pair by pair,
    and so also in expectation under any preference distribution."""
    reward, log_pi_ref, rng = world
    X, Y = reward.shape
    theta = rng.standard_normal((X, Y))
    log_pi = log_softmax(theta)
    r_hat = reward_from_policy(log_pi, log_pi_ref, beta)  # eq. (8)
    x, i, j = (a.ravel() for a in np.meshgrid(np.arange(X), np.arange(Y), np.arange(Y), indexing="ij"))
    out = dpo_loss(log_pi[x, i], log_pi[x, j], log_pi_ref[x, i], log_pi_ref[x, j], beta=beta)
    rm, _, _ = reward_model_loss(r_hat[x, i], r_hat[x, j])
    np.testing.assert_allclose(out.losses, rm, rtol=1e-12, atol=1e-15)
    W = preference_distribution(reward)
    loss, _ = expected_dpo_loss(theta, log_pi_ref, W, beta)
    assert float(loss) == pytest.approx(float((W.ravel() * rm).sum()), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# the expected DPO loss: gradient, stationary point, and convergence of gradient descent


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.2), dict(loss_type="ipo"), dict(loss_type="robust", label_smoothing=0.1)], ids=str)
@given(world=worlds(max_X=3, max_Y=4), beta=betas)
def test_expected_loss_gradient_matches_finite_differences(kw, world, beta):
    reward, log_pi_ref, rng = world
    theta = rng.standard_normal(reward.shape)
    W = preference_distribution(reward)
    _, analytic = expected_dpo_loss(theta, log_pi_ref, W, beta, **kw)
    numeric = numeric_grad(lambda x: float(expected_dpo_loss(x, log_pi_ref, W, beta, **kw)[0]), theta.copy())
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)


@given(worlds(), betas)
def test_eq4_optimum_is_a_stationary_point_of_the_expected_dpo_loss(world, beta):
    """Under Bradley-Terry preferences the expected DPO gradient vanishes at pi_r, and the loss
    there is below that of any perturbed policy."""
    reward, log_pi_ref, rng = world
    W = preference_distribution(reward)
    opt = optimal_policy(reward, log_pi_ref, beta)
    loss, grad = expected_dpo_loss(opt, log_pi_ref, W, beta)
    assert np.max(np.abs(grad)) < 1e-12
    for _ in range(3):
        other = opt + 0.3 * rng.standard_normal(opt.shape)
        assert float(expected_dpo_loss(other, log_pi_ref, W, beta)[0]) >= float(loss) - 1e-14


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_gradient_descent_on_exact_preferences_reaches_eq4(beta):
    """Tabular DPO from pi = pi_ref, plain gradient descent on the expected loss, converges to
    pi_r = pi_ref exp(r / beta) / Z: max |log pi - log pi_r| < 1e-3."""
    rng = np.random.default_rng(int(beta * 100))
    X, Y = 4, 6
    reward = rng.standard_normal((X, Y))
    log_pi_ref = log_softmax(rng.standard_normal((X, Y)))
    W = preference_distribution(reward)
    target = optimal_policy(reward, log_pi_ref, beta)
    # a step of 1 / (curvature bound): beta^2 / 4 times the Laplacian of W, eigenvalues <= 2 max degree
    lr = 2.0 / (beta**2 * (W + W.transpose(0, 2, 1)).sum(2).max())
    theta = log_pi_ref.copy()
    start = np.abs(log_softmax(theta) - target).max()
    for _ in range(400):
        _, g = expected_dpo_loss(theta, log_pi_ref, W, beta)
        theta -= lr * g
    gap = np.abs(log_softmax(theta) - target).max()
    assert start > 0.1  # the policy really had to move
    assert gap < 1e-3
    # and its implicit reward is the true reward up to beta log Z(x)
    r_hat = reward_from_policy(log_softmax(theta), log_pi_ref, beta, log_Z=log_partition(reward, log_pi_ref, beta))
    np.testing.assert_allclose(r_hat, reward, atol=1e-3 * beta)


def test_expected_loss_checks_its_arguments():
    reward = np.zeros((2, 3))
    with pytest.raises(ValueError, match="pair_weights"):
        expected_dpo_loss(np.zeros((2, 3)), np.log(np.full((2, 3), 1 / 3)), np.zeros((2, 3)), 0.1)
    with pytest.raises(ValueError, match="at least 2 responses"):
        preference_distribution(np.zeros((2, 1)))
    assert preference_distribution(reward).dtype == np.float64
    assert preference_distribution(reward.astype(np.float32)).dtype == np.float32
    lr32 = np.log(np.full((2, 3), 1 / 3, dtype=np.float32))
    loss, g = expected_dpo_loss(np.zeros((2, 3), np.float32), lr32, preference_distribution(reward.astype(np.float32)), 0.1)
    assert g.dtype == np.float32 and loss.dtype == np.float32
    assert optimal_policy(reward.astype(np.float32), lr32, 0.1).dtype == np.float32
