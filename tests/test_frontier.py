"""examples/frontier.py: the upper frontier and the comparison read-out, and (slow) the --quick run
end to end: every method a finite point, the figure written, a finished run skipped on re-run and
a removed record recomputed to the same numbers."""

import importlib.util
import json
import math
import os
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


@pytest.mark.slow
def test_quick_run_draws_every_method_and_resumes(tmp_path, capsys):
    fr = load_example()
    out = tmp_path / "run"
    summary = fr.main(["--quick", "--out", str(out), "--no-progress"])
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
