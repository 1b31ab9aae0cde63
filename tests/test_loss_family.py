"""The preference-loss family, each loss one function and one row of losses.LOSS_TABLE:

- every derivative against float64 central differences, on hypothesis-drawn log-probs, betas,
  options and inputs (KTO's z0, BCO's delta, token counts);
- every loss against its paper's formula written out independently (tests/verify_corpus/family_losses.py);
- finite and warning-free (np.errstate(all="raise"), warnings as errors) for margins up to 1e4,
  float32 in -> float32 out;
- the rows reach the trainer's config, the command line and held-out evaluation; the extensions
  (f-DPO scores, weighted sums, WPO pair weights, BCO's running mean, KTO's reference point,
  LD-DPO's log-probs) each against a direct computation; the four losses before the family
  unchanged.
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minidpo import cli
from minidpo.losses import (
    F_DIVERGENCES,
    LOSS_TABLE,
    bco_update_reward_mean,
    dpo_loss,
    dpo_step_loss,
    f_divergence_score,
    kto_loss,
    kto_mismatched,
    kto_pair_loss,
    kto_reference_point,
    ld_logps,
    wpo_weights,
)
from minidpo.train import TrainConfig
from tests.conftest import numeric_grad, numeric_grad_richardson, requires_cuda
from tests.verify_corpus import family_losses as paper

NEW = [n for n in LOSS_TABLE if n not in ("sigmoid", "robust", "ipo", "hinge")]

# (id, loss_type, options, inputs): every new row at its defaults, and the settings that change its shape
CASES = [(n, n, {}, {}) for n in NEW] + [
    ("kto-weights", "kto", {"desirable_weight": 1.33, "undesirable_weight": 0.7}, {}),
    ("bco-delta", "bco_pair", {}, {"reward_mean": 0.4}),
    ("exo-eps", "exo_pair", {"label_smoothing": 0.2}, {}),
    ("aot-smoothed", "aot", {"label_smoothing": 0.1}, {}),
    ("discopop-tau1", "discopop", {"tau": 1.0}, {}),
    ("simpo-gamma0", "simpo", {"gamma": 0.0}, {}),
    ("alphapo-negative", "alphapo", {"alpha": -0.5}, {}),
    ("alphapo-0-is-simpo", "alphapo", {"alpha": 0.0}, {}),
    ("cpo-no-nll", "cpo", {"nll_weight": 0.0}, {}),
    ("orpo-nll2", "orpo", {"nll_weight": 2.0}, {}),
    ("mix", "weighted_sum", {"loss_weights": "sigmoid=0.5,aot=0.3,nca_pair=1,apo_down=0.25", "label_smoothing": 0.2}, {}),
] + [(f"{base}-{d}", base, {"f_divergence": d, "f_alpha": 0.3}, {})
     for base in ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm") for d in F_DIVERGENCES[1:]]


def _inputs(loss_type, inputs, draw_z0=0.3):
    if loss_type == "kto":
        return {"reference_point": draw_z0, **inputs}
    return dict(inputs)


def _kw(loss_type, options, inputs, counts, z0=0.3):
    return dict(loss_type=loss_type, chosen_token_counts=counts, loss_inputs=_inputs(loss_type, inputs, z0), **options)


def _per_token(loss_type):
    return LOSS_TABLE[loss_type].average_logps


@st.composite
def batches(draw, per_token=False):
    n = draw(st.integers(1, 5))
    lo, hi = (-10.0, -0.05) if per_token else (-60.0, -0.5)
    four = [np.array(draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))) for _ in range(4)]
    counts = np.array(draw(st.lists(st.integers(1, 40), min_size=n, max_size=n)))
    return (*four, counts)


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@given(data=st.data(), beta=st.sampled_from([0.05, 0.1, 0.5, 1.0, 2.0]), z0=st.floats(0.0, 3.0))
def test_gradients_match_finite_differences(case, data, beta, z0):
    _, loss_type, options, inputs = case
    pw, pl, rw, rl, counts = data.draw(batches(_per_token(loss_type)))
    if "f_divergence" in options:  # f'(exp(log-ratio)) bends like exp(-log-ratio): keep it where differences resolve it
        rw, rl = pw - np.clip(pw - rw, -10.0, 10.0), pl - np.clip(pl - rl, -10.0, 10.0)
    kw = _kw(loss_type, options, inputs, counts, z0)
    if loss_type in ("aot", "aot_unpaired", "weighted_sum"):  # the sort has no derivative at ties
        for v in (pw - pl, rw - rl, pw - rw, pl - rl):
            assume(np.all(np.diff(np.sort(v)) > 1e-3))
    if loss_type == "hinge":  # the kink at beta (score_w - score_l) = 1
        div, a = options.get("f_divergence", "reverse_kl"), options.get("f_alpha", 0.5)
        margin = f_divergence_score(pw - rw, div, a)[0] - f_divergence_score(pl - rl, div, a)[0]
        assume(np.all(np.abs(beta * margin - 1.0) > 1e-3))
    out = dpo_loss(pw, pl, rw, rl, beta=beta, **kw)

    def mean(a, b):
        return float(np.mean(dpo_loss(a, b, rw, rl, beta=beta, **kw).losses))

    gw = numeric_grad_richardson(lambda x: mean(x, pl), pw.copy())
    gl = numeric_grad_richardson(lambda x: mean(pw, x), pl.copy())
    scale = max(1.0, float(np.max(np.abs(out.losses))))
    np.testing.assert_allclose(out.grad_policy_chosen_logps, gw, rtol=2e-5, atol=1e-8 * scale)
    np.testing.assert_allclose(out.grad_policy_rejected_logps, gl, rtol=2e-5, atol=1e-8 * scale)
    # eq. (9)'s weight, generalised: (d rejected - d chosen) / (2 beta) per pair (-dloss/dz for a loss of h)
    n = len(pw)
    nll = LOSS_TABLE[loss_type].nll_weight(LOSS_TABLE[loss_type].resolve(options)) > 0 or loss_type == "sft"
    if not nll and "loss_weights" not in options:
        np.testing.assert_allclose(out.gradient_weight, n * (out.grad_policy_rejected_logps - out.grad_policy_chosen_logps)
                                   / (2 * beta), rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------------------------- the papers' formulas

PAPER = {"exo_pair": paper.exo_pair, "nca_pair": paper.nca_pair, "bco_pair": paper.bco_pair, "sppo_hard": paper.sppo_hard,
         "aot": paper.aot, "aot_unpaired": paper.aot_unpaired, "apo_zero": paper.apo_zero, "apo_down": paper.apo_down,
         "discopop": paper.discopop, "simpo": paper.simpo, "alphapo": paper.alphapo, "kto": paper.kto}


@pytest.mark.parametrize("name", sorted(PAPER) + ["sft", "cpo", "orpo", "sigmoid_norm", "weighted_sum"])
@given(data=st.data(), beta=st.sampled_from([0.1, 0.5, 2.0]), z0=st.floats(0.0, 2.0))
def test_each_loss_is_its_papers_formula(name, data, beta, z0):
    pw, pl, rw, rl, counts = data.draw(batches(_per_token(name)))
    kw = _kw(name, {}, {}, counts, z0)
    got = dpo_loss(pw, pl, rw, rl, beta=beta, **kw).losses
    if name in PAPER:
        extra = {"reference_point": z0} if name == "kto" else {}
        want = PAPER[name](pw, pl, rw, rl, beta, **extra)
    elif name == "sigmoid_norm":  # the row runs on per-token means: the caller divides (here, by the counts)
        cl = counts[::-1].copy()
        got = dpo_loss(pw / counts, pl / cl, rw / counts, rl / cl, beta=beta, loss_type=name).losses
        want = paper.sigmoid_norm(pw, pl, rw, rl, beta, chosen_token_counts=counts, rejected_token_counts=cl)
    elif name == "weighted_sum":  # the default terms: MPO's
        want = paper.mpo(pw, pl, rw, rl, beta, chosen_token_counts=counts)
    else:
        want = getattr(paper, name)(pw, pl, rw, rl, beta, chosen_token_counts=counts)
    if name in ("aot", "aot_unpaired"):  # per rank, not per pair: compare the batch's losses as a multiset
        got, want = np.sort(got), np.sort(want)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_a_few_values_by_hand():
    """Numbers worked out by hand from the papers (beta 0.5, chosen log-ratio 1, rejected -1)."""
    one, m_one, z = np.array([1.0]), np.array([-1.0]), np.zeros(1)
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # NCA: -log s(0.5) - 0.5 log s(-0.5) - 0.5 log s(0.5) = 1.5 log(1 + e^-0.5) + 0.5 log(1 + e^0.5)
    got = dpo_loss(one, m_one, z, z, beta=0.5, loss_type="nca_pair").losses[0]
    assert got == pytest.approx(1.5 * math.log1p(math.exp(-0.5)) + 0.5 * math.log1p(math.exp(0.5)), rel=1e-14)
    # SPPO: (1 - 1)^2 + (-1 + 1)^2 = 0 at beta 0.5: each log-ratio at its target +-1/(2 beta)
    assert dpo_loss(one, m_one, z, z, beta=0.5, loss_type="sppo_hard").losses[0] == 0.0
    # APO-zero: 1 - s(0.5) + s(-0.5) = 2 s(-0.5)
    assert dpo_loss(one, m_one, z, z, beta=0.5, loss_type="apo_zero").losses[0] == pytest.approx(2 * s(-0.5), rel=1e-14)
    # EXO at its minimum beta h = log((1 - eps) / eps) is 0: KL(q || p) with q = p
    eps = 0.1
    h = math.log((1 - eps) / eps) / 0.5
    out = dpo_loss(np.array([h]), z, z, z, beta=0.5, loss_type="exo_pair", label_smoothing=eps)
    assert abs(out.losses[0]) < 1e-15 and abs(out.grad_policy_chosen_logps[0]) < 1e-16
    # KTO, z0 = 1: 0.5 (1 - s(0.5 (1 - 1)) + 1 - s(0.5 (1 + 1))) = 0.5 (0.5 + s(-1))
    got = dpo_loss(one, m_one, z, z, beta=0.5, loss_type="kto", loss_inputs={"reference_point": 1.0}).losses[0]
    assert got == pytest.approx(0.5 * (0.5 + s(-1.0)), rel=1e-14)
    # ORPO with p_w = 1/2, p_l = 1/4: odds 1 and 1/3, -0.5 log s(log 3) = 0.5 log(4/3); NLL = log 2
    a_w, a_l = np.array([math.log(0.5)]), np.array([math.log(0.25)])
    got = dpo_loss(a_w, a_l, None, None, beta=0.5, loss_type="orpo", chosen_token_counts=np.ones(1)).losses[0]
    assert got == pytest.approx(math.log(2) + 0.5 * math.log(4 / 3), rel=1e-14)
    # AlphaPO at alpha 1, p_w = 1/2, p_l = 1/4: r = 1 - 1/p = -1, -3; -log s(0.5 * 2 - 0.5)
    got = dpo_loss(a_w, a_l, None, None, beta=0.5, loss_type="alphapo", alpha=1.0, gamma=0.5).losses[0]
    assert got == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-14)


# ---------------------------------------------------------------------------------------------- numerics

MARGINS = [-1e4, -1e3, -300.0, -100.0, -30.0, -1.0, 0.0, 1.0, 30.0, 100.0, 300.0, 1e3, 1e4]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_extreme_margins_are_finite_and_warning_free(case, dtype):
    """|margin| up to 1e4 on each of the chosen, rejected and reference inputs, beta 0.1, 1 and 3: no
    overflow, underflow or invalid-value event, finite outputs in the input dtype."""
    _, loss_type, options, inputs = case
    m = np.array(MARGINS, dtype=dtype)
    zero = np.zeros_like(m)
    kw = _kw(loss_type, options, inputs, np.full(m.shape, 3))
    for beta in (0.1, 1.0, 3.0):
        for args in ((m, zero, zero, zero), (zero, m, zero, zero), (zero, zero, m, zero), (m, m[::-1].copy(), zero, m)):
            with warnings.catch_warnings(), np.errstate(all="raise"):
                warnings.simplefilter("error")
                out = dpo_loss(*args, beta=beta, **kw)
            for name in ("losses", "chosen_rewards", "rejected_rewards", "grad_policy_chosen_logps",
                         "grad_policy_rejected_logps", "gradient_weight"):
                v = getattr(out, name)
                assert v.dtype == dtype, (name, v.dtype)
                assert np.all(np.isfinite(v)), (name, beta, v)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@given(x=st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=6), alpha=st.floats(0.05, 0.95))
def test_f_divergence_scores_and_their_derivatives(divergence, x, alpha):
    """f'(u) at u = exp(logratio) of Wang et al. (2023), Table 1, written in probability space."""
    c = np.array(x)
    s, ds = f_divergence_score(c, divergence, alpha)
    u = np.exp(c)
    want = {"reverse_kl": np.log(u), "forward_kl": 1 - 1 / u, "js_divergence": np.log(2 * u / (1 + u)),
            "alpha_divergence": (1 - u ** -alpha) / alpha}[divergence]
    np.testing.assert_allclose(s, want, rtol=1e-10, atol=1e-12)
    for i in range(len(c)):  # elementwise: each score's own derivative
        num = numeric_grad_richardson(lambda v: float(f_divergence_score(v, divergence, alpha)[0][0]), c[i:i + 1].copy())
        assert ds[i] == pytest.approx(num[0], rel=1e-5, abs=1e-9)


def test_alpha_divergence_spans_reverse_and_forward_kl():
    c = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(f_divergence_score(c, "alpha_divergence", 1e-7)[0], c, atol=1e-5)  # alpha -> 0
    np.testing.assert_allclose(f_divergence_score(c, "alpha_divergence", 1.0)[0], f_divergence_score(c, "forward_kl")[0],
                               rtol=1e-12)


# ---------------------------------------------------------------------------------------------- the pieces around the losses


@given(data=st.data(), beta=st.sampled_from([0.1, 1.0]))
def test_a_weighted_sum_is_the_sum_of_its_terms(data, beta):
    pw, pl, rw, rl, counts = data.draw(batches())
    weights = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0, "apo_zero": 0.3}
    mix = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type="weighted_sum", loss_weights=weights, chosen_token_counts=counts,
                   label_smoothing=0.1, loss_inputs={"reward_mean": 0.25})
    parts = {n: dpo_loss(pw, pl, rw, rl, beta=beta, loss_type=n, chosen_token_counts=counts,
                         **({"label_smoothing": 0.1} if n == "sigmoid" else {}),
                         **({"loss_inputs": {"reward_mean": 0.25}} if n == "bco_pair" else {})) for n in weights}
    for field in ("losses", "grad_policy_chosen_logps", "grad_policy_rejected_logps"):
        want = sum(w * getattr(parts[n], field) for n, w in weights.items())
        np.testing.assert_allclose(getattr(mix, field), want, rtol=1e-12, atol=1e-15)


def test_weighted_sum_terms_are_checked():
    a = np.array([-1.0, -2.0])
    with pytest.raises(ValueError, match="'ipo' is defined on per-token mean log-probs"):
        dpo_loss(a, a, a, a, loss_type="weighted_sum", loss_weights="sigmoid=1,ipo=1")
    with pytest.raises(ValueError, match="names 'nope', which is not a loss"):
        dpo_loss(a, a, a, a, loss_type="weighted_sum", loss_weights="nope=1")
    with pytest.raises(ValueError, match="at least one weight > 0"):
        dpo_loss(a, a, a, a, loss_type="weighted_sum", loss_weights={"sigmoid": 0.0})
    with pytest.raises(ValueError, match="label_smoothing of the 'sigmoid' loss must lie in"):
        dpo_loss(a, a, a, a, loss_type="weighted_sum", loss_weights="sigmoid=1", label_smoothing=0.7)


@given(data=st.data(), beta=st.sampled_from([0.1, 1.0]), name=st.sampled_from(["sigmoid", "kto", "orpo", "aot"]))
def test_wpo_pair_weights_scale_each_pairs_loss_and_gradient(data, beta, name):
    pw, pl, rw, rl, counts = data.draw(batches(per_token=name == "orpo"))
    w = np.array(data.draw(st.lists(st.floats(0.01, 2.0), min_size=len(pw), max_size=len(pw))))
    kw = _kw(name, {}, {}, counts)
    plain = dpo_loss(pw, pl, rw, rl, beta=beta, **kw)
    weighted = dpo_loss(pw, pl, rw, rl, beta=beta, pair_weights=w, **kw)
    np.testing.assert_allclose(weighted.losses, w * plain.losses, rtol=1e-14)
    np.testing.assert_allclose(weighted.grad_policy_chosen_logps, w * plain.grad_policy_chosen_logps, rtol=1e-14)
    np.testing.assert_allclose(weighted.grad_policy_rejected_logps, w * plain.grad_policy_rejected_logps, rtol=1e-14)


def test_wpo_weights_written_out():
    """w(y) = exp(mean_t [log p(y_t) - log sum_v p(v)^2]) over the response's tokens, pair = w_w w_l."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 6, 5))  # rows [chosen; rejected] of N = 2 pairs
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = rng.integers(0, 5, (4, 6))
    tok = np.take_along_axis(logp_all, tokens[..., None], -1)[..., 0]
    lss = np.log((np.exp(logp_all) ** 2).sum(-1))
    mask = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], bool)
    want = []
    for b in range(4):
        t = np.flatnonzero(mask[b])
        want.append(math.exp(sum(tok[b, i] - lss[b, i] for i in t) / len(t)))
    got = wpo_weights(np.where(mask, tok, 0.0), np.where(mask, lss, 0.0), mask, 2)
    np.testing.assert_allclose(got, [want[0] * want[2], want[1] * want[3]], rtol=1e-13)


def test_ld_logps_written_out():
    """LD-DPO: the tokens up to the pair's shorter response count 1, the rest ld_alpha; ld_alpha = 1
    is the plain sum."""
    rng = np.random.default_rng(1)
    tok = rng.uniform(-5, 0, (4, 7))
    mask = np.array([[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]], bool)
    for alpha in (0.0, 0.3, 1.0):
        got, weights = ld_logps(np.where(mask, tok, 0.0), mask, 2, alpha)
        for b in range(4):
            t = np.flatnonzero(mask[b])
            other = np.flatnonzero(mask[(b + 2) % 4])
            shared = min(len(t), len(other))
            want = sum(tok[b, i] for i in t[:shared]) + alpha * sum(tok[b, i] for i in t[shared:])
            assert got[b] == pytest.approx(want, rel=1e-13)
        # the weights are d logps / d token log-probs
        num = numeric_grad(lambda x: float(np.sum(ld_logps(x, mask, 2, alpha)[0] * np.arange(1, 5))), np.where(mask, tok, 0.0))
        np.testing.assert_allclose(weights * np.arange(1, 5)[:, None], num, atol=1e-8)
    np.testing.assert_allclose(ld_logps(np.where(mask, tok, 0.0), mask, 2, 1.0)[0], np.where(mask, tok, 0.0).sum(1))


def test_bco_running_mean_is_the_mean_of_every_reward_seen():
    rng = np.random.default_rng(2)
    mean, count, seen = 0.0, 0, []
    for n in (3, 1, 5, 2):
        c, r = rng.normal(0, 1, n), rng.normal(-1, 1, n)
        mean, count = bco_update_reward_mean(mean, count, c, r)
        seen += list(c) + list(r)
        assert count == len(seen)
        assert float(mean) == pytest.approx(np.mean(seen), rel=1e-12)
    f32 = bco_update_reward_mean(0.0, 0, np.ones(2, np.float32), np.zeros(2, np.float32))[0]
    assert f32.dtype == np.float32 and float(f32) == 0.5
    # the loss takes it as a constant: shifting every reward and delta together changes nothing
    pw, pl, z = np.array([-3.0, -5.0]), np.array([-4.0, -2.0]), np.zeros(2)
    a = dpo_loss(pw, pl, z, z, beta=0.5, loss_type="bco_pair", loss_inputs={"reward_mean": 0.7})
    b = dpo_loss(pw + 2.0, pl + 2.0, z, z, beta=0.5, loss_type="bco_pair", loss_inputs={"reward_mean": 1.7})
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-14)


def test_kto_on_pairs_is_kto_on_their_examples():
    rng = np.random.default_rng(3)
    c, r = rng.normal(0, 2, 5), rng.normal(-1, 2, 5)
    unpaired, d = kto_loss(np.concatenate([c, r]), np.arange(10) < 5, 0.3, 0.4, 1.2, 0.8)
    paired, dc, dr = kto_pair_loss(c, r, 0.3, 1.2, 0.8, reference_point=0.4)
    assert float(np.mean(paired)) == pytest.approx(float(np.mean(unpaired)), rel=1e-14)  # TRL's mean over examples
    np.testing.assert_allclose(np.concatenate([dc, dr]), 0.5 * d, rtol=1e-14)
    num = numeric_grad(lambda x: float(np.sum(kto_loss(x, np.arange(10) < 5, 0.3, 0.4, 1.2, 0.8)[0])),
                       np.concatenate([c, r]))
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-10)


def test_kto_reference_point_from_mismatched_pairs():
    """z0 = max(0, mean of log pi - log pi_ref over the mismatched (x_i, y_{i-1})); the mismatch is a
    rotation of the batch by one (no example keeps its own completion)."""
    m = kto_mismatched(5)
    np.testing.assert_array_equal(m, [4, 0, 1, 2, 3])
    assert np.all(m != np.arange(5))
    with pytest.raises(ValueError, match="at least 2 examples"):
        kto_mismatched(1)
    p, ref = np.array([-10.0, -12.0, -9.0]), np.array([-11.0, -11.5, -10.0])
    assert float(kto_reference_point(p, ref)) == pytest.approx(np.mean(p - ref))
    assert float(kto_reference_point(ref, p)) == 0.0  # clamped: a KL estimate is not negative
    assert kto_reference_point(p.astype(np.float32), ref).dtype == np.float32


def test_a_loss_that_needs_an_input_says_so():
    a = np.array([-1.0, -2.0])
    with pytest.raises(ValueError, match="the 'kto' loss needs reference_point: KTO's z0"):
        dpo_loss(a, a, a, a, loss_type="kto")
    with pytest.raises(ValueError, match="the 'cpo' loss needs chosen_token_counts"):
        dpo_loss(a, a, None, None, loss_type="cpo")
    with pytest.raises(ValueError, match="the 'exo_pair' loss must lie in \\(0, 0.5\\)"):
        dpo_loss(a, a, a, a, loss_type="exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match="the 'nca_pair' loss has no option 'f_divergence'"):
        dpo_loss(a, a, a, a, loss_type="nca_pair", f_divergence="js_divergence")
    with pytest.raises(ValueError, match="f_divergence of the 'sigmoid' loss must be one of"):
        dpo_loss(a, a, a, a, f_divergence="kl")


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo", "alphapo", "sft"])
def test_reference_free_rows_need_no_reference(name):
    """A loss without a reference takes None for pi_ref (the trainer skips its forward) and ignores
    reference log-probs that are passed; its rewards are beta log pi."""
    pw, pl = np.array([-1.5, -0.7]), np.array([-2.0, -0.4])
    kw = dict(loss_type=name, beta=0.5, chosen_token_counts=np.array([3, 1]))
    free = dpo_loss(pw, pl, None, None, **kw)
    given_ref = dpo_loss(pw, pl, np.array([-9.0, -9.0]), np.array([-1.0, -3.0]), **kw)
    np.testing.assert_array_equal(free.losses, given_ref.losses)
    np.testing.assert_array_equal(free.chosen_rewards, 0.5 * pw)
    assert not LOSS_TABLE[name].reference


def test_the_four_losses_before_the_family_are_unchanged():
    """sigmoid, cDPO, robust, IPO, hinge, reference-free and RPO compute what they computed before the
    family came (the same operations in the same order: bit for bit), f_divergence at its default."""
    rng = np.random.default_rng(2024)
    for dtype in (np.float64, np.float32):
        pw, pl, rw, rl = (np.concatenate([rng.uniform(-60, -1, 9), [-1e4, 0.0, 1e4]]).astype(dtype) for _ in range(4))
        counts = rng.integers(1, 40, 12)
        for name, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("ipo", None), ("hinge", None)):
            for beta in (0.1, 1.0):
                opts = {} if eps is None else {"label_smoothing": eps}
                margin = LOSS_TABLE[name].margin
                with np.errstate(all="ignore"):
                    out = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type=name, **opts)
                    rpo = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type=name, rpo_alpha=0.7, chosen_token_counts=counts, **opts)
                    loss, dz = margin((pw - rw) - (pl - rl), beta, **opts)
                    weight = -dz
                    gc, gr = -beta * weight / 12, beta * weight / 12
                    from minidpo.losses import nll_loss

                    nll, g_nll = nll_loss(pw, counts)
                np.testing.assert_array_equal(out.losses, loss)
                np.testing.assert_array_equal(out.gradient_weight, weight)
                np.testing.assert_array_equal(out.grad_policy_chosen_logps, gc)
                np.testing.assert_array_equal(out.grad_policy_rejected_logps, gr)
                np.testing.assert_array_equal(rpo.losses, loss + 0.7 * nll)
                np.testing.assert_array_equal(rpo.grad_policy_chosen_logps, gc + 0.7 * g_nll)


# ---------------------------------------------------------------------------------------------- the table's reach


@pytest.mark.parametrize("name", list(LOSS_TABLE))
def test_every_loss_reaches_the_config_the_command_line_and_evaluation(name):
    row = LOSS_TABLE[name]
    assert row.help and row.source and "\n" not in row.help
    for opt_name, opt in row.options.items():
        assert opt.help, opt_name
        assert opt.check(opt_name, opt.default, name) is not None  # the default is a legal value
    tc = TrainConfig(loss_type=name)
    assert tc.logps_averaged is row.average_logps
    args = cli.build_parser().parse_args(["dpo", "--data", "d.jsonl", "--ref", "r", "--out", "o", "--loss", name])
    settings = cli._loss_settings(args)
    assert settings["loss_type"] == name and TrainConfig(**settings).loss_type == name
    # held-out evaluation's loss part: the training step's, on (2N,) log-probs
    rng = np.random.default_rng(4)
    logps = rng.uniform(-8 if row.average_logps else -40, -0.1, 6)
    refs = (None, None) if not row.needs_reference() else (rng.uniform(-40, -1, 3), rng.uniform(-40, -1, 3))
    inputs = {"reference_point": 0.2} if name == "kto" else None
    out, dlogps = dpo_step_loss(logps, np.array([3, 4, 5, 6, 7, 8]), *refs, tc, inputs)
    assert out.losses.shape == (3,) and dlogps.shape == (6,) and np.all(np.isfinite(dlogps))


def test_option_flags_of_every_kind(capsys):
    def settings(*extra):
        args = cli.build_parser().parse_args(["dpo", "--data", "d", "--ref", "r", "--out", "o", *extra])
        return cli._loss_settings(args)

    assert settings("--loss", "ipo", "--f-divergence", "js_divergence")["loss_options"] == {"f_divergence": "js_divergence"}
    mix = settings("--loss", "weighted_sum", "--loss-weights", "sigmoid=0.8,bco_pair=0.2,sft=1", "--label-smoothing", "0.1")
    assert mix["loss_options"] == {"loss_weights": {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}, "label_smoothing": 0.1}
    tc = TrainConfig(**mix)
    assert TrainConfig.from_dict(tc.to_dict()).loss_options == tc.loss_options  # checkpoints keep it
    assert settings("--loss", "kto", "--desirable-weight", "1.33")["loss_options"] == {"desirable_weight": 1.33}
    for bad, msg in ((["--loss", "nca_pair", "--f-divergence", "forward_kl"], "--f-divergence applies to --loss"),
                     (["--loss", "weighted_sum", "--loss-weights", "sigmoid=1,orpo=1"], "per-token mean log-probs"),
                     (["--loss", "simpo", "--tau", "0.1"], "--tau applies to --loss discopop, not simpo"),
                     (["--loss", "discopop", "--tau", "2"], r"must lie in \(0, 1\]")):
        with pytest.raises(cli.UsageError, match=msg):
            settings(*bad)
    with pytest.raises(SystemExit):
        settings("--loss", "sigmoid", "--f-divergence", "kl")
    assert "invalid choice: 'kl'" in capsys.readouterr().err


@requires_cuda
def test_every_loss_runs_on_cupy_as_on_numpy():
    """The family on the device (real CuPy on a GPU, the strict stand-in elsewhere): the same numbers
    as NumPy in float32, device arrays out, reference log-probs from the host accepted."""
    import cupy as cp

    rng = np.random.default_rng(7)
    n = 6
    pw, pl, rw, rl = (rng.uniform(-30, -2, n).astype(np.float32) for _ in range(4))
    counts = rng.integers(1, 9, n)
    for case in CASES:
        _, loss_type, options, inputs = case
        kw = _kw(loss_type, options, inputs, counts)
        host = dpo_loss(pw, pl, rw, rl, beta=0.3, **kw)
        dkw = dict(kw, chosen_token_counts=cp.asarray(counts))
        dev = dpo_loss(cp.asarray(pw), cp.asarray(pl), rw, rl, beta=0.3, pair_weights=cp.ones(n, dtype=cp.float32), **dkw)
        assert isinstance(dev.losses, cp.ndarray) and dev.losses.dtype == np.float32, case[0]
        for name in ("losses", "grad_policy_chosen_logps", "grad_policy_rejected_logps"):
            np.testing.assert_allclose(cp.asnumpy(getattr(dev, name)), getattr(host, name), rtol=2e-5, atol=1e-6,
                                       err_msg=f"{case[0]} {name}")
