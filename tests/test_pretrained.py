"""Hugging Face GPT-2 directories: import a transformers-saved model and match its logits, log-probs,
DPO gradients and greedy generation; export one that transformers loads unchanged; refuse every
malformed directory with a message naming what is wrong."""

import json
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file

from minidpo.checkpoint import save_checkpoint
from minidpo.generate import generate, left_pad
from minidpo.logprobs import sequence_logps, sequence_logps_backward
from minidpo.packing import padded_batch
from minidpo.losses import dpo_loss
from minidpo.model import GPTConfig, gpt_backward, gpt_forward, init_params, param_names, param_shapes
from minidpo.pretrained import (
    PretrainedError,
    config_from_hf,
    config_to_hf,
    is_pretrained_dir,
    load_pretrained,
    read_safetensors,
    save_pretrained,
)
from minidpo.tokenizer import BPETokenizer
from tests.conftest import requires_cuda

TEXTS = [
    "the cat sat on the mat", "a dog ran in the park", "hello world, hello there",
    "the quick brown fox jumps over the lazy dog", "it was a good movie, i liked it",
    "the food was bad and the service was slow", "what a wonderful day in the sun",
] * 10
SIZES = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)
BETA = 0.1


def train_tokenizer(special=("<|endoftext|>",), vocab_size=300) -> BPETokenizer:
    """A tiny byte-level BPE (vocabulary a little under 300)."""
    return BPETokenizer.train(TEXTS, vocab_size=vocab_size, special_tokens=special)


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# ============================================================================ a transformers model


@pytest.fixture(scope="module")
def hf():
    """(directory, reference model, tokenizer): a random GPT2LMHeadModel saved by transformers itself
    (safetensors), weights perturbed away from the near-uniform init, tokenizer.json beside it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    tok = train_tokenizer()
    hc = transformers.GPT2Config(
        vocab_size=tok.vocab_size, **SIZES, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hc)
    with torch.no_grad():
        for p in model.parameters():  # tied wte appears once
            p.add_(0.15 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        d = f"{tmp}/gpt2-tiny"
        model.save_pretrained(d)  # transformers' own writer: model.safetensors, config.json
        tok.backend_tokenizer.save(f"{d}/tokenizer.json")
        # the reference is the model as transformers reads it back, eager attention (plain matmuls)
        ref = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").eval()
        yield d, ref, tok


def right_padded_batch(tok, pairs):
    """DPO batch: rows [chosen_0 .. chosen_{N-1}, rejected_0 .. rejected_{N-1}], right-padded with
    pad_id; loss_mask marks the response tokens (EOS included)."""
    rows, masks = [], []
    for which in (1, 2):
        for p in pairs:
            prompt, resp = tok.encode(p[0]), tok.encode(p[which]) + [tok.eos_id]
            rows.append(prompt + resp)
            masks.append([0] * len(prompt) + [1] * len(resp))
    T = max(map(len, rows))
    idx = np.full((len(rows), T), tok.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, (r, m) in enumerate(zip(rows, masks)):
        idx[b, :len(r)], mask[b, :len(m)] = r, m
    return idx, mask


PAIRS = [("the movie was", " good and i liked it", " bad"), ("hello", " world", " there, the dog ran")]


def torch_logps(torch, logits, idx, mask):
    """(R) in torch: sum over response tokens of log softmax(logits[t])[idx[t+1]]."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    lp = lp.gather(-1, torch.as_tensor(idx[:, 1:])[..., None])[..., 0]
    return (lp * torch.as_tensor(mask[:, 1:], dtype=lp.dtype)).sum(dim=1)


def test_import_matches_transformers_logits_and_logps(hf):
    torch = pytest.importorskip("torch")
    d, ref, tok = hf
    params, config, loaded_tok = load_pretrained(d)
    assert config == GPTConfig(vocab_size=tok.vocab_size, n_ctx=64, n_layer=2, n_head=2, n_embd=32)
    assert all(a.dtype == np.float32 and a.flags.writeable for a in params.values())
    # GPT-2 style tokenizer: only <|endoftext|>, so pad == eos
    assert loaded_tok.eos_id == loaded_tok.pad_id == tok.eos_id
    assert loaded_tok.encode_batch(TEXTS[:7]) == tok.encode_batch(TEXTS[:7])

    idx, mask = right_padded_batch(loaded_tok, PAIRS)
    assert len(set((mask.sum(1)).tolist())) > 1 and (idx == loaded_tok.pad_id).any()  # really padded
    with torch.no_grad():
        ref_logits = ref(torch.as_tensor(idx)).logits
    logits, _ = gpt_forward(params, idx, config)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-4, atol=1e-5)

    batch = padded_batch(idx, mask)  # the scored tokens of the padded rows
    logps, _ = sequence_logps(logits.reshape(-1, logits.shape[-1])[batch.logits_at], batch.labels,
                              batch.weights(logits.dtype))
    with torch.no_grad():
        ref_logps = torch_logps(torch, ref_logits, idx, mask).numpy()
    assert logps.dtype == np.float32 and np.all(logps < 0)
    np.testing.assert_allclose(logps, ref_logps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dpo_gradient_of_every_parameter_matches_torch_autograd(hf, dtype):
    torch = pytest.importorskip("torch")
    import copy

    d, ref, tok = hf
    params, config, _ = load_pretrained(d, dtype=dtype)
    assert all(a.dtype == dtype for a in params.values())
    model = copy.deepcopy(ref).to(torch.float64 if dtype == np.float64 else torch.float32)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: wte's grad sums both uses
    idx, mask = right_padded_batch(tok, PAIRS)
    N = len(PAIRS)
    ref_logps = np.array([-30.0, -12.5, -20.0, -33.0])  # fixed reference log-probs (constants)

    # minidpo: forward at the scored positions, (R), eq. (7), then the backward chain by hand
    batch = padded_batch(idx, mask)
    logits, cache = gpt_forward(params, idx, config, batch.layout, logits_at=batch.logits_at)
    logps, lcache = sequence_logps(logits, batch.labels, batch.weights(dtype))
    out = dpo_loss(logps[:N], logps[N:], ref_logps[:N], ref_logps[N:], beta=BETA)
    assert out.losses.dtype == dtype
    dlogps = np.concatenate([out.grad_policy_chosen_logps, out.grad_policy_rejected_logps])  # (2N,)
    grads = gpt_backward(sequence_logps_backward(dlogps, lcache), cache)

    # torch autograd through transformers' GPT2LMHeadModel
    lp = torch_logps(torch, model(torch.as_tensor(idx)).logits, idx, mask)
    r = torch.as_tensor(ref_logps, dtype=lp.dtype)
    h = (lp[:N] - r[:N]) - (lp[N:] - r[N:])
    loss = -torch.nn.functional.logsigmoid(BETA * h).mean()
    loss.backward()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(out.loss), loss.item(), **tol)

    theirs = {n: p.grad.numpy() for n, p in model.named_parameters()}
    assert set(theirs) == set(param_names(config)) == set(grads)
    for name in param_names(config):
        g, t = grads[name], theirs[name]
        assert g.dtype == dtype and g.shape == t.shape, name
        scale = float(np.abs(t).max())
        assert scale > 0, name  # every parameter really receives gradient
        atol = (1e-5 if dtype == np.float32 else 1e-12) * scale
        np.testing.assert_allclose(g, t, rtol=(1e-3 if dtype == np.float32 else 1e-9), atol=atol, err_msg=name)


def test_export_loads_into_transformers_unchanged_and_back_bit_identically(hf, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, ref, tok = hf
    params, config, loaded_tok = load_pretrained(d)
    out = save_pretrained(tmp_path / "export", params, config, loaded_tok)
    assert out == tmp_path / "export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp directory left
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]

    model, info = transformers.GPT2LMHeadModel.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    model.eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ref_sd, sd = ref.state_dict(), model.state_dict()
    for name in param_names(config):
        assert torch.equal(sd[name], ref_sd[name]), name  # the very same weights
    assert model.config.eos_token_id == tok.eos_id and model.config.n_positions == config.n_ctx
    idx, _ = right_padded_batch(loaded_tok, PAIRS)
    with torch.no_grad():
        a, b = model(torch.as_tensor(idx)).logits.numpy(), ref(torch.as_tensor(idx)).logits.numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # transformers' tokenizer reads the exported files and encodes like minidpo
    ht = transformers.AutoTokenizer.from_pretrained(out)
    assert ht.eos_token == loaded_tok.eos_token and ht.eos_token_id == loaded_tok.eos_id
    for text in TEXTS[:7] + ["unseen wörds ☃, spaces  and\nnewlines"]:
        assert ht(text)["input_ids"] == loaded_tok.encode(text), text

    again, config2, tok2 = load_pretrained(out)
    assert config2 == config and set(again) == set(params)
    for name in params:
        assert_bits_equal(again[name], params[name])
    assert (tok2.eos_id, tok2.pad_id) == (loaded_tok.eos_id, loaded_tok.pad_id)
    assert tok2.encode_batch(TEXTS[:7]) == loaded_tok.encode_batch(TEXTS[:7])


def test_greedy_generation_matches_transformers_token_for_token(hf):
    torch = pytest.importorskip("torch")
    d, ref, tok = hf
    params, config, loaded_tok = load_pretrained(d)
    eos = loaded_tok.eos_id
    prompts = [loaded_tok.encode("the cat sat"), loaded_tok.encode("hello world, hello there, a dog")]
    new = 12

    def theirs(batch):
        idx, mask, _ = left_pad(batch, pad_id=eos)
        with torch.no_grad():
            out = ref.generate(input_ids=torch.as_tensor(idx), attention_mask=torch.as_tensor(mask),
                               do_sample=False, max_new_tokens=new, pad_token_id=eos, eos_token_id=eos)
        rows = []
        for row in out[:, idx.shape[1]:].tolist():  # finished rows are padded after their EOS
            rows.append(row[:row.index(eos) + 1] if eos in row else row)
        return rows

    for p in prompts:  # one at a time
        assert generate(params, config, [p], new, greedy=True, eos_id=eos) == theirs([p])
    batched = generate(params, config, prompts, new, greedy=True, eos_id=eos)  # left-padded batch
    assert batched == theirs(prompts)
    assert any(len(r) > 1 for r in batched)  # something was generated


# ============================================================================ minidpo-made directories

CFG = GPTConfig(vocab_size=300, n_ctx=16, n_layer=2, n_head=2, n_embd=8)


@pytest.fixture(scope="module")
def tiny_tok():
    return train_tokenizer()


@pytest.fixture
def model_dir(tmp_path, tiny_tok):
    """(directory, params): a minidpo export of a random model with a tokenizer."""
    params = init_params(CFG, seed=1)
    rng = np.random.default_rng(1)
    params = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    return save_pretrained(tmp_path / "m", params, CFG, tiny_tok), params


def rewrite_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(d, fn):
    tensors = read_safetensors(d / "model.safetensors")
    save_file(fn(tensors), str(d / "model.safetensors"), metadata={"format": "pt"})


def test_roundtrip_of_a_minidpo_model_is_bit_identical_with_its_tokenizer(model_dir, tiny_tok):
    d, params = model_dir
    assert is_pretrained_dir(d)
    cfg = json.loads((d / "config.json").read_text())
    for key, want in [("model_type", "gpt2"), ("architectures", ["GPT2LMHeadModel"]), ("n_positions", 16),
                      ("n_ctx", 16), ("activation_function", "gelu_new"), ("tie_word_embeddings", True),
                      ("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0),
                      ("eos_token_id", tiny_tok.eos_id), ("bos_token_id", tiny_tok.eos_id)]:
        assert cfg[key] == want, key
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(param_names(CFG))  # transformer. prefix, no lm_head
    got, config, tok = load_pretrained(d)
    assert config == CFG
    for name in params:
        assert_bits_equal(got[name], params[name])
    assert tok.encode_batch(TEXTS) == tiny_tok.encode_batch(TEXTS)
    # and the loaded model computes what the original computes
    idx = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7))
    np.testing.assert_array_equal(gpt_forward(got, idx, CFG)[0], gpt_forward(params, idx, CFG)[0])


@given(
    n_layer=st.integers(1, 2), n_head=st.integers(1, 3), head_size=st.integers(1, 4),
    vocab_size=st.integers(1, 40), n_ctx=st.integers(1, 9),
    eps=st.floats(1e-12, 1e-1), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-30, 1.0, 1e30]),
)
def test_any_size_roundtrips_bit_identically(n_layer, n_head, head_size, vocab_size, n_ctx, eps, seed, scale):
    """save_pretrained then load_pretrained is the identity on every float32 bit pattern drawn,
    tiny and huge magnitudes included, for any model size; config.json reproduces the config."""
    config = GPTConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_layer=n_layer, n_head=n_head,
                       n_embd=n_head * head_size, layer_norm_epsilon=eps)
    rng = np.random.default_rng(seed)
    params = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in param_shapes(config).items()}
    with tempfile.TemporaryDirectory() as tmp:
        d = save_pretrained(f"{tmp}/m", params, config)
        got, config2, tok = load_pretrained(d)
        assert config2 == config and tok is None
        assert list(got) == list(params)
        for name in params:
            assert_bits_equal(got[name], params[name])


def test_float64_load_and_float64_params_export_as_float32(model_dir, tmp_path):
    d, params = model_dir
    p64, _, _ = load_pretrained(d, dtype=np.float64, load_tokenizer=False)
    for name, a in p64.items():
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, params[name].astype(np.float64))
    logits, _ = gpt_forward(p64, np.array([[1, 2, 3]]), CFG)
    assert logits.dtype == np.float64
    out = save_pretrained(tmp_path / "from64", p64, CFG)
    back, _, tok = load_pretrained(out)
    assert tok is None  # no tokenizer given, none written
    for name in params:
        assert_bits_equal(back[name], params[name])
    with pytest.raises(TypeError, match="floating"):
        load_pretrained(d, dtype=np.int32)


def test_original_gpt2_layout_without_prefix_with_buffers_and_tied_lm_head(model_dir):
    """The Hub's GPT-2 files: no transformer. prefix, attn.bias / attn.masked_bias buffers, and
    (in some exports) an lm_head.weight equal to wte."""
    d, params = model_dir
    n = CFG.n_ctx

    def to_hub_layout(t):
        out = {k[len("transformer."):]: v for k, v in t.items()}
        for i in range(CFG.n_layer):
            out[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), dtype=np.float32))[None, None]
            out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
        out["lm_head.weight"] = t["transformer.wte.weight"].copy()
        return out

    rewrite_tensors(d, to_hub_layout)
    got, _, _ = load_pretrained(d)
    assert set(got) == set(params)
    for name in params:
        assert_bits_equal(got[name], params[name])


def test_half_precision_files_are_widened(model_dir):
    d, params = model_dir
    rewrite_tensors(d, lambda t: {k: v.astype(np.float16) for k, v in t.items()})
    got, _, _ = load_pretrained(d)
    for name in params:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], params[name].astype(np.float16).astype(np.float32))


def test_bfloat16_files_are_widened_exactly(model_dir):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save_file

    d, params = model_dir
    bf = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in params.items()}
    torch_save_file(bf, str(d / "model.safetensors"), metadata={"format": "pt"})
    got, _, _ = load_pretrained(d)
    for name in params:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], bf[name].float().numpy())
    assert any(not np.array_equal(got[n], params[n]) for n in params)  # bf16 really rounded


def test_sharded_checkpoint_with_index(model_dir):
    d, params = model_dir
    tensors = read_safetensors(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / file), metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert is_pretrained_dir(d)
    got, _, _ = load_pretrained(d)
    for name in params:
        assert_bits_equal(got[name], params[name])
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(PretrainedError, match="model-00002-of-00002.safetensors.*missing"):
        load_pretrained(d)


# ---------------------------------------------------------------------------- malformed directories


def test_missing_config_json(model_dir):
    d, _ = model_dir
    (d / "config.json").unlink()
    assert not is_pretrained_dir(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(d)


def test_missing_directory_and_a_file_instead(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(PretrainedError, match="not a directory"):
        load_pretrained(tmp_path / "f")


@pytest.mark.parametrize("key, value, pattern", [
    ("activation_function", "relu", r"'activation_function' = 'relu' is not supported"),
    ("activation_function", "gelu", r"'activation_function' = 'gelu'"),
    ("tie_word_embeddings", False, r"'tie_word_embeddings' = false is not supported.*untied"),
    ("scale_attn_weights", False, r"'scale_attn_weights' = false"),
    ("scale_attn_by_inverse_layer_idx", True, r"'scale_attn_by_inverse_layer_idx' = true"),
    ("reorder_and_upcast_attn", True, r"'reorder_and_upcast_attn' = true"),
    ("add_cross_attention", True, r"'add_cross_attention' = true"),
    ("n_inner", 64, r"'n_inner' = 64 is not supported.*4 \* n_embd = 32"),
    ("model_type", "gpt_neo", r"'model_type' = 'gpt_neo'"),
    ("n_layer", ..., r"missing key 'n_layer'"),
    ("n_head", 2.0, r"'n_head' must be a positive integer, got 2.0"),
    ("n_head", 3, r"'n_embd' = 8 is not divisible by 'n_head' = 3"),
    ("layer_norm_epsilon", -1, r"'layer_norm_epsilon' must be a positive number"),
    ("scale_attn_weights", "yes", r"'scale_attn_weights' must be true or false"),
])
def test_unsupported_config_is_refused_by_key(model_dir, key, value, pattern):
    d, _ = model_dir
    rewrite_config(d, **{key: value})
    with pytest.raises(PretrainedError, match=pattern) as err:
        load_pretrained(d)
    assert "config.json" in str(err.value)


def test_accepted_config_variants(model_dir):
    d, params = model_dir
    # gelu_pytorch_tanh is the same tanh GELU; absent optional keys take GPT2Config's defaults;
    # the legacy n_ctx key is used when n_positions is absent
    rewrite_config(d, activation_function="gelu_pytorch_tanh", tie_word_embeddings=..., scale_attn_weights=...,
                   n_inner=None, n_positions=..., layer_norm_epsilon=...)
    got, config, _ = load_pretrained(d)
    assert config == CFG
    rewrite_config(d, n_ctx=..., n_positions=..., max_position_embeddings=16)
    assert load_pretrained(d)[1] == CFG


def test_invalid_config_json(model_dir):
    d, _ = model_dir
    (d / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match="config.json: invalid JSON"):
        load_pretrained(d)


def test_untied_lm_head_is_refused(model_dir):
    d, _ = model_dir

    def untie(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + np.float32(0.5)
        return t

    rewrite_tensors(d, untie)
    with pytest.raises(PretrainedError, match=r"lm_head.weight differs from transformer.wte.weight.*0.5.*untied"):
        load_pretrained(d)
    rewrite_tensors(d, lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"][:10]})
    with pytest.raises(PretrainedError, match=r"lm_head.weight has shape \(10, 8\).*\(300, 8\).*untied"):
        load_pretrained(d)


def test_missing_tensor_names_key_and_shape(model_dir):
    d, _ = model_dir
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != "transformer.h.1.mlp.c_fc.bias"})
    with pytest.raises(PretrainedError, match=r"missing tensor\(s\) transformer.h.1.mlp.c_fc.bias \(32,\)"):
        load_pretrained(d)


def test_wrong_shape_names_key_and_both_shapes(model_dir):
    d, _ = model_dir
    rewrite_tensors(d, lambda t: {**t, "transformer.wpe.weight": t["transformer.wpe.weight"][:15]})
    with pytest.raises(PretrainedError, match=r"transformer.wpe.weight has shape \(15, 8\), expected \(16, 8\)"):
        load_pretrained(d)


def test_transposed_weight_gets_a_layout_hint(model_dir):
    d, _ = model_dir
    k = "transformer.h.0.mlp.c_fc.weight"
    rewrite_tensors(d, lambda t: {**t, k: np.ascontiguousarray(t[k].T)})
    pattern = r"c_fc.weight has shape \(32, 8\), expected \(8, 32\) \(transposed.*Conv1D"
    with pytest.raises(PretrainedError, match=pattern):
        load_pretrained(d)


def test_unexpected_tensor_names_key_and_shape(model_dir):
    d, _ = model_dir
    rewrite_tensors(d, lambda t: {**t, "transformer.h.2.ln_1.weight": np.ones(8, np.float32),
                                  "score.weight": np.zeros((2, 8), np.float32)})
    with pytest.raises(PretrainedError, match=r"unexpected tensor\(s\).*score.weight \(2, 8\)") as err:
        load_pretrained(d)
    assert "transformer.h.2.ln_1.weight (8,)" in str(err.value)


def test_duplicate_tensor_with_and_without_prefix(model_dir):
    d, _ = model_dir
    rewrite_tensors(d, lambda t: {**t, "ln_f.bias": t["transformer.ln_f.bias"]})
    with pytest.raises(PretrainedError, match="appears twice"):
        load_pretrained(d)


def test_only_pytorch_model_bin_is_refused_without_unpickling(model_dir):
    d, _ = model_dir
    (d / "model.safetensors").unlink()
    # not a valid pickle at all: any attempt to read it would fail differently
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 this file must never be opened")
    assert is_pretrained_dir(d)  # so the CLI reaches load_pretrained's explanation
    with pytest.raises(PretrainedError, match=r"only in pytorch_model.bin, a pickle file.*safetensors"):
        load_pretrained(d)
    (d / "pytorch_model.bin").unlink()
    assert not is_pretrained_dir(d)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(d)


def test_corrupt_safetensors(model_dir):
    d, _ = model_dir
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(PretrainedError, match="truncated or corrupt"):
        load_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(PretrainedError, match="not a safetensors file"):
        load_pretrained(d)
    (d / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(PretrainedError, match="header length"):
        load_pretrained(d)


def test_integer_and_non_finite_tensors(model_dir):
    d, _ = model_dir
    good = read_safetensors(d / "model.safetensors")
    rewrite_tensors(d, lambda t: {**t, "transformer.ln_f.bias": np.zeros(8, np.int32)})
    with pytest.raises(PretrainedError, match="transformer.ln_f.bias.*floating point"):
        load_pretrained(d)
    bad = dict(good)
    bad["transformer.h.0.ln_2.weight"] = good["transformer.h.0.ln_2.weight"].copy()
    bad["transformer.h.0.ln_2.weight"][3] = np.nan
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(PretrainedError, match="transformer.h.0.ln_2.weight.*non-finite"):
        load_pretrained(d)


# ---------------------------------------------------------------------------- tokenizers


def test_vocab_json_and_merges_txt(model_dir, tiny_tok):
    d, _ = model_dir
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink()
    tiny_tok.backend_tokenizer.model.save(str(d))  # vocab.json + merges.txt, GPT-2's original files
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    _, _, tok = load_pretrained(d)
    assert tok.eos_id == tok.pad_id == tiny_tok.eos_id
    assert tok.encode_batch(TEXTS) == tiny_tok.encode_batch(TEXTS)
    assert tok.decode(tok.encode("hello world ☃")) == "hello world ☃"


def test_no_tokenizer_files_gives_none(model_dir):
    d, params = model_dir
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink()
    got, _, tok = load_pretrained(d)
    assert tok is None and set(got) == set(params)


def test_eos_and_pad_from_config_ids_when_no_endoftext(tmp_path):
    tok = train_tokenizer(special=("</s>", "<pad>", "<sep>"), vocab_size=290)
    assert tok.token_to_id("<|endoftext|>") is None
    params = init_params(CFG, seed=2)
    d = save_pretrained(tmp_path / "m", params, CFG, tok)
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink()
    rewrite_config(d, eos_token_id=tok.token_to_id("<sep>"), pad_token_id=None)
    _, _, t = load_pretrained(d)
    assert t.eos_token == t.pad_token == "<sep>"  # from eos_token_id; pad = eos when none
    rewrite_config(d, eos_token_id=[tok.token_to_id("</s>")], pad_token_id=tok.token_to_id("<pad>"))
    _, _, t = load_pretrained(d)
    assert (t.eos_token, t.pad_token) == ("</s>", "<pad>")
    # tokenizer_config.json's names win over config.json's ids
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<sep>"}}))
    _, _, t = load_pretrained(d)
    assert (t.eos_token, t.pad_token) == ("<sep>", "<pad>")
    (d / "tokenizer_config.json").unlink()
    rewrite_config(d, eos_token_id=None)
    with pytest.raises(PretrainedError, match="cannot tell the EOS token"):
        load_pretrained(d)
    rewrite_config(d, eos_token_id=CFG.vocab_size - 1)  # tokenizer has fewer ids than the model
    assert tok.vocab_size < CFG.vocab_size
    with pytest.raises(PretrainedError, match="cannot tell the EOS token.*'eos_token_id' = 299 is not an id"):
        load_pretrained(d)


def test_config_eos_id_outside_the_tokenizer_falls_back_to_endoftext_with_a_warning(model_dir, tiny_tok):
    d, _ = model_dir
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink()
    rewrite_config(d, eos_token_id=50256, bos_token_id=50256, pad_token_id=None)  # GPT2Config's defaults
    with pytest.warns(UserWarning, match="'eos_token_id' = 50256 is not an id of the tokenizer"):
        _, _, t = load_pretrained(d)
    assert t.eos_token == t.pad_token == "<|endoftext|>" and t.eos_id == tiny_tok.eos_id


def test_exported_pad_token_survives_the_roundtrip(tmp_path):
    tok = train_tokenizer(special=("<|endoftext|>", "<|pad|>"))
    d = save_pretrained(tmp_path / "m", init_params(CFG, seed=3), CFG, tok)
    assert json.loads((d / "config.json").read_text())["pad_token_id"] == tok.pad_id != tok.eos_id
    _, _, t = load_pretrained(d)
    assert (t.eos_id, t.pad_id) == (tok.eos_id, tok.pad_id)
    assert BPETokenizer.load(d).pad_id == tok.pad_id  # the plain tokenizer loader agrees


def test_tokenizer_larger_than_the_vocabulary(tmp_path, tiny_tok):
    small = GPTConfig(vocab_size=200, n_ctx=16, n_layer=1, n_head=2, n_embd=8)
    params = init_params(small, seed=0)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's vocab_size is 200"):
        save_pretrained(tmp_path / "m", params, small, tiny_tok)
    assert not (tmp_path / "m").exists()
    d = save_pretrained(tmp_path / "m", params, small)
    tiny_tok.backend_tokenizer.save(str(d / "tokenizer.json"))
    with pytest.raises(PretrainedError, match=r"tokenizer has \d+ tokens but config.json's vocab_size is 200"):
        load_pretrained(d)


# ---------------------------------------------------------------------------- saving


def test_save_replaces_an_earlier_export_atomically(model_dir, tiny_tok, tmp_path, monkeypatch):
    d, params = model_dir
    newer = {k: v + np.float32(1) for k, v in params.items()}
    assert save_pretrained(d, newer, CFG, tiny_tok) == d
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old directory left
    got, _, _ = load_pretrained(d)
    assert all(np.array_equal(got[k], newer[k]) for k in params)

    import minidpo.checkpoint

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(minidpo.checkpoint, "save_file", fail)  # the writer of checkpoints and exports
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(d, params, CFG, tiny_tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # temp directory removed
    got, _, _ = load_pretrained(d)  # the earlier export is untouched
    assert all(np.array_equal(got[k], newer[k]) for k in params)


def test_save_never_deletes_foreign_files(model_dir, tmp_path):
    d, params = model_dir
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes.txt.*refusing to replace"):
        save_pretrained(d, params, CFG)
    assert (d / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pretrained(tmp_path / "afile", params, CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(empty, params, CFG)
    assert is_pretrained_dir(empty)


def test_save_validates_params(tmp_path):
    params = init_params(CFG, seed=0)
    bad = dict(params)
    del bad["transformer.ln_f.bias"]
    with pytest.raises(KeyError, match="missing"):
        save_pretrained(tmp_path / "a", bad, CFG)
    bad = {**params, "transformer.wpe.weight": params["transformer.wpe.weight"][:3]}
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        save_pretrained(tmp_path / "a", bad, CFG)
    nan = {k: v.copy() for k, v in params.items()}
    nan["transformer.h.1.attn.c_proj.bias"][0] = np.inf
    with pytest.raises(ValueError, match="transformer.h.1.attn.c_proj.bias.*non-finite"):
        save_pretrained(tmp_path / "a", nan, CFG)
    with pytest.raises(TypeError, match="BPETokenizer"):
        save_pretrained(tmp_path / "a", params, CFG, tokenizer="gpt2")
    assert not (tmp_path / "a").exists()


def test_is_pretrained_dir(tmp_path, model_dir):
    d, params = model_dir
    assert is_pretrained_dir(d) and is_pretrained_dir(str(d))
    assert not is_pretrained_dir(tmp_path / "missing")
    assert not is_pretrained_dir(d / "config.json")  # a file
    ck = save_checkpoint(tmp_path / "ck", params, CFG.to_dict(), step=1)
    assert not is_pretrained_dir(ck)  # a minidpo checkpoint is not a model directory
    only_cfg = tmp_path / "cfg"
    only_cfg.mkdir()
    shutil.copy(d / "config.json", only_cfg / "config.json")
    assert not is_pretrained_dir(only_cfg)


def test_config_dict_roundtrip_and_errors():
    hf = config_to_hf(CFG, eos_token_id=0, pad_token_id=1)
    assert config_from_hf(hf) == CFG
    assert config_from_hf(json.loads(json.dumps(hf))) == CFG
    with pytest.raises(ValueError, match="eos_token_id"):
        config_to_hf(CFG, eos_token_id=CFG.vocab_size)
    with pytest.raises(PretrainedError, match="expected a JSON object"):
        config_from_hf([1, 2])


def test_reading_only_the_needed_tensors_keeps_shapes(model_dir):
    d, _ = model_dir
    t = read_safetensors(d / "model.safetensors")
    assert {k: v.shape for k, v in t.items()} == param_shapes(CFG)
    assert all(v.dtype == np.float32 and v.flags.writeable for v in t.values())


@requires_cuda
def test_load_to_cuda_and_export_from_cuda(model_dir, tmp_path):  # pragma: no cover - needs a GPU
    import cupy

    d, params = model_dir
    got, _, _ = load_pretrained(d, backend="cuda")
    for name in params:
        assert isinstance(got[name], cupy.ndarray) and got[name].dtype == np.float32
        assert_bits_equal(cupy.asnumpy(got[name]), params[name])
    out = save_pretrained(tmp_path / "from_gpu", got, CFG)
    back, _, _ = load_pretrained(out)
    for name in params:
        assert_bits_equal(back[name], params[name])
