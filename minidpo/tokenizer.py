"""Byte-level BPE through the `tokenizers` library: train, encode, decode, save, load.

GPT-2's tokenizer is byte-level BPE: text is turned into UTF-8 bytes, each byte is mapped to
one of 256 printable symbols, and learned merges join frequent symbol pairs into tokens. Because
every byte has a symbol, *any* string encodes, and the ByteLevel decoder maps the symbols back
to bytes, so

    decode(encode(s)) == s        for every str s (unicode included)

which tests/test_tokenizer.py checks with hypothesis. The BPE itself is the `tokenizers`
library's (Rust); this module only fixes the pieces that matter for DPO:

- ``encode`` never adds special tokens, and never turns the *text* "<|endoftext|>" inside user
  data into the EOS id (``encode_special_tokens``): the data code appends EOS itself, exactly
  once, where a response ends.
- ``eos_id`` and ``pad_id`` are explicit. A freshly trained tokenizer has distinct ones
  (``<|endoftext|>`` = 0, ``<|pad|>`` = 1 by default); GPT-2 has no pad token, and
  ``from_tokenizers(tok, "<|endoftext|>")`` makes pad == eos. The data code's loss mask is built
  from positions, never from token values, so pad == eos is safe.
- ``save`` writes ``tokenizer.json`` (the library's own format, readable by any `tokenizers`
  user) atomically, plus ``tokenizer_config.json`` holding ``{"eos_token", "pad_token"}`` (the
  same keys Hugging Face uses) when saving to a directory.

On-disk layouts accepted by :meth:`BPETokenizer.load`:

    dir/tokenizer.json [+ dir/tokenizer_config.json]     (what ``save(dir)`` writes; HF layout)
    dir/vocab.json + dir/merges.txt                       (GPT-2's original files)
    some/file.json                                        (a tokenizer.json under any name)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import atomic_write_text

DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# what a U+FFFD in a sample means, said wherever samples are shown
UNDECODABLE_NOTE = ("\ufffd (U+FFFD) marks bytes the model sampled that form no UTF-8 character: a byte-level model "
                    "can emit any byte, and a small one trained on ASCII text sometimes does (each sample is decoded "
                    "whole, so no character is split between tokens)")
# the largest vocabulary train() asks for: `tokenizers` allocates about 71 bytes per requested
# token before it starts (1e9 asked for 71 GB and aborted the process); GPT-2 has 50,257 tokens
MAX_VOCAB_SIZE = 2**20


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with explicit EOS and pad tokens.

    Build one with :meth:`train`, :meth:`load`, :meth:`from_tokenizers` or
    :meth:`from_vocab_merges`; the constructor wraps ``tok`` as is (no copy).

    Args:
        tok: a ``tokenizers.Tokenizer`` (byte-level BPE expected).
        eos_token: the end-of-sequence token's text; must be in the vocabulary.
        pad_token: the padding token's text; ``None`` means "same as eos_token".
    """

    def __init__(self, tok: Tokenizer, eos_token: str = DEFAULT_EOS, pad_token: str | None = None):
        if not isinstance(tok, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tok).__name__}")
        pad_token = eos_token if pad_token is None else pad_token
        for role, text in (("eos_token", eos_token), ("pad_token", pad_token)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"{role} must be a non-empty string, got {text!r}")
            if tok.token_to_id(text) is None:
                raise ValueError(f"{role} {text!r} is not in the tokenizer's vocabulary")
        # Register EOS/pad as special (skipped by decode, never split). For a token already in
        # the vocabulary (GPT-2's vocab.json holds <|endoftext|>) the id is unchanged.
        tok.add_special_tokens(sorted({eos_token, pad_token}))
        # Text that *looks* like a special token is encoded as ordinary bytes: data cannot inject
        # an EOS into the middle of a response. (Not stored in tokenizer.json; set on every wrap.)
        tok.encode_special_tokens = True
        self._tok = tok
        self.eos_token = eos_token
        self.pad_token = pad_token
        self._eos_id = tok.token_to_id(eos_token)
        self._pad_id = tok.token_to_id(pad_token)

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (DEFAULT_EOS, DEFAULT_PAD),
    ) -> "BPETokenizer":
        """Learn a byte-level BPE vocabulary from ``texts``.

        The vocabulary is: the special tokens (ids 0, 1, ... in the order given), the 256 byte
        symbols, then merges until ``vocab_size`` tokens exist or no pair occurs at least
        ``min_frequency`` times (so a small corpus can give fewer than ``vocab_size`` tokens:
        read :attr:`vocab_size` for the real count).

        Args:
            texts: an iterable of strings (documents or lines).
            vocab_size: the largest vocabulary wanted, >= 256 + len(special_tokens) and at most
                MAX_VOCAB_SIZE (2**20).
            min_frequency: the fewest occurrences a pair needs to be merged.
            special_tokens: special_tokens[0] is EOS; special_tokens[1], when given, is pad
                (otherwise pad == EOS); any further ones are registered but have no role.
        Returns:
            the trained tokenizer.
        """
        special_tokens = list(special_tokens)
        if not special_tokens:
            raise ValueError("special_tokens must hold at least the EOS token")
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens has duplicates: {special_tokens}")
        if not isinstance(vocab_size, int) or not 256 + len(special_tokens) <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be an int >= 256 + {len(special_tokens)} special tokens "
                f"(the byte alphabet must fit) and <= {MAX_VOCAB_SIZE:,}, got {vocab_size!r}"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be a positive int, got {min_frequency!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not one string")

        tok = _empty_byte_level_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )

        def checked(it):
            for i, t in enumerate(it):
                if not isinstance(t, str):
                    raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
                yield t

        tok.train_from_iterator(checked(texts), trainer=trainer)
        pad = special_tokens[1] if len(special_tokens) > 1 else None
        return cls(tok, eos_token=special_tokens[0], pad_token=pad)

    @classmethod
    def from_tokenizers(cls, tok: Tokenizer, eos_token: str, pad_token: str | None = None) -> "BPETokenizer":
        """Wrap an existing ``tokenizers.Tokenizer`` (e.g. GPT-2's tokenizer.json) without changing it.

        The tokenizer is copied first. A tokenizer built from bare vocab.json + merges.txt has no
        pre-tokenizer or decoder; the byte-level ones are filled in then (add_prefix_space False,
        as GPT-2). ``pad_token=None`` gives pad == eos (GPT-2 has no pad token).
        """
        if not isinstance(tok, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tok).__name__}")
        tok = Tokenizer.from_str(tok.to_str())
        if tok.pre_tokenizer is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if tok.decoder is None:
            tok.decoder = decoders.ByteLevel()
        return cls(tok, eos_token=eos_token, pad_token=pad_token)

    @classmethod
    def from_vocab_merges(
        cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
        eos_token: str = DEFAULT_EOS, pad_token: str | None = None,
    ) -> "BPETokenizer":
        """GPT-2's original files (vocab.json + merges.txt) as a byte-level BPE tokenizer."""
        for p in (vocab_path, merges_path):
            if not Path(p).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        model = models.BPE.from_file(str(vocab_path), str(merges_path))
        return cls.from_tokenizers(Tokenizer(model), eos_token=eos_token, pad_token=pad_token)

    @classmethod
    def load(cls, path: str | os.PathLike, eos_token: str | None = None, pad_token: str | None = None) -> "BPETokenizer":
        """Load from a tokenizer.json file, or a directory holding tokenizer.json (or vocab.json +
        merges.txt).

        EOS / pad are, in order of precedence: the arguments; ``tokenizer_config.json`` (then
        ``special_tokens_map.json``) beside the file (``"eos_token"``/``"pad_token"``, as ``save``
        and Hugging Face write them); else
        ``<|endoftext|>`` for EOS and ``<|pad|>`` for pad when that token exists, EOS otherwise.
        """
        path = Path(path)
        if path.is_dir():
            tok = read_tokenizer_files(path)
            if tok is None:
                raise FileNotFoundError(
                    f"no {TOKENIZER_FILE} (nor vocab.json + merges.txt) in directory {path}"
                )
            config_dir = path
        elif path.is_file():
            tok = _read_tokenizer_json(path)
            config_dir = path.parent
        else:
            raise FileNotFoundError(f"tokenizer not found: {path} (expected a {TOKENIZER_FILE} file or a directory)")

        cfg = read_special_names(config_dir)
        eos = eos_token or cfg.get("eos_token") or DEFAULT_EOS
        if pad_token is None:
            pad_token = cfg.get("pad_token")
        if pad_token is None and tok.token_to_id(DEFAULT_PAD) is not None:
            pad_token = DEFAULT_PAD
        if tok.token_to_id(eos) is None:
            raise ValueError(f"{path}: EOS token {eos!r} is not in the vocabulary; pass eos_token=...")
        return cls(tok, eos_token=eos, pad_token=pad_token)

    # ------------------------------------------------------------------ use

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token (appended to every response by minidpo.data)."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id used to right-pad batches; may equal :attr:`eos_id` (GPT-2)."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included: every id is in [0, vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, "
            f"pad={self.pad_token!r}:{self.pad_id})"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added (and none are parsed from the text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in parallel by the library."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects strings; texts[{i}] is {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, tuple or 1-D integer array); special tokens dropped by default.

        The whole sequence is decoded at once, so a character whose bytes span several tokens
        comes out whole. A U+FFFD in the text stands for bytes that form no UTF-8 character
        (:data:`UNDECODABLE_NOTE`); it is kept rather than escaped because sampled texts are
        tokenized again (preference pairs), and the text must stay what the library decodes."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids out of range [0, {n}): {bad[:10]}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer atomically (temp file + fsync + rename); returns the tokenizer.json path.

        ``path`` ending in ``.json`` is the file to write. Anything else is a directory (created
        if needed) that receives ``tokenizer.json`` and ``tokenizer_config.json`` (EOS and pad
        names, so :meth:`load` restores them even when they are not the defaults).
        """
        path = Path(path)
        if path.suffix == ".json" and not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, self._tok.to_str(pretty=True))
            return path
        path.mkdir(parents=True, exist_ok=True)
        file = path / TOKENIZER_FILE
        atomic_write_text(file, self._tok.to_str(pretty=True))
        cfg = {"eos_token": self.eos_token, "pad_token": self.pad_token, "tokenizer_class": "BPETokenizer"}
        atomic_write_text(path / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
        return file


def _empty_byte_level_bpe() -> Tokenizer:
    """An untrained BPE with GPT-2's byte-level pre-tokenizer and decoder (no normalizer)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_tokenizer_json(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the library raises a plain Exception with serde's message
        raise ValueError(f"{file}: not a valid tokenizer.json ({err})") from err


def read_tokenizer_files(directory: Path) -> Tokenizer | None:
    """The ``tokenizers.Tokenizer`` of a directory: its tokenizer.json, else GPT-2's original
    vocab.json + merges.txt (with GPT-2's byte-level pre-tokenizer and decoder); None when it has
    neither. Unreadable files raise ValueError naming them."""
    if (directory / TOKENIZER_FILE).is_file():
        return _read_tokenizer_json(directory / TOKENIZER_FILE)
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return None
    try:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as err:  # the library raises a plain Exception with its own message
        raise ValueError(f"{directory}: unreadable vocab.json / merges.txt ({err})") from err
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def read_special_names(directory: Path) -> dict:
    """``{"eos_token": str, "pad_token": str}`` (those present) from the directory's
    tokenizer_config.json, then special_tokens_map.json for what the first lacks (Hugging Face
    writes either a string or ``{"content": str, ...}``); missing files -> {}."""
    out = {}
    for file in (directory / CONFIG_FILE, directory / SPECIAL_TOKENS_FILE):
        if not file.is_file():
            continue
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"{file}: invalid JSON ({err})") from None
        for key in ("eos_token", "pad_token"):
            v = raw.get(key) if isinstance(raw, dict) else None
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and v and key not in out:
                out[key] = v
    return out
