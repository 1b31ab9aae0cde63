"""The main job's figures against their recorded spread over training seeds (docs/quick_spread.json,
written by bench/quick_spread.py): the band logic on hand-made numbers (always), the recorded file's
shape (always), and (marked reproduce: only with ``python -m pytest --reproduce``) a fresh
``train_tiny.py --quick`` whose every figure must lie within the recorded spread."""

import json
import math
from pathlib import Path

import pytest

from bench import quick_spread as qs

ROOT = Path(__file__).resolve().parents[1]


def fig(mean, std, lo, hi):
    return {"n": 4, "mean": mean, "std": std, "min": lo, "max": hi, "values": []}


def test_band_is_the_min_max_widened_to_three_standard_deviations():
    assert qs.band(fig(0.5, 0.1, 0.4, 0.6)) == pytest.approx((0.2, 0.8))
    # a seed further out than 3 std keeps the band open to it
    assert qs.band(fig(0.5, 0.01, 0.4, 0.6)) == pytest.approx((0.4, 0.6))
    assert qs.band(fig(0.5, None, 0.5, 0.5)) == (0.5, 0.5)


def test_check_passes_inside_and_names_what_lies_outside():
    recorded = {"SFT reward": fig(0.06, 0.02, 0.03, 0.10), "DPO beta=0.1 reward": fig(0.33, 0.06, 0.25, 0.44)}
    rows = qs.check({"SFT reward": 0.0, "DPO beta=0.1 reward": 0.50}, recorded)
    assert [r["ok"] for r in rows] == [True, True]  # 0.0 >= 0.06 - 0.06; 0.50 <= 0.33 + 0.18
    rows = qs.check({"SFT reward": 0.0, "DPO beta=0.1 reward": 0.06}, recorded)  # DPO doing nothing
    assert [(r["figure"], r["ok"]) for r in rows] == [("SFT reward", True), ("DPO beta=0.1 reward", False)]
    assert rows[1]["lo"] == pytest.approx(0.15)
    rows = qs.check({"SFT reward": 0.05}, recorded)  # a figure missing from the re-run fails
    assert [r["ok"] for r in rows] == [True, False]
    rows = qs.check({"SFT reward": 0.05, "DPO beta=0.1 reward": 0.3, "new": 1.0}, recorded)  # so does an unknown one
    assert [r["ok"] for r in rows] == [True, True, False]


def test_the_recorded_spread_is_whole():
    doc = json.loads((ROOT / "docs" / "quick_spread.json").read_text())
    assert len(doc["train_seeds"]) >= 3 and doc["data_seed"] == 0 and doc["k"] == qs.K
    assert set(doc["figures"]) == {"SFT reward", "DPO beta=0.1 reward", "DPO beta=0.1 KL", "DPO beta=0.1 accuracy"}
    for name, f in doc["figures"].items():
        v = f["values"]
        assert len(v) == f["n"] == len(doc["train_seeds"]), name
        assert f["mean"] == pytest.approx(sum(v) / len(v)), name
        assert f["std"] == pytest.approx(math.sqrt(sum((x - f["mean"]) ** 2 for x in v) / (len(v) - 1))), name
        assert (f["min"], f["max"]) == (min(v), max(v)) and f["default"] == v[0], name
    assert doc["cpu_path"]


@pytest.mark.slow
@pytest.mark.reproduce
def test_a_fresh_quick_run_lies_within_the_recorded_spread():
    ok, rows, summary = qs.run_check(ROOT / "docs" / "quick_spread.json")
    assert ok, [r for r in rows if not r["ok"]]
    assert len(rows) == 4 and summary["preset"] == "quick"
