"""minidpo's GPT-2 against the same model in PyTorch (bench/torch_reference.py, autograd for the
gradients) and against Hugging Face transformers' GPT2LMHeadModel loaded from the same dict."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from bench.torch_reference import TorchGPT, numpy_from_torch, torch_params_from_numpy  # noqa: E402
from minidpo.generate import generate, left_pad  # noqa: E402
from minidpo.packing import layout_from_attention_mask
from minidpo.model import GPTConfig, gpt_backward, gpt_forward, init_params  # noqa: E402

CFG = GPTConfig(vocab_size=23, n_ctx=12, n_layer=2, n_head=3, n_embd=12)  # D = 4


def noisy_params(config, seed, dtype):
    """GPT-2 init plus noise: logits and gradients of order 1, biases and gains not trivial."""
    rng = np.random.default_rng(seed)
    p = init_params(config, seed=seed, dtype=np.float64)
    return {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(dtype) for k, v in p.items()}


def batch(config, B, T, rng, left_padded):
    idx = rng.integers(0, config.vocab_size, (B, T))
    if not left_padded:
        return idx, None, None
    lens = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None, :] >= (T - lens)[:, None]).astype(np.int64)
    return idx, mask, np.maximum(np.cumsum(mask, 1) - 1, 0)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 3), T=st.integers(1, 12), left_padded=st.booleans(),
       impl=st.sampled_from(["sdpa", "math"]))
def test_same_logits_and_gradients_as_torch_float32(seed, B, T, left_padded, impl):
    rng = np.random.default_rng(seed)
    params = noisy_params(CFG, seed, np.float32)
    idx, mask, pos = batch(CFG, B, T, rng, left_padded)
    W = rng.standard_normal((B, T, CFG.vocab_size)).astype(np.float32)

    logits, cache = gpt_forward(params, idx, CFG, None if mask is None else layout_from_attention_mask(mask, pos))
    grads = gpt_backward(W, cache)

    ref = TorchGPT(CFG, params, dtype=torch.float32, attn_impl=impl)
    t_logits = ref(torch.as_tensor(idx), mask, pos)
    (t_logits * torch.as_tensor(W)).sum().backward()
    t_grads = ref.grads_numpy()

    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-4, atol=2e-5)
    assert set(t_grads) == set(grads)
    for name, g in grads.items():
        scale = np.abs(t_grads[name]).max()
        np.testing.assert_allclose(g, t_grads[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), err_msg=name)


def test_same_gradients_as_torch_float64_tightly():
    rng = np.random.default_rng(0)
    params = noisy_params(CFG, 1, np.float64)
    idx, mask, pos = batch(CFG, 3, 10, rng, True)
    W = rng.standard_normal((3, 10, CFG.vocab_size))
    logits, cache = gpt_forward(params, idx, CFG, None if mask is None else layout_from_attention_mask(mask, pos))
    grads = gpt_backward(W, cache)
    ref = TorchGPT(CFG.to_dict(), params, dtype=torch.float64, attn_impl="math")
    t_logits = ref(idx, mask, pos)
    (t_logits * torch.as_tensor(W)).sum().backward()
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-11, atol=1e-11)
    for name, g in ref.grads_numpy().items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-9, atol=1e-10, err_msg=name)


def test_reference_round_trips_params_and_rejects_bad_input():
    params = noisy_params(CFG, 2, np.float32)
    ref = TorchGPT(CFG, params)
    back = ref.params_numpy()
    assert all(np.array_equal(back[k], params[k]) for k in params)
    assert all(np.array_equal(v, params[k]) for k, v in numpy_from_torch(torch_params_from_numpy(params)).items())
    assert len(list(ref.parameters())) == len(params)
    assert all((g == 0).all() for g in ref.grads_numpy().values())  # before any backward
    with pytest.raises(KeyError, match="transformer.h.1.ln_2.bias"):
        TorchGPT(CFG, {k: v for k, v in params.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(ValueError, match="attn_impl"):
        TorchGPT(CFG, params, attn_impl="flash")


# ---------------------------------------------------------------------- Hugging Face transformers


def hf_model(config, params):
    transformers = pytest.importorskip("transformers")
    hc = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, layer_norm_epsilon=config.layer_norm_epsilon, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(hc).eval()
    result = model.load_state_dict(torch_params_from_numpy(params), strict=False)
    # the checkpoint names load without renames; only the tied lm_head is not a separate tensor
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    model.tie_weights()
    return model


def test_names_load_into_huggingface_gpt2_and_logits_agree():
    params = noisy_params(CFG, 3, np.float32)
    model = hf_model(CFG, params)
    idx = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        hf_logits = model(torch.as_tensor(idx)).logits.numpy()
    logits, _ = gpt_forward(params, idx, CFG)
    np.testing.assert_allclose(logits, hf_logits, rtol=1e-4, atol=2e-5)


def test_greedy_generation_matches_huggingface_token_for_token():
    params = noisy_params(CFG, 4, np.float32)
    model = hf_model(CFG, params)
    prompts = [[5, 6, 7, 8], [9], [1, 2]]
    ours = generate(params, CFG, prompts, 6, greedy=True)
    idx, mask, _ = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(idx), attention_mask=torch.as_tensor(mask), max_new_tokens=6,
            min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
        )
    theirs = out[:, idx.shape[1]:].tolist()
    assert ours == theirs
