"""The `minidpo` command as a user meets it in the first hour, and as someone trying to break
it: interrupts, re-runs, damaged checkpoints, bad options, full disks, pipes. Each test is a
case that once lost work, gave a wrong result or printed a traceback."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minidpo.cli import build_parser, main
from minidpo.tasks import sentiment

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", 6, "--batch-size", 4, "--log-every", 2, "--eval-every", 3, "--warmup-steps", 2, "--no-progress"]
MODEL = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--n-ctx", 64]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data files, a tokenizer and a finished 6-step SFT run, shared (read-only) by the tests."""
    d = tmp_path_factory.mktemp("cli_runs")
    corpus = sentiment.sft_corpus(200, seed=0)
    with open(d / "sft.jsonl", "w") as f:
        for p, r in corpus:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    rng = np.random.default_rng(0)
    for name, lo in (("prefs.jsonl", 0), ("prefs2.jsonl", 60)):
        with open(d / name, "w") as f:
            for i in range(lo, lo + 60):
                p, r = corpus[i]
                f.write(json.dumps({"prompt": p, "chosen": r, "rejected": corpus[int(rng.integers(100, 200))][1]}) + "\n")
    assert main(["tokenizer", "--corpus", str(d / "sft.jsonl"), "--vocab-size", "300", "--out", str(d / "tok")]) == 0
    assert main(["tokenizer", "--corpus", str(d / "sft.jsonl"), "--vocab-size", "320", "--out", str(d / "tok2")]) == 0
    assert run(["sft", "--data", d / "sft.jsonl", "--tokenizer", d / "tok", "--out", d / "sft", *MODEL, *TRAIN])[0] == 0
    return d


def run(argv, capsys=None):
    code = main([str(a) for a in argv])
    if capsys is None:
        return code, "", ""
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def cli(*argv, env=None, **kw):
    """python -m minidpo in a subprocess (for signals, pipes and terminals)."""
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    e.pop("MINIDPO_TEST_INTERRUPT_AT", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "minidpo", *map(str, argv)], env=e, capture_output=True,
                          timeout=300, **kw)


def records(path):
    return [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in Path(path).read_text().splitlines()]


def weights(run_dir):
    return load_file(str(Path(run_dir) / "checkpoint" / "model.safetensors"))


# ------------------------------------------------------------------ 1. Ctrl-C stops the job


@pytest.mark.slow
def test_ctrl_c_exits_130_without_done_and_the_rerun_equals_an_uninterrupted_run(files, tmp_path):
    d = files
    dpo = ["dpo", "--data", d / "prefs.jsonl", "--ref", d / "sft", *TRAIN, "--steps", 9]
    p = cli(*dpo, "--out", tmp_path / "clean")
    assert p.returncode == 0 and b"done:" in p.stdout
    # a real SIGINT in the middle of step 5's bookkeeping (a Ctrl-C there)
    p = cli(*dpo, "--out", tmp_path / "b", env={"MINIDPO_TEST_INTERRUPT_AT": "dpo:step=5"})
    assert p.returncode == 130, p.stderr
    assert b"interrupted: checkpoint saved at step 5 of 9" in p.stdout and b"done:" not in p.stdout
    assert b"Traceback" not in p.stderr
    # so `minidpo sft ... && minidpo dpo ...` stops here; the same command resumes
    p = cli(*dpo, "--out", tmp_path / "b")
    assert p.returncode == 0 and b"resuming at step 5 of 9" in p.stdout and b"done:" in p.stdout
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "b")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # the metrics equal the uninterrupted run's record for record (the record spanning the
    # interruption averages the same steps; the interrupt adds no partial record)
    assert records(tmp_path / "b" / "metrics.jsonl") == records(tmp_path / "clean" / "metrics.jsonl")


def test_ctrl_c_during_start_up_exits_130_with_one_line(files, tmp_path, monkeypatch, capsys):
    import minidpo.cli as C

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "load_model", interrupted)
    code, out, err = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", tmp_path / "x"], capsys)
    assert code == 130 and err.strip() == "minidpo: interrupted"


def test_dpo_refuses_an_unfinished_reference_unless_allowed(files, tmp_path, capsys, monkeypatch):
    d = files
    monkeypatch.setenv("MINIDPO_TEST_INTERRUPT_AT", "sft:step=3")
    code, out, _ = run(["sft", "--data", d / "sft.jsonl", "--tokenizer", d / "tok", "--out", tmp_path / "sft",
                        *MODEL, *TRAIN], capsys)
    assert code == 130 and "done:" not in out
    monkeypatch.delenv("MINIDPO_TEST_INTERRUPT_AT")
    code, out, err = run(["dpo", "--data", d / "prefs.jsonl", "--ref", tmp_path / "sft", "--out", tmp_path / "dpo",
                          *TRAIN], capsys)
    assert code == 1 and "stopped at step 3 of its 6" in err and "--allow-unfinished-ref" in err
    assert not (tmp_path / "dpo").exists()
    code, out, err = run(["dpo", "--data", d / "prefs.jsonl", "--ref", tmp_path / "sft", "--out", tmp_path / "dpo",
                          "--allow-unfinished-ref", *TRAIN], capsys)
    assert code == 0, err


# ------------------------------------------------------------------ 2. run folders are never reused silently


def test_a_rerun_with_other_options_stops_a_finished_one_says_so_more_steps_resume(files, tmp_path, capsys):
    d = files
    out = tmp_path / "dpo"
    base = ["dpo", "--data", d / "prefs.jsonl", "--ref", d / "sft", "--out", out, *TRAIN]
    assert run(base, capsys)[0] == 0
    before = weights(out)
    for extra, named in ((["--beta", 0.5], "beta (0.1 there, 0.5 now)"),
                         (["--data", d / "prefs2.jsonl"], "data ("),
                         (["--adam-betas", "0.9,0.999"], "adam_betas"),
                         (["--loss", "ipo"], "loss_type")):
        code, out_text, err = run(base + extra, capsys)
        assert code == 1 and named in err and "--overwrite" in err and "new --out" in err, (extra, err)
        assert "done:" not in out_text
    code, out_text, _ = run(base, capsys)
    assert code == 0 and "already complete at step 6" in out_text and "done:" not in out_text
    after = weights(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    code, out_text, _ = run(base + ["--steps", 8], capsys)
    assert code == 0 and "resuming at step 6 of 8" in out_text
    code, out_text, err = run(base + ["--steps", 4], capsys)
    assert code == 1 and "checkpoint is at step 8, beyond 4: nothing to train" in err
    code, out_text, _ = run(base + ["--beta", 0.5, "--overwrite"], capsys)
    assert code == 0 and "done:" in out_text
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["config"]["train"]["beta"] == 0.5


def test_a_different_tokenizer_is_refused_before_anything_is_written(files, tmp_path, capsys):
    d = files
    out = tmp_path / "sft"
    args = ["sft", "--data", d / "sft.jsonl", "--out", out, *MODEL, *TRAIN]
    assert run(args + ["--tokenizer", d / "tok"], capsys)[0] == 0
    tok_before = (out / "tokenizer.json").read_bytes()
    code, _, err = run(args + ["--tokenizer", d / "tok2"], capsys)
    assert code == 1 and "--overwrite" in err
    assert (out / "tokenizer.json").read_bytes() == tok_before
    # bad option values fail before the run folder is even created
    for bad in (["--loss", "ipo", "--label-smoothing", "0.2"],):
        code, _, err = run(["dpo", "--data", d / "prefs.jsonl", "--ref", d / "sft", "--out", tmp_path / "new", *TRAIN,
                            *bad], capsys)
        assert code == 2 and "--label-smoothing applies to --loss sigmoid or robust or exo_pair or aot or aot_unpaired, not ipo" in err
        assert not (tmp_path / "new").exists()


def test_two_processes_on_one_out_the_second_is_told_who_holds_it(files, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom minidpo.train import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)", str(tmp_path / "dpo")],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", tmp_path / "dpo",
                            *TRAIN], capsys)
        assert code == 1 and f"in use by another process (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ 3, 4, 9. checkpoints are checked on load


def _tampered_run(files, tmp_path, change) -> Path:
    import shutil

    run_dir = tmp_path / "bad"
    shutil.copytree(files / "sft", run_dir)
    f = run_dir / "checkpoint" / "model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f))
    return run_dir


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"][:1]}),
     r"tensor transformer.wte.weight has shape \(1, 16\), the model needs \(\d+, 16\)"),
    (lambda t: t.update({"transformer.ln_f.bias": t["transformer.ln_f.bias"].astype(np.int32)}),
     "tensor transformer.ln_f.bias has dtype int32"),
    (lambda t: t["transformer.h.0.mlp.c_fc.weight"].__setitem__((0, 0), np.nan),
     "tensor transformer.h.0.mlp.c_fc.weight holds non-finite values"),
    (lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"]}), r"unexpected \['lm_head.weight'\]"),
])
def test_a_damaged_checkpoint_is_named_never_broadcast_truncated_or_sampled(files, tmp_path, capsys, change, message):
    import re

    bad = _tampered_run(files, tmp_path, change)
    code, out, err = run(["sample", "--model", bad, "--prompt", "the movie", "--max-new-tokens", 4], capsys)
    assert code == 1 and re.search(message, err) and err.startswith("minidpo: error:") and out == "", err
    # a resumed run checks the same way and never saves the bad tensor back
    before = (bad / "checkpoint" / "model.safetensors").read_bytes()
    code, _, err = run(["sft", "--data", files / "sft.jsonl", "--tokenizer", files / "tok", "--out", bad, *MODEL,
                        *TRAIN, "--steps", 8], capsys)
    assert code == 1 and re.search(message, err), err
    assert (bad / "checkpoint" / "model.safetensors").read_bytes() == before


def test_weights_without_trainer_state_are_damaged_never_overwritten(files, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(files / "sft", run_dir)
    (run_dir / "checkpoint" / "trainer_state.json").unlink()
    before = (run_dir / "checkpoint" / "model.safetensors").read_bytes()
    code, _, err = run(["sft", "--data", files / "sft.jsonl", "--tokenizer", files / "tok", "--out", run_dir, *MODEL,
                        *TRAIN], capsys)
    assert code == 1 and "no trainer_state.json: a damaged checkpoint" in err
    assert (run_dir / "checkpoint" / "model.safetensors").read_bytes() == before


def test_malformed_trainer_state_is_one_line(files, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(files / "sft", run_dir)
    f = run_dir / "checkpoint" / "trainer_state.json"
    f.write_text(json.dumps(dict(json.loads(f.read_text()), tensors="x")))
    code, _, err = run(["sample", "--model", run_dir, "--prompt", "hi"], capsys)
    assert code == 1 and "trainer_state.json: 'tensors' must be" in err


def test_a_tokenizer_larger_than_the_model_is_refused(files, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(files / "sft", run_dir)
    shutil.copy(files / "tok2" / "tokenizer.json", run_dir / "tokenizer.json")
    code, out, err = run(["sample", "--model", run_dir, "--prompt", "hi"], capsys)
    assert code == 1 and "tokenizer has 320 tokens but the model only 300" in err and out == ""


# ------------------------------------------------------------------ 10. nonsense options


@pytest.mark.parametrize("bad", [["--steps", -1], ["--eval-fraction", 1.5], ["--eval-fraction", -0.5],
                                 ["--grad-clip", -1], ["--save-every", 0], ["--log-every", 0], ["--eval-every", 0],
                                 ["--batch-size", 0], ["--eval-batch-size", 0], ["--beta", 0], ["--lr", 0],
                                 ["--adam-betas", "0.9"], ["--step", 5]])
def test_nonsense_options_are_usage_errors(files, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in ["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", tmp_path / "x",
                               *bad]])
    assert e.value.code == 2
    assert bad[0] in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_eval_scores_the_rpo_term_as_dpo_trains_it(files, capsys):
    """`eval --rpo-alpha` adds alpha times the chosen responses' per-token NLL, as the training loss does
    (tests/test_loss_table.py: held-out evaluation equals the step's loss); the rest is unchanged."""
    args = ["eval", "--policy", str(files / "sft"), "--ref", str(files / "sft"), "--data", str(files / "prefs.jsonl")]
    code, out, _ = run(args, capsys)
    assert code == 0
    plain = json.loads(out)
    code, out, _ = run(args + ["--rpo-alpha", "1"], capsys)
    assert code == 0
    rpo = json.loads(out)
    assert plain["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy = reference
    assert rpo["loss"] > plain["loss"] + 1.0  # an NLL per token of a barely trained model is well above 1
    assert {k: v for k, v in rpo.items() if k != "loss"} == {k: v for k, v in plain.items() if k != "loss"}


# ------------------------------------------------------------------ one line, not a traceback


def test_bad_paths_are_one_line_errors(files, tmp_path, capsys):
    d = files
    (tmp_path / "afile").write_text("x")
    cases = [
        (["sft", "--data", tmp_path, "--tokenizer", d / "tok", "--out", tmp_path / "o1", *TRAIN], "directory"),
        (["dpo", "--data", d / "prefs.jsonl", "--eval-data", tmp_path, "--ref", d / "sft", "--out", tmp_path / "o2",
          *TRAIN], "directory"),
        (["sample", "--model", d / "sft", "--prompts-file", tmp_path], "directory"),
        (["tokenizer", "--corpus", d / "sft.jsonl", "--out", tmp_path / "afile"], "is a file"),
        (["export", "--model", d / "sft", "--out", d], "not an empty folder"),
    ]
    for argv, words in cases:
        code, _, err = run(argv, capsys)
        assert code == 1 and err.startswith("minidpo: error:") and words in err and err.count("\n") == 1, (argv, err)


@pytest.mark.parametrize("code_,text", [("ENOSPC", "No space left on device"), ("EROFS", "Read-only file system")])
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(files, tmp_path, capsys, monkeypatch, code_, text):
    import errno

    import minidpo.checkpoint as CK

    out = tmp_path / "dpo"
    base = ["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", out, *TRAIN]
    assert run(base, capsys)[0] == 0
    before = weights(out)

    def full(*a, **kw):
        raise OSError(getattr(errno, code_), text)

    monkeypatch.setattr(CK, "save_file", full)
    code, _, err = run(base + ["--steps", 8], capsys)
    assert code == 1 and "cannot write the checkpoint" in err and text in err
    assert "(step 6), intact" in err
    after = weights(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_read_only_disk_while_saving_a_tokenizer_names_the_file(files, tmp_path, capsys, monkeypatch):
    import errno

    import minidpo.checkpoint as CK

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(CK.os, "replace", read_only)
    code, _, err = run(["tokenizer", "--corpus", files / "sft.jsonl", "--vocab-size", 300, "--out", tmp_path / "tok"],
                       capsys)
    monkeypatch.undo()
    assert code == 1 and err.count("\n") == 1, err
    assert f"{tmp_path / 'tok' / 'tokenizer.json'}: Read-only file system" in err
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_closed_pipe_and_an_ascii_terminal_give_no_traceback(files):
    p = subprocess.Popen([sys.executable, "-m", "minidpo", "sample", "--model", str(files / "sft"), "--prompt", "hi",
                          "--n", "4", "--max-new-tokens", "4"],
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # like `| head` having exited already
    err = p.stderr.read()
    assert p.wait() == 141 and b"Traceback" not in err, err
    q = cli("sample", "--model", files / "sft", "--prompt", "caf\u00e9 \u2603", "--max-new-tokens", 2, "--greedy",
            env={"PYTHONIOENCODING": "ascii"})
    assert q.returncode == 0 and b"Traceback" not in q.stderr and q.stdout.startswith(b"caf\\xe9 \\u2603"), q


# ------------------------------------------------------------------ first hour


def test_help_shows_every_default_and_explains_every_flag():
    import argparse

    parser = build_parser()
    for name, sp in parser._subparsers._group_actions[0].choices.items():
        text = sp.format_help()
        for action in sp._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
            if action.default is not None and action.default is not False:
                shown = sp.formatter_class(name)._get_help_string(action)
                assert "(default" in shown, (name, action.option_strings)
        assert "(default: None)" not in text and "(default: False)" not in text, name
    assert "--adam-betas B1,B2" in parser._subparsers._group_actions[0].choices["sft"].format_help()


def test_eval_and_dpo_score_ipo_by_one_rule(files, tmp_path, capsys):
    d = files
    code, _, _ = run(["dpo", "--data", d / "prefs.jsonl", "--eval-data", d / "prefs2.jsonl", "--ref", d / "sft",
                      "--out", tmp_path / "ipo", "--loss", "ipo", "--beta", 0.5, *TRAIN], capsys)
    assert code == 0
    last = [r for r in records(tmp_path / "ipo" / "metrics.jsonl") if "eval/loss" in r][-1]
    code, out, _ = run(["eval", "--policy", tmp_path / "ipo", "--ref", d / "sft", "--data", d / "prefs2.jsonl",
                        "--loss", "ipo", "--beta", 0.5], capsys)
    m = json.loads(out)
    assert m["average_logps"] is True
    np.testing.assert_allclose(m["loss"], last["eval/loss"], rtol=1e-6)


def test_adam_betas_reach_the_optimizer(files, tmp_path, capsys):
    code, _, _ = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", tmp_path / "d",
                      "--adam-betas", "0.9,0.999", *TRAIN], capsys)
    assert code == 0
    state = json.loads((tmp_path / "d" / "checkpoint" / "trainer_state.json").read_text())
    assert state["config"]["train"]["adam_betas"] == [0.9, 0.999]
    assert (state["optimizer"]["beta1"], state["optimizer"]["beta2"]) == (0.9, 0.999)


def test_multi_line_prompts(files, tmp_path, capsys):
    from minidpo.cli import unescape_prompt

    assert unescape_prompt(r"Human: hi\n\nAssistant:") == "Human: hi\n\nAssistant:"
    assert unescape_prompt(r"a\\n b\t c\q") == "a\\n b\t c\\q"
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps("line one\nline two") + "\n" + json.dumps({"prompt": "x\ny"}) + "\n")
    code, out, _ = run(["sample", "--model", files / "sft", "--prompt", r"a\nb", "--prompts-file", f, "--jsonl",
                        "--max-new-tokens", 2], capsys)
    assert code == 0
    assert [json.loads(l)["prompt"] for l in out.splitlines()] == ["a\nb", "line one\nline two", "x\ny"]


def test_skipped_lines_are_counted_and_a_small_vocabulary_explained(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = (files / "prefs.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:5] + ["{oops"] + good[5:]) + "\n")
    with pytest.warns(UserWarning):
        code, _, err = run(["dpo", "--data", bad, "--ref", files / "sft", "--out", tmp_path / "d", "--on-error", "warn",
                            *TRAIN], capsys)
    assert code == 0 and "skipped 1 bad line(s) (--on-error warn); 60 kept" in err
    code, out, err = run(["tokenizer", "--corpus", files / "sft.jsonl", "--vocab-size", 8000, "--out", tmp_path / "t"],
                         capsys)
    assert code == 0 and "not 8000" in err and "--min-frequency" in err


def test_a_diverging_run_exits_3_and_names_the_last_good_checkpoint(files, tmp_path, capsys):
    code, out, err = run(["sft", "--data", files / "sft.jsonl", "--tokenizer", files / "tok", "--out", tmp_path / "s",
                          *MODEL, *TRAIN, "--lr", "1e30", "--warmup-steps", 0, "--save-every", 2], capsys)
    assert code == 3 and "non-finite" in err and "done:" not in out, err
    assert "(step 2), intact" in err or "No checkpoint of this run was written yet" in err


def test_a_full_disk_while_logging_names_metrics_jsonl(files, tmp_path, capsys, monkeypatch):
    import errno

    import minidpo.train as T

    out = tmp_path / "dpo"
    base = ["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", out, *TRAIN]
    assert run(base + ["--steps", 4, "--save-every", 2], capsys)[0] == 0

    def full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "_append_jsonl", full)
    code, _, err = run(base, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("minidpo: error: cannot write")
    assert f"cannot write {out / 'metrics.jsonl'} (No space left on device)" in err and "(step 4), intact" in err
