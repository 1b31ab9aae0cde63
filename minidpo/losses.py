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
    "preference_metrics",
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
        losses: per-pair losses (including the rpo_alpha NLL term when used).
        chosen_rewards: r_hat_w = beta (log pi_w - log pi_ref_w), eq. (8); a constant (no gradient).
        rejected_rewards: r_hat_l = beta (log pi_l - log pi_ref_l), eq. (8).
        grad_policy_chosen_logps: d mean(losses) / d log pi(y_w|x).
        grad_policy_rejected_logps: d mean(losses) / d log pi(y_l|x).
        gradient_weight: eq. (9)'s per-pair weight, for every variant: -d loss_i / d z_i, so
            without the NLL term grad_policy_chosen_logps = -beta * gradient_weight / N and
            grad_policy_rejected_logps = +beta * gradient_weight / N. For plain DPO it is
            sigma(r_hat_l - r_hat_w) in (0, 1): large when the implicit reward model orders the
            pair wrongly, small when it is already right.
        log_ratio_margin: h = log pi_w/pi_ref_w - log pi_l/pi_ref_l (z = beta h is the reward margin).
        nll_losses: per-pair per-token NLL of the chosen response when rpo_alpha > 0, else None.
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
# the loss table: every fact about a loss in one row


@dataclass(frozen=True)
class Option:
    """A loss's hyper-parameter: its default, one line of help, and the interval it must lie in
    (``lo``/``hi`` closed unless ``lo_open``/``hi_open``)."""

    default: float
    help: str
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def interval(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def check(self, name: str, value, loss: str) -> float:
        """value as a float inside the interval, else ValueError naming the option and the loss."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} of the {loss!r} loss must be a number, got {value!r}") from None
        ok = math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo) and (
            v < self.hi if self.hi_open else v <= self.hi)
        if not ok:
            raise ValueError(f"{name} of the {loss!r} loss must lie in {self.interval()}, got {value!r}")
        return v


@dataclass(frozen=True)
class Loss:
    """One row of :data:`LOSS_TABLE`: what the trainer, the command line, held-out evaluation and
    ``minidpo verify`` know about a loss.

    Attributes:
        name: the loss_type / ``--loss`` name.
        margin: (h, beta, **options) -> (losses (N,), dloss/dz (N,)): the per-pair loss as a
            function of the log-ratio margin h (z = beta h), and its derivative in z; or None
            for a loss given by ``pair``.
        help: one line for ``minidpo dpo --help``.
        options: the loss's hyper-parameters, name -> :class:`Option` (passed to ``margin`` by name).
        reference: whether the loss needs pi_ref (a reference-free loss skips its forward pass).
        average_logps: the log-prob rule the loss is defined with: per-token means (True) or eq.
            (7)'s sums (False); ``TrainConfig.average_logps`` may override it.
        source: the paper the loss and its defaults come from.
        pair: for a loss that is not a function of the margin alone: (chosen, rejected, beta,
            **options) -> (losses (N,), d sum(losses) / d chosen (N,), d sum(losses) / d rejected
            (N,)), with chosen = log pi(y_w|x) - log pi_ref(y_w|x) and rejected likewise (log pi
            alone for a reference-free loss). Exactly one of ``margin`` and ``pair`` is given.
    """

    name: str
    margin: Callable | None
    help: str
    options: Mapping[str, Option] = field(default_factory=dict)
    reference: bool = True
    average_logps: bool = False
    source: str = ""
    pair: Callable | None = None

    def __post_init__(self):
        if (self.margin is None) == (self.pair is None):
            raise ValueError(f"loss {self.name!r}: give exactly one of margin (a function of h) and pair")

    def losses(self, chosen, rejected, beta: float, options: Mapping):
        """This loss at the log-ratios chosen, rejected (N,) (h = chosen - rejected): (losses (N,),
        d sum / d chosen (N,), d sum / d rejected (N,), weight (N,)), where weight is eq. (9)'s
        weight on (grad log pi_w - grad log pi_l) in units of beta: -dloss/dz for a loss of the
        margin (sigma(r_hat_l - r_hat_w) for DPO), (d_rejected - d_chosen) / (2 beta) otherwise."""
        if self.pair is not None:
            losses, d_chosen, d_rejected = self.pair(chosen, rejected, beta, **options)
            return losses, d_chosen, d_rejected, (d_rejected - d_chosen) / (2.0 * beta)
        losses, dloss_dz = self.margin(chosen - rejected, beta, **options)
        weight = -dloss_dz
        return losses, -beta * weight, beta * weight, weight  # dz/dchosen = beta, dz/drejected = -beta

    def resolve(self, options: Mapping | None = None) -> dict:
        """Every option of this loss with its value: ``options`` checked (names and ranges), the
        defaults for the rest. ValueError names an unknown option and the ones the loss has."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            has = ", ".join(self.options) or "none"
            raise ValueError(f"the {self.name!r} loss has no option {unknown[0]!r} (its options: {has})")
        return {k: opt.check(k, options.get(k, opt.default), self.name) for k, opt in self.options.items()}


_EPS = "label-flip rate epsilon (the assumed probability that a preference label is wrong)"
LOSS_TABLE: dict[str, Loss] = {}
"""name -> :class:`Loss`, in the order ``--help`` lists them. Add a loss with :func:`register_loss`."""


def register_loss(loss: Loss) -> Loss:
    """Add a row to :data:`LOSS_TABLE` (a new loss is one margin function and this one call); the
    trainer, ``--loss``, held-out evaluation and ``minidpo verify`` then all know it."""
    if not isinstance(loss, Loss):
        raise TypeError(f"register_loss needs a losses.Loss row, got {type(loss).__name__}")
    if loss.name in LOSS_TABLE and LOSS_TABLE[loss.name] is not loss:
        raise ValueError(f"a loss named {loss.name!r} is already in the table")
    LOSS_TABLE[loss.name] = loss
    return loss


for _row in (
    Loss("sigmoid", sigmoid_loss, "the paper's eq. 7, -log sigma(beta h); conservative DPO (cDPO) with label smoothing",
         {"label_smoothing": Option(0.0, _EPS, 0.0, 0.5)}, source="Rafailov et al. 2023; cDPO: Mitchell 2023"),
    Loss("robust", robust_loss, "DPO corrected for a label-flip rate eps, unbiased under noisy labels",
         {"label_smoothing": Option(0.0, _EPS, 0.0, 0.5, hi_open=True)}, source="Chowdhury et al. 2024"),
    Loss("ipo", ipo_loss, "IPO's square (h - 1/(2 beta))^2", average_logps=True,
         source="Azar et al. 2023"),
    Loss("hinge", hinge_loss, "SLiC's hinge max(0, 1 - beta h)", source="Zhao et al. 2023"),
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
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    rpo_alpha: float = 0.0,
    chosen_token_counts=None,
    **options,
) -> DPOOutput:
    """Eq. (7), the DPO loss, or a variant (a row of :data:`LOSS_TABLE`), with the eq. (8) rewards
    and eq. (9) gradients.

        r_hat_w = beta (log pi_w - log pi_ref_w),  r_hat_l = beta (log pi_l - log pi_ref_l)   eq. (8)
        h = log pi_w/pi_ref_w - log pi_l/pi_ref_l,  z = beta h = r_hat_w - r_hat_l
        loss, dloss/dz = LOSS_TABLE[loss_type].margin(h, beta, **options)
        d mean(loss) / d log pi_w = beta dloss/dz / N = -d mean(loss) / d log pi_l              eq. (9)
    (a loss of the table that is not a function of h alone gives its derivatives in the two
    log-ratios itself: Loss.pair).

    ``reference_free=True`` takes log pi_ref = 0 (ref log-probs may be None). ``rpo_alpha > 0``
    adds RPO's term (Pang et al. 2024), alpha times the chosen response's per-token NLL
    (:func:`nll_loss`), which needs ``chosen_token_counts`` (sequence_logps' token counts; ones
    for per-token-mean log-probs). ``label_smoothing`` (eps) and ``**options`` are the loss's own
    options (its row's ``options``; label_smoothing: "sigmoid" in [0, 0.5], "robust" in [0, 0.5));
    an option the loss does not have is an error unless it is 0.

    Args:
        policy_chosen_logps, policy_rejected_logps: (N,) float, log pi(y_w|x) and log pi(y_l|x).
        ref_chosen_logps, ref_rejected_logps: (N,) float, the reference's, constants (cast to the
            policy's dtype; they may live on the host).
        beta: KL coefficient > 0 (the paper's 0.1). loss_type: a name of LOSS_TABLE.
        label_smoothing, reference_free, rpo_alpha, chosen_token_counts, options: see above.
    Returns:
        DPOOutput; all (N,) arrays in the policy's dtype, on its device.
    """
    pi_w, pi_l, ref_w, ref_l, b, row, opts, alpha = _check_dpo_args(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
        label_smoothing, options, reference_free, rpo_alpha, chosen_token_counts)
    n = pi_w.shape[0]
    chosen_rewards = b * (pi_w - ref_w)  # (N,) r_hat_w, eq. (8)
    rejected_rewards = b * (pi_l - ref_l)  # (N,) r_hat_l
    h = (pi_w - ref_w) - (pi_l - ref_l)  # (N,)
    # eq. (9)'s weight: sigma(r_hat_l - r_hat_w) for plain DPO, -dloss/dz for any loss of the margin
    losses, d_chosen, d_rejected, weight = row.losses(pi_w - ref_w, pi_l - ref_l, b, opts)  # (N,) each
    grad_chosen = d_chosen / n  # (N,) d mean(loss) / d log pi_w = -beta weight / N
    grad_rejected = d_rejected / n  # (N,) d mean(loss) / d log pi_l = +beta weight / N
    nll_losses = None
    if alpha > 0.0:  # RPO: the chosen response's per-token NLL, its gradient added
        nll_losses, nll_grad = nll_loss(pi_w, chosen_token_counts, validate=False)
        losses = losses + alpha * nll_losses
        grad_chosen = grad_chosen + alpha * nll_grad
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
    if "label_smoothing" in row.options:
        options["label_smoothing"] = label_smoothing
    elif float(label_smoothing) != 0.0:
        takes = [name for name, r in LOSS_TABLE.items() if "label_smoothing" in r.options]
        raise ValueError(f"label_smoothing applies to {' and '.join(map(repr, takes))} only, not {loss_type!r}; "
                         f"got {label_smoothing!r}")
    opts = row.resolve(options)
    alpha = float(rpo_alpha)
    if not (math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"rpo_alpha must be a finite number >= 0, got {rpo_alpha!r}")
    if alpha > 0.0 and chosen_token_counts is None:
        raise ValueError("rpo_alpha > 0 needs chosen_token_counts (the chosen responses' counted tokens)")
    if reference_free:
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


def dpo_step_loss(logps, token_counts, ref_chosen, ref_rejected, tc):
    """The loss part of a DPO step, the same for training and held-out evaluation.

    logps: (2N,) log pi(y|x) of the batch's examples [chosen; rejected]; token_counts: (2N,) their
    scored tokens; ref_chosen, ref_rejected: (N,) constants; tc: the TrainConfig's loss options
    (beta, loss_type, loss_options, reference_free, rpo_alpha, and whether the log-probs are
    per-token means).
    Returns (out, dlogps): the DPOOutput (eq. 7 and variants, eq. 8 rewards) and the eq. 9
    gradient on the (2N,) log-probs, in their dtype."""
    n = logps.shape[0] // 2
    xp = get_array_module(logps)
    kwargs = dict(tc.loss_options)
    if tc.rpo_alpha:
        # the NLL term is a per-token mean: summed log-probs are divided by their token counts;
        # per-token-mean log-probs already are, so their counts are ones
        counts = xp.asarray(token_counts[:n])
        kwargs["rpo_alpha"] = tc.rpo_alpha
        kwargs["chosen_token_counts"] = xp.ones_like(counts) if tc.logps_averaged else counts
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
