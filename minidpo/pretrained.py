"""Hugging Face GPT-2 model directories: read them into minidpo, write minidpo models as them.

A GPT-2 model directory, as ``transformers`` saves it and the Hub serves it:

    dir/config.json                  GPT2Config: sizes, activation, tied embeddings, token ids
    dir/model.safetensors            the weights (or model.safetensors.index.json + shards)
    dir/tokenizer.json               the byte-level BPE (or vocab.json + merges.txt)
    dir/tokenizer_config.json        optional: eos_token / pad_token names
    dir/special_tokens_map.json      optional: the same, older layout

minidpo's parameters are already keyed by GPT-2 checkpoint names in GPT-2's Conv1D layout
(in, out) with the output projection tied to ``transformer.wte.weight`` (see model.py), so
reading a checkpoint is a rename-free copy:

    file name                        minidpo name                          shape
    transformer.wte.weight  or       transformer.wte.weight                (V, C)
    wte.weight (no prefix)
    transformer.h.{i}.attn.c_attn.weight                                   (C, 3C)
    ...                              (every name of model.param_shapes)
    transformer.h.{i}.attn.bias      -- ignored: the causal-mask buffer    (1, 1, n_ctx, n_ctx)
    transformer.h.{i}.attn.masked_bias -- ignored: a constant buffer       ()
    lm_head.weight                   -- dropped if equal to wte (tied)     (V, C)

Only what minidpo's model computes is accepted: pre-norm GPT-2 blocks with the tanh GELU
("gelu_new" / "gelu_pytorch_tanh"), attention scaled by 1/sqrt(D), an MLP of width 4C and a
tied output projection. Any config.json setting that changes that computation is refused by
name, rather than loaded into a model that would silently compute something else.

No pickle: ``pytorch_model.bin`` is never opened (unpickling runs arbitrary code). A directory
holding only that file is refused with the command that converts it to safetensors.

Writing (:func:`save_pretrained`) produces the same layout, readable unchanged by
``transformers.GPT2LMHeadModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``, and
read back bit-identically by :func:`load_pretrained`. It is atomic: everything is written into
a sibling temporary directory which then replaces the target by rename.

Shape letters: V vocabulary, C channels (n_embd).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .backend import get_backend, to_numpy
from .checkpoint import atomic_directory, write_safetensors
from .model import GPTConfig, check_params, param_shapes

__all__ = [
    "PretrainedError",
    "load_pretrained",
    "save_pretrained",
    "is_pretrained_dir",
    "config_from_hf",
    "config_to_hf",
    "read_safetensors",
    "SUPPORTED_ACTIVATIONS",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
EOS_TOKEN = "<|endoftext|>"

# The tanh approximation of GELU, the one minidpo's layers.gelu_forward computes (GPT-2's).
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

# Files save_pretrained writes, and others a GPT-2 export may hold; a target directory with any
# other file is not replaced (it may hold something the user wants).
_WRITTEN_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)
_REPLACEABLE_FILES = frozenset(_WRITTEN_FILES + ("generation_config.json", "vocab.json", "merges.txt"))

# the per-block attention buffers old GPT-2 checkpoints carry: not parameters
_BUFFER_NAME = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_PREFIX = "transformer."
_LM_HEAD = "lm_head.weight"


class PretrainedError(ValueError):
    """A model directory that exists but cannot be loaded as a minidpo GPT-2 (the message says why)."""


# ============================================================================ config.json


def _read_json(file: Path) -> dict:
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise PretrainedError(f"{file}: invalid JSON ({err})") from None
    if not isinstance(d, dict):
        raise PretrainedError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


def _int_field(d: Mapping, keys: tuple[str, ...], where: str) -> int:
    """The first of ``keys`` present in ``d`` as a positive int (aliases: n_embd / hidden_size ...)."""
    for key in keys:
        if key in d and d[key] is not None:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise PretrainedError(f"{where}: {key!r} must be a positive integer, got {v!r}")
            return v
    aliases = f" (or {', '.join(map(repr, keys[1:]))})" if len(keys) > 1 else ""
    raise PretrainedError(f"{where}: missing key {keys[0]!r}{aliases}")


def _flag(d: Mapping, key: str, default: bool, want: bool, where: str, why: str) -> None:
    """Require the boolean setting ``key`` (absent means ``default``) to be ``want``."""
    v = d.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, bool):
        raise PretrainedError(f"{where}: {key!r} must be true or false, got {v!r}")
    if v != want:
        raise PretrainedError(f"{where}: {key!r} = {json.dumps(v)} is not supported: {why}")


def config_from_hf(d: Mapping, where: str = CONFIG_FILE) -> GPTConfig:
    """A :class:`GPTConfig` from a Hugging Face GPT-2 ``config.json`` dict, refusing what minidpo
    does not compute.

    Read: n_layer, n_head, n_embd, vocab_size, n_positions (-> n_ctx; the legacy ``n_ctx`` key is
    used only when n_positions is absent), layer_norm_epsilon (default 1e-5). The aliases
    num_hidden_layers / num_attention_heads / hidden_size / max_position_embeddings are accepted.

    Required values (absent keys take GPT2Config's defaults, which satisfy them):
        model_type                        "gpt2"
        activation_function               one of SUPPORTED_ACTIVATIONS (the tanh GELU)
        tie_word_embeddings               true  (minidpo's output projection IS wte)
        scale_attn_weights                true  (scores / sqrt(D))
        scale_attn_by_inverse_layer_idx   false
        reorder_and_upcast_attn           false
        add_cross_attention               false
        n_inner                           null or 4 * n_embd

    Dropout probabilities are ignored (minidpo has no dropout: eval-mode GPT-2).

    Args:
        d: the parsed config.json.
        where: the file's name, for error messages.
    Returns:
        GPTConfig.
    Raises:
        PretrainedError naming the key and its value for anything missing or unsupported.
    """
    if not isinstance(d, Mapping):
        raise PretrainedError(f"{where}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise PretrainedError(
            f"{where}: 'model_type' = {model_type!r} is not supported: minidpo reads GPT-2 ('gpt2') models only"
        )
    act = d.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise PretrainedError(
            f"{where}: 'activation_function' = {act!r} is not supported: minidpo's GELU is the tanh "
            f"approximation, i.e. one of {', '.join(map(repr, SUPPORTED_ACTIVATIONS))}"
        )
    _flag(d, "tie_word_embeddings", True, True, where,
          "minidpo's output projection is tied to transformer.wte.weight, "
          "so an untied lm_head.weight cannot be represented")
    _flag(d, "scale_attn_weights", True, True, where, "minidpo always scales attention scores by 1/sqrt(head size)")
    _flag(d, "scale_attn_by_inverse_layer_idx", False, False, where,
          "minidpo does not scale attention scores by 1/(layer index + 1)")
    _flag(d, "reorder_and_upcast_attn", False, False, where, "minidpo's attention has no reordered/upcast variant")
    _flag(d, "add_cross_attention", False, False, where, "minidpo's GPT-2 has no cross-attention")

    n_layer = _int_field(d, ("n_layer", "num_hidden_layers"), where)
    n_head = _int_field(d, ("n_head", "num_attention_heads"), where)
    n_embd = _int_field(d, ("n_embd", "hidden_size"), where)
    vocab_size = _int_field(d, ("vocab_size",), where)
    n_ctx = _int_field(d, ("n_positions", "max_position_embeddings", "n_ctx"), where)
    n_inner = d.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise PretrainedError(
            f"{where}: 'n_inner' = {n_inner!r} is not supported: minidpo's MLP width is 4 * n_embd = {4 * n_embd}"
        )
    eps = d.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise PretrainedError(f"{where}: 'layer_norm_epsilon' must be a positive number, got {eps!r}")
    if n_embd % n_head:
        raise PretrainedError(f"{where}: 'n_embd' = {n_embd} is not divisible by 'n_head' = {n_head}")
    return GPTConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     layer_norm_epsilon=float(eps))


def config_to_hf(config: GPTConfig, eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """The ``config.json`` dict of a GPT2LMHeadModel computing what minidpo's model computes.

    Dropout probabilities are 0 so a loaded model evaluates like minidpo's, in train or eval mode.
    ``n_ctx`` is written beside ``n_positions`` (older readers use it); ``bos_token_id`` is the
    EOS id, as in GPT-2.

    Args:
        config: the model size.
        eos_token_id: the EOS id (None when unknown).
        pad_token_id: the padding id (None when unknown).
    Returns:
        a JSON-serialisable dict.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    for name, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        bad = isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < config.vocab_size
        if v is not None and bad:
            raise ValueError(f"{name} must be None or an id in [0, {config.vocab_size}), got {v!r}")
    eos = None if eos_token_id is None else int(eos_token_id)
    pad = None if pad_token_id is None else int(pad_token_id)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


# ============================================================================ safetensors, read


_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_ST_OTHER = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit


class _SafetensorsFile:
    """The header of one .safetensors file; tensors are read one at a time on demand.

    Format: 8 bytes little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
    data; offsets are relative to the byte after the header.
    """

    def __init__(self, file: Path):
        self.file = file
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PretrainedError(f"{file}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise PretrainedError(
                    f"{file}: not a safetensors file (header length {n} exceeds the file's {size} bytes)"
                )
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise PretrainedError(f"{file}: corrupt safetensors header ({err})") from err
        if not isinstance(header, dict):
            raise PretrainedError(f"{file}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                ok = all(isinstance(s, int) and s >= 0 for s in shape)
                ok = ok and isinstance(begin, int) and isinstance(end, int)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise PretrainedError(f"{file}: corrupt safetensors header entry for {name!r}: {info!r}")
            if dtype not in _ST_DTYPES and dtype not in _ST_OTHER:
                raise PretrainedError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
            itemsize = _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else None
            count = math.prod(shape)
            if not (0 <= begin <= end and self.base + end <= size) or (itemsize and end - begin != count * itemsize):
                raise PretrainedError(
                    f"{file}: tensor {name!r} ({dtype}, shape {shape}) has data offsets [{begin}, {end}] that do not "
                    f"fit its size or the file ({size} bytes): truncated or corrupt file"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as an owned, writable, native-endian host array: float16/32/64 as
        stored, bfloat16 widened exactly to float32."""
        dtype, shape, begin, end = self.entries[name]
        if dtype not in _ST_DTYPES:
            raise PretrainedError(
                f"{self.file}: tensor {name!r} has dtype {dtype}; GPT-2 weights must be floating point"
            )
        raw = np.empty(shape, dtype=_ST_DTYPES[dtype])
        if raw.size:
            with open(self.file, "rb") as f:
                f.seek(self.base + begin)
                got = f.readinto(raw.reshape(-1).view(np.uint8))
            if got != end - begin:
                raise PretrainedError(f"{self.file}: tensor {name!r}: file ended after {got} of {end - begin} bytes")
        if dtype == "BF16":  # bfloat16 is the top half of a float32: shift the bits back into place
            return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return raw.astype(raw.dtype.newbyteorder("="), copy=False)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as host NumPy arrays (floating dtypes only; bfloat16
    is widened to float32). Pickle-free and independent of the framework that wrote the file."""
    st = _SafetensorsFile(Path(path))
    return {name: st.read(name) for name in st.entries}


def _weight_files(path: Path) -> dict[str, _SafetensorsFile]:
    """name in the checkpoint -> the file holding it (one file, or the shards of an index)."""
    single = path / WEIGHTS_FILE
    index = path / WEIGHTS_INDEX_FILE
    if single.is_file():
        st = _SafetensorsFile(single)
        return {name: st for name in st.entries}
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"{index}: no 'weight_map' object")
        shards: dict[str, _SafetensorsFile] = {}
        out = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise PretrainedError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name in this directory")
            if shard not in shards:
                if not (path / shard).is_file():
                    raise PretrainedError(f"{index}: shard {shard!r} (holding {name!r}) is missing from {path}")
                shards[shard] = _SafetensorsFile(path / shard)
            if name not in shards[shard].entries:
                raise PretrainedError(f"{index}: tensor {name!r} is not in its shard {shard!r}")
            out[name] = shards[shard]
        return out
    pickles = [f for f in PICKLE_WEIGHTS if (path / f).is_file()]
    if pickles:
        raise PretrainedError(
            f"{path}: the weights are only in {pickles[0]}, a pickle file, which minidpo never loads "
            f"(unpickling can run arbitrary code). Convert it to safetensors first, e.g. with transformers: "
            f"GPT2LMHeadModel.from_pretrained('{path}').save_pretrained('{path}-safetensors'), "
            f"which writes model.safetensors"
        )
    others = [f for f in OTHER_WEIGHTS if (path / f).exists()]
    hint = f" (found {others[0]}, which minidpo does not read)" if others else ""
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}){hint}")


def _shape_str(shape) -> str:
    return str(tuple(int(s) for s in shape))


def _list(names, limit: int = 8) -> str:
    names = list(names)
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_params(path: Path, config: GPTConfig) -> dict[str, np.ndarray]:
    """The checkpoint's tensors keyed by minidpo names, as owned host arrays in their stored dtype
    (bfloat16 widened to float32); every name, shape and tie checked."""
    files = _weight_files(path)
    where = path / (WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else WEIGHTS_INDEX_FILE)
    expected = param_shapes(config)
    found: dict[str, str] = {}  # minidpo name -> name in the file
    lm_head = None
    for raw in files:
        bare = raw[len(_PREFIX):] if raw.startswith(_PREFIX) else raw
        if raw == _LM_HEAD:
            lm_head = raw
            continue
        if _BUFFER_NAME.match(bare):  # attention-mask buffers: not parameters
            continue
        name = _PREFIX + bare
        if name in found:
            raise PretrainedError(f"{where}: tensor {name!r} appears twice, as {found[name]!r} and {raw!r}")
        found[name] = raw

    prefixed = any(r.startswith(_PREFIX) for r in found.values()) or not found
    missing = [n for n in expected if n not in found]
    unexpected = [r for n, r in found.items() if n not in expected]
    if missing or unexpected:
        msg = []
        if missing:
            shown = [f"{n if prefixed else n[len(_PREFIX):]} {_shape_str(expected[n])}" for n in missing]
            msg.append(f"missing tensor(s) {_list(shown)}")
        if unexpected:
            shown = [f"{r} {_shape_str(files[r].shape(r))}" for r in unexpected]
            msg.append(f"unexpected tensor(s) {_list(shown)}")
        raise PretrainedError(
            f"{where}: the tensors do not match a GPT-2 of config.json's size "
            f"(n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}, "
            f"n_positions={config.n_ctx}): {'; '.join(msg)}"
        )
    wrong = []
    for name, shape in expected.items():
        raw = found[name]
        got = files[raw].shape(raw)
        if got != shape:
            hint = ""
            if len(shape) == 2 and got == shape[::-1]:
                hint = " (transposed: nn.Linear's (out, in) layout? GPT-2 checkpoints use Conv1D's (in, out))"
            wrong.append(f"{raw} has shape {_shape_str(got)}, expected {_shape_str(shape)}{hint}")
    if wrong:
        raise PretrainedError(f"{where}: wrong tensor shape(s) for config.json's sizes: {'; '.join(wrong)}")

    host = {}
    for name in expected:
        raw = found[name]
        a = files[raw].read(raw)
        if not np.isfinite(a).all():
            raise PretrainedError(f"{where}: tensor {raw!r} holds non-finite values (nan or inf)")
        host[name] = a

    if lm_head is not None:
        wte = host["transformer.wte.weight"]
        got = files[lm_head].shape(lm_head)
        if got != wte.shape:
            raise PretrainedError(
                f"{where}: {_LM_HEAD} has shape {_shape_str(got)} but transformer.wte.weight has "
                f"{_shape_str(wte.shape)}: an untied output projection, which minidpo cannot represent"
            )
        head = files[lm_head].read(lm_head)
        if not np.array_equal(head, wte):
            diff = float(np.max(np.abs(head.astype(np.float64) - wte.astype(np.float64))))
            raise PretrainedError(
                f"{where}: {_LM_HEAD} differs from transformer.wte.weight (max |difference| {diff:.3g}): "
                f"the checkpoint's output projection is untied, but minidpo's is tied to wte (as GPT-2's)"
            )
    return host


# ============================================================================ tokenizer


def _first_id(v):
    """config.json's eos/pad ids may be an int, a list of ints (take the first) or null."""
    if isinstance(v, list):
        v = v[0] if v else None
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise PretrainedError(f"{CONFIG_FILE}: token ids must be integers, got {v!r}")
    return v


def _load_tokenizer(path: Path, hf: Mapping, config: GPTConfig):
    """The directory's tokenizer as a BPETokenizer, or None when it has no tokenizer files.

    EOS: tokenizer_config.json / special_tokens_map.json's eos_token, else the token of
    config.json's eos_token_id, else "<|endoftext|>". Pad: their pad_token, else the token of
    config.json's pad_token_id, else EOS (GPT-2 has no pad token). A config.json id outside the
    tokenizer (GPT2Config's default 50256 on a small vocabulary is common) is skipped with a
    warning.
    """
    from .tokenizer import BPETokenizer, read_special_names, read_tokenizer_files

    try:
        tok = read_tokenizer_files(path)
        names = read_special_names(path)
    except ValueError as err:  # an unreadable file, named in the message
        raise PretrainedError(str(err)) from err
    if tok is None:
        return None

    bad_ids = []  # config.json ids the tokenizer does not have (e.g. GPT2Config's default 50256)

    def token_of(key):
        i = _first_id(hf.get(key))
        t = None if i is None else tok.id_to_token(i)
        if i is not None and t is None:
            bad_ids.append(f"{key!r} = {i} is not an id of the tokenizer")
        return t

    eos = names.get("eos_token") or token_of("eos_token_id")
    if eos is None:
        if tok.token_to_id(EOS_TOKEN) is None:
            why = "; ".join(bad_ids) or f"no eos_token_id in {CONFIG_FILE}"
            raise PretrainedError(
                f"{path}: cannot tell the EOS token: no eos_token in {TOKENIZER_CONFIG_FILE}, {why}, "
                f"and no {EOS_TOKEN!r} in the tokenizer"
            )
        eos = EOS_TOKEN
    pad = names.get("pad_token") or token_of("pad_token_id")
    if bad_ids:
        warnings.warn(
            f"{path / CONFIG_FILE}: {'; '.join(bad_ids)}; using EOS {eos!r} and pad {pad or eos!r}",
            stacklevel=3,
        )
    for role, t in (("EOS", eos), ("pad", pad)):
        if t is not None and tok.token_to_id(t) is None:
            raise PretrainedError(f"{path}: the {role} token {t!r} is not in the tokenizer's vocabulary")
    tokenizer = BPETokenizer.from_tokenizers(tok, eos_token=eos, pad_token=pad)
    if tokenizer.vocab_size > config.vocab_size:
        raise PretrainedError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{config.vocab_size}: ids past {config.vocab_size - 1} would have no embedding"
        )
    return tokenizer


# ============================================================================ load


def load_pretrained(path: str | os.PathLike, backend="cpu", dtype=np.float32, *, load_tokenizer: bool = True):
    """Read a Hugging Face GPT-2 model directory into minidpo.

    Args:
        path: the directory (config.json, model.safetensors or its sharded index, and tokenizer
            files: tokenizer.json, or vocab.json + merges.txt).
        backend: 'cpu', 'cuda[:N]' or a Backend: where the parameters are placed.
        dtype: floating dtype of the parameters (float32 default; float64 for gradient checks).
            Stored float32 loaded as float32 is bit-identical.
        load_tokenizer: read the tokenizer files (False: return None for the tokenizer).

    Returns:
        params: dict of :func:`minidpo.model.param_shapes` -> (shape) arrays of ``dtype`` on the
            backend's device, each owned and writable.
        config: GPTConfig from config.json.
        tokenizer: BPETokenizer, or None when the directory has no tokenizer files.

    Raises:
        FileNotFoundError: no such directory, no config.json, no safetensors weights.
        PretrainedError (a ValueError): unsupported config settings, pickle-only weights,
            missing / unexpected / wrongly shaped tensors, an untied lm_head.weight, a tokenizer
            larger than the vocabulary; each message names the key and the shapes involved.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model directory: {path}")
    if not path.is_dir():
        raise PretrainedError(
            f"{path} is not a directory (a GPT-2 model directory holds config.json and model.safetensors)"
        )
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"load_pretrained: dtype must be floating, got {dt}")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}, so this is not a Hugging Face model directory")
    hf = _read_json(cfg_file)
    config = config_from_hf(hf, str(cfg_file))
    be = get_backend(backend)
    host = _read_params(path, config)
    params = {}
    for name in list(host):
        a = host.pop(name).astype(dt, copy=False)  # no copy when the stored dtype is dt
        params[name] = be.asarray(a, dtype=dt)
    tok = _load_tokenizer(path, hf, config) if load_tokenizer else None
    return params, config, tok


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a Hugging Face model directory: a config.json beside model
    weights (model.safetensors, its sharded index, or a pickle pytorch_model.bin, so that
    :func:`load_pretrained` can say why it refuses one). A minidpo checkpoint folder has no
    config.json. Never raises."""
    try:
        p = Path(path)
        if not (p / CONFIG_FILE).is_file():
            return False
        return any((p / f).is_file() for f in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE) + PICKLE_WEIGHTS)
    except (OSError, TypeError, ValueError):
        return False


# ============================================================================ save


def _write_json(file: Path, d: dict) -> None:
    file.write_text(json.dumps(d, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _tokenizer_files(tokenizer, config: GPTConfig) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json as text.

    The tokenizer class named is transformers' generic tokenizers-backed one, which runs
    tokenizer.json exactly as written (pre-tokenizer, model, decoder), so transformers and
    minidpo encode identically.
    """
    specials = {"bos_token": tokenizer.eos_token, "eos_token": tokenizer.eos_token,
                "unk_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.n_ctx,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    return {
        TOKENIZER_FILE: tokenizer.backend_tokenizer.to_str(pretty=True),
        TOKENIZER_CONFIG_FILE: json.dumps(tok_config, indent=2) + "\n",
        SPECIAL_TOKENS_FILE: json.dumps(specials, indent=2) + "\n",
    }


def save_pretrained(path: str | os.PathLike, params: Mapping, config: GPTConfig, tokenizer=None) -> Path:
    """Write ``params`` (and ``tokenizer``) as a Hugging Face GPT-2 model directory, atomically.

    Files written:
        config.json              :func:`config_to_hf` (GPT2LMHeadModel, tied, dropout 0)
        model.safetensors        every parameter under its GPT-2 name (``transformer.`` prefix),
                                 float32, metadata {"format": "pt"}; no lm_head.weight (tied)
        tokenizer.json, tokenizer_config.json, special_tokens_map.json     when tokenizer given

    ``transformers.GPT2LMHeadModel.from_pretrained(path)`` loads it with no missing or unexpected
    keys, and :func:`load_pretrained` reads float32 params back bit-identically (float64 params
    are rounded to float32).

    Atomicity: :func:`minidpo.checkpoint.atomic_directory`, the same swap as checkpoints: the
    files go into a sibling temporary directory that then replaces ``path`` by rename (the old
    directory is moved aside first and removed last). An error before the swap
    leaves ``path`` as it was. An existing ``path`` is replaced only when it is empty or holds
    nothing but model-directory files (config.json, model.safetensors, tokenizer files,
    generation_config.json, vocab.json, merges.txt): other files are never deleted.

    Args:
        path: the directory to create or replace.
        params: dict of :func:`minidpo.model.param_shapes` arrays (NumPy or CuPy, one dtype).
        config: the model size.
        tokenizer: a BPETokenizer with at most ``config.vocab_size`` tokens, or None.
    Returns:
        the directory written, as a Path.
    """
    check_params(params, config)
    path = Path(path)
    eos_id = pad_id = None
    files: dict[str, str] = {}
    if tokenizer is not None:
        from .tokenizer import BPETokenizer

        if not isinstance(tokenizer, BPETokenizer):
            raise TypeError(f"tokenizer must be a minidpo BPETokenizer or None, got {type(tokenizer).__name__}")
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
            )
        eos_id, pad_id = tokenizer.eos_id, tokenizer.pad_id
        files = _tokenizer_files(tokenizer, config)

    host = {}
    for name in param_shapes(config):
        a = np.ascontiguousarray(to_numpy(params[name]), dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"params[{name!r}] holds non-finite values (nan or inf) as float32; refusing to export it")
        host[name] = a

    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _REPLACEABLE_FILES)
        if foreign:
            raise FileExistsError(
                f"{path} exists and holds files that are not model-directory files ({_list(foreign)}); "
                f"refusing to replace it: choose another path or remove them"
            )
    with atomic_directory(path) as tmp:
        _write_json(tmp / CONFIG_FILE, config_to_hf(config, eos_id, pad_id))
        write_safetensors(tmp / WEIGHTS_FILE, host, {"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
    return path
