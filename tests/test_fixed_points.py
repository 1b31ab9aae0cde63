"""What each loss converges to on the paper's tabular world (minidpo.theory): the exact expected loss
of every row and its gradient, descent to its fixed point, and that fixed point held to its derived
value where one is known -- eq. (4) for eq. 7, IPO's pi_ref exp(p(y > U)/beta), f-DPO's
(f')^-1(r/beta + c), the per-token losses' length scaling, SimPO's length bias, the SFT pull of the
NLL terms -- and shown away from eq. 4 where the loss does not recover it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.logprobs import log_softmax
from minidpo.losses import LOSS_TABLE
from minidpo.theory import (
    derived_fixed_point,
    expected_dpo_loss,
    expected_loss,
    fixed_point,
    optimal_policy,
    policy_summary,
    preference_distribution,
    response_marginal,
)
from tests.conftest import numeric_grad


@st.composite
def worlds(draw, max_X=3, max_Y=5, lengths=True):
    X = draw(st.integers(1, max_X))
    Y = draw(st.integers(2, max_Y))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    reward = draw(st.sampled_from([0.5, 1.0, 2.0])) * rng.standard_normal((X, Y))
    log_pi_ref = log_softmax(rng.standard_normal((X, Y)))
    L = rng.integers(1, 5, (X, Y)).astype(float) if lengths else np.ones((X, Y))
    return reward, log_pi_ref, L, rng


EXPECTABLE = [n for n in LOSS_TABLE if n not in ("aot", "aot_unpaired")]


@pytest.mark.parametrize("name", EXPECTABLE)
@settings(max_examples=5)
@given(world=worlds(), beta=st.sampled_from([0.2, 0.5, 1.0]))
def test_expected_loss_gradient_matches_finite_differences(name, world, beta):
    reward, log_ref, L, rng = world
    W = preference_distribution(reward)
    theta = log_ref + 0.5 * rng.standard_normal(reward.shape)
    inputs = {"reference_point": 0.3} if name == "kto" else ({"reward_mean": -0.2} if name == "bco_pair" else None)
    loss, g = expected_loss(theta, log_ref, W, beta, name, L, inputs)
    if name == "hinge":  # the kinks: compare away from them only (one-sided differences differ there)
        num = numeric_grad(lambda t: float(expected_loss(t, log_ref, W, beta, name, L, inputs)[0]), theta.copy(), h=1e-7)
        np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-5)
        return
    num = numeric_grad(lambda t: float(expected_loss(t, log_ref, W, beta, name, L, inputs)[0]), theta.copy())
    np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)


def test_expected_loss_of_eq7_is_expected_dpo_loss():
    rng = np.random.default_rng(0)
    reward, log_ref = rng.standard_normal((3, 4)), log_softmax(rng.standard_normal((3, 4)))
    W = preference_distribution(reward)
    theta = rng.standard_normal((3, 4))
    a, ga = expected_loss(theta, log_ref, W, 0.3, "sigmoid", lengths=rng.integers(1, 5, (3, 4)))  # lengths: unused (sums)
    b, gb = expected_dpo_loss(theta, log_ref, W, 0.3)
    assert float(a) == pytest.approx(float(b), rel=1e-14)
    np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="couples the pairs of a batch"):
        expected_loss(theta, log_ref, W, 0.3, "aot")


# ---------------------------------------------------------------------------------------------- derived fixed points

DERIVED = [("sigmoid", {}, True), ("sigmoid_norm", {}, True), ("ipo", {}, True), ("ipo", {}, False), ("sft", {}, True),
           ("sigmoid", {"f_divergence": "forward_kl"}, False), ("sigmoid", {"f_divergence": "js_divergence"}, False),
           ("sigmoid", {"f_divergence": "alpha_divergence", "f_alpha": 0.3}, False)]


@pytest.mark.parametrize("name,options,with_lengths", DERIVED,
                         ids=[f"{n}-{o.get('f_divergence', '')}-{'L' if w else '1'}" for n, o, w in DERIVED])
@settings(max_examples=5)
@given(data=st.data(), beta=st.sampled_from([0.3, 0.5, 1.0, 2.0]))
def test_descent_reaches_the_derived_fixed_point(name, options, with_lengths, data, beta):
    reward, log_ref, L, _ = data.draw(worlds(lengths=with_lengths))
    fp = fixed_point(reward, log_ref, beta, name, lengths=L, **options)
    assert fp["converged"], fp["grad"]
    want = derived_fixed_point(reward, log_ref, beta, name, lengths=L, **options)
    np.testing.assert_allclose(fp["log_pi"], want, atol=1e-7)


@settings(max_examples=5)
@given(world=worlds(lengths=False), beta=st.sampled_from([0.1, 0.5, 2.0]))
def test_eq7_recovers_eq4_and_the_per_token_loss_does_so_only_at_equal_lengths(world, beta):
    reward, log_ref, ones, rng = world
    opt = optimal_policy(reward, log_ref, beta)
    np.testing.assert_allclose(fixed_point(reward, log_ref, beta, "sigmoid")["log_pi"], opt, atol=1e-7)
    np.testing.assert_allclose(fixed_point(reward, log_ref, beta, "sigmoid_norm", lengths=ones)["log_pi"], opt, atol=1e-7)
    L = ones.copy()
    L[:, 0] = 3.0  # one longer response per prompt: g = L (r/beta + c) is not eq. 4
    moved = fixed_point(reward, log_ref, beta, "sigmoid_norm", lengths=L)["log_pi"]
    assert np.max(np.abs(moved - opt)) > 1e-5


def test_ipo_fixed_point_is_the_ipo_papers():
    """Azar et al.: pi* ~ pi_ref exp(p(y > mu) / tau), mu uniform here (pairs drawn uniformly), written
    out with the preference probabilities directly."""
    rng = np.random.default_rng(3)
    reward, log_ref, beta = rng.standard_normal((2, 4)), log_softmax(rng.standard_normal((2, 4))), 0.4
    p = 1 / (1 + np.exp(-(reward[:, :, None] - reward[:, None, :])))  # p(y > y'), p(y > y) = 1/2
    want = log_softmax(log_ref + p.mean(axis=2) / beta)
    np.testing.assert_allclose(fixed_point(reward, log_ref, beta, "ipo")["log_pi"], want, atol=1e-8)
    assert policy_summary(want, reward, log_ref, beta)["kl_opt"] > 1e-3  # not eq. 4


def test_simpo_length_bias_with_equal_rewards():
    """With every reward equal eq. 4's optimum is pi_ref itself, yet SimPO's fixed point is log pi = c L:
    the same for two different references, shorter responses more likely."""
    rng = np.random.default_rng(4)
    L = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 5.0]])
    flat = np.zeros_like(L)
    a = fixed_point(flat, log_softmax(rng.standard_normal(L.shape)), 0.5, "simpo", lengths=L)["log_pi"]
    b = fixed_point(flat, log_softmax(rng.standard_normal(L.shape)), 0.5, "simpo", lengths=L)["log_pi"]
    np.testing.assert_allclose(a, b, atol=1e-7)
    np.testing.assert_allclose(a, derived_fixed_point(flat, log_softmax(np.zeros_like(L)), 0.5, "simpo", lengths=L),
                               atol=1e-7)
    assert np.all(np.diff(a[0]) < 0)  # longer, less likely
    np.testing.assert_allclose(a / L, np.broadcast_to((a / L)[:, :1], L.shape), atol=1e-7)  # one per-token log-prob a prompt


def test_orpo_is_pulled_to_the_chosen_responses():
    """ORPO's NLL term pulls towards q(y)/L(y), q = P(y chosen), the per-token NLL's minimiser: its
    fixed point reaches it as lambda (beta) -> 0, the gap shrinking in proportion."""
    rng = np.random.default_rng(5)
    reward, log_ref = rng.standard_normal((2, 5)), log_softmax(rng.standard_normal((2, 5)))
    L = rng.integers(1, 5, (2, 5)).astype(float)
    gaps = []
    for lam in (0.1, 0.01, 0.001):
        fp = fixed_point(reward, log_ref, lam, "orpo", lengths=L)
        gaps.append(float(np.max(np.abs(fp["log_pi"] - derived_fixed_point(reward, log_ref, lam, "orpo", lengths=L)))))
    assert gaps[2] < 5e-3 and gaps[1] == pytest.approx(10 * gaps[2], rel=0.2) and gaps[0] > gaps[1]
    q = preference_distribution(reward)[0].sum(axis=1)
    np.testing.assert_allclose(np.exp(derived_fixed_point(reward, log_ref, 0.1, "sft", lengths=L)[0]),
                               (q / L[0]) / (q / L[0]).sum(), rtol=1e-12)


@pytest.mark.parametrize("name,options", [("sigmoid", {"label_smoothing": 0.1}), ("robust", {"label_smoothing": 0.1}),
                                          ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}), ("discopop", {}),
                                          ("cpo", {}), ("orpo", {}), ("weighted_sum", {}), ("alphapo", {})])
def test_the_losses_that_end_elsewhere(name, options):
    """Stationary, and measurably away from eq. 4 (the table in the README has the numbers)."""
    rng = np.random.default_rng(0)
    reward, log_ref = rng.standard_normal((3, 5)), log_softmax(rng.standard_normal((3, 5)))
    fp = fixed_point(reward, log_ref, 0.5, name, lengths=rng.integers(1, 5, (3, 5)), **options)
    assert fp["converged"]
    assert policy_summary(fp["log_pi"], reward, log_ref, 0.5)["kl_opt"] > 1e-3


def test_kto_and_bco_inputs_are_recomputed_from_the_policy():
    rng = np.random.default_rng(6)
    reward, log_ref = rng.standard_normal((2, 4)), log_softmax(rng.standard_normal((2, 4)))
    W = preference_distribution(reward)
    m = response_marginal(W)
    assert m.shape == (4,) and m.sum() == pytest.approx(1.0)
    fp = fixed_point(reward, log_ref, 0.5, "bco_pair")
    r = 0.5 * (fp["log_pi"] - log_ref)
    delta = float(np.sum(W * 0.5 * (r[:, :, None] + r[:, None, :])))
    assert fp["converged"] and fp["inputs"]["reward_mean"] == pytest.approx(delta, abs=1e-9)  # at its own mean


@pytest.mark.slow
def test_the_fixed_point_table_script(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "fixed_points.py"
    spec = importlib.util.spec_from_file_location("fixed_points", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--no-plot", "--json", "", "--steps", "150"])
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) >= {"DPO (eq. 7)", "kto", "simpo", "orpo", "f-DPO js_divergence"}
    assert rows["DPO (eq. 7)"]["kl_opt"] < 1e-12 and rows["DPO (eq. 7)"]["derived_gap"] < 1e-8
    assert all(r["derived_gap"] < 1e-6 for r in rows.values() if "derived_gap" in r)
    assert [k for k, r in rows.items() if r.get("kl_opt", 1.0) < 1e-10] == ["DPO (eq. 7)"]
    assert res["simpo_equal_rewards_gap"] < 1e-6
    out = capsys.readouterr().out
    assert "| DPO (eq. 7) |" in out and "recovers eq. 4" in out
