"""The KTO data format: {"prompt", "completion", "label": bool} a line, validated with
`file:line: reason` errors exactly like the preference format's (minidpo.data.DataError)."""

import json

import pytest

from minidpo.data import DataError, DataWarning, read_kto


def _write(tmp_path, lines, name="kto.jsonl"):
    p = tmp_path / name
    p.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return p


def test_reads_prompts_completions_and_labels(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "Q: 2+2?", "completion": " 4", "label": True}), "",
                          json.dumps({"prompt": "", "completion": " five", "label": False, "extra": 1}),
                          json.dumps({"prompt": "hi", "completion": "there", "label": True})])
    data = read_kto(p)
    assert [(e.prompt, e.completion, e.label) for e in data] == [("Q: 2+2?", " 4", True), ("", " five", False),
                                                                 ("hi", "there", True)]
    assert [e.source for e in data] == [f"{p}:1", f"{p}:3", f"{p}:4"]  # blank lines keep the numbering
    assert (data.n_desirable, data.n_undesirable, data.skipped) == (2, 1, 0)


BAD = [
    ('{"prompt": "a", "completion": "b"}', "missing key 'label' (true: a desirable completion, false: undesirable)"),
    ('{"prompt": "a", "completion": "b", "label": 1}', "key 'label' must be true or false, got number 1"),
    ('{"prompt": "a", "completion": "b", "label": "true"}', 'key \'label\' must be true or false, got string "true"'),
    ('{"prompt": "a", "completion": "b", "label": null}', "key 'label' must be true or false, got null null"),
    ('{"completion": "b", "label": true}', "missing key 'prompt'"),
    ('{"prompt": "a", "label": true}', "missing key 'completion'"),
    ('{"prompt": "a", "completion": 3, "label": true}', "key 'completion' must be a string, got number"),
    ('{"prompt": "a", "completion": "  ", "label": false}', "the 'completion' is empty"),
    ('{"prompt": "a", "completion": "b", "label": true, "label": false}', "duplicate key 'label' in one object"),
    ('["a", "b", true]', "expected a JSON object, got array"),
    ('{"prompt": "a", "completion": "b", "label": tru}', "invalid JSON: Expecting value (column 45)"),
    ('{"prompt": "\\ud800", "completion": "b", "label": true}', "key 'prompt' holds a lone surrogate"),
]


@pytest.mark.parametrize("line,reason", BAD, ids=[r[:30] for _, r in BAD])
def test_a_bad_line_stops_with_file_line_and_reason(tmp_path, line, reason):
    good = json.dumps({"prompt": "p", "completion": "c", "label": True})
    p = _write(tmp_path, [good, line, good])
    with pytest.raises(DataError) as info:
        read_kto(p)
    err = info.value
    assert (err.file, err.line) == (str(p), 2)
    assert str(err).startswith(f"{p}:2: ") and reason in err.reason, str(err)


def test_warn_skips_bad_lines_and_counts_them(tmp_path):
    good = json.dumps({"prompt": "p", "completion": "c", "label": False})
    p = _write(tmp_path, [good, '{"prompt": "p", "completion": "c", "label": 0}', good, "not json"])
    with pytest.warns(DataWarning) as rec:
        data = read_kto(p, on_error="warn")
    assert len(data) == 2 and data.skipped == 2 and [e.line for e in data.errors] == [2, 4]
    assert [str(w.message) for w in rec] == [str(e) for e in data.errors]
    assert (data.n_desirable, data.n_undesirable) == (0, 2)


def test_no_valid_example_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no KTO examples \\(the file is empty\\)"):
        read_kto(_write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="no KTO examples \\(1 bad line\\(s\\) skipped, none valid\\)"):
        with pytest.warns(DataWarning):
            read_kto(_write(tmp_path, ['{"label": true}'], "b.jsonl"), on_error="warn")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_kto(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        read_kto(tmp_path / "nope.jsonl", on_error="ignore")


def test_a_preference_file_is_not_kto_data(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})])
    with pytest.raises(DataError, match=":1: missing key 'completion'"):
        read_kto(p)
