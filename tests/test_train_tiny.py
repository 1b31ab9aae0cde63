"""The main job, end to end: examples/train_tiny.py --quick on CPU; interrupted at every stage
by a real SIGINT and re-run, it gives the summary of an uninterrupted run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_tiny.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_run_improves_the_ground_truth_reward(tmp_path, capsys):
    out = tmp_path / "run"
    summary = load_example().main(["--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "held-out prompts: before (SFT = pi_ref) vs after (DPO)" in printed
    # the stages print in their order, and every held-out number says it is one
    import re

    stages = [int(k) for k in re.findall(r"^\[(\d)/5\]", printed, flags=re.M)]
    assert stages == sorted(stages) and set(stages) == {1, 2, 3, 4, 5}, stages
    evals = [l for l in printed.splitlines() if re.match(r"\[(sft|dpo) step \d+\]", l)]
    assert evals and all("] held-out " in l for l in evals), evals
    assert "[3/5] held-out: " in printed and "held-out pair accuracy" in printed and "held-out examples" in printed
    from minidpo.cli import tokenizer_fingerprint
    from minidpo.tokenizer import BPETokenizer

    from minidpo.tokenizer import UNDECODABLE_NOTE

    shown = "".join(e["sft"] + e["dpo"] for e in summary["examples"])
    assert ("\ufffd" in shown) == (UNDECODABLE_NOTE in printed)  # a U+FFFD shown is explained
    tok_id = tokenizer_fingerprint(BPETokenizer.load(out / "tokenizer.json"))
    for stage in ("sft", "dpo_beta0.1"):  # recorded, so `minidpo sample --model` checks the tokenizer beside it
        state = json.loads((out / stage / "checkpoint" / "trainer_state.json").read_text())
        assert state["config"]["inputs"]["tokenizer"] == tok_id, stage
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["dpo"]["reward_mean"] == summary["dpo"]["reward_mean"]
    for name in ["tokenizer.json", "training_curves.png", "reward_vs_kl.png", "pairs_train.jsonl", "pairs_eval.jsonl",
                 "sft/checkpoint/model.safetensors", "sft/metrics.jsonl", "dpo_beta0.1/checkpoint/model.safetensors",
                 "dpo_beta0.1/metrics.jsonl", "run.json", "pairs.json", "sft/training_curves.png"]:
        assert (out / name).exists(), name
    sft, dpo = summary["sft"], summary["dpo"]
    # DPO moves the policy toward the preferred (positive) behaviour: the held-out mean
    # ground-truth reward rises by more than three combined standard errors
    gap = dpo["reward_mean"] - sft["reward_mean"]
    assert gap > 3 * (sft["reward_se"] ** 2 + dpo["reward_se"] ** 2) ** 0.5, (sft, dpo)
    # at a finite, positive KL cost, with an implicit reward that ranks held-out pairs
    assert 0 < dpo["kl"] < float("inf")
    assert dpo["accuracy"] > 0.5
    assert len(summary["examples"]) == 3
    from minidpo import runtime

    assert summary["cpu_path"] == runtime.describe_cpu_path() and f"  cpu path: {summary['cpu_path']}" in printed


SMALL = ["--quick", "--sft-steps", "60", "--dpo-steps", "30", "--no-progress"]


def tiny(out, *extra, interrupt_at=None):
    """Run train_tiny.py in a subprocess; with interrupt_at, it sends itself a real SIGINT at that
    point (minidpo.train.interrupt_hook)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("MINIDPO_TEST_INTERRUPT_AT", None)
    if interrupt_at:
        env["MINIDPO_TEST_INTERRUPT_AT"] = interrupt_at
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *SMALL, *extra], env=env,
                          capture_output=True, text=True, timeout=600)


def results(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    s.pop("timings_s")
    for r in [s["dpo"], *s["sweep"]]:
        r.pop("dir")
    return s


def records(path: Path) -> list:
    return [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in path.read_text().splitlines()]


@pytest.mark.slow
def test_interrupt_at_every_stage_then_rerun_equals_an_uninterrupted_run(tmp_path):
    clean = tmp_path / "clean"
    p = tiny(clean)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "run"
    # Ctrl-C in SFT, in pair sampling, in DPO, in the final evaluation: each exits 130, writes no
    # summary, and the next run picks up where it stopped
    for point, says in [("sft:step=25", "[sft] interrupted: checkpoint saved at step 25 of 60"),
                        ("pairs", "interrupted"),
                        ("dpo:step=12", "[dpo] interrupted: checkpoint saved at step 12 of 30"),
                        ("evaluation-dpo", "interrupted")]:
        p = tiny(run, interrupt_at=point)
        assert p.returncode == 130, (point, p.stdout[-2000:], p.stderr[-2000:])
        assert says in p.stdout + p.stderr, point
        assert "held-out prompts: before" not in p.stdout and not (run / "summary.json").exists(), point
    p = tiny(run)
    assert p.returncode == 0, p.stderr
    assert "[sft] already complete at step 60" in p.stdout and "[dpo] already complete at step 30" in p.stdout
    assert results(run) == results(clean)
    # the metrics logs equal the uninterrupted run's record for record (wall-clock time aside)
    for stage in ("sft", "dpo_beta0.1"):
        assert records(run / stage / "metrics.jsonl") == records(clean / stage / "metrics.jsonl"), stage

    # pairs built from another pi_ref are never reused: they are rebuilt (and equal the clean ones)
    meta = json.loads((run / "pairs.json").read_text())
    (run / "pairs.json").write_text(json.dumps(dict(meta, reference="0" * 16)))
    p = tiny(run)
    assert p.returncode == 0 and "pairs were built from another pi_ref" in p.stdout
    assert results(run) == results(clean)

    # another option is another run: refused before anything is written, naming the option
    before = sorted(x.name for x in run.iterdir())
    p = tiny(run, "--seed", "1")
    assert p.returncode == 1 and "--seed 0 there, 1 now" in p.stderr and "--overwrite" in p.stderr
    assert "Traceback" not in p.stderr and sorted(x.name for x in run.iterdir()) == before
    # more DPO steps extend the DPO run (constant schedule): it resumes at its last step
    p = tiny(run, "--dpo-steps", "40")
    assert p.returncode == 0 and "[dpo] resuming at step 30 of 40" in p.stdout, p.stdout[-2000:]


def test_default_out_follows_the_options():
    mod = load_example()
    assert mod.parse_args([]).out == str(Path("runs") / "tiny")
    assert mod.parse_args(["--quick"]).out == str(Path("runs") / "tiny-quick")
    assert mod.parse_args(["--quick", "--seed", "1", "--loss", "ipo"]).out == str(Path("runs") / "tiny-quick-seed1-lossipo")
    assert mod.parse_args(["--out", "x", "--quick"]).out == "x"


@pytest.mark.parametrize("argv, says", [
    (["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--device", "gpu"], "argument --device: unknown device 'gpu'"),
    (["--sft-step", "5"], "unrecognized arguments: --sft-step 5; did you mean --sft-steps?"),
])
def test_bad_options_are_one_line_usage_errors(capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        load_example().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"train_tiny.py: error: {says}"), err


def test_plots_tell_sft_from_dpo_and_skip_the_step_0_accuracy(tmp_path):
    from minidpo.plots import _DPO_PANELS, _SFT_PANELS, _series, plot_training_curves

    dpo = [{"step": 0, "eval/loss": 0.69, "eval/rewards/accuracies": 0.0, "eval/rewards/margins": 0.0},
           {"step": 5, "loss": 0.6, "rewards/accuracies": 0.7, "rewards/margins": 0.1},
           {"step": 5, "eval/loss": 0.65, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.05}]
    # every margin is exactly 0 at step 0, so the accuracy there (0.0) is no measurement
    assert _series(dpo, "rewards/accuracies", held_out=True) == ([5], [0.6])
    assert _series(dpo, "rewards/margins", held_out=True) == ([0, 5], [0.0, 0.05])
    assert "DPO" in _DPO_PANELS[0][1] and "DPO" not in " ".join(t for _, t in _SFT_PANELS)
    sft = [{"step": 10, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0}, {"step": 10, "eval/nll": 3.1, "eval/perplexity": 22.0}]
    for recs in (sft, dpo, {"beta=0.1": dpo, "beta=0.5": dpo}):
        out = plot_training_curves(recs, tmp_path / "c.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
