"""Every training option that changes numbers changes them as it should: the steps and the loop
are checked against the numbers, not against "it learns".

- dpo_step / sft_step: the loss against a formula written here from the papers, on log-probs
  from a separate forward; the gradients against central differences of that formula along a
  random direction (float64). One case per option: loss type, label smoothing, per-token
  averaging, RPO, reference-free, SFT's token weighting.
- the loop: each batch's reference log-probs against a separate forward of the frozen
  reference (cached and recomputed), the loss of each step against the formula on the policy
  as it was before that step, the clipping and the learning-rate schedule as AdamW receives them.
- reward accuracy counts ties as wrong.
"""

import math

import numpy as np
import pytest

import minidpo.train as T
from minidpo.data import TokenizedPair, TokenizedSFT, collate_preferences, collate_sft
from minidpo.logprobs import sequence_logps
from minidpo.losses import dpo_loss, preference_metrics
from minidpo.model import GPTConfig, gpt_forward, init_params
from minidpo.optim import AdamW

CFG = GPTConfig(vocab_size=23, n_ctx=16, n_layer=2, n_head=2, n_embd=8)


def random_pairs(n, seed):
    rng = np.random.default_rng(seed)
    ids = lambda k: [int(t) for t in rng.integers(1, CFG.vocab_size, k)]  # noqa: E731
    return [TokenizedPair(prompt_ids=ids(int(rng.integers(1, 4))), chosen_ids=ids(int(rng.integers(1, 6))),
                          rejected_ids=ids(int(rng.integers(1, 6)))) for _ in range(n)]


def logps_of(params, batch, average=False):
    """log pi(y|x) of every example of a batch by the training forward, summed or averaged over its
    tokens: (E,) float64, and the token counts (E,)."""
    logits, _ = gpt_forward(params, batch.input_ids, CFG, batch.layout, logits_at=batch.logits_at)  # (M, V)
    counts = batch.host_token_counts
    w = np.zeros((batch.n_examples, len(batch.host_example)), dtype=logits.dtype)
    w[batch.host_example, np.arange(len(batch.host_example))] = 1.0 / counts[batch.host_example] if average else 1.0
    lp, _ = sequence_logps(logits, batch.labels, w)
    return lp.astype(np.float64), counts


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def expected_dpo_loss(params, batch, ref_c, ref_r, tc):
    """The mean loss of the DPO family, from the papers' formulas (not from losses.py)."""
    lp, counts = logps_of(params, batch, tc.logps_averaged)
    n = len(lp) // 2
    pc, pr = lp[:n], lp[n:]
    rc, rr = (np.zeros(n), np.zeros(n)) if tc.reference_free else (np.asarray(ref_c, np.float64),
                                                                   np.asarray(ref_r, np.float64))
    h = (pc - rc) - (pr - rr)
    b, eps = tc.beta, tc.loss_options.get("label_smoothing", 0.0)
    z = b * h
    if tc.loss_type == "sigmoid":  # eq. (7); cDPO with eps > 0
        loss = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    elif tc.loss_type == "robust":
        loss = (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
    elif tc.loss_type == "ipo":
        loss = (h - 1 / (2 * b)) ** 2
    else:
        loss = np.maximum(0.0, 1 - z)
    if tc.rpo_alpha:
        per_token = pc if tc.logps_averaged else pc / counts[:n]
        loss = loss - tc.rpo_alpha * per_token
    return float(loss.mean())


def directional_check(step_grads, f, params, seed, rtol=1e-5):
    """<grads, d> against (f(p + e d) - f(p - e d)) / 2e for a random direction d."""
    rng = np.random.default_rng(seed)
    d = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    e = 1e-5
    plus = {k: v + e * d[k] for k, v in params.items()}
    minus = {k: v - e * d[k] for k, v in params.items()}
    numeric = (f(plus) - f(minus)) / (2 * e)
    analytic = sum(float(np.vdot(step_grads[k], d[k])) for k in params)
    assert analytic == pytest.approx(numeric, rel=rtol, abs=1e-9)


OPTIONS = [
    dict(),
    dict(beta=0.5),
    dict(loss_type="sigmoid", loss_options={"label_smoothing": 0.2}),
    dict(loss_type="robust", loss_options={"label_smoothing": 0.2}),
    dict(loss_type="ipo", beta=0.7, average_logps=False),
    dict(loss_type="ipo", beta=0.7),
    dict(loss_type="hinge", beta=2.0),
    dict(rpo_alpha=0.5),
    dict(rpo_alpha=0.5, average_logps=True),
    dict(reference_free=True),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_dpo_step_computes_the_configured_loss_and_its_gradient(opts):
    tc = T.TrainConfig(**opts)
    policy = init_params(CFG, seed=1, dtype=np.float64)
    reference = init_params(CFG, seed=2, dtype=np.float64)
    batch = collate_preferences(random_pairs(5, seed=3), pad_id=0, average=tc.logps_averaged)
    ref, _ = logps_of(reference, batch, tc.logps_averaged)
    ref_c, ref_r = ref[:5], ref[5:]
    loss, metrics, grads = T.dpo_step({k: v.copy() for k, v in policy.items()}, CFG, batch, ref_c, ref_r, tc)
    f = lambda p: expected_dpo_loss(p, batch, ref_c, ref_r, tc)  # noqa: E731
    assert float(loss) == pytest.approx(f(policy), rel=1e-10, abs=1e-12)
    directional_check(grads, f, policy, seed=4)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-12)


def test_the_options_are_not_interchangeable():
    """Every case of OPTIONS gives a different loss on one batch (so each test above can fail)."""
    policy = init_params(CFG, seed=1, dtype=np.float64)
    reference = init_params(CFG, seed=2, dtype=np.float64)
    batch = collate_preferences(random_pairs(5, seed=3), pad_id=0)
    losses = []
    for opts in OPTIONS:
        tc = T.TrainConfig(**opts)
        ref, _ = logps_of(reference, batch, tc.logps_averaged)
        losses.append(round(expected_dpo_loss(policy, batch, ref[:5], ref[5:], tc), 9))
    assert len(set(losses)) == len(OPTIONS), losses


def test_sft_step_is_the_token_weighted_mean_nll():
    """L = -sum_b log pi(y_b|x_b) / sum_b n_b (every response token weighs the same), not a
    mean of per-row means."""
    params = init_params(CFG, seed=5, dtype=np.float64)
    rng = np.random.default_rng(6)
    items = [TokenizedSFT(prompt_ids=[1, 2], response_ids=[int(t) for t in rng.integers(1, 23, k)]) for k in (1, 4, 9)]
    batch = collate_sft(items, pad_id=0)

    def f(p):
        lp, counts = logps_of(p, batch)
        return float(-lp.sum() / counts.sum())

    loss, grads = T.sft_step({k: v.copy() for k, v in params.items()}, CFG, batch)
    assert float(loss) == pytest.approx(f(params), rel=1e-10)
    lp, counts = logps_of(params, batch)
    assert float(loss) != pytest.approx(float(np.mean(-lp / counts)), rel=1e-3)  # the two weightings differ here
    directional_check(grads, f, params, seed=7)


# ------------------------------------------------------------------------------------- the loop


class Recorder:
    """Wraps train.dpo_step and AdamW.step: what each step was given and what the optimizer got."""

    def __init__(self, monkeypatch):
        self.steps, self.updates = [], []
        original_step, original_update = T.dpo_step, AdamW.step

        def step(params, model_config, batch, ref_chosen, ref_rejected, tc, *rest, **kw):
            before = {k: np.array(v, copy=True) for k, v in params.items()}
            out = original_step(params, model_config, batch, ref_chosen, ref_rejected, tc, *rest, **kw)
            self.steps.append(dict(params=before, batch=batch,
                                   ref=(np.array(ref_chosen), np.array(ref_rejected)), loss=float(out[0])))
            return out

        def update(opt, params, grads, lr=None):
            norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
            self.updates.append(dict(lr=lr, grad_norm=norm))
            return original_update(opt, params, grads, lr=lr)

        monkeypatch.setattr(T, "dpo_step", step)
        monkeypatch.setattr(AdamW, "step", update)


def run_dpo(tmp_path, monkeypatch, **opts):
    pairs = random_pairs(12, seed=8)
    policy = init_params(CFG, seed=9)
    reference = init_params(CFG, seed=10)
    tc = T.TrainConfig(steps=4, batch_size=4, lr=5e-2, warmup_steps=0, log_every=2, eval_every=100, save_every=100,
                       progress=False, **opts)
    rec = Recorder(monkeypatch)
    T.train_dpo(policy, {k: v.copy() for k, v in reference.items()}, CFG, pairs, 0, tc, tmp_path, resume=False)
    return rec, reference, tc


@pytest.mark.parametrize("layout", [dict(), dict(share_prompt=False, pack=False)], ids=["packed", "padded"])
@pytest.mark.parametrize("cache_reference", [True, False])
@pytest.mark.parametrize("opts", [dict(), dict(loss_type="ipo", average_logps=True, beta=0.5)], ids=["dpo", "ipo"])
def test_each_batch_gets_its_own_reference_logps_and_the_configured_loss(tmp_path, monkeypatch, cache_reference, opts,
                                                                         layout):
    """In either batch layout (the default packs shared-prompt sequences; the check's own forward
    runs on the padded batch of the same pairs, batch_for_step's)."""
    rec, reference, tc = run_dpo(tmp_path, monkeypatch, cache_reference=cache_reference, **opts, **layout)
    assert len(rec.steps) == 4
    pairs = random_pairs(12, seed=8)  # run_dpo's
    for k, s in enumerate(rec.steps):
        idx = T.batch_for_step(k, len(pairs), tc.batch_size, tc.seed)
        padded = collate_preferences([pairs[i] for i in idx], pad_id=0)
        if layout:  # the loop's batch is the padded batch of these pairs
            np.testing.assert_array_equal(s["batch"].input_ids, padded.input_ids)
            assert s["batch"].layout.causal
        else:  # the loop's batch lays out these pairs' tokens: each prompt once, both responses
            pb = s["batch"]
            assert pb.n_examples == 2 * len(idx) and not pb.layout.causal
            assert pb.n_tokens == sum(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)
                                      for i in idx)
        s = dict(s, batch=padded)
        ref, _ = logps_of(reference, s["batch"], tc.logps_averaged)  # a separate forward of the frozen reference
        n = len(ref) // 2
        np.testing.assert_allclose(s["ref"][0], ref[:n], rtol=2e-5, atol=2e-5, err_msg=f"step {k} chosen")
        np.testing.assert_allclose(s["ref"][1], ref[n:], rtol=2e-5, atol=2e-5, err_msg=f"step {k} rejected")
        if k:  # the policy has moved: its own log-probs are no longer the reference's
            own, _ = logps_of(s["params"], s["batch"], tc.logps_averaged)
            assert np.abs(own - ref).max() > 1e-3
        want = expected_dpo_loss({p: v.astype(np.float64) for p, v in s["params"].items()}, s["batch"],
                                 ref[:n], ref[n:], tc)
        assert s["loss"] == pytest.approx(want, rel=1e-4, abs=1e-5), f"step {k}"


def test_the_loop_clips_to_the_configured_norm(tmp_path, monkeypatch):
    rec, _, _ = run_dpo(tmp_path / "clip", monkeypatch, grad_clip=1e-3)
    assert [u["grad_norm"] for u in rec.updates] == pytest.approx([1e-3] * 4, rel=1e-3)


def test_the_loop_does_not_clip_when_clipping_is_off(tmp_path, monkeypatch):
    rec, _, _ = run_dpo(tmp_path / "noclip", monkeypatch, grad_clip=0.0)
    assert min(u["grad_norm"] for u in rec.updates) > 1e-2


def test_the_loop_follows_the_schedule(tmp_path, monkeypatch):
    pairs = random_pairs(12, seed=8)
    tc = T.TrainConfig(steps=6, batch_size=4, lr=0.1, warmup_steps=2, schedule="cosine", min_lr_ratio=0.2,
                       log_every=3, eval_every=100, save_every=100, progress=False)
    rec = Recorder(monkeypatch)
    T.train_dpo(init_params(CFG, seed=9), init_params(CFG, seed=10), CFG, pairs, 0, tc, tmp_path, resume=False)
    # warmup (s + 1) / W, then cosine from 0.1 down to 0.02 over the remaining 4 steps
    cosine = [0.02 + 0.08 * 0.5 * (1 + math.cos(math.pi * r / 4)) for r in range(4)]
    assert [u["lr"] for u in rec.updates] == pytest.approx([0.05, 0.1] + cosine, rel=1e-12)


def test_the_loop_hands_weight_decay_and_betas_to_the_optimizer(tmp_path, monkeypatch):
    """One step from the same start with and without decay: decoupled decay subtracts lr * wd * p
    from every matrix (biases and layernorm gains are not decayed) and changes nothing else. And
    the optimizer that takes the steps holds the configured, non-default betas."""
    pairs = random_pairs(12, seed=8)
    seen = []
    original = AdamW.step

    def step(opt, params, grads, lr=None):
        seen.append((opt.beta1, opt.beta2, opt.weight_decay))
        return original(opt, params, grads, lr=lr)

    monkeypatch.setattr(AdamW, "step", step)
    lr, wd = 5e-2, 0.5
    after = {}
    for decay in (0.0, wd):
        policy = init_params(CFG, seed=9)
        tc = T.TrainConfig(steps=1, batch_size=4, lr=lr, warmup_steps=0, weight_decay=decay, adam_betas=(0.8, 0.99),
                           log_every=1, eval_every=100, save_every=100, progress=False)
        T.train_dpo(policy, init_params(CFG, seed=10), CFG, pairs, 0, tc, tmp_path / f"wd{decay}", resume=False)
        after[decay] = policy
    assert seen == [(0.8, 0.99, 0.0), (0.8, 0.99, wd)]
    start = init_params(CFG, seed=9)
    for k, p0 in start.items():
        want = -lr * wd * p0 if p0.ndim >= 2 else np.zeros_like(p0)
        np.testing.assert_allclose(after[wd][k] - after[0.0][k], want, rtol=1e-3, atol=1e-8, err_msg=k)
    assert max(np.abs(after[wd][k] - after[0.0][k]).max() for k in start) > 1e-4


def test_a_record_is_the_mean_of_its_interval(tmp_path):
    """A log_every=2 record equals the mean of the two log_every=1 records it spans (not their sum)."""
    pairs = random_pairs(12, seed=8)
    logs = {}
    for every in (1, 2):
        tc = T.TrainConfig(steps=4, batch_size=4, lr=5e-2, warmup_steps=0, log_every=every, eval_every=100,
                           save_every=100, progress=False)
        res = T.train_dpo(init_params(CFG, seed=9), init_params(CFG, seed=10), CFG, pairs, 0, tc, tmp_path / str(every),
                          resume=False)
        logs[every] = {r["step"]: r for r in res.history if "loss" in r and "eval/loss" not in r}
    assert sorted(logs[1]) == [1, 2, 3, 4] and sorted(logs[2]) == [2, 4]
    keys = [k for k in logs[2][2] if k not in ("stage", "step", "lr", "time_s")]
    assert {"loss", "grad_norm", "rewards/accuracies", "rewards/margins"} <= set(keys)
    for step in (2, 4):
        for k in keys:
            mean = (logs[1][step - 1][k] + logs[1][step][k]) / 2
            assert logs[2][step][k] == pytest.approx(mean, rel=1e-6, abs=1e-7), (step, k)
    assert logs[1][1]["loss"] != pytest.approx(logs[1][2]["loss"], rel=1e-3)  # the two steps differ


# ------------------------------------------------------------------------------------- metrics


def test_reward_accuracy_counts_ties_as_wrong():
    """rewards/accuracies = mean(r_hat_w > r_hat_l): a tie is not a correct ranking."""
    pc = np.array([1.0, 2.0, 3.0, 4.0])
    pr = np.array([0.0, 2.0, 3.5, 4.0])  # right, tie, wrong, tie
    ref = np.zeros(4)
    out = dpo_loss(pc, pr, ref, ref, beta=0.1)
    assert float(preference_metrics(out, pc, pr)["rewards/accuracies"]) == 0.25
