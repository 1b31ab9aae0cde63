"""AdamW, global gradient-norm clipping and the learning-rate schedule.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), for each tensor p with
gradient g at step t = 1, 2, ...:

    m_t   = beta1 m_{t-1} + (1 - beta1) g                 first moment
    v_t   = beta2 v_{t-1} + (1 - beta2) g^2               second moment
    m_hat = m_t / (1 - beta1^t),  v_hat = v_t / (1 - beta2^t)       bias corrections
    p    <- p - lr (m_hat / (sqrt(v_hat) + eps) + wd p)   (A)

The decay term wd p is *decoupled*: it is not folded into g, so it is not rescaled by
1/sqrt(v_hat). (A) is what torch.optim.AdamW computes (it writes it as p *= 1 - lr wd, then the
Adam step), and tests/test_optim.py checks the two agree.

Device rules: the array module comes from the arrays (NumPy or CuPy); scalars are Python floats
computed on the host from the integer step count, so ``step`` never waits for the GPU. On CuPy
all tensors are updated by one fused kernel launch (kernels.adamw_multi_tensor: moments and
parameter in one pass); on NumPy the same lines run as array code, tensor by tensor (the
kernel's twin, compared in a CUDA test). Moments have the parameter's dtype: float32 parameters
keep float32 moments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from . import fast, kernels
from . import runtime as rt
from .backend import get_array_module

SCALAR_KEYS = ("step", "lr", "beta1", "beta2", "eps", "weight_decay")


def default_decay_filter(name: str, param) -> bool:
    """Decay matrices and embeddings (ndim >= 2); not biases or layernorm gains (ndim 1)."""
    return param.ndim >= 2


class AdamW:
    """AdamW over a flat dict of named arrays.

    Args:
        params: {name: float array}; the moments get each array's shape, dtype and device.
        lr: default learning rate (``step(..., lr=...)`` overrides it per step, for schedules).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to sqrt(v_hat), > 0.
        weight_decay: wd in (A), >= 0, applied only where ``decay_filter`` says so.
        decay_filter: ``f(name, array) -> bool``; default :func:`default_decay_filter`.

    State (see :meth:`state_dict`): ``m``, ``v`` dicts of arrays and the step count ``t``.
    """

    def __init__(
        self,
        params: Mapping[str, object],
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_filter: Callable[[str, object], bool] | None = None,
    ):
        if not params:
            raise ValueError("AdamW needs at least one parameter")
        check_hparams(lr, betas, eps, weight_decay)
        self.lr = float(lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decay_filter = decay_filter or default_decay_filter
        self.t = 0
        self.m: dict[str, object] = {}
        self.v: dict[str, object] = {}
        self.decay: dict[str, bool] = {}
        for name, p in params.items():
            if p.dtype.kind != "f":
                raise TypeError(f"parameter {name!r} has dtype {p.dtype}; AdamW updates floating arrays only")
            xp = get_array_module(p)
            self.m[name] = xp.zeros(p.shape, dtype=p.dtype)
            self.v[name] = xp.zeros(p.shape, dtype=p.dtype)
            self.decay[name] = bool(self.decay_filter(name, p))

    @property
    def step_count(self) -> int:
        """Number of steps taken (t in the bias corrections of the last step)."""
        return self.t

    def step(self, params: Mapping[str, object], grads: Mapping[str, object], lr: float | None = None) -> None:
        """One AdamW step (A), updating every ``params[name]`` IN PLACE (same array, same dtype).

        Args:
            params: {name: array}, the names given at construction.
            grads: {name: array} of the same shapes and dtypes (dL/dp, unscaled).
            lr: this step's learning rate (e.g. from :func:`lr_at`); None -> ``self.lr``.
        """
        if set(params) != set(self.m) or set(grads) != set(self.m):
            missing = sorted((set(self.m) - set(params)) | (set(self.m) - set(grads)))
            unknown = sorted((set(params) | set(grads)) - set(self.m))
            raise KeyError(f"AdamW.step: params/grads must have exactly the optimizer's names; "
                           f"missing {missing[:5]}, unknown {unknown[:5]}")
        lr = self.lr if lr is None else float(lr)
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"lr must be finite and >= 0, got {lr}")
        for name, m in self.m.items():  # check everything first: a bad entry updates nothing
            p, g = params[name], grads[name]
            if p.shape != m.shape or g.shape != m.shape:
                raise ValueError(f"AdamW.step: {name!r} has param {p.shape}, grad {g.shape}, "
                                 f"expected {m.shape}")
            if p.dtype != m.dtype or g.dtype != m.dtype:
                raise TypeError(f"AdamW.step: {name!r} has param {p.dtype}, grad {g.dtype}; expected "
                                f"{m.dtype} for both (no silent casts)")
        self.t += 1
        b1, b2, eps, t = self.beta1, self.beta2, self.eps, self.t
        bc1 = 1.0 - b1**t                     # bias corrections, host floats: no device sync
        sqrt_bc2 = math.sqrt(1.0 - b2**t)
        step_size = lr / bc1                  # lr * m_hat = (lr / bc1) * m
        on_gpu: dict = {}
        on_cpu: list = []
        for name, m in self.m.items():
            p, g, v = params[name], grads[name], self.v[name]
            if kernels.use(p):  # CuPy: collected here, updated below in one launch per dtype
                on_gpu.setdefault(p.dtype, []).append(name)
                continue
            lr_wd = lr * self.weight_decay if self.decay[name] else 0.0
            if isinstance(p, np.ndarray) and not fast.is_plain():  # NumPy: below, in blocks
                on_cpu.append((p, g, m, v, lr_wd))
            else:
                adamw_update(p, g, m, v, b1, b2, eps, step_size, sqrt_bc2, lr_wd)
        if on_cpu:
            _adamw_update_blocked(on_cpu, b1, b2, eps, step_size, sqrt_bc2)
        for names in on_gpu.values():  # pragma: no cover - needs a GPU
            kernels.adamw_multi_tensor([params[n] for n in names], [grads[n] for n in names],
                                       [self.m[n] for n in names], [self.v[n] for n in names],
                                       [self.decay[n] for n in names], b1, b2, eps, step_size, sqrt_bc2,
                                       lr * self.weight_decay)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The optimizer's state, shaped for minidpo.checkpoint:

            {"m.<name>": array, "v.<name>": array,     (the moment arrays themselves, not copies)
             "step": int, "lr": float, "beta1": float, "beta2": float, "eps": float,
             "weight_decay": float}

        Array values go to optimizer.safetensors, the JSON-able scalars to trainer_state.json.
        """
        d: dict = {}
        for name in self.m:
            d[f"m.{name}"] = self.m[name]
            d[f"v.{name}"] = self.v[name]
        d.update(step=self.t, lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                 weight_decay=self.weight_decay)
        return d

    def load_state_dict(self, d: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`'s output (arrays may be NumPy or CuPy; they are copied into
        this optimizer's moment arrays, keeping their device and dtype)."""
        missing = [k for k in SCALAR_KEYS if k not in d]
        missing += [f"{c}.{n}" for n in self.m for c in ("m", "v") if f"{c}.{n}" not in d]
        if missing:
            raise KeyError(f"optimizer state is missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        known = set(SCALAR_KEYS) | {f"{c}.{n}" for n in self.m for c in ("m", "v")}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"optimizer state has entries for unknown parameters: {unknown[:8]}")
        for name in self.m:
            for c, store in (("m", self.m), ("v", self.v)):
                src = d[f"{c}.{name}"]
                if tuple(src.shape) != tuple(store[name].shape):
                    raise ValueError(f"optimizer state {c}.{name} has shape {tuple(src.shape)}, "
                                     f"expected {tuple(store[name].shape)}")
        step = int(d["step"])
        if step < 0:
            raise ValueError(f"optimizer state step must be >= 0, got {step}")
        check_hparams(d["lr"], (d["beta1"], d["beta2"]), d["eps"], d["weight_decay"])
        for name in self.m:
            for c, store in (("m", self.m), ("v", self.v)):
                dst = store[name]
                xp = get_array_module(dst)
                dst[...] = xp.asarray(d[f"{c}.{name}"], dtype=dst.dtype)
        self.t = step
        self.lr = float(d["lr"])
        self.beta1, self.beta2 = float(d["beta1"]), float(d["beta2"])
        self.eps = float(d["eps"])
        self.weight_decay = float(d["weight_decay"])


def check_hparams(lr, betas, eps, weight_decay) -> None:
    if not (float(lr) >= 0.0 and math.isfinite(float(lr))):
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def adamw_update(p, g, m, v, b1, b2, eps, step_size, sqrt_bc2, lr_wd) -> None:
    """(A) for one tensor, in place. All scalars are Python floats (weak under NumPy 2: no
    float64 creep); step_size = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t), lr_wd = lr * wd or 0.
    Temporaries: one array the size of p."""
    m *= b1
    m += (1.0 - b1) * g                       # m_t = b1 m + (1 - b1) g
    v *= b2
    v += (1.0 - b2) * (g * g)                 # v_t = b2 v + (1 - b2) g^2
    denom = get_array_module(v).sqrt(v)
    denom /= sqrt_bc2
    denom += eps                              # sqrt(v_hat) + eps
    if lr_wd:
        p *= 1.0 - lr_wd                      # p - lr wd p  (uses p before the Adam term)
    denom = get_array_module(v).divide(m, denom, out=denom)    # m / (sqrt(v_hat) + eps)
    denom *= step_size                        # lr m_hat / (sqrt(v_hat) + eps)
    p -= denom


def _adamw_update_blocked(tensors, b1, b2, eps, step_size, sqrt_bc2) -> None:
    """The fast path of :func:`adamw_update` on NumPy, the same numbers: every tensor
    [(p, g, m, v, lr_wd), ...] cut into flat parts shared among fast's threads, each part updated
    in cache-sized blocks (the one temporary stays in L2). Non-contiguous tensors: whole."""
    work = []
    for p, g, m, v, lr_wd in tensors:
        if not all(a.flags.c_contiguous for a in (p, g, m, v)):
            work.append(((p, g, m, v), slice(None), lr_wd))
            continue
        flat = tuple(a.reshape(-1) for a in (p, g, m, v))  # views
        work += [(flat, s, lr_wd) for s in rt.flat_parts(p.size, np)]

    def run(item):
        arrays, part, lr_wd = item
        if part == slice(None):
            adamw_update(*arrays, b1, b2, eps, step_size, sqrt_bc2, lr_wd)
            return
        for blk in rt.cache_blocks(part.stop - part.start, np):
            s = slice(part.start + blk.start, part.start + blk.stop)
            adamw_update(*(a[s] for a in arrays), b1, b2, eps, step_size, sqrt_bc2, lr_wd)

    rt.parallel_for(run, work)


def _adamw_update_each(params, grads, ms, vs, decay, b1, b2, eps, step_size, sqrt_bc2, lr_wd) -> None:
    """kernels.adamw_multi_tensor's twin: :func:`adamw_update`, tensor by tensor."""
    for p, g, m, v, d in zip(params, grads, ms, vs, decay):
        adamw_update(p, g, m, v, b1, b2, eps, step_size, sqrt_bc2, lr_wd if d else 0.0)


kernels.register_twin("adamw_multi_tensor", _adamw_update_each)


def clip_grad_norm(grads: Mapping[str, object], max_norm: float):
    """Scale all gradients by min(1, max_norm / (||g|| + 1e-6)) where ||g|| is the GLOBAL L2 norm

        ||g|| = sqrt(sum over tensors i, entries j of g_ij^2)

    (the torch.nn.utils.clip_grad_norm_ rule). In place, and without a host sync: the scale is a
    0-d device array, multiplied in even when it is 1 (on NumPy the multiply is skipped then).

    Args:
        grads: {name: array}; arrays of float32 give a float32 norm (no float64 creep).
        max_norm: > 0 (math.inf: only measure).
    Returns:
        the norm BEFORE clipping, a 0-d array on the grads' device, dtype the grads' result type.
        A non-finite norm (overflow, NaN gradient) is returned as is and makes the grads NaN:
        check it when logging.
    """
    if not grads:
        raise ValueError("clip_grad_norm: no gradients given")
    max_norm = float(max_norm)
    if not max_norm > 0.0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    gs = list(grads.values())
    xp = get_array_module(*gs)
    dtype = np.result_type(*[g.dtype for g in gs])
    if dtype.kind != "f":
        raise TypeError(f"clip_grad_norm needs floating gradients, got {dtype}")
    # per-tensor sum of squares as a dot product (no g*g temporary), in the grads' own dtype
    sq = xp.stack([xp.vdot(g.ravel(), g.ravel()).astype(dtype) for g in gs])    # (n_tensors,)
    total = xp.sqrt(sq.sum())                                                    # () dtype
    if xp is np:
        total = np.asarray(total, dtype=dtype)
        if not total <= max_norm:  # over the limit, or NaN
            coef = dtype.type(max_norm) / (total + dtype.type(1e-6))
            for g in gs:
                g *= coef.astype(g.dtype)
        return total
    coef = xp.minimum(dtype.type(max_norm) / (total + dtype.type(1e-6)), dtype.type(1.0))  # pragma: no cover
    for g in gs:  # pragma: no cover - needs a GPU
        g *= coef.astype(g.dtype)
    return total  # pragma: no cover


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate for 0-based optimizer step ``step`` (the step about to be taken).

        warmup (step < W):       base_lr * (step + 1) / W        (linear from 0; full at step W-1)
        "constant" (step >= W):  base_lr
        "cosine"   (step >= W):  min + (base_lr - min) * (1 + cos(pi * r)) / 2,
                                 r = min(1, (step - W) / max(1, total_steps - W)),
                                 min = min_lr_ratio * base_lr      (reached at total_steps; kept after)

    Args:
        step: >= 0; base_lr: >= 0; warmup_steps: W >= 0; total_steps: >= 0 (when it is <= W the
        run ends during or right after warmup; cosine then drops to min after step W);
        schedule: "constant" or "cosine"; min_lr_ratio: in [0, 1].
    Returns:
        a Python float.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if int(step) != step or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if int(total_steps) != total_steps or total_steps < 0:
        raise ValueError(f"total_steps must be an int >= 0, got {total_steps!r}")
    if not (base_lr >= 0.0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be finite and >= 0, got {base_lr}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    base_lr = float(base_lr)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    r = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    lo = min_lr_ratio * base_lr
    return lo + (base_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * r))
