"""The preference losses: eq. (2) reward modelling, eq. (7) DPO and its variants, eq. (9) gradient.

Equation numbers are those of Rafailov et al. 2023 (arXiv:2305.18290):

    (1)  p*(y1 > y2 | x) = sigma(r*(x, y1) - r*(x, y2))                       Bradley-Terry
    (2)  L_R(r) = -E[ log sigma(r(x, y_w) - r(x, y_l)) ]                       reward modelling
    (7)  L_DPO  = -E[ log sigma( beta log pi(y_w|x)/pi_ref(y_w|x)
                                - beta log pi(y_l|x)/pi_ref(y_l|x) ) ]
    (8)  r_hat(x, y) = beta log pi(y|x)/pi_ref(y|x)                           implicit reward
    (9)  grad L_DPO = -beta E[ sigma(r_hat(x, y_l) - r_hat(x, y_w))
                               (grad log pi(y_w|x) - grad log pi(y_l|x)) ]

Everything here is a free function of per-example log-probs, which logprobs.sequence_logps
computes. The losses see the policy only through two numbers per pair; their gradients with
respect to those two numbers are returned alongside the losses, and sequence_logps_backward
carries them into the model. Reference log-probs are constants: no gradient flows to them.

Notation used in every docstring below (N = number of preference pairs, shapes (N,)):

    h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)     the log-ratio margin
    z = beta * h = r_hat_w - r_hat_l                                   the reward margin

so eq. (7) is -log sigma(z), and the official code computes it in this beta-factored form.
All gradients are of the MEAN loss over the N pairs (hence the 1/N factors).

The family after eq. (7) (EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP, sigmoid_norm, SFT, weighted
sums, SimPO, CPO, AlphaPO, ORPO, KTO; f-DPO's scores; LD-DPO's and WPO's log-prob rules) follows,
each one free function with its per-pair derivatives and its paper, and each one row of
LOSS_TABLE: name, function, options (default, help, range), whether it needs pi_ref, its log-prob
rule, what the trainer supplies each step (Loss.inputs), its source. dpo_loss runs any row.

Numerics. log_sigmoid and sigmoid are stable for |x| up to the dtype's range, with no
overflow, underflow or invalid-value floating-point events (they pass under
``np.errstate(all="raise")``). Float32 in gives float32 out; float64 in gives float64 out;
array-valued hyper-parameters are never mixed in, only Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import checks
from .backend import get_array_module, to_numpy

__all__ = [
    "LOSS_TABLE",
    "LOSS_TYPES",
    "Loss",
    "Option",
    "Input",
    "F_DIVERGENCES",
    "register_loss",
    "loss_row",
    "IPO_CONVENTIONS",
    "log_sigmoid",
    "sigmoid",
    "reward_model_loss",
    "implicit_reward",
    "DPOOutput",
    "dpo_loss",
    "sigmoid_loss",
    "robust_loss",
    "ipo_loss",
    "hinge_loss",
    "nll_loss",
    "average_logps_for",
    "dpo_step_loss",
    "preference_metrics",
    "f_divergence_score",
    "exo_pair_loss",
    "discopop_loss",
    "simpo_loss",
    "nca_pair_loss",
    "bco_pair_loss",
    "bco_update_reward_mean",
    "sppo_hard_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "sft_loss",
    "alphapo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_pair_loss",
    "kto_reference_point",
    "kto_mismatched",
    "weighted_sum_loss",
    "ld_logps",
    "wpo_weights", "wpo_pair_weights",
]

IPO_CONVENTIONS = ("per_token", "summed")


# ----------------------------------------------------------------------------------------------
# stable sigmoid and log-sigmoid


def _exp_neg_abs(x):
    """exp(-|x|) in (0, 1], computed without an underflow event.

    Past |x| > c = log(1/tiny) - 1 (about 86 in float32, 707 in float64) the value is below the
    smallest normal number; it is returned as exactly 0, which is what the exp would round to
    (give or take a subnormal) but without raising the underflow flag.
    """
    xp = get_array_module(x)
    cap = x.dtype.type(-math.log(float(np.finfo(x.dtype).tiny)) - 1.0)
    a = xp.abs(x)
    e = xp.exp(-xp.minimum(a, cap))  # never below exp(-cap), a normal number
    return xp.where(a > cap, x.dtype.type(0), e)


def _as_float_array(x):
    xp = get_array_module(x)
    x = xp.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)  # ints or Python numbers: compute in float64
    return x


def log_sigmoid(x):
    """log sigma(x) = -log(1 + exp(-x)), stable for any finite x.

        log sigma(x) = min(x, 0) - log(1 + exp(-|x|))

    Both branches of the naive formula are folded into one: for x >= 0 it is
    -log1p(exp(-x)), for x < 0 it is x - log1p(exp(x)); exp never sees a positive argument.

    Args:
        x: float array of any shape (int input is promoted to float64).
    Returns:
        array of x's shape and dtype, every entry <= 0.
    """
    x = _as_float_array(x)
    xp = get_array_module(x)
    return xp.minimum(x, x.dtype.type(0)) - xp.log1p(_exp_neg_abs(x))


def sigmoid(x):
    """sigma(x) = 1 / (1 + exp(-x)), stable for any finite x.

        sigma(x) = 1 / (1 + e)   if x >= 0,      e / (1 + e)   if x < 0,      e = exp(-|x|)

    Args:
        x: float array of any shape (int input is promoted to float64).
    Returns:
        array of x's shape and dtype, in [0, 1].
    """
    x = _as_float_array(x)
    xp = get_array_module(x)
    e = _exp_neg_abs(x)
    one = x.dtype.type(1)
    return xp.where(x >= 0, one / (one + e), e / (one + e))


# ----------------------------------------------------------------------------------------------
# eq. (2): the reward-model loss


def reward_model_loss(reward_chosen, reward_rejected):
    """Eq. (2): the Bradley-Terry negative log-likelihood of the observed preferences.

        loss_i = -log sigma(r_w,i - r_l,i)                                     eq. (2)
        d mean(loss) / d r_w,i = -sigma(r_l,i - r_w,i) / N
        d mean(loss) / d r_l,i = +sigma(r_l,i - r_w,i) / N

    Args:
        reward_chosen: (N,) float, r(x, y_w).
        reward_rejected: (N,) float, r(x, y_l).
    Returns:
        losses (N,), grad_chosen (N,), grad_rejected (N,), all in the inputs' dtype.
    """
    r_w, r_l = _check_pair(reward_chosen, reward_rejected, "reward_chosen", "reward_rejected")
    n = r_w.shape[0]
    losses = -log_sigmoid(r_w - r_l)  # (N,)
    p_wrong = sigmoid(r_l - r_w)  # (N,) the model's probability of the opposite preference
    return losses, -p_wrong / n, p_wrong / n


# ----------------------------------------------------------------------------------------------
# eq. (8): the implicit reward


def implicit_reward(policy_logps, ref_logps, beta):
    """Eq. (8): r_hat(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)).

    By eq. (5) the true reward of the policy that is optimal for it is r_hat + beta log Z(x);
    the per-prompt term beta log Z(x) cancels from every preference (eq. 6), so r_hat is
    the reward "up to a function of x", which is all Bradley-Terry can see.

    Args:
        policy_logps: (N,) or any shape, log pi(y|x).
        ref_logps: same shape, log pi_ref(y|x) (cast to policy_logps' dtype).
        beta: the KL coefficient, > 0.
    Returns:
        array of policy_logps' shape and dtype.
    """
    b = checks.positive_beta(beta)
    xp = get_array_module(policy_logps, ref_logps)
    pi = xp.asarray(policy_logps)
    ref = xp.asarray(ref_logps).astype(pi.dtype, copy=False)
    return b * (pi - ref)


# ----------------------------------------------------------------------------------------------
# eq. (7) and its family, with the eq. (9) gradient


@dataclass(frozen=True)
class DPOOutput:
    """What dpo_loss returns. All arrays are (N,) in the policy log-probs' dtype, on their device.

    Attributes:
        losses: per-pair losses (including the rpo_alpha or the row's NLL term; for AOT, per rank
            of the batch's sort; times WPO's pair weights when given).
        chosen_rewards: r_hat_w = beta (log pi_w - log pi_ref_w), eq. (8); a constant (no gradient);
            beta log pi_w for a loss without a reference.
        rejected_rewards: r_hat_l = beta (log pi_l - log pi_ref_l), eq. (8).
        grad_policy_chosen_logps: d mean(losses) / d log pi(y_w|x).
        grad_policy_rejected_logps: d mean(losses) / d log pi(y_l|x).
        gradient_weight: eq. (9)'s per-pair weight: for a loss of the margin -d loss_i / d z_i, so
            without the NLL term grad_policy_chosen_logps = -beta * gradient_weight / N and
            grad_policy_rejected_logps = +beta * gradient_weight / N; for any other loss (d loss_i /
            d log pi_l - d loss_i / d log pi_w) / (2 beta). For plain DPO it is
            sigma(r_hat_l - r_hat_w) in (0, 1): large when the implicit reward model orders the
            pair wrongly, small when it is already right.
        log_ratio_margin: h = log pi_w/pi_ref_w - log pi_l/pi_ref_l (z = beta h is the reward margin).
        nll_losses: per-pair per-token NLL of the chosen response when rpo_alpha > 0 or the row has
            an NLL term (CPO, ORPO), else None.
    """

    losses: Any
    chosen_rewards: Any
    rejected_rewards: Any
    grad_policy_chosen_logps: Any
    grad_policy_rejected_logps: Any
    gradient_weight: Any
    log_ratio_margin: Any
    nll_losses: Any = None

    @property
    def loss(self):
        """The mean loss, a 0-d array on the device (no host sync)."""
        xp = get_array_module(self.losses)
        return xp.asarray(xp.mean(self.losses))


# Each margin loss: (h, beta, **options) -> (loss (N,), dloss/dz (N,)), with z = beta h the reward margin.


def sigmoid_loss(h, beta: float, label_smoothing: float = 0.0):
    """Eq. (7), DPO; with eps = label_smoothing > 0 conservative DPO (cDPO: each label flipped
    with probability eps):

        loss = -(1 - eps) log sigma(z) - eps log sigma(-z)
        dloss/dz = -(1 - eps) sigma(-z) + eps sigma(z)        (eps = 0: -sigma(r_hat_l - r_hat_w), eq. 9)
    """
    eps = label_smoothing
    z = beta * h
    loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    return loss, -((1.0 - eps) * sigmoid(-z) - eps * sigmoid(z))


def robust_loss(h, beta: float, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate eps = label_smoothing < 0.5:

        loss = ((1 - eps) (-log sigma(z)) - eps (-log sigma(-z))) / (1 - 2 eps)
        dloss/dz = -((1 - eps) sigma(-z) + eps sigma(z)) / (1 - 2 eps)
    For eps > 0 it is unbounded below (~ -eps z / (1 - 2 eps)).
    """
    eps = label_smoothing
    z = beta * h
    loss = ((1.0 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return loss, -(((1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)) / (1.0 - 2.0 * eps))


def ipo_loss(h, beta: float):
    """IPO (Azar et al. 2023), a square pulling h to 1 / (2 beta):

        loss = (h - 1/(2 beta))^2,    dloss/dz = (1/beta) dloss/dh = 2 (h - 1/(2 beta)) / beta
    """
    gap = h - 1.0 / (2.0 * beta)
    return gap * gap, -((-2.0 / beta) * gap)


def hinge_loss(h, beta: float):
    """SLiC (Zhao et al. 2023), a hinge on the reward margin:

        loss = max(0, 1 - z),    dloss/dz = -1[z < 1]   (the subgradient 0 at z = 1)
    """
    z = beta * h
    return get_array_module(z).maximum(1.0 - z, z.dtype.type(0)), -((z < 1.0).astype(z.dtype))


# ----------------------------------------------------------------------------------------------
# the family after DPO: one free function each, with its derivative written out
#
# Three shapes of function (a row of LOSS_TABLE names exactly one):
#   margin  (h, beta, **options)                        -> (loss (N,), dloss/dz (N,)),  z = beta h
#   pair    (chosen, rejected, beta, **options, **inputs) -> (loss (N,), dloss/dchosen (N,), dloss/drejected (N,))
#           chosen = log pi(y_w|x) - log pi_ref(y_w|x) (log pi(y_w|x) alone for a loss without reference)
#   batch   (pi_w, pi_l, ref_w, ref_l, beta, **options, **inputs) -> (loss (N,), dloss/dpi_w (N,), dloss/dpi_l (N,))
#           for a loss that couples the pairs of a batch (AOT's sort) or needs the four log-probs apart.
# The derivatives are of the SUM of the returned losses (each pair's own derivative); dpo_loss divides by N.


def _exp_nonpos(x):
    """exp(x) for x <= 0 (larger x are clamped to 0), without an underflow event: exp(-|min(x, 0)|)."""
    return _exp_neg_abs(get_array_module(x).minimum(x, x.dtype.type(0)))


def _saturation(dtype) -> float:
    """The largest exponent t with exp(t) safe to add, subtract and square: log(max) / 2 - 2 (about
    352 in float64, 42 in float32). Scores built from exp(t) saturate there instead of overflowing."""
    return 0.5 * math.log(float(np.finfo(dtype).max)) - 2.0


def _exp_saturated(t):
    """(exp(t) saturated, whether t was at most the cap): exp of t clipped to [-cap, cap] (cap =
    _saturation), and exactly 0 below -cap, so neither an overflow nor an underflow event happens (nor
    one in a product of it). Its derivative is exp(t) inside, 0 where t > cap (saturated) and below
    -cap (where exp(t) < exp(-cap), about 1e-153 in float64 and 6e-19 in float32, is rounding level
    next to the 1 it is added to)."""
    xp = get_array_module(t)
    cap = t.dtype.type(_saturation(t.dtype))
    e = xp.exp(xp.clip(t, -cap, cap))
    return xp.where(t < -cap, t.dtype.type(0), e), t <= cap


def _product(a, b, scale: float = 1.0):
    """scale * a * b, with each product whose magnitude would fall below 2^20 times the smallest
    normal number set to exactly 0 (about 2e-302 in float64, 1e-32 in float32, rounding level next
    to any other pair's gradient), so that neither the product nor dpo_loss's division by N raises
    an underflow event when two small factors meet (a saturated loss's slope and a saturated
    score's). scale > 0 is a Python float."""
    xp = get_array_module(a, b)
    tiny = float(np.finfo(a.dtype).tiny) * 2.0 ** 20
    c = xp.clip(xp.abs(b), a.dtype.type(tiny), a.dtype.type(1))  # |b| in [tiny, 1]
    keep = xp.abs(a) >= (tiny / c) / min(scale, 1.0)  # then |scale a b| >= tiny (thresholds >= tiny: no event)
    return (xp.where(keep, a, a.dtype.type(0)) * b) * scale


def _log1mexp(a):
    """log(1 - exp(a)) for a < 0, stable on both sides of -log 2 (Maechler 2012): log(-expm1(a)) near 0,
    log1p(-exp(a)) below. The arguments of expm1 and exp are kept where they raise no event."""
    xp = get_array_module(a)
    ln2 = a.dtype.type(-math.log(2.0))
    near = xp.log(-xp.expm1(xp.maximum(a, ln2)))  # a in [-log 2, 0)
    far = xp.log1p(-_exp_nonpos(xp.minimum(a, ln2)))  # a < -log 2
    return xp.where(a > ln2, near, far)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(logratio, divergence: str = "reverse_kl", alpha: float = 0.5):
    """f-DPO's score of a response (Wang et al. 2023, arXiv:2309.16240, Thm. 1 and Table 1): the
    derivative f'(u) of the divergence's generator at u = pi/pi_ref = exp(logratio), which replaces
    the log-ratio of eq. (7) (reverse KL, f'(u) = log u + 1; the constant cancels in h).

        reverse_kl        s = log u = logratio                          ds/dlogratio = 1
        forward_kl        s = 1 - 1/u = 1 - exp(-logratio)              ds/dlogratio = exp(-logratio)
        js_divergence     s = log(2u / (1 + u)) = log 2 + log sigma(logratio)
                                                                        ds/dlogratio = sigma(-logratio)
        alpha_divergence  s = (1 - u^-alpha) / alpha                     ds/dlogratio = exp(-alpha logratio)
                          (the paper's alpha in (0, 1); alpha -> 0 is reverse KL, alpha = 1 forward KL)

    The exponentials saturate at exp(_saturation(dtype)) (about e^352 in float64, e^42 in float32)
    instead of overflowing; past it the score is constant and its derivative 0.

    Args:
        logratio: (N,) float, log pi(y|x) - log pi_ref(y|x).
        divergence: one of F_DIVERGENCES. alpha: the alpha-divergence's alpha, in (0, 1).
    Returns:
        score (N,), dscore/dlogratio (N,), in logratio's dtype.
    """
    xp = get_array_module(logratio)
    if divergence == "reverse_kl":
        return logratio, xp.ones_like(logratio)
    if divergence == "js_divergence":
        return math.log(2.0) + log_sigmoid(logratio), sigmoid(-logratio)
    if divergence == "forward_kl":
        e, inside = _exp_saturated(-logratio)  # exp(-logratio) = 1/u
        return 1.0 - e, xp.where(inside, e, logratio.dtype.type(0))
    if divergence == "alpha_divergence":
        e, inside = _exp_saturated(-alpha * logratio)  # u^-alpha
        return (1.0 - e) / alpha, xp.where(inside, e, logratio.dtype.type(0))
    raise ValueError(f"unknown f-divergence {divergence!r}; choose one of {', '.join(F_DIVERGENCES)}")


def exo_pair_loss(h, beta: float, label_smoothing: float = 1e-3):
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16; K = 2): the reverse KL from the policy's
    two-way softmax q = (sigma(z), sigma(-z)) over {chosen, rejected} to the label distribution
    p = (1 - eps, eps), eps = label_smoothing > 0 (the paper recommends 1e-3):

        loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),   q_w = sigma(z), q_l = sigma(-z)
        dloss/dz = q_w q_l (z - log((1 - eps) / eps))      (zero at the minimum z* = log((1 - eps) / eps))
    """
    eps = label_smoothing
    z = beta * h
    q_w, q_l = sigmoid(z), sigmoid(-z)
    loss = q_w * (log_sigmoid(z) - math.log1p(-eps)) + q_l * (log_sigmoid(-z) - math.log(eps))
    return loss, q_w * q_l * (z - (math.log1p(-eps) - math.log(eps)))


def discopop_loss(h, beta: float, tau: float = 0.05):
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, eq. 5), a blend of
    eq. (7)'s logistic loss and an exponential loss, mixed by m = sigma(z / tau) (tau = 0.05, the
    paper's; tau <= 1 keeps exp(-z) m bounded by 1, larger tau overflows at large negative margins):

        loss = (1 - m) (-log sigma(z)) + m exp(-z),            m = sigma(z / tau)
        dloss/dz = -(1 - m) sigma(-z) + m (1 - m) / tau (exp(-z) - (-log sigma(z))) - m exp(-z)
    m exp(-z) is computed as exp(-z + log sigma(z / tau)) <= 1, so no overflow for any z.
    """
    z = beta * h
    m, m_bar = sigmoid(z / tau), sigmoid(-z / tau)  # m and 1 - m
    softplus = -log_sigmoid(z)  # -log sigma(z)
    m_exp = _exp_nonpos(log_sigmoid(z / tau) - z)  # m exp(-z), in (0, 1] for tau <= 1
    loss = m_bar * softplus + m_exp
    dloss = -m_bar * sigmoid(-z) + (m_bar / tau) * (m_exp - m * softplus) - m_exp
    return loss, dloss


def simpo_loss(h, beta: float, gamma: float = 0.5):
    """SimPO (Meng, Xia & Chen 2024, arXiv:2405.14734, eq. 6): eq. (7) without a reference model, on
    per-token mean log-probs (h = log pi(y_w|x)/|y_w| - log pi(y_l|x)/|y_l|), with a target reward
    margin gamma (in reward units; 0.5 is TRL's CPOConfig default, the paper tunes it per model):

        loss = -log sigma(beta h - gamma),     dloss/dz = -sigma(gamma - beta h)
    """
    z = beta * h - gamma
    return -log_sigmoid(z), -sigmoid(-z)


def nca_pair_loss(chosen, rejected, beta: float):
    """NCA (Chen et al. 2024, arXiv:2402.05369, the pairwise form TRL calls nca_pair), with the
    rewards r_w = beta chosen, r_l = beta rejected (eq. 8):

        loss = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)
        dloss/dchosen = beta (-sigma(-r_w) + 1/2 sigma(r_w)),   dloss/drejected = beta/2 sigma(r_l)
    Each response is scored against an absolute 0, not against the other: the per-prompt shift of
    eq. (5)-(6) does not cancel.
    """
    r_w, r_l = beta * chosen, beta * rejected
    loss = -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)
    return loss, beta * (0.5 * sigmoid(r_w) - sigmoid(-r_w)), (0.5 * beta) * sigmoid(r_l)


def bco_pair_loss(chosen, rejected, beta: float, *, reward_mean=0.0):
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656): a binary classifier that calls the chosen
    response good and the rejected one bad, its logit the reward r = beta log pi/pi_ref (eq. 8)
    shifted by delta = reward_mean, the running mean of the rewards (bco_update_reward_mean keeps it):

        loss = -log sigma(r_w - delta) - log sigma(-(r_l - delta))
        dloss/dchosen = -beta sigma(delta - r_w),   dloss/drejected = beta sigma(r_l - delta)
    delta is a constant (no gradient flows to it). delta = 0 is TRL 1.16's bco_pair, which keeps no
    running mean.
    """
    a = beta * chosen - reward_mean  # r_w - delta
    b = beta * rejected - reward_mean  # r_l - delta
    return -log_sigmoid(a) - log_sigmoid(-b), -beta * sigmoid(-a), beta * sigmoid(b)


def bco_update_reward_mean(mean, count: int, chosen_rewards, rejected_rewards):
    """BCO's running reward mean delta (Jung et al. 2024): the mean of every reward seen so far, chosen
    and rejected alike, updated with one batch's 2N rewards (pure: the state goes in and comes out).

        count' = count + 2N,   mean' = mean + (sum(rewards) - 2N mean) / count'
    The trainer keeps (mean, count) across steps and in its checkpoints, calls this with the batch's
    detached rewards beta (log pi - log pi_ref) before the loss, and passes mean' as reward_mean.

    Args:
        mean: the current mean (a float or 0-d array; 0.0 before the first batch). count: rewards seen.
        chosen_rewards, rejected_rewards: (N,) this batch's rewards.
    Returns:
        (mean' (0-d array in the rewards' dtype), count' (int)).
    """
    xp = get_array_module(chosen_rewards, rejected_rewards)
    k = int(chosen_rewards.shape[0] + rejected_rewards.shape[0])
    new_count = int(count) + k
    total = xp.sum(chosen_rewards) + xp.sum(rejected_rewards)
    mean = xp.asarray(mean, dtype=chosen_rewards.dtype)
    return mean + (total - k * mean) / float(new_count), new_count


def sppo_hard_loss(chosen, rejected, beta: float):
    """SPPO with hard probabilities (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P(y_w wins) = 1 and
    P(y_l wins) = 0, as TRL's sppo_hard): each log-ratio regressed to +-1/(2 beta):

        loss = (chosen - 1/(2 beta))^2 + (rejected + 1/(2 beta))^2
        dloss/dchosen = 2 (chosen - 1/(2 beta)),   dloss/drejected = 2 (rejected + 1/(2 beta))
    """
    a = chosen - 0.5 / beta
    b = rejected + 0.5 / beta
    return a * a + b * b, 2.0 * a, 2.0 * b


def apo_zero_loss(chosen, rejected, beta: float):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): raise the chosen response's
    likelihood and lower the rejected one's, each anchored at the reference (r = beta log-ratio):

        loss = (1 - sigma(r_w)) + sigma(r_l)
        dloss/dchosen = -beta sigma(r_w) sigma(-r_w),   dloss/drejected = beta sigma(r_l) sigma(-r_l)
    """
    r_w, r_l = beta * chosen, beta * rejected
    s_w, s_l = sigmoid(r_w), sigmoid(r_l)
    return sigmoid(-r_w) + s_l, -beta * s_w * sigmoid(-r_w), beta * s_l * sigmoid(-r_l)


def apo_down_loss(chosen, rejected, beta: float):
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both likelihoods, the rejected one more (for
    chosen responses worse than the model's own):

        loss = sigma(r_w) + (1 - sigma(r_w - r_l))
        dloss/dchosen = beta (sigma(r_w) sigma(-r_w) - sigma(z) sigma(-z)),  z = r_w - r_l
        dloss/drejected = beta sigma(z) sigma(-z)
    """
    r_w = beta * chosen
    z = beta * (chosen - rejected)
    s_z = sigmoid(z) * sigmoid(-z)
    return sigmoid(r_w) + sigmoid(-z), beta * (sigmoid(r_w) * sigmoid(-r_w) - s_z), beta * s_z


def aot_loss(pi_w, pi_l, ref_w, ref_l, beta: float, label_smoothing: float = 0.0):
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): first-order stochastic dominance of the
    policy's log-ratio pi_w - pi_l over the reference's, enforced by sorting both over the batch and
    pairing them by rank (the optimal transport between the two empirical distributions), each
    sorted gap scored by cDPO's loss (eq. 7 with label smoothing eps):

        d_k = sort(log pi_w - log pi_l)_k - sort(log ref_w - log ref_l)_k
        loss_k = -(1 - eps) log sigma(beta d_k) - eps log sigma(-beta d_k)
        dloss_k / dlog pi_w[perm_k] = beta l'(beta d_k) = -dloss_k / dlog pi_l[perm_k]
    (perm sorts the policy's log-ratios; loss_k belongs to a rank, not to a pair). The pairs of a
    batch are coupled: the loss of a batch is not the sum of its pairs' losses.
    """
    xp = get_array_module(pi_w)
    lr = pi_w - pi_l  # (N,)
    perm = xp.argsort(lr)  # (N,) the pair at each rank
    d = lr[perm] - xp.sort(ref_w - ref_l)  # (N,)
    losses, dz = sigmoid_loss(d, beta, label_smoothing)
    g = xp.empty_like(lr)
    g[perm] = beta * dz  # back through the sort: rank k's derivative goes to the pair it came from
    return losses, g, -g


def aot_unpaired_loss(chosen, rejected, beta: float, label_smoothing: float = 0.0):
    """AOT, unpaired (Melnyk et al. 2024): dominance of the chosen log-ratios' distribution over the
    rejected ones', the two sorted over the batch separately and matched by rank:

        d_k = sort(chosen)_k - sort(rejected)_k
        loss_k = -(1 - eps) log sigma(beta d_k) - eps log sigma(-beta d_k)
        dloss_k / dchosen[perm_w,k] = beta l'(beta d_k),  dloss_k / drejected[perm_l,k] = -beta l'(beta d_k)
    """
    xp = get_array_module(chosen)
    pw, pl = xp.argsort(chosen), xp.argsort(rejected)
    losses, dz = sigmoid_loss(chosen[pw] - rejected[pl], beta, label_smoothing)
    g_w, g_l = xp.empty_like(chosen), xp.empty_like(rejected)
    g_w[pw] = beta * dz
    g_l[pl] = -beta * dz
    return losses, g_w, g_l


def sft_loss(chosen, rejected, beta: float, *, chosen_token_counts):
    """The chosen response's per-token negative log-likelihood (SFT on the chosen responses; TRL's
    sft loss type), beta and the rejected response unused:

        loss = -log pi(y_w|x) / n_w,     dloss/dchosen = -1 / n_w,     dloss/drejected = 0
    """
    xp = get_array_module(chosen)
    n = xp.asarray(chosen_token_counts).astype(chosen.dtype)
    return -chosen / n, -1.0 / n, xp.zeros_like(rejected)


def alphapo_loss(chosen, rejected, beta: float, alpha: float = 0.25, gamma: float = 0.5):
    """AlphaPO (Gupta et al. 2025, arXiv:2501.03884): SimPO (eq. 6 there) with the log reward
    replaced by an alpha-power of the per-token probability, no reference model:

        r(a) = (1 - exp(-alpha a)) / alpha,   a = log pi(y|x) / |y|     (alpha -> 0: r = a, SimPO)
        loss = -log sigma(beta (r_w - r_l) - gamma)
        dloss/dchosen = -sigma(-(beta (r_w - r_l) - gamma)) beta exp(-alpha a_w),  dloss/drejected: the
        same with +exp(-alpha a_l)
    exp(-alpha a) saturates at exp(_saturation(dtype)) rather than overflow (log-probs past
    -352 / alpha per token in float64); alpha = 0 is SimPO exactly.
    """
    xp = get_array_module(chosen)
    if alpha == 0.0:
        r_w, r_l, dr_w, dr_l = chosen, rejected, xp.ones_like(chosen), xp.ones_like(rejected)
    else:
        e_w, in_w = _exp_saturated(-alpha * chosen)  # exp(-alpha a_w) = p_w^-alpha
        e_l, in_l = _exp_saturated(-alpha * rejected)
        r_w, r_l = (1.0 - e_w) / alpha, (1.0 - e_l) / alpha
        zero = chosen.dtype.type(0)
        dr_w, dr_l = xp.where(in_w, e_w, zero), xp.where(in_l, e_l, zero)
    z = beta * (r_w - r_l) - gamma
    g = -sigmoid(-z)  # dloss/dz
    return -log_sigmoid(z), beta * g * dr_w, -beta * g * dr_l


def _log_odds(a):
    """ORPO's log odds log(p / (1 - p)) of p = exp(a) (a = a per-token mean log-prob < 0), and its
    derivative 1 / (1 - p). a is clamped at -sqrt(tiny) (p = 1 has infinite odds); there the
    derivative is 0."""
    xp = get_array_module(a)
    top = a.dtype.type(-math.sqrt(float(np.finfo(a.dtype).tiny)))
    inside = a <= top
    a = xp.minimum(a, top)
    one_minus_p = -_log1mexp(a)  # -log(1 - p)
    ln2 = a.dtype.type(-math.log(2.0))
    d = xp.where(a > ln2, -1.0 / xp.expm1(xp.maximum(a, ln2)),  # a in [-log 2, 0): 1 / (1 - p) = -1 / expm1(a)
                 1.0 / (1.0 - _exp_nonpos(xp.minimum(a, ln2))))  # a < -log 2: p <= 1/2
    return a + one_minus_p, xp.where(inside, d, a.dtype.type(0))


def orpo_loss(chosen, rejected, beta: float):
    """ORPO's odds-ratio term (Hong, Lee & Thorne 2024, arXiv:2403.07691, eqs. 4-7), no reference
    model, on per-token mean log-probs a = log pi(y|x) / |y|; beta is the paper's lambda (0.1 there and
    in TRL, which passes it as beta). The row adds the NLL term L_SFT (weight 1, the paper's):

        odds(y) = p / (1 - p),  p = exp(a);   x = log odds(y_w) - log odds(y_l)
        loss = -beta log sigma(x)                                   (= lambda L_OR)
        dloss/dchosen = -beta sigma(-x) / (1 - p_w),   dloss/drejected = +beta sigma(-x) / (1 - p_l)
    """
    o_w, d_w = _log_odds(chosen)
    o_l, d_l = _log_odds(rejected)
    x = o_w - o_l
    g = -beta * sigmoid(-x)  # dloss/dx
    return -beta * log_sigmoid(x), g * d_w, -g * d_l


def kto_loss(logratios, desirable, beta: float, reference_point, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7) on unpaired examples: a prospect-theory
    value of each completion's reward r = beta log pi/pi_ref against the reference point z0, the
    policy's KL from pi_ref (kto_reference_point; a constant, no gradient flows to it):

        desirable:    loss = lambda_D (1 - sigma(beta (rho - z0)))
        undesirable:  loss = lambda_U (1 - sigma(beta (z0 - rho)))          rho = log pi(y|x) - log pi_ref(y|x)
        dloss/drho = -lambda_D beta sigma(u) sigma(-u)  (u = beta (rho - z0)),   +lambda_U beta sigma(u) sigma(-u)

    The paper's defaults: beta 0.1, lambda_D = lambda_U = 1; it advises lambda_D n_D / (lambda_U n_U) in
    [1, 4/3] for n_D desirable and n_U undesirable examples.

    Args:
        logratios: (M,) float, rho. desirable: (M,) bool, the label. beta: > 0.
        reference_point: z0, a float or 0-d array (log-ratio units). desirable_weight,
        undesirable_weight: lambda_D, lambda_U > 0.
    Returns:
        losses (M,), dloss_i / drho_i (M,), in logratios' dtype.
    """
    xp = get_array_module(logratios)
    z0 = xp.asarray(reference_point).astype(logratios.dtype, copy=False)
    u = beta * (logratios - z0)  # (M,)
    s, s_bar = sigmoid(u), sigmoid(-u)
    lam_d, lam_u = logratios.dtype.type(desirable_weight), logratios.dtype.type(undesirable_weight)
    losses = xp.where(desirable, lam_d * s_bar, lam_u * s)
    slope = beta * s * s_bar
    return losses, xp.where(desirable, -lam_d * slope, lam_u * slope)


def kto_pair_loss(chosen, rejected, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                  *, reference_point):
    """KTO on preference pairs, as the KTO paper and TRL use paired data: each pair is one desirable
    example (y_w) and one undesirable one (y_l); the pair's loss is the mean of the two, so the mean
    over N pairs is kto_loss's mean over the 2N examples:

        loss = (lambda_D (1 - sigma(beta (chosen - z0))) + lambda_U (1 - sigma(beta (z0 - rejected)))) / 2
    """
    xp = get_array_module(chosen)
    rho = xp.concatenate([chosen, rejected])  # (2N,)
    n = chosen.shape[0]
    desirable = xp.arange(2 * n) < n
    losses, d = kto_loss(rho, desirable, beta, reference_point, desirable_weight, undesirable_weight)
    return 0.5 * (losses[:n] + losses[n:]), 0.5 * d[:n], 0.5 * d[n:]


def kto_reference_point(policy_logps, ref_logps):
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 7 and Sec. 4.2): the policy's KL from the
    reference estimated on MISMATCHED prompt/completion pairs (x_i, y_j), j != i, of the batch, clamped
    at 0; a constant of the step (detached, as in the paper and TRL):

        z0 = max(0, mean_i [log pi(y_m(i)|x_i) - log pi_ref(y_m(i)|x_i)]),   m = kto_mismatched(M)

    Args:
        policy_logps, ref_logps: (M,) summed log-probs of the mismatched completions.
    Returns:
        a 0-d array in policy_logps' dtype.
    """
    xp = get_array_module(policy_logps)
    p = checks.vector(policy_logps, "policy_logps")
    r = xp.asarray(checks.vector(ref_logps, "ref_logps", p.shape[0])).astype(p.dtype, copy=False)
    return xp.maximum(xp.mean(p - r), p.dtype.type(0))


def kto_mismatched(m: int):
    """The mismatched completion of each example for kto_reference_point: example i's prompt with
    example (i - 1) mod M's completion (TRL's rotation of the batch by one). (M,) int64; M >= 2."""
    if m < 2:
        raise ValueError(f"KTO's reference point needs at least 2 examples in a batch to mismatch, got {m}")
    return np.roll(np.arange(m, dtype=np.int64), 1)


def weighted_sum_loss(pi_w, pi_l, ref_w, ref_l, beta: float, *, loss_weights, chosen_token_counts=None,
                      rejected_token_counts=None, **options):
    """A weighted sum of losses of the table (TRL's loss_type list with loss_weights; e.g. MPO, Wang et
    al. 2024, arXiv:2411.10442: sigmoid 0.8, bco_pair 0.2, sft 1.0), each term its row's own function
    with its options (shared by name, as TRL shares one label_smoothing) and its own reference rule:

        loss = sum_k w_k loss_k,     dloss/dpi = sum_k w_k dloss_k/dpi
    """
    xp = get_array_module(pi_w)
    total = d_w = d_l = None
    for name, w in loss_weights.items():
        row = LOSS_TABLE[name]
        opts = {k: v for k, v in options.items() if k in row.options}
        inputs = {k: v for k, v in options.items() if k in row.inputs}
        zero = xp.zeros_like(pi_w)
        rw, rl = (ref_w, ref_l) if row.reference else (zero, zero)
        losses, gw, gl, _ = row.evaluate(pi_w, pi_l, rw, rl, beta, opts, inputs,
                                         (chosen_token_counts, rejected_token_counts))
        total = w * losses if total is None else total + w * losses
        d_w = w * gw if d_w is None else d_w + w * gw
        d_l = w * gl if d_l is None else d_l + w * gl
    return total, d_w, d_l


# ----------------------------------------------------------------------------------------------
# log-prob rules the trainer applies before a loss (token level): LD-DPO and WPO, as reference code


def ld_logps(token_logps, mask, n_pairs: int, ld_alpha: float):
    """LD-DPO's length-desensitised log-probs (Liu et al. 2024, arXiv:2409.06411, as TRL's ld_alpha):
    the tokens of each response up to the shorter of its pair's two responses count fully, the
    longer response's excess ("verbose") tokens by ld_alpha in [0, 1]:

        log pi_ld(y|x) = sum_{t <= l_p} log pi(y_t|.) + ld_alpha sum_{t > l_p} log pi(y_t|.),
        l_p = min(|y_w|, |y_l|);     d log pi_ld / d log pi(y_t|.) = 1 (t <= l_p), ld_alpha (t > l_p)

    The same rule gives the reference's log-probs. A loss then runs on these unchanged.

    Args:
        token_logps: (2N, T) per-token log-probs, rows [chosen; rejected], zeros where not scored.
        mask: (2N, T) bool, the scored (response) positions, left to right.
        n_pairs: N. ld_alpha: in [0, 1] (1: plain sums).
    Returns:
        logps (2N,), token_weights (2N, T): d logps / d token_logps (0 off the mask).
    """
    xp = get_array_module(token_logps)
    m = xp.asarray(mask).astype(token_logps.dtype)
    pos = xp.cumsum(m, axis=1)  # (2N, T) 1-based position within the response
    lens = pos[:, -1]  # (2N,)
    shared = xp.minimum(lens[:n_pairs], lens[n_pairs:])  # (N,)
    shared = xp.concatenate([shared, shared])[:, None]  # (2N, 1)
    w = m * xp.where(pos <= shared, token_logps.dtype.type(1), token_logps.dtype.type(ld_alpha))  # (2N, T)
    return xp.sum(w * token_logps, axis=1), w


def wpo_weights(token_logps, token_log_sum_sq, mask, n_pairs: int):
    """WPO's per-pair weights (Zhou et al. 2024, arXiv:2406.11827, eq. 2, the "aligned" form TRL's
    use_weighting computes): each response weighted by its length-normalised probability under the
    policy relative to the policy's own sampling, a constant (no gradient):

        w(y) = exp( (1/|y|) sum_t [log pi(y_t|.) - log sum_v pi(v|.)^2] ),    w_pair = w(y_w) w(y_l)

    Args:
        token_logps: (2N, T) per-token log pi(y_t|.), rows [chosen; rejected].
        token_log_sum_sq: (2N, T) log sum_v pi(v|.)^2 at the same positions (from the logits).
        mask: (2N, T) bool scored positions. n_pairs: N.
    Returns:
        (N,) pair weights for dpo_loss(pair_weights=...).
    """
    xp = get_array_module(token_logps)
    m = xp.asarray(mask).astype(token_logps.dtype)
    n = xp.maximum(xp.sum(m, axis=1), token_logps.dtype.type(1))
    w = xp.exp(xp.sum((token_logps - token_log_sum_sq) * m, axis=1) / n)  # (2N,)
    return w[:n_pairs] * w[n_pairs:]


def wpo_pair_weights(token_logps, token_log_sum_sq, mean_weights, n_pairs: int):
    """:func:`wpo_weights` on a batch's scored tokens (the trainer's form): the same
    w(y) = exp(mean_t [log pi(y_t|.) - log sum_v pi(v|.)^2]), each example's mean taken with
    ``mean_weights`` (E, M) (packing.Batch.mean_weights: 1 / n_e on its tokens), E = 2N.

    token_logps, token_log_sum_sq: (M,). Returns (N,) pair weights w(y_w) w(y_l), constants."""
    xp = get_array_module(token_logps)
    w = xp.exp(mean_weights @ (token_logps - token_log_sum_sq))  # (2N,)
    return w[:n_pairs] * w[n_pairs:]


# ----------------------------------------------------------------------------------------------
# the loss table: every fact about a loss in one row


def _show(value) -> str:
    """An option's value as the command line writes it: numbers as %g, names as is, a loss-weight
    mapping as NAME=WEIGHT,..."""
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v:g}" for k, v in value.items())
    if isinstance(value, str):
        return value
    return f"{value:g}"


@dataclass(frozen=True)
class Option:
    """A loss's hyper-parameter: its default, one line of help, and what it may be.

    A number (the default kind) must lie in the interval lo..hi (closed unless ``lo_open``/``hi_open``);
    with ``choices`` it is one of those names (e.g. the f-divergence); with ``weights=True`` it is a
    mapping {loss name: weight >= 0} of rows of the table (written NAME=WEIGHT,... on the command line).

    ``role`` says who consumes it: "loss" (passed to the row's function by name), "score" (the
    f-divergence that turns log-ratios into f-DPO scores before a margin loss; the row applies it),
    "nll" (the weight of the chosen response's per-token NLL term, added by the row)."""

    default: Any
    help: str
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    weights: bool = False
    role: str = "loss"

    def interval(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.weights:
            return "NAME=WEIGHT,... over losses of the table"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def check(self, name: str, value, loss: str):
        """value as a float inside the interval (a name among the choices, a {name: weight} dict),
        else ValueError naming the option and the loss."""
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{name} of the {loss!r} loss must be {self.interval()}, got {value!r}")
            return value
        if self.weights:
            return _check_weights(name, value, loss)
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} of the {loss!r} loss must be a number, got {value!r}") from None
        ok = math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo) and (
            v < self.hi if self.hi_open else v <= self.hi)
        if not ok:
            raise ValueError(f"{name} of the {loss!r} loss must lie in {self.interval()}, got {value!r}")
        return v


def _check_weights(name: str, value, loss: str) -> dict:
    """A weighted sum's terms: "a=0.8,b=0.2" or {"a": 0.8, "b": 0.2} -> {"a": 0.8, "b": 0.2}. Each name a
    row of the table that is not itself a sum and scores summed log-probs (the sum runs on one set of
    log-probs), each weight finite and >= 0, one of them > 0."""
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            key, sep, w = part.partition("=")
            if not sep:
                raise ValueError(f"{name} of the {loss!r} loss must read NAME=WEIGHT,..., got {value!r}")
            items.append((key.strip(), w.strip()))
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError(f"{name} of the {loss!r} loss must be NAME=WEIGHT,... or a mapping, got {value!r}")
    out: dict = {}
    for key, w in items:
        row = LOSS_TABLE.get(key)
        if row is None or row.combines:
            raise ValueError(f"{name} of the {loss!r} loss names {key!r}, which is not a loss of the table "
                             f"(choose among {', '.join(n for n, r in LOSS_TABLE.items() if not r.combines)})")
        if row.average_logps:
            raise ValueError(f"{name} of the {loss!r} loss: {key!r} is defined on per-token mean log-probs and the "
                             "others on sums; a weighted sum runs on one set of log-probs")
        if key in out:
            raise ValueError(f"{name} of the {loss!r} loss names {key!r} twice")
        try:
            out[key] = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"{name} of the {loss!r} loss: the weight of {key!r} must be a number, got {w!r}") from None
        if not (math.isfinite(out[key]) and out[key] >= 0.0):
            raise ValueError(f"{name} of the {loss!r} loss: the weight of {key!r} must be finite and >= 0, got {w!r}")
    if not any(v > 0.0 for v in out.values()):
        raise ValueError(f"{name} of the {loss!r} loss needs at least one weight > 0, got {value!r}")
    return out


@dataclass(frozen=True)
class Input:
    """A per-step quantity a loss needs besides the log-probs, which the trainer supplies (through
    dpo_loss's ``loss_inputs`` / dpo_step_loss's ``inputs``): a constant of the step, no gradient.

    ``default`` None: required. ``units`` ("log-ratio", "reward" = beta x log-ratio, "count") says
    how it moves when beta -> k beta and the log-ratios -> 1/k (minidpo verify's beta property).
    ``probe``: the value minidpo verify passes when its caller gives none."""

    help: str
    default: Any = None
    units: str = "reward"
    probe: float = 0.0


@dataclass(frozen=True)
class Loss:
    """One row of :data:`LOSS_TABLE`: what the trainer, the command line, held-out evaluation and
    ``minidpo verify`` know about a loss.

    Attributes:
        name: the loss_type / ``--loss`` name.
        margin: (h, beta, **options) -> (losses (N,), dloss/dz (N,)): the per-pair loss as a
            function of the log-ratio margin h (z = beta h), and its derivative in z; or None
            for a loss given by ``pair`` or ``batch``.
        help: one line for ``minidpo dpo --help``.
        options: the loss's hyper-parameters, name -> :class:`Option` (those of role "loss" are passed
            to its function by name).
        reference: whether the loss needs pi_ref (a reference-free loss skips its forward pass).
        average_logps: the log-prob rule the loss is defined with: per-token means (True) or eq.
            (7)'s sums (False); ``TrainConfig.average_logps`` may override it.
        source: the paper the loss and its defaults come from.
        pair: for a loss that is not a function of the margin alone: (chosen, rejected, beta,
            **options, **inputs) -> (losses (N,), d losses_i / d chosen_i (N,), d losses_i / d
            rejected_i (N,)), with chosen = log pi(y_w|x) - log pi_ref(y_w|x) and rejected likewise (log
            pi alone for a reference-free loss).
        batch: for a loss that needs the four log-probs apart or couples the pairs of a batch:
            (pi_w, pi_l, ref_w, ref_l, beta, **options, **inputs) -> (losses (N,), d sum / d pi_w (N,),
            d sum / d pi_l (N,)). Exactly one of ``margin``, ``pair`` and ``batch`` is given.
        inputs: what the trainer must supply each step besides the log-probs, name -> :class:`Input`
            (passed to ``pair``/``batch`` by name), e.g. KTO's reference point.
        couples: the loss couples the pairs of a batch (AOT's sort): its per-pair losses are not
            functions of each pair alone, so per-pair weights (WPO) and per-pair identities do not apply.
    """

    name: str
    margin: Callable | None
    help: str
    options: Mapping[str, Option] = field(default_factory=dict)
    reference: bool = True
    average_logps: bool = False
    source: str = ""
    pair: Callable | None = None
    batch: Callable | None = None
    inputs: Mapping[str, Input] = field(default_factory=dict)
    couples: bool = False

    def __post_init__(self):
        if sum(f is not None for f in (self.margin, self.pair, self.batch)) != 1:
            raise ValueError(f"loss {self.name!r}: give exactly one of margin (a function of h), pair and batch")
        if self.margin is None and any(o.role == "score" for o in self.options.values()):
            raise ValueError(f"loss {self.name!r}: an f-divergence applies to a loss of the margin only")
        if self.combines and self.batch is None:
            raise ValueError(f"loss {self.name!r}: a weighted sum of losses is a batch function")

    @property
    def combines(self) -> bool:
        """Whether the row is a weighted sum of other rows (it has a weights option)."""
        return any(o.weights for o in self.options.values())

    def _weights_option(self) -> str:
        return next(k for k, o in self.options.items() if o.weights)

    def components(self, options: Mapping | None = None) -> list:
        """The rows a weighted sum adds up (the resolved weights option's names); [self] otherwise."""
        if not self.combines:
            return [self]
        key = self._weights_option()
        w = (options or {}).get(key, self.options[key].default)
        return [LOSS_TABLE[n] for n in self.options[key].check(key, w, self.name)]

    def accepts(self, name: str, options: Mapping | None = None) -> Option | None:
        """The Option ``name`` is for this loss (its own, or for a weighted sum one of its terms'), or None."""
        if name in self.options:
            return self.options[name]
        if self.combines:
            for row in self.components(options):
                if name in row.options:
                    return row.options[name]
        return None

    def resolve(self, options: Mapping | None = None) -> dict:
        """Every option of this loss with its value: ``options`` checked (names and ranges), the
        defaults for the rest (for a weighted sum, its terms' options too, shared by name). ValueError
        names an unknown option and the ones the loss has."""
        options = dict(options or {})
        rows = self.components(options) if self.combines else []
        known = dict(self.options)
        for row in rows:
            for k, opt in row.options.items():
                known.setdefault(k, opt)
        unknown = sorted(set(options) - set(known))
        if unknown:
            has = ", ".join(known) or "none"
            raise ValueError(f"the {self.name!r} loss has no option {unknown[0]!r} (its options: {has})")
        out = {}
        for k, opt in known.items():
            v = options.get(k, opt.default)
            for row in rows:  # a shared option must suit every term that has it
                if k in row.options and k not in self.options:
                    row.options[k].check(k, v, row.name)
            out[k] = opt.check(k, v, self.name)
        return out

    def required_inputs(self, options: Mapping | None = None) -> dict:
        """name -> :class:`Input` the trainer supplies for this loss (a weighted sum: its terms')."""
        out = dict(self.inputs)
        for row in (self.components(options) if self.combines else []):
            out.update(row.inputs)
        return out

    def needs_reference(self, options: Mapping | None = None) -> bool:
        """Whether pi_ref's log-probs enter the loss (a weighted sum: whether any term's do)."""
        return any(r.reference for r in self.components(options)) if self.combines else self.reference

    def nll_weight(self, options: Mapping | None = None) -> float:
        """The weight of the chosen response's per-token NLL term the row adds (its "nll" options)."""
        return sum(float((options or {}).get(k, o.default)) for k, o in self.options.items() if o.role == "nll")

    def needs_token_counts(self, options: Mapping | None = None) -> bool:
        """Whether the loss needs the chosen responses' token counts (an NLL term, or an input)."""
        return self.nll_weight(options) > 0.0 or "chosen_token_counts" in self.required_inputs(options)

    def _function_options(self, options: Mapping) -> dict:
        """The options the row's function takes by name: those of role "loss" (a weighted sum: all, its
        terms pick theirs)."""
        if self.combines:
            return dict(options)
        return {k: v for k, v in options.items() if self.options[k].role == "loss"}

    def losses(self, chosen, rejected, beta: float, options: Mapping, inputs: Mapping | None = None):
        """This loss at the log-ratios chosen, rejected (N,) (h = chosen - rejected): (losses (N,),
        d sum / d chosen (N,), d sum / d rejected (N,), weight (N,)), where weight is eq. (9)'s
        weight on (grad log pi_w - grad log pi_l) in units of beta: -dloss/dz for a loss of the
        margin (sigma(r_hat_l - r_hat_w) for DPO), (d_rejected - d_chosen) / (2 beta) otherwise.
        ``inputs``: the row's inputs by name (a pair loss's keyword arguments)."""
        fn_options = self._function_options(options)
        if self.pair is not None:
            losses, d_chosen, d_rejected = self.pair(chosen, rejected, beta, **fn_options, **(inputs or {}))
            return losses, d_chosen, d_rejected, (d_rejected - d_chosen) / (2.0 * beta)
        if self.margin is None:
            raise TypeError(f"the {self.name!r} loss couples the four log-probs; call Loss.evaluate")
        divergence = options.get("f_divergence", "reverse_kl")
        if divergence != "reverse_kl":  # f-DPO: the scores f'(pi/pi_ref) in place of the log-ratios
            s_w, ds_w = f_divergence_score(chosen, divergence, options.get("f_alpha", 0.5))
            s_l, ds_l = f_divergence_score(rejected, divergence, options.get("f_alpha", 0.5))
            losses, dloss_dz = self.margin(s_w - s_l, beta, **fn_options)
            d_chosen, d_rejected = _product(dloss_dz, ds_w, beta), -_product(dloss_dz, ds_l, beta)
            return losses, d_chosen, d_rejected, (d_rejected - d_chosen) / (2.0 * beta)
        losses, dloss_dz = self.margin(chosen - rejected, beta, **fn_options)
        weight = -dloss_dz
        return losses, -beta * weight, beta * weight, weight  # dz/dchosen = beta, dz/drejected = -beta

    def evaluate(self, pi_w, pi_l, ref_w, ref_l, beta: float, options: Mapping, inputs: Mapping | None = None,
                 counts=(None, None)):
        """This loss at the four log-probs (N,) (ref_w, ref_l zeros for a reference-free loss):
        (losses (N,), d losses_i / d pi_w,i (N,), d losses_i / d pi_l,i (N,), weight (N,)), with the
        row's NLL term (its "nll" options) added. ``inputs``: the row's inputs by name (defaults
        filled in; a missing required one is a ValueError); ``counts``: (chosen, rejected) token counts."""
        given = dict(inputs or {})
        given.setdefault("chosen_token_counts", counts[0])
        given.setdefault("rejected_token_counts", counts[1])
        mine = {}
        for k, spec in self.required_inputs(options).items():
            v = given.get(k, spec.default)
            if v is None:
                raise ValueError(f"the {self.name!r} loss needs {k}: {spec.help}")
            mine[k] = v
        if self.batch is not None:
            if self.combines:  # its terms take what they need from everything given
                mine = {**{k: v for k, v in given.items() if v is not None}, **mine}
            losses, d_w, d_l = self.batch(pi_w, pi_l, ref_w, ref_l, beta, **self._function_options(options), **mine)
            weight = (d_l - d_w) / (2.0 * beta)
        else:
            losses, d_w, d_l, weight = self.losses(pi_w - ref_w, pi_l - ref_l, beta, options, mine)
        nll = self.nll_weight(options)
        if nll > 0.0:  # CPO's, ORPO's behaviour-cloning term: nll times the chosen per-token NLL
            if counts[0] is None:
                raise ValueError(f"the {self.name!r} loss's NLL term needs chosen_token_counts (ones for per-token "
                                 "mean log-probs)")
            nll_losses, d_nll, _ = sft_loss(pi_w, pi_l, beta, chosen_token_counts=counts[0])
            losses, d_w = losses + nll * nll_losses, d_w + nll * d_nll
        return losses, d_w, d_l, weight


_EPS = "label-flip rate epsilon (the assumed probability that a preference label is wrong)"
LOSS_TABLE: dict[str, Loss] = {}
"""name -> :class:`Loss`, in the order ``--help`` lists them. Add a loss with :func:`register_loss`."""


def register_loss(loss: Loss) -> Loss:
    """Add a row to :data:`LOSS_TABLE` (a new loss is one function and this one call); the trainer,
    ``--loss``, held-out evaluation and ``minidpo verify`` then all know it."""
    if not isinstance(loss, Loss):
        raise TypeError(f"register_loss needs a losses.Loss row, got {type(loss).__name__}")
    if loss.name in LOSS_TABLE and LOSS_TABLE[loss.name] is not loss:
        raise ValueError(f"a loss named {loss.name!r} is already in the table")
    LOSS_TABLE[loss.name] = loss
    return loss


# f-DPO (Wang et al. 2023): valid for the losses of the margin h, as TRL allows it
_F_DIVERGENCE = {
    "f_divergence": Option("reverse_kl", "f-DPO: the divergence from pi_ref whose f'(pi/pi_ref) replaces the log-ratio",
                           choices=F_DIVERGENCES, role="score"),
    "f_alpha": Option(0.5, "alpha of f_divergence alpha_divergence ((1 - u^-alpha)/alpha; the f-DPO paper's alpha)",
                      0.0, 1.0, lo_open=True, hi_open=True, role="score"),
}
_NLL = "weight of the chosen response's per-token NLL (behaviour cloning) term"
_NO_REF = "used with a reference model that is not there: pi_ref = 1"
_COUNTS = Input("the chosen responses' counted tokens (sequence_logps' token counts; ones for per-token means)",
                units="count")

for _row in (
    Loss("sigmoid", sigmoid_loss, "the paper's eq. 7, -log sigma(beta h); conservative DPO (cDPO) with label smoothing",
         {"label_smoothing": Option(0.0, _EPS, 0.0, 0.5), **_F_DIVERGENCE},
         source="Rafailov et al. 2023; cDPO: Mitchell 2023"),
    Loss("robust", robust_loss, "DPO corrected for a label-flip rate eps, unbiased under noisy labels",
         {"label_smoothing": Option(0.0, _EPS, 0.0, 0.5, hi_open=True), **_F_DIVERGENCE},
         source="Chowdhury et al. 2024"),
    Loss("ipo", ipo_loss, "IPO's square (h - 1/(2 beta))^2", dict(_F_DIVERGENCE), average_logps=True,
         source="Azar et al. 2023"),
    Loss("hinge", hinge_loss, "SLiC's hinge max(0, 1 - beta h)", dict(_F_DIVERGENCE), source="Zhao et al. 2023"),
    Loss("exo_pair", exo_pair_loss, "EXO: reverse KL from the policy's sigma(+-beta h) to the labels (1 - eps, eps)",
         {"label_smoothing": Option(1e-3, "EXO's label smoothing eps (the paper's 1e-3)", 0.0, 0.5, lo_open=True,
                                    hi_open=True), **_F_DIVERGENCE},
         source="Ji et al. 2024, arXiv:2402.00856, eq. 16"),
    Loss("nca_pair", None, "NCA: -log sigma(r_w) - (log sigma(-r_w) + log sigma(-r_l))/2, rewards against 0",
         pair=nca_pair_loss, source="Chen et al. 2024, arXiv:2402.05369"),
    Loss("bco_pair", None, "BCO: -log sigma(r_w - delta) - log sigma(delta - r_l), delta the running reward mean",
         pair=bco_pair_loss, source="Jung et al. 2024, arXiv:2404.04656",
         inputs={"reward_mean": Input("BCO's delta, the running mean of the rewards (bco_update_reward_mean); "
                                      "0 is TRL 1.16's bco_pair", default=0.0, units="reward")}),
    Loss("sppo_hard", None, "SPPO, hard labels: (log-ratio_w - 1/(2 beta))^2 + (log-ratio_l + 1/(2 beta))^2",
         pair=sppo_hard_loss, source="Wu et al. 2024, arXiv:2405.00675, eq. 4.7"),
    Loss("aot", None, "AOT: eq. 7 on the batch's sorted policy log-ratios minus the sorted reference ones",
         {"label_smoothing": Option(0.0, _EPS, 0.0, 0.5)}, batch=aot_loss, couples=True,
         source="Melnyk et al. 2024, arXiv:2406.05882"),
    Loss("aot_unpaired", None, "AOT, unpaired: eq. 7 on sorted chosen minus sorted rejected log-ratios",
         {"label_smoothing": Option(0.0, _EPS, 0.0, 0.5)}, pair=aot_unpaired_loss, couples=True,
         source="Melnyk et al. 2024, arXiv:2406.05882"),
    Loss("apo_zero", None, "APO-zero: 1 - sigma(r_w) + sigma(r_l), chosen up and rejected down",
         pair=apo_zero_loss, source="D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7"),
    Loss("apo_down", None, "APO-down: sigma(r_w) + 1 - sigma(r_w - r_l), both down, the rejected more",
         pair=apo_down_loss, source="D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8"),
    Loss("discopop", discopop_loss, "DiscoPOP: logistic and exponential losses mixed by sigma(beta h / tau)",
         {"tau": Option(0.05, "DiscoPOP's temperature tau (the paper's 0.05)", 0.0, 1.0, lo_open=True),
          **_F_DIVERGENCE}, source="Lu et al. 2024, arXiv:2406.08414, eq. 5"),
    Loss("sigmoid_norm", sigmoid_loss, "eq. 7 on per-token mean log-ratios (TRL's sigmoid_norm)",
         dict(_F_DIVERGENCE), average_logps=True, source="TRL 1.16's sigmoid_norm"),
    Loss("sft", None, "the chosen response's per-token NLL (SFT on the chosen responses)", pair=sft_loss,
         reference=False, inputs={"chosen_token_counts": _COUNTS}, source="TRL 1.16's sft loss type"),
    Loss("weighted_sum", None, "a weighted sum of losses of this table (TRL's loss_weights; MPO)",
         {"loss_weights": Option({"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0},
                                 "the terms and their weights, e.g. sigmoid=0.8,bco_pair=0.2,sft=1 (MPO's)",
                                 weights=True)}, batch=weighted_sum_loss,
         source="TRL 1.16's loss_weights; MPO: Wang et al. 2024, arXiv:2411.10442"),
    Loss("simpo", simpo_loss, "SimPO: -log sigma(beta h - gamma) on per-token mean log pi, no reference",
         {"gamma": Option(0.5, "SimPO's target reward margin gamma (TRL's 0.5; the paper tunes it)", 0.0, math.inf,
                          hi_open=True)}, reference=False, average_logps=True,
         source="Meng, Xia & Chen 2024, arXiv:2405.14734, eq. 6"),
    Loss("cpo", sigmoid_loss, "CPO: -log sigma(beta (log pi_w - log pi_l)) + NLL of y_w, no reference",
         {"nll_weight": Option(1.0, _NLL, 0.0, math.inf, hi_open=True, role="nll")}, reference=False,
         source="Xu et al. 2024, arXiv:2401.08417, eq. 3 and the NLL term"),
    Loss("alphapo", None, "AlphaPO: SimPO with the reward (1 - p^-alpha)/alpha of the per-token probability p",
         {"alpha": Option(0.25, "AlphaPO's reward shape alpha (0: SimPO)", -math.inf, math.inf, True, True),
          "gamma": Option(0.5, "the target reward margin gamma, as SimPO's", 0.0, math.inf, hi_open=True)},
         reference=False, average_logps=True, pair=alphapo_loss, source="Gupta et al. 2025, arXiv:2501.03884"),
    Loss("orpo", None, "ORPO: NLL of y_w - beta log sigma(log odds_w - log odds_l), beta = lambda, no reference",
         {"nll_weight": Option(1.0, _NLL + " (ORPO's L_SFT, weight 1)", 0.0, math.inf, hi_open=True, role="nll")},
         reference=False, average_logps=True, pair=orpo_loss,
         source="Hong, Lee & Thorne 2024, arXiv:2403.07691, eqs. 4-7"),
    Loss("kto", None, "KTO: lambda_D (1 - sigma(r_w - beta z0)) + lambda_U (1 - sigma(beta z0 - r_l)), per example",
         {"desirable_weight": Option(1.0, "KTO's lambda_D, the weight of desirable examples", 0.0, math.inf, True, True),
          "undesirable_weight": Option(1.0, "KTO's lambda_U, the weight of undesirable examples", 0.0, math.inf,
                                       True, True)},
         pair=kto_pair_loss, source="Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7",
         inputs={"reference_point": Input("KTO's z0, the policy's KL from pi_ref on mismatched prompt/completion "
                                          "pairs of the batch (kto_reference_point)", units="log-ratio", probe=0.25)}),
):
    register_loss(_row)
del _row

LOSS_TYPES = tuple(LOSS_TABLE)  # the built-in losses' names


def loss_row(loss_type: str) -> Loss:
    """The table row of ``loss_type``; ValueError listing the known names."""
    row = LOSS_TABLE.get(loss_type)
    if row is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(map(repr, LOSS_TABLE))}")
    return row


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | None = None,
    reference_free: bool = False,
    rpo_alpha: float = 0.0,
    chosen_token_counts=None,
    *,
    rejected_token_counts=None,
    pair_weights=None,
    loss_inputs: Mapping | None = None,
    **options,
) -> DPOOutput:
    """Eq. (7), the DPO loss, or a variant (a row of :data:`LOSS_TABLE`), with the eq. (8) rewards
    and eq. (9) gradients.

        r_hat_w = beta (log pi_w - log pi_ref_w),  r_hat_l = beta (log pi_l - log pi_ref_l)   eq. (8)
        h = log pi_w/pi_ref_w - log pi_l/pi_ref_l,  z = beta h = r_hat_w - r_hat_l
        loss, dloss/dz = LOSS_TABLE[loss_type].margin(h, beta, **options)
        d mean(loss) / d log pi_w = beta dloss/dz / N = -d mean(loss) / d log pi_l              eq. (9)
    (a loss of the table that is not a function of h alone gives its derivatives itself:
    Loss.pair, Loss.batch; Loss.evaluate runs a row).

    ``reference_free=True`` takes log pi_ref = 0 (ref log-probs may be None), as does a row
    without a reference (SimPO, CPO, ORPO, ...). ``rpo_alpha > 0`` adds RPO's term (Pang et al.
    2024), alpha times the chosen response's per-token NLL (:func:`nll_loss`), which needs
    ``chosen_token_counts`` (sequence_logps' token counts; ones for per-token-mean log-probs), as
    does a row with an NLL term (CPO, ORPO, sft). ``label_smoothing`` (eps; None: the row's
    default) and ``**options`` are the loss's own options (its row's ``options``); an option the
    loss does not have is an error (label_smoothing: unless it is 0). ``loss_inputs``: what the row's
    ``inputs`` name (KTO's reference_point, BCO's reward_mean), constants of the step.
    ``pair_weights`` (N,): WPO's per-pair weights (:func:`wpo_weights`), constants multiplying each
    pair's whole loss and its gradients.

    Args:
        policy_chosen_logps, policy_rejected_logps: (N,) float, log pi(y_w|x) and log pi(y_l|x).
        ref_chosen_logps, ref_rejected_logps: (N,) float, the reference's, constants (cast to the
            policy's dtype; they may live on the host).
        beta: KL coefficient > 0 (the paper's 0.1). loss_type: a name of LOSS_TABLE.
        label_smoothing, reference_free, rpo_alpha, chosen_token_counts, rejected_token_counts,
        pair_weights, loss_inputs, options: see above.
    Returns:
        DPOOutput; all (N,) arrays in the policy's dtype, on its device.
    """
    pi_w, pi_l, ref_w, ref_l, b, row, opts, alpha = _check_dpo_args(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
        label_smoothing, options, reference_free, rpo_alpha, chosen_token_counts)
    n = pi_w.shape[0]
    xp = get_array_module(pi_w)
    counts = tuple(None if c is None else xp.asarray(c) for c in (chosen_token_counts, rejected_token_counts))
    chosen_rewards = b * (pi_w - ref_w)  # (N,) r_hat_w, eq. (8)
    rejected_rewards = b * (pi_l - ref_l)  # (N,) r_hat_l
    h = (pi_w - ref_w) - (pi_l - ref_l)  # (N,)
    # eq. (9)'s weight: sigma(r_hat_l - r_hat_w) for plain DPO, -dloss/dz for any loss of the margin
    losses, d_chosen, d_rejected, weight = row.evaluate(pi_w, pi_l, ref_w, ref_l, b, opts, loss_inputs, counts)
    grad_chosen = d_chosen / n  # (N,) d mean(loss) / d log pi_w = -beta weight / N
    grad_rejected = d_rejected / n  # (N,) d mean(loss) / d log pi_l = +beta weight / N
    nll_losses = None
    if alpha > 0.0:  # RPO: the chosen response's per-token NLL, its gradient added
        nll_losses, nll_grad = nll_loss(pi_w, chosen_token_counts, validate=False)
        losses = losses + alpha * nll_losses
        grad_chosen = grad_chosen + alpha * nll_grad
    elif row.nll_weight(opts) > 0.0:
        nll_losses = -pi_w / counts[0].astype(pi_w.dtype)
    if pair_weights is not None:  # WPO: each pair's loss scaled by a constant weight
        w = xp.asarray(checks.vector(pair_weights, "pair_weights", n)).astype(pi_w.dtype, copy=False)
        losses, grad_chosen, grad_rejected, weight = losses * w, grad_chosen * w, grad_rejected * w, weight * w
    return DPOOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     grad_policy_chosen_logps=grad_chosen, grad_policy_rejected_logps=grad_rejected,
                     gradient_weight=weight, log_ratio_margin=h, nll_losses=nll_losses)


def _check_pair(chosen, rejected, name_w: str, name_l: str):
    """Two (N,) floating arrays of one N and one dtype."""
    w = checks.vector(chosen, name_w)
    l_ = checks.vector(rejected, name_l, w.shape[0])
    if l_.dtype != w.dtype:
        raise TypeError(f"{name_w} is {w.dtype} but {name_l} is {l_.dtype}; pass one dtype")
    return w, l_


def _check_dpo_args(pi_w, pi_l, ref_w, ref_l, beta, loss_type, label_smoothing, options, reference_free, rpo_alpha,
                    chosen_token_counts):
    """dpo_loss's checks; returns (pi_w, pi_l, ref_w, ref_l) as (N,) arrays of the policy's dtype
    and device (zeros when reference-free), beta, the table row, its options (Python floats) and
    alpha."""
    pi_w, pi_l = _check_pair(pi_w, pi_l, "policy_chosen_logps", "policy_rejected_logps")
    xp, n, dt = get_array_module(pi_w, pi_l), pi_w.shape[0], pi_w.dtype
    b = checks.positive_beta(beta)
    row = loss_row(loss_type)
    options = dict(options)
    if label_smoothing is not None:
        if row.accepts("label_smoothing", options) is not None:
            options["label_smoothing"] = label_smoothing
        elif float(label_smoothing) != 0.0:
            takes = [repr(name) for name, r in LOSS_TABLE.items() if "label_smoothing" in r.options]
            raise ValueError(f"label_smoothing applies to {', '.join(takes[:-1])} and {takes[-1]} only, not "
                             f"{loss_type!r}; got {label_smoothing!r}")
    opts = row.resolve(options)
    alpha = float(rpo_alpha)
    if not (math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"rpo_alpha must be a finite number >= 0, got {rpo_alpha!r}")
    if alpha > 0.0 and chosen_token_counts is None:
        raise ValueError("rpo_alpha > 0 needs chosen_token_counts (the chosen responses' counted tokens)")
    if row.needs_token_counts(opts) and chosen_token_counts is None:
        raise ValueError(f"the {loss_type!r} loss needs chosen_token_counts (the chosen responses' counted tokens; "
                         "ones for per-token mean log-probs)")
    if reference_free or not row.needs_reference(opts):
        return pi_w, pi_l, xp.zeros(n, dtype=dt), xp.zeros(n, dtype=dt), b, row, opts, alpha
    if ref_w is None or ref_l is None:
        raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless reference_free=True")
    # xp.asarray: cached reference log-probs may live on the host while the policy is on the GPU
    ref_w = xp.asarray(checks.vector(ref_w, "ref_chosen_logps", n)).astype(dt, copy=False)
    ref_l = xp.asarray(checks.vector(ref_l, "ref_rejected_logps", n)).astype(dt, copy=False)
    return pi_w, pi_l, ref_w, ref_l, b, row, opts, alpha


def average_logps_for(loss_type: str, ipo_convention: str = "per_token") -> bool:
    """The ``average`` argument to give sequence_logps for a loss type (its table row's
    ``average_logps``): make the choice explicit.

    Eq. (7) and its sigmoid/robust/hinge relatives score a response by its summed log-prob,
    log pi(y|x), so they get False. IPO is where conventions differ:

    - ``"summed"``: the IPO paper (Azar et al. 2023) defines its loss on sequence
      log-probabilities, h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), summed over tokens.
    - ``"per_token"`` (default, the table's rule): the official DPO repository (and TRL) feed IPO
      per-token averaged log-probs, which makes the target 1/(2 beta) independent of response
      length (and means a suitable beta is larger than with summed log-probs).

    Args:
        loss_type: a name of LOSS_TABLE.
        ipo_convention: "per_token" or "summed"; only consulted for "ipo".
    Returns:
        True if the log-probs should be per-token means, False for sums.
    """
    row = loss_row(loss_type)
    if ipo_convention not in IPO_CONVENTIONS:
        raise ValueError(f"unknown ipo_convention {ipo_convention!r}; choose 'per_token' or 'summed'")
    if loss_type == "ipo" and ipo_convention == "summed":
        return False
    return row.average_logps


# ----------------------------------------------------------------------------------------------
# the SFT term


def nll_loss(policy_chosen_logps, chosen_token_counts, *, validate: bool = True):
    """Per-token negative log-likelihood of each response, and the gradient of its mean.

        loss_i = -log pi(y_i|x) / n_i                      (n_i = the response's counted tokens)
        d mean(loss) / d log pi(y_i|x) = -1 / (n_i N)

    Scaled by alpha and added to a DPO loss it is
    RPO (dpo_loss(..., rpo_alpha=alpha)). If the log-probs are already per-token means
    (sequence_logps(average=True)), pass counts of ones.

    Args:
        policy_chosen_logps: (N,) float, summed log-probs log pi(y|x).
        chosen_token_counts: (N,) positive ints (or floats), the counts from sequence_logps'
            cache["token_counts"].
        validate: check the counts are all > 0 (one host sync on a GPU).
    Returns:
        losses (N,), grad (N,), in the log-probs' dtype.
    """
    logps = checks.vector(policy_chosen_logps, "policy_chosen_logps")
    xp = get_array_module(logps)
    n = logps.shape[0]
    counts = xp.asarray(chosen_token_counts)
    if counts.shape != (n,):
        raise ValueError(f"chosen_token_counts must be ({n},) to match the log-probs, got shape {tuple(counts.shape)}")
    if validate and bool(xp.any(counts <= 0)):
        raise ValueError("chosen_token_counts must all be > 0: a response with no counted token has no NLL to train on")
    counts = counts.astype(logps.dtype)  # (N,)
    losses = -logps / counts  # (N,)
    grad = -1.0 / (counts * n)  # (N,)
    return losses, grad


def dpo_step_loss(logps, token_counts, ref_chosen, ref_rejected, tc, inputs: Mapping | None = None):
    """The loss part of a DPO step, the same for training and held-out evaluation.

    logps: (2N,) log pi(y|x) of the batch's examples [chosen; rejected]; token_counts: (2N,) their
    scored tokens; ref_chosen, ref_rejected: (N,) constants (None for a loss without a reference);
    tc: the TrainConfig's loss options (beta, loss_type, loss_options, reference_free, rpo_alpha,
    and whether the log-probs are per-token means); inputs: what the loss's row names in its
    ``inputs`` (KTO's reference_point, BCO's reward_mean) and, for WPO, "pair_weights" (N,).
    Returns (out, dlogps): the DPOOutput (eq. 7 and variants, eq. 8 rewards) and the eq. 9
    gradient on the (2N,) log-probs, in their dtype."""
    n = logps.shape[0] // 2
    xp = get_array_module(logps)
    kwargs = dict(tc.loss_options)
    row = loss_row(tc.loss_type)
    if tc.rpo_alpha or row.needs_token_counts(row.resolve(tc.loss_options)):
        # the NLL term is a per-token mean: summed log-probs are divided by their token counts;
        # per-token-mean log-probs already are, so their counts are ones
        counts = xp.asarray(token_counts[:n])
        if tc.rpo_alpha:
            kwargs["rpo_alpha"] = tc.rpo_alpha
        kwargs["chosen_token_counts"] = xp.ones_like(counts) if tc.logps_averaged else counts
    inputs = dict(inputs or {})
    if "pair_weights" in inputs:
        kwargs["pair_weights"] = inputs.pop("pair_weights")
    if inputs:
        kwargs["loss_inputs"] = inputs
    out = dpo_loss(logps[:n], logps[n:], ref_chosen, ref_rejected, beta=tc.beta, loss_type=tc.loss_type,
                   reference_free=tc.reference_free, **kwargs)
    # eq. 9: the gradient reaches the two log-probs with weight sigma(r_l - r_w), opposite signs
    dlogps = xp.concatenate([out.grad_policy_chosen_logps, out.grad_policy_rejected_logps])  # (2N,)
    return out, dlogps.astype(logps.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# metrics


def preference_metrics(out: DPOOutput, policy_chosen_logps, policy_rejected_logps, *, to_host: bool = False) -> dict:
    """Batch means to log: the implicit rewards, how often they rank the pair right, the log-probs.

    Keys: "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies" (fraction of pairs
    with r_hat_w > r_hat_l), "rewards/margins" (mean r_hat_w - r_hat_l), "logps/chosen",
    "logps/rejected".

    The values are 0-d arrays on the inputs' device: computing them queues device work but does
    not wait for it, so a training loop can keep them and read them once per log interval
    (e.g. with ``{k: float(v) for k, v in m.items()}``). ``to_host=True`` returns Python floats
    instead, which on a GPU waits for the device.

    Args:
        out: the DPOOutput of this batch.
        policy_chosen_logps: (N,) the log pi(y_w|x) given to dpo_loss.
        policy_rejected_logps: (N,) the log pi(y_l|x).
    Returns:
        dict of str -> 0-d array (or float with to_host=True).
    """
    xp = get_array_module(out.losses)
    dt = out.losses.dtype
    means = {
        "loss": out.losses,
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).astype(dt),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": xp.asarray(policy_chosen_logps),
        "logps/rejected": xp.asarray(policy_rejected_logps),
    }
    # xp.asarray: NumPy reductions return scalars, CuPy's 0-d arrays; give 0-d arrays on both
    metrics = {k: xp.asarray(xp.mean(v)) for k, v in means.items()}
    if to_host:
        return {k: float(to_numpy(v)) for k, v in metrics.items()}
    return metrics
