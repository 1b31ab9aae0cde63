"""Preference and SFT data: read and validate JSONL, tokenize, truncate, pad, mask, batch.

The DPO loss (eq. 7) needs, for every preference pair (x, y_w, y_l), the summed log-probability
log pi(y|x) of each response given its prompt. This module turns files into tokenized examples
(prompt ids, response ids ending in EOS), which packing.py lays out into batches; a padded row is

    row    = prompt tokens | response tokens | EOS | pad ... pad
    scored =   no  ...     |   yes  ...      | yes | no  ...  no

where the token at position t+1 is predicted by the logits at t (the first token has no logits
before it).

Pitfalls handled here:
- BPE merging across the prompt/response join: prompt and responses are encoded SEPARATELY
  and the id lists concatenated, so the response's tokens are the same whatever the prompt.
- EOS masked out because pad == eos: the mask is built from positions, never from token values.
- A response with zero unmasked tokens (loss frozen at log 2 = 0.693): such pairs, and pairs
  whose chosen and rejected become identical after truncation, are dropped, counted and warned
  about with their "file:line".
- An empty prompt (nothing for the first response token to be predicted from): EOS is
  prepended as a beginning-of-sequence token, as GPT-2 does for unconditional text.

Data formats (one JSON object a line; blank lines skipped):

    {"prompt": str, "chosen": str, "rejected": str}         the common convention
    {"chosen": str, "rejected": str}                         Anthropic HH: full transcripts,
        prompt = text up to and including the last "\\n\\nAssistant:" (must agree in both)
    SFT: {"prompt": str, "response": str} or {"text": str}   (prompt "" for "text"),
         or a .txt file with one document a line.
    KTO: {"prompt": str, "completion": str, "label": bool}   one unpaired completion, desirable
         (true) or undesirable (false); read_kto reads and validates it.

Every bad line is reported as ``file:line: reason`` (:class:`DataError`); with
``on_error="warn"`` bad lines are skipped with that message as a warning and counted.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


HH_ASSISTANT = "\n\nAssistant:"
TRUNCATION_MODES = ("keep_end", "keep_start")
_MAX_LISTED = 20  # dropped/bad sources named one by one in a summary warning


# ============================================================================ errors


class DataError(ValueError):
    """A bad input line (or file). ``str(err)`` reads ``data.jsonl:17: missing key 'rejected'``.

    Attributes:
        file: the path as given by the caller.
        line: 1-based line number, or None for a whole-file problem (e.g. no examples).
        reason: what was wrong, without the location.
    """

    def __init__(self, file: str | os.PathLike, line: int | None, reason: str):
        self.file = str(file)
        self.line = line
        self.reason = reason
        where = self.file if line is None else f"{self.file}:{line}"
        super().__init__(f"{where}: {reason}")


class DataWarning(UserWarning):
    """Category of the warnings this module emits (skipped lines, dropped pairs)."""


class _Tokenizer(Protocol):  # what the tokenization functions need (BPETokenizer has it)
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


# ============================================================================ reading


@dataclass
class PreferenceExample:
    """One preference pair: ``chosen`` (y_w) is preferred to ``rejected`` (y_l) given ``prompt`` (x).

    ``chosen``/``rejected`` are the responses only (for HH data, the text after the prompt).
    ``source`` is "file:line", carried along so every later warning can say where a pair came from.
    """

    prompt: str
    chosen: str
    rejected: str
    source: str


class PreferenceData(list):
    """The list of :class:`PreferenceExample` returned by :func:`read_preferences`, plus
    ``skipped`` (number of bad lines left out with ``on_error="warn"``; 0 otherwise) and
    ``errors`` (the :class:`DataError` of each of them)."""

    def __init__(self, items=(), skipped: int = 0, errors: list[DataError] | None = None):
        super().__init__(items)
        self.skipped = skipped
        self.errors = errors or []


class SFTData(list):
    """The list of (prompt, response) pairs from :func:`read_sft_corpus`, with ``skipped``,
    ``errors`` (as :class:`PreferenceData`) and ``sources`` ("file:line" of each pair)."""

    def __init__(self, items=(), skipped: int = 0, errors: list[DataError] | None = None, sources=None):
        super().__init__(items)
        self.skipped = skipped
        self.errors = errors or []
        self.sources = list(sources or [])


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")


def _iter_lines(path: Path, display: str):
    """Yield (line_no, text or DataError) for every non-blank line; utf-8, a leading BOM ignored."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {display}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a data file, got a directory: {display}")
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield i, DataError(display, i, f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if i == 1 and text.startswith("\ufeff"):
                text = text[1:]
            if text.strip():
                yield i, text


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    """``object_pairs_hook`` of the JSON reader: a key given twice in one object is an error (the
    last one would silently win and could flip a preference label)."""
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(f"duplicate key {k!r} in one object")
        seen[k] = v
    return seen


def _parse_object(display: str, i: int, text: str) -> dict:
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise DataError(display, i, f"invalid JSON: {err.msg} (column {err.colno})") from None
    except _DuplicateKey as err:
        raise DataError(display, i, str(err)) from None
    except RecursionError:
        raise DataError(display, i, "invalid JSON: nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise DataError(display, i, f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _get_str(obj: dict, key: str, display: str, i: int) -> str:
    if key not in obj:
        raise DataError(display, i, f"missing key {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(display, i, f"key {key!r} must be a string, got {_json_type(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(display, i, f"key {key!r} holds a lone surrogate {v[err.start]!r} (a \\u escape of "
                                    f"half a character), which is not text") from None
    return v


def split_hh(transcript: str) -> tuple[str, str]:
    """Anthropic-HH transcript -> (prompt, response), prompt ending with the last "\\n\\nAssistant:".

    >>> split_hh("\\n\\nHuman: hi\\n\\nAssistant: hello")
    ('\\n\\nHuman: hi\\n\\nAssistant:', ' hello')

    Raises ValueError when the marker is absent.
    """
    k = transcript.rfind(HH_ASSISTANT)
    if k < 0:
        raise ValueError(f"no {HH_ASSISTANT!r} marker in the transcript")
    cut = k + len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _preference_from_object(obj: dict, display: str, i: int) -> PreferenceExample:
    source = f"{display}:{i}"
    if "prompt" in obj:  # {"prompt", "chosen", "rejected"}
        prompt = _get_str(obj, "prompt", display, i)
        chosen = _get_str(obj, "chosen", display, i)
        rejected = _get_str(obj, "rejected", display, i)
    else:  # Anthropic HH: {"chosen", "rejected"} full transcripts
        chosen_t = _get_str(obj, "chosen", display, i)
        rejected_t = _get_str(obj, "rejected", display, i)
        try:
            prompt, chosen = split_hh(chosen_t)
        except ValueError:
            raise DataError(display, i, f"no 'prompt' key, and the 'chosen' transcript has no {HH_ASSISTANT!r} "
                                        "marker (Anthropic-HH format)") from None
        try:
            prompt_r, rejected = split_hh(rejected_t)
        except ValueError:
            raise DataError(display, i, f"no 'prompt' key, and the 'rejected' transcript has no {HH_ASSISTANT!r} "
                                        "marker (Anthropic-HH format)") from None
        if prompt_r != prompt:
            raise DataError(display, i, "the prompts of the 'chosen' and 'rejected' transcripts differ "
                                        f"(text up to the last {HH_ASSISTANT!r})")
    for key, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp.strip():
            raise DataError(display, i, f"the {key!r} response is empty")
    if chosen == rejected:
        raise DataError(display, i, "chosen and rejected responses are identical")
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, source=source)


def _read_records(path, on_error: str, parse_line, kind: str):
    """Shared loop of the readers: parse every line, raise or warn on bad ones."""
    _check_on_error(on_error)
    display = str(path)
    path = Path(path)
    good, sources, errors = [], [], []
    for i, text in _iter_lines(path, display):
        try:
            if isinstance(text, DataError):
                raise text
            item = parse_line(display, i, text)
        except DataError as err:
            if on_error == "raise":
                raise
            errors.append(err)
            warnings.warn(str(err), DataWarning, stacklevel=3)
            continue
        good.append(item)
        sources.append(f"{display}:{i}")
    if not good:
        why = f"{len(errors)} bad line(s) skipped, none valid" if errors else "the file is empty"
        raise DataError(display, None, f"no {kind} examples ({why})")
    return good, sources, errors


def read_preferences(path: str | os.PathLike, on_error: str = "raise") -> PreferenceData:
    """Read and validate a preference JSONL file.

    Each non-blank line is one JSON object, either ``{"prompt", "chosen", "rejected"}`` or the
    Anthropic-HH ``{"chosen", "rejected"}`` transcripts (prompt = text up to and including the
    last "\\n\\nAssistant:"; both transcripts must share it). Extra keys are ignored.

    A line is bad when it is not UTF-8, not JSON, not an object, misses a key, has a non-string
    value, has an empty (or whitespace-only) response, has chosen == rejected, or (HH) lacks the
    marker or has differing prompts.

    Args:
        path: the .jsonl file.
        on_error: "raise" -> the first bad line raises :class:`DataError` ("file:line: reason");
            "warn" -> each bad line emits a :class:`DataWarning` with that message and is skipped.
    Returns:
        :class:`PreferenceData`, a list of :class:`PreferenceExample` in file order, with
        ``.skipped`` (count of bad lines) and ``.errors``.
    Raises:
        DataError (line None) when no valid example is left, in either mode; FileNotFoundError.
    """
    good, _, errors = _read_records(
        path, on_error, lambda d, i, t: _preference_from_object(_parse_object(d, i, t), d, i), "preference"
    )
    return PreferenceData(good, skipped=len(errors), errors=errors)


def _sft_from_object(obj: dict, display: str, i: int) -> tuple[str, str]:
    if "text" in obj and "response" not in obj:
        prompt, response = "", _get_str(obj, "text", display, i)
        key = "text"
    elif "text" in obj:
        raise DataError(display, i, "has both 'text' and 'response': use one shape per line")
    elif "response" in obj or "prompt" in obj:
        prompt = _get_str(obj, "prompt", display, i)
        response = _get_str(obj, "response", display, i)
        key = "response"
    else:
        raise DataError(display, i, "missing key 'text' (or 'prompt' and 'response')")
    if not response.strip():
        raise DataError(display, i, f"the {key!r} is empty")
    return prompt, response


def read_sft_corpus(path: str | os.PathLike, on_error: str = "raise") -> SFTData:
    """Read a supervised fine-tuning corpus as (prompt, response) pairs.

    Formats, chosen by extension:
      - ``.txt``: ONE DOCUMENT A LINE (a document cannot contain a newline; blank lines are
        skipped). Each gives ("", line without its line break); the text is trained on whole.
      - anything else: JSONL, ``{"prompt": str, "response": str}`` or ``{"text": str}``
        (prompt "" then). Bad lines as in :func:`read_preferences`.

    Returns:
        :class:`SFTData`: list of (prompt, response) with ``.skipped``, ``.errors``, ``.sources``.
    """
    if Path(path).suffix.lower() == ".txt":
        parse = lambda d, i, t: ("", t.rstrip("\r\n"))  # noqa: E731 - blank lines never get here
    else:
        parse = lambda d, i, t: _sft_from_object(_parse_object(d, i, t), d, i)  # noqa: E731
    good, sources, errors = _read_records(path, on_error, parse, "SFT")
    return SFTData(good, skipped=len(errors), errors=errors, sources=sources)


@dataclass
class KTOExample:
    """One unpaired example for KTO (Ethayarajh et al. 2024): a ``completion`` of ``prompt`` labelled
    desirable (``label`` True) or undesirable (False). ``source`` is "file:line"."""

    prompt: str
    completion: str
    label: bool
    source: str


class KTOData(list):
    """The list of :class:`KTOExample` from :func:`read_kto`, with ``skipped`` and ``errors`` (as
    :class:`PreferenceData`), and the counts ``n_desirable``, ``n_undesirable`` (KTO's weights are
    advised from their ratio: lambda_D n_D / (lambda_U n_U) in [1, 4/3])."""

    def __init__(self, items=(), skipped: int = 0, errors: list[DataError] | None = None):
        super().__init__(items)
        self.skipped = skipped
        self.errors = errors or []
        self.n_desirable = sum(1 for e in self if e.label)
        self.n_undesirable = len(self) - self.n_desirable


def _kto_from_object(obj: dict, display: str, i: int) -> KTOExample:
    prompt = _get_str(obj, "prompt", display, i)
    completion = _get_str(obj, "completion", display, i)
    if "label" not in obj:
        raise DataError(display, i, "missing key 'label' (true: a desirable completion, false: undesirable)")
    label = obj["label"]
    if not isinstance(label, bool):  # 0/1, "true", null: never guessed
        raise DataError(display, i, f"key 'label' must be true or false, got {_json_type(label)} {json.dumps(label)}")
    if not completion.strip():
        raise DataError(display, i, "the 'completion' is empty")
    return KTOExample(prompt=prompt, completion=completion, label=label, source=f"{display}:{i}")


def is_kto_file(path: str | os.PathLike) -> bool:
    """Whether a JSONL file holds unpaired KTO examples rather than preference pairs: its first
    non-blank line is a JSON object with "completion" and "label" keys (and no "chosen"). A file
    that cannot be read this way is not (the preference reader then reports what is wrong)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    obj = json.loads(raw)
                    return isinstance(obj, dict) and {"completion", "label"} <= set(obj) and "chosen" not in obj
    except (OSError, ValueError, RecursionError):
        return False
    return False


def read_kto(path: str | os.PathLike, on_error: str = "raise") -> KTOData:
    """Read and validate an unpaired (KTO) JSONL file: one ``{"prompt": str, "completion": str,
    "label": bool}`` a line, the label true for a desirable completion, false for an undesirable one.
    Extra keys are ignored.

    A line is bad when it is not UTF-8, not JSON, not an object, has a key twice, misses a key, has a
    non-string prompt or completion (or a lone surrogate in one), a label that is not a JSON boolean
    (0/1, "true" or null are refused, not guessed), or an empty (whitespace-only) completion.

    Args:
        path: the .jsonl file. on_error: "raise" (the first bad line raises :class:`DataError`,
            "file:line: reason") or "warn" (each bad line is a :class:`DataWarning` and is skipped).
    Returns:
        :class:`KTOData` in file order, with ``.skipped``, ``.errors``, ``.n_desirable``, ``.n_undesirable``.
    Raises:
        DataError (line None) when no valid example is left; FileNotFoundError.
    """
    good, _, errors = _read_records(path, on_error, lambda d, i, t: _kto_from_object(_parse_object(d, i, t), d, i),
                                    "KTO")
    return KTOData(good, skipped=len(errors), errors=errors)


# ============================================================================ tokenization


@dataclass
class TokenizedPair:
    """A tokenized preference pair, ready for :func:`collate_preferences`.

    Attributes:
        prompt_ids: x, >= 1 token (EOS as BOS when the prompt text is empty).
        chosen_ids: y_w followed by EOS (the EOS is absent when truncation cut the end).
        rejected_ids: y_l likewise.
        source: "file:line" of the example.
        prompt_truncated, chosen_truncated, rejected_truncated: whether truncation removed tokens.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False

    @property
    def chosen_length(self) -> int:
        """Tokens in the prompt+chosen row."""
        return len(self.prompt_ids) + len(self.chosen_ids)

    @property
    def rejected_length(self) -> int:
        return len(self.prompt_ids) + len(self.rejected_ids)


@dataclass
class TokenizedSFT:
    """A tokenized SFT item: ``prompt_ids`` (>= 1 token; EOS as BOS when the prompt is empty),
    ``response_ids`` (the response, then EOS unless truncation cut it), ``source``, ``truncated``."""

    prompt_ids: list[int]
    response_ids: list[int]
    source: str = ""
    truncated: bool = False


@dataclass
class TokenizedKTO:
    """A tokenized unpaired (KTO) example: ``prompt_ids``, ``response_ids`` (the completion, then
    EOS unless truncation cut it; the name packing.Batcher.sft reads), ``desirable`` (the label),
    ``source``, ``truncated``."""

    prompt_ids: list[int]
    response_ids: list[int]
    desirable: bool
    source: str = ""
    truncated: bool = False


def build_kto_dataset(examples, tokenizer: _Tokenizer, max_length: int = 512, max_prompt_length: int | None = None):
    """KTO examples (read_kto's) tokenized as SFT items are (:func:`tokenize_sft`'s truncation),
    each with its label. Returns (list[TokenizedKTO], stats {"n_examples", "n_kept",
    "dropped_empty", "truncated", "n_desirable", "n_undesirable"}); ValueError when none is left."""
    examples = list(examples)
    if not examples:
        raise ValueError("build_kto_dataset: no examples given")
    if max_prompt_length is None:
        max_prompt_length = max(1, max_length // 2)
    _check_lengths(max_length, max_prompt_length, "keep_end")
    n = len(examples)
    ids = _encode_many(tokenizer, [e.prompt for e in examples] + [e.completion for e in examples])
    out, dropped, truncated = [], [], 0
    for k, e in enumerate(examples):
        t = _assemble_sft(ids[k], ids[n + k], tokenizer.eos_id, max_length, max_prompt_length, e.source)
        if t is None:
            dropped.append((e.source, "the completion has zero tokens"))
            continue
        truncated += t.truncated
        out.append(TokenizedKTO(t.prompt_ids, t.response_ids, bool(e.label), t.source, t.truncated))
    _warn_dropped("KTO examples", dropped, n)
    if not out:
        raise ValueError(f"all {n} KTO examples were dropped")
    n_d = sum(t.desirable for t in out)
    return out, {"n_examples": n, "n_kept": len(out), "dropped_empty": len(dropped), "truncated": truncated,
                 "n_desirable": n_d, "n_undesirable": len(out) - n_d}


def kto_mismatched_items(prompts: list, responses: list, max_length: int) -> list:
    """KTO's mismatched examples (losses.kto_mismatched: example i's prompt with example i-1's
    completion, TRL's rotation of the batch by one), as TokenizedSFT items, the completion cut to
    fit ``max_length`` tokens after its new prompt (at least one token is kept: each prompt was
    already cut to leave room for one)."""
    from .losses import kto_mismatched

    order = kto_mismatched(len(prompts))
    out = []
    for i, j in enumerate(order):
        x, y = list(prompts[i]), list(responses[int(j)])
        out.append(TokenizedSFT(x, y[: max(1, max_length - len(x))], "mismatched", len(x) + len(y) > max_length))
    return out


@dataclass
class PreferenceStats:
    """What :func:`build_preference_dataset` did.

    n_examples: pairs in; n_kept: pairs out; n_dropped = dropped_empty + dropped_identical;
    dropped_empty: a response encoded to zero tokens; dropped_identical: chosen and rejected
    equal after truncation (DPO gradient exactly 0); prompts_truncated: kept pairs whose prompt
    was cut; responses_truncated: kept pairs with at least one response cut; eos_cut: kept
    responses (chosen and rejected counted separately) whose EOS was cut off;
    dropped_sources: (source, reason) of each dropped pair.
    """

    n_examples: int = 0
    n_kept: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    eos_cut: int = 0
    dropped_sources: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_dropped(self) -> int:
        return self.dropped_empty + self.dropped_identical

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "n_examples", "n_kept", "n_dropped", "dropped_empty", "dropped_identical",
            "prompts_truncated", "responses_truncated", "eos_cut")}


def _check_lengths(max_length: int, max_prompt_length: int, truncation_mode: str) -> None:
    if not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if not isinstance(max_prompt_length, (int, np.integer)) or not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length must be an int with 1 <= max_prompt_length < max_length={max_length} "
            f"(a response needs at least one token), got {max_prompt_length!r}"
        )
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")


def _assemble_pair(prompt_ids, chosen_ids, rejected_ids, eos_id, max_length, max_prompt_length,
                   truncation_mode, source) -> tuple[TokenizedPair | None, str]:
    """Truncate separately-encoded ids (see tokenize_preference); returns (pair or None, reason)."""
    if not chosen_ids or not rejected_ids:
        which = "chosen" if not chosen_ids else "rejected"
        return None, f"the {which} response has zero tokens"
    prompt = list(prompt_ids) or [eos_id]  # EOS doubles as BOS: the first response token needs a context
    chosen = list(chosen_ids) + [eos_id]
    rejected = list(rejected_ids) + [eos_id]
    n_c, n_r = len(chosen), len(rejected)

    prompt_cut = False
    longer = max(n_c, n_r)
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
        prompt_cut = True
    if len(prompt) + longer > max_length:
        budget = max_length - len(prompt)  # >= max_length - max_prompt_length >= 1
        chosen, rejected = chosen[:budget], rejected[:budget]
    pair = TokenizedPair(prompt, chosen, rejected, source, prompt_cut, len(chosen) < n_c, len(rejected) < n_r)
    if chosen == rejected:
        return None, "chosen and rejected are identical after truncation"
    return pair, ""


def tokenize_preference(
    example: PreferenceExample,
    tokenizer: _Tokenizer,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> TokenizedPair | None:
    """Tokenize one pair and truncate it to ``max_length`` tokens per row, as the official DPO code.

    1. prompt, chosen and rejected are encoded SEPARATELY; BPE never merges across the
       prompt/response join, so ``prompt_ids + chosen_ids`` is exactly what is trained on.
       An empty prompt becomes [EOS] (EOS as BOS). EOS is appended to each response.
    2. If len(prompt) + len(longer response) > max_length, the prompt is cut to
       ``max_prompt_length`` tokens: "keep_end" keeps its END (the turn right before the
       response), "keep_start" its beginning.
    3. If still too long, both responses are cut to ``max_length - len(prompt)`` tokens, keeping
       their beginnings. The EOS is then cut too: a response stopped mid-way must not teach
       the model to stop there, so a truncated response carries no end-of-sequence signal.

    Returns None (the caller counts it) when a response encodes to zero tokens (before EOS),
    or when chosen and rejected are identical after truncation (their DPO gradient, eq. 9, is 0).

    Args:
        example: the pair; its ``source`` is kept for reports.
        tokenizer: anything with ``encode(str) -> list[int]`` and ``eos_id``.
        max_length: the most tokens in a prompt+response row, >= 2.
        max_prompt_length: the prompt's length after step 2, 1 <= max_prompt_length < max_length.
        truncation_mode: "keep_end" or "keep_start".
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    pair, _ = _assemble_pair(
        tokenizer.encode(example.prompt), tokenizer.encode(example.chosen), tokenizer.encode(example.rejected),
        tokenizer.eos_id, max_length, max_prompt_length, truncation_mode, example.source,
    )
    return pair


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def _warn_dropped(what: str, dropped: list[tuple[str, str]], n_total: int) -> None:
    if not dropped:
        return
    listed = "; ".join(f"{s}: {r}" for s, r in dropped[:_MAX_LISTED])
    more = f"; ... and {len(dropped) - _MAX_LISTED} more" if len(dropped) > _MAX_LISTED else ""
    warnings.warn(f"dropped {len(dropped)} of {n_total} {what}: {listed}{more}", DataWarning, stacklevel=3)


def build_preference_dataset(
    examples: list[PreferenceExample],
    tokenizer: _Tokenizer,
    max_length: int = 512,
    max_prompt_length: int = 128,
    truncation_mode: str = "keep_end",
) -> tuple[list[TokenizedPair], PreferenceStats]:
    """Tokenize every example as :func:`tokenize_preference` (batched encoding), drop and count
    the unusable ones, and warn once (a :class:`DataWarning`) naming each dropped pair's source.

    Returns:
        (pairs in input order, :class:`PreferenceStats`).
    Raises:
        ValueError when ``examples`` is empty or every pair was dropped.
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    examples = list(examples)
    if not examples:
        raise ValueError("build_preference_dataset: no examples given")
    n = len(examples)
    ids = _encode_many(tokenizer, [e.prompt for e in examples] + [e.chosen for e in examples]
                       + [e.rejected for e in examples])
    stats = PreferenceStats(n_examples=n)
    pairs: list[TokenizedPair] = []
    for k, ex in enumerate(examples):
        pair, reason = _assemble_pair(ids[k], ids[n + k], ids[2 * n + k], tokenizer.eos_id,
                                      max_length, max_prompt_length, truncation_mode, ex.source)
        if pair is None:
            if "identical" in reason:
                stats.dropped_identical += 1
            else:
                stats.dropped_empty += 1
            stats.dropped_sources.append((ex.source or f"example {k}", reason))
            continue
        pairs.append(pair)
        stats.prompts_truncated += pair.prompt_truncated
        stats.responses_truncated += pair.chosen_truncated or pair.rejected_truncated
        # truncation keeps a response's beginning, so a cut response always lost its EOS
        stats.eos_cut += pair.chosen_truncated + pair.rejected_truncated
    stats.n_kept = len(pairs)
    _warn_dropped("preference pairs", stats.dropped_sources, n)
    if not pairs:
        raise ValueError(f"all {n} preference pairs were dropped: {stats.dropped_sources[:_MAX_LISTED]}")
    return pairs, stats


def tokenize_sft(
    prompt: str,
    response: str,
    tokenizer: _Tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    source: str = "",
) -> TokenizedSFT | None:
    """Tokenize one SFT item: prompt and response encoded separately, EOS appended to the response.

    An empty prompt (a {"text"} item or a .txt line) becomes [EOS] (EOS as BOS), so the text's
    first token is a label. Truncation when len(prompt) + len(response) > max_length: the
    prompt is cut to ``max_prompt_length`` (default max_length // 2) keeping its END, then the
    response is cut to ``max_length - len(prompt)`` keeping its beginning (EOS cut then, as in
    :func:`tokenize_preference`). Returns None when the response encodes to zero tokens.
    """
    if max_prompt_length is None:
        max_prompt_length = max(1, max_length // 2) if isinstance(max_length, int) else max_length
    _check_lengths(max_length, max_prompt_length, "keep_end")
    return _assemble_sft(tokenizer.encode(prompt), tokenizer.encode(response), tokenizer.eos_id,
                         max_length, max_prompt_length, source)


def _assemble_sft(prompt_ids, response_ids, eos_id, max_length, max_prompt_length, source):
    if not response_ids:
        return None
    prompt = list(prompt_ids) or [eos_id]
    response = list(response_ids) + [eos_id]
    n = len(response)
    if len(prompt) + n > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    cut = len(prompt) < max(1, len(prompt_ids))
    if len(prompt) + n > max_length:
        response = response[: max_length - len(prompt)]
    return TokenizedSFT(prompt, response, source, cut or len(response) < n)


def build_sft_dataset(
    items: list[tuple[str, str]],
    tokenizer: _Tokenizer,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    sources: list[str] | None = None,
) -> tuple[list[TokenizedSFT], dict]:
    """Tokenize (prompt, response) pairs (e.g. :func:`read_sft_corpus`'s) as :func:`tokenize_sft`.

    ``sources`` defaults to ``items.sources`` when items is an :class:`SFTData`. Returns
    (items kept, {"n_examples", "n_kept", "dropped_empty", "truncated"}); dropped items are
    warned about with their source.
    """
    if max_prompt_length is None:
        max_prompt_length = max(1, max_length // 2)
    _check_lengths(max_length, max_prompt_length, "keep_end")
    items = list(items) if not isinstance(items, SFTData) else items
    if not items:
        raise ValueError("build_sft_dataset: no items given")
    if sources is None:
        sources = getattr(items, "sources", None) or [f"item {k}" for k in range(len(items))]
    n = len(items)
    ids = _encode_many(tokenizer, [p for p, _ in items] + [r for _, r in items])
    out, dropped, truncated = [], [], 0
    for k in range(n):
        t = _assemble_sft(ids[k], ids[n + k], tokenizer.eos_id, max_length, max_prompt_length, sources[k])
        if t is None:
            dropped.append((sources[k], "the response has zero tokens"))
            continue
        truncated += t.truncated
        out.append(t)
    _warn_dropped("SFT items", dropped, n)
    if not out:
        raise ValueError(f"all {n} SFT items were dropped")
    return out, {"n_examples": n, "n_kept": len(out), "dropped_empty": len(dropped), "truncated": truncated}


# ============================================================================ collation


def right_pad(prefixes: list[list[int]], suffixes: list[list[int]], pad_id: int):
    """Rows prefix|suffix right-padded with pad_id to the longest, and the mask of the suffix
    positions (the label positions: the token at t is predicted by the logits at t - 1). For
    token-level work on whole rows (PPO's rollouts); preference and SFT batches are
    packing.Batch (:func:`collate_preferences`, :func:`collate_sft`).

    Built without a Python loop over positions: the rows' tokens are concatenated, and each
    token's (row, column) comes from the row lengths.
    Returns input_ids (R, T) int64, loss_mask (R, T) bool.
    """
    if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
    p_len = np.array([len(p) for p in prefixes], dtype=np.int64)                  # (R,)
    s_len = np.array([len(s) for s in suffixes], dtype=np.int64)                  # (R,)
    if (p_len < 1).any():
        raise ValueError("every row needs a non-empty prompt (loss_mask[:, 0] must be False)")
    if (s_len < 1).any():
        raise ValueError("every row needs at least one response token")
    lengths = p_len + s_len                                                       # (R,)
    R = len(prefixes)
    T = int(lengths.max())
    flat = np.fromiter((t for p, s in zip(prefixes, suffixes) for part in (p, s) for t in part),
                       dtype=np.int64, count=int(lengths.sum()))                   # (sum L,)
    rows = np.repeat(np.arange(R, dtype=np.int64), lengths)                       # (sum L,)
    starts = np.cumsum(lengths) - lengths                                         # (R,)
    cols = np.arange(flat.size, dtype=np.int64) - np.repeat(starts, lengths)      # (sum L,)
    input_ids = np.full((R, T), pad_id, dtype=np.int64)                           # (R, T)
    input_ids[rows, cols] = flat
    loss_mask = np.zeros((R, T), dtype=bool)                                      # (R, T)
    loss_mask[rows, cols] = cols >= np.repeat(p_len, lengths)                     # response + EOS
    return input_ids, loss_mask


def collate_preferences(pairs: list[TokenizedPair], pad_id: int, backend=None, average: bool = False):
    """N pairs as one padded packing.Batch of 2N rows: chosen first, then rejected.

        rows 0 .. N-1   : prompt_i + chosen_i      (y_w)
        rows N .. 2N-1  : prompt_i + rejected_i    (y_l)

    Right-padded with ``pad_id``; the scored tokens are exactly the response tokens including
    the EOS, never the prompt or the padding, chosen from positions (so pad_id == eos_id is
    safe). The token at t+1 is predicted by the logits at t. This is packing's padded layout
    (pack_preferences with share_prompt=False, pack=False).

    Args:
        pairs: N >= 1 :class:`TokenizedPair`.
        pad_id: padding token id (its value never affects the loss: no real token sees a pad).
        backend: None -> NumPy arrays; else a Backend or device string, arrays go there.
        average: the batch's log-probs are per-token means (IPO's convention).
    Returns:
        packing.Batch with E = 2N examples.
    """
    from .packing import pack_preferences

    pairs = list(pairs)
    if not pairs:
        raise ValueError("collate_preferences: no pairs given")
    return pack_preferences(pairs, pad_id, share_prompt=False, pack=False, backend=backend, average=average)


def collate_sft(items: list[TokenizedSFT], pad_id: int, backend=None):
    """B SFT items as one padded packing.Batch of B rows [prompt | response + EOS], the response
    tokens scored (same conventions as :func:`collate_preferences`)."""
    from .packing import pack_sft

    items = list(items)
    if not items:
        raise ValueError("collate_sft: no items given")
    return pack_sft(items, pad_id, pack=False, backend=backend)


# ============================================================================ batching


def check_token_ids(rows, vocab_size: int, what: str) -> None:
    """Once per dataset, on the host: every token id fits the model's vocabulary and every
    response has at least one token (what the training step then no longer checks).

    rows: TokenizedSFT items or TokenizedPair items."""
    for i, r in enumerate(rows):
        seqs = [r.prompt_ids, r.response_ids] if hasattr(r, "response_ids") else [r.prompt_ids, r.chosen_ids, r.rejected_ids]
        if any(len(s) == 0 for s in seqs[1:]):
            raise ValueError(f"{what} item {i} ({getattr(r, 'source', '')}): empty response")
        hi = max(max(s) for s in seqs if s)
        lo = min(min(s) for s in seqs if s)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{what} item {i} ({getattr(r, 'source', '')}): token id {hi if hi >= vocab_size else lo} "
                             f"outside the model's vocabulary [0, {vocab_size}); was it tokenized with another tokenizer?")

