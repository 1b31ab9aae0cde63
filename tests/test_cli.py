"""The `minidpo` command over a user's own files: tokenizer -> sft -> dpo -> sample/eval/export,
GPT-2 directories as starting points, and clear errors for bad input."""

import json

import numpy as np
import pytest

from minidpo.cli import build_parser, main
from minidpo.tasks import sentiment


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    corpus = sentiment.sft_corpus(200, seed=0)
    with open(d / "sft.jsonl", "w") as f:
        for p, r in corpus:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    rng = np.random.default_rng(0)
    with open(d / "prefs.jsonl", "w") as f:
        for i in range(60):
            p, r = corpus[i]
            other = corpus[int(rng.integers(100, 200))][1]
            f.write(json.dumps({"prompt": p, "chosen": r, "rejected": other}) + "\n")
    return d


def run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


TRAIN = ["--steps", 6, "--batch-size", 4, "--log-every", 3, "--eval-every", 3, "--warmup-steps", 2, "--no-progress"]


def test_full_pipeline(files, tmp_path, capsys):
    d = files
    code, out, _ = run(["tokenizer", "--corpus", d / "sft.jsonl", "--vocab-size", 300, "--out", tmp_path / "tok"], capsys)
    assert code == 0 and (tmp_path / "tok" / "tokenizer.json").exists()
    code, out, _ = run(["sft", "--data", d / "sft.jsonl", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "sft",
                        "--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--n-ctx", 64, *TRAIN], capsys)
    assert code == 0, out
    assert (tmp_path / "sft" / "checkpoint" / "model.safetensors").exists()
    assert (tmp_path / "sft" / "tokenizer.json").exists()
    code, out, _ = run(["dpo", "--data", d / "prefs.jsonl", "--ref", tmp_path / "sft", "--out", tmp_path / "dpo",
                        "--beta", 0.2, "--loss", "ipo", "--average-logps", *TRAIN], capsys)
    assert code == 0, out
    log = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r for r in log) and any("eval/rewards/margins" in r for r in log)
    trainer = json.loads((tmp_path / "dpo" / "checkpoint" / "trainer_state.json").read_text())
    assert trainer["config"]["train"]["loss_type"] == "ipo" and trainer["config"]["train"]["beta"] == 0.2

    code, out, err = run(["sample", "--model", tmp_path / "dpo", "--prompt", "the movie was", "--n", 2,
                          "--max-new-tokens", 100, "--jsonl"], capsys)
    assert code == 0
    rows = [json.loads(l) for l in out.splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "the movie was" for r in rows)
    assert "lowered" in err  # 100 new tokens do not fit a 64-token context

    code, out, _ = run(["eval", "--policy", tmp_path / "dpo", "--ref", tmp_path / "sft", "--data", d / "prefs.jsonl"],
                       capsys)
    assert code == 0
    m = json.loads(out)
    assert m["n_pairs"] == 60 and 0.0 <= m["rewards/accuracies"] <= 1.0

    # the policy evaluated against itself has zero implicit rewards and loss ln 2
    code, out, _ = run(["eval", "--policy", tmp_path / "sft", "--ref", tmp_path / "sft", "--data", d / "prefs.jsonl"],
                       capsys)
    m = json.loads(out)
    assert abs(m["loss"] - np.log(2)) < 1e-6 and abs(m["rewards/margins"]) < 1e-6

    code, out, _ = run(["export", "--model", tmp_path / "dpo", "--out", tmp_path / "hf"], capsys)
    assert code == 0 and (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()
    # a GPT-2 directory is a starting point for sft and a reference for dpo
    code, out, _ = run(["sft", "--data", d / "sft.jsonl", "--model", tmp_path / "hf", "--out", tmp_path / "sft2", *TRAIN],
                       capsys)
    assert code == 0, out
    code, out, _ = run(["dpo", "--data", d / "prefs.jsonl", "--ref", tmp_path / "hf", "--policy", tmp_path / "sft2",
                        "--out", tmp_path / "dpo2", *TRAIN], capsys)
    assert code == 0, out
    code, out, _ = run(["dpo", "--data", d / "prefs.jsonl", "--model", tmp_path / "hf", "--out", tmp_path / "dpo3",
                        *TRAIN], capsys)
    assert code == 0, out
    code, out, _ = run(["sample", "--model", tmp_path / "hf", "--prompt", "the film", "--greedy"], capsys)
    assert code == 0 and out.startswith("the film")


def test_bad_data_line_is_named(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = (files / "prefs.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:3] + ['{"prompt": "x", "chosen": "a"}'] + good[3:6]) + "\n")
    run(["tokenizer", "--corpus", files / "sft.jsonl", "--vocab-size", 300, "--out", tmp_path / "tok"], capsys)
    run(["sft", "--data", files / "sft.jsonl", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "sft",
         "--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--n-ctx", 64, *TRAIN], capsys)
    code, out, err = run(["dpo", "--data", bad, "--ref", tmp_path / "sft", "--out", tmp_path / "dpo", *TRAIN], capsys)
    assert code != 0 and "bad.jsonl:4" in err and "rejected" in err
    with pytest.warns(UserWarning, match="bad.jsonl:4"):
        code, out, err = run(["dpo", "--data", bad, "--ref", tmp_path / "sft", "--out", tmp_path / "dpo",
                              "--on-error", "warn", *TRAIN], capsys)
    assert code == 0


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert "minidpo: error:" in capsys.readouterr().err


def test_help_explains_beta_and_every_loss():
    text = build_parser()._subparsers._group_actions[0].choices["dpo"].format_help()
    for word in ["beta", "sigmoid", "robust", "ipo", "hinge", "--label-smoothing", "--rpo-alpha", "--reference-free"]:
        assert word in text
