"""Byte-level BPE: training, lossless round trips, explicit special tokens, save/load."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer

from minidpo.tokenizer import BPETokenizer

CORPUS = [
    "The movie was wonderful, a delight from start to finish.",
    "The movie was terrible; I walked out after an hour.",
    "Human: what is the capital of France? Assistant: Paris is the capital of France.",
    "Numbers 12345 and symbols #@! mixed with   spaces\tand\ttabs.",
    "Unicode: café, naïve, Zürich, 東京, Привет, 😀🎉.",
] * 8


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CORPUS, vocab_size=400, min_frequency=2)


def test_training_learns_merges_and_ids_in_range(tok):
    assert 258 < tok.vocab_size <= 400  # 2 specials + 256 bytes + learned merges
    ids = tok.encode("The movie was wonderful")
    # merges make frequent words shorter than their bytes
    assert len(ids) < len("The movie was wonderful".encode())
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(["The movie", "", "東京"]) == [tok.encode("The movie"), [], tok.encode("東京")]


def test_special_ids_explicit_and_distinct(tok):
    assert tok.eos_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.pad_id == tok.token_to_id("<|pad|>") == 1
    assert tok.eos_id != tok.pad_id
    # encode never adds specials; decode skips them by default
    assert tok.eos_id not in tok.encode("The movie was wonderful.")
    text = "Paris"
    assert tok.decode(tok.encode(text) + [tok.eos_id, tok.pad_id]) == text
    assert tok.decode(tok.encode(text) + [tok.eos_id], skip_special_tokens=False) == text + "<|endoftext|>"


def test_pad_equals_eos_when_asked():
    t = BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=("<|endoftext|>",))
    assert t.pad_id == t.eos_id == t.token_to_id("<|endoftext|>")
    custom = BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=("</s>", "<pad>"))
    assert (custom.eos_id, custom.pad_id) == (custom.token_to_id("</s>"), custom.token_to_id("<pad>"))


def test_special_token_text_in_data_is_not_a_control_token(tok):
    s = "a review <|endoftext|> that quotes <|pad|> tokens"
    ids = tok.encode(s)
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == s


@given(st.text(max_size=200))
def test_decode_encode_roundtrip_any_text(s):
    t = _ROUNDTRIP_TOK
    assert t.decode(t.encode(s)) == s


def test_a_character_split_between_tokens_is_decoded_whole(tok):
    e, caf = tok.encode("é"), tok.encode("caf")
    assert len(e) == 2  # this corpus leaves é as its two bytes, 0xC3 0xA9: one token each
    assert tok.decode(caf + e) == "café"  # the sequence is decoded at once, not token by token
    assert tok.decode(caf + e[:1]) == "caf\ufffd"  # a lone lead byte is no character: U+FFFD


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60), st.text(max_size=60))
def test_encode_batch_matches_encode(a, b):
    t = _ROUNDTRIP_TOK
    assert t.encode_batch([a, b]) == [t.encode(a), t.encode(b)]


_ROUNDTRIP_TOK = BPETokenizer.train(CORPUS, vocab_size=350)


def test_save_load_directory_roundtrip(tok, tmp_path):
    f = tok.save(tmp_path / "tok")
    assert f == tmp_path / "tok" / "tokenizer.json" and f.is_file()
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["pad_token"] == "<|pad|>"
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for path in (tmp_path / "tok", f):
        t2 = BPETokenizer.load(path)
        assert (t2.eos_id, t2.pad_id, t2.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
        for s in CORPUS[:5] + ["unseen wörds 42"]:
            assert t2.encode(s) == tok.encode(s)


def test_save_file_and_custom_special_names(tmp_path):
    t = BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=("</s>", "<pad>"))
    t.save(tmp_path / "d")
    back = BPETokenizer.load(tmp_path / "d")  # names restored from tokenizer_config.json
    assert (back.eos_token, back.pad_token) == ("</s>", "<pad>")
    f = t.save(tmp_path / "plain.json")
    assert f.is_file()
    with pytest.raises(ValueError, match="EOS token"):  # no config beside it, not the default name
        BPETokenizer.load(f)
    back = BPETokenizer.load(f, eos_token="</s>", pad_token="<pad>")
    assert back.encode("The movie") == t.encode("The movie")


def test_load_missing_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        BPETokenizer.load(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        BPETokenizer.load(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        BPETokenizer.load(bad)


def test_from_tokenizers_gpt2_style(tok, tmp_path):
    # A GPT-2 style tokenizer: one special token, pad == eos; the wrapped object is copied.
    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    g = BPETokenizer.from_tokenizers(raw, eos_token="<|endoftext|>")
    assert g.pad_id == g.eos_id == tok.eos_id
    assert g.backend_tokenizer is not raw
    assert g.encode("The movie") == tok.encode("The movie")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        BPETokenizer.from_tokenizers(raw, eos_token="<eos>")


def test_vocab_merges_files_like_gpt2(tok, tmp_path):
    # GPT-2's original layout: vocab.json + merges.txt (no pre-tokenizer/decoder in them)
    tok.backend_tokenizer.model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    g = BPETokenizer.from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    d = BPETokenizer.load(tmp_path)  # directory without tokenizer.json
    s = "Unicode: café, 東京 and The movie was wonderful"
    assert g.encode(s) == d.encode(s) == tok.encode(s)
    assert g.decode(g.encode(s)) == s
    assert g.pad_id == g.eos_id == tok.eos_id


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="duplicates"):
        BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=("<a>", "<a>"))
    with pytest.raises(TypeError, match="not one string"):
        BPETokenizer.train("just one string", vocab_size=300)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        BPETokenizer.train(["ok", 3], vocab_size=300)
    t = BPETokenizer.train(CORPUS, vocab_size=300)
    with pytest.raises(TypeError):
        t.encode(b"bytes")
    with pytest.raises(ValueError, match="out of range"):
        t.decode([t.vocab_size])


@pytest.fixture(scope="module")
def hf_slow_gpt2(tmp_path_factory):
    """transformers' pure-Python GPT2Tokenizer on the same vocab.json + merges.txt: an independent
    implementation of GPT-2's byte-level BPE (its byte map, its regex, its merge loop)."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2files")
    _ROUNDTRIP_TOK.backend_tokenizer.model.save(str(d))
    ours = BPETokenizer.from_vocab_merges(d / "vocab.json", d / "merges.txt")
    return ours, transformers.GPT2Tokenizer(str(d / "vocab.json"), str(d / "merges.txt"))


@given(st.text(max_size=80).filter(lambda s: "<|" not in s))  # HF parses special-token text; we do not
def test_matches_independent_gpt2_implementation(hf_slow_gpt2, s):
    ours, theirs = hf_slow_gpt2
    assert ours.encode(s) == theirs.encode(s)
    assert ours.decode(ours.encode(s)) == theirs.decode(theirs.encode(s)) == s
