"""Preference/SFT data: validation with file:line errors, HH split, truncation, masks, batching."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo.data import (
    DataError,
    DataWarning,
    PreferenceExample,
    TokenizedPair,
    TokenizedSFT,
    build_preference_dataset,
    build_sft_dataset,
    collate_preferences,
    collate_sft,
    read_preferences,
    read_sft_corpus,
    split_hh,
    tokenize_preference,
    tokenize_sft,
)
from minidpo.tokenizer import BPETokenizer
from tests.conftest import requires_cuda

GOOD = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
HH_PROMPT = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: tell me a joke\n\nAssistant:"


class CharTok:
    """One token per character (id = code point + 2), EOS 0, pad 1: lengths are exact."""

    eos_id = 0
    pad_id = 1

    def encode(self, text):
        return [ord(c) + 2 for c in text]


@pytest.fixture(scope="module")
def bpe():
    corpus = ["The movie was wonderful and the acting was great.",
              "The movie was terrible and boring.", "Human: hello\n\nAssistant: hi"] * 10
    return BPETokenizer.train(corpus, vocab_size=330)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ============================================================================ reading


BAD_LINES = [
    ('{"prompt": "a", "chosen": "b"', "invalid JSON"),
    ('["prompt", "chosen", "rejected"]', "expected a JSON object, got array"),
    ('"just a string"', "expected a JSON object, got string"),
    ('{"prompt": "a", "chosen": "b"}', "missing key 'rejected'"),
    ('{"prompt": "a", "rejected": "b"}', "missing key 'chosen'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "b"}', "key 'chosen' must be a string, got number"),
    ('{"prompt": null, "chosen": "x", "rejected": "b"}', "key 'prompt' must be a string, got null"),
    ('{"prompt": "a", "chosen": "same", "rejected": "same"}', "identical"),
    ('{"prompt": "a", "chosen": "", "rejected": "b"}', "'chosen' response is empty"),
    ('{"prompt": "a", "chosen": "x", "rejected": "  \\n"}', "'rejected' response is empty"),
    (json.dumps({"chosen": "\n\nHuman: hi no marker", "rejected": HH_PROMPT + " no"}),
     "'chosen' transcript has no"),
    (json.dumps({"chosen": HH_PROMPT + " yes", "rejected": "\n\nHuman: nothing"}),
     "'rejected' transcript has no"),
    (json.dumps({"chosen": HH_PROMPT + " yes", "rejected": "\n\nHuman: other\n\nAssistant: no"}),
     "prompts of the 'chosen' and 'rejected' transcripts differ"),
    (json.dumps({"chosen": HH_PROMPT + " same", "rejected": HH_PROMPT + " same"}), "identical"),
    (json.dumps({"chosen": HH_PROMPT, "rejected": HH_PROMPT + " no"}), "'chosen' response is empty"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, bad, reason):
    # line 1 good, line 2 blank (still counted), line 3 bad, line 4 good
    path = write_lines(tmp_path / "prefs.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(DataError) as info:
        read_preferences(path)
    err = info.value
    assert (err.file, err.line) == (str(path), 3)
    assert str(err).startswith(f"{path}:3: ")
    assert reason in err.reason and reason in str(err)


def test_not_utf8_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:2: not valid UTF-8"):
        read_preferences(path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_preferences(path)
    assert info.value.line is None and str(info.value).startswith(f"{path}: ")
    assert "no preference examples" in str(info.value) and "empty" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        read_preferences(tmp_path / "nope.jsonl", on_error="ignore")


def test_warn_mode_keeps_every_good_line(tmp_path):
    lines, good_lines, bad_lines = [], [], []
    for k, (bad, _) in enumerate(BAD_LINES):
        lines.append(json.dumps({"prompt": f"p{k}", "chosen": f"c{k}", "rejected": f"r{k}"}))
        good_lines.append(len(lines))
        lines.append(bad)
        bad_lines.append(len(lines))
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = read_preferences(path, on_error="warn")
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(msgs) == len(bad_lines)
    assert [m.split(": ")[0] for m in msgs] == [f"{path}:{i}" for i in bad_lines]
    assert data.skipped == len(bad_lines) and len(data.errors) == len(bad_lines)
    assert [e.prompt for e in data] == [f"p{k}" for k in range(len(BAD_LINES))]
    assert [e.source for e in data] == [f"{path}:{i}" for i in good_lines]


def test_warn_mode_all_bad_still_raises(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{", "[]"])
    with pytest.warns(DataWarning), pytest.raises(DataError, match="2 bad line"):
        read_preferences(path, on_error="warn")


def test_hh_split(tmp_path):
    chosen, rejected = " Why did the chicken cross the road?", " No."
    line = {"chosen": HH_PROMPT + chosen, "rejected": HH_PROMPT + rejected, "extra": 1}
    path = write_lines(tmp_path / "hh.jsonl", [json.dumps(line), json.dumps(GOOD)])
    ex = read_preferences(path)
    assert ex[0] == PreferenceExample(HH_PROMPT, chosen, rejected, f"{path}:1")
    assert ex[0].prompt.endswith("\n\nAssistant:") and ex[0].prompt.count("\n\nAssistant:") == 2
    assert ex[1] == PreferenceExample(GOOD["prompt"], GOOD["chosen"], GOOD["rejected"], f"{path}:2")
    # the LAST marker splits, even when the response itself mentions the word Assistant
    assert split_hh("\n\nHuman: a\n\nAssistant: b Assistant: c") == ("\n\nHuman: a\n\nAssistant:", " b Assistant: c")


def test_read_sft_corpus_shapes_and_errors(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        json.dumps({"prompt": "Q", "response": "A"}), json.dumps({"text": "free text"}), ""])
    data = read_sft_corpus(path)
    assert list(data) == [("Q", "A"), ("", "free text")] and data.sources == [f"{path}:1", f"{path}:2"]
    for bad, reason in [('{"prompt": "Q"}', "missing key 'response'"), ('{"text": 5}', "must be a string"),
                        ('{"text": ""}', "empty"), ('{"text": "a", "response": "b"}', "both"),
                        ('{"other": 1}', "missing key 'text'"), ("nope", "invalid JSON")]:
        p = write_lines(tmp_path / "b.jsonl", [json.dumps({"text": "ok"}), bad])
        with pytest.raises(DataError, match=rf"b\.jsonl:2: .*{reason}"):
            read_sft_corpus(p)
        with pytest.warns(DataWarning, match=r"b\.jsonl:2"):
            assert list(read_sft_corpus(p, on_error="warn")) == [("", "ok")]
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\r\n\nsecond doc  \n   \nthird\n")
    assert list(read_sft_corpus(txt)) == [("", "first doc"), ("", "second doc  "), ("", "third")]
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no SFT examples"):
        read_sft_corpus(empty)


# ============================================================================ tokenization


def ex(prompt, chosen, rejected, source="t:1"):
    return PreferenceExample(prompt, chosen, rejected, source)


def test_no_bpe_merge_across_join(bpe):
    # "The mov" + "ie was" encoded jointly merges "movie"; separately it must not.
    prompt, chosen, rejected = "The mov", "ie was wonderful", "ie was terrible"
    assert bpe.encode(prompt + chosen) != bpe.encode(prompt) + bpe.encode(chosen)  # the test has teeth
    pair = tokenize_preference(ex(prompt, chosen, rejected), bpe, max_length=64, max_prompt_length=32)
    assert pair.prompt_ids == bpe.encode(prompt)
    assert pair.chosen_ids == bpe.encode(chosen) + [bpe.eos_id]
    assert pair.rejected_ids == bpe.encode(rejected) + [bpe.eos_id]
    batch = collate_preferences([pair], pad_id=bpe.pad_id)
    n = len(pair.prompt_ids) + len(pair.chosen_ids)
    assert batch.input_ids[0, :n].tolist() == bpe.encode(prompt) + bpe.encode(chosen) + [bpe.eos_id]


@given(st.text(max_size=30), st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_ids_are_concatenation_of_separate_encodings(prompt, chosen, rejected):
    tok = _BPE
    if chosen == rejected or not tok.encode(chosen) or not tok.encode(rejected):
        return
    pair = tokenize_preference(ex(prompt, chosen, rejected), tok, max_length=256, max_prompt_length=128)
    assert pair.prompt_ids == (tok.encode(prompt) or [tok.eos_id])
    assert pair.chosen_ids == tok.encode(chosen) + [tok.eos_id]
    assert pair.rejected_ids == tok.encode(rejected) + [tok.eos_id]


def scored_positions(batch):
    """(R, L) bool: the positions of the batch's scored tokens (a padded batch's loss mask)."""
    m = np.zeros(batch.shape, dtype=bool)
    m.reshape(-1)[batch.host_at] = True
    return m


_BPE = BPETokenizer.train(["the cat sat on the mat", "unicode ünïcödé 東京"] * 5, vocab_size=300)


def test_empty_prompt_gets_eos_as_bos():
    pair = tokenize_preference(ex("", "ab", "cd"), CharTok(), max_length=10, max_prompt_length=4)
    assert pair.prompt_ids == [CharTok.eos_id]
    batch = collate_preferences([pair], pad_id=1)
    assert not scored_positions(batch)[:, 0].any()
    assert scored_positions(batch)[0].tolist() == [False, True, True, True]


def test_truncation_modes_exact():
    t = CharTok()
    e = ex("abcdefghij", "xyz", "pq")  # prompt 10, chosen 3+EOS, rejected 2+EOS
    end = tokenize_preference(e, t, max_length=8, max_prompt_length=4, truncation_mode="keep_end")
    start = tokenize_preference(e, t, max_length=8, max_prompt_length=4, truncation_mode="keep_start")
    assert end.prompt_ids == t.encode("ghij") and start.prompt_ids == t.encode("abcd")
    for p in (end, start):  # 4 + 4 fits: responses intact, EOS kept
        assert p.prompt_truncated and not p.chosen_truncated and not p.rejected_truncated
        assert p.chosen_ids == t.encode("xyz") + [0] and p.rejected_ids == t.encode("pq") + [0]
    # still too long after the prompt cut: responses keep their beginning, the EOS goes
    p = tokenize_preference(e, t, max_length=6, max_prompt_length=3)
    assert p.prompt_ids == t.encode("hij")
    assert p.chosen_ids == t.encode("xyz") and p.chosen_truncated
    assert p.rejected_ids == t.encode("pq") + [0] and not p.rejected_truncated
    # short enough: nothing touched even when the prompt exceeds max_prompt_length
    p = tokenize_preference(e, t, max_length=20, max_prompt_length=3)
    assert p.prompt_ids == t.encode("abcdefghij") and not p.prompt_truncated
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_preference(e, t, max_length=8, max_prompt_length=4, truncation_mode="middle")
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_preference(e, t, max_length=8, max_prompt_length=8)


@given(st.integers(0, 30), st.integers(1, 30), st.integers(1, 30), st.integers(2, 40), st.data(),
       st.sampled_from(["keep_end", "keep_start"]))
def test_truncation_properties(lp, lc, lr, max_length, data, mode):
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    t = CharTok()
    prompt = "".join(chr(97 + i % 26) for i in range(lp))
    chosen, rejected = "C" * lc, "R" * lr
    pair = tokenize_preference(ex(prompt, chosen, rejected), t, max_length, max_prompt_length, mode)
    full_p = t.encode(prompt) or [0]
    full_c, full_r = t.encode(chosen) + [0], t.encode(rejected) + [0]
    assert pair.chosen_length <= max_length and pair.rejected_length <= max_length
    assert len(pair.prompt_ids) >= 1 and len(pair.chosen_ids) >= 1 and len(pair.rejected_ids) >= 1
    if mode == "keep_end":
        assert full_p[len(full_p) - len(pair.prompt_ids):] == pair.prompt_ids
    else:
        assert full_p[: len(pair.prompt_ids)] == pair.prompt_ids
    assert full_c[: len(pair.chosen_ids)] == pair.chosen_ids
    assert full_r[: len(pair.rejected_ids)] == pair.rejected_ids
    if len(full_p) + max(len(full_c), len(full_r)) <= max_length:
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (full_p, full_c, full_r)
    else:
        assert len(pair.prompt_ids) == min(len(full_p), max_prompt_length)
    assert pair.chosen_truncated == (pair.chosen_ids != full_c)


def test_dropped_pairs_counted_and_warned():
    t = CharTok()
    examples = [
        ex("p", "good", "bad", "f.jsonl:1"),
        ex("p", "", "bad", "f.jsonl:2"),              # empty response: zero tokens
        ex("p", "abcdefX", "abcdefY", "f.jsonl:3"),   # identical once cut to 4 tokens
        ex("pp", "x" * 10, "y", "f.jsonl:4"),          # truncated, kept
    ]
    with pytest.warns(DataWarning) as rec:
        pairs, stats = build_preference_dataset(examples, t, max_length=6, max_prompt_length=2)
    msg = str(rec[0].message)
    assert "dropped 2 of 4" in msg and "f.jsonl:2" in msg and "f.jsonl:3" in msg and "f.jsonl:1" not in msg
    assert [p.source for p in pairs] == ["f.jsonl:1", "f.jsonl:4"]
    assert (stats.n_examples, stats.n_kept, stats.n_dropped) == (4, 2, 2)
    assert (stats.dropped_empty, stats.dropped_identical) == (1, 1)
    assert stats.responses_truncated == 1 and stats.eos_cut == 1 and stats.prompts_truncated == 0
    assert tokenize_preference(examples[1], t, 6, 2) is None
    # batched tokenization equals one-at-a-time
    assert pairs[1] == tokenize_preference(examples[3], t, 6, 2)
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="all 1 preference pairs were dropped"):
        build_preference_dataset([examples[1]], t, max_length=6, max_prompt_length=2)


def test_build_with_bpe_matches_single(bpe):
    examples = [ex("The movie", " was wonderful", " was terrible", "a:1"), ex("", "hi", "bye", "a:2")]
    pairs, stats = build_preference_dataset(examples, bpe, max_length=64, max_prompt_length=16)
    assert pairs == [tokenize_preference(e, bpe, 64, 16) for e in examples]
    assert stats.n_kept == 2 and stats.n_dropped == 0


# ============================================================================ collation


token_ids = st.lists(st.integers(0, 50), min_size=1, max_size=12)


@given(st.lists(st.tuples(token_ids, token_ids, token_ids), min_size=1, max_size=5), st.booleans())
def test_collated_scored_tokens_are_exactly_response_plus_eos(raw, pad_is_eos):
    eos = 3
    pad = eos if pad_is_eos else 99
    pairs = [TokenizedPair(p, c + [eos], r + [eos]) for p, c, r in raw]  # EOS may also occur inside
    batch = collate_preferences(pairs, pad_id=pad)
    ids = batch.input_ids
    N = len(pairs)
    T = max(max(pr.chosen_length, pr.rejected_length) for pr in pairs)
    assert ids.shape == (2 * N, T) and ids.dtype == np.int64 and batch.layout.causal
    scored = np.zeros(ids.shape, dtype=bool)
    scored.reshape(-1)[batch.host_at] = True
    assert not scored[:, 0].any()
    for row in range(2 * N):
        pr = pairs[row % N]
        resp = pr.chosen_ids if row < N else pr.rejected_ids
        lp, lr = len(pr.prompt_ids), len(resp)
        assert ids[row, : lp + lr].tolist() == pr.prompt_ids + resp
        assert (ids[row, lp + lr:] == pad).all()
        expect = np.zeros(T, dtype=bool)
        expect[lp: lp + lr] = True
        np.testing.assert_array_equal(scored[row], expect)  # response + EOS, never prompt or pad
        assert scored[row, lp + lr - 1] and ids[row, lp + lr - 1] == eos  # the EOS is a label
    np.testing.assert_array_equal(batch.labels, ids.reshape(-1)[batch.host_at])
    np.testing.assert_array_equal(batch.logits_at, batch.host_at - 1)  # predicted by the token before
    assert scored.sum() == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def test_collate_errors_and_backend():
    pair = TokenizedPair([5], [6, 0], [7, 0])
    out = collate_preferences([pair], pad_id=0, backend="cpu")
    assert out.input_ids.dtype == np.int64 and out.labels.dtype == np.int64 and out.n_examples == 2
    with pytest.raises(ValueError, match="empty prompt"):
        collate_preferences([TokenizedPair([], [6], [7])], pad_id=0)
    with pytest.raises(ValueError, match="no pairs"):
        collate_preferences([], pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        collate_preferences([pair], pad_id=-1)


@requires_cuda
def test_collate_on_cuda_matches_cpu():  # pragma: no cover - needs a GPU
    import cupy

    pairs = [TokenizedPair([5, 6], [7, 0], [8, 9, 0]), TokenizedPair([4], [1, 0], [2, 0])]
    cpu = collate_preferences(pairs, pad_id=0)
    gpu = collate_preferences(pairs, pad_id=0, backend="cuda")
    for k in ("input_ids", "logits_at", "labels", "example", "token_counts"):
        g, c = getattr(gpu, k), getattr(cpu, k)
        assert isinstance(g, cupy.ndarray) and g.dtype == c.dtype
        np.testing.assert_array_equal(cupy.asnumpy(g), c)
    for k in ("start", "hidden_lo", "hidden_hi", "positions"):
        assert isinstance(getattr(gpu.layout, k), cupy.ndarray)


def test_sft_tokenize_and_collate(bpe):
    item = tokenize_sft("", "The movie was great", bpe, max_length=64)
    assert item.prompt_ids == [bpe.eos_id]  # BOS = EOS: the first real token is a label
    assert item.response_ids == bpe.encode("The movie was great") + [bpe.eos_id]
    qa = tokenize_sft("Q:", " A", bpe, max_length=64)
    batch = collate_sft([item, qa], pad_id=bpe.eos_id)  # pad == eos on purpose
    ids, mask = batch.input_ids, scored_positions(batch)
    assert ids.shape == (2, 1 + len(item.response_ids)) and mask.dtype == np.bool_
    assert mask[0].tolist() == [False] + [True] * len(item.response_ids)
    lq = len(qa.prompt_ids)
    assert mask[1].tolist() == [False] * lq + [True] * len(qa.response_ids) + [False] * (ids.shape[1] - lq - len(qa.response_ids))
    assert tokenize_sft("Q", "", bpe, max_length=8) is None
    t = CharTok()
    cut = tokenize_sft("abcdef", "xyz", t, max_length=6, max_prompt_length=2)
    assert cut.prompt_ids == t.encode("ef") and cut.response_ids == t.encode("xyz") + [0]
    cut = tokenize_sft("", "x" * 10, t, max_length=6)
    assert cut.prompt_ids == [0] and cut.response_ids == t.encode("xxxxx") and cut.truncated
    with pytest.warns(DataWarning, match="item 1"):
        items, stats = build_sft_dataset([("", "abc"), ("q", "")], t, max_length=8)
    assert items == [TokenizedSFT([0], t.encode("abc") + [0], "item 0")] and stats["dropped_empty"] == 1


# ============================================================================ batching


def test_a_duplicate_key_is_an_error_naming_file_line_and_key(tmp_path):
    # the last "chosen" would win and flip the label: refused, never trained on
    f = tmp_path / "dup.jsonl"
    f.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n'
                 '{"prompt": "p", "chosen": "good", "rejected": "bad", "chosen": "bad!"}\n')
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate key 'chosen'"):
        read_preferences(f)
    with pytest.warns(DataWarning, match="dup.jsonl:2: duplicate key"):
        data = read_preferences(f, on_error="warn")
    assert len(data) == 1 and data.skipped == 1


def test_a_lone_surrogate_is_an_error_with_file_and_line(tmp_path):
    f = tmp_path / "sur.jsonl"
    f.write_text('{"prompt": "p", "chosen": "ok", "rejected": "no"}\n{"prompt": "p", "chosen": "\\ud800", "rejected": "no"}\n')
    with pytest.raises(DataError, match=r"sur.jsonl:2: key 'chosen' holds a lone surrogate"):
        read_preferences(f)
    g = tmp_path / "sur_sft.jsonl"
    g.write_text('{"text": "fine"}\n{"text": "x\\udfff"}\n')
    with pytest.raises(DataError, match=r"sur_sft.jsonl:2: key 'text' holds a lone surrogate"):
        read_sft_corpus(g)
