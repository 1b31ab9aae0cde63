"""The DPO loss family: values, the eq. (9) gradient, and the properties the paper states.

Every analytic gradient is compared with central finite differences in float64; the closed
forms are compared with formulas written out independently here; torch autograd is a third
opinion when installed.
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minidpo.logprobs import sequence_logps, sequence_logps_backward
from minidpo.packing import padded_batch
from minidpo.losses import (
    LOSS_TYPES,
    average_logps_for,
    dpo_loss,
    implicit_reward,
    log_sigmoid,
    nll_loss,
    preference_metrics,
    reward_model_loss,
    sigmoid,
)
from minidpo.verify import check_loss
from tests.conftest import numeric_grad, requires_cuda

logp = st.floats(-60.0, -0.5, allow_nan=False)
betas = st.sampled_from([0.01, 0.1, 0.5, 1.0, 3.0])


@st.composite
def pairs(draw, min_n=1, max_n=6):
    n = draw(st.integers(min_n, max_n))
    four = [np.array(draw(st.lists(logp, min_size=n, max_size=n))) for _ in range(4)]
    return tuple(four)


def naive_log_sigmoid(x: float) -> float:
    """log(1 / (1 + exp(-x))) in Python floats, for moderate x only."""
    return -math.log1p(math.exp(-x))


def mean_loss(pw, pl, rw, rl, **kw):
    return float(np.mean(dpo_loss(pw, pl, rw, rl, **kw).losses))


def fd_grads(pw, pl, rw, rl, **kw):
    gw = numeric_grad(lambda x: mean_loss(x, pl, rw, rl, **kw), pw.copy())
    gl = numeric_grad(lambda x: mean_loss(pw, x, rw, rl, **kw), pl.copy())
    return gw, gl


# ----------------------------------------------------------------------------------------------
# the paper's properties: written once, in minidpo.verify, and run here on minidpo's own loss
#
# The worked example (loss 0.371, rewards +/-0.4, eq. 9 weight 0.310), ln 2 at the reference,
# dependence on the inputs only through h (the Z(x) shift) and on beta only through beta h,
# the eq. 9 gradient (minidpo's hand-written one, against central differences), the variant
# laws (cDPO's label mixture and its symmetry at 0.5, robust DPO's unbiasedness, IPO's minimum,
# the hinge's zero region) and large margins in float64/32/16 are all minidpo.verify properties;
# the same code checks other people's losses (`minidpo verify`, tests/test_verify.py).


def minidpo_loss(pw, pl, rw, rl, beta, label_smoothing=0.0, *, loss_type):
    """dpo_loss in verify's calling convention; DPOOutput's losses, rewards and gradients are checked."""
    return dpo_loss(pw, pl, rw, rl, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)


PAPER_CASES = [("dpo", "sigmoid", 0.1), ("cdpo", "sigmoid", 0.1), ("cdpo", "sigmoid", 0.5), ("robust", "robust", 0.0),
               ("robust", "robust", 0.2), ("ipo", "ipo", 0.1), ("hinge", "hinge", 0.1)]


@pytest.mark.parametrize("variant,loss_type,eps", PAPER_CASES, ids=lambda v: str(v))
def test_paper_properties_hold_for_minidpo(variant, loss_type, eps):
    report = check_loss(minidpo_loss, framework="numpy", variant=variant, label_smoothing=eps,
                        kwargs={"loss_type": loss_type})
    assert report.ok, report.table()
    verdicts = {r.name: r.verdict for r in report.results}
    skipped = {n for n, v in verdicts.items() if v != "pass"}
    # numpy has no autograd; this wrapper takes no token counts: everything else must have run and passed
    assert skipped == {"reference gets no gradient", "log-probs: summed or per-token"}, report.table()
    assert report.conventions["gradients"] == "hand-written (checked)"
    assert report.conventions["loss returned"].startswith("per-pair")


@pytest.mark.parametrize("convention", ["per_token", "summed"])
def test_ipo_convention_of_average_logps_for_is_detected(convention):
    """A loss built the way train.py builds IPO (average_logps_for) shows the convention it claims."""

    def ipo_with_counts(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
        if average_logps_for("ipo", convention):
            nw, nl = chosen_token_counts.astype(pw.dtype), rejected_token_counts.astype(pw.dtype)
            pw, pl, rw, rl = pw / nw, pl / nl, rw / nw, rl / nl
        return dpo_loss(pw, pl, rw, rl, beta=beta, loss_type="ipo")

    report = check_loss(ipo_with_counts, framework="numpy", variant="ipo", ipo_convention=convention)
    assert report.ok, report.table()
    assert report.conventions["log-probs"].startswith(convention.replace("_", "-"))


def test_worked_example_margin():
    """The worked example's log-ratio margin: (-30 + 34) - (-35 + 31) = 8 (the rest is a verify property)."""
    out = dpo_loss(np.array([-30.0]), np.array([-35.0]), np.array([-34.0]), np.array([-31.0]), beta=0.1)
    assert float(out.log_ratio_margin[0]) == 8.0


# ----------------------------------------------------------------------------------------------
# gradients: every variant against finite differences


VARIANTS = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type="sigmoid", label_smoothing=0.5),
    dict(loss_type="robust", label_smoothing=0.0),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="ipo"),
    dict(loss_type="hinge"),
    dict(loss_type="sigmoid", reference_free=True),
    dict(loss_type="ipo", reference_free=True),
    dict(loss_type="sigmoid", rpo_alpha=0.7),
    dict(loss_type="robust", label_smoothing=0.3, rpo_alpha=1.5),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@given(data=pairs(), beta=betas, seed=st.integers(0, 2**32 - 1))
def test_gradients_match_finite_differences(kw, data, beta, seed):
    pw, pl, rw, rl = data
    kw = dict(kw, beta=beta)
    if kw.get("rpo_alpha"):
        kw["chosen_token_counts"] = np.random.default_rng(seed).integers(1, 30, size=len(pw))
    out = dpo_loss(pw, pl, rw, rl, **kw)
    if kw["loss_type"] == "hinge":  # finite differences are meaningless at the kink z = 1
        assume(np.all(np.abs(beta * out.log_ratio_margin - 1.0) > 1e-4))
    gw, gl = fd_grads(pw, pl, rw, rl, **kw)
    scale = max(1.0, float(np.max(np.abs(out.losses))))
    np.testing.assert_allclose(out.grad_policy_chosen_logps, gw, rtol=1e-5, atol=1e-8 * scale)
    np.testing.assert_allclose(out.grad_policy_rejected_logps, gl, rtol=1e-5, atol=1e-8 * scale)
    # the generalised eq. (9) form: d loss_i / d h_i = -beta weight_i
    if not kw.get("rpo_alpha"):
        n = len(pw)
        np.testing.assert_allclose(out.grad_policy_chosen_logps, -beta * out.gradient_weight / n, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(out.grad_policy_rejected_logps, beta * out.gradient_weight / n, rtol=1e-14, atol=1e-300)


# ----------------------------------------------------------------------------------------------
# eq. (9)


@given(data=pairs(max_n=8), beta=betas)
def test_eq9_gradient_form(data, beta):
    """d mean loss / d log pi_w = -beta sigma(r_l - r_w) / N, and +... for log pi_l; weight in (0, 1)."""
    pw, pl, rw, rl = data
    n = len(pw)
    out = dpo_loss(pw, pl, rw, rl, beta=beta)
    r_w = beta * (pw - rw)
    r_l = beta * (pl - rl)
    # sigma written out as 1 / (1 + exp(-x)) independently of minidpo's stable version
    weight = np.array([1.0 / (1.0 + math.exp(-(a - b))) for a, b in zip(r_l, r_w)])
    np.testing.assert_allclose(out.gradient_weight, weight, rtol=1e-12)
    np.testing.assert_allclose(out.grad_policy_chosen_logps, -beta * weight / n, rtol=1e-12)
    np.testing.assert_allclose(out.grad_policy_rejected_logps, beta * weight / n, rtol=1e-12)
    assert np.all((out.gradient_weight >= 0) & (out.gradient_weight <= 1))
    moderate = np.abs(r_w - r_l) < 30  # strictly inside (0, 1) until float64 saturates
    assert np.all((out.gradient_weight[moderate] > 0) & (out.gradient_weight[moderate] < 1))


@given(beta=betas, margins=st.lists(st.integers(-2000, 2000), min_size=2, max_size=20, unique=True))
def test_weight_decreases_as_the_margin_grows(beta, margins):
    """A pair the implicit reward already orders correctly (large margin) is pushed less."""
    h = np.sort(np.array(margins)) / 100.0  # log-ratio margins in [-20, 20], at least 0.01 apart
    zeros = np.zeros_like(h)
    out = dpo_loss(h - 40.0, zeros - 40.0, zeros, zeros, beta=beta)
    np.testing.assert_allclose(out.log_ratio_margin, h, rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(out.gradient_weight) <= 0)
    strict = np.abs(beta * h) < 15  # away from saturation the decrease is strict
    assert np.all(np.diff(out.gradient_weight[strict]) < 0)


# ----------------------------------------------------------------------------------------------
# properties of the loss


@given(data=pairs(), beta=betas, kw=st.sampled_from(VARIANTS[:7]))
def test_swapping_chosen_and_rejected_negates_the_margin(data, beta, kw):
    pw, pl, rw, rl = data
    a = dpo_loss(pw, pl, rw, rl, beta=beta, **kw)
    b = dpo_loss(pl, pw, rl, rw, beta=beta, **kw)
    np.testing.assert_allclose(b.log_ratio_margin, -a.log_ratio_margin, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(b.chosen_rewards, a.rejected_rewards)
    np.testing.assert_array_equal(b.rejected_rewards, a.chosen_rewards)


@given(data=pairs(), beta=betas, eps=st.floats(0.0, 0.5))
def test_cdpo_is_dpo_on_a_mixture_of_labels(data, beta, eps):
    """cDPO(eps) = (1 - eps) DPO(pair) + eps DPO(swapped pair); eps = 0 is DPO (eq. 7).
    The loss values' law is verify's "cDPO: label-mixture law"; here its hand-written gradient."""
    pw, pl, rw, rl = data
    c = dpo_loss(pw, pl, rw, rl, beta=beta, label_smoothing=eps)
    d = dpo_loss(pw, pl, rw, rl, beta=beta)
    s = dpo_loss(pl, pw, rl, rw, beta=beta)
    np.testing.assert_allclose(
        c.grad_policy_chosen_logps, (1 - eps) * d.grad_policy_chosen_logps + eps * s.grad_policy_rejected_logps, rtol=1e-10, atol=1e-15
    )
    zero = dpo_loss(pw, pl, rw, rl, beta=beta, label_smoothing=0.0)
    z = beta * zero.log_ratio_margin
    np.testing.assert_allclose(zero.losses, [-naive_log_sigmoid(v) if abs(v) < 30 else -float(log_sigmoid(np.array(v))) for v in z], rtol=1e-12)
    robust0 = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type="robust")
    np.testing.assert_allclose(robust0.losses, zero.losses, rtol=1e-15)


@given(data=pairs(), beta=betas)
def test_beta_inside_equals_beta_factored(data, beta):
    """eq. (7) literally, -log sigma(beta log pi_w/ref_w - beta log pi_l/ref_l), vs the code's beta * h."""
    pw, pl, rw, rl = data
    literal = -log_sigmoid(beta * np.log(np.exp(pw) / np.exp(rw)) - beta * np.log(np.exp(pl) / np.exp(rl)))
    np.testing.assert_allclose(dpo_loss(pw, pl, rw, rl, beta=beta).losses, literal, rtol=1e-9, atol=1e-12)


@given(data=pairs(), beta=betas, c=st.floats(-20, 20), kw=st.sampled_from([v for v in VARIANTS if "rpo_alpha" not in v]))
def test_shifting_both_policy_logps_changes_nothing(data, beta, c, kw):
    """Only the difference of the log-ratios enters (not the NLL term of RPO, which is excluded).
    For the loss values this is verify's "margin only (Z(x) shift)"; here the hand-written gradients."""
    pw, pl, rw, rl = data
    a = dpo_loss(pw, pl, rw, rl, beta=beta, **kw)
    b = dpo_loss(pw + c, pl + c, rw, rl, beta=beta, **kw)
    np.testing.assert_allclose(b.grad_policy_chosen_logps, a.grad_policy_chosen_logps, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(b.grad_policy_rejected_logps, a.grad_policy_rejected_logps, rtol=1e-8, atol=1e-12)


@given(data=pairs(), beta=betas)
def test_dpo_loss_is_the_reward_model_loss_of_the_implicit_reward(data, beta):
    """Eq. (7) = eq. (2) evaluated at r_hat = beta log pi/pi_ref (eq. 8); gradients by the chain rule."""
    pw, pl, rw, rl = data
    out = dpo_loss(pw, pl, rw, rl, beta=beta)
    r_w, r_l = implicit_reward(pw, rw, beta), implicit_reward(pl, rl, beta)
    rm, g_w, g_l = reward_model_loss(r_w, r_l)
    np.testing.assert_allclose(out.losses, rm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.grad_policy_chosen_logps, beta * g_w, rtol=1e-12)  # d r_w / d log pi_w = beta
    np.testing.assert_allclose(out.grad_policy_rejected_logps, beta * g_l, rtol=1e-12)
    np.testing.assert_allclose(out.chosen_rewards, r_w, rtol=1e-15)


@given(r=st.lists(st.tuples(st.floats(-30, 30), st.floats(-30, 30)), min_size=1, max_size=8))
def test_reward_model_loss_values_and_gradient(r):
    rw = np.array([a for a, _ in r])
    rl = np.array([b for _, b in r])
    losses, gw, gl = reward_model_loss(rw, rl)
    np.testing.assert_allclose(losses, [math.log1p(math.exp(-(a - b))) for a, b in r], rtol=1e-12)
    num_w = numeric_grad(lambda x: float(reward_model_loss(x, rl)[0].mean()), rw.copy())
    num_l = numeric_grad(lambda x: float(reward_model_loss(rw, x)[0].mean()), rl.copy())
    np.testing.assert_allclose(gw, num_w, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gl, num_l, rtol=1e-5, atol=1e-8)


def test_implicit_reward_and_reference_free():
    pw, pl = np.array([-3.0, -7.0]), np.array([-4.0, -2.0])
    np.testing.assert_allclose(implicit_reward(pw, np.array([-1.0, -1.0]), 0.5), [-1.0, -3.0])
    free = dpo_loss(pw, pl, None, None, beta=0.5, reference_free=True)
    zeros = dpo_loss(pw, pl, np.zeros(2), np.zeros(2), beta=0.5)
    np.testing.assert_array_equal(free.losses, zeros.losses)
    np.testing.assert_array_equal(free.chosen_rewards, 0.5 * pw)
    # reference_free ignores reference log-probs that are passed
    np.testing.assert_array_equal(dpo_loss(pw, pl, pw, pl, beta=0.5, reference_free=True).losses, free.losses)


def test_ipo_and_hinge_values():
    pw, pl, rw, rl = np.array([-5.0, -9.0]), np.array([-6.0, -4.0]), np.array([-5.5, -8.0]), np.array([-5.0, -5.0])
    # by hand: h = (0.5 - (-1), -1 - 1) = (1.5, -2);  beta = 0.25, so 1/(2 beta) = 2 and z = (0.375, -0.5)
    beta = 0.25
    ipo = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type="ipo")
    np.testing.assert_allclose(ipo.log_ratio_margin, [1.5, -2.0])
    np.testing.assert_allclose(ipo.losses, [0.25, 16.0])
    hinge = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type="hinge")
    np.testing.assert_allclose(hinge.losses, [0.625, 1.5])
    np.testing.assert_array_equal(hinge.gradient_weight, [1.0, 1.0])
    big = dpo_loss(np.array([0.0]), np.array([-10.0]), np.zeros(1), np.zeros(1), beta=1.0, loss_type="hinge")
    assert big.losses[0] == 0 and big.grad_policy_chosen_logps[0] == 0
    # IPO is minimised exactly at h = 1 / (2 beta)
    at_target = dpo_loss(np.array([1 / (2 * beta) - 3.0]), np.array([-3.0]), np.zeros(1), np.zeros(1), beta=beta, loss_type="ipo")
    assert at_target.losses[0] == 0 and at_target.grad_policy_chosen_logps[0] == 0


def test_robust_loss_formula():
    eps, beta = 0.2, 0.5
    pw, pl = np.array([-2.0, -9.0]), np.array([-3.0, -1.0])
    out = dpo_loss(pw, pl, np.zeros(2), np.zeros(2), beta=beta, loss_type="robust", label_smoothing=eps)
    z = beta * (pw - pl)
    expect = [((1 - eps) * -naive_log_sigmoid(v) - eps * -naive_log_sigmoid(-v)) / (1 - 2 * eps) for v in z]
    np.testing.assert_allclose(out.losses, expect, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_extreme_margins_are_finite_and_warning_free(dtype, kw):
    """|beta h| up to 1e4: no overflow, no underflow event, no nan, in float32 and float64."""
    m = np.array([-1e4, -1e3, -100.0, -1.0, 0.0, 1.0, 100.0, 1e3, 1e4], dtype=dtype)
    zero = np.zeros_like(m)
    kw = dict(kw)
    if kw.get("rpo_alpha"):
        kw["chosen_token_counts"] = np.full(m.shape, 3)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out = dpo_loss(m, zero, zero, zero, beta=1.0, **kw)
        ls, s = log_sigmoid(m), sigmoid(m)
    for name in ("losses", "chosen_rewards", "grad_policy_chosen_logps", "grad_policy_rejected_logps", "gradient_weight", "log_ratio_margin"):
        v = getattr(out, name)
        assert v.dtype == dtype, name
        assert np.all(np.isfinite(v)), name
    assert ls.dtype == dtype and s.dtype == dtype
    if kw["loss_type"] == "sigmoid" and not kw.get("label_smoothing") and not kw.get("rpo_alpha"):
        np.testing.assert_allclose(out.losses[[0, -1]], [1e4, 0.0], rtol=1e-6, atol=1e-30)
        np.testing.assert_allclose(out.gradient_weight[[0, -1]], [1.0, 0.0], atol=1e-30)


@given(x=st.floats(-700, 700))
def test_log_sigmoid_and_sigmoid_against_the_definitions(x):
    a = np.array([x])
    assert float(sigmoid(a)[0]) + float(sigmoid(-a)[0]) == pytest.approx(1.0, abs=1e-15)
    assert float(log_sigmoid(a)[0]) - float(log_sigmoid(-a)[0]) == pytest.approx(x, rel=1e-12, abs=1e-12)
    if abs(x) < 30:
        assert float(log_sigmoid(a)[0]) == pytest.approx(naive_log_sigmoid(x), rel=1e-13, abs=1e-15)
        assert float(sigmoid(a)[0]) == pytest.approx(1.0 / (1.0 + math.exp(-x)), rel=1e-14)
        numeric = numeric_grad(lambda v: float(log_sigmoid(v)[0]), a.copy())[0]
        assert numeric == pytest.approx(float(sigmoid(-a)[0]), rel=1e-6, abs=1e-10)  # (log sigma)' = sigma(-x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outputs_keep_the_input_dtype(dtype):
    pw, pl, rw, rl = (np.array(v, dtype=dtype) for v in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -3.0]))
    for kw in VARIANTS:
        kw = dict(kw)
        if kw.get("rpo_alpha"):
            kw["chosen_token_counts"] = np.array([2, 3])
        out = dpo_loss(pw, pl, rw.astype(np.float64), rl.astype(np.float64), beta=np.float64(0.1), **kw)
        for v in (out.losses, out.chosen_rewards, out.rejected_rewards, out.grad_policy_chosen_logps, out.grad_policy_rejected_logps, out.gradient_weight):
            assert v.dtype == dtype, kw
    assert reward_model_loss(pw, pl)[1].dtype == dtype
    assert implicit_reward(pw, rw.astype(np.float64), np.float64(0.5)).dtype == dtype
    assert nll_loss(pw, np.array([1, 2]))[1].dtype == dtype
    m = preference_metrics(dpo_loss(pw, pl, rw, rl), pw, pl)
    assert all(v.dtype == dtype for v in m.values())


# ----------------------------------------------------------------------------------------------
# the SFT / RPO term


@given(data=pairs(), counts=st.lists(st.integers(1, 50), min_size=6, max_size=6))
def test_nll_loss_values_and_gradient(data, counts):
    pw = data[0]
    n = len(pw)
    c = np.array(counts[:n])
    losses, grad = nll_loss(pw, c)
    np.testing.assert_allclose(losses, -pw / c, rtol=1e-15)
    numeric = numeric_grad(lambda x: float(nll_loss(x, c)[0].mean()), np.array(pw, dtype=np.float64))
    np.testing.assert_allclose(grad, numeric, rtol=1e-6)


@given(data=pairs(), beta=betas, alpha=st.floats(0.01, 5.0))
def test_rpo_adds_the_nll_term_and_its_gradient(data, beta, alpha):
    pw, pl, rw, rl = data
    c = np.arange(1, len(pw) + 1)
    plain = dpo_loss(pw, pl, rw, rl, beta=beta)
    rpo = dpo_loss(pw, pl, rw, rl, beta=beta, rpo_alpha=alpha, chosen_token_counts=c)
    nll, g = nll_loss(pw, c)
    np.testing.assert_allclose(rpo.losses, plain.losses + alpha * nll, rtol=1e-12)
    np.testing.assert_allclose(rpo.grad_policy_chosen_logps, plain.grad_policy_chosen_logps + alpha * g, rtol=1e-12)
    np.testing.assert_array_equal(rpo.grad_policy_rejected_logps, plain.grad_policy_rejected_logps)
    np.testing.assert_array_equal(rpo.gradient_weight, plain.gradient_weight)
    np.testing.assert_allclose(rpo.nll_losses, nll)


def test_nll_rejects_empty_responses():
    with pytest.raises(ValueError, match="> 0"):
        nll_loss(np.array([-1.0, -2.0]), np.array([3, 0]))
    with pytest.raises(ValueError, match="match"):
        nll_loss(np.array([-1.0, -2.0]), np.array([3]))


# ----------------------------------------------------------------------------------------------
# the whole chain: logits -> sequence_logps -> dpo_loss -> dlogits


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.2), dict(loss_type="ipo", average=True), dict(rpo_alpha=0.5)], ids=str)
def test_logits_to_loss_chain_matches_finite_differences(kw):
    """The DPO training step's gradient, end to end: rows 0..N-1 chosen, N..2N-1 rejected."""
    kw = dict(kw)
    average = kw.pop("average", False)
    rng = np.random.default_rng(11)
    N, T, V = 2, 5, 4
    labels = rng.integers(0, V, (2 * N, T))
    mask = np.zeros((2 * N, T), bool)
    mask[:, 2:] = True
    mask[1, -1] = False  # a padded row
    batch = padded_batch(labels, mask, average=average)  # the scored tokens: logits_at, labels, weights
    logits = rng.standard_normal((len(batch.labels), V))  # the logits at the scored positions
    ref = rng.standard_normal(2 * N) - 6.0

    def loss_of(L):
        lp, cache = sequence_logps(L, batch.labels, batch.weights(L.dtype))
        out = dpo_loss(lp[:N], lp[N:], ref[:N], ref[N:], beta=0.3, chosen_token_counts=batch.token_counts[:N], **kw)
        return out, cache

    out, cache = loss_of(logits)
    dlogps = np.concatenate([out.grad_policy_chosen_logps, out.grad_policy_rejected_logps])
    analytic = sequence_logps_backward(dlogps, cache)
    numeric = numeric_grad(lambda x: float(loss_of(x)[0].loss), logits.copy())
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# API details


def test_bad_arguments_are_named():
    a, b = np.array([-1.0, -2.0]), np.array([-2.0, -1.0])
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        dpo_loss(a, b, a, b, loss_type="dpo")
    with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 0.5\]"):
        dpo_loss(a, b, a, b, label_smoothing=0.6)
    with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 0.5\]"):
        dpo_loss(a, b, a, b, label_smoothing=-0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(a, b, a, b, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="not 'ipo'"):
        dpo_loss(a, b, a, b, loss_type="ipo", label_smoothing=0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(a, b, a, b, beta=bad)
    with pytest.raises(ValueError, match="policy_rejected_logps has 1 entries"):
        dpo_loss(a, b[:1], a, b)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(a[None], b[None], a, b)
    with pytest.raises(ValueError, match="chosen_token_counts"):
        dpo_loss(a, b, a, b, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="rpo_alpha"):
        dpo_loss(a, b, a, b, rpo_alpha=-1.0)
    with pytest.raises(ValueError, match="reference_free"):
        dpo_loss(a, b, None, None)
    with pytest.raises(TypeError, match="one dtype"):
        dpo_loss(a, b.astype(np.float32), a, b)
    with pytest.raises(TypeError, match="floating"):
        dpo_loss(np.array([1, 2]), np.array([1, 2]), a, b)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))


def test_average_logps_for_makes_the_convention_explicit():
    assert average_logps_for("ipo") is True
    assert average_logps_for("ipo", ipo_convention="summed") is False
    for t in ("sigmoid", "robust", "hinge"):
        assert average_logps_for(t) is False and average_logps_for(t, "per_token") is False
    assert {"sigmoid", "robust", "ipo", "hinge"} <= set(LOSS_TYPES)
    for t in LOSS_TYPES:  # the table's rule, for every row
        from minidpo.losses import LOSS_TABLE

        assert average_logps_for(t) is LOSS_TABLE[t].average_logps
    with pytest.raises(ValueError, match="loss_type"):
        average_logps_for("no_such_loss")
    with pytest.raises(ValueError, match="ipo_convention"):
        average_logps_for("ipo", "mean")


def test_preference_metrics():
    pw, pl = np.array([-3.0, -5.0, -1.0]), np.array([-4.0, -2.0, -1.5])
    rw, rl = np.array([-3.5, -4.0, -1.0]), np.array([-3.0, -3.0, -1.0])
    out = dpo_loss(pw, pl, rw, rl, beta=0.2)
    m = preference_metrics(out, pw, pl)
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}
    assert all(isinstance(v, np.ndarray) and v.ndim == 0 for v in m.values())  # device arrays, no sync
    r_w, r_l = 0.2 * (pw - rw), 0.2 * (pl - rl)  # [0.1, -0.2, 0], [-0.2, 0.2, -0.1]
    assert float(m["rewards/accuracies"]) == pytest.approx(2 / 3)
    assert float(m["rewards/margins"]) == pytest.approx(np.mean(r_w - r_l))
    assert float(m["rewards/chosen"]) == pytest.approx(np.mean(r_w))
    assert float(m["logps/rejected"]) == pytest.approx(np.mean(pl))
    host = preference_metrics(out, pw, pl, to_host=True)
    assert all(type(v) is float for v in host.values())
    assert host["loss"] == pytest.approx(float(np.mean(out.losses)))


# ----------------------------------------------------------------------------------------------
# independent references


@pytest.mark.parametrize("kw", VARIANTS[:7], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_torch_autograd(kw):
    """The official trainers.py formulas in torch, differentiated by autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(5)
    n, beta = 7, 0.2
    pw, pl, rw, rl = (rng.uniform(-40, -5, n) for _ in range(4))
    eps = kw.get("label_smoothing", 0.0)
    tw, tl = torch.tensor(pw, requires_grad=True), torch.tensor(pl, requires_grad=True)
    logits = (tw - torch.tensor(rw)) - (tl - torch.tensor(rl))
    t = kw["loss_type"]
    if t == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif t == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif t == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    losses.mean().backward()
    out = dpo_loss(pw, pl, rw, rl, beta=beta, **kw)
    np.testing.assert_allclose(out.losses, losses.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.grad_policy_chosen_logps, tw.grad.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.grad_policy_rejected_logps, tl.grad.numpy(), rtol=1e-12, atol=1e-15)


@requires_cuda
def test_cupy_matches_numpy():  # pragma: no cover - needs a GPU
    import cupy as cp

    rng = np.random.default_rng(6)
    pw, pl, rw, rl = (rng.uniform(-40, -5, 9).astype(np.float32) for _ in range(4))
    for kw in VARIANTS:
        kw = dict(kw)
        if kw.get("rpo_alpha"):
            kw["chosen_token_counts"] = np.arange(1, 10)
        host = dpo_loss(pw, pl, rw, rl, beta=0.1, **kw)
        gkw = dict(kw)
        if "chosen_token_counts" in gkw:
            gkw["chosen_token_counts"] = cp.asarray(gkw["chosen_token_counts"])
        dev = dpo_loss(cp.asarray(pw), cp.asarray(pl), cp.asarray(rw), cp.asarray(rl), beta=0.1, **gkw)
        assert isinstance(dev.losses, cp.ndarray) and dev.losses.dtype == np.float32
        for name in ("losses", "grad_policy_chosen_logps", "grad_policy_rejected_logps", "gradient_weight"):
            np.testing.assert_allclose(getattr(dev, name).get(), getattr(host, name), rtol=1e-5, atol=1e-7)
    m = preference_metrics(dev, cp.asarray(pw), cp.asarray(pl))
    assert all(isinstance(v, cp.ndarray) for v in m.values())


@given(h=st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=6), beta=st.floats(0.05, 3.0),
       variant=st.sampled_from([("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.0), ("robust", 0.3), ("ipo", 0.0),
                                ("hinge", 0.0)]))
def test_each_free_loss_returns_its_derivative_in_z(h, beta, variant):
    """LOSS_TABLE[name].margin(h, beta, **options) -> (loss, dloss/dz): dloss/dz against central
    differences in z = beta h; dpo_loss runs the same row."""
    from minidpo.losses import LOSS_TABLE

    name, eps = variant
    row = LOSS_TABLE[name]
    opts = {"label_smoothing": eps} if "label_smoothing" in row.options else {}

    def f(h_):
        return row.margin(h_, beta, **opts)

    h = np.array(h)
    loss, dz = f(h)
    assert loss.shape == dz.shape == h.shape and loss.dtype == dz.dtype == np.float64
    d = 1e-6
    numeric = (f(h + d / beta)[0] - f(h - d / beta)[0]) / (2 * d)
    if name == "hinge":  # the kink at z = 1
        keep = np.abs(beta * h - 1.0) > 1e-4
        h, dz, numeric = h[keep], dz[keep], numeric[keep]
    np.testing.assert_allclose(dz, numeric, rtol=1e-5, atol=1e-7)
    out = dpo_loss(h, np.zeros_like(h), np.zeros_like(h), np.zeros_like(h), beta=beta, loss_type=name,
                   label_smoothing=eps)
    np.testing.assert_array_equal(out.losses, f(h)[0])
    np.testing.assert_array_equal(out.gradient_weight, -dz)
