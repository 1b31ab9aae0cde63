"""GPT-2 forward and backward over packed rows (minidpo.packing): shared prompts, no padding.

The same model as model.py, block for block, with three differences, all about the layout:

1. attention takes an arbitrary mask (:func:`masked_attention_forward`): causal within a row,
   block-diagonal across the sequences packed into it, and, for a shared prompt, chosen and
   rejected kept apart (packing.attention_allowed);
2. positions come per token (a rejected response restarts at the prompt's end, a packed sequence
   at 0), so the position embedding is a scatter-add in the backward;
3. only the M scored positions reach ln_f and the output projection: the (M, V) logits are the
   ones the log-probs read, not (R, L, V). A position that scores both responses' first tokens
   (a shared prompt's last) appears twice, and its two gradients add.

The per-example log pi(y|x), eq. (7)'s only model term, is then a matrix product with the
layout's (E, M) weights: logps = W lp, lp[m] = log softmax(logits[m])[label m].

The layer functions are ``fast.ops()``'s, as in model.py: the fast paths by default, the plain
reference (layers.py, logprobs.py) under ``fast.plain()`` / ``--plain``. Only the masked
attention is this module's own, on both paths.

Shape letters: R rows, L row length, C channels, H heads, D head size, V vocabulary,
M scored tokens, E examples (2N for DPO, B for SFT).
"""

from __future__ import annotations

import math

import numpy as np

from . import fast
from .backend import get_array_module, scatter_add
from .losses import dpo_step_loss, preference_metrics
from .model import GPTConfig, check_params
from .packing import PackedBatch, attention_allowed

__all__ = [
    "attention_bias_from_allowed",
    "masked_attention_forward",
    "masked_attention_backward",
    "packed_forward",
    "packed_backward",
    "scored_logps",
    "scored_logps_backward",
    "packed_logps",
    "packed_dpo_step",
    "packed_sft_step",
]


# ---------------------------------------------------------------------------------------------
# attention under an arbitrary mask
# ---------------------------------------------------------------------------------------------


def attention_bias_from_allowed(allowed, dtype):
    """(R, L, L) bool -> (R, 1, L, L) additive bias of ``dtype``: 0 where allowed, -inf not."""
    xp = get_array_module(allowed)
    t = np.dtype(dtype).type
    return xp.where(allowed, t(0), t(-math.inf)).astype(dtype, copy=False)[:, None]


def _heads(qkv, n_head):
    """(R, L, 3C) -> q, k, v views, each (R, H, L, D)."""
    R, L, C3 = qkv.shape
    C = C3 // 3
    if C3 % 3 or C % n_head:
        raise ValueError(f"qkv must be (R, L, 3C) with C divisible by n_head={n_head}, got {tuple(qkv.shape)}")
    qkv5 = qkv.reshape(R, L, 3, n_head, C // n_head)  # (R, L, 3, H, D)
    return [qkv5[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]


def masked_attention_forward(qkv, n_head, bias, blocks=None):
    """Multi-head self-attention under an additive mask.

        q, k, v = split(qkv)                              each (R, H, L, D)
        att = softmax(q k^T / sqrt(D) + bias)             (R, H, L, L)
        y = att v, heads concatenated                     (R, L, C)

    ``blocks`` [(i0, i1, k0), ...] (packing.query_blocks) cut the queries into blocks; block
    i0..i1-1 is scored against keys k0..i1-1 only. The caller guarantees that every other key is
    masked for all of them (the mask is causal within a row and block-diagonal across packed
    sequences), so the skipped scores would be exact zeros after the softmax. Every query must
    be allowed at least one key (its own position), or its softmax row is 0/0.

    Args:
        qkv: (R, L, 3C), laid out [q | k | v].
        n_head: H.
        bias: (R, 1, L, L) or (L, L), 0 = allowed, -inf = masked (:func:`attention_bias_from_allowed`).
        blocks: None for one block (0, L, 0).

    Returns:
        y: (R, L, C), qkv's dtype.
        cache: (qs, k, v, atts, y, blocks).
    """
    xp = get_array_module(qkv)
    R, L, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    blocks = [(0, L, 0)] if blocks is None else blocks
    q, k, v = _heads(qkv, n_head)  # (R, H, L, D) views
    qs = q * qkv.dtype.type(1.0 / math.sqrt(D))  # (R, H, L, D)
    yh = xp.empty((R, L, n_head, D), dtype=qkv.dtype)
    atts = []
    for i0, i1, k0 in blocks:
        att = qs[:, :, i0:i1] @ k[:, :, k0:i1].transpose(0, 1, 3, 2)  # (R, H, nq, nk)
        att += bias[..., i0:i1, k0:i1]
        att -= att.max(axis=-1, keepdims=True)  # softmax over the keys, max-subtracted
        xp.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        yh[:, i0:i1] = (att @ v[:, :, k0:i1]).transpose(0, 2, 1, 3)  # (R, nq, H, D)
        atts.append(att)
    y = yh.reshape(R, L, C)
    return y, (qs, k, v, atts, y, blocks)


def masked_attention_backward(dy, cache):
    """Backward of :func:`masked_attention_forward`.

    forward:  y = att v                 backward: datt = dy v^T;  dv = att^T dy
    forward:  att = softmax(s)          backward: ds = att * (datt - delta),
                                                  delta_i = sum_j datt_ij att_ij = dy_i . y_i
    forward:  s = qs k^T + bias         backward: dqs = ds k;  dk = ds^T qs;  dq = dqs / sqrt(D)
    (masked entries have att = 0, so ds = 0 there and the constant bias gets no gradient).

    A key read by several query blocks gets the sum of their contributions. A shared prompt's
    keys and values are read by both responses' queries: this sum is where the two responses'
    gradients meet in the prompt.

    Args:
        dy: (R, L, C).
        cache: from the forward.

    Returns:
        dqkv: (R, L, 3C); grads: {}.
    """
    qs, k, v, atts, y, blocks = cache
    xp = get_array_module(dy)
    R, H, L, D = qs.shape
    dyh = dy.reshape(R, L, H, D).transpose(0, 2, 1, 3)  # (R, H, L, D)
    delta = (dy * y).reshape(R, L, H, D).sum(axis=-1).transpose(0, 2, 1)[..., None]  # (R, H, L, 1)
    dqkv = xp.zeros((R, L, 3, H, D), dtype=dy.dtype)
    d = dqkv.transpose(2, 0, 3, 1, 4)  # (3, R, H, L, D) views: dq, dk, dv
    scale = dy.dtype.type(1.0 / math.sqrt(D))
    for (i0, i1, k0), att in zip(blocks, atts):
        dy_b = dyh[:, :, i0:i1]  # (R, H, nq, D)
        d[2][:, :, k0:i1] += att.transpose(0, 1, 3, 2) @ dy_b  # dv (R, H, nk, D)
        ds = dy_b @ v[:, :, k0:i1].transpose(0, 1, 3, 2)  # datt (R, H, nq, nk)
        ds -= delta[:, :, i0:i1]
        ds *= att
        d[1][:, :, k0:i1] += ds.transpose(0, 1, 3, 2) @ qs[:, :, i0:i1]  # dk (R, H, nk, D)
        dq = ds @ k[:, :, k0:i1]  # dqs (R, H, nq, D)
        dq *= scale
        d[0][:, :, i0:i1] = dq
    return dqkv.reshape(R, L, 3 * H * D), {}


# ---------------------------------------------------------------------------------------------
# the model over packed rows
# ---------------------------------------------------------------------------------------------


def packed_forward(params, config: GPTConfig, batch: PackedBatch, *, keep_cache: bool = True):
    """Logits of the M scored positions of a packed batch, and the cache for the backward.

        x = wte[idx] + wpe[pos]                                 (R, L, C), pos per token
        for each block: x = x + attn(ln_1(x), mask); x = x + mlp(ln_2(x))
        logits = ln_f(x[score_src]) @ wte^T                     (M, V)

    The mask (packing.attention_allowed) is built once on the device and shared by every
    block. On the same tokens, each row of the result equals the logits row of
    :func:`minidpo.model.gpt_forward` on the padded batch that scores the same token.

    Args:
        params: the model's parameters (one floating dtype, one device).
        config: the model size.
        batch: from packing.pack_preferences / pack_sft, on the params' device.
        keep_cache: False for a forward that will not be differentiated (reference log-probs,
            evaluation): each block's activations are then freed as soon as the next block runs.

    Returns:
        logits: (M, V), the params' dtype.
        cache: for :func:`packed_backward` (None when keep_cache is False).
    """
    xp, dtype = check_params(params, config)
    if batch.max_position >= config.n_ctx:  # a host int: no device read-back
        raise ValueError(f"a sequence of the batch reaches position {batch.max_position}, beyond the model's "
                         f"n_ctx={config.n_ctx}; truncate the data to max_length <= n_ctx")
    idx, pos = batch.input_ids, batch.position_ids
    R, L = idx.shape
    H, eps = config.n_head, config.layer_norm_epsilon
    ops, p = fast.ops(), params
    bias = attention_bias_from_allowed(attention_allowed(batch.seq_id, batch.branch, xp), dtype)  # (R, 1, L, L)
    x, emb_cache = ops.embedding_forward(idx, p["transformer.wte.weight"], p["transformer.wpe.weight"], pos)
    blocks = []
    for i in range(config.n_layer):
        n = f"transformer.h.{i}."
        h, c_ln1 = ops.layernorm_forward(x, p[n + "ln_1.weight"], p[n + "ln_1.bias"], eps)  # (R, L, C)
        h, c_attn = ops.linear_forward(h, p[n + "attn.c_attn.weight"], p[n + "attn.c_attn.bias"])  # (R, L, 3C)
        h, c_att = masked_attention_forward(h, H, bias, batch.blocks)  # (R, L, C)
        h, c_aproj = ops.linear_forward(h, p[n + "attn.c_proj.weight"], p[n + "attn.c_proj.bias"])  # (R, L, C)
        h += x
        x = h
        h, c_ln2 = ops.layernorm_forward(x, p[n + "ln_2.weight"], p[n + "ln_2.bias"], eps)  # (R, L, C)
        h, c_fc = ops.linear_forward(h, p[n + "mlp.c_fc.weight"], p[n + "mlp.c_fc.bias"])  # (R, L, 4C)
        h, c_gelu = ops.gelu_forward(h)  # (R, L, 4C)
        h, c_mproj = ops.linear_forward(h, p[n + "mlp.c_proj.weight"], p[n + "mlp.c_proj.bias"])  # (R, L, C)
        h += x
        x = h
        if keep_cache:
            blocks.append((c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj))
    C = x.shape[-1]
    xs = x.reshape(R * L, C)[batch.score_src][None]  # (1, M, C) the scored positions only
    h, c_lnf = ops.layernorm_forward(xs, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    logits, c_unembed = ops.unembed_forward(h, p["transformer.wte.weight"])  # (1, M, V)
    if not keep_cache:
        return logits[0], None
    cache = {"config": config, "shapes": {k: tuple(v.shape) for k, v in params.items()}, "dtype": dtype,
             "ops": ops, "RLC": (R, L, C), "src": batch.score_src, "emb": emb_cache, "blocks": blocks, "ln_f": c_lnf,
             "unembed": c_unembed}
    return logits[0], cache


def packed_backward(dlogits, cache) -> dict:
    """Every parameter's gradient from dloss/dlogits (M, V): :func:`packed_forward` in reverse.

    The scored positions' gradient is scattered back into the (R, L, C) residual stream with a
    scatter-ADD (a shared prompt's last position scores two tokens); then the blocks in reverse,
    as model.gpt_backward; the tied wte gets the output projection's and the embedding's shares.

    Returns a dict keyed and ordered as the params."""
    dtype = cache["dtype"]
    if dlogits.dtype != dtype:
        raise TypeError(f"dlogits has dtype {dlogits.dtype} but the model runs in {dtype}")
    xp = get_array_module(dlogits)
    config, ops = cache["config"], cache["ops"]  # the forward's layer functions
    R, L, C = cache["RLC"]
    grads = {}
    dh, g = ops.unembed_backward(dlogits[None], cache["unembed"])  # (1, M, C)
    dwte = g["wte"]  # (V, C)
    dh, g = ops.layernorm_backward(dh, cache["ln_f"])  # (1, M, C)
    grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"] = g["w"], g["b"]
    dx = xp.zeros((R * L, C), dtype=dtype)  # (R L, C)
    scatter_add(dx, cache["src"], dh[0])  # a position scoring two tokens gets both gradients
    dx = dx.reshape(R, L, C)
    for i in reversed(range(config.n_layer)):
        n = f"transformer.h.{i}."
        c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj = cache["blocks"][i]
        dh, g = ops.linear_backward(dx, c_mproj)  # (R, L, 4C)
        grads[n + "mlp.c_proj.weight"], grads[n + "mlp.c_proj.bias"] = g["w"], g["b"]
        dh, _ = ops.gelu_backward(dh, c_gelu)
        dh, g = ops.linear_backward(dh, c_fc)  # (R, L, C)
        grads[n + "mlp.c_fc.weight"], grads[n + "mlp.c_fc.bias"] = g["w"], g["b"]
        dh, g = ops.layernorm_backward(dh, c_ln2)
        grads[n + "ln_2.weight"], grads[n + "ln_2.bias"] = g["w"], g["b"]
        dx += dh
        dh, g = ops.linear_backward(dx, c_aproj)  # (R, L, C)
        grads[n + "attn.c_proj.weight"], grads[n + "attn.c_proj.bias"] = g["w"], g["b"]
        dh, _ = masked_attention_backward(dh, c_att)  # (R, L, 3C)
        dh, g = ops.linear_backward(dh, c_attn)  # (R, L, C)
        grads[n + "attn.c_attn.weight"], grads[n + "attn.c_attn.bias"] = g["w"], g["b"]
        dh, g = ops.layernorm_backward(dh, c_ln1)
        grads[n + "ln_1.weight"], grads[n + "ln_1.bias"] = g["w"], g["b"]
        dx += dh
    _, g = ops.embedding_backward(dx, cache["emb"], dwte=dwte)  # wpe: scatter-add over the positions
    grads["transformer.wte.weight"], grads["transformer.wpe.weight"] = g["wte"], g["wpe"]
    return {name: grads[name] for name in cache["shapes"]}


# ---------------------------------------------------------------------------------------------
# log pi(y|x) from the scored logits: eq. (7)'s log-probs, and their backward
# ---------------------------------------------------------------------------------------------

_PIECE = 1 << 18  # elements per piece of the (M, V) passes (1 MiB of float32)


def _pieces(M: int, V: int, xp):
    if xp is not np or M * V <= _PIECE:
        return [slice(None)]
    nm = max(1, _PIECE // V)
    return [slice(i, i + nm) for i in range(0, M, nm)]


def scored_logps(logits, batch: PackedBatch):
    """log pi(y|x) of every example:

        lp[m]     = logits[m, y_m] - logsumexp_v logits[m, v]          (M,)
        logps[e]  = sum_m W[e, m] lp[m]                                (E,)  eq. (7)'s log pi

    W[e, m] = 1 if scored token m belongs to example e (1 / n_e with the batch's average=True).

    Args:
        logits: (M, V) from :func:`packed_forward`.
        batch: the layout.
    Returns:
        logps (E,) logits' dtype; cache for :func:`scored_logps_backward` (with "token_counts").
    """
    xp = get_array_module(logits)
    M, V = logits.shape
    lse = xp.empty((M,), dtype=logits.dtype)
    for s in _pieces(M, V, xp):
        lse[s] = fast.ops().logsumexp(logits[s], axis=-1)
    lp = logits[xp.arange(M), batch.score_labels] - lse  # (M,)
    W = batch.score_weight(logits.dtype, xp)  # (E, M)
    logps = W @ lp  # (E,)
    return logps, {"logits": logits, "lse": lse, "W": W, "labels": batch.score_labels,
                   "token_counts": batch.token_counts}


def scored_logps_backward(dlogps, cache, *, overwrite_logits: bool = False):
    """dlogits (M, V) from dlogps (E,):

        dlp[m] = sum_e dlogps[e] W[e, m]
        dlogits[m, v] = dlp[m] (1[v == y_m] - softmax(logits[m])[v])

    With ``overwrite_logits`` the logits' buffer is reused for the result (the logits are lost)."""
    logits = cache["logits"]
    xp = get_array_module(logits)
    M, V = logits.shape
    dt = logits.dtype
    dlp = cache["W"].T @ xp.asarray(dlogps).astype(dt, copy=False)  # (M,)
    out = logits if overwrite_logits else xp.empty_like(logits)
    lse = cache["lse"]
    for s in _pieces(M, V, xp):
        xp.subtract(logits[s], lse[s][:, None], out=out[s])  # log p
        xp.exp(out[s], out=out[s])  # p
    out[xp.arange(M), cache["labels"]] -= dt.type(1)  # p - onehot(y)
    out *= (-dlp)[:, None]  # dlp (onehot - p)
    return out


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def packed_logps(params, config: GPTConfig, batch: PackedBatch):
    """log pi(y|x) (E,) of every example of a packed batch, no gradient (reference log-probs,
    evaluation); summed, or averaged when the batch was packed with average=True."""
    logits, _ = packed_forward(params, config, batch, keep_cache=False)
    logps, _ = scored_logps(logits, batch)
    return logps


def packed_dpo_step(params: dict, model_config: GPTConfig, batch: PackedBatch, ref_chosen, ref_rejected, tc):
    """train.dpo_step on a packed, shared-prompt batch: the same loss (eq. 7 or tc.loss_type),
    metrics and gradients (eq. 9), from one forward over the packed rows.

    batch: packing.pack_preferences(..., average=tc.average_logps) on the params' device.
    ref_chosen, ref_rejected: (N,) log pi_ref(y|x). Returns (loss, metrics, grads)."""
    n = batch.n_examples // 2
    logits, model_cache = packed_forward(params, model_config, batch)  # (M, V)
    logps, lp_cache = scored_logps(logits, batch)  # (2N,)
    del logits
    out, dlogps = dpo_step_loss(logps, lp_cache["token_counts"], ref_chosen, ref_rejected, tc)  # eq. 7, eq. 9
    dlogits = scored_logps_backward(dlogps, lp_cache, overwrite_logits=True)  # (M, V)
    grads = packed_backward(dlogits, model_cache)
    return out.loss, preference_metrics(out, logps[:n], logps[n:]), grads


def packed_sft_step(params: dict, model_config: GPTConfig, batch: PackedBatch):
    """train.sft_step on a packed batch: L = -sum_b logps_b / sum_b n_b (per-token mean NLL).
    Returns (loss, grads)."""
    logits, model_cache = packed_forward(params, model_config, batch)
    logps, lp_cache = scored_logps(logits, batch)  # (B,) summed
    del logits
    xp = get_array_module(logps)
    n_tokens = logps.dtype.type(max(int(batch.host_token_counts.sum()), 1))
    loss = -logps.sum() / n_tokens
    dlogps = xp.full(logps.shape, -1.0, dtype=logps.dtype) / n_tokens
    dlogits = scored_logps_backward(dlogps, lp_cache, overwrite_logits=True)
    return loss, packed_backward(dlogits, model_cache)
