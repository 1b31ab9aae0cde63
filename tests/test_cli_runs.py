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


def test_a_model_with_another_tokenizer_is_refused_naming_both_fingerprints(files, tmp_path, capsys):
    import shutil

    from minidpo.cli import tokenizer_fingerprint
    from minidpo.tokenizer import BPETokenizer

    d = files
    assert run(["tokenizer", "--corpus", d / "sft.jsonl", "--vocab-size", 290, "--out", tmp_path / "tok290"], capsys)[0] == 0
    ours, other = (tokenizer_fingerprint(BPETokenizer.load(t)) for t in (d / "tok", tmp_path / "tok290"))
    swapped = tmp_path / "swapped"  # a finished run whose tokenizer.json was replaced by another one
    shutil.copytree(d / "sft", swapped)
    shutil.copy(tmp_path / "tok290" / "tokenizer.json", swapped / "tokenizer.json")
    replaced = (f"{swapped / 'tokenizer.json'}: this tokenizer (fingerprint {other}) is not the one {swapped} was "
                f"trained with (fingerprint {ours} in {swapped / 'checkpoint' / 'trainer_state.json'})")
    assert run(["sft", "--data", d / "sft.jsonl", "--tokenizer", tmp_path / "tok290", "--out", tmp_path / "sft290",
                *MODEL, *TRAIN], capsys)[0] == 0
    mixed = f"--policy {tmp_path / 'sft290'} and --ref {d / 'sft'} use different tokenizers (fingerprints {other} and {ours})"
    for argv, says in [
        (["sample", "--model", swapped, "--prompt", "the movie"], replaced),
        (["eval", "--policy", swapped, "--ref", d / "sft", "--data", d / "prefs.jsonl"], replaced),
        (["export", "--model", swapped, "--out", tmp_path / "hf"], replaced),
        (["dpo", "--data", d / "prefs.jsonl", "--ref", swapped, "--out", tmp_path / "dpo", *TRAIN], replaced),
        (["dpo", "--data", d / "prefs.jsonl", "--ref", d / "sft", "--policy", tmp_path / "sft290", "--out",
          tmp_path / "dpo", *TRAIN], mixed),
        (["eval", "--policy", tmp_path / "sft290", "--ref", d / "sft", "--data", d / "prefs.jsonl"], mixed),
    ]:
        code, out, err = run(argv, capsys)
        assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith(f"minidpo: error: {says}"), (argv, err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "dpo").exists()


def test_a_new_tokenizer_never_replaces_a_models_own(files, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(files / "sft", run_dir)
    before = (run_dir / "tokenizer.json").read_bytes()
    for out in (run_dir, run_dir / "tokenizer.json"):
        code, _, err = run(["tokenizer", "--corpus", files / "sft.jsonl", "--vocab-size", 290, "--out", out], capsys)
        assert code == 1 and err.count("\n") == 1 and f"{run_dir / 'tokenizer.json'} belongs to the model in {run_dir}" in err
        assert err.count("fingerprint") == 2 and "choose another --out" in err
        assert (run_dir / "tokenizer.json").read_bytes() == before
    # the same tokenizer again changes nothing and is fine
    assert run(["tokenizer", "--corpus", files / "sft.jsonl", "--vocab-size", 300, "--out", run_dir], capsys)[0] == 0
    assert run(["sample", "--model", run_dir, "--prompt", "the movie", "--max-new-tokens", 2], capsys)[0] == 0


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


def test_a_run_leaves_no_lock_file_behind(files, tmp_path, capsys, monkeypatch):
    args = ["sft", "--data", files / "sft.jsonl", "--tokenizer", files / "tok", *MODEL, *TRAIN]
    assert run(args + ["--out", tmp_path / "done"], capsys)[0] == 0  # finished
    monkeypatch.setenv("MINIDPO_TEST_INTERRUPT_AT", "sft:step=2")
    assert run(args + ["--out", tmp_path / "stopped"], capsys)[0] == 130  # interrupted
    monkeypatch.delenv("MINIDPO_TEST_INTERRUPT_AT")
    assert run(args + ["--out", tmp_path / "stopped", "--lr", "0.5"], capsys)[0] == 1  # refused: other options
    for d in ("done", "stopped"):
        assert (tmp_path / d / "checkpoint").is_dir() and not (tmp_path / d / ".lock").exists(), d
    assert run(args + ["--out", tmp_path / "stopped"], capsys)[0] == 0  # and the folder is free again


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


def _edit_state(run_dir, change):
    f = Path(run_dir) / "checkpoint" / "trainer_state.json"
    state = json.loads(f.read_text())
    change(state)
    f.write_text(json.dumps(state))


def _edit_tensors(run_dir, name, change, keep_metadata=True):
    from safetensors import safe_open

    f = Path(run_dir) / "checkpoint" / name
    with safe_open(str(f), framework="np") as g:
        metadata = g.metadata()
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata=metadata if keep_metadata else None)


WTE = "transformer.wte.weight"


@pytest.mark.parametrize("tamper, message", [
    (lambda d: _edit_state(d, lambda s: s.update(step=99)),
     "trainer_state.json: 'step' is 99, but model.safetensors was saved at step 6"),
    (lambda d: (_edit_state(d, lambda s: (s.update(step=99), s["optimizer"].update(step=99))),
                [_edit_tensors(d, n, lambda t: None, keep_metadata=False) for n in ("model.safetensors",
                                                                                    "optimizer.safetensors")]),
     "trainer_state.json: 'step' is 99, beyond the 6 steps the run planned ('train.steps')"),
    (lambda d: _edit_state(d, lambda s: (s.update(step=3), s["optimizer"].update(step=3))),
     "trainer_state.json: 'step' is 3, but model.safetensors was saved at step 6"),
    (lambda d: _edit_state(d, lambda s: s["optimizer"].update(step=5)),
     "trainer_state.json: 'optimizer.step' is 5, not the checkpoint's 'step' 6"),
    (lambda d: _edit_state(d, lambda s: s.update(optimizer=None)), "trainer_state.json: no 'optimizer' entry"),
    (lambda d: _edit_state(d, lambda s: s.pop("optimizer")), "trainer_state.json: no 'optimizer' entry"),
    (lambda d: _edit_state(d, lambda s: s["optimizer"].update(lr="0.001")),
     "trainer_state.json: 'optimizer.lr' must be a number, got '0.001'"),
    (lambda d: _edit_state(d, lambda s: s["optimizer"].update(beta1=0.5)),
     "trainer_state.json: 'optimizer.beta1' is 0.5, this run's is 0.9"),
    (lambda d: _edit_state(d, lambda s: s["optimizer"].update(momentum=0.9)),
     "trainer_state.json: unknown entry 'optimizer.momentum'"),
    (lambda d: _edit_state(d, lambda s: s["extra"].update(elapsed_s="1 min")),
     "trainer_state.json: 'extra.elapsed_s' must be a number >= 0, got '1 min'"),
    (lambda d: _edit_state(d, lambda s: s["extra"]["log_accumulator"].update(n="0")),
     "trainer_state.json: 'extra.log_accumulator' must be"),
    (lambda d: _edit_tensors(d, "optimizer.safetensors", lambda t: t.update({f"m.{WTE}": t[f"m.{WTE}"].astype(np.float64)})),
     f"optimizer.safetensors: tensor m.{WTE} is float64 (300, 16), its parameter float32 (300, 16)"),
    (lambda d: _edit_tensors(d, "optimizer.safetensors", lambda t: t[f"v.{WTE}"].__setitem__((0, 0), np.nan)),
     f"optimizer.safetensors: tensor v.{WTE} holds non-finite values"),
    (lambda d: _edit_tensors(d, "optimizer.safetensors", lambda t: t[f"v.{WTE}"].__setitem__((0, 0), -1.0)),
     f"optimizer.safetensors: tensor v.{WTE} holds negative values"),
    (lambda d: _edit_tensors(d, "optimizer.safetensors", lambda t: t.update({"m.lm_head.weight": t[f"m.{WTE}"]})),
     "optimizer.safetensors: unknown ['m.lm_head.weight']"),
    (lambda d: (_edit_tensors(d, "optimizer.safetensors", lambda t: t.pop("v.transformer.ln_f.bias")),
                _edit_state(d, lambda s: s["tensors"]["optimizer"].remove("v.transformer.ln_f.bias"))),
     "optimizer.safetensors: missing ['v.transformer.ln_f.bias']"),
])
def test_an_edited_training_state_is_refused_naming_file_and_key(files, tmp_path, capsys, tamper, message):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(files / "sft", run_dir)
    tamper(run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    code, out, err = run(["sft", "--data", files / "sft.jsonl", "--tokenizer", files / "tok", "--out", run_dir, *MODEL,
                          *TRAIN], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"minidpo: error: {run_dir / 'checkpoint'}/{message}"), err
    assert "already complete" not in out and "resuming" not in out
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing rewritten, trimmed or replaced


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


@pytest.mark.parametrize("argv, says", [
    (["dpo", "--data", "{prefs}", "--out", "{x}"], "one of the arguments --ref --model is required"),
    (["sft", "--data", "{sft_data}", "--out", "{x}"], "one of the arguments --tokenizer --model is required"),
    (["sample", "--model", "{sft}"], "give --prompt TEXT (repeatable) or --prompts-file FILE"),
    (["sample", "--model", "{sft}", "--prompt", "hi", "--device", "foo"], "unknown device 'foo'"),
    (["sample", "--model", "{sft}", "--prompt", "hi", "--device", "gpu"], "unknown device 'gpu': use 'cpu', 'cuda' "
     "or 'cuda:N'; did you mean 'cuda'?"),
    (["sft", "--data", "{sft_data}", "--tokenizer", "{tok}", "--out", "{x}", "--stepz", "3"],
     "unrecognized arguments: --stepz 3; did you mean --steps?"),
    (["smaple", "--model", "{sft}"], "invalid choice: 'smaple'"),
    (["sample", "--model", "{sft}", "--prompt", "hi", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["verify", "tests.verify_corpus.numpy_losses:dpo", "--max-examples", "0"],
     "argument --max-examples: must be >= 1, got 0"),
])
def test_usage_errors_are_one_line_with_exit_2_and_a_pointer_to_help(files, tmp_path, capsys, argv, says):
    paths = {"prefs": files / "prefs.jsonl", "sft_data": files / "sft.jsonl", "sft": files / "sft",
             "tok": files / "tok", "x": tmp_path / "x"}
    with pytest.raises(SystemExit) as e:
        main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    command = argv[0] if argv[0] != "smaple" else ""
    assert e.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert err.startswith("minidpo: error: ") and err.endswith(f"(see `minidpo{' ' + command if command else ''} "
                                                                f"--help`)\n"), err
    if argv[0] == "smaple":
        assert "did you mean 'sample'?" in err
    assert not (tmp_path / "x").exists()


def test_a_huge_vocabulary_is_a_usage_error_not_a_native_abort(files, tmp_path):
    # `tokenizers` allocates ~71 bytes per requested token up front: 10**12 aborted the process
    p = cli("tokenizer", "--corpus", files / "sft.jsonl", "--vocab-size", 10**12, "--out", tmp_path / "t")
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1, p.stderr[-2000:]
    assert b"argument --vocab-size: must be >= 257 and <= 1,048,576, got 1000000000000" in p.stderr
    from minidpo.tokenizer import BPETokenizer

    with pytest.raises(ValueError, match="<= 1,048,576"):
        BPETokenizer.train(["a b c"], vocab_size=2**20 + 1)
    assert not (tmp_path / "t").exists()


def test_a_model_too_large_for_memory_is_refused_before_allocating(files, tmp_path, capsys, monkeypatch):
    import minidpo.model as M

    args = ["sft", "--data", files / "sft.jsonl", "--tokenizer", files / "tok", "--out", tmp_path / "s", *TRAIN]
    code, out, err = run(args + ["--n-ctx", 10**9], capsys)
    # 1e9 positions x 128 channels (wpe) + the rest: 128,000,831,744 parameters, 16 bytes each
    assert code == 1 and err.count("\n") == 1 and out == "", err
    assert "a model of 128,000,831,744 parameters" in err and "n_ctx 1,000,000,000" in err and "needs 1,907.4 GiB" in err
    assert not (tmp_path / "s").exists()

    def allocation_fails(*a, **kw):  # what NumPy raises when an array does not fit
        raise MemoryError("Unable to allocate 477. GiB for an array with shape (1000000000, 128) and data type float32")

    monkeypatch.setattr(M, "init_params", allocation_fails)
    code, out, err = run(args, capsys)
    assert code == 1 and err == "minidpo: error: out of memory: Unable to allocate 477. GiB for an array with shape " \
                               "(1000000000, 128) and data type float32\n"


def test_cuda_without_cupy_is_one_line(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    code, out, err = run(["sample", "--model", files / "sft", "--prompt", "hi", "--device", "cuda"], capsys)
    assert code == 1 and err.count("\n") == 1 and out == "", err
    assert err.startswith("minidpo: error: device 'cuda' needs CuPy, which is not installed") and "pip install" in err


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


def test_json_nested_100000_deep_is_one_line(files, tmp_path, capsys):
    import shutil

    deep = "[" * 100_000 + "]" * 100_000
    good = (files / "prefs.jsonl").read_text().splitlines()
    (tmp_path / "deep.jsonl").write_text("\n".join(good[:2] + [deep] + good[2:]) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps("hi") + "\n" + deep + "\n")
    run_dir = tmp_path / "run"
    shutil.copytree(files / "sft", run_dir)
    (run_dir / "checkpoint" / "trainer_state.json").write_text(deep)
    cases = [
        (["dpo", "--data", tmp_path / "deep.jsonl", "--ref", files / "sft", "--out", tmp_path / "d", *TRAIN],
         f"{tmp_path / 'deep.jsonl'}:3: invalid JSON: nested too deeply to read"),
        (["sample", "--model", files / "sft", "--prompts-file", tmp_path / "prompts.jsonl"],
         f"{tmp_path / 'prompts.jsonl'}:2: invalid JSON: nested too deeply to read"),
        (["sample", "--model", run_dir, "--prompt", "hi"], f"{run_dir / 'checkpoint' / 'trainer_state.json'}: corrupt JSON"),
    ]
    for argv, says in cases:
        code, out, err = run(argv, capsys)
        assert code == 1 and err.count("\n") == 1 and err.startswith(f"minidpo: error: {says}") and out == "", err
    assert not (tmp_path / "d").exists()


def _disk_error(kind: str):
    """What a write raises on a full or read-only disk: an OSError from Python's own writes, a
    SafetensorError (its I/O error in the text) from safetensors' writer."""
    import errno

    from safetensors import SafetensorError

    def fail(tensors, filename, metadata=None):  # safetensors.numpy.save_file's signature
        if kind == "safetensors":  # the text safetensors gives on a full disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(getattr(errno, kind), os.strerror(getattr(errno, kind)), filename)

    return fail


@pytest.mark.parametrize("kind", ["ENOSPC", "EROFS", "safetensors"])
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(files, tmp_path, capsys, monkeypatch, kind):
    import minidpo.checkpoint as CK

    out = tmp_path / "dpo"
    base = ["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", out, *TRAIN]
    assert run(base, capsys)[0] == 0
    before = weights(out)
    monkeypatch.setattr(CK, "save_file", _disk_error(kind))
    code, _, err = run(base + ["--steps", 8], capsys)
    text = "Read-only file system" if kind == "EROFS" else "No space left on device"
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"minidpo: error: cannot write the checkpoint {out / 'checkpoint'} ({text} while writing "
                          f"model.safetensors); the last good checkpoint is {out / 'checkpoint'} (step 6), intact"), err
    after = weights(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]  # no temporary left


def test_a_full_disk_while_exporting_names_the_folder_and_keeps_what_was_there(files, tmp_path, capsys, monkeypatch):
    import minidpo.checkpoint as CK

    hf = tmp_path / "hf"
    assert run(["export", "--model", files / "sft", "--out", hf], capsys)[0] == 0
    kept = {p.name: p.read_bytes() for p in hf.iterdir()}
    monkeypatch.setattr(CK, "save_file", _disk_error("safetensors"))
    for out, then in ((tmp_path / "new", "nothing was written"), (hf, "the model directory there is intact")):
        code, stdout, err = run(["export", "--model", files / "sft", "--out", out], capsys)
        assert code == 1 and stdout == "" and err == (f"minidpo: error: cannot write {out} (No space left on device "
                                                      f"while writing model.safetensors); {then}\n"), err
    assert not (tmp_path / "new").exists() and {p.name: p.read_bytes() for p in hf.iterdir()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left


def test_a_real_full_disk_while_exporting(files, tmp_path):
    """The same on a real 40 KiB tmpfs, where mounting one is allowed (root); skipped elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        p = cli("export", "--model", files / "sft", "--out", mnt / "hf")
        assert p.returncode == 1 and p.stderr.decode() == (f"minidpo: error: cannot write {mnt / 'hf'} (No space left "
                                                           f"on device while writing model.safetensors); nothing was "
                                                           f"written\n"), p.stderr[-2000:]
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


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


def test_ctrl_c_while_the_curves_are_drawn_then_a_rerun_draws_them(files, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    out = tmp_path / "sft"
    args = ["sft", "--data", files / "sft.jsonl", "--tokenizer", files / "tok", "--out", out, *MODEL, *TRAIN]
    real_savefig = matplotlib.figure.Figure.savefig

    def interrupted(self, fname, **kw):  # half the PNG written, then a Ctrl-C
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    code, stdout, err = run(args, capsys)
    assert code == 130 and err == "minidpo: interrupted\n" and "done:" not in stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl", "tokenizer.json",
                                                     "tokenizer_config.json"]  # no half PNG, no temporary
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real_savefig)
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "already complete at step 6" in stdout and f"drew the missing {out / 'training_curves.png'}" in stdout
    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    code, stdout, _ = run(args, capsys)  # complete with its curves: nothing to do
    assert code == 0 and "drew" not in stdout and (out / "training_curves.png").read_bytes() == png


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


def test_adam_betas_and_weight_decay_reach_the_optimizer(files, tmp_path, capsys):
    # neither the CLI's defaults (0.9,0.95; 0) nor AdamW's (0.9,0.999; 0): dropping an option shows
    code, _, _ = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", tmp_path / "d",
                      "--adam-betas", "0.8,0.99", "--weight-decay", "0.05", *TRAIN], capsys)
    assert code == 0
    state = json.loads((tmp_path / "d" / "checkpoint" / "trainer_state.json").read_text())
    assert state["config"]["train"]["adam_betas"] == [0.8, 0.99] and state["config"]["train"]["weight_decay"] == 0.05
    assert (state["optimizer"]["beta1"], state["optimizer"]["beta2"], state["optimizer"]["weight_decay"]) == (0.8, 0.99, 0.05)


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


def test_several_samples_each_get_a_header_line(files, capsys):
    code, out, _ = run(["sample", "--model", files / "sft", "--prompt", "the movie", "--prompt", "so i", "--n", 3,
                        "--max-new-tokens", 3], capsys)
    lines = out.splitlines()
    headers = [l for l in lines if l.startswith("--- sample ")]
    assert code == 0 and headers == [f"--- sample {k} of 3, prompt {p} of 2 ---" for p in (1, 2) for k in (1, 2, 3)]
    for i, l in enumerate(lines):
        if l in headers:
            assert lines[i + 1].startswith("the movie" if "prompt 1" in l else "so i"), out
    code, out, _ = run(["sample", "--model", files / "sft", "--prompt", "the movie", "--max-new-tokens", 3], capsys)
    assert code == 0 and "---" not in out and out.startswith("the movie")


def test_a_sample_with_undecodable_bytes_says_what_they_are(files, capsys, monkeypatch):
    import minidpo.evaluate as E
    from minidpo.tokenizer import UNDECODABLE_NOTE

    real = E.sample_continuations

    def with_a_stray_byte(*a, **kw):  # what a model sampling the lone byte 0xC3 gives
        s = real(*a, **kw)
        s.texts[0] += "\ufffd"
        return s

    monkeypatch.setattr(E, "sample_continuations", with_a_stray_byte)
    code, out, err = run(["sample", "--model", files / "sft", "--prompt", "the movie", "--max-new-tokens", 2], capsys)
    assert code == 0 and "\ufffd" in out and err == f"note: {UNDECODABLE_NOTE}\n"
    assert "form no UTF-8 character" in UNDECODABLE_NOTE
    monkeypatch.setattr(E, "sample_continuations", real)
    code, out, err = run(["sample", "--model", files / "sft", "--prompt", "the movie", "--max-new-tokens", 2, "--greedy"],
                         capsys)
    assert code == 0 and ("\ufffd" in out) == ("note:" in err)


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


# ------------------------------------------------------------------ the loss family on the command line


def _kto_file(files, path, n=80):
    corpus = sentiment.sft_corpus(200, seed=0)
    with open(path, "w") as f:
        for i in range(n):
            p, r = corpus[i] if i % 2 == 0 else (corpus[i][0], corpus[100 + i][1])
            f.write(json.dumps({"prompt": p, "completion": r, "label": i % 2 == 0}) + "\n")
    return path


def test_kto_trains_on_unpaired_examples_through_dpo_loss_kto(files, tmp_path, capsys):
    data = _kto_file(files, tmp_path / "kto.jsonl")
    out = tmp_path / "kto"
    code, printed, _ = run(["dpo", "--data", data, "--ref", files / "sft", "--out", out, "--loss", "kto",
                            "--desirable-weight", "1.2", *TRAIN], capsys)
    assert code == 0, printed
    assert "KTO: 76 training / 4 held-out examples; beta=0.1 loss=kto" in printed
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["config"]["stage"] == "kto" and state["step"] == 6
    assert state["config"]["train"]["loss_options"] == {"desirable_weight": 1.2}
    recs = records(out / "metrics.jsonl")
    assert recs[0]["step"] == 0 and recs[0]["eval/loss"] == pytest.approx(0.5 * (1.2 + 1.0) / 2, rel=1e-5)
    assert {"loss", "kl", "rewards/desirable", "rewards/undesirable"} <= set(recs[1])
    assert (out / "training_curves.png").exists()


def test_kto_data_with_another_loss_is_a_usage_error(files, tmp_path, capsys):
    data = _kto_file(files, tmp_path / "kto.jsonl")
    code, _, err = run(["dpo", "--data", data, "--ref", files / "sft", "--out", tmp_path / "x", *TRAIN], capsys)
    assert code == 2 and err.count("\n") == 1 and "holds unpaired KTO examples" in err
    assert "--loss kto, not sigmoid" in err and not (tmp_path / "x").exists()


def test_a_loss_without_a_reference_says_so_and_records_none(files, tmp_path, capsys):
    out = tmp_path / "simpo"
    code, printed, _ = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", out,
                            "--loss", "simpo", "--gamma", "0.3", *TRAIN], capsys)
    assert code == 0 and "no reference model (the loss has none)" in printed
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["config"]["inputs"]["reference"] is None
    # the same command again finds its run complete (the recorded inputs match)
    code, printed, _ = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", out,
                            "--loss", "simpo", "--gamma", "0.3", *TRAIN], capsys)
    assert code == 0 and "already complete" in printed


@pytest.mark.parametrize("extra, says", [
    (["--ld-alpha", "1.5"], "argument --ld-alpha: must lie in [0, 1], got 1.5"),
    (["--wpo", "--loss", "aot"], "WPO's per-pair weights do not apply to the 'aot' loss"),
])
def test_ld_and_wpo_options_are_checked(files, tmp_path, capsys, extra, says):
    try:  # argparse's own check exits; one of TrainConfig's returns the usage status
        code, _, err = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", tmp_path / "x",
                            *extra, *TRAIN], capsys)
    except SystemExit as e:
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err and err.endswith("(see `minidpo dpo --help`)\n"), err
    assert not (tmp_path / "x").exists()


def test_ld_alpha_and_wpo_train_and_are_recorded(files, tmp_path, capsys):
    out = tmp_path / "ldwpo"
    code, _, _ = run(["dpo", "--data", files / "prefs.jsonl", "--ref", files / "sft", "--out", out,
                      "--ld-alpha", "0.5", "--wpo", *TRAIN], capsys)
    assert code == 0
    train = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["config"]["train"]
    assert train["ld_alpha"] == 0.5 and train["wpo"] is True


def test_eval_takes_kto_with_the_held_out_sets_own_reference_point(files, capsys):
    args = ["eval", "--policy", str(files / "sft"), "--ref", str(files / "sft"), "--data", str(files / "prefs.jsonl")]
    code, out, _ = run(args + ["--loss", "kto"], capsys)
    assert code == 0
    m = json.loads(out)
    assert m["loss"] == pytest.approx(0.5, rel=1e-6)  # policy = reference: z0 = 0, each example sigma(0)
    code, out, _ = run(args + ["--loss", "simpo"], capsys)
    assert code == 0 and json.loads(out)["loss"] > 0
