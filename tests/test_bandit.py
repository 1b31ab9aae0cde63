"""examples/bandit.py runs, prints honest gaps, and its exact-preference mode reaches eq. (4)."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from minidpo.theory import optimal_policy

BANDIT = Path(__file__).resolve().parents[1] / "examples" / "bandit.py"


@pytest.fixture(scope="module")
def bandit():
    spec = importlib.util.spec_from_file_location("bandit_example", BANDIT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_modes_print_their_gaps(bandit, capsys):
    res = bandit.main(["--seed", "1", "--steps", "300", "--pairs", "4000", "--no-plot"])
    text = capsys.readouterr().out
    # the printed gaps are the returned ones, for both modes
    printed = [float(v) for v in re.findall(r"max \|log pi - log pi_r\|\s+= (\S+)", text)]
    assert printed == pytest.approx([res["sampled"]["policy_gap"], res["exact"]["policy_gap"]], rel=1e-3)
    assert len(re.findall(r"max \|r_hat - r\| after removing per-prompt shift = \S+", text)) == 2
    assert "summary (max gaps)" in text
    # each mode's training line comes under its own header, never above it
    lines = text.splitlines()
    for header, follows in (("== sampled pairs (N=4000) ==", " loss 0.6931 -> "),
                            ("== exact expected preferences ==", " expected loss 0.693147 -> ")):
        assert lines[lines.index(header) + 1].startswith(follows), text
    assert [l for l in lines if l.startswith("==")] == ["== sampled pairs (N=4000) ==", "== exact expected preferences =="]
    assert all(l.startswith(("bandit:", "==", " ", "summary")) or not l for l in lines), text
    # exact expected preferences: the optimum, to rounding level
    assert res["exact"]["policy_gap"] < 1e-6
    assert res["exact"]["reward_gap"] < 1e-6
    assert res["exact"]["objective"] == pytest.approx(res["exact"]["objective_opt"], abs=1e-10)
    # finitely many sampled pairs: close, but honestly not exact
    assert 1e-4 < res["sampled"]["policy_gap"] < 2.0
    assert 1e-4 < res["sampled"]["reward_gap"] < 1.0
    assert res["sampled"]["objective"] <= res["sampled"]["objective_opt"] + 1e-12  # eq. (4) maximises eq. (3)


def test_more_pairs_get_closer(bandit, capsys):
    few = bandit.main(["--seed", "2", "--steps", "300", "--pairs", "300", "--mode", "sampled", "--no-plot"])
    many = bandit.main(["--seed", "2", "--steps", "300", "--pairs", "30000", "--mode", "sampled", "--no-plot"])
    capsys.readouterr()
    assert many["sampled"]["reward_gap"] < few["sampled"]["reward_gap"]


def test_returned_policy_is_checked_against_eq4_independently(bandit, capsys):
    """Recompute the world from the seed and compare the exact-mode policy with eq. (4) here."""
    beta = 0.3
    res = bandit.main(["--seed", "3", "--beta", str(beta), "--steps", "400", "--mode", "exact", "--no-plot"])
    capsys.readouterr()
    reward, log_pi_ref = bandit.make_world(np.random.default_rng(3), 3, 5, 1.0)
    np.testing.assert_allclose(res["exact"]["log_pi"], optimal_policy(reward, log_pi_ref, beta), atol=1e-6)


def test_plot_is_written(bandit, tmp_path, capsys):
    out = tmp_path / "bandit.png"
    bandit.main(["--steps", "50", "--pairs", "500", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_bad_options_are_rejected(bandit, capsys):
    for argv in (["--beta", "0"], ["--responses", "1"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bandit.main(argv + ["--no-plot"])
    assert "must be > 0" in capsys.readouterr().err


def test_the_plot_goes_under_runs_not_into_the_repository(bandit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bandit.main(["--steps", "20", "--pairs", "200", "--mode", "exact"])
    assert (tmp_path / "runs" / "bandit.png").is_file() and not (tmp_path / "bandit.png").exists()
