"""examples/frontier.py: the grids and label budgets as stated, the loss family read from the table,
seed aggregation on hand-computed numbers, selection on validation with evaluation reporting, the
matched budget, the figure script, the options; and (slow) the --quick run end to end, its resume,
and a Ctrl-C in any stage (a re-run equals an uninterrupted run)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example(name="frontier"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
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


# ---------------------------------------------------------------------------------------------
# the grids and the budgets, as the README states them
# ---------------------------------------------------------------------------------------------


def test_every_method_gets_the_same_kind_of_grid_of_the_stated_size():
    fr = load_example()
    g = fr.grid_table("full")
    assert g["DPO"]["knobs"] == {"beta": [0.1, 1.0], "lr": [1e-4, 3e-4]}
    assert g["DPO"]["checkpoints"] == [64, 128, 256] and g["DPO"]["unit"] == "steps"
    for m in ("PPO", "PPO-GT"):
        assert g[m]["knobs"] == {"beta_KL": [0.03, 0.3], "lr": [1e-4, 3e-4]}, m
        assert g[m]["checkpoints"] == [8, 16, 32] and g[m]["unit"] == "iterations", m
    assert g["Online DPO"]["knobs"] == {"beta": [0.1, 1.0], "lr": [1e-4, 3e-4]}
    assert g["Online DPO"]["checkpoints"] == [1, 2, 4] and g["Online DPO"]["unit"] == "rounds"
    assert g["Preferred-FT"]["knobs"] == {"lr": [3e-5, 1e-4, 3e-4, 1e-3]}
    assert g["Unlikelihood"]["knobs"] == {"alpha": [0.1, 1.0], "lr": [1e-4, 3e-4]}
    assert g["Best-of-N"]["knobs"] == {"N": [2, 3, 4, 6, 8, 12, 16]} and g["Best-of-N"]["runs_per_seed"] == 1
    points = {m: x["points_per_seed"] for m, x in g.items() if m != "SFT"}
    runs = {m: x["runs_per_seed"] for m, x in g.items() if m != "SFT"}
    assert points.pop("Best-of-N") == 7 and runs.pop("Best-of-N") == 1
    assert set(points.values()) == {12} and set(runs.values()) == {4}, points  # every trained method, every loss
    assert 12 / 7 < 2  # the stated factor: equal grid sizes within 2 (Best-of-N's 7 points against 12)
    from minidpo.losses import LOSS_TABLE

    assert {fr.loss_method(n) for n in LOSS_TABLE} - set(fr.UNPAIRED_LOSSES) <= set(g)
    assert g["ipo"]["knobs"]["beta"] == list(fr.LOSS_GRIDS["ipo"]["beta"])  # its own beta scale
    # the middle size: the main comparison, with the same grids; quick: one setting a method
    mid = fr.grid_table("middle")
    assert list(mid) == fr.MAIN and all(mid[m] == g[m] for m in mid)
    q = fr.grid_table("quick")
    assert all(x["points_per_seed"] <= 2 for x in q.values()) and set(q) == set(g)
    assert fr.SIZES["middle"]["seeds"] == fr.SIZES["full"]["seeds"] == (0, 1, 2)


def test_labels_used_by_each_method_and_the_matched_budget():
    fr = load_example()
    w, g = fr.WORLDS["default"], fr.GRIDS["default"]
    lab = lambda kind, method, knobs, length: fr.labels_used(kind, method, knobs, length, w, 1000, g)  # noqa: E731
    # the preference set: 1024 prompts x 2 samples, each scored by the ground truth
    assert lab("loss", "DPO", {}, 256) == {"gt_scores": 2048, "rm_scores": 0, "pairs": 1000, "rollouts": 0}
    assert lab("loss", "DPO", {}, 64) == lab("loss", "DPO", {}, 256)  # labelled up front
    assert lab("pft", "Preferred-FT", {}, 64)["gt_scores"] == lab("ul", "Unlikelihood", {}, 64)["gt_scores"] == 2048
    # PPO-GT: 64 rollouts an iteration scored by the ground truth; at its longest, DPO's 2048
    assert lab("ppo", "PPO-GT", {}, 8) == {"gt_scores": 512, "rm_scores": 0, "pairs": 0, "rollouts": 512}
    assert lab("ppo", "PPO-GT", {}, 32)["gt_scores"] == 2048
    # PPO: the reward model's pairs, then rollouts scored by the reward model
    assert lab("ppo", "PPO", {}, 16) == {"gt_scores": 2048, "rm_scores": 1024, "pairs": 1000, "rollouts": 1024}
    # online DPO: 256 prompts a round, 2 fresh samples each
    assert [lab("online", "Online DPO", {}, r)["gt_scores"] for r in (1, 2, 4)] == [512, 1024, 2048]
    assert lab("bon", "Best-of-N", {"N": 8}, None)["rm_scores_per_evaluated_sample"] == 8
    assert lab("reference", "SFT", {}, None)["gt_scores"] == 0


def test_the_loss_family_comes_from_the_table():
    """A row added to LOSS_TABLE joins the frontier with DPO's grid; KTO (unpaired data) joins it
    too, trained on the pairs split into unpaired examples."""
    fr = load_example()
    from minidpo.losses import LOSS_TABLE, Loss, Option, register_loss, sigmoid_loss

    row = register_loss(Loss("test_margin", sigmoid_loss, "a test row",
                             {"label_smoothing": Option(0.0, "eps", 0.0, 0.5)}))
    try:
        p = fr.plan("full")
        spec = p["methods"]["test_margin"]
        assert spec["kind"] == "loss" and len(spec["settings"]) == 4 and spec["checkpoints"] == [64, 128, 256]
        assert spec["settings"][0] == {"loss": "test_margin", "beta": 0.1, "lr": 1e-4}
        assert p["methods"]["kto"]["settings"][0] == {"loss": "kto", "beta": 0.1, "lr": 1e-4} and not p["skipped"]
        assert "test_margin" in fr.all_methods() and "test_margin" not in fr.plan("middle")["methods"]
        fr.LOSS_GRIDS["test_margin"] = {"label_smoothing": (0.0, 0.1)}  # an option swept, checked by the row
        try:
            grid = fr.loss_grid("test_margin", fr.GRIDS["default"])  # beta x the option x lr
            assert [(s["beta"], s["label_smoothing"], s["lr"]) for s in grid][:4] == [
                (0.1, 0.0, 1e-4), (0.1, 0.0, 3e-4), (0.1, 0.1, 1e-4), (0.1, 0.1, 3e-4)] and len(grid) == 8
            fr.LOSS_GRIDS["test_margin"] = {"beta": (0.3,), "label_smoothing": (0.0, 0.1)}  # the option for beta
            assert len(fr.loss_grid("test_margin", fr.GRIDS["default"])) == 4
            assert len(fr.loss_grid("test_margin", fr.GRIDS["quick"])) == 2
            fr.LOSS_GRIDS["test_margin"] = {"gamma": (1.0,)}
            with pytest.raises(ValueError, match="does not have"):
                fr.loss_grid("test_margin", fr.GRIDS["default"])
        finally:
            del fr.LOSS_GRIDS["test_margin"]
    finally:
        del LOSS_TABLE[row.name]
    assert fr.checkpoint_lengths(256, (0.25, 0.5, 1.0)) == [64, 128, 256]
    assert fr.checkpoint_lengths(2, (0.25, 0.5, 1.0)) == [1, 2]


# ---------------------------------------------------------------------------------------------
# seeds, validation selection, the matched budget
# ---------------------------------------------------------------------------------------------


def run(method, setting, seed, r, r_se, kl, kl_se, vr, vkl, gt=2048, kind="loss"):
    return {"method": method, "kind": kind, "setting": setting, "run_setting": setting, "knobs": {}, "seed": seed,
            "checkpoint": 1, "fraction": 1.0, "labels": {"gt_scores": gt}, "wall_s": 10.0 + seed,
            "reward_mean": r, "reward_se": r_se, "kl": kl, "kl_se": kl_se,
            "val_reward_mean": vr, "val_reward_se": 0.05, "val_kl": vkl, "val_kl_se": 0.1}


def test_seed_aggregation_on_hand_computed_numbers():
    fr = load_example()
    runs = [run("A", "s", 0, 0.1, 0.03, 1.0, 0.1, 0.2, 1.0), run("A", "s", 1, 0.2, 0.04, 2.0, 0.1, 0.3, 2.0),
            run("A", "s", 2, 0.6, 0.12, 3.0, 0.1, 0.4, 3.0), run("A", "t", 0, 0.5, 0.02, 1.0, 0.2, 0.5, 1.0)]
    pts = {p["setting"]: p for p in fr.aggregate(runs)}
    s = pts["s"]
    assert s["n_seeds"] == 3 and s["seeds"] == [0, 1, 2]
    assert s["reward_mean"] == pytest.approx(0.3)
    assert s["reward_seed_std"] == pytest.approx(math.sqrt(0.07))  # deviations -0.2, -0.1, 0.3
    assert s["reward_se"] == pytest.approx(math.sqrt(0.07) / math.sqrt(3))  # the seed-level standard error
    assert s["reward_sample_se"] == pytest.approx(0.13 / 3)  # sqrt(0.03^2 + 0.04^2 + 0.12^2) / 3
    assert s["kl"] == pytest.approx(2.0) and s["kl_seed_std"] == pytest.approx(1.0)
    assert s["kl_se"] == pytest.approx(1 / math.sqrt(3)) and s["kl_sample_se"] == pytest.approx(math.sqrt(0.03) / 3)
    assert s["val_reward_mean"] == pytest.approx(0.3) and s["val_kl"] == pytest.approx(2.0)
    assert s["wall_s"] == 11.0
    t = pts["t"]  # one seed: the samples' standard error is all there is
    assert t["n_seeds"] == 1 and t["reward_se"] == 0.02 and t["reward_seed_std"] == 0.0


def test_validation_selects_and_evaluation_reports():
    fr = load_example()
    # B's 2nd point is the best on evaluation prompts but dominated on validation: not selected
    runs = [run("B", "b1", 0, 0.25, 0.01, 1.1, 0.1, 0.30, 1.0), run("B", "b1", 1, 0.25, 0.01, 1.1, 0.1, 0.30, 1.0),
            run("B", "b2", 0, 0.90, 0.01, 2.1, 0.1, 0.20, 2.0), run("B", "b2", 1, 0.90, 0.01, 2.1, 0.1, 0.20, 2.0),
            run("B", "b3", 0, 0.40, 0.01, 3.2, 0.1, 0.50, 3.0), run("B", "b3", 1, 0.40, 0.01, 3.2, 0.1, 0.50, 3.0),
            # b4: best of all on validation, but run on one seed only: not eligible
            run("B", "b4", 0, 0.95, 0.01, 0.5, 0.1, 0.99, 0.1)]
    points = fr.aggregate(runs)
    sel = fr.select(points, "B")
    assert [p["setting"] for p in sel] == ["b1", "b3"]
    assert [(p["kl"], p["reward_mean"]) for p in sel] == [(pytest.approx(1.1), pytest.approx(0.25)),
                                                          (pytest.approx(3.2), pytest.approx(0.40))]
    assert fr.select(points, "nobody") == []
    # a budget cap: b3 used more ground-truth scores than allowed, so b1 alone remains
    capped = fr.aggregate([dict(r, labels={"gt_scores": 4096}) if r["setting"] == "b3" else r for r in runs])
    assert [p["setting"] for p in fr.select(capped, "B", max_gt_scores=2048)] == ["b1"]


def test_matched_budget_caps_both_methods_at_dpo_s_ground_truth_scores():
    fr = load_example()
    runs = []
    for seed in (0, 1):
        d = 0.05 * seed  # the seeds differ: seed-level standard errors of 0.025 a point
        runs += [run("DPO", "d", seed, 0.40 + d, 0.01, 2.0, 0.1, 0.40 + d, 2.0)]
        runs += [run("PPO-GT", f"it{n}", seed, r + d, 0.01, kl, 0.1, r + d, kl, gt=64 * n, kind="ppo")
                 for n, r, kl in ((8, 0.20, 0.5), (32, 0.35, 1.5), (64, 0.70, 1.6))]
    points = fr.aggregate(runs)
    assert [p["setting"] for p in fr.select(points, "PPO-GT")] == ["it8", "it32", "it64"]
    mb = fr.matched_budget(points)
    assert mb["gt_scores"] == 2048 and mb["frontiers"] == {"DPO": ["d"], "PPO-GT": ["it8", "it32"]}
    c = {(x["a"], x["b"]): x for x in mb["comparisons"]}
    assert c[("DPO", "PPO-GT")]["a_higher"] == 0 and c[("DPO", "PPO-GT")]["no_a_point_at_that_kl"] == 2
    # DPO's 0.425 against PPO-GT's 0.375 within budget: higher, by less than 2 combined standard errors (0.071)
    assert c[("PPO-GT", "DPO")]["b_higher"] == 1 and c[("PPO-GT", "DPO")]["b_higher_by_2se"] == 0
    assert c[("PPO-GT", "DPO")]["points"][0]["diff"] == pytest.approx(-0.05)
    assert c[("PPO-GT", "DPO")]["points"][0]["diff_se"] == pytest.approx(math.hypot(0.025, 0.025))
    assert fr.matched_budget([p for p in points if p["method"] == "DPO"]) is None


# ---------------------------------------------------------------------------------------------
# the figure, from the JSON alone
# ---------------------------------------------------------------------------------------------


def _summary_for_figure(fr):
    runs = [run("SFT", "pi_ref", 0, 0.02, 0.02, 0.0, 0.0, 0.02, 0.0, gt=0, kind="reference")]
    for seed in (0, 1, 2):
        runs += [run("DPO", f"d{i}", seed, 0.1 * i + 0.01 * seed, 0.02, i, 0.1, 0.1 * i, i) for i in (1, 2, 3)]
        runs += [run("PPO-GT", f"p{i}", seed, 0.12 * i, 0.02, 1.1 * i, 0.1, 0.12 * i, 1.1 * i, kind="ppo")
                 for i in (1, 2)]
        runs += [run("ipo", f"i{i}", seed, 0.09 * i, 0.02, i, 0.1, 0.09 * i, i) for i in (1, 2)]
        runs += [run("Unlikelihood", "u", seed, 0.2, 0.02, 40.0, 1.0, 0.2, 40.0, kind="ul")]
    points = fr.aggregate(runs)
    env = fr.envelopes(points)
    return {"size": "middle", "train_seeds": [0, 1, 2], "runs": runs, "points": points,
            "frontiers": {m: [p["setting"] for p in pts] for m, pts in env.items()}}


def test_the_figure_script_draws_the_json(tmp_path, capsys):
    fr, fig = load_example(), load_example("frontier_figure")
    summary = _summary_for_figure(fr)
    assert [t for t, _ in fig.panels(summary)] == ["DPO and its baselines", "the loss family (each loss tuned as DPO)"]
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(summary))
    assert fig.main([str(path), "--out", str(tmp_path / "a.png")]) == 0
    assert fig.main([str(path), "--bars", "std"]) == 0  # beside the JSON by default
    import matplotlib.image

    for name in ("a.png", "frontier.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        img = matplotlib.image.imread(png)[..., :3]
        assert (img.min(axis=2) < 0.5).mean() > 0.01  # not blank: lines, markers and text drawn
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "frontier.png").read_bytes()  # std bars differ from se
    # the KL axis: 1.12 x the largest frontier KL of the axis methods and the family, or --kl-max
    kls = [p["kl"] for p in summary["points"] for m, ss in summary["frontiers"].items()
           if p["method"] == m and p["setting"] in ss and (m in fig.AXIS_METHODS or m not in fig.STYLE)]
    assert fig.kl_axis(summary) == pytest.approx(1.12 * max(kls + [1.0])) and fig.kl_axis(summary, 3.0) == 3.0
    assert fig.main([str(path), "--out", str(tmp_path / "b.png"), "--kl-max", "0.5"]) == 0
    assert (tmp_path / "b.png").read_bytes() != (tmp_path / "a.png").read_bytes()
    capsys.readouterr()
    assert fig.main([str(path), "--kl-max", "0"]) == 2 and "kl_max must be > 0" in capsys.readouterr().err
    # a frontier.json of the old single-seed format: one line, status 1
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"runs": []}))
    capsys.readouterr()
    assert fig.main([str(old)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("frontier_figure.py: error: ") and "run examples/frontier.py" in err


def test_options_sizes_folders_and_usage_errors(capsys):
    fr = load_example()
    a = fr.parse_args([])
    assert (a.size, a.out, a.seed_list, a.quick) == ("full", str(Path("runs") / "frontier"), [0, 1, 2], False)
    assert fr.parse_args(["--size", "middle"]).out == str(Path("runs") / "frontier")  # full reuses middle's runs
    q = fr.parse_args(["--quick"])
    assert (q.size, q.out, q.quick) == ("quick", str(Path("runs") / "frontier-quick"), True)
    assert fr.parse_args(["--size", "quick"]).quick is True
    assert fr.parse_args(["--quick", "--out", "x"]).out == "x"
    assert fr.parse_args(["--seeds", "3,1"]).seed_list == [3, 1]
    assert fr.parse_args(["--only", "DPO,ipo"]).only == {"DPO", "ipo"}
    for argv, says in ((["--threads", "-1"], "argument --threads: must be >= 0, got -1"),
                       (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
                       (["--seeds", "1,1"], "argument --seeds: expected distinct integers >= 0, got '1,1'"),
                       (["--quick", "--size", "middle"], "argument --quick: not with --size middle"),
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
    assert [fr.duration(x) for x in (45, 720, 3 * 3600 + 300)] == ["45 s", "12 min", "3 h 05 min"]


# ---------------------------------------------------------------------------------------------
# end to end (slow)
# ---------------------------------------------------------------------------------------------


def frontier(out, *extra, interrupt_at=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("MINIDPO_TEST_INTERRUPT_AT", None)
    if interrupt_at:
        env["MINIDPO_TEST_INTERRUPT_AT"] = interrupt_at
    return subprocess.run([sys.executable, str(ROOT / "examples" / "frontier.py"), "--quick", "--no-progress", "--out",
                           str(out), *extra], env=env, capture_output=True, text=True, timeout=600)


TIMES = ("wall_s", "checkpoint_s")


def numbers(out):
    """frontier.json's runs and seed averages without their wall times."""
    s = json.loads((Path(out) / "frontier.json").read_text())
    return ([{k: v for k, v in r.items() if k not in TIMES} for r in s["runs"]],
            [{k: v for k, v in p.items() if k not in TIMES} for p in s["points"]], s["frontiers"])


@pytest.mark.slow
def test_ctrl_c_in_any_stage_exits_130_and_a_rerun_equals_an_uninterrupted_run(tmp_path):
    small = ("--seeds", "0,1", "--only", "DPO,PPO-GT")
    clean = tmp_path / "clean"
    assert frontier(clean, *small).returncode == 0
    run_dir = tmp_path / "run"
    for point, kept in (("sft:step=50", {"run.json", "tokenizer.json", "sft"}),
                        ("pairs", {"run.json", "tokenizer.json", "sft", "records", "seed0"}),
                        ("checkpoint:PPO-GT:seed1", {"run.json", "tokenizer.json", "sft", "records", "seed0",
                                                     "seed1"})):
        p = frontier(run_dir, *small, interrupt_at=point)
        assert p.returncode == 130 and "Traceback" not in p.stderr, (point, p.stdout[-2000:], p.stderr[-2000:])
        assert "interrupted" in p.stdout + p.stderr
        assert {c.name for c in run_dir.iterdir()} == kept, point  # nothing downstream of the interrupted stage
        assert not (run_dir / "frontier.json").exists()
    recs = sorted(str(p.relative_to(run_dir / "records")) for p in (run_dir / "records").rglob("*.json"))
    assert recs == ["SFT_pi_ref.json", "seed0/DPO_beta0.1_lr0.0003.json", "seed0/PPO-GT_beta_KL0.1_lr0.0003.json",
                    "seed1/DPO_beta0.1_lr0.0003.json"]  # the interrupted run left no record
    p = frontier(run_dir, *small)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("done before (skipped)") == 4
    assert numbers(run_dir) == numbers(clean)

    # pairs that changed since seed 0's reward model and records were built: those are built again
    pairs = run_dir / "seed0" / "pairs_train.jsonl"
    lines = pairs.read_text().splitlines()
    first = json.loads(lines[0])
    first["chosen"], first["rejected"] = first["rejected"], first["chosen"]
    pairs.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    p = frontier(run_dir, *small)
    assert p.returncode == 0 and "seed 0: the reward model was trained on other pairs" in p.stdout
    assert p.stdout.count("its record was built from other inputs: run again") == 2  # seed 0's DPO and PPO-GT
    assert p.stdout.count("done before (skipped)") == 3  # SFT and seed 1's two

    # other options on this folder: one line naming them and --overwrite, nothing changed
    before = sorted(str(c.relative_to(run_dir)) for c in run_dir.rglob("*"))
    p = frontier(run_dir, *small, "--seed", "1")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"frontier.py: error: {run_dir} holds a run made with other options (--seed 0 there, "
                               f"1 now)")
    assert "--overwrite" in p.stderr and sorted(str(c.relative_to(run_dir)) for c in run_dir.rglob("*")) == before


@pytest.mark.slow
def test_quick_run_end_to_end_and_its_resume(tmp_path, capsys):
    fr = load_example()
    out = tmp_path / "run"
    summary = fr.main(["--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert printed.count(fr.SMOKE_TEST) == 2 and fr.SMOKE_TEST in (out / "frontier.md").read_text()
    assert "ETA" in printed and "plan: " in printed
    on_disk = json.loads((out / "frontier.json").read_text())
    assert on_disk["runs"] == summary["runs"] and on_disk["train_seeds"] == [0, 1, 2]
    methods = set(fr.plan("quick")["methods"])
    assert {r["method"] for r in on_disk["runs"]} == methods >= set(fr.BASELINES)
    grid = fr.grid_table("quick")
    for m in methods:  # every setting x checkpoint on every seed (SFT once)
        n = grid[m]["points_per_seed"] * (1 if m == "SFT" else 3)
        assert sum(r["method"] == m for r in on_disk["runs"]) == n, m
    for r in on_disk["runs"]:
        for k in ("reward_mean", "reward_se", "kl", "kl_se", "val_reward_mean", "val_kl", "wall_s"):
            assert math.isfinite(r[k]), (r["method"], k, r[k])
        assert -1.0 <= r["reward_mean"] <= 1.0 and r["reward_se"] >= 0 and r["kl_se"] >= 0
        assert r["labels"]["gt_scores"] >= 0 and r["n_samples"] == 64 and r["val_n_samples"] == 32
        if r["method"] == "SFT":
            assert r["kl"] == 0.0 and r["val_kl"] == 0.0 and r["seed"] is None
    assert [r["kl"] for r in on_disk["runs"] if r["method"] == "Best-of-N" and r["seed"] == 0] == [
        pytest.approx(math.log(n) - (n - 1) / n) for n in (2, 4)]
    gt = {r["setting"]: r["labels"]["gt_scores"] for r in on_disk["runs"] if r["method"] == "PPO-GT"}
    assert gt == {"beta_KL=0.1, lr=0.0003, iterations=2": 32, "beta_KL=0.1, lr=0.0003, iterations=4": 64}
    assert on_disk["budgets"]["DPO"]["gt_scores"] == 2 * fr.WORLDS["quick"]["n_train_prompts"]
    # the frontiers are those chosen on validation from the seed averages
    points = fr.aggregate(on_disk["runs"])
    assert on_disk["points"] == json.loads(json.dumps(points))
    assert on_disk["frontiers"] == {m: [p["setting"] for p in fr.select(points, m)] for m in on_disk["frontiers"]}
    assert on_disk["matched_budget"]["gt_scores"] == on_disk["budgets"]["DPO"]["gt_scores"]
    assert len(on_disk["comparisons"]) >= 6 and set(on_disk["seeds"]) == {"0", "1", "2"}
    assert on_disk["evaluation"]["val_prompts"] == 16 and 0 <= on_disk["evaluation"]["val_prompts_also_in_eval"] <= 1
    png = out / "frontier.png"
    assert png.exists() and png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a re-run skips every finished run and gives the same numbers; a removed record is recomputed
    records = sorted((out / "records").rglob("*.json"))
    n_jobs = len(records)
    dpo = out / "records" / "seed1" / "DPO_beta0.1_lr0.0003.json"
    before = json.loads(dpo.read_text())
    dpo.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in records if p != dpo}
    fr.main(["--quick", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert printed.count("done before (skipped)") == n_jobs - 1
    assert {p: p.stat().st_mtime_ns for p in records if p != dpo} == mtimes
    after = json.loads(dpo.read_text())
    assert [{k: v for k, v in p.items() if k not in TIMES} for p in after["points"]] == [
        {k: v for k, v in p.items() if k not in TIMES} for p in before["points"]]
    assert numbers(out) == (
        [{k: v for k, v in r.items() if k not in TIMES} for r in on_disk["runs"]],
        [{k: v for k, v in p.items() if k not in TIMES} for p in on_disk["points"]], on_disk["frontiers"])
    assert np.isfinite(json.loads((out / "frontier.json").read_text())["total_wall_s"])


def test_kto_trains_on_the_pairs_split_into_desirable_and_undesirable(tmp_path, monkeypatch):
    """KTO on the frontier: its examples are the pairs' chosen completions (desirable) then their
    rejected ones, a step reads 2 x batch of them (batch_for_step over 2N), z0 is the batch's own
    clamped mismatched KL, and the reference log-probs are pi_ref's of those very examples."""
    fr = load_example()
    from minidpo.scoring import item_logps
    from minidpo.train import batch_for_step

    seen: dict = {"calls": []}
    real_pairs, real_step = fr.pair_examples, fr.kto_step

    def pair_examples(pairs):
        seen["pairs"] = list(pairs)
        return real_pairs(pairs)

    def kto_step(p, mcfg, batch, ref, desirable, z0, tc):
        seen["calls"].append((np.asarray(desirable).copy(), np.asarray(ref).copy(), z0, tc.batch_size, tc.loss_type))
        return real_step(p, mcfg, batch, ref, desirable, z0, tc)

    monkeypatch.setattr(fr, "pair_examples", pair_examples)
    monkeypatch.setattr(fr, "kto_step", kto_step)
    monkeypatch.setattr(fr, "item_logps", lambda *a, **k: seen.setdefault("ref", item_logps(*a, **k)))
    summary = fr.main(["--quick", "--out", str(tmp_path / "run"), "--only", "kto", "--seeds", "0", "--no-progress"])
    N, B = len(seen["pairs"]), fr.WORLDS["quick"]["batch"]
    assert len(seen["calls"]) == fr.GRIDS["quick"]["steps"] and not summary["skipped"]
    for step, (desirable, ref, z0, bs, loss) in enumerate(seen["calls"]):
        idx = batch_for_step(step, 2 * N, 2 * B, 0)
        assert bs == 2 * B and loss == "kto" and desirable.tolist() == (np.asarray(idx) < N).tolist()
        np.testing.assert_array_equal(ref, seen["ref"][idx])
        assert math.isfinite(z0) and z0 >= 0.0
    assert seen["ref"].shape == (2 * N,)
    kto = [r for r in summary["runs"] if r["method"] == "kto"]
    assert [r["checkpoint"] for r in kto] == [8, 16] and all(r["labels"]["pairs"] == N for r in kto)
