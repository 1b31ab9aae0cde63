"""The tabular world: DPO's theory evaluated exactly on tables of X prompts x Y responses.

Here a policy is a table log pi(y|x) of shape (X, Y), a reward is a table r(x, y), and every
expectation of the paper can be computed exactly, so its statements can be checked to
machine precision rather than estimated. Equations (Rafailov et al. 2023, arXiv:2305.18290):

    (1)  p*(y1 > y2 | x) = sigma(r(x, y1) - r(x, y2))                            Bradley-Terry
    (3)  max_pi  E_x [ E_{y ~ pi(.|x)} r(x, y) - beta KL(pi(.|x) || pi_ref(.|x)) ]
    (4)  pi_r(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),
         Z(x) = sum_y pi_ref(y|x) exp(r(x, y) / beta)
    (5)  r(x, y) = beta log pi_r(y|x) / pi_ref(y|x) + beta log Z(x)
    (6)  in Bradley-Terry only r(x, y1) - r(x, y2) enters, so beta log Z(x) cancels:
         p*(y1 > y2 | x) = sigma(beta log pi*(y1|x)/pi_ref(y1|x) - beta log pi*(y2|x)/pi_ref(y2|x))

Everything is computed in log space with a max-shifted log-sum-exp, so a tiny beta (where
r / beta is huge and the optimum is nearly deterministic) neither overflows nor loses the
normalisation. Letters: X prompts, Y responses.
"""

from __future__ import annotations

import math

import numpy as np

from . import checks
from .backend import get_array_module
from .logprobs import log_softmax, log_softmax_backward, logsumexp
from .losses import dpo_loss, sigmoid

__all__ = [
    "log_partition",
    "optimal_policy",
    "reward_from_policy",
    "kl_regularized_objective",
    "bradley_terry_prob",
    "preference_distribution",
    "expected_dpo_loss",
]


# ----------------------------------------------------------------------------------------------
# checks


def _table(a, name: str, shape=None):
    xp = get_array_module(a)
    a = xp.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a table (X prompts, Y responses), got shape {tuple(a.shape)}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {shape} to match the reward table")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {a.dtype}")
    return a


def _log_policy(log_pi, name: str, shape=None):
    """Check a (X, Y) table of normalised log-probabilities (entries -inf allowed: pi = 0)."""
    log_pi = _table(log_pi, name, shape)
    xp = get_array_module(log_pi)
    if bool(xp.any(xp.isnan(log_pi) | (log_pi == xp.inf))):
        raise ValueError(f"{name} has nan or +inf entries; it must hold log-probabilities")
    norm = logsumexp(log_pi, axis=-1)  # (X,) should be log 1 = 0
    tol = math.sqrt(float(np.finfo(log_pi.dtype).eps))
    worst = float(xp.max(xp.abs(norm)))
    if not worst <= tol:
        hint = ""
        if bool(xp.all(log_pi >= 0)):
            hint = " (these look like probabilities: pass their log, e.g. np.log(pi_ref))"
        raise ValueError(
            f"{name} must be normalised log-probabilities per prompt, but a row's logsumexp is off by "
            f"{worst:.3g}{hint}"
        )
    return log_pi


# ----------------------------------------------------------------------------------------------
# eq. (4): the optimum of the KL-regularised objective, and Z(x)


def log_partition(reward, log_pi_ref, beta):
    """log Z(x) = log sum_y pi_ref(y|x) exp(r(x, y) / beta), eq. (4)'s normaliser.

    Args:
        reward: (X, Y) r(x, y).
        log_pi_ref: (X, Y) log pi_ref(y|x), normalised per prompt.
        beta: > 0.
    Returns:
        (X,) log Z(x), reward's dtype.
    """
    b = checks.positive_beta(beta)
    r = _table(reward, "reward")
    log_ref = _log_policy(log_pi_ref, "log_pi_ref", r.shape).astype(r.dtype, copy=False)
    return logsumexp(log_ref + r / b, axis=-1)  # (X,)


def optimal_policy(reward, log_pi_ref, beta):
    """Eq. (4): log pi_r(y|x) = log pi_ref(y|x) + r(x, y) / beta - log Z(x).

    The unique maximiser of the KL-regularised objective eq. (3). Computed as a log-softmax
    over y of log pi_ref + r / beta, which is stable for any beta > 0: as beta -> 0 it tends
    to the argmax of r (within the support of pi_ref), as beta -> inf to pi_ref.

    Args:
        reward: (X, Y) r(x, y).
        log_pi_ref: (X, Y) normalised log pi_ref(y|x) (pass np.log(pi_ref) if you hold probabilities).
        beta: > 0.
    Returns:
        (X, Y) log pi_r(y|x), reward's dtype.
    """
    b = checks.positive_beta(beta)
    r = _table(reward, "reward")
    log_ref = _log_policy(log_pi_ref, "log_pi_ref", r.shape).astype(r.dtype, copy=False)
    return log_softmax(log_ref + r / b, axis=-1)  # (X, Y)


def reward_from_policy(log_pi, log_pi_ref, beta, log_Z=None):
    """Eq. (5): r(x, y) = beta log pi(y|x)/pi_ref(y|x) + beta log Z(x).

    Given log Z(x), this inverts eq. (4) exactly. Without it (log_Z=None) it returns eq. (8)'s
    implicit reward beta log pi/pi_ref: the same reward up to the per-prompt shift
    beta log Z(x), which no preference can see (eq. 6, Theorem 1).

    Args:
        log_pi: (X, Y) log pi(y|x).
        log_pi_ref: (X, Y) log pi_ref(y|x).
        beta: > 0.
        log_Z: optional (X,) log Z(x).
    Returns:
        (X, Y) reward, log_pi's dtype.
    """
    b = checks.positive_beta(beta)
    lp = _table(log_pi, "log_pi")
    log_ref = _table(log_pi_ref, "log_pi_ref", lp.shape).astype(lp.dtype, copy=False)
    r = b * (lp - log_ref)  # (X, Y) eq. (8)
    if log_Z is not None:
        xp = get_array_module(lp)
        log_Z = xp.asarray(log_Z).astype(lp.dtype, copy=False)
        if log_Z.shape != (lp.shape[0],):
            raise ValueError(f"log_Z must be (X,) = ({lp.shape[0]},), got {tuple(log_Z.shape)}")
        r = r + b * log_Z[:, None]  # (X, Y) eq. (5)
    return r


# ----------------------------------------------------------------------------------------------
# eq. (3): the objective, evaluated exactly


def kl_regularized_objective(log_pi, reward, log_pi_ref, beta, mean: bool = False):
    """Eq. (3) per prompt, as an exact expectation over the table:

        J(x) = sum_y pi(y|x) [ r(x, y) - beta (log pi(y|x) - log pi_ref(y|x)) ]
             = E_{y ~ pi} r(x, y) - beta KL(pi(.|x) || pi_ref(.|x))

    Responses with pi(y|x) = 0 contribute 0 (the 0 log 0 = 0 convention). At the optimum eq. (4),
    J(x) = beta log Z(x).

    Args:
        log_pi: (X, Y) normalised log pi(y|x) (entries -inf allowed).
        reward: (X, Y) r(x, y).
        log_pi_ref: (X, Y) log pi_ref(y|x).
        beta: > 0.
        mean: return the mean over prompts (uniform prompt distribution) instead of (X,).
    Returns:
        (X,) J(x), or a 0-d array if mean; log_pi's dtype.
    """
    b = checks.positive_beta(beta)
    lp = _log_policy(log_pi, "log_pi")
    r = _table(reward, "reward", lp.shape).astype(lp.dtype, copy=False)
    log_ref = _table(log_pi_ref, "log_pi_ref", lp.shape).astype(lp.dtype, copy=False)
    xp = get_array_module(lp)
    pi = xp.exp(lp)  # (X, Y)
    support = pi > 0  # (X, Y) where the expectation looks
    # off the support put 0 in, so no 0 * inf = nan is formed; on it, a -inf log pi_ref
    # (pi puts mass where pi_ref has none) correctly gives KL = +inf, J = -inf
    lp_s = xp.where(support, lp, lp.dtype.type(0))
    log_ref_s = xp.where(support, log_ref, lp.dtype.type(0))
    terms = xp.where(support, pi * (r - b * (lp_s - log_ref_s)), lp.dtype.type(0))  # (X, Y)
    J = xp.sum(terms, axis=-1)  # (X,)
    return xp.mean(J) if mean else J


def bradley_terry_prob(r1, r2):
    """Eq. (1): p(y1 > y2) = sigma(r1 - r2) = exp(r1) / (exp(r1) + exp(r2)); broadcasts."""
    xp = get_array_module(r1, r2)
    return sigmoid(xp.asarray(r1) - xp.asarray(r2))


# ----------------------------------------------------------------------------------------------
# the DPO loss in expectation over a preference distribution


def preference_distribution(reward, prompt_probs=None, pair_probs=None):
    """The distribution of labelled pairs (x, y_w, y_l) that Bradley-Terry preferences produce.

    Data is generated as: x ~ prompt_probs; a pair (y1, y2) ~ pair_probs[x]; a labeller
    prefers y1 with probability sigma(r(x, y1) - r(x, y2)), eq. (1). Then

        W[x, i, j] = P(x, y_w = i, y_l = j)
                   = prompt_probs[x] (pair_probs[x, i, j] + pair_probs[x, j, i]) sigma(r(x, i) - r(x, j))

    W sums to 1. The DPO loss in expectation over this data is sum W L(x, i, j) (see
    expected_dpo_loss); the empirical loss of N sampled pairs is the same sum with W replaced by
    their counts / N.

    Args:
        reward: (X, Y) r(x, y).
        prompt_probs: optional (X,), default uniform.
        pair_probs: optional (Y, Y) or (X, Y, Y): probability of drawing the ordered pair
            (y1, y2) for a prompt; zero diagonal, each prompt's table summing to 1. Default:
            uniform over the Y (Y - 1) ordered pairs of distinct responses.
    Returns:
        W: (X, Y, Y), reward's dtype, zero on the diagonal.
    """
    r = _table(reward, "reward")
    xp = get_array_module(r)
    X, Y = r.shape
    dt = r.dtype
    if Y < 2:
        raise ValueError(f"need at least 2 responses per prompt to form a pair, got Y = {Y}")
    tol = math.sqrt(float(np.finfo(dt).eps))
    if prompt_probs is None:
        rho = xp.full((X,), 1.0 / X, dtype=dt)  # (X,)
    else:
        rho = xp.asarray(prompt_probs).astype(dt, copy=False)
        if rho.shape != (X,) or bool(xp.any(rho < 0)) or abs(float(xp.sum(rho)) - 1.0) > tol:
            raise ValueError(f"prompt_probs must be ({X},) non-negative summing to 1")
    off_diag = 1.0 - xp.eye(Y, dtype=dt)  # (Y, Y)
    if pair_probs is None:
        u = xp.broadcast_to(off_diag / (Y * (Y - 1)), (X, Y, Y))  # (X, Y, Y)
    else:
        u = xp.asarray(pair_probs).astype(dt, copy=False)
        if u.shape == (Y, Y):
            u = xp.broadcast_to(u, (X, Y, Y))
        if u.shape != (X, Y, Y):
            raise ValueError(f"pair_probs must be ({Y}, {Y}) or ({X}, {Y}, {Y}), got {tuple(u.shape)}")
        if bool(xp.any(u < 0)) or bool(xp.any(u * (1.0 - off_diag) != 0)):
            raise ValueError("pair_probs must be non-negative with a zero diagonal (a response is never paired with itself)")
        if float(xp.max(xp.abs(xp.sum(u, axis=(1, 2)) - 1.0))) > tol:
            raise ValueError("pair_probs must sum to 1 over the (y1, y2) table of each prompt")
    shown = u + xp.swapaxes(u, 1, 2)  # (X, Y, Y) P({i, j} shown | x), either order
    p_win = bradley_terry_prob(r[:, :, None], r[:, None, :])  # (X, Y, Y) sigma(r_i - r_j), eq. (1)
    return rho[:, None, None] * shown * p_win * off_diag  # (X, Y, Y)


def expected_dpo_loss(policy_logits, log_pi_ref, pair_weights, beta, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """The DPO loss of a tabular softmax policy, summed over all labelled pairs, and its gradient.

        log pi = log_softmax(policy_logits)                                        (X, Y)
        L = sum_{x, i, j} W[x, i, j] loss(h),   h = log pi(i|x)/pi_ref(i|x) - log pi(j|x)/pi_ref(j|x)

    with loss(.) the per-pair loss of losses.dpo_loss (eq. 7 for "sigmoid"). With W from
    preference_distribution this is the expected loss under Bradley-Terry preferences, whose
    minimiser over an unrestricted policy is eq. (4)'s pi_r (for "sigmoid"): matching every
    sigma(beta h) to sigma(r_i - r_j) forces beta log pi/pi_ref = r + f(x). With W = counts / N
    it is the empirical loss of N sampled pairs.

    The gradient is the eq. (9) gradient for each pair, accumulated per response and carried
    through the log-softmax of the table:

        dlog_pi[x, i] = sum_j Wn[x, i, j] g_w[x, i, j] + sum_j Wn[x, j, i] g_l[x, j, i]
        dpolicy_logits = dlog_pi - pi * sum_y dlog_pi                (log_softmax_backward)

    where g_w, g_l are dpo_loss's per-pair gradients (N times the gradient of its mean).

    Args:
        policy_logits: (X, Y) unnormalised log-probabilities theta of the policy.
        log_pi_ref: (X, Y) normalised log pi_ref.
        pair_weights: (X, Y, Y) W, the weight of (x, y_w = i, y_l = j).
        beta: > 0.
        loss_type, label_smoothing: as in losses.dpo_loss.
    Returns:
        loss: 0-d array.
        dpolicy_logits: (X, Y) d loss / d policy_logits.
    """
    theta = _table(policy_logits, "policy_logits")
    xp = get_array_module(theta)
    X, Y = theta.shape
    dt = theta.dtype
    log_ref = _log_policy(log_pi_ref, "log_pi_ref", (X, Y)).astype(dt, copy=False)
    W = xp.asarray(pair_weights).astype(dt, copy=False)
    if W.shape != (X, Y, Y):
        raise ValueError(f"pair_weights must be (X, Y, Y) = {(X, Y, Y)}, got {tuple(W.shape)}")

    log_pi = log_softmax(theta, axis=-1)  # (X, Y)
    # every ordered pair (x, i, j) as one row of a DPO batch: i chosen, j rejected
    pi_w = xp.broadcast_to(log_pi[:, :, None], (X, Y, Y)).reshape(-1)  # (X*Y*Y,)
    pi_l = xp.broadcast_to(log_pi[:, None, :], (X, Y, Y)).reshape(-1)  # (X*Y*Y,)
    ref_w = xp.broadcast_to(log_ref[:, :, None], (X, Y, Y)).reshape(-1)  # (X*Y*Y,)
    ref_l = xp.broadcast_to(log_ref[:, None, :], (X, Y, Y)).reshape(-1)  # (X*Y*Y,)
    out = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    n = pi_w.shape[0]

    w = W.reshape(-1)  # (X*Y*Y,)
    loss = xp.sum(w * out.losses)  # 0-d
    # dpo_loss gives d mean / d logps; n times that is each pair's own d loss / d logps
    g_w = (w * n * out.grad_policy_chosen_logps).reshape(X, Y, Y)  # (X, Y, Y) on log pi(i|x)
    g_l = (w * n * out.grad_policy_rejected_logps).reshape(X, Y, Y)  # (X, Y, Y) on log pi(j|x)
    dlog_pi = xp.sum(g_w, axis=2) + xp.sum(g_l, axis=1)  # (X, Y) as winner + as loser
    return loss, log_softmax_backward(dlog_pi, log_pi, axis=-1)  # (X, Y)
