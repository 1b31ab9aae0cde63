"""The same GPT-2 as minidpo.model, written in PyTorch: an independent reference for tests and
the benchmark.

It reads a minidpo params dict (NumPy arrays keyed by GPT-2 checkpoint names, Conv1D layout
(in, out), output projection tied to ``transformer.wte.weight``) and computes the same logits;
autograd then gives gradients that come back as a dict of NumPy arrays keyed like minidpo's.

    model = TorchGPT(config.to_dict(), params)          # float32 on the CPU
    logits = model(torch.as_tensor(idx))                 # (B, T, V)
    (logits * w).sum().backward()
    grads = model.grads_numpy()                          # {name: np.ndarray}

The DPO step of minidpo.train.dpo_step (followed by clipping and AdamW), written the way a
PyTorch user would write it (autograd, torch.optim.AdamW, clip_grad_norm_):

    step = TorchDPOStep(config, policy_params, ref_params, beta=0.1, lr=1e-4, weight_decay=0.1)
    ref_logps = step.reference_logps(input_ids, loss_mask)          # (2N,) frozen pi_ref
    loss, logps = step.loss(input_ids, loss_mask, ref_logps)         # eq. (7), with autograd
    loss.backward(); step.clip_and_update()                          # clip, AdamW

Shape letters: B batch, T time, C channels, V vocabulary, H heads, D head size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TorchGPT",
    "torch_params_from_numpy",
    "numpy_from_torch",
    "torch_sequence_logps",
    "torch_dpo_loss",
    "TorchDPOStep",
]


def _host(a) -> np.ndarray:
    """NumPy view of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def torch_params_from_numpy(params: Mapping, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Copy a minidpo params dict into torch tensors (same names, same shapes)."""
    return {k: torch.tensor(_host(v), dtype=dtype, device=device) for k, v in params.items()}


def numpy_from_torch(tensors: Mapping) -> dict[str, np.ndarray]:
    """Copy a dict of torch tensors to NumPy arrays (same names)."""
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def _config_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
        if key not in d:
            raise KeyError(f"config is missing {key!r}")
    d.setdefault("layer_norm_epsilon", 1e-5)
    return d


class TorchGPT(torch.nn.Module):
    """GPT-2 whose parameters are named exactly like minidpo's.

    Args:
        config: dict with vocab_size, n_ctx, n_layer, n_head, n_embd[, layer_norm_epsilon]
            (or an object with ``to_dict()``, such as minidpo's GPTConfig).
        params_numpy: dict name -> array (NumPy, or CuPy copied to the host).
        device: torch device.
        dtype: torch floating dtype of the parameters.
        attn_impl: "sdpa" (torch's fused scaled_dot_product_attention) or "math" (explicit
            matmul + masked softmax).
    """

    def __init__(self, config, params_numpy: Mapping, device="cpu", dtype=torch.float32, attn_impl: str = "sdpa"):
        super().__init__()
        if attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'math', got {attn_impl!r}")
        self.config = _config_dict(config)
        self.attn_impl = attn_impl
        self._names = list(params_numpy)
        for name, t in torch_params_from_numpy(params_numpy, device, dtype).items():
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(t))
        C, L = self.config["n_embd"], self.config["n_layer"]
        needed = ["transformer.wte.weight", "transformer.wpe.weight"]
        needed += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
        needed += [f"transformer.h.{i}.{s}" for i in range(L) for s in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias")]
        missing = [n for n in needed if n not in self._names]
        if missing:
            raise KeyError(f"params_numpy lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if tuple(self.p("transformer.wte.weight").shape) != (self.config["vocab_size"], C):
            raise ValueError("transformer.wte.weight does not have shape (vocab_size, n_embd)")

    def p(self, name: str) -> torch.nn.Parameter:
        """The parameter called ``name`` (a GPT-2 checkpoint name)."""
        return getattr(self, name.replace(".", "__"))

    def named_gpt2_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: self.p(n) for n in self._names}

    def _attention(self, qkv, attention_mask):
        B, T, C3 = qkv.shape
        C = C3 // 3
        H = self.config["n_head"]
        D = C // H
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, H, T, D)
        allowed = None
        if attention_mask is not None:  # causal, key padding, and each query's own position
            eye = torch.eye(T, dtype=torch.bool, device=qkv.device)
            causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
            allowed = causal & (attention_mask.bool()[:, None, None, :] | eye)  # (B, 1, T, T)
        if self.attn_impl == "sdpa":
            if allowed is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        else:
            if allowed is None:
                allowed = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
            att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            y = att @ v  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)

    @staticmethod
    def _conv1d(x, w, b):
        """GPT-2 Conv1D: x @ w + b with w (in, out), on (N, in) rows."""
        return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])

    def forward(self, idx, attention_mask=None, position_ids=None):
        """Logits (B, T, V) for token ids idx (B, T); optional key-padding mask (B, T) and
        position ids (T,) or (B, T), as in minidpo.model.gpt_forward."""
        cfg, p = self.config, self.p
        dev = p("transformer.wte.weight").device
        idx = torch.as_tensor(idx, device=dev)
        B, T = idx.shape
        C, eps = cfg["n_embd"], cfg["layer_norm_epsilon"]
        if position_ids is None:
            position_ids = torch.arange(T, device=dev)
        else:
            position_ids = torch.as_tensor(position_ids, device=dev)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=dev)
        x = p("transformer.wte.weight")[idx] + p("transformer.wpe.weight")[position_ids]  # (B, T, C)
        for i in range(cfg["n_layer"]):
            n = f"transformer.h.{i}."
            h = F.layer_norm(x, (C,), p(n + "ln_1.weight"), p(n + "ln_1.bias"), eps)
            h = self._conv1d(h, p(n + "attn.c_attn.weight"), p(n + "attn.c_attn.bias"))  # (B, T, 3C)
            h = self._attention(h, attention_mask)  # (B, T, C)
            x = x + self._conv1d(h, p(n + "attn.c_proj.weight"), p(n + "attn.c_proj.bias"))
            h = F.layer_norm(x, (C,), p(n + "ln_2.weight"), p(n + "ln_2.bias"), eps)
            h = F.gelu(self._conv1d(h, p(n + "mlp.c_fc.weight"), p(n + "mlp.c_fc.bias")), approximate="tanh")
            x = x + self._conv1d(h, p(n + "mlp.c_proj.weight"), p(n + "mlp.c_proj.bias"))
        x = F.layer_norm(x, (C,), p("transformer.ln_f.weight"), p("transformer.ln_f.bias"), eps)
        return x @ p("transformer.wte.weight").t()  # (B, T, V), tied output projection

    def grads_numpy(self) -> dict[str, np.ndarray]:
        """Gradients after ``backward()``, keyed like minidpo's params (zeros where no gradient)."""
        out = {}
        for n, t in self.named_gpt2_parameters().items():
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            out[n] = g.detach().cpu().numpy()
        return out

    def params_numpy(self) -> dict[str, np.ndarray]:
        """The current parameters as NumPy arrays keyed like minidpo's."""
        return numpy_from_torch(self.named_gpt2_parameters())


# ---------------------------------------------------------------------------------------------
# the DPO step: summed response log-probs, the sigmoid DPO loss, clipping, AdamW
# ---------------------------------------------------------------------------------------------


def torch_sequence_logps(logits, labels, loss_mask):
    """log pi(y|x) per row, minidpo.logprobs.sequence_logps' convention (summed, not averaged):

        logps[b] = sum_{t=0}^{T-2} loss_mask[b, t+1] * log softmax(logits[b, t])[labels[b, t+1]]

    The token at t+1 is scored by the logits at t; loss_mask is over label positions (column 0
    never counts). Written as the official DPO trainer writes it: a full log-softmax, a gather.

    Args:
        logits: (B, T, V) float tensor.
        labels: (B, T) int tensor, the input ids.
        loss_mask: (B, T) bool or 0/1 tensor.

    Returns:
        (B,) tensor of logits' dtype.
    """
    mask = loss_mask[:, 1:] != 0  # (B, T-1)
    safe = torch.where(mask, labels[:, 1:], torch.zeros_like(labels[:, 1:]))  # (B, T-1) -100 -> 0
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=-1)  # (B,)


def torch_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair sigmoid DPO loss, eq. (7):  -log sigma(beta (log pi_w/pi_ref_w - log pi_l/pi_ref_l)).

    Args: four (N,) tensors (the reference ones constants) and beta > 0.
    Returns: (N,) tensor.
    """
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (N,)
    return -F.logsigmoid(z)


def _default_decay(name: str, t) -> bool:
    """minidpo.optim.default_decay_filter: decay tensors with ndim >= 2 (matrices, embeddings)."""
    return t.ndim >= 2


class TorchDPOStep:
    """One DPO training step in PyTorch, the twin of minidpo.train.dpo_step + clip + AdamW.

    The policy is a :class:`TorchGPT`; the reference is a second one, frozen (no gradients,
    evaluated under ``torch.no_grad``). The optimizer is ``torch.optim.AdamW`` with two groups:
    tensors with ndim >= 2 decay with ``weight_decay``, the others (biases, layernorm gains) do
    not, as minidpo.optim.default_decay_filter decides. Clipping is
    ``torch.nn.utils.clip_grad_norm_`` (global L2 norm, scale min(1, max_norm / (norm + 1e-6))),
    the rule minidpo.optim.clip_grad_norm follows.

    Args:
        config: dict or object with ``to_dict()`` (minidpo's GPTConfig).
        policy_params: minidpo params dict (NumPy or CuPy), copied.
        ref_params: the reference's params dict, or None for a copy of ``policy_params``.
        beta: the DPO beta.
        lr, betas, eps, weight_decay: AdamW's hyperparameters.
        grad_clip: max global gradient norm (None: no clipping).
        device, dtype: where and in what precision the tensors live.
        attn_impl: "sdpa" or "math", as for TorchGPT.
    """

    def __init__(self, config, policy_params: Mapping, ref_params: Mapping | None = None, *, beta: float = 0.1,
                 lr: float = 1e-4, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 grad_clip: float | None = 1.0, device="cpu", dtype=torch.float32, attn_impl: str = "sdpa"):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.device = torch.device(device)
        self.policy = TorchGPT(config, policy_params, device=device, dtype=dtype, attn_impl=attn_impl)
        self.reference = TorchGPT(config, policy_params if ref_params is None else ref_params, device=device,
                                  dtype=dtype, attn_impl=attn_impl)
        self.reference.requires_grad_(False)
        named = self.policy.named_gpt2_parameters()
        decay = [t for n, t in named.items() if _default_decay(n, t)]
        no_decay = [t for n, t in named.items() if not _default_decay(n, t)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
        )

    def as_tensors(self, input_ids, loss_mask):
        """Host (or CuPy) arrays -> int64 and bool tensors on this step's device."""
        ids = torch.as_tensor(_host(input_ids), dtype=torch.int64, device=self.device)
        mask = torch.as_tensor(_host(loss_mask) != 0, dtype=torch.bool, device=self.device)
        return ids, mask

    @torch.no_grad()
    def reference_logps(self, input_ids, loss_mask):
        """log pi_ref(y|x) of every row, (2N,), no gradient."""
        return torch_sequence_logps(self.reference(input_ids), input_ids, loss_mask)

    def loss(self, input_ids, loss_mask, ref_logps, logits=None):
        """Mean DPO loss of the batch (rows [chosen; rejected]) and the policy's (2N,) log-probs.

        Args:
            input_ids: (2N, T) int64 tensor; loss_mask: (2N, T) bool tensor.
            ref_logps: (2N,) tensor of log pi_ref(y|x), a constant.
            logits: the policy's (2N, T, V) logits if already computed (to time the phases
                separately), else they are computed here.
        """
        if logits is None:
            logits = self.policy(input_ids)  # (2N, T, V)
        logps = torch_sequence_logps(logits, input_ids, loss_mask)  # (2N,)
        n = input_ids.shape[0] // 2
        ref_logps = ref_logps.detach()
        losses = torch_dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], self.beta)  # (N,)
        return losses.mean(), logps

    def clip_and_update(self):
        """Clip the policy's gradients (global norm), take one AdamW step, zero the gradients.
        Returns the gradient norm before clipping (a 0-d tensor; inf when not clipping)."""
        params = list(self.policy.parameters())
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.full((), float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def step(self, input_ids, loss_mask, ref_logps=None):
        """One full training step. ``ref_logps`` None: the reference forward runs inside the step
        (the "full" DPO step); else the cached (2N,) reference log-probs are used. Returns the loss."""
        if ref_logps is None:
            ref_logps = self.reference_logps(input_ids, loss_mask)
        loss, _ = self.loss(input_ids, loss_mask, ref_logps)
        loss.backward()
        self.clip_and_update()
        return loss.detach()
