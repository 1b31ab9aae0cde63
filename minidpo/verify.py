"""Property-based verification of a DPO loss: minidpo's own, or anyone's, in NumPy, PyTorch or JAX.

    from minidpo.verify import check_loss
    report = check_loss(my_dpo_loss, framework="torch", variant="dpo")
    print(report.table());  assert report.ok

or from a shell (exit status 1 on any failure, so it can sit in another project's CI):

    minidpo verify mypkg.losses:dpo_loss --framework torch --variant dpo

The calling convention (every array (N,), one entry per preference pair):

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
       **hyper_parameters)

- the four log-probs are log pi(y_w|x), log pi(y_l|x), log pi_ref(y_w|x), log pi_ref(y_l|x)
  as arrays of the framework (numpy.ndarray, torch.Tensor, jax.Array), beta a Python float;
- hyper-parameters: ``label_smoothing=eps`` for cDPO and robust DPO, plus any fixed keyword
  arguments given as ``kwargs`` (e.g. ``{"ipo": True}`` for the official code's IPO switch); a
  function whose signature names ``chosen_token_counts`` and ``rejected_token_counts`` also
  receives the responses' token counts (IPO's summed-versus-per-token convention is then
  detected);
- it returns the per-pair losses (N,), or their mean or sum (a scalar); or a tuple whose first
  entry is that and whose 2nd and 3rd are the chosen and rejected rewards (the official
  ``preference_loss`` returns (losses, chosen_rewards, rejected_rewards)); or an object or dict
  with ``losses`` (or ``loss``) and optionally ``chosen_rewards``, ``rejected_rewards`` and,
  for hand-written NumPy gradients, ``grad_policy_chosen_logps`` / ``grad_policy_rejected_logps``
  (the gradient of the loss a trainer minimises -- the mean of per-pair losses, as minidpo's
  DPOOutput has it, or the returned scalar -- with respect to the policy log-probs).

Notation as in losses.py: h = (log pi_w - log ref_w) - (log pi_l - log ref_l), z = beta h.
Each property runs its function on inputs hypothesis draws (a fixed seed and a bounded number
of examples, so a run is reproducible and takes seconds); a failure comes with hypothesis's
shrunk counterexample and one line naming what broke and the value it should have had.

Every loss of minidpo.losses.LOSS_TABLE is a variant (variants()); what a loss needs besides the
log-probs (KTO's reference_point, BCO's reward_mean) is passed by name, and the paper's identities
(IDENTITIES: the value at the reference, dependence on h only, eq. 5-6's per-prompt shift, beta only
through beta*h, swap symmetry) are checked where minidpo's own loss of the variant has them
(IDENTITY_TABLE lists which) and reported as not a property of it otherwise.

Properties (see PROPERTIES): the worked example (beta 0.1; log-probs -30/-35, reference
-34/-31: loss 0.3711, rewards +0.4/-0.4, eq. 9 weight 0.310); the value at the reference (ln 2
for DPO); dependence on the inputs only through h (a per-prompt shift Z(x) of the implicit
reward changes nothing) and on beta only through beta h; agreement with minidpo.losses.dpo_loss
(float64 and float32); the implicit rewards of eq. 8; the eq. 9 gradient (autograd for PyTorch
and JAX, central differences in float64 for NumPy); each variant's own law; finite values and
gradients for margins |h| from 1 to 1e4 and up to 1e-4 of the dtype's largest value, in every
floating dtype the framework has. Conventions that
differ between correct implementations are detected and reported, not failed: mean, sum or
per-pair losses; rewards reported or not; whether the gradient reaches the reference inputs;
summed or per-token log-probs for IPO.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .losses import LOSS_TABLE, dpo_loss, log_sigmoid

__all__ = [
    "VARIANTS",
    "FRAMEWORKS",
    "PROPERTIES",
    "PropertyResult",
    "Report",
    "FrameworkUnavailable",
    "IDENTITIES",
    "IDENTITY_TABLE",
    "check_loss",
    "detect_framework",
    "check_identity",
    "minidpo_function",
    "load_function",
]

FRAMEWORKS = ("numpy", "torch", "jax")


def variants() -> tuple[str, ...]:
    """The losses a function can claim to compute: "dpo" (eq. 7, the "sigmoid" row of
    losses.LOSS_TABLE), "cdpo" (the same row with label smoothing), then every other row of the
    table by its name (a loss added to the table is a variant at once)."""
    return ("dpo", "cdpo", *[n for n in LOSS_TABLE if n != "sigmoid"])


VARIANTS = variants()  # the built-in ones; variants() also lists losses registered later


def _loss_name(variant: str) -> str:
    """The LOSS_TABLE row a variant names ("sigmoid" for dpo and cdpo)."""
    return "sigmoid" if variant in ("dpo", "cdpo", "sigmoid") else variant


def _smoothed(variant: str) -> bool:
    """Whether the variant is checked with label smoothing eps (cdpo, and a row with that option)."""
    return variant == "cdpo" or (variant != "dpo" and "label_smoothing" in LOSS_TABLE[_loss_name(variant)].options)


ALL = "every variant"  # a property that applies to whatever loss is claimed
IDENTITY = "the variants whose loss has it"  # one of the paper's identities: checked where minidpo's own loss has it
# property name -> the variants it applies to
PROPERTIES = {
    "worked example": ALL,
    "value at the reference": IDENTITY,
    "margin only (Z(x) shift)": IDENTITY,
    "per-prompt shift (eq. 5-6)": IDENTITY,
    "beta only through beta*h": IDENTITY,
    "swap = flipped log-ratios": IDENTITY,
    "agrees with minidpo": ALL,
    "rewards (eq. 8)": ALL,
    "gradient (eq. 9)": ALL,
    "reference gets no gradient": ALL,
    "DPO: L(h) - L(-h) = -beta*h": ("dpo",),
    "cDPO: label-mixture law": ("cdpo",),
    "cDPO at 0.5: symmetric, min at h = 0": ("cdpo",),
    "robust: unbiased under label flips": ("robust",),
    "IPO: minimum at h = 1/(2 beta)": ("ipo",),
    "log-probs: summed or per-token": ALL,
    "hinge: zero for beta*h >= 1": ("hinge",),
    "numerics (large margins, dtypes)": ALL,
}

# The paper's identities, one property each. Which of them a loss has is a fact about the loss:
#   value at the reference      at pi = pi_ref the loss is one constant (ln 2 for eq. 7), whatever the log-probs
#   margin only (Z(x) shift)    the four log-probs enter only through h (any shift that keeps h changes nothing)
#   per-prompt shift (eq. 5-6)  log pi(y_w|x) and log pi(y_l|x) moved by one s(x) change nothing (Z(x) cancels)
#   beta only through beta*h    beta -> k beta with the log-ratios -> 1/k changes nothing (IPO, SPPO: scales by 1/k^2)
#   swap = flipped log-ratios   swapping chosen and rejected equals negating both log-ratios, L(r, c) = L(-c, -r):
#                               raising y_w and lowering y_l are treated alike
IDENTITIES = ("value at the reference", "margin only (Z(x) shift)", "per-prompt shift (eq. 5-6)",
              "beta only through beta*h", "swap = flipped log-ratios")
_ALL_FIVE = frozenset(IDENTITIES)
_AT_REF, _MARGIN, _SHIFT, _BETA, _SWAP = IDENTITIES
# Which identities hold for each built-in loss, at its defaults and verify's (label smoothing 0.1 where the
# loss has it, each Input's probe value: KTO's z0 = 0.25, BCO's delta = 0). check_loss does not read this
# table: it runs each identity on minidpo's own loss first and checks the function only where that holds;
# tests/test_loss_properties.py holds the two to each other, cell by cell, each failing cell with its numbers.
IDENTITY_TABLE = {
    "sigmoid": _ALL_FIVE, "robust": _ALL_FIVE, "ipo": _ALL_FIVE, "hinge": _ALL_FIVE, "exo_pair": _ALL_FIVE,
    "discopop": _ALL_FIVE, "sigmoid_norm": _ALL_FIVE,
    "nca_pair": frozenset({_AT_REF, _BETA}),  # each response scored against 0, chosen and rejected unlike
    "bco_pair": frozenset({_AT_REF, _BETA, _SWAP}),  # against delta (0 here), not against each other
    "sppo_hard": frozenset({_AT_REF, _BETA, _SWAP}),  # each log-ratio to its own target
    "aot": frozenset({_AT_REF, _SHIFT}),  # sorts policy and reference differences apart: not a function of beta h
    "aot_unpaired": frozenset({_AT_REF, _BETA, _SWAP}),  # sorting couples the pairs: a per-pair shift reorders
    "apo_zero": frozenset({_AT_REF, _BETA, _SWAP}),
    "apo_down": frozenset({_AT_REF, _BETA}),
    "sft": frozenset(), "weighted_sum": frozenset(),  # an NLL term (MPO's sft) has none of them
    "simpo": frozenset({_SHIFT}),  # no reference: only what does not involve pi_ref survives
    "cpo": frozenset(), "alphapo": frozenset(), "orpo": frozenset(),  # no reference, and an NLL term or a power reward
    "kto": frozenset({_AT_REF, _BETA}),  # not pairwise: each example against z0
}
_BETA_POWER = {"ipo": 2, "sppo_hard": 2}  # beta -> k beta, log-ratios / k: the loss times 1/k^power

# the worked example: beta 0.1; policy -30 / -35; reference -34 / -31  ->  h = 8, z = 0.8
WORKED = dict(pw=-30.0, pl=-35.0, rw=-34.0, rl=-31.0, beta=0.1)
LARGE_MARGINS = (1.0, 10.0, 100.0, 1e3, 1e4)  # and, per dtype, 1e-4 of its largest finite value
# past this minidpo's exponentials saturate (losses.f_divergence_score, alphapo_loss: exp(352) in float64):
# the exact loss needs a larger exponent than float64 holds, so such a margin has no correct value to check
_SATURATED = 1e-3 * math.exp(0.5 * math.log(float(np.finfo(np.float64).max)) - 2.0)


class FrameworkUnavailable(RuntimeError):
    """The requested framework is not installed."""


class _Broken(AssertionError):
    """A property does not hold; the message is the one-line explanation."""


@dataclass
class PropertyResult:
    """One row of the report.

    verdict: "pass", "FAIL", "skip" (does not apply, or needs something the function lacks),
    or "note" (a convention, detected and reported).
    """

    name: str
    verdict: str
    detail: str = ""
    counterexample: str = ""


@dataclass
class Report:
    """What check_loss found: one PropertyResult per property, and the detected conventions."""

    function: str
    framework: str
    variant: str
    results: list = field(default_factory=list)
    conventions: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list:
        """Names of the properties that failed."""
        return [r.name for r in self.results if r.verdict == "FAIL"]

    def result(self, name: str) -> PropertyResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def table(self) -> str:
        """A plain-text table: property, verdict, detail / counterexample; then the conventions."""
        w = max([len(r.name) for r in self.results] + [8])
        lines = [f"{self.function}  [{self.framework}, variant {self.variant}]", "",
                 f"{'property':<{w}}  verdict  detail / counterexample", f"{'-' * w}  -------  {'-' * 40}"]
        for r in self.results:
            lines.append(f"{r.name:<{w}}  {r.verdict:<7}  {r.detail}")
            if r.counterexample:
                lines.append(f"{'':<{w}}           counterexample: {r.counterexample}")
        if self.conventions:
            lines.append("")
            lines.append("conventions detected:")
            for k, v in self.conventions.items():
                lines.append(f"  {k}: {v}")
        n_fail = len(self.failed)
        n_pass = sum(r.verdict == "pass" for r in self.results)
        lines.append("")
        n_note = sum(r.verdict == "note" for r in self.results)
        lines.append(f"{n_pass} passed, {n_fail} failed, {sum(r.verdict == 'skip' for r in self.results)} skipped"
                     + (f", {n_note} noted" if n_note else "") + ("" if n_fail == 0 else f": {', '.join(self.failed)}"))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# frameworks: arrays in, float64 NumPy out, gradients of the (summed) returned loss


class _Numpy:
    name = "numpy"
    autograd = False
    low_precision = ("float32", "float16")

    def __init__(self):
        self.np = np

    def tensor(self, a, dtype: str = "float64"):
        return np.asarray(a, dtype=np.dtype(dtype))

    def numpy(self, x):
        return np.asarray(x, dtype=np.float64)

    def dtype_name(self, x) -> str:
        return str(np.asarray(x).dtype)

    def carries_gradient(self, x) -> bool:
        return False


class _Torch:
    name = "torch"
    autograd = True
    low_precision = ("float32", "bfloat16", "float16")

    def __init__(self):
        try:
            import torch
        except ImportError as err:
            raise FrameworkUnavailable(f"framework 'torch' is not installed ({err}); for a loss written in NumPy "
                                       f"pass --framework numpy") from None
        self.torch = torch

    def tensor(self, a, dtype: str = "float64", requires_grad: bool = False):
        t = self.torch.tensor(np.asarray(a, dtype=np.float64), dtype=getattr(self.torch, dtype))
        return t.requires_grad_(requires_grad)

    def numpy(self, x):
        if isinstance(x, self.torch.Tensor):
            return x.detach().to(self.torch.float64).cpu().numpy()
        return np.asarray(x, dtype=np.float64)

    def dtype_name(self, x) -> str:
        return str(x.dtype).replace("torch.", "") if isinstance(x, self.torch.Tensor) else f"{type(x).__name__}"

    def carries_gradient(self, x) -> bool:
        return isinstance(x, self.torch.Tensor) and x.requires_grad

    def grads(self, call, arrays, dtype="float64"):
        """(parsed output, [d total / d each of the four inputs]) with every input requiring grad."""
        leaves = [self.tensor(a, dtype, requires_grad=True) for a in arrays]
        out = _parse(call(*leaves))
        total = out.loss.sum() if out.loss.ndim else out.loss
        if not total.requires_grad:
            return out, [np.zeros(len(a), dtype=np.float64) for a in arrays]
        g = self.torch.autograd.grad(total, leaves, allow_unused=True)
        return out, [np.zeros(len(a), dtype=np.float64) if gi is None else self.numpy(gi) for a, gi in zip(arrays, g)]


class _Jax:
    name = "jax"
    autograd = True
    low_precision = ("float32", "bfloat16", "float16")

    def __init__(self):
        try:
            import jax
            import jax.numpy as jnp
        except ImportError as err:
            raise FrameworkUnavailable(f"framework 'jax' is not installed ({err})") from None
        self.jax, self.jnp = jax, jnp

    def tensor(self, a, dtype: str = "float64"):
        return self.jnp.asarray(np.asarray(a, dtype=np.float64), dtype=getattr(self.jnp, dtype))

    def numpy(self, x):
        return np.asarray(x).astype(np.float64)

    def dtype_name(self, x) -> str:
        return str(getattr(x, "dtype", type(x).__name__))

    def carries_gradient(self, x) -> bool:
        return False  # checked through jax.grad in the rewards property

    def grads(self, call, arrays, dtype="float64"):
        xs = [self.tensor(a, dtype) for a in arrays]
        out = _parse(call(*xs))

        def total(*a):
            loss = _parse(call(*a)).loss
            return self.jnp.sum(loss)

        g = self.jax.grad(total, argnums=(0, 1, 2, 3))(*xs)
        return out, [self.numpy(gi) for gi in g]

    def reward_gradient(self, call, arrays):
        """d sum(chosen_rewards + rejected_rewards) / d policy log-probs (0 when rewards are stopped)."""
        xs = [self.tensor(a) for a in arrays]

        def rewards(*a):
            o = _parse(call(*a))
            return self.jnp.sum(o.chosen_rewards) + self.jnp.sum(o.rejected_rewards)

        g = self.jax.grad(rewards, argnums=(0, 1))(*xs)
        return max(float(np.max(np.abs(self.numpy(gi)))) for gi in g)


def detect_framework(fn: Callable) -> str:
    """The array library ``fn`` is written in, read from what its module imports (and its
    closure holds): "torch" or "jax" when it refers to that library or to anything from it,
    otherwise "numpy". ValueError when it refers to both PyTorch and JAX."""
    import types

    module = inspect.getmodule(fn)
    refs = list(vars(module).values()) if module is not None else []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            refs.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    found = set()
    for v in refs:
        name = v.__name__ if isinstance(v, types.ModuleType) else getattr(v, "__module__", None)
        root = name.split(".")[0] if isinstance(name, str) else ""
        if root in ("torch", "jax", "jaxlib"):
            found.add("torch" if root == "torch" else "jax")
    if len(found) > 1:
        raise ValueError(f"{getattr(fn, '__qualname__', fn)!r} refers to both PyTorch and JAX: name its framework "
                         f"(--framework torch or jax)")
    return found.pop() if found else "numpy"


def _framework(name: str):
    if name == "numpy":
        return _Numpy()
    if name == "torch":
        return _Torch()
    if name == "jax":
        return _Jax()
    raise ValueError(f"unknown framework {name!r}; choose one of {', '.join(FRAMEWORKS)}")


def _quiet():
    """The function under test may warn (overflow, ...); the verdict reports it, the console need not."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(np.errstate(all="ignore"))
    return stack


def _x64(fw):
    """JAX computes in float32 unless 64-bit types are enabled; enable them for the check only."""
    if fw.name == "jax":
        enable = getattr(fw.jax, "enable_x64", None)
        if enable is None:  # JAX before 0.5
            from jax.experimental import enable_x64 as enable
        return enable(True)
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# the function's output


@dataclass
class _Out:
    loss: Any
    chosen_rewards: Any = None
    rejected_rewards: Any = None
    grad_w: Any = None
    grad_l: Any = None


def _get(obj, *names):
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if not isinstance(obj, dict) and hasattr(obj, n):
            return getattr(obj, n)
    return None


def _parse(out) -> _Out:
    if isinstance(out, (tuple, list)):
        if len(out) >= 3:
            return _Out(out[0], out[1], out[2])
        return _Out(out[0])
    if isinstance(out, dict) or hasattr(out, "losses"):
        loss = _get(out, "losses", "loss")
        if loss is None:
            raise TypeError("the returned mapping has neither 'losses' nor 'loss'")
        return _Out(loss, _get(out, "chosen_rewards"), _get(out, "rejected_rewards"),
                    _get(out, "grad_policy_chosen_logps"), _get(out, "grad_policy_rejected_logps"))
    return _Out(out)


# ----------------------------------------------------------------------------------------------
# the oracle: minidpo's loss in float64, and the closed forms written out with math


def _oracle(ck, pw, pl, rw, rl, beta, counts=None, inputs=None):
    """minidpo.losses.dpo_loss in float64: the DPOOutput of the claimed variant, with its options and
    inputs (token counts: ones unless given, i.e. per-token mean log-probs for an NLL term)."""
    a = [np.asarray(v, dtype=np.float64) for v in (pw, pl, rw, rl)]
    n = len(a[0])
    cw = np.ones(n) if counts is None else np.asarray(counts[0], dtype=np.float64)
    cl = np.ones(n) if counts is None else np.asarray(counts[1], dtype=np.float64)
    return dpo_loss(*a, beta=beta, loss_type=_loss_name(ck.variant), label_smoothing=ck.eps, chosen_token_counts=cw,
                    rejected_token_counts=cl, loss_inputs=dict(ck.inputs if inputs is None else inputs), **ck.options)


def _oracle_grads(ck, pw, pl, rw, rl, beta, counts=None):
    """d sum(per-pair losses) / d log pi_w and / d log pi_l of minidpo's loss, float64 (N times the
    gradient of the mean; for a loss of the margin: -beta weight and +beta weight, eq. 9)."""
    out = _oracle(ck, pw, pl, rw, rl, beta, counts)
    n = len(out.losses)
    return out, n * out.grad_policy_chosen_logps, n * out.grad_policy_rejected_logps


def minidpo_function(loss_type: str, **fixed):
    """minidpo's own loss ``loss_type`` in verify's calling convention, fn(pi_w, pi_l, ref_w, ref_l, beta,
    **hyper_parameters) -> DPOOutput (losses, rewards and hand-written gradients); the row's options
    and inputs are taken by name (``fixed`` gives defaults), token counts when passed."""
    from .losses import loss_row

    row = loss_row(loss_type)

    def fn(pw, pl, rw, rl, beta, chosen_token_counts=None, rejected_token_counts=None, **kw):
        kw = {**fixed, **kw}
        opts = {k: v for k, v in kw.items() if k not in row.required_inputs(kw)}
        inputs = {k: v for k, v in kw.items() if k in row.required_inputs(kw)}
        n = len(pw)
        cw = np.ones(n, dtype=np.float64) if chosen_token_counts is None else chosen_token_counts
        return dpo_loss(pw, pl, rw, rl, beta=beta, loss_type=loss_type, chosen_token_counts=cw,
                        rejected_token_counts=rejected_token_counts, loss_inputs=inputs, **opts)

    fn.__qualname__ = f"minidpo_function({loss_type!r})"
    return fn


def _softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x) for a moderate Python float, written out."""
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


def _closed_form(ck, h, beta):
    """(loss, weight) for one pair with margin h, from the formulas (not from minidpo's code)."""
    variant, eps = ck.variant, ck.eps
    z = beta * h
    if variant in ("dpo", "cdpo"):
        sig = 1.0 / (1.0 + math.exp(-z))
        return (1 - eps) * _softplus(-z) + eps * _softplus(z), (1 - eps) * (1 - sig) - eps * sig
    if variant == "robust":
        sig = 1.0 / (1.0 + math.exp(-z))
        return ((1 - eps) * _softplus(-z) - eps * _softplus(z)) / (1 - 2 * eps), ((1 - eps) * (1 - sig) + eps * sig) / (1 - 2 * eps)
    if variant == "ipo":
        return (h - 1 / (2 * beta)) ** 2, -2 * (h - 1 / (2 * beta)) / beta
    if variant == "hinge":
        return max(0.0, 1 - z), float(z < 1)
    # a loss of the table without a formula written out here: its own row, in float64
    out = _oracle(ck, np.array([h - 1.0], dtype=np.float64), np.array([-1.0], dtype=np.float64),
                  np.zeros(1, dtype=np.float64), np.zeros(1, dtype=np.float64), beta)
    return float(out.losses[0]), float(out.gradient_weight[0])


_WRITTEN_OUT = ("dpo", "cdpo", "robust", "ipo", "hinge")  # the variants _closed_form writes out


def _fmt(v) -> str:
    a = np.atleast_1d(np.asarray(v, dtype=np.float64))
    s = ", ".join(f"{x:.6g}" for x in a)
    return f"[{s}]"


def _case_str(c) -> str:
    s = f"pi_w={_fmt(c['pw'])} pi_l={_fmt(c['pl'])} ref_w={_fmt(c['rw'])} ref_l={_fmt(c['rl'])} beta={c['beta']:g}"
    for k in ("shift", "k", "delta", "counts_w", "counts_l"):
        if k in c:
            s += f" {k}={_fmt(c[k]) if isinstance(c[k], (list, np.ndarray)) else c[k]}"
    return s


# ----------------------------------------------------------------------------------------------
# the checker


class _Checker:
    def __init__(self, fn, fw, variant, label_smoothing, kwargs, max_examples, reduction, ipo_convention,
                 require_detached_reference):
        self.fn, self.fw, self.variant = fn, fw, variant
        self.eps = float(label_smoothing) if _smoothed(variant) else 0.0
        self.kwargs = dict(kwargs or {})
        # the fixed keyword arguments that are options of the claimed loss's table row (such as a
        # temperature) are the oracle's options too
        row = LOSS_TABLE[_loss_name(variant)]
        self.row = row
        self.options = {k: v for k, v in self.kwargs.items() if row.accepts(k, self.kwargs) and k != "label_smoothing"}
        # what the loss needs besides the log-probs (KTO's z0, BCO's delta): given, else the default or the probe
        self.inputs = {k: self.kwargs.get(k, spec.probe if spec.default is None else spec.default)
                       for k, spec in row.required_inputs(self.options).items() if spec.units != "count"}
        self.input_units = {k: row.required_inputs(self.options)[k].units for k in self.inputs}
        self.coupled = any(r.couples for r in row.components(self.options))
        # the written-out formulas and the variant laws are those of the plain loss, not of its f-DPO form
        self.plain = self.options.get("f_divergence", "reverse_kl") == "reverse_kl"
        self.max_examples = int(max_examples)
        self.want_reduction = reduction
        self.want_ipo = ipo_convention
        self.strict_ref = require_detached_reference
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        self.takes_counts = "chosen_token_counts" in params and "rejected_token_counts" in params
        self.reduction = "none"
        self.conventions = {}
        self.ref_grad = (0.0, "")  # the largest |d loss / d log ref| seen by the gradient property, and where

    # -- calling the function
    def call(self, pw, pl, rw, rl, beta, eps=None, counts=None, inputs=None):
        kw = {**self.inputs, **self.kwargs, **(inputs or {})}
        if _smoothed(self.variant):
            kw["label_smoothing"] = self.eps if eps is None else eps
        if self.takes_counts:
            if counts is None:  # ones: summed and per-token log-probs coincide
                counts = (np.ones(np.shape(pw)[0], dtype=np.float64), np.ones(np.shape(pw)[0], dtype=np.float64))
            kw["chosen_token_counts"] = self.fw.tensor(counts[0], "int64")
            kw["rejected_token_counts"] = self.fw.tensor(counts[1], "int64")
        try:
            return self.fn(pw, pl, rw, rl, beta, **kw)
        except SystemExit as err:  # reported as a failure of every property, never taken for a verdict
            raise RuntimeError(f"the function called sys.exit({err.code!r})") from None

    def run(self, pw, pl, rw, rl, beta, dtype="float64", eps=None, counts=None, inputs=None):
        """Call in `dtype` with NumPy float64 inputs; return (_Out, loss as float64 NumPy)."""
        t = [self.fw.tensor(a, dtype) for a in (pw, pl, rw, rl)]
        out = _parse(self.call(*t, beta, eps=eps, counts=counts, inputs=inputs))
        return out, self.fw.numpy(out.loss)

    def reduce(self, per_pair):
        per_pair = np.asarray(per_pair, dtype=np.float64)
        if self.reduction == "mean":
            return np.asarray(np.mean(per_pair))
        if self.reduction == "sum":
            return np.asarray(np.sum(per_pair))
        return per_pair

    def loss_of(self, case, **kw):
        with _x64(self.fw):
            return self.run(case["pw"], case["pl"], case["rw"], case["rl"], case["beta"], **kw)[1]

    # -- comparing
    @staticmethod
    def close(got, want, rtol, atol):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            return False
        return bool(np.all(np.isfinite(got)) and np.allclose(got, want, rtol=rtol, atol=atol))

    def expect(self, got, want, what, rtol=1e-9, atol=1e-9, labels=("got", "correct")):
        """_Broken(what: got ..., correct ...) unless got and want are close. ``labels`` name the two
        values where both are the function's own (an invariance: "shifted ..., unshifted ...")."""
        if not self.close(got, want, rtol, atol):
            raise _Broken(f"{what}: {labels[0]} {_fmt(got)}, {labels[1]} {_fmt(want)}")

    def same(self, got, want, what, rtol=1e-8, labels=("got", "correct")):
        """An identity between two evaluations of the function: equal per pair (as a multiset for a loss
        that couples the pairs, whose per-pair losses belong to ranks)."""
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if self.coupled and got.ndim == 1:
            got, want = np.sort(got), np.sort(want)
        scale = 1e-9 * max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
        self.expect(got, want, what, rtol, scale, labels=labels)

    # -- hypothesis, called from inside a library
    def hypothesis(self, strategy, check):
        """Run check(case) on drawn cases; return None, or (one-line message, shrunk case)."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis.errors import HypothesisException, Unsatisfiable

        seen = {}

        def body(case):
            try:
                with _x64(self.fw), _quiet():
                    check(case)
            except HypothesisException:
                raise
            except _Broken as err:
                seen["msg"], seen["case"] = str(err), case
                raise
            except Exception as err:  # the function under test raised
                seen["msg"], seen["case"] = f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", case
                raise

        test = settings(
            max_examples=self.max_examples, derandomize=True, database=None, deadline=None,
            suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False,
            verbosity=Verbosity.quiet, phases=(Phase.explicit, Phase.generate, Phase.shrink),
        )(given(strategy)(body))
        try:
            test()
        except Unsatisfiable:
            return ("no drawn input satisfied the property's preconditions", None)
        except Exception:
            if "msg" not in seen:
                raise
            return (seen["msg"], seen["case"])  # the last failure recorded is the shrunk one
        return None

    def strategy(self, max_n=4, extra=None):
        from hypothesis import strategies as st

        # sequence log-probs; a loss defined on per-token means (SimPO, ORPO, AlphaPO, ...) gets per-token
        # values, which lie in [-12, 0) in practice (AlphaPO's power reward is exp(-alpha a))
        lo, hi = (-12.0, -0.05) if self.row.average_logps else (-80.0, -0.5)
        logp = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
        betas = st.sampled_from((0.1, 0.5, 1.0, 0.05, 2.0))

        @st.composite
        def cases(draw):
            n = draw(st.integers(1, max_n))
            c = {k: np.array(draw(st.lists(logp, min_size=n, max_size=n)), dtype=np.float64) for k in ("pw", "pl", "rw", "rl")}
            c["beta"] = draw(betas)
            if extra:
                c.update(extra(draw, n))
            return c

        return cases()


# ----------------------------------------------------------------------------------------------
# the properties; each takes the checker and returns (verdict, detail, counterexample)


def _prop_worked_example(ck):
    w = WORKED
    h = (w["pw"] - w["rw"]) - (w["pl"] - w["rl"])  # 8
    arrays = [np.array([w[k]]) for k in ("pw", "pl", "rw", "rl")]
    if ck.variant not in _WRITTEN_OUT or not ck.plain:  # a loss of the table: its own row at the worked example
        return _worked_example_of_the_row(ck, arrays)
    loss, weight = _closed_form(ck, h, w["beta"])
    case = _case_str(dict(zip(("pw", "pl", "rw", "rl"), arrays), beta=w["beta"]))
    try:
        with _x64(ck.fw), _quiet():
            out, got = ck.run(*arrays, w["beta"])
            got = np.ravel(got)
            if got.shape != (1,) or abs(got[0] - loss) > 1e-6 * max(1.0, abs(loss)):
                return "FAIL", f"loss {_fmt(got)}, correct {loss:.4f}", case
            if out.chosen_rewards is not None:
                r = (ck.fw.numpy(out.chosen_rewards).ravel(), ck.fw.numpy(out.rejected_rewards).ravel())
                if not (ck.close(r[0], [0.4], 1e-6, 1e-9) and ck.close(r[1], [-0.4], 1e-6, 1e-9)):
                    return "FAIL", f"rewards {_fmt(r[0])} / {_fmt(r[1])}, correct +0.4 / -0.4", case
            gw, gl = _policy_grads(ck, arrays, w["beta"])
            if not (ck.close(gw, [-w["beta"] * weight], 1e-5, 1e-9) and ck.close(gl, [w["beta"] * weight], 1e-5, 1e-9)):
                return "FAIL", (f"gradient {_fmt(gw)} / {_fmt(gl)}, correct {-w['beta'] * weight:.5f} / "
                                f"{w['beta'] * weight:+.5f} (eq. 9 weight {weight:.3f})"), case
    except Exception as err:
        return "FAIL", f"raised {type(err).__name__}: {err}", case
    return "pass", f"loss {loss:.4f}, rewards +0.4/-0.4, weight {weight:.3f}", ""


def _worked_example_of_the_row(ck, arrays):
    """The worked example for a loss written out only in its table row: loss, rewards (eq. 8; beta log pi
    for a loss without a reference) and both gradients against minidpo's row in float64."""
    beta = WORKED["beta"]
    ref, gw_want, gl_want = _oracle_grads(ck, *arrays, beta)
    loss = float(ref.losses[0])
    case = _case_str(dict(zip(("pw", "pl", "rw", "rl"), arrays), beta=beta))
    try:
        with _x64(ck.fw), _quiet():
            out, got = ck.run(*arrays, beta)
            got = np.ravel(got)
            if got.shape != (1,) or abs(got[0] - loss) > 1e-6 * max(1.0, abs(loss)):
                return "FAIL", f"loss {_fmt(got)}, correct {loss:.4f}", case
            if out.chosen_rewards is not None:
                r = (ck.fw.numpy(out.chosen_rewards).ravel(), ck.fw.numpy(out.rejected_rewards).ravel())
                if not (ck.close(r[0], ref.chosen_rewards, 1e-6, 1e-9) and ck.close(r[1], ref.rejected_rewards, 1e-6, 1e-9)):
                    return "FAIL", (f"rewards {_fmt(r[0])} / {_fmt(r[1])}, correct {_fmt(ref.chosen_rewards)} / "
                                    f"{_fmt(ref.rejected_rewards)}"), case
            gw, gl = _policy_grads(ck, arrays, beta)
            if not (ck.close(gw, gw_want, 1e-5, 1e-9) and ck.close(gl, gl_want, 1e-5, 1e-9)):
                return "FAIL", f"gradient {_fmt(gw)} / {_fmt(gl)}, correct {_fmt(gw_want)} / {_fmt(gl_want)}", case
    except Exception as err:
        return "FAIL", f"raised {type(err).__name__}: {err}", case
    return "pass", (f"loss {loss:.4f}, rewards {float(ref.chosen_rewards[0]):+.4g}/{float(ref.rejected_rewards[0]):+.4g}, "
                    f"gradients {float(gw_want[0]):+.4g}/{float(gl_want[0]):+.4g}"), ""


def _policy_grads(ck, arrays, beta, counts=None):
    """d(returned loss, summed if per-pair)/d log pi_w and / d log pi_l, in float64."""
    if ck.fw.autograd:
        _, g = ck.fw.grads(lambda *t: ck.call(*t, beta, counts=counts), arrays)
        return g[0], g[1]
    out, _ = ck.run(*arrays, beta, counts=counts)
    if out.grad_w is not None and out.grad_l is not None:  # hand-written gradients are what gets checked
        # they are of the loss a trainer minimises: the mean of per-pair losses (minidpo's convention)
        # or the returned scalar; rescaled here to the gradient of the summed returned loss
        n = len(arrays[0])
        per = n if ck.reduction == "none" else 1.0
        return ck.fw.numpy(out.grad_w) * per, ck.fw.numpy(out.grad_l) * per
    return _central_differences(ck, arrays, beta, counts)


def _central_differences(ck, arrays, beta, counts=None, step=1e-6):
    """Central differences with a Richardson step, R(e) = (4 D(e/2) - D(e)) / 3 (error O(e^4) times the
    fifth derivative), e = step, step/4, ... until two agree (to 1e-6 and the rounding level): a
    sharply curved loss (AlphaPO's power reward at low log-probs varies on a scale of 1e-6 in the
    log-prob) gets a smaller step, a smooth one keeps the first."""
    def total(a):
        return float(np.sum(ck.run(*a, beta, counts=counts)[1]))

    def diff(j, i, e):
        up = [a.copy() for a in arrays]
        dn = [a.copy() for a in arrays]
        up[j][i] += e
        dn[j][i] -= e
        return (total(up) - total(dn)) / (2 * e)

    size = max(1.0, abs(total(arrays)))  # a difference quotient at step e rounds to about 1e-16 * size / e
    grads = []
    for j in (0, 1):
        g = np.zeros(len(arrays[j]), dtype=np.float64)
        for i in range(len(arrays[j])):
            e, prev = step, None
            for _ in range(6):
                est = (4.0 * diff(j, i, e / 2) - diff(j, i, e)) / 3.0
                if prev is not None and abs(est - prev) <= 1e-6 * abs(est) + 1e-14 * size / e:
                    est = prev  # the larger step agrees: keep it (less rounding)
                    break
                prev, e = est, e / 4
            g[i] = est
        grads.append(g)
    return grads


def _prop_at_reference(ck):
    at_h0 = _closed_form(ck, 0.0, 1.0)[0]  # depends on beta for IPO only

    def check(c):
        n = len(c["pw"])
        if ck.variant in _WRITTEN_OUT and ck.plain:
            want_each = np.full(n, (1 / (4 * c["beta"] ** 2)) if ck.variant == "ipo" else at_h0, dtype=np.float64)
        else:  # the row's value at one canonical pi = pi_ref, which every other pi = pi_ref must share
            canon = np.full(n, -1.0, dtype=np.float64)
            want_each = _oracle(ck, canon, canon, canon, canon, c["beta"]).losses
        got = ck.loss_of(dict(c, rw=c["pw"].copy(), rl=c["pl"].copy()))
        label = ("ln 2 = 0.6931" if ck.variant in ("dpo", "cdpo", "robust") else "1/(4 beta^2)" if ck.variant == "ipo"
                 else "1" if ck.variant == "hinge" else f"{float(np.ravel(want_each)[0]):.6g}")
        ck.expect(got, ck.reduce(want_each), f"at policy = reference (h = 0) the loss should be {label} per pair", 1e-9, 1e-12)

    return check, ck.strategy()


def _prop_margin_only(ck):
    from hypothesis import strategies as st

    shifts = st.floats(-20.0, 20.0, allow_nan=False)

    def extra(draw, n):  # three shifts per pair (the fourth follows), each pair its own
        return {"shift": [draw(shifts) for _ in range(3 * n)]}

    def check(c):
        n = len(c["pw"])
        s1, s2, s3 = (np.array(c["shift"][k * n:(k + 1) * n], dtype=np.float64) for k in range(3))
        s4 = s2 + s3 - s1  # keeps h = (pw - rw) - (pl - rl) unchanged
        base = ck.loss_of(c)
        moved = ck.loss_of(dict(c, pw=c["pw"] + s1, pl=c["pl"] + s2, rw=c["rw"] + s3, rl=c["rl"] + s4))
        ck.same(moved, base, "adding shift = (s1, s2, s3) to log pi_w, log pi_l, log ref_w and s2 + s3 - s1 to "
                "log ref_l leaves h unchanged but changed the loss",
                labels=("shifted", "unshifted (the function's own value)"))

    return check, ck.strategy(extra=extra)


def _prop_prompt_shift(ck):
    """Eq. 5-6: the implicit reward is the true one up to beta log Z(x), a shift per prompt; a loss
    built on differences of rewards of one prompt does not see it. Each pair's two policy log-probs
    move by one drawn s (its own per pair)."""
    from hypothesis import strategies as st

    def extra(draw, n):
        return {"shift": [draw(st.floats(-20.0, 20.0, allow_nan=False)) for _ in range(n)]}

    def check(c):
        s = np.array(c["shift"], dtype=np.float64)
        base = ck.loss_of(c)
        moved = ck.loss_of(dict(c, pw=c["pw"] + s, pl=c["pl"] + s))
        ck.same(moved, base, "moving log pi(y_w|x) and log pi(y_l|x) by one s(x) per pair changed the loss")

    return check, ck.strategy(extra=extra)


def _prop_swap(ck):
    """Swapping chosen and rejected equals negating both log-ratios: L(r, c) = L(-c, -r) with
    c = log pi_w - log ref_w, r = log pi_l - log ref_l (the loss treats raising y_w and lowering y_l
    alike; for a loss of h both sides are L(-h))."""

    def check(c):
        swapped = ck.loss_of(_swap(c))
        flipped = ck.loss_of(dict(c, pw=2.0 * c["rw"] - c["pw"], pl=2.0 * c["rl"] - c["pl"]))
        ck.same(swapped, flipped, "swapping chosen and rejected should equal negating both log-ratios, L(r, c) = L(-c, -r)")

    return check, ck.strategy()


def _prop_beta_scaling(ck):
    from hypothesis import strategies as st

    def extra(draw, n):
        return {"k": draw(st.sampled_from((2.0, 4.0, 10.0)))}

    power = _BETA_POWER.get(_loss_name(ck.variant), 0)

    def check(c):
        k = c["k"]
        base = ck.loss_of(c)
        # beta -> k beta, h -> h / k: the policy's log-ratios divided by k, the reference kept (and an input
        # in log-ratio units, KTO's z0, divided by k; one in reward units kept)
        scaled = dict(c, beta=k * c["beta"], pw=c["rw"] + (c["pw"] - c["rw"]) / k, pl=c["rl"] + (c["pl"] - c["rl"]) / k)
        inputs = {n: (v / k if ck.input_units[n] == "log-ratio" else v) for n, v in ck.inputs.items()}
        got = ck.loss_of(scaled, inputs=inputs)
        if power:  # IPO: (h - 1/(2 beta))^2 = (beta h - 1/2)^2 / beta^2: beta^2 L depends on beta h only
            got = got * k ** power
        what = ("beta -> k*beta with h -> h/k should leave the loss unchanged" if not power else
                f"beta -> k*beta with h -> h/k should scale the loss by 1/k^{power}")
        ck.same(got, base, what, labels=("scaled" + (f" x k^{power}" if power else ""),
                                          "unscaled (the function's own value)"))

    return check, ck.strategy(extra=extra)


def _tolerance(dtype: str, c, out_ref):
    """Forward-error allowance for a loss computed in `dtype` from inputs rounded to it."""
    eps = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[dtype]
    size = max(float(np.max(np.abs(c[k]))) for k in ("pw", "pl", "rw", "rl"))
    slope = float(np.max(np.abs(c["beta"] * out_ref.gradient_weight))) if len(out_ref.gradient_weight) else 1.0
    atol = 64 * eps * (size * max(slope, 1e-3) + 1.0)
    return max(64 * eps, 1e-10), atol


def _prop_agrees(ck):
    def check(c):
        for dtype in ("float64", "float32"):
            r = [ck.fw.numpy(ck.fw.tensor(c[k], dtype)) for k in ("pw", "pl", "rw", "rl")]  # inputs as rounded
            ref = _oracle(ck, *r, c["beta"])
            _, got = ck.run(*r, c["beta"], dtype=dtype)
            rtol, atol = _tolerance(dtype, c, ref)
            if ck.reduction == "sum":
                atol *= len(c["pw"])
            ck.expect(got, ck.reduce(ref.losses), f"{dtype} loss differs from minidpo's {ck.variant}", rtol, atol)

    return check, ck.strategy()


def _prop_rewards(ck):
    if ck.conventions.get("rewards") == "not reported":
        return None

    def check(c):
        out, _ = ck.run(c["pw"], c["pl"], c["rw"], c["rl"], c["beta"])
        rw, rl = ck.fw.numpy(out.chosen_rewards), ck.fw.numpy(out.rejected_rewards)
        ref_w, ref_l = (c["rw"], c["rl"]) if ck.row.needs_reference(ck.options) else (0.0 * c["rw"], 0.0 * c["rl"])
        what = "" if ck.row.needs_reference(ck.options) else " (no reference: log pi_ref = 0)"
        ck.expect(rw, c["beta"] * (c["pw"] - ref_w), "chosen reward should be beta (log pi_w - log ref_w)" + what, 1e-9, 1e-12)
        ck.expect(rl, c["beta"] * (c["pl"] - ref_l), "rejected reward should be beta (log pi_l - log ref_l)" + what, 1e-9, 1e-12)
        if ck.fw.name == "torch":
            t = [ck.fw.tensor(c[k], requires_grad=True) for k in ("pw", "pl", "rw", "rl")]
            o = _parse(ck.call(*t, c["beta"]))
            if ck.fw.carries_gradient(o.chosen_rewards) or ck.fw.carries_gradient(o.rejected_rewards):
                raise _Broken("the rewards carry gradient (they are metrics: detach them)")
        elif ck.fw.name == "jax":
            g = ck.fw.reward_gradient(lambda *a: ck.call(*a, c["beta"]), [c[k] for k in ("pw", "pl", "rw", "rl")])
            if g != 0.0:
                raise _Broken(f"the rewards carry gradient (|d reward / d log pi| = {g:.3g}; use stop_gradient)")

    return check, ck.strategy()


def _prop_gradient(ck):
    def check(c):
        arrays = [c[k] for k in ("pw", "pl", "rw", "rl")]
        ref = _oracle(ck, *arrays, c["beta"])
        from hypothesis import assume

        if ck.variant == "hinge":  # no derivative at the kink beta h = 1
            assume(bool(np.all(np.abs(c["beta"] * ref.log_ratio_margin - 1.0) > 1e-3)))
        if ck.coupled:  # AOT's sort has no derivative where two sorted values tie
            for v in (c["pw"] - c["pl"], c["rw"] - c["rl"], c["pw"] - c["rw"], c["pl"] - c["rl"]):
                assume(bool(np.all(np.diff(np.sort(v)) > 1e-3)))
        n = len(c["pw"])
        per = 1.0 / n if ck.reduction == "mean" else 1.0
        want_w, want_l = n * ref.grad_policy_chosen_logps * per, n * ref.grad_policy_rejected_logps * per
        if ck.fw.autograd:
            _, g = ck.fw.grads(lambda *t: ck.call(*t, c["beta"]), arrays)
            gw, gl = g[0], g[1]
            rtol, atol = 1e-7, 1e-12
            ref_g = float(np.max(np.abs(np.concatenate([g[2], g[3]]))))  # for the "reference gets no gradient" row
            if not ref_g <= ck.ref_grad[0]:  # (nan counts as reaching the reference)
                ck.ref_grad = (ref_g, _case_str(c))
        else:
            gw, gl = _policy_grads(ck, arrays, c["beta"])
            rtol, atol = 1e-5, 1e-8 * max(1.0, float(np.max(np.abs(ref.losses))))
        margin = ck.row.margin is not None and ck.options.get("f_divergence", "reverse_kl") == "reverse_kl"
        ww, wl = ("-beta * weight", "+beta * weight") if margin else ("minidpo's", "minidpo's")
        ck.expect(gw, want_w, f"d loss / d log pi_w should be {ww}" + (" / N" if per != 1.0 else ""), rtol, atol)
        ck.expect(gl, want_l, f"d loss / d log pi_l should be {wl}" + (" / N" if per != 1.0 else ""), rtol, atol)

    return check, ck.strategy()


def _prop_reference_constant(ck, ran_gradient):
    """Eq. 9 has no reference term: pi_ref is frozen. The gradient property passes reference inputs
    that require grad (as they would if computed with autograd on) and records what reaches them."""
    if not ck.fw.autograd:
        return "skip", "NumPy arrays carry no gradient", ""
    if not ran_gradient:
        return "skip", "runs with the gradient (eq. 9) property", ""
    g, case = ck.ref_grad
    if ck.ref_grad == (0.0, ""):
        ck.conventions["reference gradient"] = "none: the loss treats the reference as a constant"
        return "pass", "the loss detaches the reference log-probs", ""
    ck.conventions["reference gradient"] = "flows to reference inputs that require grad (compute them under no_grad / stop_gradient)"
    if ck.strict_ref:
        return "FAIL", f"gradient reaches the reference log-probs (max |d loss / d log ref| = {g:.3g}); correct 0", case
    return "note", "gradient reaches reference inputs that require grad; fine when the caller computes them without autograd", ""


def _swap(c):
    return dict(c, pw=c["pl"], pl=c["pw"], rw=c["rl"], rl=c["rw"])


def _prop_dpo_law(ck):
    def check(c):
        h = (c["pw"] - c["rw"]) - (c["pl"] - c["rl"])
        diff = ck.loss_of(c) - ck.loss_of(_swap(c))  # swapping chosen and rejected negates h
        scale = 1e-9 * max(1.0, float(np.max(np.abs(c["beta"] * h))))
        ck.expect(diff, ck.reduce(-c["beta"] * h), "L(h) - L(-h) should be -beta h (eq. 7: log sigma(z) - log sigma(-z) = z)", 1e-8, scale)

    return check, ck.strategy()


def _prop_cdpo_mixture(ck):
    def check(c):
        got = ck.loss_of(c)
        want = (1 - ck.eps) * ck.loss_of(c, eps=0.0) + ck.eps * ck.loss_of(_swap(c), eps=0.0)
        ck.expect(got, want, f"cDPO(eps={ck.eps:g}) should be (1 - eps) DPO(pair) + eps DPO(swapped pair)", 1e-8, 1e-10,
                  labels=("got", "the mixture of the function's own eps = 0 values"))

    return check, ck.strategy()


def _prop_cdpo_half(ck):
    def check(c):
        c0 = dict(c, pw=c["rw"] + (c["pl"] - c["rl"]))  # h = 0 with the same reference and rejected side
        plus, minus, zero = ck.loss_of(c, eps=0.5), ck.loss_of(_swap(c), eps=0.5), ck.loss_of(c0, eps=0.5)
        if not ck.close(minus, plus, 1e-9, 1e-12):
            raise _Broken(f"at label smoothing 0.5 the loss should be symmetric: L(-h) = {_fmt(minus)} but L(h) = {_fmt(plus)}")
        if np.any(plus < zero - 1e-12):
            raise _Broken(f"at label smoothing 0.5 the minimum should be at h = 0: L(h) = {_fmt(plus)} < L(0) = {_fmt(zero)}")

    return check, ck.strategy()


def _prop_robust(ck):
    def check(c):
        h = (c["pw"] - c["rw"]) - (c["pl"] - c["rl"])
        mixed = (1 - ck.eps) * ck.loss_of(c) + ck.eps * ck.loss_of(_swap(c))
        clean = -log_sigmoid(c["beta"] * h)  # the loss on clean labels, eq. (7)
        ck.expect(mixed, ck.reduce(clean), f"(1 - eps) L(h) + eps L(-h) should equal the clean -log sigma(beta h) (eps={ck.eps:g})", 1e-8, 1e-10)

    return check, ck.strategy()


def _prop_ipo_minimum(ck):
    from hypothesis import strategies as st

    def extra(draw, n):
        return {"delta": draw(st.sampled_from((0.25, 1.0, 3.0)))}

    def check(c):
        h = (c["pw"] - c["rw"]) - (c["pl"] - c["rl"])
        target = 1.0 / (2.0 * c["beta"])
        at = dict(c, pw=c["pw"] + (target - h))  # h = 1/(2 beta) exactly (up to rounding)
        low = ck.loss_of(at)
        ck.expect(low, ck.reduce(np.zeros(len(h), dtype=np.float64)), "at h = 1/(2 beta) the IPO loss should be 0", 0.0, 1e-9 * (1 + target))
        for d in (c["delta"], -c["delta"]):
            near = ck.loss_of(dict(at, pw=at["pw"] + d))
            if np.any(np.asarray(near) <= np.asarray(low)):
                raise _Broken(f"the IPO loss at h = 1/(2 beta) {d:+g} ({_fmt(near)}) is not above its value at 1/(2 beta) ({_fmt(low)})")

    return check, ck.strategy(extra=extra)


def _prop_logp_convention(ck):
    """With token counts n_w, n_l the function may score responses by summed log-probs or by their
    per-token means (log pi / n). Eq. 7 and its sigmoid/robust/hinge relatives use sums; IPO is
    defined on sums in its paper and fed per-token means by the official DPO code and TRL."""
    if not ck.takes_counts:
        if ck.variant == "ipo":
            ck.conventions["IPO log-probs"] = ("chosen by the caller (the function takes no token counts): the official "
                                               "DPO code and TRL pass per-token means, the IPO paper sums")
        return None
    from hypothesis import strategies as st

    def extra(draw, n):
        cnt = st.integers(1, 50)
        return {"counts_w": [draw(cnt) for _ in range(n)], "counts_l": [draw(cnt) for _ in range(n)]}

    found = set()

    def check(c):
        nw, nl = np.array(c["counts_w"], dtype=np.float64), np.array(c["counts_l"], dtype=np.float64)
        got = ck.loss_of(c, counts=(nw, nl))
        summed = ck.reduce(_oracle(ck, c["pw"], c["pl"], c["rw"], c["rl"], c["beta"], counts=(nw, nl)).losses)
        per_tok = ck.reduce(_oracle(ck, c["pw"] / nw, c["pl"] / nl, c["rw"] / nw, c["rl"] / nl, c["beta"]).losses)
        tol = 1e-9 * max(1.0, float(np.max(np.abs(summed))))
        conv = [name for name, want in (("summed", summed), ("per_token", per_tok)) if ck.close(got, want, 1e-8, tol)]
        if not conv:
            raise _Broken(f"the loss {_fmt(got)} is {ck.variant} of neither the summed log-probs ({_fmt(summed)}) "
                          f"nor the per-token means ({_fmt(per_tok)})")
        if len(conv) == 1:
            found.add(conv[0])
            if not ck.row.average_logps and conv[0] == "per_token":
                raise _Broken(f"the loss averages log-probs over tokens (a mean where eq. 7's sum log pi(y|x) is meant): "
                              f"got {_fmt(got)}, correct {_fmt(summed)}")
        if len(found) > 1:
            raise _Broken("the loss follows the summed convention for some inputs and the per-token one for others")
        if ck.want_ipo and len(conv) == 1 and conv[0] != ck.want_ipo:
            raise _Broken(f"the loss uses {conv[0]} log-probs, expected {ck.want_ipo}")

    def after():
        if found:
            ck.conventions["log-probs"] = next(iter(found)).replace("_", "-") + " (detected from the token counts)"

    return check, ck.strategy(extra=extra), after


def _prop_hinge(ck):
    from hypothesis import strategies as st

    def extra(draw, n):
        return {"delta": draw(st.sampled_from((0.5, 0.01, 2.0, 10.0)))}

    def check(c):
        h = (c["pw"] - c["rw"]) - (c["pl"] - c["rl"])
        for target_z in (1.0 + c["delta"], 1.0 - c["delta"]):
            at = dict(c, pw=c["pw"] + (target_z / c["beta"] - h))
            got = ck.loss_of(at)
            want = max(0.0, 1.0 - target_z)
            ck.expect(got, ck.reduce(np.full(len(h), want, dtype=np.float64)),
                      f"at beta h = {target_z:g} the hinge loss should be max(0, 1 - beta h) = {want:g}", 1e-8, 1e-9)

    return check, ck.strategy(extra=extra)


def _dtype_limits(fw, dtype: str) -> float:
    if fw.name == "torch":
        return float(fw.torch.finfo(getattr(fw.torch, dtype)).max)
    if fw.name == "jax":
        return float(fw.jnp.finfo(getattr(fw.jnp, dtype)).max)
    return float(np.finfo(np.dtype(dtype)).max)


def _prop_numerics(ck):
    """Grid, not hypothesis: margins +-1 .. +-1e4 and +-1e-4 * (the dtype's max) at beta 1 and 0.1,
    in every floating dtype; a margin whose correct loss does not fit the dtype (IPO's square) is skipped."""
    dtypes = ("float64",) + ck.fw.low_precision
    checked = []
    for dtype in dtypes:
        big = _dtype_limits(ck.fw, dtype)
        rel = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 0.05, "float16": 0.02}[dtype]
        for beta in (1.0, 0.1):
            for m in LARGE_MARGINS + (big * 1e-4,):
                for sign in (1.0, -1.0):
                    h = sign * m
                    pw, pl = np.array([-1.0 if h > 0 else -1.0 + h]), np.array([-1.0 - h if h > 0 else -1.0])
                    rw = rl = np.array([-1.0])
                    with _quiet():  # IPO's square overflows at the dtype's range: that margin is skipped below
                        ref = _oracle(ck, pw, pl, rw, rl, beta)
                    if not np.all(np.abs(ref.losses) < min(big / 16, _SATURATED)):  # the correct value does not fit
                        continue
                    case = _case_str(dict(pw=pw, pl=pl, rw=rw, rl=rl, beta=beta)) + f" dtype={dtype}"
                    try:
                        with _x64(ck.fw), _quiet():
                            out, got = ck.run(pw, pl, rw, rl, beta, dtype=dtype)
                            dt = ck.fw.dtype_name(out.loss)
                            if dt != dtype:
                                return "FAIL", f"{dtype} inputs gave a {dt} loss (no silent dtype change)", case
                            if not np.all(np.isfinite(got)):
                                return "FAIL", f"non-finite loss {_fmt(got)} at beta h = {beta * h:g}; correct {_fmt(ref.losses)}", case
                            want = float(ref.losses[0])
                            if abs(float(np.ravel(got)[0]) - want) > rel * max(1.0, abs(want)):
                                return "FAIL", f"loss {_fmt(got)} at beta h = {beta * h:g} in {dtype}; correct {want:.6g}", case
                            if ck.fw.autograd:
                                _, g = ck.fw.grads(lambda *t: ck.call(*t, beta), [pw, pl, rw, rl], dtype=dtype)
                                gw = g[0]
                            elif out.grad_w is not None:
                                gw = ck.fw.numpy(out.grad_w)
                            else:
                                gw = None
                            if gw is not None:
                                if not np.all(np.isfinite(gw)):
                                    return "FAIL", f"non-finite gradient {_fmt(gw)} at beta h = {beta * h:g} in {dtype}", case
                                gwant = float(ref.grad_policy_chosen_logps[0])  # N = 1: the pair's own derivative
                                # weights below the dtype's epsilon may round to 0 (harmless next to weights near 1)
                                unit = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}[dtype]
                                if ck.variant != "hinge" and abs(float(gw[0]) - gwant) > rel * abs(gwant) + beta * unit:
                                    return "FAIL", f"gradient {_fmt(gw)} at beta h = {beta * h:g} in {dtype}; correct {gwant:.6g}", case
                    except Exception as err:
                        return "FAIL", f"raised {type(err).__name__}: {err}", case
        checked.append(dtype)
    hand = ck.conventions.get("gradients", "").startswith("hand-written")
    how = "autograd" if ck.fw.autograd else "values" + (" and hand-written gradients" if hand else "")
    return "pass", f"finite and correct for |h| from 1 to 1e4 and to 1e-4 of the range in {', '.join(checked)} ({how})", ""


_CHECKS = {
    "value at the reference": _prop_at_reference,
    "margin only (Z(x) shift)": _prop_margin_only,
    "beta only through beta*h": _prop_beta_scaling,
    "agrees with minidpo": _prop_agrees,
    "rewards (eq. 8)": _prop_rewards,
    "gradient (eq. 9)": _prop_gradient,
    "per-prompt shift (eq. 5-6)": _prop_prompt_shift,
    "swap = flipped log-ratios": _prop_swap,
    "DPO: L(h) - L(-h) = -beta*h": _prop_dpo_law,
    "cDPO: label-mixture law": _prop_cdpo_mixture,
    "cDPO at 0.5: symmetric, min at h = 0": _prop_cdpo_half,
    "robust: unbiased under label flips": _prop_robust,
    "IPO: minimum at h = 1/(2 beta)": _prop_ipo_minimum,
    "log-probs: summed or per-token": _prop_logp_convention,
    "hinge: zero for beta*h >= 1": _prop_hinge,
}


# ----------------------------------------------------------------------------------------------
# conventions, detected once on a probe batch


_PROBE = dict(pw=np.array([-30.0, -12.0, -50.0]), pl=np.array([-35.0, -10.0, -44.0]),
              rw=np.array([-34.0, -11.0, -47.0]), rl=np.array([-31.0, -13.0, -45.0]), beta=0.5)


def _detect(ck) -> str | None:
    """Fill ck.reduction and ck.conventions from one call; return an error line if the call fails."""
    p = _PROBE
    try:
        with _x64(ck.fw), _quiet():
            out, got = ck.run(p["pw"], p["pl"], p["rw"], p["rl"], p["beta"])
    except Exception as err:
        return f"calling the function raised {type(err).__name__}: {err}"
    per = _oracle(ck, p["pw"], p["pl"], p["rw"], p["rl"], p["beta"]).losses
    got = np.asarray(got)
    if got.ndim == 1 and got.shape[0] == len(per):
        ck.reduction, how = "none", "per-pair losses (N,)"
    elif got.size == 1:
        v = float(got.ravel()[0])
        if math.isclose(v, float(np.sum(per)), rel_tol=1e-6) and not math.isclose(v, float(np.mean(per)), rel_tol=1e-6):
            ck.reduction, how = "sum", "the sum over the batch (a scalar)"
        elif math.isclose(v, float(np.mean(per)), rel_tol=1e-6):
            ck.reduction, how = "mean", "the mean over the batch (a scalar)"
        else:
            ck.reduction, how = "mean", "a scalar that is neither the mean nor the sum of the correct losses (mean assumed)"
    else:
        return f"the loss has shape {tuple(got.shape)}; expected ({len(per)},) per-pair losses or a scalar"
    ck.conventions["loss returned"] = how
    if out.chosen_rewards is None or out.rejected_rewards is None:
        ck.conventions["rewards"] = "not reported"
    else:
        ck.conventions["rewards"] = "reported (checked against eq. 8)"
    if ck.fw.name == "numpy":
        ck.conventions["gradients"] = ("hand-written (checked)" if out.grad_w is not None and out.grad_l is not None
                                       else "central differences in float64")
    return None


# ----------------------------------------------------------------------------------------------
# the API


def check_loss(fn: Callable, framework: str | None = None, variant: str = "dpo", *, label_smoothing: float = 0.1,
               kwargs: dict | None = None, max_examples: int = 25, reduction: str | None = None,
               ipo_convention: str | None = None, require_detached_reference: bool = False,
               properties=None, gate_identities: bool = True) -> Report:
    """Check a DPO loss function against the paper's properties; see the module docstring.

    Args:
        fn: the loss, called as fn(pi_w, pi_l, ref_w, ref_l, beta, **hyper_parameters) with (N,)
            arrays of `framework` (module docstring: what it may return).
        framework: "numpy", "torch" or "jax" (raises FrameworkUnavailable if not installed);
            None: :func:`detect_framework` reads it from the function's module.
        variant: "dpo" (eq. 7), "cdpo" (label-smoothed eq. 7), or the name of any other loss of
            losses.LOSS_TABLE ("robust", "ipo", "hinge", ...; :func:`variants`).
        label_smoothing: eps for "cdpo" and the losses with that option ("robust"), passed as
            label_smoothing=eps.
        kwargs: fixed keyword arguments for every call (e.g. {"ipo": True}).
        max_examples: hypothesis examples per property (derandomized: the same every run).
        reduction: None to accept per-pair, mean or sum; "none", "mean" or "sum" to require one.
        ipo_convention: None to report it; "summed" or "per_token" to require one (functions
            taking chosen_token_counts/rejected_token_counts only).
        require_detached_reference: fail if gradient reaches the reference inputs when they
            require grad (by default that is reported: correct when the caller uses no_grad).
        properties: an iterable of property names to run (default: all that apply).
        gate_identities: run one of the paper's identities (IDENTITIES) only where minidpo's own loss
            of the variant has it (else it is reported as a skip naming why); False runs them all.
    Returns:
        Report (``.ok``, ``.failed``, ``.table()``, ``.conventions``).
    """
    if variant == "sigmoid":
        variant = "dpo"
    if variant not in variants():
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(variants())}")
    if variant == "cdpo" and not 0.0 < float(label_smoothing) <= 0.5:
        raise ValueError(f"cdpo needs label_smoothing in (0, 0.5], got {label_smoothing!r}")
    if variant == "robust" and not 0.0 <= float(label_smoothing) < 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {label_smoothing!r}")
    if reduction not in (None, "none", "mean", "sum"):
        raise ValueError(f"reduction must be None, 'none', 'mean' or 'sum', got {reduction!r}")
    if ipo_convention not in (None, "summed", "per_token"):
        raise ValueError(f"ipo_convention must be None, 'summed' or 'per_token', got {ipo_convention!r}")
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise RuntimeError("minidpo verify needs hypothesis: pip install 'minidpo[verify]'") from None
    framework = framework if framework is not None else detect_framework(fn)
    fw = _framework(framework)
    ck = _Checker(fn, fw, variant, label_smoothing, kwargs, max_examples, reduction, ipo_convention,
                  require_detached_reference)
    name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    report = Report(name, framework, variant)
    wanted = [p for p, vs in PROPERTIES.items()
              if (vs in (ALL, IDENTITY) or variant in vs) and (properties is None or p in properties)]
    if properties is not None:
        unknown = set(properties) - set(PROPERTIES)
        if unknown:
            raise ValueError(f"unknown properties: {', '.join(sorted(unknown))}")

    err = _detect(ck)
    if err is not None:
        report.results = [PropertyResult(p, "FAIL", err, _case_str(_PROBE)) for p in wanted]
        return report
    if reduction is not None and ck.reduction != reduction:
        report.results.append(PropertyResult("reduction", "FAIL", f"the loss returned is {ck.conventions['loss returned']}; "
                                             f"expected reduction {reduction!r}"))

    for prop in wanted:
        if PROPERTIES[prop] == IDENTITY and gate_identities:
            held, why = _minidpo_has(ck, prop)
            if not held:
                report.results.append(PropertyResult(prop, "skip", f"not a property of {variant}: minidpo's own "
                                                      f"{_loss_name(variant)} breaks it ({why})"))
                continue
        if PROPERTIES[prop] not in (ALL, IDENTITY) and not ck.plain:
            report.results.append(PropertyResult(prop, "skip", f"a law of plain {variant}; f_divergence="
                                                 f"{ck.options['f_divergence']} replaces its log-ratios"))
            continue
        if prop == "worked example":
            report.results.append(PropertyResult(prop, *_prop_worked_example(ck)))
            continue
        if prop == "reference gets no gradient":
            report.results.append(PropertyResult(prop, *_prop_reference_constant(ck, "gradient (eq. 9)" in wanted)))
            continue
        if prop == "numerics (large margins, dtypes)":
            report.results.append(PropertyResult(prop, *_prop_numerics(ck)))
            continue
        made = _CHECKS[prop](ck)
        if made is None:
            why = "the function reports no rewards" if prop.startswith("rewards") else "the function takes no token counts"
            report.results.append(PropertyResult(prop, "skip", why))
            continue
        check, strategy, *after = made
        found = ck.hypothesis(strategy, check)
        for f in after:
            f()
        if found is None:
            report.results.append(PropertyResult(prop, "pass", f"{ck.max_examples} drawn examples"))
        elif found[1] is None:
            report.results.append(PropertyResult(prop, "skip", found[0]))
        else:
            report.results.append(PropertyResult(prop, "FAIL", found[0], _case_str(found[1])))
    report.conventions = dict(ck.conventions)
    return report


_HAS_CACHE: dict = {}


def _minidpo_has(ck, prop: str) -> tuple[bool, str]:
    """Whether minidpo's own loss of the claimed variant (its options, label smoothing and inputs as
    given) has the identity ``prop``: (True, "") or (False, the one-line counterexample). Cached."""
    key = (ck.variant, ck.eps, repr(sorted(ck.options.items())), repr(sorted(ck.inputs.items())), prop, ck.max_examples)
    if key not in _HAS_CACHE:
        name = _loss_name(ck.variant)
        own = _Checker(minidpo_function(name), _Numpy(), ck.variant, ck.eps, {**ck.options, **ck.inputs},
                       ck.max_examples, None, None, False)
        own.conventions["rewards"] = "reported"
        if prop == "value at the reference":
            made = _prop_at_reference(own)
        else:
            made = _CHECKS[prop](own)
        check, strategy = made[0], made[1]
        found = own.hypothesis(strategy, check)
        _HAS_CACHE[key] = (True, "") if found is None else (False, found[0])
    return _HAS_CACHE[key]


def check_identity(fn: Callable, identity: str, framework: str = "numpy", variant: str = "dpo", **kw) -> PropertyResult:
    """One of the paper's identities (IDENTITIES) on ``fn``, whether or not the claimed loss has it:
    the PropertyResult ("pass", or "FAIL" with the broken equation's numbers and hypothesis's shrunk
    counterexample). ``kw``: as check_loss's."""
    if identity not in IDENTITIES:
        raise ValueError(f"unknown identity {identity!r}; choose one of {', '.join(IDENTITIES)}")
    return check_loss(fn, framework, variant, properties=(identity,), gate_identities=False, **kw).result(identity)


def load_function(spec: str) -> Callable:
    """'package.module:function' (or 'path/to/file.py:function') -> the function. A module that
    fails to import (a syntax error, an exception while it runs) raises ImportError naming why."""
    if ":" not in spec:
        raise ValueError(f"expected MODULE:FUNCTION, got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py") and not Path(mod_name).is_file():
        raise FileNotFoundError(f"{mod_name}: no such file")
    try:
        if mod_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(mod_name).stem, Path(mod_name))
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:  # MODULE is looked up from the current directory too
                sys.path.insert(0, "")
            module = importlib.import_module(mod_name)
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's module failed while it ran
        raise ImportError(f"{type(err).__name__}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj
