"""minidpo.verify and `minidpo verify`: correct losses pass, each broken loss is rejected by name.

The corpus is in tests/verify_corpus/: NumPy, PyTorch and (when installed) JAX losses written as
people write them, and the official repository's preference_loss written out in PyTorch.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minidpo.cli import main
from minidpo.verify import PROPERTIES, FrameworkUnavailable, check_loss, load_function
from tests.verify_corpus import numpy_losses

ROOT = Path(__file__).resolve().parents[1]


def _corpus(name):
    if name == "torch":
        pytest.importorskip("torch")
        from tests.verify_corpus import torch_losses as mod
    elif name == "jax":
        pytest.importorskip("jax")
        from tests.verify_corpus import jax_losses as mod
    else:
        mod = numpy_losses
    return mod


def _cases(kind):
    """(framework, index) pairs; the module is imported inside the test so a missing framework skips."""
    sizes = {"numpy": (12, 20), "torch": (12, 19), "jax": (4, 5)}  # len(CORRECT), len(BROKEN)
    return [pytest.param(fw, i, id=f"{fw}-{i}") for fw, n in sizes.items() for i in range(n[0 if kind == "correct" else 1])]


def _examples(fw):
    return 10 if fw == "jax" else 25  # JAX traces each call afresh: fewer examples, the same properties


@pytest.mark.parametrize("fw,i", _cases("correct"))
def test_correct_losses_pass(fw, i):
    mod = _corpus(fw)
    case = mod.CORRECT[i]
    report = check_loss(case.fn, framework=fw, variant=case.variant, max_examples=_examples(fw), **case.check)
    assert report.ok, report.table()
    verdicts = {r.name: r.verdict for r in report.results}
    # the core properties really ran (not skipped) on every correct loss
    for name in ("worked example", "value at the reference", "margin only (Z(x) shift)", "beta only through beta*h",
                 "agrees with minidpo", "gradient (eq. 9)", "numerics (large margins, dtypes)"):
        assert verdicts[name] == "pass", (name, report.table())


@pytest.mark.parametrize("fw,i", _cases("broken"))
def test_broken_losses_are_rejected_naming_the_property(fw, i):
    mod = _corpus(fw)
    case = mod.BROKEN[i]
    report = check_loss(case.fn, framework=fw, variant=case.variant, max_examples=_examples(fw), **case.check)
    assert not report.ok
    assert case.expect in report.failed, f"{case.id} ({case.bug}): expected {case.expect!r} to fail\n{report.table()}"
    row = report.result(case.expect)
    assert row.detail and row.counterexample, report.table()  # one line saying what broke, and where


def test_corpus_sizes():
    """At least a dozen broken losses in NumPy and in PyTorch, covering the known bugs."""
    torch_losses = _corpus("torch")
    for mod in (numpy_losses, torch_losses):
        assert len(mod.BROKEN) >= 12
        assert len({c.fn.__name__ for c in mod.BROKEN}) == len(mod.BROKEN)
        assert {c.expect for c in mod.BROKEN} <= set(PROPERTIES)
    assert len(_cases("correct")) == sum(len(_corpus(f).CORRECT) for f in ("numpy", "torch")) + 4
    assert len(_cases("broken")) == sum(len(_corpus(f).BROKEN) for f in ("numpy", "torch")) + 5
    bugs = " ".join(c.bug for c in numpy_losses.BROKEN + torch_losses.BROKEN)
    for known in ("sign flip in cDPO", "IPO", "reference receives gradient", "beta applied twice",
                  "a mean over tokens where a sum is meant", "large margins", "swapped", "beta missing",
                  "wrong sign", "rewards carry gradient", "rewards without beta", "hinge margin"):
        assert known in bugs, known


def test_the_failure_line_names_the_correct_value_and_a_shrunk_counterexample():
    report = check_loss(numpy_losses.missing_beta, framework="numpy", variant="dpo")
    row = report.result("worked example")
    assert row.verdict == "FAIL" and "correct 0.3711" in row.detail
    row = report.result("agrees with minidpo")
    assert row.verdict == "FAIL" and "correct [" in row.detail
    # hypothesis shrinks to a single pair with the simplest log-probs that still show the bug
    assert row.counterexample.count(",") == 0, row.counterexample
    assert "pi_w=[" in row.counterexample and "beta=" in row.counterexample
    # the counterexample is a real one: re-run the function on it
    cx = dict(part.split("=", 1) for part in row.counterexample.split())
    arrays = [np.array([float(cx[k].strip("[]"))]) for k in ("pi_w", "pi_l", "ref_w", "ref_l")]
    beta = float(cx["beta"])
    got = numpy_losses.missing_beta(*arrays, beta)
    want = numpy_losses.dpo(*arrays, beta)[0]
    assert not np.allclose(got, want)


def test_runs_are_deterministic():
    a = check_loss(numpy_losses.beta_twice, framework="numpy").table()
    b = check_loss(numpy_losses.beta_twice, framework="numpy").table()
    assert a == b


def test_conventions_are_detected_not_failed():
    r = check_loss(numpy_losses.dpo_mean, framework="numpy")
    assert r.ok and "mean over the batch" in r.conventions["loss returned"] and r.conventions["rewards"] == "not reported"
    assert r.result("rewards (eq. 8)").verdict == "skip"
    r = check_loss(numpy_losses.dpo_sum, framework="numpy")
    assert r.ok and "sum over the batch" in r.conventions["loss returned"]
    r = check_loss(numpy_losses.dpo, framework="numpy")
    assert r.ok and "per-pair" in r.conventions["loss returned"] and r.conventions["rewards"].startswith("reported")
    assert r.conventions["gradients"] == "central differences in float64"
    r = check_loss(numpy_losses.minidpo_dpo, framework="numpy")
    assert r.conventions["gradients"] == "hand-written (checked)"
    r = check_loss(numpy_losses.ipo_per_token, framework="numpy", variant="ipo")
    assert r.ok and r.conventions["log-probs"].startswith("per-token")
    r = check_loss(numpy_losses.ipo_summed, framework="numpy", variant="ipo")
    assert r.ok and r.conventions["log-probs"].startswith("summed")
    r = check_loss(numpy_losses.ipo, framework="numpy", variant="ipo")
    assert r.result("log-probs: summed or per-token").verdict == "skip" and "caller" in r.conventions["IPO log-probs"]
    # a required convention that is not followed fails
    r = check_loss(numpy_losses.ipo_summed, framework="numpy", variant="ipo", ipo_convention="per_token")
    assert r.failed == ["log-probs: summed or per-token"]
    r = check_loss(numpy_losses.dpo_sum, framework="numpy", reduction="mean")
    assert r.failed == ["reduction"]
    assert check_loss(numpy_losses.dpo_sum, framework="numpy", reduction="sum").ok


def test_reference_gradient_is_reported_and_optionally_required():
    pytest.importorskip("torch")
    from tests.verify_corpus import torch_losses
    from tests.verify_corpus.official_dpo import preference_loss

    r = check_loss(preference_loss, framework="torch")
    assert r.ok and r.result("reference gets no gradient").verdict == "note"
    assert "no_grad" in r.conventions["reference gradient"]
    strict = check_loss(preference_loss, framework="torch", require_detached_reference=True)
    assert strict.failed == ["reference gets no gradient"]
    r = check_loss(torch_losses.dpo, framework="torch", require_detached_reference=True)
    assert r.ok and r.result("reference gets no gradient").verdict == "pass"


def test_official_preference_loss_passes_every_variant_it_has():
    pytest.importorskip("torch")
    from tests.verify_corpus.official_dpo import preference_loss

    for variant, kw in (("dpo", {}), ("cdpo", {}), ("ipo", {"kwargs": {"ipo": True}})):
        r = check_loss(preference_loss, framework="torch", variant=variant, **kw)
        assert r.ok, r.table()
        assert r.result("rewards (eq. 8)").verdict == "pass"
    assert check_loss(preference_loss, framework="torch", variant="cdpo", label_smoothing=0.5).ok


def test_a_function_that_raises_fails_every_property_with_the_reason():
    def crash(pw, pl, rw, rl, beta):
        raise TypeError("expected a torch.Tensor")

    r = check_loss(crash, framework="numpy")
    assert not r.ok and len(r.failed) == len(r.results)
    assert all("TypeError: expected a torch.Tensor" in x.detail for x in r.results)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown variant"):
        check_loss(numpy_losses.dpo, variant="no_such_loss")
    with pytest.raises(ValueError, match="unknown framework"):
        check_loss(numpy_losses.dpo, framework="mxnet")
    with pytest.raises(ValueError, match=r"cdpo needs label_smoothing"):
        check_loss(numpy_losses.cdpo, variant="cdpo", label_smoothing=0.0)
    with pytest.raises(ValueError, match="unknown properties"):
        check_loss(numpy_losses.dpo, properties=["speed"])
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        load_function("tests.verify_corpus.numpy_losses")
    with pytest.raises(ValueError, match="no attribute"):
        load_function("tests.verify_corpus.numpy_losses:nope")
    assert load_function("tests.verify_corpus.numpy_losses:dpo") is numpy_losses.dpo
    assert load_function(str(ROOT / "tests/verify_corpus/numpy_losses.py") + ":dpo").__name__ == "dpo"


def test_a_subset_of_properties():
    r = check_loss(numpy_losses.missing_beta, properties=["value at the reference", "margin only (Z(x) shift)"])
    assert [x.name for x in r.results] == ["value at the reference", "margin only (Z(x) shift)"] and r.ok


def test_missing_framework_is_reported_not_crashed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jax", None)  # import jax now raises ImportError
    with pytest.raises(FrameworkUnavailable, match="'jax' is not installed"):
        check_loss(numpy_losses.dpo, framework="jax")
    assert main(["verify", "tests.verify_corpus.numpy_losses:dpo", "--framework", "jax"]) == 3
    assert "not checked: framework 'jax' is not installed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_passes_a_correct_loss(capsys):
    assert main(["verify", "tests.verify_corpus.numpy_losses:cdpo", "--framework", "numpy", "--variant", "cdpo",
                 "--label-smoothing", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "cDPO: label-mixture law" in out and "0 failed" in out and "FAIL" not in out


def test_cli_fails_a_broken_loss_with_a_table(capsys):
    assert main(["verify", "tests.verify_corpus.numpy_losses:naive_log_sigmoid", "--framework", "numpy"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("numerics"))
    assert "FAIL" in line and "non-finite loss" in line
    assert "counterexample:" in out


def test_cli_kwargs_and_errors(capsys):
    pytest.importorskip("torch")
    assert main(["verify", "tests.verify_corpus.official_dpo:preference_loss", "--variant", "ipo", "--arg", "ipo=true"]) == 0
    # without ipo=true the function computes DPO: a failed property, exit 1
    assert main(["verify", "tests.verify_corpus.official_dpo:preference_loss", "--variant", "ipo"]) == 1
    capsys.readouterr()
    assert main(["verify", "no_such_module:fn"]) == 1  # one line, minidpo: error: ...
    assert "minidpo: error: cannot import no_such_module:fn" in capsys.readouterr().err


def test_cli_as_a_subprocess_from_another_directory(tmp_path):
    (tmp_path / "myloss.py").write_text(
        "import numpy as np\n"
        "def loss(pw, pl, rw, rl, beta):\n"
        "    return np.logaddexp(0, -beta * ((pw - rw) - (pl - rl)))\n"
        "def broken(pw, pl, rw, rl, beta):\n"
        "    return np.logaddexp(0, -beta * beta * ((pw - rw) - (pl - rl)))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "minidpo", "verify", "myloss:loss", "--framework", "numpy"],
                        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "minidpo", "verify", "myloss:broken", "--framework", "numpy"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "beta only through beta*h" in bad.stdout


def test_readme_example_is_real_output():
    """The README's `minidpo verify` example shows exactly what the command prints today."""
    readme = (ROOT / "README.md").read_text()
    cmd = "$ minidpo verify examples/my_dpo_loss.py:cdpo_loss --framework torch --variant cdpo\n"
    assert cmd in readme
    shown = readme.split(cmd, 1)[1].split("\n```", 1)[0]
    pytest.importorskip("torch")
    fn = load_function(str(ROOT / "examples/my_dpo_loss.py") + ":cdpo_loss")
    report = check_loss(fn, framework="torch", variant="cdpo")
    assert shown == report.table()
    assert "cDPO: label-mixture law" in report.failed
    good = load_function(str(ROOT / "examples/my_dpo_loss.py") + ":dpo_loss")
    assert check_loss(good, framework="torch").ok


def test_cli_without_hypothesis_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis now raises ImportError
    assert main(["verify", "tests.verify_corpus.numpy_losses:dpo", "--framework", "numpy"]) == 1
    assert "pip install 'minidpo[verify]'" in capsys.readouterr().err


def test_a_function_that_calls_sys_exit_fails_every_property_saying_so(tmp_path, capsys):
    def exits(pw, pl, rw, rl, beta):
        sys.exit(0)

    r = check_loss(exits, framework="numpy")
    assert not r.ok and len(r.failed) == len(r.results)
    assert all("the function called sys.exit(0)" in x.detail for x in r.results)
    (tmp_path / "exits.py").write_text("import sys\ndef loss(pw, pl, rw, rl, beta):\n    sys.exit(0)\n")
    assert main(["verify", f"{tmp_path / 'exits.py'}:loss"]) == 1
    out = capsys.readouterr().out
    assert "the function called sys.exit(0)" in out and "0 passed" in out


@pytest.mark.parametrize("source, says", [
    ("def loss(pw, pl, rw, rl, beta:\n    return pw\n", "SyntaxError: "),
    ("raise RuntimeError('no GPU found')\n", "RuntimeError: no GPU found"),
])
def test_a_module_that_fails_to_import_is_one_line(tmp_path, capsys, source, says):
    (tmp_path / "bad.py").write_text(source)
    assert main(["verify", f"{tmp_path / 'bad.py'}:loss", "--framework", "numpy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"minidpo: error: cannot import {tmp_path / 'bad.py'}:loss: {says}") and err.count("\n") == 1


def test_the_framework_is_read_from_the_module_without_framework(capsys, monkeypatch):
    from minidpo.verify import detect_framework

    assert detect_framework(numpy_losses.dpo) == "numpy"
    assert main(["verify", "tests.verify_corpus.numpy_losses:dpo"]) == 0
    assert "numpy_losses:dpo  [numpy, variant dpo]" in capsys.readouterr().out
    if importlib.util.find_spec("torch") is not None:
        from tests.verify_corpus import torch_losses

        assert detect_framework(torch_losses.dpo) == "torch"
    # a NumPy loss checked as PyTorch where PyTorch is missing: the message says what to pass
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["verify", "tests.verify_corpus.numpy_losses:dpo", "--framework", "torch"]) == 3
    assert "for a loss written in NumPy pass --framework numpy" in capsys.readouterr().out


def test_invariance_rows_name_both_values_as_the_functions_own():
    r = check_loss(numpy_losses.reference_forgotten, framework="numpy")
    row = r.result("margin only (Z(x) shift)")
    assert row.verdict == "FAIL" and row.detail.startswith(
        "adding shift = (s1, s2, s3) to log pi_w, log pi_l, log ref_w and s2 + s3 - s1 to log ref_l leaves h unchanged "
        "but changed the loss: shifted [") and "unshifted (the function's own value) [" in row.detail
    assert " shift=[" in row.counterexample and "correct" not in row.detail
    row = check_loss(numpy_losses.beta_twice, framework="numpy").result("beta only through beta*h")
    assert row.verdict == "FAIL" and "scaled [" in row.detail and "unscaled (the function's own value) [" in row.detail
