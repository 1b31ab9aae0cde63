"""The loss family in the trainer: what each loss's row asks of a training run, supplied and checked.

- a loss without a reference (SimPO, CPO, ORPO, AlphaPO, sft, reference_free) runs no forward of
  the reference model at all, and the reference may be None;
- LD-DPO's log-probs (TrainConfig.ld_alpha) are the batch's token weights, in every layout equal to
  losses.ld_logps written out on dense per-token log-probs;
- WPO's pair weights (TrainConfig.wpo) come from the step's own logits and equal losses.wpo_weights
  written out on a separate padded forward; the step's gradient is that of the weighted loss;
- BCO's running reward mean is the mean of every reward the run has seen, checkpointed and resumed
  bit for bit; an edited one is refused;
- KTO's reference point is the policy's KL from pi_ref on the batch's mismatched examples, paired
  (train_dpo) and unpaired (train_kto, its own step checked against central differences);
- the command line: --ld-alpha, --wpo, KTO data through `minidpo dpo --loss kto`, usage errors.
"""

import json

import numpy as np
import pytest

import minidpo.model as model_mod
import minidpo.scoring as scoring
import minidpo.train as T
from minidpo.data import TokenizedKTO, TokenizedPair, collate_preferences, kto_mismatched_items
from minidpo.logprobs import logsumexp, sequence_logps
from minidpo.losses import (LOSS_TABLE, dpo_loss, kto_loss, kto_reference_point, ld_logps, wpo_weights)
from minidpo.model import GPTConfig, gpt_forward, init_params
from minidpo.packing import Batcher

CFG = GPTConfig(vocab_size=29, n_ctx=24, n_layer=2, n_head=2, n_embd=16)
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]  # (share_prompt, pack)


def random_pairs(n, seed, longest=7):
    rng = np.random.default_rng(seed)
    ids = lambda k: [int(t) for t in rng.integers(1, CFG.vocab_size, k)]  # noqa: E731
    return [TokenizedPair(ids(int(rng.integers(1, 5))), ids(int(rng.integers(1, longest))),
                          ids(int(rng.integers(1, longest)))) for _ in range(n)]


def richardson(f, params, d, e=1e-5):
    """The derivative of f at params along d: central differences at e and e/2, one Richardson step
    (error O(e^4): these losses bend enough that a plain central difference is off by ~1e-6)."""
    def c(h):
        return (f({k: v + h * d[k] for k, v in params.items()}) - f({k: v - h * d[k] for k, v in params.items()})) / (2 * h)
    return (4 * c(e / 2) - c(e)) / 3


def forwards_of(monkeypatch, params):
    """Count the forwards run with ``params`` (by identity of its first array), whatever calls them."""
    marker = next(iter(params.values()))
    seen = []
    real = model_mod.gpt_forward

    def counting(p, *a, **k):
        seen.append(next(iter(p.values())) is marker)
        return real(p, *a, **k)

    for mod in (T, scoring):
        monkeypatch.setattr(mod, "gpt_forward", counting)
    return seen


# ---------------------------------------------------------------------------------------------- reference-free


@pytest.mark.parametrize("loss, extra", [("simpo", {}), ("cpo", {}), ("orpo", {}), ("alphapo", {}), ("sft", {}),
                                         ("sigmoid", {"reference_free": True}),
                                         ("weighted_sum", {"loss_options": {"loss_weights": {"cpo": 1.0, "sft": 0.5}}})])
def test_a_loss_without_a_reference_runs_no_reference_forward(tmp_path, monkeypatch, loss, extra):
    pairs = random_pairs(10, 0)
    for cache in (True, False):
        tc = T.TrainConfig(steps=3, batch_size=4, lr=1e-2, loss_type=loss, eval_every=3, progress=False,
                           cache_reference=cache, **extra)
        assert not tc.uses_reference
        policy, reference = init_params(CFG, seed=1), init_params(CFG, seed=2)
        seen = forwards_of(monkeypatch, reference)
        res = T.train_dpo(policy, reference, CFG, pairs[:7], 0, tc, tmp_path / f"{loss}{cache}", eval_pairs=pairs[7:])
        assert res.step == 3 and seen and not any(seen)  # forwards ran, none of them the reference's
        state = json.loads((tmp_path / f"{loss}{cache}" / "checkpoint" / "trainer_state.json").read_text())
        assert state["config"]["inputs"]["reference"] is None
        # and the reference is not needed at all: the same run without one gives the same numbers
        policy2 = init_params(CFG, seed=1)
        res2 = T.train_dpo(policy2, None, CFG, pairs[:7], 0, tc, tmp_path / f"{loss}{cache}none", eval_pairs=pairs[7:])
        for k in policy:
            np.testing.assert_array_equal(policy[k], policy2[k])
        assert [r.get("loss") for r in res.history] == [r.get("loss") for r in res2.history]


def test_a_loss_with_a_reference_runs_its_forwards_and_needs_it(tmp_path, monkeypatch):
    """The counter above can see a reference forward: sigmoid runs them (the cache pass, held-out)."""
    pairs = random_pairs(10, 0)
    tc = T.TrainConfig(steps=2, batch_size=4, lr=1e-2, eval_every=2, progress=False)
    assert tc.uses_reference
    reference = init_params(CFG, seed=2)
    seen = forwards_of(monkeypatch, reference)
    T.train_dpo(init_params(CFG, seed=1), reference, CFG, pairs[:7], 0, tc, tmp_path / "a", eval_pairs=pairs[7:])
    assert sum(seen) >= 2
    with pytest.raises(ValueError, match="needs the reference model"):
        T.train_dpo(init_params(CFG, seed=1), None, CFG, pairs[:7], 0, tc, tmp_path / "b")


# ---------------------------------------------------------------------------------------------- LD-DPO


@pytest.mark.parametrize("share_prompt, pack", LAYOUTS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("average", [False, True])
def test_ld_token_weights_are_ld_logps_in_every_layout(share_prompt, pack, alpha, average):
    pairs = random_pairs(6, 3, longest=9)
    n = len(pairs)
    batch = Batcher(0, share_prompt, pack, average=average, ld_alpha=alpha).pairs(pairs)
    counts = batch.host_token_counts
    T_ = int(counts.max())
    rng = np.random.default_rng(4)
    dense = rng.uniform(-5, 0, (2 * n, T_))  # (2N, T) per-token log-probs, left-aligned per response
    mask = np.arange(T_)[None, :] < counts[:, None]
    dense[~mask] = 0.0
    want, token_w = ld_logps(dense, mask, n, alpha)  # the rule written out
    if average:  # the loss's per-token mean: the LD sum over the response's full length (TRL's ipo)
        want = want / counts
    lp = dense[batch.host_example, batch.response_positions()]  # (M,) the scored form
    np.testing.assert_allclose(batch.weights(np.float64) @ lp, want, rtol=1e-13)
    assert batch.token_scale().min() == (alpha if (token_w[mask] != 1).any() else 1.0)


def test_ld_alpha_reaches_the_trainers_batches_and_the_reference():
    tc = T.TrainConfig(ld_alpha=0.25)
    assert T.batcher_for(tc, 0, "cpu").ld_alpha == 0.25
    with pytest.raises(ValueError, match="ld_alpha must be a number in"):
        T.TrainConfig(ld_alpha=1.5)


# ---------------------------------------------------------------------------------------------- the step, three ways


def _dense_forward(params, pairs):
    """A separate padded forward: per-token log-probs and log sum_v p_v^2 (2N, T) left-aligned per
    response, and the mask, written out from the full logits with NumPy."""
    batch = collate_preferences(pairs, pad_id=0)
    logits, _ = gpt_forward(params, batch.input_ids, CFG, batch.layout, logits_at=batch.logits_at)  # (M, V)
    lse = logsumexp(logits, axis=-1)
    lp = logits[np.arange(len(lse)), batch.labels] - lse
    lss = np.log(np.sum(np.exp(2 * (logits - lse[:, None])), axis=-1))
    counts = batch.host_token_counts
    T_ = int(counts.max())
    mask = np.arange(T_)[None, :] < counts[:, None]
    d_lp, d_lss = np.zeros(mask.shape), np.zeros(mask.shape)
    pos = batch.response_positions()
    d_lp[batch.host_example, pos] = lp
    d_lss[batch.host_example, pos] = lss
    return d_lp, d_lss, mask


@pytest.mark.parametrize("case", ["ld", "wpo", "ld+wpo"])
@pytest.mark.parametrize("share_prompt, pack", [(False, False), (True, True)])
def test_the_step_with_ld_and_wpo_is_the_written_out_loss_and_its_gradient(case, share_prompt, pack):
    """float64: the step's loss is eq. 7 on ld_logps, each pair's loss times wpo_weights (fixed at the
    step's parameters: constants), from a separate padded forward; its gradient of the whole
    network matches central differences of that along a random direction."""
    n = 5
    pairs = random_pairs(n, 7, longest=9)
    alpha = 0.4 if "ld" in case else 1.0
    tc = T.TrainConfig(beta=0.3, ld_alpha=alpha, wpo="wpo" in case, share_prompt=share_prompt, pack=pack)
    policy = init_params(CFG, seed=1, dtype=np.float64)
    reference = init_params(CFG, seed=2, dtype=np.float64)
    r_lp, _, mask = _dense_forward(reference, pairs)
    ref = ld_logps(r_lp, mask, n, alpha)[0]
    p_lp, p_lss, _ = _dense_forward(policy, pairs)
    w = wpo_weights(p_lp, p_lss, mask, n) if tc.wpo else np.ones(n)
    assert tc.wpo == (np.ptp(w) > 0)

    def f(params):
        lp, _, _ = _dense_forward(params, pairs)
        pi = ld_logps(lp, mask, n, alpha)[0]
        out = dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], beta=0.3)
        return float(np.mean(out.losses * w))

    batch = T.batcher_for(tc, 0, "cpu").pairs(pairs)
    loss, _, grads = T.dpo_step({k: v.copy() for k, v in policy.items()}, CFG, batch, ref[:n], ref[n:], tc)
    assert float(loss) == pytest.approx(f(policy), rel=1e-12)
    rng = np.random.default_rng(5)
    d = {k: rng.standard_normal(v.shape) for k, v in policy.items()}
    numeric = richardson(f, policy, d)
    analytic = sum(float(np.vdot(grads[k], d[k])) for k in policy)
    assert analytic == pytest.approx(numeric, rel=1e-8) and abs(analytic) > 1e-6


def test_wpo_is_refused_for_a_loss_that_sorts_the_batch():
    for loss in ("aot", "aot_unpaired"):
        with pytest.raises(ValueError, match="WPO's per-pair weights do not apply"):
            T.TrainConfig(loss_type=loss, wpo=True)


def test_held_out_wpo_loss_is_the_training_steps(tmp_path):
    """evaluate_preferences computes the pairs' WPO weights as the step does: at step 0 on a
    training batch's pairs, the held-out loss equals the step's loss."""
    pairs = random_pairs(4, 9)
    tc = T.TrainConfig(wpo=True, eval_batch_size=2)
    policy = init_params(CFG, seed=1, dtype=np.float64)
    reference = init_params(CFG, seed=2, dtype=np.float64)
    batcher = T.batcher_for(tc, 0, "cpu")
    rc, rr = scoring.batched_sequence_logps(reference, CFG, pairs, batcher, 4)
    loss, _, _ = T.dpo_step(policy, CFG, batcher.pairs(pairs), rc, rr, tc)
    m = T.evaluate_preferences(policy, CFG, pairs, rc, rr, batcher, tc)
    assert m["eval/loss"] == pytest.approx(float(loss), rel=1e-12)
    plain = T.evaluate_preferences(policy, CFG, pairs, rc, rr, batcher, T.TrainConfig(eval_batch_size=2))
    assert abs(plain["eval/loss"] - m["eval/loss"]) > 1e-6  # the weights do change it


# ---------------------------------------------------------------------------------------------- BCO


def test_bco_running_mean_is_the_mean_of_every_reward_seen(tmp_path, monkeypatch):
    pairs = random_pairs(12, 11)
    tc = T.TrainConfig(steps=4, batch_size=4, lr=1e-2, beta=0.5, loss_type="bco_pair", progress=False, log_every=1)
    seen_means, rewards = [], []
    real = T.dpo_step_loss

    def spying(logps, counts, rc, rr, tc_, inputs=None):
        rewards.append(0.5 * (np.asarray(logps) - np.concatenate([rc, rr])))
        seen_means.append(float(inputs["reward_mean"]))
        return real(logps, counts, rc, rr, tc_, inputs)

    monkeypatch.setattr(T, "dpo_step_loss", spying)
    policy, reference = init_params(CFG, seed=1), init_params(CFG, seed=1)
    T.train_dpo(policy, reference, CFG, pairs, 0, tc, tmp_path / "run")
    assert len(seen_means) == 4
    for k in range(4):  # delta at step k: the mean of the rewards of steps 1..k, this batch's included
        want = np.mean(np.concatenate(rewards[: k + 1]).astype(np.float64))
        assert seen_means[k] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert np.ptp(seen_means) > 0
    st = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["extra"]["stage_state"]
    assert st["count"] == 4 * 8 and st["reward_mean"] == pytest.approx(seen_means[-1], rel=1e-6)


def test_bco_resumes_its_running_mean_bit_for_bit_and_refuses_an_edited_one(tmp_path):
    pairs = random_pairs(12, 12)
    kw = dict(batch_size=4, lr=1e-2, beta=0.5, loss_type="bco_pair", progress=False, log_every=1, save_every=2)
    whole = init_params(CFG, seed=1)
    ref = init_params(CFG, seed=1)
    T.train_dpo(whole, ref, CFG, pairs, 0, T.TrainConfig(steps=4, **kw), tmp_path / "whole")
    part = init_params(CFG, seed=1)
    T.train_dpo(part, ref, CFG, pairs, 0, T.TrainConfig(steps=2, **kw), tmp_path / "part")
    T.train_dpo(part, ref, CFG, pairs, 0, T.TrainConfig(steps=4, **kw), tmp_path / "part")  # resumed at 2
    for k in whole:
        np.testing.assert_array_equal(whole[k], part[k])
    state_file = tmp_path / "part" / "checkpoint" / "trainer_state.json"
    st = json.loads(state_file.read_text())
    assert st["extra"]["stage_state"] == json.loads((tmp_path / "whole" / "checkpoint" / "trainer_state.json")
                                                    .read_text())["extra"]["stage_state"]
    st["extra"]["stage_state"]["count"] = "many"
    state_file.write_text(json.dumps(st))
    with pytest.raises(Exception, match=r"extra.stage_state.count' must be an integer >= 0"):
        T.train_dpo(init_params(CFG, seed=1), ref, CFG, pairs, 0, T.TrainConfig(steps=6, **kw), tmp_path / "part")


# ---------------------------------------------------------------------------------------------- KTO


def test_paired_kto_reference_point_is_the_kl_on_the_batchs_mismatched_examples(tmp_path, monkeypatch):
    pairs = random_pairs(8, 13)
    tc = T.TrainConfig(steps=2, batch_size=4, lr=3e-2, loss_type="kto", progress=False, log_every=1)
    got = []
    real = T.dpo_step_loss
    monkeypatch.setattr(T, "dpo_step_loss", lambda *a: (got.append(a[5]["reference_point"]), real(*a))[1])
    policy, reference = init_params(CFG, seed=2), init_params(CFG, seed=3)  # a positive KL estimate: no clamp
    start = {k: v.copy() for k, v in policy.items()}
    T.train_dpo(policy, reference, CFG, pairs, 0, tc, tmp_path / "run")
    # step 1's z0, written out: the 2N examples [chosen; rejected] of batch 0, each prompt with the
    # previous example's completion, scored by a padded forward of the policy and the reference
    idx = T.batch_for_step(0, len(pairs), 4, 0)
    batch_pairs = [pairs[i] for i in idx]
    prompts, responses = T.pair_examples(batch_pairs)
    items = kto_mismatched_items(prompts, responses, CFG.n_ctx)
    assert [it.prompt_ids for it in items] == prompts
    assert [it.response_ids for it in items] == [responses[-1]] + responses[:-1]
    b = Batcher(0, False, False).sft(items)

    def logps(params):
        logits, _ = gpt_forward(params, b.input_ids, CFG, b.layout, logits_at=b.logits_at)
        return sequence_logps(logits, b.labels, b.weights(logits.dtype))[0]

    want = float(kto_reference_point(logps(start), logps(reference)))
    assert got[0] == pytest.approx(want, rel=1e-5, abs=1e-7) and got[0] > 0


def kto_examples(n, seed):
    rng = np.random.default_rng(seed)
    ids = lambda k: [int(t) for t in rng.integers(1, CFG.vocab_size, k)]  # noqa: E731
    return [TokenizedKTO(ids(int(rng.integers(1, 5))), ids(int(rng.integers(1, 7))), bool(rng.random() < 0.6))
            for _ in range(n)]


def test_kto_step_is_the_papers_loss_and_its_gradient():
    ex = kto_examples(6, 14)
    tc = T.TrainConfig(beta=0.4, loss_type="kto", loss_options={"desirable_weight": 1.3, "undesirable_weight": 0.7})
    policy = init_params(CFG, seed=1, dtype=np.float64)
    reference = init_params(CFG, seed=2, dtype=np.float64)
    b = Batcher(0, True, True).sft(ex)
    d = np.array([e.desirable for e in ex])

    def logps(params):
        pb = Batcher(0, False, False).sft(ex)
        logits, _ = gpt_forward(params, pb.input_ids, CFG, pb.layout, logits_at=pb.logits_at)
        return sequence_logps(logits, pb.labels, pb.weights(logits.dtype))[0]

    ref = logps(reference)
    z0 = 0.2

    def f(params):  # eq. 7 of the KTO paper written out
        rho = logps(params) - ref
        s = 1 / (1 + np.exp(-0.4 * (rho - z0)))
        return float(np.mean(np.where(d, 1.3 * (1 - s), 0.7 * s)))

    loss, metrics, grads = T.kto_step({k: v.copy() for k, v in policy.items()}, CFG, b, ref, d, z0, tc)
    assert float(loss) == pytest.approx(f(policy), rel=1e-12)
    assert float(metrics["kl"]) == z0
    rng = np.random.default_rng(6)
    dirn = {k: rng.standard_normal(v.shape) for k, v in policy.items()}
    numeric = richardson(f, policy, dirn)
    analytic = sum(float(np.vdot(grads[k], dirn[k])) for k in policy)
    assert analytic == pytest.approx(numeric, rel=1e-8) and abs(analytic) > 1e-6


def test_train_kto_trains_resumes_and_evaluates(tmp_path):
    ex = kto_examples(14, 15)
    kw = dict(batch_size=4, lr=3e-2, loss_type="kto", progress=False, log_every=1, eval_every=2, save_every=2)
    reference = init_params(CFG, seed=2)
    whole = init_params(CFG, seed=2)
    res = T.train_kto(whole, reference, CFG, ex[:10], 0, T.TrainConfig(steps=4, **kw), tmp_path / "w",
                      eval_examples=ex[10:])
    assert res.step == 4
    ev = [r for r in res.history if "eval/loss" in r]
    assert ev[0]["step"] == 0 and ev[0]["eval/loss"] == pytest.approx(0.5) and ev[0]["eval/kl"] == 0.0
    # at step 0 policy = reference: every rho is 0 and each example's loss is lambda * sigma(0) = 1/2
    tr = [r for r in res.history if "loss" in r]
    assert tr[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    part = init_params(CFG, seed=2)
    T.train_kto(part, reference, CFG, ex[:10], 0, T.TrainConfig(steps=2, **kw), tmp_path / "p", eval_examples=ex[10:])
    T.train_kto(part, reference, CFG, ex[:10], 0, T.TrainConfig(steps=4, **kw), tmp_path / "p", eval_examples=ex[10:])
    for k in whole:
        np.testing.assert_array_equal(whole[k], part[k])
    # held-out: the loss of kto_loss on the held-out examples with their own z0, by hand
    pol = scoring.item_logps(whole, CFG, ex[10:], Batcher(0), 16)
    ref = scoring.item_logps(reference, CFG, ex[10:], Batcher(0), 16)
    mis = kto_mismatched_items([e.prompt_ids for e in ex[10:]], [e.response_ids for e in ex[10:]], CFG.n_ctx)
    z0 = float(kto_reference_point(scoring.item_logps(whole, CFG, mis, Batcher(0), 16),
                                   scoring.item_logps(reference, CFG, mis, Batcher(0), 16)))
    want = float(np.mean(kto_loss(pol - ref, np.array([e.desirable for e in ex[10:]]), 0.1, z0)[0]))
    assert ev[-1]["eval/loss"] == pytest.approx(want, rel=1e-5) and ev[-1]["eval/kl"] == pytest.approx(z0, rel=1e-5)
    with pytest.raises(ValueError, match="train_kto trains the 'kto' loss"):
        T.train_kto(init_params(CFG, seed=2), reference, CFG, ex, 0, T.TrainConfig(), tmp_path / "x")
    with pytest.raises(ValueError, match="at least 2 examples"):
        T.train_kto(init_params(CFG, seed=2), reference, CFG, ex, 0, T.TrainConfig(loss_type="kto", batch_size=1),
                    tmp_path / "y")


def test_mismatched_completions_are_cut_to_the_context():
    items = kto_mismatched_items([[1] * 10, [2] * 3], [[3] * 2, [4] * 20], max_length=12)
    assert [len(it.prompt_ids) + len(it.response_ids) for it in items] == [12, 5]
    assert items[0].response_ids == [4] * 2 and items[0].truncated and not items[1].truncated


def test_kto_has_a_reference_point_input_and_bco_a_reward_mean():
    """The trainer supplies what the rows name; a row naming an input the trainer does not know
    would go unsupplied: every input of the table is one of these."""
    known = {"reference_point", "reward_mean", "chosen_token_counts"}
    for name, row in LOSS_TABLE.items():
        assert set(row.required_inputs(row.resolve({}))) <= known, name
