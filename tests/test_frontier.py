"""examples/frontier.py: the upper frontier and the comparison read-out, its options, and (slow)
the --quick run end to end: every method a finite point, the figure written, a finished run
skipped on re-run and a removed record recomputed to the same numbers; a Ctrl-C in any stage exits
130 and the re-run equals an uninterrupted run; what was built from changed inputs is rebuilt."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "examples" / "frontier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pt(method, kl, r, se=0.01, setting="s"):
    return {"method": method, "setting": setting, "kl": kl, "kl_se": 0.0, "reward_mean": r, "reward_se": se}


def test_upper_frontier_keeps_only_undominated_points():
    fr = load_example()
    pts = [pt("X", 1.0, 0.3), pt("X", 2.0, 0.2), pt("X", 0.5, 0.1), pt("X", 3.0, 0.5), pt("X", 3.0, 0.4)]
    front = fr.upper_frontier(pts)
    assert [(p["kl"], p["reward_mean"]) for p in front] == [(0.5, 0.1), (1.0, 0.3), (3.0, 0.5)]


def test_compare_counts_and_standard_errors():
    fr = load_example()
    recs = [pt("SFT", 0.0, 0.9), pt("A", 1.0, 0.5, 0.01, "a1"), pt("A", 3.0, 0.8, 0.01, "a3"),
            pt("B", 0.5, 0.2), pt("B", 1.5, 0.45, 0.03), pt("B", 4.0, 0.9)]
    c = fr.compare(recs, "A", "B")
    # B at KL 0.5: no A point at that little KL (SFT is not counted for A)
    assert c["no_a_point_at_that_kl"] == 1
    assert c["a_higher"] == 1 and c["b_higher"] == 1
    row = c["points"][1]
    assert row["a_setting"] == "a1" and row["diff"] == pytest.approx(0.05)
    assert row["diff_se"] == pytest.approx(math.hypot(0.01, 0.03))
    assert c["a_higher_by_2se"] == 0  # 0.05 < 2 * 0.0316
    assert c["b_higher_by_2se"] == 1  # 0.9 - 0.8 = 0.1 > 2 * 0.014


def test_options_quick_folder_and_usage_errors(capsys):
    fr = load_example()
    assert fr.parse_args([]).out == str(Path("runs") / "frontier")
    assert fr.parse_args(["--quick"]).out == str(Path("runs") / "frontier-quick")  # the full run's folder stays free
    assert fr.parse_args(["--quick", "--out", "x"]).out == "x"
    for argv, says in ((["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
                       (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
                       (["--only", "DPO,PPOO"], "argument --only: unknown methods ['PPOO']"),
                       (["--overwrte"], "unrecognized arguments: --overwrte; did you mean --overwrite?")):
        with pytest.raises(SystemExit) as e:
            fr.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"frontier.py: error: {says}"), err


def test_read_out_wording():
    fr = load_example()
    one = {"a": "DPO", "b": "PPO", "b_points": 1, "a_higher": 0, "a_higher_by_2se": 0, "b_higher": 0,
           "b_higher_by_2se": 0, "no_a_point_at_that_kl": 1}
    assert fr.describe(one).startswith("PPO's 1 point vs DPO's best")
    assert fr.describe(dict(one, b_points=2)).startswith("PPO's 2 points vs")
    assert [fr.seconds(x) for x in (0.04, 0.4, 9.94, 25.2)] == ["0.0", "0.4", "9.9", "25"]


def frontier(out, *extra, interrupt_at=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("MINIDPO_TEST_INTERRUPT_AT", None)
    if interrupt_at:
        env["MINIDPO_TEST_INTERRUPT_AT"] = interrupt_at
    return subprocess.run([sys.executable, str(ROOT / "examples" / "frontier.py"), "--quick", "--no-progress", "--out",
                           str(out), *extra], env=env, capture_output=True, text=True, timeout=600)


def points(out):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "rounds", "last_iteration")}
            for r in json.loads((Path(out) / "frontier.json").read_text())["runs"]]


@pytest.mark.slow
def test_ctrl_c_in_any_stage_exits_130_and_builds_nothing_on_an_unfinished_stage(tmp_path):
    clean = tmp_path / "clean"
    assert frontier(clean).returncode == 0
    run = tmp_path / "run"
    for point, kept in (("sft:step=50", {"run.json", "tokenizer.json", "sft", "records"}),
                        ("pairs", {"run.json", "tokenizer.json", "sft", "records"}),
                        ("evaluation", {"run.json", "tokenizer.json", "sft", "records", "pairs.json",
                                        "pairs_train.jsonl", "pairs_eval.jsonl", "reward_model"})):
        p = frontier(run, interrupt_at=point)
        assert p.returncode == 130 and "Traceback" not in p.stderr, (point, p.stdout[-2000:], p.stderr[-2000:])
        assert "interrupted" in p.stdout + p.stderr
        assert {c.name for c in run.iterdir()} == kept, point  # nothing downstream of the interrupted stage
        assert not list((run / "records").iterdir()), point
    p = frontier(run)
    assert p.returncode == 0, p.stderr[-2000:]
    assert points(run) == points(clean)

    # pairs that changed since the reward model and the records were built: both are built again
    lines = (run / "pairs_train.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["chosen"], first["rejected"] = first["rejected"], first["chosen"]
    (run / "pairs_train.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    p = frontier(run)
    assert p.returncode == 0 and "training it again" in p.stdout and "done before (skipped)" not in p.stdout
    assert p.stdout.count("its record was built from other inputs: run again") == len(points(clean))

    # other options on this folder: one line naming them and --overwrite, nothing changed
    before = sorted(str(c.relative_to(run)) for c in run.rglob("*"))
    p = frontier(run, "--seed", "1")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"frontier.py: error: {run} holds a run made with other options (--seed 0 there, 1 now)")
    assert "--overwrite" in p.stderr and sorted(str(c.relative_to(run)) for c in run.rglob("*")) == before


@pytest.mark.slow
def test_quick_run_draws_every_method_and_resumes(tmp_path, capsys):
    fr = load_example()
    out = tmp_path / "run"
    summary = fr.main(["--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert printed.count(fr.SMOKE_TEST) == 2 and fr.SMOKE_TEST in (out / "frontier.md").read_text()
    assert "(0 s)" not in printed and "1 points" not in printed
    on_disk = json.loads((out / "frontier.json").read_text())
    assert on_disk["runs"] == summary["runs"]
    assert {r["method"] for r in on_disk["runs"]} == set(fr.METHODS)
    for r in on_disk["runs"]:
        for k in ("reward_mean", "reward_se", "kl", "kl_se", "wall_s"):
            assert math.isfinite(r[k]), (r["method"], k, r[k])
        assert -1.0 <= r["reward_mean"] <= 1.0 and r["reward_se"] >= 0 and r["kl_se"] >= 0
        if r["method"] == "SFT":
            assert r["kl"] == 0.0
    bon = [r for r in on_disk["runs"] if r["method"] == "Best-of-N"]
    assert [r["kl"] for r in bon] == [pytest.approx(math.log(n) - (n - 1) / n) for n in (2, 4)]
    rm = on_disk["reward_model"]
    assert 0.0 <= rm["heldout_pair_accuracy"] <= 1.0 and rm["heldout_pairs"] > 0
    png = out / "frontier.png"
    assert png.exists() and png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(on_disk["comparisons"]) >= 2

    # a re-run skips every finished run; a removed record is recomputed to the same numbers
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == len(on_disk["runs"])
    dpo = next(p for p in records if p.name.startswith("DPO_"))
    before = json.loads(dpo.read_text())
    dpo.unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in records if p != dpo}
    capsys.readouterr()
    fr.main(["--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert printed.count("done before (skipped)") == len(records) - 1
    assert {p.name: p.stat().st_mtime_ns for p in records if p != dpo} == mtimes
    after = json.loads(dpo.read_text())
    for k in ("reward_mean", "reward_se", "kl", "kl_se"):
        assert after[k] == before[k], k
