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


def test_seed_options_and_their_folders(capsys):
    mod = load_example()
    a = mod.parse_args(["--quick", "--seeds", "0,1,2"])
    assert a.seed_list == [0, 1, 2] and a.out == str(Path("runs") / "tiny-quick-seeds")
    assert mod.parse_args(["--seeds", "2,0"]).seed_list == [2, 0]
    # --train-seed equal to --seed is the default run (one folder, one run.json); another is its own folder
    assert mod.parse_args(["--train-seed", "0"]).out == str(Path("runs") / "tiny")
    assert mod.parse_args(["--train-seed", "0"]).train_seed is None
    b = mod.parse_args(["--quick", "--train-seed", "2"])
    assert b.out == str(Path("runs") / "tiny-quick-trainseed2") and mod.training_seed(b) == 2
    assert mod.training_seed(mod.parse_args(["--seed", "3"])) == 3
    for argv, says in ((["--seeds", "0,0"], "argument --seeds: expected distinct integers >= 0, got '0,0'"),
                       (["--seeds", "0,x"], "argument --seeds: expected integers separated by commas"),
                       (["--seeds", "0,1", "--train-seed", "1"], "argument --seeds: not with --train-seed"),
                       (["--train-seed", "-1"], "argument --train-seed: must be >= 0, got -1")):
        with pytest.raises(SystemExit) as e:
            mod.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"train_tiny.py: error: {says}"), err


def _summary(sft, sweep):
    return {"sft": {"reward_mean": sft, "reward_se": 0.02},
            "sweep": [{"beta": b, "reward_mean": r, "reward_se": 0.01, "kl": k, "kl_se": 0.1, "accuracy": a}
                      for b, r, k, a in sweep]}


def test_seed_spread_is_the_mean_sample_std_and_range_of_each_figure():
    mod = load_example()
    summaries = {0: _summary(0.1, [(0.1, 0.8, 8.0, 0.80), (0.5, 0.7, 3.0, 0.85)]),
                 1: _summary(0.2, [(0.1, 0.6, 10.0, 0.70), (0.5, 0.7, 3.0, 0.85)]),
                 2: _summary(0.6, [(0.1, 0.7, 12.0, 0.75), (0.5, 0.7, 3.0, 0.85)])}
    s = mod.seed_spread(summaries, default_seed=0)
    assert list(s) == ["SFT reward", "DPO beta=0.1 reward", "DPO beta=0.1 KL", "DPO beta=0.1 accuracy",
                       "DPO beta=0.5 reward", "DPO beta=0.5 KL", "DPO beta=0.5 accuracy"]
    sft = s["SFT reward"]  # 0.1, 0.2, 0.6: mean 0.3, deviations -0.2, -0.1, 0.3: var 0.14 / 2
    assert (sft["n"], sft["default"], sft["min"], sft["max"]) == (3, 0.1, 0.1, 0.6)
    assert sft["mean"] == pytest.approx(0.3) and sft["std"] == pytest.approx(0.07 ** 0.5)
    kl = s["DPO beta=0.1 KL"]  # 8, 10, 12: std 2
    assert kl["mean"] == pytest.approx(10.0) and kl["std"] == pytest.approx(2.0) and kl["default"] == 8.0
    assert s["DPO beta=0.5 reward"]["std"] == pytest.approx(0.0)
    assert mod.seed_spread(summaries, default_seed=7)["SFT reward"]["default"] is None
    assert mod.seed_spread({0: summaries[0]}, 0)["SFT reward"]["std"] is None  # one seed: no spread
    with pytest.raises(ValueError, match="training seed 1 has the figures"):
        mod.seed_spread({0: summaries[0], 1: _summary(0.2, [(0.1, 0.6, 10.0, 0.70)])}, 0)


@pytest.mark.slow
def test_seeds_run_each_training_seed_and_the_default_one_is_the_plain_run(tmp_path):
    plain = tmp_path / "plain"
    assert tiny(plain).returncode == 0
    seeds = tmp_path / "seeds"
    p = tiny(seeds, "--seeds", "0,1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "over 2 training seeds (0, 1; data seed 0)" in p.stdout
    # the default training seed's run is the plain run, bit for bit
    assert results(seeds / "train_seed0") == results(plain)
    # another training seed: the same prompts (data seed), other samples and another model
    pairs = {s: [json.loads(l) for l in (seeds / f"train_seed{s}" / "pairs_train.jsonl").read_text().splitlines()]
             for s in (0, 1)}
    from minidpo.tasks import sentiment

    prompts = set(sentiment.make_prompts(load_example().PRESETS["quick"]["n_train_prompts"], seed=1))
    assert {x["prompt"] for x in pairs[0]} <= prompts and {x["prompt"] for x in pairs[1]} <= prompts
    assert [x["chosen"] for x in pairs[0]] != [x["chosen"] for x in pairs[1]]
    one = json.loads((seeds / "train_seed1" / "summary.json").read_text())
    assert (one["data_seed"], one["train_seed"]) == (0, 1) and one["sft"] != results(plain)["sft"]
    top = json.loads((seeds / "summary.json").read_text())
    mod = load_example()
    subs = {s: json.loads((seeds / f"train_seed{s}" / "summary.json").read_text()) for s in (0, 1)}
    assert top["spread"] == mod.seed_spread(subs, 0)
    assert top["train_seeds"] == [0, 1] and top["cpu_path"] == subs[0]["cpu_path"]
    assert top["spread"]["SFT reward"]["default"] == results(plain)["sft"]["reward_mean"]
    assert top["ran"]["options"]["quick"] is True and top["ran"]["command"].startswith("python examples/train_tiny.py")
    # a re-run finds every seed's run complete
    p = tiny(seeds, "--seeds", "0,1")
    assert p.returncode == 0 and p.stdout.count("[dpo] already complete") == 2
