"""The losses after DPO in NumPy, written from their papers the way people write them (vectorised,
the log-sigmoid as np.logaddexp), independently of minidpo.losses: correct ones that
`minidpo verify --variant NAME` must pass, and broken ones it must reject naming the property.

Calling convention (minidpo.verify): fn(pi_w, pi_l, ref_w, ref_l, beta, **hyper-parameters), all (N,).
c = pi_w - ref_w, r = pi_l - ref_l are the log-ratios; a loss without a reference reads pi_w, pi_l.
A loss with a behaviour-cloning term takes the token counts (its NLL is per token).
"""

import math

import numpy as np

from tests.verify_corpus import Case


def _nls(z):
    """-log sigma(z)."""
    return np.logaddexp(0.0, -z)


def _sig(z):
    """sigma(z) without overflow: exp(-softplus(-z))."""
    return np.exp(-np.logaddexp(0.0, -z))


def _cr(pw, pl, rw, rl):
    return pw - rw, pl - rl


# ------------------------------------------------------------------------------------ correct


def exo_pair(pw, pl, rw, rl, beta, label_smoothing=1e-3):
    """EXO (arXiv:2402.00856, eq. 16): KL(q || p), q = softmax over {w, l} of beta log-ratios, p = (1 - eps, eps)."""
    c, r = _cr(pw, pl, rw, rl)
    z = beta * (c - r)
    q_w, q_l = _sig(z), _sig(-z)
    eps = label_smoothing
    return q_w * (-_nls(z) - math.log(1 - eps)) + q_l * (-_nls(-z) - math.log(eps))


def nca_pair(pw, pl, rw, rl, beta):
    c, r = _cr(pw, pl, rw, rl)
    return _nls(beta * c) + 0.5 * _nls(-beta * c) + 0.5 * _nls(-beta * r)


def bco_pair(pw, pl, rw, rl, beta, reward_mean=0.0):
    c, r = _cr(pw, pl, rw, rl)
    return _nls(beta * c - reward_mean) + _nls(-(beta * r - reward_mean))


def sppo_hard(pw, pl, rw, rl, beta):
    c, r = _cr(pw, pl, rw, rl)
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def aot(pw, pl, rw, rl, beta, label_smoothing=0.0):
    d = np.sort(pw - pl) - np.sort(rw - rl)
    return (1 - label_smoothing) * _nls(beta * d) + label_smoothing * _nls(-beta * d)


def aot_unpaired(pw, pl, rw, rl, beta, label_smoothing=0.0):
    c, r = _cr(pw, pl, rw, rl)
    d = np.sort(c) - np.sort(r)
    return (1 - label_smoothing) * _nls(beta * d) + label_smoothing * _nls(-beta * d)


def apo_zero(pw, pl, rw, rl, beta):
    c, r = _cr(pw, pl, rw, rl)
    return 1 - _sig(beta * c) + _sig(beta * r)


def apo_down(pw, pl, rw, rl, beta):
    c, r = _cr(pw, pl, rw, rl)
    return _sig(beta * c) + 1 - _sig(beta * (c - r))


def discopop(pw, pl, rw, rl, beta, tau=0.05):
    c, r = _cr(pw, pl, rw, rl)
    z = beta * (c - r)
    m = _sig(z / tau)
    return (1 - m) * _nls(z) + np.exp(-z - _nls(z / tau))  # m exp(-z) = exp(-z + log sigma(z / tau))


def sigmoid_norm(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    """eq. 7 on per-token mean log-ratios: takes the counts and divides (TRL's sigmoid_norm)."""
    nw, nl = chosen_token_counts.astype(pw.dtype), rejected_token_counts.astype(pw.dtype)
    c, r = _cr(pw, pl, rw, rl)
    return _nls(beta * (c / nw - r / nl))


def sft(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    return -pw / chosen_token_counts.astype(pw.dtype)


def mpo(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None, reward_mean=0.0):
    """MPO (arXiv:2411.10442): 0.8 DPO + 0.2 BCO (its delta) + 1.0 SFT of the chosen response."""
    c, r = _cr(pw, pl, rw, rl)
    nll = -pw / chosen_token_counts.astype(pw.dtype)
    return 0.8 * _nls(beta * (c - r)) + 0.2 * (_nls(beta * c - reward_mean) + _nls(reward_mean - beta * r)) + nll


def simpo(pw, pl, rw, rl, beta, gamma=0.5):
    """SimPO (arXiv:2405.14734, eq. 6) on per-token mean log-probs (the caller's), no reference."""
    return _nls(beta * (pw - pl) - gamma)


def cpo(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    """CPO (arXiv:2401.08417): -log sigma(beta log pi_w - beta log pi_l) + the chosen per-token NLL."""
    return _nls(beta * (pw - pl)) - pw / chosen_token_counts.astype(pw.dtype)


def alphapo(pw, pl, rw, rl, beta, alpha=0.25, gamma=0.5):
    """AlphaPO (arXiv:2501.03884): r = (1 - p^-alpha) / alpha of the per-token probability p."""
    r_w = (1 - np.exp(-alpha * pw)) / alpha
    r_l = (1 - np.exp(-alpha * pl)) / alpha
    return _nls(beta * (r_w - r_l) - gamma)


def orpo(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    """ORPO (arXiv:2403.07691): L_SFT + lambda L_OR on per-token means (pi_w, pi_l here), lambda = beta."""
    log_odds = (pw - pl) - (np.log1p(-np.exp(pw)) - np.log1p(-np.exp(pl)))
    return -pw / chosen_token_counts.astype(pw.dtype) + beta * _nls(log_odds)


def kto(pw, pl, rw, rl, beta, reference_point=0.0, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (arXiv:2402.01306, eq. 7) on a pair: y_w desirable, y_l undesirable, the mean of the two."""
    c, r = _cr(pw, pl, rw, rl)
    z0 = reference_point
    return 0.5 * (desirable_weight * (1 - _sig(beta * (c - z0))) + undesirable_weight * (1 - _sig(beta * (z0 - r))))


CORRECT = [
    Case(exo_pair, "exo_pair"), Case(nca_pair, "nca_pair"), Case(bco_pair, "bco_pair"),
    Case(bco_pair, "bco_pair", check=dict(kwargs={"reward_mean": 0.3})), Case(sppo_hard, "sppo_hard"),
    Case(aot, "aot"), Case(aot_unpaired, "aot_unpaired"), Case(apo_zero, "apo_zero"), Case(apo_down, "apo_down"),
    Case(discopop, "discopop"), Case(sigmoid_norm, "sigmoid_norm"), Case(sft, "sft"), Case(mpo, "weighted_sum"),
    Case(simpo, "simpo"), Case(cpo, "cpo"), Case(alphapo, "alphapo"), Case(orpo, "orpo"), Case(kto, "kto"),
    Case(kto, "kto", check=dict(kwargs={"reference_point": 0.0, "desirable_weight": 1.33})),
]

# ------------------------------------------------------------------------------------ broken


def sppo_beta_inside(pw, pl, rw, rl, beta):
    c, r = _cr(pw, pl, rw, rl)
    return (beta * c - 0.5) ** 2 + (beta * r + 0.5) ** 2  # beta^2 times SPPO: no longer the 1/k^2 law


def simpo_gamma_in_log_ratio_units(pw, pl, rw, rl, beta, gamma=0.5):
    return _nls(beta * (pw - pl - gamma))  # gamma / beta where gamma is meant


def kto_reference_point_sign(pw, pl, rw, rl, beta, reference_point=0.0, desirable_weight=1.0, undesirable_weight=1.0):
    c, r = _cr(pw, pl, rw, rl)
    z0 = reference_point
    return 0.5 * ((1 - _sig(beta * (c + z0))) + (1 - _sig(beta * (z0 - r))))  # z0 added on the desirable side


def nca_halves_swapped(pw, pl, rw, rl, beta):
    c, r = _cr(pw, pl, rw, rl)
    return _nls(beta * c) + 0.5 * _nls(beta * c) + 0.5 * _nls(-beta * r)  # -log sigma(r_w) where -log sigma(-r_w) is meant


def aot_without_sort(pw, pl, rw, rl, beta, label_smoothing=0.0):
    d = (pw - pl) - (rw - rl)  # plain (c)DPO: no optimal-transport pairing of the sorted log-ratios
    return (1 - label_smoothing) * _nls(beta * d) + label_smoothing * _nls(-beta * d)


def orpo_odds_as_probability(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None):
    return -pw / chosen_token_counts.astype(pw.dtype) + beta * _nls(pw - pl)  # log p where log odds is meant


def bco_delta_on_one_side(pw, pl, rw, rl, beta, reward_mean=0.0):
    c, r = _cr(pw, pl, rw, rl)
    return _nls(beta * c - reward_mean) + _nls(-beta * r)  # delta forgotten on the rejected side


def apo_down_rewards_unscaled(pw, pl, rw, rl, beta):
    c, r = _cr(pw, pl, rw, rl)
    return _sig(c) + 1 - _sig(beta * (c - r))  # beta missing on the anchor term


BROKEN = [
    Case(sppo_beta_inside, "sppo_hard", "beta only through beta*h", bug="SPPO: beta inside the square"),
    Case(simpo_gamma_in_log_ratio_units, "simpo", "worked example", bug="SimPO: gamma in log-ratio units"),
    Case(kto_reference_point_sign, "kto", "worked example", check=dict(kwargs={"reference_point": 0.5}),
         bug="KTO: z0 with the wrong sign for desirable examples"),
    Case(nca_halves_swapped, "nca_pair", "worked example", bug="NCA: a log-sigmoid with the wrong sign"),
    Case(aot_without_sort, "aot", "agrees with minidpo", bug="AOT without the sort"),
    Case(orpo_odds_as_probability, "orpo", "agrees with minidpo", bug="ORPO: log-probability where log-odds is meant"),
    Case(bco_delta_on_one_side, "bco_pair", "agrees with minidpo", check=dict(kwargs={"reward_mean": 0.3}),
         bug="BCO: delta on one side only"),
    Case(apo_down_rewards_unscaled, "apo_down", "beta only through beta*h", bug="APO-down: beta missing on the anchor"),
]
