"""What each loss of the family preserves: the paper's identities (minidpo.verify.IDENTITIES) on
every loss of the table, one test per cell of the matrix loss x identity.

A cell that holds is checked on hypothesis-drawn inputs and must find no counterexample; a cell that
does not hold must FAIL, with the broken equation's two sides as numbers and the shrunk
counterexample, so the suite is known to tell the two apart. The expected matrix is
minidpo.verify.IDENTITY_TABLE (the README's table); `minidpo verify` reads the same facts off
minidpo's own loss, and then every variant's own implementation (tests/verify_corpus/family_losses.py,
written from the papers) passes, and each broken one is rejected naming the property it breaks.
"""

import pytest

from minidpo.cli import main
from minidpo.losses import LOSS_TABLE
from minidpo.verify import IDENTITIES, IDENTITY_TABLE, check_identity, check_loss, minidpo_function, variants
from tests.verify_corpus import family_losses

CELLS = [(name, identity) for name in LOSS_TABLE for identity in IDENTITIES]
F_DPO = ("forward_kl", "js_divergence", "alpha_divergence")


def _variant(name):
    return "dpo" if name == "sigmoid" else name


def test_the_matrix_covers_every_loss_and_identity():
    assert set(IDENTITY_TABLE) == set(LOSS_TABLE)
    assert all(cells <= set(IDENTITIES) for cells in IDENTITY_TABLE.values())
    # the paper's loss has all five; a loss of each other kind loses some
    assert IDENTITY_TABLE["sigmoid"] == set(IDENTITIES)
    assert "value at the reference" not in IDENTITY_TABLE["simpo"] and "value at the reference" not in IDENTITY_TABLE["orpo"]
    assert "per-prompt shift (eq. 5-6)" not in IDENTITY_TABLE["kto"]
    assert "swap = flipped log-ratios" not in IDENTITY_TABLE["kto"]


@pytest.mark.parametrize("name,identity", CELLS, ids=[f"{n}-{i.split(' (')[0].replace(' ', '_')}" for n, i in CELLS])
def test_identity_cell(name, identity):
    """One cell: minidpo's own loss `name` (its defaults; label smoothing 0.1 where it has it; KTO's
    z0 = 0.25) has the identity, or provably does not."""
    result = check_identity(minidpo_function(name), identity, "numpy", _variant(name), max_examples=30)
    if identity in IDENTITY_TABLE[name]:
        assert result.verdict == "pass", f"{name} should have {identity!r}: {result.detail} at {result.counterexample}"
    else:
        assert result.verdict == "FAIL", f"{name} should NOT have {identity!r}, yet no counterexample was found"
        # the failure shows the property failing with numbers: both sides, and where
        assert result.detail.count("[") >= 2, result.detail  # both values, named
        assert "pi_w=[" in result.counterexample and "beta=" in result.counterexample


@pytest.mark.parametrize("divergence", F_DPO)
@pytest.mark.parametrize("identity", IDENTITIES)
def test_f_dpo_keeps_only_the_value_at_the_reference(divergence, identity):
    """f-DPO's Z(x) cancels in the scores f'(pi/pi_ref) (Wang et al. 2023), not in the log-ratios:
    of the identities stated on log-ratios only the value at the reference (f'(1) - f'(1) = 0) stays."""
    kw = {"f_divergence": divergence}
    result = check_identity(minidpo_function("sigmoid"), identity, "numpy", "dpo", kwargs=kw, max_examples=30)
    assert result.verdict == ("pass" if identity == "value at the reference" else "FAIL"), result.detail


@pytest.mark.parametrize("variant", variants())
def test_minidpo_passes_verify_as_every_variant(variant):
    """`minidpo verify` on minidpo's own loss, hand-written gradients included: every property that
    applies passes; an identity the loss lacks is reported as not one of its properties."""
    name = "sigmoid" if variant in ("dpo", "cdpo") else variant
    report = check_loss(minidpo_function(name), "numpy", variant, max_examples=10)
    assert report.ok, report.table()
    verdicts = {r.name: r.verdict for r in report.results}
    assert report.conventions["gradients"] == "hand-written (checked)"
    for identity in IDENTITIES:
        want = "pass" if identity in IDENTITY_TABLE[name] else "skip"
        assert verdicts[identity] == want, (identity, report.table())
    for core in ("worked example", "agrees with minidpo", "rewards (eq. 8)", "gradient (eq. 9)",
                 "numerics (large margins, dtypes)"):
        assert verdicts[core] == "pass", (core, report.table())


@pytest.mark.parametrize("case", family_losses.CORRECT, ids=lambda c: f"{c.variant}-{c.id}")
def test_independent_implementations_pass(case):
    report = check_loss(case.fn, "numpy", case.variant, max_examples=15, **case.check)
    assert report.ok, report.table()


@pytest.mark.parametrize("case", family_losses.BROKEN, ids=lambda c: c.id)
def test_broken_implementations_are_rejected_naming_the_property(case):
    report = check_loss(case.fn, "numpy", case.variant, max_examples=15, **case.check)
    assert case.expect in report.failed, f"{case.id} ({case.bug}): expected {case.expect!r} to fail\n{report.table()}"
    row = report.result(case.expect)
    assert row.detail and row.counterexample


def test_every_loss_of_the_table_has_an_independent_implementation():
    covered = {c.variant for c in family_losses.CORRECT}
    assert set(LOSS_TABLE) - {"sigmoid", "robust", "ipo", "hinge"} <= covered  # those four: verify_corpus/numpy_losses


@pytest.mark.parametrize("variant", list(dict.fromkeys(c.variant for c in family_losses.CORRECT)))
def test_the_command_line_verifies_every_name(variant, capsys):
    """`minidpo verify MODULE:FUNCTION --variant NAME` for the family (exit status 0 on a pass)."""
    case = next(c for c in family_losses.CORRECT if c.variant == variant)
    argv = ["verify", f"tests.verify_corpus.family_losses:{case.fn.__name__}", "--framework", "numpy",
            "--variant", variant, "--max-examples", "3"]
    for k, v in case.check.get("kwargs", {}).items():
        argv += ["--arg", f"{k}={v}"]
    assert main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"variant {variant}" in out and "0 failed" in out


def test_the_command_line_reports_a_broken_family_loss(capsys):
    argv = ["verify", "tests.verify_corpus.family_losses:sppo_beta_inside", "--framework", "numpy",
            "--variant", "sppo_hard", "--max-examples", "10"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "beta only through beta*h" in out and "FAIL" in out
