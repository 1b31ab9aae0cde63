"""The loss table (losses.LOSS_TABLE): one row per loss is all the trainer, the command line,
held-out evaluation and `minidpo verify` read, so a loss added as one function plus one row
trains, evaluates and verifies."""

import math

import numpy as np
import pytest

from minidpo import cli
from minidpo.losses import LOSS_TABLE, Loss, Option, dpo_loss, log_sigmoid, register_loss, sigmoid
from minidpo.model import GPTConfig, init_params
from minidpo.scoring import batched_sequence_logps
from minidpo.train import TrainConfig, batcher_for, dpo_step, evaluate_preferences, train_dpo
from minidpo.data import TokenizedPair, collate_preferences
from minidpo.packing import Batcher
from minidpo.verify import check_loss, variants

CFG = GPTConfig(vocab_size=31, n_ctx=24, n_layer=2, n_head=2, n_embd=16)


def tempered_loss(h, beta: float, temperature: float = 1.0):
    """A loss that is not in the table: loss = -t log sigma(z / t), dloss/dz = -sigma(-z / t) (z = beta h);
    t = 1 is eq. 7."""
    z = beta * h
    return -temperature * log_sigmoid(z / temperature), -sigmoid(-z / temperature)


@pytest.fixture
def tempered():
    row = register_loss(Loss("tempered", tempered_loss, "-t log sigma(beta h / t), eq. 7 at a temperature t",
                             {"temperature": Option(1.0, "the loss's temperature t", 0.0, math.inf, lo_open=True,
                                                    hi_open=True)}))
    yield row
    del LOSS_TABLE[row.name]


def _pairs(n, seed):
    rng = np.random.default_rng(seed)
    ids = lambda k: [int(t) for t in rng.integers(1, CFG.vocab_size, k)]  # noqa: E731
    return [TokenizedPair(ids(int(rng.integers(1, 5))), ids(int(rng.integers(1, 6))), ids(int(rng.integers(1, 6))))
            for _ in range(n)]


def test_every_built_in_loss_is_one_row_with_its_facts():
    assert list(LOSS_TABLE)[:4] == ["sigmoid", "robust", "ipo", "hinge"]
    assert LOSS_TABLE["ipo"].average_logps is True and LOSS_TABLE["sigmoid"].average_logps is False
    f_dpo = {"f_divergence", "f_alpha"}  # f-DPO, valid for every loss of the margin h
    assert set(LOSS_TABLE["sigmoid"].options) == {"label_smoothing"} | f_dpo == set(LOSS_TABLE["robust"].options)
    assert all(row.help and row.source for row in LOSS_TABLE.values())
    assert all(LOSS_TABLE[n].reference for n in ("sigmoid", "robust", "ipo", "hinge"))
    # the row's option ranges are what TrainConfig and dpo_loss enforce
    with pytest.raises(ValueError, match=r"label_smoothing of the 'robust' loss must lie in \[0, 0.5\)"):
        TrainConfig(loss_type="robust", loss_options={"label_smoothing": 0.5})
    TrainConfig(loss_type="sigmoid", loss_options={"label_smoothing": 0.5})
    with pytest.raises(ValueError, match="the 'hinge' loss has no option 'label_smoothing'"):
        TrainConfig(loss_type="hinge", loss_options={"label_smoothing": 0.1})
    with pytest.raises(ValueError, match="label_smoothing applies to 'sigmoid', 'robust', .* only, not 'ipo'"):
        dpo_loss(np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1), loss_type="ipo", label_smoothing=0.1)


def test_the_log_prob_rule_comes_from_the_row_unless_overridden():
    assert TrainConfig(loss_type="ipo").logps_averaged is True
    assert TrainConfig(loss_type="ipo", average_logps=False).logps_averaged is False
    assert TrainConfig(loss_type="sigmoid").logps_averaged is False
    assert TrainConfig(loss_type="sigmoid", average_logps=True).logps_averaged is True


def test_checkpoints_with_a_top_level_label_smoothing_still_read():
    tc = TrainConfig.from_dict({"loss_type": "robust", "label_smoothing": 0.2, "steps": 3})
    assert tc.loss_options == {"label_smoothing": 0.2}
    assert TrainConfig.from_dict({"label_smoothing": 0.0}).loss_options == {}


def test_dpo_help_lists_every_loss_on_its_own_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--help"])
    out = capsys.readouterr().out
    for name, row in LOSS_TABLE.items():
        assert any(line.split()[:1] == [name] and row.help in line for line in out.splitlines()), name


def test_ipo_eval_loss_at_the_reference_is_one_over_four_beta_squared(tmp_path):
    """Held-out evaluation scores policy and reference by the same rule (IPO: per-token means), so
    at step 0 (policy = reference, h = 0 for every pair) the IPO loss is (0 - 1/(2 beta))^2."""
    params = init_params(CFG, seed=3, dtype=np.float64)
    pairs, held = _pairs(12, 1), _pairs(7, 2)
    for avg in (None, False):
        tc = TrainConfig(steps=1, batch_size=4, lr=1e-3, loss_type="ipo", beta=0.3, average_logps=avg, log_every=1,
                         eval_every=1, save_every=10, progress=False, eval_batch_size=3)
        res = train_dpo({k: v.copy() for k, v in params.items()}, params, CFG, pairs, 0, tc, tmp_path / f"ipo{avg}",
                        eval_pairs=held)
        at0 = [r for r in res.history if r["step"] == 0 and "eval/loss" in r][0]
        assert at0["eval/loss"] == pytest.approx(1 / (4 * 0.3 ** 2), rel=1e-12)
        assert at0["eval/rewards/margins"] == 0.0 and at0["eval/rewards/accuracies"] == 0.0


def test_eval_loss_is_the_training_loss_under_rpo_alpha():
    """evaluate_preferences runs the training step's loss part (the NLL term of --rpo-alpha included)."""
    params = init_params(CFG, seed=4, dtype=np.float64)
    pairs = _pairs(6, 3)
    for tc in (TrainConfig(rpo_alpha=0.7, beta=0.2), TrainConfig(rpo_alpha=0.7, beta=0.2, average_logps=True),
               TrainConfig(loss_type="robust", loss_options={"label_smoothing": 0.2})):
        batcher = batcher_for(tc, 0, "cpu")
        ref_c, ref_r = batched_sequence_logps(params, CFG, pairs, batcher, 6)
        rng = np.random.default_rng(0)
        ref_c, ref_r = ref_c + rng.normal(0, 0.5, 6), ref_r + rng.normal(0, 0.5, 6)
        loss, _, _ = dpo_step(params, CFG, collate_preferences(pairs, 0, average=tc.logps_averaged), ref_c, ref_r, tc)
        m = evaluate_preferences(params, CFG, pairs, ref_c, ref_r, batcher, tc)
        assert m["eval/loss"] == pytest.approx(float(loss), rel=1e-10)


def test_a_loss_added_as_one_row_trains_evaluates_and_verifies(tempered, tmp_path, capsys):
    assert "tempered" in variants()
    params = init_params(CFG, seed=5, dtype=np.float64)
    pairs, held = _pairs(16, 5), _pairs(6, 6)
    tc = TrainConfig(steps=4, batch_size=4, lr=1e-2, loss_type="tempered", loss_options={"temperature": 2.0},
                     beta=0.5, log_every=1, eval_every=4, save_every=10, progress=False)
    policy = {k: v.copy() for k, v in params.items()}
    res = train_dpo(policy, params, CFG, pairs, 0, tc, tmp_path / "exp", eval_pairs=held)
    first = [r for r in res.history if r["step"] == 1 and "loss" in r][0]
    assert first["loss"] == pytest.approx(2 * math.log(2), rel=1e-12)  # h = 0 at step 0: t ln 2
    evals = [r["eval/loss"] for r in res.history if "eval/loss" in r]
    assert evals[0] == pytest.approx(2 * math.log(2), rel=1e-12) and evals[-1] < evals[0]  # it trains
    # held-out evaluation computes the row's loss at the trained policy
    ref_c, ref_r = batched_sequence_logps(params, CFG, held, Batcher(0), 6)
    pol_c, pol_r = batched_sequence_logps(policy, CFG, held, Batcher(0), 6)
    want = np.mean(tempered_loss((pol_c - ref_c) - (pol_r - ref_r), 0.5, 2.0)[0])
    assert evals[-1] == pytest.approx(want, rel=1e-9)

    def mine(pw, pl, rw, rl, beta, temperature=2.0):  # someone's implementation of the same loss
        z = beta * ((pw - rw) - (pl - rl))
        return np.mean(temperature * np.logaddexp(0.0, -z / temperature))

    def broken(pw, pl, rw, rl, beta, temperature=2.0):
        z = beta * ((pw - rw) - (pl - rl))
        return np.mean(np.logaddexp(0.0, -z / temperature))  # the factor t forgotten

    ok = check_loss(mine, framework="numpy", variant="tempered", kwargs={"temperature": 2.0}, max_examples=10)
    assert ok.ok, ok.table()
    bad = check_loss(broken, framework="numpy", variant="tempered", kwargs={"temperature": 2.0}, max_examples=10)
    assert "agrees with minidpo" in bad.failed and "worked example" in bad.failed
    # ... and the command line knows it: its name in --loss, its option a flag
    code = cli.main(["dpo", "--data", str(tmp_path / "none.jsonl"), "--ref", str(tmp_path), "--out",
                     str(tmp_path / "o"), "--loss", "sigmoid", "--temperature", "3"])
    assert code == 2 and "--temperature applies to --loss tempered, not sigmoid" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# numbers that hold across dtypes: the reference cache keeps the model's dtype, and step 0 sees
# the cached reference of its own batch


@pytest.mark.parametrize("layout", [dict(), dict(share_prompt=False, pack=False)], ids=["shared_packed", "padded"])
def test_step_0_reports_zero_margins_because_the_cache_is_the_same_forward(tmp_path, layout):
    """policy = reference at step 0: the cached reference log-probs were computed on the very
    batches the first epoch trains on, so the step's log-probs equal them bit for bit (float32,
    the training dtype) and the first record reports accuracy 0 and margins 0, not round-off's
    coin flips."""
    params = init_params(CFG, seed=7)  # float32
    pairs = _pairs(20, 8)
    tc = TrainConfig(steps=1, batch_size=8, lr=1e-3, log_every=1, save_every=10, progress=False, **layout)
    res = train_dpo({k: v.copy() for k, v in params.items()}, params, CFG, pairs, 0, tc, tmp_path / "run")
    (rec,) = [r for r in res.history if "rewards/accuracies" in r]
    assert rec["rewards/accuracies"] == 0.0 and rec["rewards/margins"] == 0.0
    assert rec["rewards/chosen"] == 0.0 and rec["loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_a_float64_run_with_the_cache_equals_one_that_recomputes_the_reference(tmp_path):
    """The cache keeps the model's dtype: a float64 run with cached reference log-probs trains to
    what a float64 run that recomputes them every step trains to, to float64 round-off (a float32
    cache would leave ~1e-7)."""
    params = init_params(CFG, seed=8, dtype=np.float64)
    pairs = _pairs(16, 9)
    out = {}
    for cache in (True, False):
        tc = TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=1, save_every=10, progress=False,
                         cache_reference=cache)
        res = train_dpo({k: v.copy() for k, v in params.items()}, params, CFG, pairs, 0, tc, tmp_path / str(cache))
        out[cache] = res
    for a, b in zip(out[True].history, out[False].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-13)
    for k in params:
        np.testing.assert_allclose(out[True].params[k], out[False].params[k], rtol=1e-12, atol=1e-14, err_msg=k)
