"""GPT-2: configuration, parameters keyed by GPT-2 checkpoint names, forward and backward.

The model is the composition of the layers in layers.py; its backward calls their backwards in
exact reverse order. The layer functions come from ``fast.ops()``: fast.py's twins by default,
layers.py itself under ``fast.plain()``. ONE block function (:func:`block_forward`,
:func:`block_backward`) serves every batch layout (padded, shared prompts, packed rows: a
packing.Layout is data for the block's attention, never a copy of the block), training and
evaluation, SFT, DPO, the reward model and PPO, and the KV-cache forward of sampling. Parameters are one flat dict keyed by the names of a GPT-2 checkpoint
(``transformer.h.0.attn.c_attn.weight`` ...), in GPT-2's Conv1D layout (in, out), with the
output projection tied to ``transformer.wte.weight`` (there is no ``lm_head.weight`` key), so a
GPT-2 checkpoint loads without renames.

One block (pre-norm, as GPT-2):

    x = x + c_proj(attn(c_attn(ln_1(x))))          (B, T, C)
    x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))    (B, T, C)

Residual gradients add: for ``x_out = x + f(x)``, ``dx = dx_out + (df/dx)^T dx_out``; the
backward computes the branch's input gradient and adds it into the residual gradient in place.

Shape letters: B batch, T time, C channels (n_embd), V vocabulary, H heads, D head size;
a batch of R rows of L tokens with M scored positions (packing.Batch); L also the keys in a
KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import fast
from .backend import get_array_module, get_backend, scatter_add, to_numpy
from .packing import Layout

__all__ = [
    "GPTConfig",
    "param_shapes",
    "param_names",
    "init_params",
    "num_params",
    "check_params",
    "gpt_forward",
    "gpt_backward",
    "final_hidden",
    "KVCache",
    "init_kv_cache",
    "gpt_forward_kv",
    "block_forward",
    "block_backward",
]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """Size of a GPT-2 model.

    Attributes:
        vocab_size: V, number of token ids.
        n_ctx: longest sequence (rows of the position embedding).
        n_layer: number of transformer blocks.
        n_head: H, attention heads per block.
        n_embd: C, channels; must be divisible by n_head (head size D = C / H).
        layer_norm_epsilon: added to every layernorm's variance.
    """

    vocab_size: int
    n_ctx: int
    n_layer: int
    n_head: int
    n_embd: int
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"GPTConfig.{name} must be an int, got {type(v).__name__} {v!r}")
            if v <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {v}")
            setattr(self, name, int(v))
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
            raise TypeError(f"GPTConfig.layer_norm_epsilon must be a float, got {eps!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be positive and finite, got {eps}")
        self.layer_norm_epsilon = float(eps)

    @property
    def head_size(self) -> int:
        """D = n_embd / n_head."""
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        """A JSON-friendly dict (plain ints and a float)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> GPTConfig:
        """Inverse of :meth:`to_dict`. Unknown or missing keys are errors."""
        if not isinstance(d, Mapping):
            raise TypeError(f"GPTConfig.from_dict needs a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        required = {f.name for f in fields(cls) if f.name != "layer_norm_epsilon"}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"GPTConfig.from_dict: missing keys {missing}")
        return cls(**dict(d))

    @classmethod
    def gpt2_small(cls) -> GPTConfig:
        """The 124M-parameter GPT-2: V 50257, n_ctx 1024, 12 layers, 12 heads, C 768."""
        return cls(vocab_size=50257, n_ctx=1024, n_layer=12, n_head=12, n_embd=768)


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's GPT-2 checkpoint name and shape, in checkpoint order."""
    V, C, n = config.vocab_size, config.n_embd, config.n_ctx
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (n, C)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,),
            p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C),
            p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C),
            p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,),
            p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C),
            p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C),
            p + "mlp.c_proj.bias": (C,),
        })
    shapes["transformer.ln_f.weight"] = (C,)
    shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def param_names(config: GPTConfig) -> list[str]:
    """The parameter names of :func:`param_shapes`, in checkpoint order."""
    return list(param_shapes(config))


def init_params(config: GPTConfig, backend="cpu", seed: int = 0, dtype=None) -> dict:
    """GPT-2 initialisation, keyed by checkpoint names.

    Weights ~ Normal(0, 0.02^2); the two residual projections of every block
    (``attn.c_proj.weight``, ``mlp.c_proj.weight``) ~ Normal(0, (0.02 / sqrt(2 n_layer))^2) so the
    residual stream's variance does not grow with depth; biases 0; layernorm gains 1.

    Numbers are drawn by the backend's seeded host generator in :func:`param_names` order and
    copied to the device, so CPU and CUDA get identical parameters for the same seed and dtype.

    Args:
        config: the model size.
        backend: 'cpu', 'cuda[:N]' or a Backend.
        seed: generator seed.
        dtype: floating dtype (default: the backend's, float32).

    Returns:
        dict name -> array of :func:`param_shapes`' shape, on the backend's device.
    """
    be = get_backend(backend)
    dt = np.dtype(dtype) if dtype is not None else be.dtype
    if dt.kind != "f":
        raise TypeError(f"init_params: dtype must be floating, got {dt}")
    rng = be.rng(seed)
    std = 0.02
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".bias"):
            params[name] = be.xp.zeros(shape, dtype=dt)
        elif ".ln_" in name:  # ln_1, ln_2, ln_f gains
            params[name] = be.xp.ones(shape, dtype=dt)
        elif name.endswith("c_proj.weight"):
            params[name] = be.normal(rng, shape, std=proj_std, dtype=dt)
        else:
            params[name] = be.normal(rng, shape, std=std, dtype=dt)
    return params


def num_params(params: Mapping) -> int:
    """Total number of scalars (the tied wte counted once: it is stored once)."""
    return int(sum(int(np.prod(a.shape)) for a in params.values()))


def check_params(params: Mapping, config: GPTConfig):
    """Validate names, shapes, dtypes and device of ``params``; return (xp, dtype).

    All arrays must be floating, of one dtype, on one array module (numpy or cupy).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    expected = param_shapes(config)
    missing = [n for n in expected if n not in params]
    unexpected = [n for n in params if n not in expected]
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
            if "lm_head.weight" in unexpected:
                msg.append("(lm_head.weight is not used: the output projection is tied to transformer.wte.weight)")
        raise KeyError(f"params do not match the config: {'; '.join(msg)}")
    wte = params["transformer.wte.weight"]
    if not hasattr(wte, "dtype") or not hasattr(wte, "shape"):
        raise TypeError(f"params['transformer.wte.weight'] must be an array, got {type(wte).__name__}")
    xp = get_array_module(wte)
    dtype = wte.dtype
    if dtype.kind != "f":
        raise TypeError(f"params must be floating arrays, got transformer.wte.weight of dtype {dtype}")
    for name, shape in expected.items():
        a = params[name]
        if not hasattr(a, "dtype") or not hasattr(a, "shape"):
            raise TypeError(f"params[{name!r}] must be an array, got {type(a).__name__}")
        if tuple(a.shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(a.shape)}, expected {shape} for this config")
        if a.dtype != dtype:
            raise TypeError(
                f"params[{name!r}] has dtype {a.dtype} but transformer.wte.weight has {dtype}: "
                f"all parameters must share one dtype"
            )
        if get_array_module(a) is not xp:
            raise TypeError(
                f"params[{name!r}] is a {type(a).__module__} array but transformer.wte.weight is not: "
                f"all parameters must live on one device"
            )
    return xp, dtype


def _as_int_array(a, name, xp, ndims, upper=None, what=""):
    """Check an integer index array's dtype and rank (and, given ``upper``, that 0 <= a < upper);
    return it on ``xp``'s device. Host data is range-checked on the host, before the upload, so
    ids the sampler has just drawn on the host cost no device read-back."""
    if a is None:
        return None
    if get_array_module(a) is not np and xp is np:
        raise TypeError(f"{name} is a GPU array but the parameters are NumPy arrays")
    if not hasattr(a, "dtype"):
        a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(a.shape)}")
    if upper is not None:
        _check_range(a, name, upper, what)
    return xp.asarray(a)


def _check_range(a, name, upper, what):
    """Raise ValueError unless 0 <= a < upper (one device-to-host read for a GPU array)."""
    xp = get_array_module(a)
    if a.size == 0:
        return
    if xp is np:
        lo, hi = int(a.min()), int(a.max())
        bad = lo < 0 or hi >= upper
    else:
        bad = bool(((a < 0) | (a >= upper)).any())
        if bad:
            lo, hi = int(a.min()), int(a.max())
    if bad:
        raise ValueError(f"{name} must lie in [0, {upper}) ({what}), got values in [{lo}, {hi}]")


def _check_inputs(idx, config, xp, position_ids, validate):
    """Validate and move to the device: idx (B, T), position_ids (T,) or (B, T)."""
    idx = _as_int_array(idx, "idx", xp, (2,), config.vocab_size if validate else None, "vocab_size")
    B, T = idx.shape
    if B == 0 or T == 0:
        raise ValueError(f"idx must have at least one row and one token, got shape {(B, T)}")
    if position_ids is not None:
        position_ids = _as_int_array(position_ids, "position_ids", xp, (1, 2),
                                     config.n_ctx if validate else None, "n_ctx")
        if position_ids.shape not in ((T,), (B, T)):
            raise ValueError(f"position_ids must have shape ({T},) or ({B}, {T}), got {tuple(position_ids.shape)}")
    return idx, position_ids


def _host_mask(attention_mask, shape) -> np.ndarray:
    """A (B, T) key-padding mask as host bools (1 real token, 0 pad), checked."""
    m = to_numpy(attention_mask)
    if m.dtype.kind not in "biuf":
        raise TypeError(f"attention_mask must be a 0/1 array, got dtype {m.dtype}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"attention_mask must have shape {tuple(shape)}, got {tuple(m.shape)}")
    return m != 0


# ---------------------------------------------------------------------------------------------
# forward and backward
# ---------------------------------------------------------------------------------------------


def block_forward(ops, p, n: str, x, eps: float, attend, keep=None):
    """One transformer block (pre-norm, GPT-2), shared by the training and the KV-cache forward:

        x = x + attn.c_proj(attend(attn.c_attn(ln_1(x))))          (B, T, C)
        x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))                (B, T, C)

    Args:
        ops: the layer functions (fast.ops()).
        p: the params; n: this block's name prefix, "transformer.h.{i}.".
        x: (B, T, C) the residual stream.
        eps: the layernorms' epsilon.
        attend: (B, T, 3C) qkv -> ((B, T, C), cache): the attention of the batch's layout, or of a
            KV cache.
        keep: None, or a list that receives each layer's cache in forward order (training).
    Returns:
        x: (B, T, C).
    """
    save = keep.append if keep is not None else (lambda c: None)
    h, c = ops.layernorm_forward(x, p[n + "ln_1.weight"], p[n + "ln_1.bias"], eps); save(c)  # (B, T, C)
    h, c = ops.linear_forward(h, p[n + "attn.c_attn.weight"], p[n + "attn.c_attn.bias"]); save(c)  # (B, T, 3C)
    h, c = attend(h); save(c)  # (B, T, C)
    h, c = ops.linear_forward(h, p[n + "attn.c_proj.weight"], p[n + "attn.c_proj.bias"]); save(c)  # (B, T, C)
    h += x  # residual; the old x stays alive in the ln_1 cache
    x = h
    h, c = ops.layernorm_forward(x, p[n + "ln_2.weight"], p[n + "ln_2.bias"], eps); save(c)  # (B, T, C)
    h, c = ops.linear_forward(h, p[n + "mlp.c_fc.weight"], p[n + "mlp.c_fc.bias"]); save(c)  # (B, T, 4C)
    h, c = ops.gelu_forward(h); save(c)  # (B, T, 4C)
    h, c = ops.linear_forward(h, p[n + "mlp.c_proj.weight"], p[n + "mlp.c_proj.bias"]); save(c)  # (B, T, C)
    h += x  # residual
    return h


def block_backward(ops, dx, caches, grads: dict, n: str):
    """The backward of :func:`block_forward`, its layers in exact reverse order. ``dx`` (B, T, C),
    the residual gradient, is updated in place (each branch's input gradient added into it);
    the parameters' gradients go into ``grads`` under their names."""
    c_ln1, c_qkv, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj = caches
    # x = x + mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))  ->  dx += d(branch)/dx^T dx
    dh, g = ops.linear_backward(dx, c_mproj)  # (B, T, 4C)
    grads[n + "mlp.c_proj.weight"], grads[n + "mlp.c_proj.bias"] = g["w"], g["b"]
    dh, _ = ops.gelu_backward(dh, c_gelu)  # (B, T, 4C)
    dh, g = ops.linear_backward(dh, c_fc)  # (B, T, C)
    grads[n + "mlp.c_fc.weight"], grads[n + "mlp.c_fc.bias"] = g["w"], g["b"]
    dh, g = ops.layernorm_backward(dh, c_ln2)  # (B, T, C)
    grads[n + "ln_2.weight"], grads[n + "ln_2.bias"] = g["w"], g["b"]
    dx += dh
    # x = x + attn.c_proj(attn(attn.c_attn(ln_1(x))))  ->  dx += d(branch)/dx^T dx
    dh, g = ops.linear_backward(dx, c_aproj)  # (B, T, C)
    grads[n + "attn.c_proj.weight"], grads[n + "attn.c_proj.bias"] = g["w"], g["b"]
    dh, _ = ops.attention_backward(dh, c_att)  # (B, T, 3C)
    dh, g = ops.linear_backward(dh, c_qkv)  # (B, T, C)
    grads[n + "attn.c_attn.weight"], grads[n + "attn.c_attn.bias"] = g["w"], g["b"]
    dh, g = ops.layernorm_backward(dh, c_ln1)  # (B, T, C)
    grads[n + "ln_1.weight"], grads[n + "ln_1.bias"] = g["w"], g["b"]
    dx += dh
    return dx


def gpt_forward(params, idx, config: GPTConfig, layout: Layout | None = None, *, logits_at=None,
                keep_cache: bool = True, validate: bool = True):
    """Logits, and the cache :func:`gpt_backward` needs; every batch layout runs through here.

        x = wte[idx] + wpe[pos]                                   (R, L, C)
        for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
        h = ln_f(x), at every position or at logits_at only      (R, L, C) or (M, C)
        logits = h @ wte^T                                        (R, L, V) or (M, V)

    The batch's layout (packing.Layout) says each token's position and which keys each query
    may see; None is a padded batch: positions 0..L-1, query i sees keys 0..i (right padding
    needs no mask: a real token never sees the pads after it). ``logits_at`` (M,) flat row
    positions r * L + t: only those reach ln_f and the output projection (a training batch's
    scored positions, packing.Batch.logits_at; they may repeat).

    The layer functions are ``fast.ops()``: the fast paths by default, the plain reference
    under ``fast.plain()``.

    Args:
        params: dict of :func:`param_shapes`, one floating dtype, one device.
        idx: (R, L) integer token ids in [0, V) (NumPy or on the params' device).
        config: the model size.
        layout: None or a packing.Layout of shape (R, L) on the params' device.
        logits_at: None (logits of every position) or (M,) ints in [0, R * L) on the device.
        keep_cache: False for a forward that will not be differentiated (reference log-probs,
            evaluation): each block's activations are freed as soon as the next block runs.
        validate: check the idx range (on a GPU array this reads one value back from the
            device; pass False in a hot loop over inputs already checked).

    Returns:
        logits: (R, L, V), or (M, V) with logits_at; the params' dtype.
        cache: everything :func:`gpt_backward` needs (references into this forward), or None
            when keep_cache is False.
    """
    xp, dtype = check_params(params, config)
    idx, _ = _check_inputs(idx, config, xp, None, validate)
    R, L = idx.shape
    if layout is not None and tuple(layout.shape) != (R, L):
        raise ValueError(f"the layout is for a batch of shape {tuple(layout.shape)}, not {(R, L)}")
    top = L - 1 if layout is None or layout.causal else layout.max_position  # host ints: no device read-back
    if top >= config.n_ctx:
        raise ValueError(f"the batch reaches position {top}, beyond the model's n_ctx={config.n_ctx}; "
                         f"truncate the data to max_length <= n_ctx")
    ops, p, H, eps = fast.ops(), params, config.n_head, config.layer_norm_epsilon
    positions = None if layout is None or layout.causal else layout.positions  # None: 0..L-1

    def attend(qkv):  # (R, L, 3C) -> (R, L, C), cache
        return ops.attention_forward(qkv, H, layout)

    x, emb_cache = ops.embedding_forward(idx, p["transformer.wte.weight"], p["transformer.wpe.weight"], positions)
    blocks = []
    for i in range(config.n_layer):
        keep = [] if keep_cache else None
        x = block_forward(ops, p, f"transformer.h.{i}.", x, eps, attend, keep=keep)  # (R, L, C)
        blocks.append(keep)
    if logits_at is not None:
        x = x.reshape(R * L, x.shape[-1])[logits_at]  # (M, C) the scored positions only
    x, c_lnf = ops.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    logits, c_unembed = ops.unembed_forward(x, p["transformer.wte.weight"])  # (R, L, V) or (M, V)
    if not keep_cache:
        return logits, None
    cache = {
        "config": config,
        "ops": ops,
        "shapes": {k: tuple(v.shape) for k, v in params.items()},
        "dtype": dtype,
        "logits_shape": logits.shape,
        "RL": (R, L),
        "logits_at": logits_at,
        "emb": emb_cache,
        "blocks": blocks,
        "ln_f": c_lnf,
        "unembed": c_unembed,
    }
    return logits, cache


def final_hidden(cache):
    """The final hidden states ln_f(x), (R, L, C) or (M, C), of the forward that made ``cache``
    (a reference into the cache, not a copy): what a scalar head (reward model, value head) reads."""
    return cache["unembed"][0]


def gpt_backward(dlogits, cache, dhidden=None) -> dict:
    """Gradient of a scalar loss with respect to every parameter, given dloss/dlogits.

    A loss may also read the final hidden states h = ln_f(x) (:func:`final_hidden`) directly,
    e.g. through a scalar head; ``dhidden`` (h's shape) is then dloss/dh, added to the gradient
    that reaches h through the logits (``dlogits`` may be None when the loss reads h only).

    Calls the layers' backwards in exact reverse order of :func:`gpt_forward` (with the layer
    functions its forward used). With ``logits_at`` the gradient of the M positions is scattered
    back into the (R, L, C) residual stream with a scatter-ADD (a shared prompt's last position
    predicts both responses' first tokens: its two gradients add). The residual gradient ``dx``
    flows straight through each block and each branch's input gradient is added into it. The
    tied ``transformer.wte.weight`` gradient is the SUM of its two uses: the output projection's
    ``dlogits^T @ ln_f(x)`` plus the embedding's scatter-add of ``dx`` at the input ids.

    Args:
        dlogits: the logits' shape ((R, L, V) or (M, V)), same dtype and device, or None.
        cache: from :func:`gpt_forward`.
        dhidden: None, or dloss / d ln_f(x) of h's shape, same dtype and device.

    Returns:
        dict with exactly the keys of params (in the params' order), each gradient of the
        parameter's shape and dtype.
    """
    if cache is None:
        raise ValueError("gpt_backward needs the cache of a gpt_forward run with keep_cache=True")
    config, dtype, ops = cache["config"], cache["dtype"], cache["ops"]
    if dhidden is not None:
        h = final_hidden(cache)
        if not hasattr(dhidden, "shape") or tuple(dhidden.shape) != tuple(h.shape) or dhidden.dtype != dtype:
            got = (tuple(dhidden.shape), dhidden.dtype) if hasattr(dhidden, "shape") else type(dhidden).__name__
            raise ValueError(f"dhidden must have the hidden states' shape {tuple(h.shape)} and dtype {dtype}, got {got}")
        if dlogits is None:  # the loss reads h only: h = ln_f(x) feeds the logits with a zero gradient
            dlogits = get_array_module(h).zeros(tuple(cache["logits_shape"]), dtype=dtype)
    elif dlogits is None:
        raise ValueError("gpt_backward needs dlogits, dhidden or both")
    if not hasattr(dlogits, "shape") or tuple(dlogits.shape) != tuple(cache["logits_shape"]):
        got = tuple(dlogits.shape) if hasattr(dlogits, "shape") else type(dlogits).__name__
        raise ValueError(f"dlogits must have the logits' shape {tuple(cache['logits_shape'])}, got {got}")
    if dlogits.dtype != dtype:
        raise TypeError(f"dlogits has dtype {dlogits.dtype} but the model runs in {dtype}; cast it first")
    grads = {}
    # logits = ln_f(x) @ wte^T
    dx, g = ops.unembed_backward(dlogits, cache["unembed"])  # (R, L, C) or (M, C)
    dwte = g["wte"]  # (V, C): the output projection's share; the embedding's is added below
    if dhidden is not None:
        dx += dhidden  # h = ln_f(x) feeds both the logits and the scalar head: gradients add
    dx, g = ops.layernorm_backward(dx, cache["ln_f"])
    grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"] = g["w"], g["b"]
    if cache["logits_at"] is not None:  # x[logits_at] -> scatter-add back into every position
        R, L = cache["RL"]
        full = get_array_module(dx).zeros((R * L, dx.shape[-1]), dtype=dtype)  # (R L, C)
        scatter_add(full, cache["logits_at"], dx)
        dx = full.reshape(R, L, -1)  # (R, L, C)
    for i in reversed(range(config.n_layer)):
        dx = block_backward(ops, dx, cache["blocks"][i], grads, f"transformer.h.{i}.")  # (R, L, C)
    # x = wte[idx] + wpe[pos]: scatter-add into the output projection's dwte (tied weight: sum)
    _, g = ops.embedding_backward(dx, cache["emb"], dwte=dwte)
    grads["transformer.wte.weight"], grads["transformer.wpe.weight"] = g["wte"], g["wpe"]
    return {name: grads[name] for name in cache["shapes"]}


# ---------------------------------------------------------------------------------------------
# inference with a key/value cache
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Every layer's keys and values for the tokens seen so far, preallocated to ``capacity``.

    Attributes:
        keys, values: lists (one per layer) of (B, H, capacity, D) arrays; the first ``length``
            positions are filled.
        first_real: None while every token fed was real (causal attention from key 0), else
            (B,) host ints: the index of each row's first real token (``capacity`` while a row has
            only pads). Rows are left-padded: a row's pads come before its real tokens.
        length: number of tokens fed so far.
    """

    def __init__(self, keys, values, batch_size: int, capacity: int, length: int = 0, first_real=None):
        self.keys = keys
        self.values = values
        self.batch_size = int(batch_size)
        self.capacity = int(capacity)
        self.length = length
        self.first_real = first_real

    def __repr__(self) -> str:
        return f"KVCache(batch_size={self.batch_size}, length={self.length}, capacity={self.capacity})"


def init_kv_cache(params, config: GPTConfig, batch_size: int, capacity: int | None = None) -> KVCache:
    """An empty :class:`KVCache` on the params' device and dtype.

    Args:
        params: the model's parameters (device and dtype are taken from them).
        config: the model size.
        batch_size: B.
        capacity: most tokens the cache will hold (default n_ctx).
    """
    xp, dtype = check_params(params, config)
    capacity = config.n_ctx if capacity is None else int(capacity)
    if batch_size < 1 or capacity < 1:
        raise ValueError(f"init_kv_cache: batch_size and capacity must be positive, got {batch_size}, {capacity}")
    shape = (batch_size, config.n_head, capacity, config.head_size)  # (B, H, capacity, D)
    keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
    values = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
    return KVCache(keys, values, batch_size, capacity)


def _extend_kv_cache(config, kv_cache, B, Tn, attention_mask, position_ids, xp):
    """Check the cache against the new tokens and record their padding in it. Returns (offset,
    position_ids, start): offset = tokens already cached; position_ids offset..L-1 when none were
    given; start None (causal from key 0) or (B, T_new) on the device: a real new token's first
    visible key (its row's first real token), a pad's own index (it sees itself only)."""
    if kv_cache.batch_size != B:
        raise ValueError(f"idx_new has batch size {B} but the kv_cache was made for {kv_cache.batch_size}")
    offset = kv_cache.length
    L = offset + Tn
    if L > kv_cache.capacity:
        raise ValueError(f"kv_cache holds {offset} tokens; {Tn} more exceed its capacity {kv_cache.capacity}")
    if position_ids is None:
        if L > config.n_ctx:
            raise ValueError(f"positions {offset}..{L - 1} exceed n_ctx={config.n_ctx}")
        if offset > 0:
            position_ids = xp.arange(offset, L)  # (T_new,)
    if attention_mask is None and kv_cache.first_real is None:
        return offset, position_ids, None
    real = np.ones((B, Tn), dtype=bool) if attention_mask is None else _host_mask(attention_mask, (B, Tn))
    first = (np.full(B, offset, dtype=np.int64) if kv_cache.first_real is None
             else kv_cache.first_real.copy())  # (B,) before these tokens
    seen = first < offset  # (B,) rows with a real token already cached
    if (seen[:, None] & ~real).any() or (np.diff(real.astype(np.int8), axis=1) < 0).any():
        raise ValueError("attention_mask: rows must be left-padded (a pad may not come after a real token)")
    new_first = offset + np.where(real.any(axis=1), real.argmax(axis=1), Tn)  # (B,) first real new token
    first = np.where(seen, first, np.where(real.any(axis=1), new_first, kv_cache.capacity))
    kv_cache.first_real = first
    own = offset + np.arange(Tn, dtype=np.int64)  # (T_new,) each new token's key index
    start = np.where(real, first[:, None], own[None, :])  # (B, T_new)
    return offset, position_ids, xp.asarray(start)


def gpt_forward_kv(
    params,
    idx_new,
    config: GPTConfig,
    kv_cache: KVCache | None = None,
    attention_mask=None,
    position_ids=None,
    *,
    last_only: bool = False,
    validate: bool = True,
):
    """Inference forward for new tokens, reusing the keys and values of the tokens before them.

    Keeps no backward caches. On the same tokens, feeding them in any number of chunks gives the
    logits that :func:`gpt_forward` gives in one call (with the layout of the same left padding,
    packing.layout_from_attention_mask, and the same positions).

    Args:
        params: as for :func:`gpt_forward`.
        idx_new: (B, T_new) integer token ids.
        config: the model size.
        kv_cache: from :func:`init_kv_cache` or a previous call; None starts an empty one of
            capacity n_ctx. It is updated in place and also returned.
        attention_mask: None, or (B, T_new): the key-padding mask of the NEW tokens only (the
            cache remembers the earlier ones). 1 = real, 0 = pad; rows are left-padded.
        position_ids: None for positions ``length .. length + T_new - 1``, or (T_new,) or
            (B, T_new) integers in [0, n_ctx).
        last_only: compute logits for the last new position only (generation's case).
        validate: as for :func:`gpt_forward`.

    Returns:
        logits: (B, T_new, V), or (B, 1, V) when last_only.
        kv_cache: the updated cache.
    """
    xp, dtype = check_params(params, config)
    idx_new, position_ids = _check_inputs(idx_new, config, xp, position_ids, validate)
    B, Tn = idx_new.shape
    if kv_cache is None:
        kv_cache = init_kv_cache(params, config, B)
    if not isinstance(kv_cache, KVCache):
        raise TypeError(f"kv_cache must be a KVCache, got {type(kv_cache).__name__}")
    offset, position_ids, start = _extend_kv_cache(config, kv_cache, B, Tn, attention_mask, position_ids, xp)
    ops, p, H, eps = fast.ops(), params, config.n_head, config.layer_norm_epsilon
    x, _ = ops.embedding_forward(idx_new, p["transformer.wte.weight"], p["transformer.wpe.weight"], position_ids)
    for i in range(config.n_layer):
        def attend(qkv, i=i):  # (B, Tn, 3C) -> (B, Tn, C), no cache; writes this layer's keys and values
            return ops.attention_forward_kv(qkv, H, kv_cache.keys[i], kv_cache.values[i], offset, start), None

        x = block_forward(ops, p, f"transformer.h.{i}.", x, eps, attend)  # (B, Tn, C)
    if last_only:
        x = x[:, -1:]  # (B, 1, C)
    x, _ = ops.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    logits, _ = ops.unembed_forward(x, p["transformer.wte.weight"])  # (B, Tn or 1, V)
    kv_cache.length = offset + Tn
    return logits, kv_cache
