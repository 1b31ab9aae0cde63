"""DPO losses in NumPy: correct ones, and the bugs seen in real implementations.

h = (pi_w - ref_w) - (pi_l - ref_l), z = beta * h; -log sigma(z) = logaddexp(0, -z) (stable).
"""

import numpy as np

from minidpo.losses import dpo_loss

from tests.verify_corpus import Case


def _h(pw, pl, rw, rl):
    return (pw - rw) - (pl - rl)


def _nls(z):
    """-log sigma(z), stable for any z and dtype-preserving."""
    return np.logaddexp(0, -z)


def _rewards(pw, pl, rw, rl, beta):
    return beta * (pw - rw), beta * (pl - rl)


# ------------------------------------------------------------------------------------ correct


def dpo(pw, pl, rw, rl, beta):
    return (_nls(beta * _h(pw, pl, rw, rl)), *_rewards(pw, pl, rw, rl, beta))


def dpo_mean(pw, pl, rw, rl, beta):
    return _nls(beta * _h(pw, pl, rw, rl)).mean()


def dpo_sum(pw, pl, rw, rl, beta):
    return _nls(beta * _h(pw, pl, rw, rl)).sum()


def cdpo(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z = beta * _h(pw, pl, rw, rl)
    return (1 - label_smoothing) * _nls(z) + label_smoothing * _nls(-z)


def robust(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z, e = beta * _h(pw, pl, rw, rl), label_smoothing
    return ((1 - e) * _nls(z) - e * _nls(-z)) / (1 - 2 * e)


def ipo(pw, pl, rw, rl, beta):
    return (_h(pw, pl, rw, rl) - 1 / (2 * beta)) ** 2


def ipo_per_token(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    nw, nl = chosen_token_counts.astype(pw.dtype), rejected_token_counts.astype(pw.dtype)
    return (_h(pw / nw, pl / nl, rw / nw, rl / nl) - 1 / (2 * beta)) ** 2


def ipo_summed(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    return (_h(pw, pl, rw, rl) - 1 / (2 * beta)) ** 2


def hinge(pw, pl, rw, rl, beta):
    return np.maximum(1 - beta * _h(pw, pl, rw, rl), 0)


def minidpo_dpo(pw, pl, rw, rl, beta, label_smoothing=0.0):
    """minidpo's own loss: hand-written eq. 9 gradients returned and checked."""
    return dpo_loss(pw, pl, rw, rl, beta=beta, label_smoothing=label_smoothing)


CORRECT = [
    Case(dpo), Case(dpo_mean), Case(dpo_sum), Case(cdpo, "cdpo"), Case(cdpo, "cdpo", check=dict(label_smoothing=0.5)),
    Case(robust, "robust", check=dict(label_smoothing=0.2)), Case(ipo, "ipo"), Case(ipo_per_token, "ipo"),
    Case(ipo_summed, "ipo"), Case(hinge, "hinge"), Case(minidpo_dpo), Case(minidpo_dpo, "cdpo"),
]


# ------------------------------------------------------------------------------------- broken


def cdpo_sign_flip(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z = beta * _h(pw, pl, rw, rl)
    return (1 - label_smoothing) * _nls(z) - label_smoothing * _nls(-z)  # the flipped-label term with the wrong sign


def ipo_reference_left_summed(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    nw, nl = chosen_token_counts, rejected_token_counts
    return ((pw / nw - pl / nl) - (rw - rl) - 1 / (2 * beta)) ** 2  # policy per-token, reference summed


def dpo_per_token_mean(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    nw, nl = chosen_token_counts, rejected_token_counts
    return _nls(beta * _h(pw / nw, pl / nl, rw / nw, rl / nl))  # a mean over tokens where eq. 7 sums


def reference_gets_gradient(pw, pl, rw, rl, beta):
    """Hand-written backward that returns d loss / d log pi_ref (the reference's gradient) as the policy's."""
    n, z = pw.shape[0], beta * _h(pw, pl, rw, rl)
    w = 1 / (1 + np.exp(z))
    return {"losses": _nls(z), "grad_policy_chosen_logps": beta * w / n, "grad_policy_rejected_logps": -beta * w / n}


def rejected_gradient_wrong_sign(pw, pl, rw, rl, beta):
    """Hand-written backward whose rejected-side gradient has the chosen side's sign (values right)."""
    n, z = pw.shape[0], beta * _h(pw, pl, rw, rl)
    w = 1 / (1 + np.exp(z))
    return {"losses": _nls(z), "grad_policy_chosen_logps": -beta * w / n, "grad_policy_rejected_logps": -beta * w / n}


def ipo_flat_below_target(pw, pl, rw, rl, beta):
    return np.maximum(_h(pw, pl, rw, rl) - 1 / (2 * beta), 0) ** 2  # a one-sided square: no pull up from below


def ipo_flat_above_target(pw, pl, rw, rl, beta):
    return np.minimum(_h(pw, pl, rw, rl) - 1 / (2 * beta), 0) ** 2  # a one-sided square: no push back from above


def beta_twice(pw, pl, rw, rl, beta):
    cr, rr = _rewards(pw, pl, rw, rl, beta)
    return _nls(beta * (cr - rr))  # the rewards already carry beta


def batch_mean_margin(pw, pl, rw, rl, beta):
    return _nls(beta * np.full_like(pw, _h(pw, pl, rw, rl).mean()))  # margins averaged over the batch first


def naive_log_sigmoid(pw, pl, rw, rl, beta):
    return -np.log(1 / (1 + np.exp(-beta * _h(pw, pl, rw, rl))))  # exp overflows at large margins


def swapped_chosen_rejected(pw, pl, rw, rl, beta):
    return _nls(beta * _h(pl, pw, rl, rw))


def missing_beta(pw, pl, rw, rl, beta):
    return _nls(_h(pw, pl, rw, rl))


def log_sigmoid_wrong_sign(pw, pl, rw, rl, beta):
    return -_nls(beta * _h(pw, pl, rw, rl))  # log sigma(z): maximises the loss


def rewards_not_scaled(pw, pl, rw, rl, beta):
    return _nls(beta * _h(pw, pl, rw, rl)), pw - rw, pl - rl  # eq. 8 has beta


def hinge_on_log_ratio(pw, pl, rw, rl, beta):
    return np.maximum(1 - _h(pw, pl, rw, rl), 0)  # the margin must be beta * h


def ipo_target_without_half(pw, pl, rw, rl, beta):
    return (_h(pw, pl, rw, rl) - 1 / beta) ** 2


def robust_wrong_sign(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z, e = beta * _h(pw, pl, rw, rl), label_smoothing
    return ((1 - e) * _nls(z) + e * _nls(-z)) / (1 - 2 * e)


def reference_forgotten(pw, pl, rw, rl, beta):
    return _nls(beta * (pw - pl))


def reference_ratio_added(pw, pl, rw, rl, beta):
    return _nls(beta * ((pw - pl) + (rw - rl)))  # pi_logratios + ref_logratios


def float64_creep(pw, pl, rw, rl, beta):
    return _nls(np.float64(beta) * _h(pw, pl, rw, rl))  # a NumPy float64 scalar promotes float32 input


BROKEN = [
    Case(cdpo_sign_flip, "cdpo", "cDPO: label-mixture law", bug="sign flip in cDPO's label-smoothed term"),
    Case(ipo_reference_left_summed, "ipo", "log-probs: summed or per-token", bug="IPO: policy per-token, reference summed"),
    Case(dpo_per_token_mean, "dpo", "log-probs: summed or per-token", bug="a mean over tokens where a sum is meant"),
    Case(reference_gets_gradient, "dpo", "gradient (eq. 9)", bug="the reference's gradient returned for the policy"),
    Case(rejected_gradient_wrong_sign, "dpo", "gradient (eq. 9)", bug="the rejected side's gradient with the wrong sign"),
    Case(ipo_flat_below_target, "ipo", "IPO: minimum at h = 1/(2 beta)", bug="IPO flat below its minimum"),
    Case(ipo_flat_above_target, "ipo", "IPO: minimum at h = 1/(2 beta)", bug="IPO flat above its minimum"),
    Case(beta_twice, "dpo", "beta only through beta*h", bug="beta applied twice"),
    Case(batch_mean_margin, "dpo", "agrees with minidpo", bug="a batch mean inside the log-sigmoid"),
    Case(naive_log_sigmoid, "dpo", "numerics (large margins, dtypes)", bug="naive log(sigmoid): overflow at large margins"),
    Case(swapped_chosen_rejected, "dpo", "DPO: L(h) - L(-h) = -beta*h", bug="chosen and rejected swapped"),
    Case(missing_beta, "dpo", "beta only through beta*h", bug="beta missing"),
    Case(log_sigmoid_wrong_sign, "dpo", "value at the reference", bug="log-sigmoid with the wrong sign"),
    Case(rewards_not_scaled, "dpo", "rewards (eq. 8)", bug="rewards without beta"),
    Case(hinge_on_log_ratio, "hinge", "hinge: zero for beta*h >= 1", bug="hinge margin in log-ratio units"),
    Case(ipo_target_without_half, "ipo", "IPO: minimum at h = 1/(2 beta)", bug="IPO target 1/beta"),
    Case(robust_wrong_sign, "robust", "robust: unbiased under label flips", bug="robust DPO's correction with the wrong sign"),
    Case(reference_forgotten, "dpo", "margin only (Z(x) shift)", bug="reference log-probs ignored"),
    Case(reference_ratio_added, "dpo", "margin only (Z(x) shift)", bug="reference log-ratio added, not subtracted"),
    Case(float64_creep, "dpo", "numerics (large margins, dtypes)", bug="float32 in, float64 out"),
]
