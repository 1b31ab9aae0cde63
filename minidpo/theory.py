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
    "expected_loss",
    "response_marginal",
    "fixed_point",
    "derived_fixed_point",
    "policy_summary",
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


# ----------------------------------------------------------------------------------------------
# every loss of the family: its expected loss, where gradient descent on it ends, and what that is


def _lengths(lengths, shape, dtype):
    xp = np
    if lengths is None:
        return xp.ones(shape, dtype=dtype)
    L = xp.asarray(lengths).astype(dtype)
    if L.shape != shape or bool(xp.any(L < 1)):
        raise ValueError(f"lengths must be {shape} token counts >= 1, got shape {tuple(L.shape)}")
    return L


def response_marginal(pair_weights):
    """m(y): how often response y appears in the data, over prompts (the distribution a mismatched
    completion is drawn from: KTO's reference point scores another example's completion). (Y,)"""
    W = np.asarray(pair_weights)
    m = W.sum(axis=(0, 2)) + W.sum(axis=(0, 1))  # as winner and as loser
    return m / m.sum()


def expected_loss(policy_logits, log_pi_ref, pair_weights, beta, loss_type: str = "sigmoid", lengths=None,
                  loss_inputs=None, **options):
    """Any loss of losses.LOSS_TABLE in expectation over the labelled pairs W, and its gradient:

        L = sum_{x, i, j} W[x, i, j] loss(x, i, j)        (i the chosen, j the rejected response)

    as expected_dpo_loss, for every row: the row's log-prob rule with response lengths L(x, y)
    (a per-token row sees log pi(y|x) / L(x, y), and log pi_ref / L likewise), its NLL term with the
    chosen response's length as its token count, its inputs (KTO's z0, BCO's delta) as given. The
    gradient is the row's hand-written per-pair gradient carried through the table's log-softmax.
    A loss that couples the pairs of a batch (AOT) has no such expectation: ValueError.

    Args:
        policy_logits: (X, Y) theta. log_pi_ref: (X, Y) normalised. pair_weights: (X, Y, Y) W.
        beta: > 0. loss_type: a row of LOSS_TABLE. lengths: optional (X, Y) token counts (default 1).
        loss_inputs, options: as losses.dpo_loss's.
    Returns:
        loss (0-d), dpolicy_logits (X, Y).
    """
    from .losses import loss_row

    row = loss_row(loss_type)
    if any(r.name in ("aot", "aot_unpaired") for r in row.components(row.resolve(options))):
        raise ValueError(f"the {loss_type!r} loss couples the pairs of a batch (a sort): it has no per-pair expectation")
    theta = _table(policy_logits, "policy_logits")
    X, Y = theta.shape
    dt = theta.dtype
    log_ref = _log_policy(log_pi_ref, "log_pi_ref", (X, Y)).astype(dt, copy=False)
    W = np.asarray(pair_weights).astype(dt, copy=False)
    if W.shape != (X, Y, Y):
        raise ValueError(f"pair_weights must be (X, Y, Y) = {(X, Y, Y)}, got {tuple(W.shape)}")
    L = _lengths(lengths, (X, Y), dt)
    per_token = row.average_logps
    scale = 1.0 / L if per_token else np.ones_like(L)  # (X, Y) d logp / d log pi

    log_pi = log_softmax(theta, axis=-1)  # (X, Y)
    lp, lr = log_pi * scale, log_ref * scale  # (X, Y) the row's log-probs
    pairs = [np.broadcast_to(a, (X, Y, Y)).reshape(-1) for a in (lp[:, :, None], lp[:, None, :], lr[:, :, None], lr[:, None, :])]
    counts = np.ones(X * Y * Y, dtype=dt) if per_token else np.broadcast_to(L[:, :, None], (X, Y, Y)).reshape(-1)
    out = dpo_loss(*pairs, beta=beta, loss_type=loss_type, chosen_token_counts=counts, loss_inputs=loss_inputs, **options)
    n = pairs[0].shape[0]
    w = W.reshape(-1)
    loss = np.sum(w * out.losses)
    g_w = (w * n * out.grad_policy_chosen_logps).reshape(X, Y, Y)  # on logp(i|x)
    g_l = (w * n * out.grad_policy_rejected_logps).reshape(X, Y, Y)  # on logp(j|x)
    dlog_pi = (np.sum(g_w, axis=2) + np.sum(g_l, axis=1)) * scale  # (X, Y) through logp = log pi * scale
    return loss, log_softmax_backward(dlog_pi, log_pi, axis=-1)


def _step_inputs(loss_type, log_pi, log_pi_ref, W, beta, lengths, options):
    """The per-step constants of KTO (z0) and BCO (delta) at the current policy, as a trainer computes
    them per batch (no gradient), here in expectation:
        KTO  z0 = max(0, E_x E_{y ~ m} [log pi(y|x) - log pi_ref(y|x)]),  m = response_marginal(W)
             (mismatched completions: another example's response, independent of the prompt)
        BCO  delta = E_W [(r_hat_w + r_hat_l) / 2],  r_hat = beta (log pi - log pi_ref) (the running mean's limit)."""
    from .losses import loss_row

    row = loss_row(loss_type)
    names = set(row.required_inputs(row.resolve(options)))
    out = {}
    if "reference_point" in names:
        rho = W.sum(axis=(1, 2))  # (X,) prompt weights
        m = response_marginal(W)
        out["reference_point"] = max(0.0, float(np.sum(rho[:, None] * m[None, :] * (log_pi - log_pi_ref))))
    if "reward_mean" in names:
        r = beta * (log_pi - log_pi_ref)  # (X, Y)
        out["reward_mean"] = float(np.sum(W * 0.5 * (r[:, :, None] + r[:, None, :])))
    return out


def fixed_point(reward, log_pi_ref, beta, loss_type: str = "sigmoid", pair_weights=None, lengths=None,
                steps: int = 300, tol: float = 1e-10, **options):
    """Where descent on the exact expected loss ends: the loss's fixed point on this world.

    The policy starts at pi_ref. Each step recomputes KTO's z0 and BCO's delta from the current
    policy (held constant in the step, as in training), takes the exact gradient of expected_loss,
    and moves along Newton's direction with the Hessian's eigenvalues taken in absolute value
    (downhill also where the loss is not convex; H from central differences of the exact gradient,
    a tabular policy has X * Y logits) with a backtracking (Armijo) step, or along -g where that is
    not a descent direction (a hinge's flat or kinked parts). It stops when
    the largest gradient entry is below ``tol`` (a stationary point), or after ``steps`` steps; a
    loss whose minimiser is at infinity (a policy that puts 0 on some response) does not stop, and
    ``converged`` says so.

    Args:
        reward, log_pi_ref: (X, Y). beta: > 0. loss_type, options: a row of LOSS_TABLE and its options.
        pair_weights: (X, Y, Y) W, default preference_distribution(reward) (Bradley-Terry on uniform
        pairs). lengths: optional (X, Y) response lengths in tokens.
    Returns:
        dict: log_pi (X, Y), steps (taken), grad (the largest |gradient| entry at the end), loss,
        converged (grad < tol), inputs (the last z0 / delta).
    """
    r = _table(reward, "reward")
    log_ref = _log_policy(log_pi_ref, "log_pi_ref", r.shape)
    W = preference_distribution(r) if pair_weights is None else np.asarray(pair_weights, dtype=r.dtype)
    theta = np.array(log_ref, dtype=np.float64, copy=True)
    inputs, g_max, loss = {}, math.inf, math.nan

    def at(th):
        return expected_loss(th, log_ref, W, beta, loss_type, lengths, inputs or None, **options)

    k = 0
    for k in range(1, steps + 1):
        inputs = _step_inputs(loss_type, log_softmax(theta), log_ref, W, beta, lengths, options)
        loss, g = at(theta)
        g_max = float(np.max(np.abs(g)))
        if g_max < tol:
            break
        n = theta.size
        H = np.empty((n, n), dtype=np.float64)
        e = 1e-5
        for i in range(n):  # the Hessian, a column per logit, from the exact gradient
            d = np.zeros(n, dtype=np.float64)
            d[i] = e
            H[:, i] = (at(theta + d.reshape(theta.shape))[1] - at(theta - d.reshape(theta.shape))[1]).ravel() / (2 * e)
        lam, V = np.linalg.eigh(0.5 * (H + H.T))
        # Newton with |eigenvalues| (downhill also where the loss is not convex); the directions of
        # (near) zero curvature -- adding a constant to a prompt's logits, which changes nothing -- left out
        big = np.abs(lam) > 1e-9 * max(1.0, float(np.max(np.abs(lam))))
        coef = np.where(big, (V.T @ g.ravel()) / np.where(big, np.abs(lam), 1.0), 0.0)
        step = -(V @ coef).reshape(theta.shape)
        newton = float(np.sum(step * g)) < 0
        if not newton:  # not downhill: the gradient instead
            step = -g
        t, slope = 1.0, float(np.sum(step * g))
        if newton and -slope <= 1e-13 * max(1.0, abs(loss)):
            # the decrease it promises is below the loss's float64 round-off, where Armijo's test
            # cannot judge a step: the full Newton step, which near a minimum only shrinks g
            theta = theta + step
            continue
        while True:  # Armijo: at least a tenth of the decrease the slope promises
            trial = theta + t * step
            if at(trial)[0] <= loss + 0.1 * t * slope or t < 1e-12:
                break
            t *= 0.5
        theta = trial
    return {"log_pi": log_softmax(theta), "steps": k, "grad": g_max, "loss": float(loss),
            "converged": g_max < tol, "inputs": inputs}


def _solve_shift(f, lo, hi, iters=200):
    """The c with f(c) = 0 for f increasing on (lo, hi), by bisection (hi may be an open bound)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def derived_fixed_point(reward, log_pi_ref, beta, loss_type: str = "sigmoid", lengths=None, **options):
    """The fixed point derived in closed form (up to one normalising constant c(x) per prompt, found by
    bisection), for the losses where it is known, on Bradley-Terry pairs drawn uniformly
    (preference_distribution's default); g = log pi/pi_ref, L = lengths, p_ij = sigma(r_i - r_j):

      sigmoid, cpo-free eq. 7 (summed):  g = r/beta + c                       eq. (4)
      sigmoid_norm (per-token):          g = L (r/beta + c)                   (eq. 4 per token: length-scaled)
      f-DPO sigmoid (f_divergence):      f'(exp g) = r/beta + c               (Wang et al. 2023, Thm. 1)
      ipo (per-token means):             g / L = (p(y > U) - 1/2) / beta + c,  p(y > U) = mean_j p_yj (p_yy = 1/2)
                                         (Azar et al. 2023: pi ~ pi_ref exp(p(y > mu) / tau), mu uniform)
      simpo, all rewards equal:          log pi(y) = c L(y), whatever pi_ref (its length bias)
      sft; orpo as beta -> 0:            pi(y) ~ q(y) / L(y), q(y) = P(y chosen | x)
                                         (the per-token NLL's minimiser: ORPO's SFT pull)
    ValueError for another loss. Returns (X, Y) log pi."""
    r = _table(reward, "reward")
    log_ref = _log_policy(log_pi_ref, "log_pi_ref", r.shape)
    X, Y = r.shape
    L = _lengths(lengths, (X, Y), np.float64)
    div = options.get("f_divergence", "reverse_kl")
    out = np.empty((X, Y), dtype=np.float64)
    for x in range(X):
        ref, rx, Lx = np.exp(log_ref[x]), r[x], L[x]
        if loss_type == "sigmoid" and div == "reverse_kl" and not options.get("label_smoothing"):
            g = rx / beta
            out[x] = log_ref[x] + g - logsumexp(log_ref[x] + g)
            continue
        if loss_type == "sigmoid":  # f-DPO: u = (f')^-1(r / beta + c)
            v0 = rx / beta
            alpha = options.get("f_alpha", 0.5)
            if div == "forward_kl":  # f'(u) = 1 - 1/u
                inv, top = (lambda v: 1.0 / (1.0 - v)), 1.0
            elif div == "js_divergence":  # f'(u) = log(2u / (1 + u))
                inv, top = (lambda v: np.exp(v) / (2.0 - np.exp(v))), math.log(2.0)
            elif div == "alpha_divergence":  # f'(u) = (1 - u^-alpha) / alpha
                inv, top = (lambda v: (1.0 - alpha * v) ** (-1.0 / alpha)), 1.0 / alpha
            else:
                raise ValueError(f"no derived fixed point for f_divergence {div!r}")
            hi = top - float(np.max(v0))
            c = _solve_shift(lambda c: float(np.sum(ref * inv(v0 + c))) - 1.0, hi - 1e3, hi)
            out[x] = log_ref[x] + np.log(inv(v0 + c))
            continue
        if loss_type in ("sigmoid_norm", "ipo"):
            if loss_type == "sigmoid_norm":
                a = rx / beta
            else:
                p = 1.0 / (1.0 + np.exp(-(rx[:, None] - rx[None, :])))  # (Y, Y), p_yy = 1/2
                a = (p.mean(axis=1) - 0.5) / beta
            top = float(np.min(-a + 600.0 / Lx))  # keeps every exponent below 600: no overflow
            c = _solve_shift(lambda c: float(np.sum(ref * np.exp(Lx * (a + c)))) - 1.0, top - 1e3, top)
            out[x] = log_ref[x] + Lx * (a + c)
            continue
        if loss_type == "simpo":
            if np.ptp(rx) > 0:
                raise ValueError("SimPO's fixed point is derived for a world of equal rewards only")
            c = _solve_shift(lambda c: float(np.sum(np.exp(c * Lx))) - 1.0, -1e3, 0.0)
            out[x] = c * Lx
            continue
        if loss_type in ("sft", "orpo"):
            W = preference_distribution(r)
            q = W[x].sum(axis=1)
            w = q / Lx
            out[x] = np.log(w / w.sum())
            continue
        raise ValueError(f"no derived fixed point for the {loss_type!r} loss")
    return out


def policy_summary(log_pi, reward, log_pi_ref, beta) -> dict:
    """A policy against eq. (4)'s optimum pi_r, in the units the paper's Fig. 2 uses (means over prompts):
    kl_ref = KL(pi || pi_ref), reward = E_pi r, objective = eq. (3), kl_opt = KL(pi || pi_r) (0 only at
    pi_r), and the same for pi_r itself (kl_ref_opt, reward_opt, objective_opt)."""
    lp = _log_policy(log_pi, "log_pi")
    r = _table(reward, "reward", lp.shape)
    log_ref = _log_policy(log_pi_ref, "log_pi_ref", lp.shape)
    opt = optimal_policy(r, log_ref, beta)

    def kl(a, b):
        return float(np.mean(np.sum(np.exp(a) * (a - b), axis=-1)))

    return {"kl_ref": kl(lp, log_ref), "reward": float(np.mean(np.sum(np.exp(lp) * r, axis=-1))),
            "objective": float(kl_regularized_objective(lp, r, log_ref, beta, mean=True)), "kl_opt": kl(lp, opt),
            "kl_ref_opt": kl(opt, log_ref), "reward_opt": float(np.mean(np.sum(np.exp(opt) * r, axis=-1))),
            "objective_opt": float(kl_regularized_objective(opt, r, log_ref, beta, mean=True))}
