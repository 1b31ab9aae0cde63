"""DPO losses in PyTorch: correct ones, and the bugs seen in real implementations.

h = (pi_w - ref_w) - (pi_l - ref_l), z = beta * h.
"""

import torch
import torch.nn.functional as F

from tests.verify_corpus import Case
from tests.verify_corpus.official_dpo import preference_loss


def _h(pw, pl, rw, rl):
    return (pw - rw) - (pl - rl)


def _rewards(pw, pl, rw, rl, beta):
    return beta * (pw - rw).detach(), beta * (pl - rl).detach()


# ------------------------------------------------------------------------------------ correct


def dpo(pw, pl, rw, rl, beta):
    rw, rl = rw.detach(), rl.detach()  # the reference is a constant, whatever the caller passes
    return (-F.logsigmoid(beta * _h(pw, pl, rw, rl)), *_rewards(pw, pl, rw, rl, beta))


def dpo_mean(pw, pl, rw, rl, beta):
    return F.softplus(-beta * _h(pw, pl, rw, rl)).mean()


def dpo_sum(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * _h(pw, pl, rw, rl)).sum()


def cdpo(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z = beta * _h(pw, pl, rw, rl)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z, e = beta * _h(pw, pl, rw, rl), label_smoothing
    return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)


def ipo_per_token(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    nw, nl = chosen_token_counts, rejected_token_counts
    return (_h(pw / nw, pl / nl, rw / nw, rl / nl) - 1 / (2 * beta)) ** 2


def hinge(pw, pl, rw, rl, beta):
    return torch.relu(1 - beta * _h(pw, pl, rw, rl))


CORRECT = [
    Case(dpo), Case(dpo, check=dict(require_detached_reference=True)), Case(dpo_mean), Case(dpo_sum),
    Case(cdpo, "cdpo"), Case(cdpo, "cdpo", check=dict(label_smoothing=0.5)), Case(robust, "robust", check=dict(label_smoothing=0.3)),
    Case(ipo_per_token, "ipo", check=dict(ipo_convention="per_token")), Case(hinge, "hinge"),
    Case(preference_loss), Case(preference_loss, "cdpo"), Case(preference_loss, "ipo", check=dict(kwargs={"ipo": True})),
]


# ------------------------------------------------------------------------------------- broken


def cdpo_sign_flip(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z = beta * _h(pw, pl, rw, rl)
    return -(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)


def ipo_summed_when_per_token(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    return (_h(pw, pl, rw, rl) - 1 / (2 * beta)) ** 2  # ignores the counts it was given


def ipo_reference_left_summed(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    nw, nl = chosen_token_counts, rejected_token_counts
    return ((pw / nw - pl / nl) - (rw - rl) - 1 / (2 * beta)) ** 2


def dpo_per_token_mean(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    nw, nl = chosen_token_counts, rejected_token_counts
    return -F.logsigmoid(beta * _h(pw / nw, pl / nl, rw / nw, rl / nl))


def policy_detached(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * ((pw - pl).detach() - (rw - rl)))  # detached the wrong side: gradient goes to the reference only


def rejected_detached(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * ((pw - rw) - (pl.detach() - rl)))  # no gradient reaches the rejected response


def reference_not_detached(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * _h(pw, pl, rw, rl))  # correct if the caller uses no_grad; checked strictly below


def beta_twice(pw, pl, rw, rl, beta):
    cr, rr = _rewards(pw, pl, rw, rl, beta)
    logits = beta * (pw - rw) - beta * (pl - rl)
    return -F.logsigmoid(beta * logits), cr, rr


def batch_mean_margin(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * _h(pw, pl, rw, rl).mean()).expand_as(pw)


def naive_log_sigmoid(pw, pl, rw, rl, beta):
    return -torch.log(torch.sigmoid(beta * _h(pw, pl, rw, rl)))


def swapped_chosen_rejected(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * _h(pl, pw, rl, rw))


def missing_beta(pw, pl, rw, rl, beta):
    return -F.logsigmoid(_h(pw, pl, rw, rl))


def log_sigmoid_wrong_sign(pw, pl, rw, rl, beta):
    return F.logsigmoid(beta * _h(pw, pl, rw, rl))


def rewards_not_detached(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * _h(pw, pl, rw, rl)), beta * (pw - rw), beta * (pl - rl)


def hinge_on_log_ratio(pw, pl, rw, rl, beta):
    return torch.relu(1 - _h(pw, pl, rw, rl))


def ipo_target_without_half(pw, pl, rw, rl, beta):
    return (_h(pw, pl, rw, rl) - 1 / beta) ** 2


def robust_wrong_sign(pw, pl, rw, rl, beta, label_smoothing=0.0):
    z, e = beta * _h(pw, pl, rw, rl), label_smoothing
    return (-(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)) / (1 - 2 * e)


def reference_forgotten(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * (pw - pl))


def upcast_not_cast_back(pw, pl, rw, rl, beta):
    return -F.logsigmoid(beta * _h(pw, pl, rw, rl).float())  # "for stability": bf16/fp16/fp64 in, fp32 out


BROKEN = [
    Case(cdpo_sign_flip, "cdpo", "cDPO: label-mixture law", bug="sign flip in cDPO's label-smoothed term"),
    Case(ipo_summed_when_per_token, "ipo", "log-probs: summed or per-token", check=dict(ipo_convention="per_token"),
         bug="IPO on summed log-probs where per-token means are the convention"),
    Case(ipo_reference_left_summed, "ipo", "log-probs: summed or per-token", bug="IPO: policy per-token, reference summed"),
    Case(dpo_per_token_mean, "dpo", "log-probs: summed or per-token", bug="a mean over tokens where a sum is meant"),
    Case(policy_detached, "dpo", "gradient (eq. 9)", bug="the gradient flows to the reference, not the policy"),
    Case(rejected_detached, "dpo", "gradient (eq. 9)", bug="the rejected response detached"),
    Case(reference_not_detached, "dpo", "reference gets no gradient", check=dict(require_detached_reference=True),
         bug="reference receives gradient (strict check)"),
    Case(beta_twice, "dpo", "beta only through beta*h", bug="beta applied twice"),
    Case(batch_mean_margin, "dpo", "agrees with minidpo", bug="a batch mean inside the log-sigmoid"),
    Case(naive_log_sigmoid, "dpo", "numerics (large margins, dtypes)", bug="log(sigmoid(z)): -inf and nan at large margins"),
    Case(swapped_chosen_rejected, "dpo", "DPO: L(h) - L(-h) = -beta*h", bug="chosen and rejected swapped"),
    Case(missing_beta, "dpo", "beta only through beta*h", bug="beta missing"),
    Case(log_sigmoid_wrong_sign, "dpo", "value at the reference", bug="log-sigmoid with the wrong sign"),
    Case(rewards_not_detached, "dpo", "rewards (eq. 8)", bug="rewards carry gradient"),
    Case(hinge_on_log_ratio, "hinge", "hinge: zero for beta*h >= 1", bug="hinge margin in log-ratio units"),
    Case(ipo_target_without_half, "ipo", "IPO: minimum at h = 1/(2 beta)", bug="IPO target 1/beta"),
    Case(robust_wrong_sign, "robust", "robust: unbiased under label flips", bug="robust DPO's correction with the wrong sign"),
    Case(reference_forgotten, "dpo", "margin only (Z(x) shift)", bug="reference log-probs ignored"),
    Case(upcast_not_cast_back, "dpo", "numerics (large margins, dtypes)", bug="bf16/fp16 in, fp32 out"),
]
