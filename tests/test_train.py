"""The training loops: SFT then DPO end to end, exact resume, non-finite stop, Ctrl-C, masks."""

import json
import os
import signal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.checkpoint import load_checkpoint
from minidpo.data import PreferenceExample, TokenizedPair, build_preference_dataset, build_sft_dataset, collate_preferences
from minidpo.logprobs import logsumexp
from minidpo.model import GPTConfig, gpt_forward, init_params
from minidpo.tokenizer import BPETokenizer
from minidpo.packing import Batcher
from minidpo.scoring import batch_logps, batched_sequence_logps
from minidpo.train import NonFiniteError, RunFolderError, TrainConfig, batch_for_step, train_dpo, train_sft

GOOD = ["great", "lovely", "superb", "wonderful", "brilliant", "charming"]
BAD = ["awful", "boring", "dreadful", "terrible", "clumsy", "dull"]
NEUTRAL = ["the", "film", "plot", "cast", "music", "scene", "ending", "story"]


def synthetic_pairs(n: int, seed: int) -> list[PreferenceExample]:
    """Prompt: neutral words; chosen: a response built from GOOD words, rejected from BAD words."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(NEUTRAL, size=rng.integers(2, 5)))
        body = rng.choice(NEUTRAL, size=3)
        chosen = " " + " ".join(list(body[:2]) + list(rng.choice(GOOD, size=2)))
        rejected = " " + " ".join(list(body[:2]) + list(rng.choice(BAD, size=2)))
        out.append(PreferenceExample(prompt, chosen, rejected, f"synthetic:{i + 1}"))
    return out


@pytest.fixture(scope="module")
def world():
    train = synthetic_pairs(300, seed=0)
    held = synthetic_pairs(100, seed=1)
    texts = [e.prompt + e.chosen for e in train] + [e.prompt + e.rejected for e in train]
    tok = BPETokenizer.train(texts, vocab_size=300)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_ctx=32, n_layer=2, n_head=2, n_embd=32)
    pairs, _ = build_preference_dataset(train, tok, max_length=32, max_prompt_length=16)
    held_pairs, _ = build_preference_dataset(held, tok, max_length=32, max_prompt_length=16)
    # SFT data: both responses, so pi_ref is indifferent between GOOD and BAD words
    sft_items, _ = build_sft_dataset([(e.prompt, e.chosen) for e in train] + [(e.prompt, e.rejected) for e in train],
                                     tok, max_length=32)
    return tok, cfg, pairs, held_pairs, sft_items


def small_tc(**kw):
    base = dict(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, log_every=5, eval_every=1000, save_every=1000,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_for_step(s, 50, 8, seed=3) for s in range(20)]
    b = [batch_for_step(s, 50, 8, seed=3) for s in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    epoch0 = np.concatenate(a[:6])  # 50 // 8 = 6 batches an epoch, no repeats inside an epoch
    assert len(set(epoch0.tolist())) == 48
    assert not np.array_equal(batch_for_step(0, 50, 8, seed=3), batch_for_step(0, 50, 8, seed=4))
    # every epoch is a fresh permutation: each covers 48 distinct examples, in another order than the last
    epochs = [np.concatenate(a[e * 6 : (e + 1) * 6]) for e in range(3)]
    assert all(len(set(e.tolist())) == 48 for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    for e in range(3):  # the order of epoch e is default_rng([seed, e])'s permutation, cut into batches of 8
        np.testing.assert_array_equal(epochs[e], np.random.default_rng([3, e]).permutation(50)[:48])


@pytest.mark.slow
def test_sft_then_dpo_learns_the_preference(world, tmp_path):
    tok, cfg, pairs, held_pairs, sft_items = world
    ref = init_params(cfg, "cpu", seed=0)
    train_sft(ref, cfg, sft_items, tok.pad_id, small_tc(steps=150), tmp_path / "sft")
    policy = {k: v.copy() for k, v in ref.items()}
    ref_before = {k: v.copy() for k, v in ref.items()}
    tc = small_tc(steps=80, lr=2e-3, beta=0.1, eval_every=40)
    res = train_dpo(policy, ref, cfg, pairs, tok.pad_id, tc, tmp_path / "dpo", eval_pairs=held_pairs)
    # the reference is frozen
    assert all(np.array_equal(ref[k], ref_before[k]) for k in ref)
    final_eval = [r for r in res.history if "eval/rewards/accuracies" in r][-1]
    assert final_eval["eval/rewards/accuracies"] > 0.9
    assert final_eval["eval/rewards/margins"] > 0
    # and the log says the same thing on disk
    lines = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["eval/rewards/accuracies"] == final_eval["eval/rewards/accuracies"]
    # independent check of the held-out accuracy from the saved checkpoint
    ck = load_checkpoint(tmp_path / "dpo" / "checkpoint")
    pc, pr = batched_sequence_logps(ck.params, cfg, held_pairs, Batcher(tok.pad_id), 64)
    rc, rr = batched_sequence_logps(ref, cfg, held_pairs, Batcher(tok.pad_id), 64)
    assert np.mean((pc - rc) > (pr - rr)) > 0.9


class interrupt_at:
    """Deliver SIGINT (as a Ctrl-C would) during the n-th call of a training step function."""

    def __init__(self, name: str, n: int):
        import minidpo.train as T

        self.T, self.name, self.n, self.calls = T, name, n, 0
        self.original = getattr(T, name)

    def __enter__(self):
        def step(*a, **kw):
            self.calls += 1
            if self.calls == self.n:
                os.kill(os.getpid(), signal.SIGINT)
            return self.original(*a, **kw)

        setattr(self.T, self.name, step)
        return self

    def __exit__(self, *exc):
        setattr(self.T, self.name, self.original)
        return False


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_resume_matches_uninterrupted_run(world, tmp_path, stage):
    """N steps straight == N/2 steps, Ctrl-C (checkpoint), a fresh process-like restart, N/2 more."""
    tok, cfg, pairs, _, sft_items = world
    base = init_params(cfg, "cpu", seed=1)
    tc = small_tc(steps=12, schedule="cosine", weight_decay=0.1, save_every=1000)

    def run(out, params):
        if stage == "sft":
            return train_sft(params, cfg, sft_items, tok.pad_id, tc, out)
        return train_dpo(params, base, cfg, pairs, tok.pad_id, tc, out)

    straight = {k: v.copy() for k, v in base.items()}
    run(tmp_path / "a", straight)
    with interrupt_at("sft_step" if stage == "sft" else "dpo_step", 6):
        first = run(tmp_path / "b", {k: v.copy() for k, v in base.items()})
    assert first.stopped_early and first.step == 6
    fresh = init_params(cfg, "cpu", seed=99)  # everything must come from the checkpoint
    second = run(tmp_path / "b", fresh)
    assert second.step == 12 and not second.stopped_early
    for k in straight:
        np.testing.assert_array_equal(fresh[k], straight[k], err_msg=k)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path):
    tok, cfg, pairs, _, sft_items = world
    params = init_params(cfg, "cpu", seed=2)
    train_sft(params, cfg, sft_items, tok.pad_id, small_tc(steps=5), tmp_path)
    good = load_checkpoint(tmp_path / "checkpoint")
    assert good.step == 5
    params["transformer.ln_f.weight"][...] = np.nan
    with pytest.raises(NonFiniteError, match="non-finite"):
        train_sft(params, cfg, sft_items, tok.pad_id, small_tc(steps=20), tmp_path, resume=False)
    after = load_checkpoint(tmp_path / "checkpoint")
    assert after.step == 5
    for k in good.params:
        np.testing.assert_array_equal(after.params[k], good.params[k])


def test_ctrl_c_saves_a_checkpoint_then_stops(world, tmp_path):
    tok, cfg, pairs, _, sft_items = world
    params = init_params(cfg, "cpu", seed=3)
    with interrupt_at("sft_step", 3):
        res = train_sft(params, cfg, sft_items, tok.pad_id, small_tc(steps=50), tmp_path)
    assert res.stopped_early and res.step == 3
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert ck.step == 3
    for k in params:
        np.testing.assert_array_equal(ck.params[k], params[k])


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_padded_concatenated_batch_equals_one_at_a_time(seed):
    """log pi(y|x) from a right-padded [chosen; rejected] batch equals each sequence alone, unpadded."""
    rng = np.random.default_rng(seed)
    V = 50
    cfg = GPTConfig(vocab_size=V, n_ctx=24, n_layer=1, n_head=2, n_embd=8)
    params = init_params(cfg, "cpu", seed=seed % 7, dtype=np.float64)
    n = int(rng.integers(1, 4))
    pairs = []
    for _ in range(n):
        pl, cl, rl = (int(x) for x in rng.integers(1, 7, size=3))
        pairs.append(TokenizedPair(prompt_ids=list(rng.integers(1, V, pl)), chosen_ids=list(rng.integers(1, V, cl)),
                                   rejected_ids=list(rng.integers(1, V, rl))))
    batch = collate_preferences(pairs, pad_id=0)
    batched, _ = batch_logps(params, cfg, batch)
    for row, (p, which) in enumerate([(p, "chosen") for p in pairs] + [(p, "rejected") for p in pairs]):
        resp = p.chosen_ids if which == "chosen" else p.rejected_ids
        ids = np.array([p.prompt_ids + resp])
        lg, _ = gpt_forward(params, ids, cfg)  # the row alone, every position's logits
        lp = [lg[0, t - 1] - logsumexp(lg[0, t - 1]) for t in range(len(p.prompt_ids), ids.shape[1])]
        alone = sum(float(v[tok]) for v, tok in zip(lp, resp))
        np.testing.assert_allclose(batched[row], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_crash_then_resume_keeps_one_metrics_record_per_step_and_refuses_changed_options(world, tmp_path):
    tok, cfg, pairs, _, sft_items = world
    import minidpo.train as T

    original = T.sft_step
    calls = {"n": 0}

    def crashing_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise MemoryError("simulated crash in step 7")
        return original(*a, **kw)

    T.sft_step = crashing_step
    try:
        with pytest.raises(MemoryError):
            train_sft(init_params(cfg, "cpu", seed=4), cfg, sft_items, tok.pad_id,
                      small_tc(steps=10, log_every=2, save_every=4), tmp_path)
    finally:
        T.sft_step = original
    assert load_checkpoint(tmp_path / "checkpoint").step == 4
    # another learning rate is another run: refused, naming the option, and nothing is touched
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RunFolderError, match=r"lr \(0.003 there, 0.001 now\).*new --out, or --overwrite"):
        train_sft(init_params(cfg, "cpu", seed=4), cfg, sft_items, tok.pad_id,
                  small_tc(steps=10, log_every=2, save_every=4, lr=1e-3), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert load_checkpoint(tmp_path / "checkpoint").step == 4
    train_sft(init_params(cfg, "cpu", seed=4), cfg, sft_items, tok.pad_id,
              small_tc(steps=10, log_every=2, save_every=4), tmp_path)
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]


def test_the_no_gradient_forward_equals_the_training_forward(world):
    """keep_cache=False (reference log-probs, evaluation) runs the same functions on the same
    batch: the same logits bit for bit, at every position or at the scored ones."""
    tok, cfg, pairs, _, _ = world
    params = init_params(cfg, "cpu", seed=5)
    batch = Batcher(tok.pad_id).pairs(pairs[:5])
    for at in (None, batch.logits_at):
        full, cache = gpt_forward(params, batch.input_ids, cfg, batch.layout, logits_at=at)
        nograd, none = gpt_forward(params, batch.input_ids, cfg, batch.layout, logits_at=at, keep_cache=False)
        assert cache is not None and none is None
        np.testing.assert_array_equal(nograd, full)


def test_a_non_finite_update_is_never_saved_and_the_message_names_a_good_checkpoint(world, tmp_path, monkeypatch):
    """Loss and gradient finite, the update not (an overflowing step): the parameters are checked
    before every save, the good checkpoint stays, and the message names it (and its step)."""
    tok, cfg, pairs, _, sft_items = world
    import minidpo.train as T

    original = T.AdamW.step
    calls = {"n": 0}

    def overflowing(self, params, grads, lr):
        original(self, params, grads, lr=lr)
        calls["n"] += 1
        if calls["n"] == 6:  # the update just before the step-6 save
            params["transformer.h.1.mlp.c_fc.bias"][0] = np.inf

    monkeypatch.setattr(T.AdamW, "step", overflowing)
    params = init_params(cfg, "cpu", seed=6)
    with pytest.raises(NonFiniteError) as err:
        train_sft(params, cfg, sft_items, tok.pad_id, small_tc(steps=12, log_every=100, save_every=3), tmp_path)
    msg = str(err.value)
    assert "transformer.h.1.mlp.c_fc.bias is not finite after step 6" in msg
    assert f"{tmp_path / 'checkpoint'} (step 3), intact" in msg
    good = load_checkpoint(tmp_path / "checkpoint")
    assert good.step == 3 and all(np.isfinite(v).all() for v in good.params.values())
    # before any checkpoint exists, the message says so (it names no step-0 checkpoint)
    calls["n"] = 0
    with pytest.raises(NonFiniteError, match="No checkpoint of this run was written yet"):
        train_sft(init_params(cfg, "cpu", seed=6), cfg, sft_items, tok.pad_id,
                  small_tc(steps=12, log_every=100, save_every=6), tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "checkpoint").exists()


def test_metrics_log_a_torn_last_line_is_dropped_with_a_warning_and_resume_goes_on(world, tmp_path):
    tok, cfg, _, _, sft_items = world
    import minidpo.train as T

    with interrupt_at("sft_step", 6):
        train_sft(init_params(cfg, "cpu", seed=7), cfg, sft_items, tok.pad_id, small_tc(steps=10, log_every=2), tmp_path)
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"stage": "sft", "step": 6, "lo')  # a full disk cut this write short
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropped a torn last record"):
        res = train_sft(init_params(cfg, "cpu", seed=7), cfg, sft_items, tok.pad_id, small_tc(steps=10, log_every=2),
                        tmp_path)
    assert res.step == 10 and [r["step"] for r in T.read_metrics(log)] == [2, 4, 6, 8, 10]
    # a bad record before the last one is an error naming the file and line
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + ["{bad"] + lines[2:]) + "\n")
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:3: corrupt metrics record"):
        T.read_metrics(log)


def test_resume_rewrites_the_log_through_a_rename(world, tmp_path, monkeypatch):
    """A resume drops the records after the checkpoint by writing a new file and renaming it: a
    crash half-way leaves the old log whole (it used to rewrite it in place)."""
    tok, cfg, _, _, sft_items = world
    import minidpo.train as T

    with interrupt_at("sft_step", 6):
        train_sft(init_params(cfg, "cpu", seed=8), cfg, sft_items, tok.pad_id, small_tc(steps=10, log_every=2), tmp_path)
    log = tmp_path / "metrics.jsonl"
    before = log.read_text()

    def crash(*a, **kw):
        raise MemoryError("killed while rewriting")

    monkeypatch.setattr(T.os, "replace", crash)
    with pytest.raises(MemoryError):
        train_sft(init_params(cfg, "cpu", seed=8), cfg, sft_items, tok.pad_id, small_tc(steps=10, log_every=2), tmp_path)
    assert log.read_text() == before and len(before.splitlines()) == 3


@pytest.mark.parametrize("field, value", [("steps", -1), ("batch_size", 0), ("log_every", 0), ("save_every", 0),
                                          ("eval_every", 0), ("eval_batch_size", 0), ("grad_clip", -1.0),
                                          ("lr", 0.0), ("beta", 0.0), ("adam_betas", (0.9, 1.0)),
                                          ("schedule", "linear"), ("loss_type", "dpo"),
                                          ("loss_options", {"label_smoothing": 0.6}), ("loss_options", {"gamma": 1.0}),
                                          ("average_logps", "yes")])
def test_train_config_refuses_nonsense_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_old_checkpoints_betas_read_as_adam_betas():
    tc = TrainConfig.from_dict({"betas": [0.9, 0.999], "steps": 3})
    assert tc.adam_betas == (0.9, 0.999) and "betas" not in tc.to_dict()


def test_ctrl_c_before_the_first_step_resumes_without_a_second_starting_record(world, tmp_path, monkeypatch):
    tok, cfg, pairs, held, _ = world
    ref = init_params(cfg, "cpu", seed=9)
    tc = small_tc(steps=4, log_every=2, eval_every=2)
    monkeypatch.setenv("MINIDPO_TEST_INTERRUPT_AT", "dpo:start")
    res = train_dpo({k: v.copy() for k, v in ref.items()}, ref, cfg, pairs, tok.pad_id, tc, tmp_path, eval_pairs=held)
    assert res.stopped_early and res.step == 0
    monkeypatch.delenv("MINIDPO_TEST_INTERRUPT_AT")
    res = train_dpo({k: v.copy() for k, v in ref.items()}, ref, cfg, pairs, tok.pad_id, tc, tmp_path, eval_pairs=held)
    assert res.step == 4 and res.resumed_from == 0
    steps = [(r["step"], "eval/loss" in r) for r in json.loads("[" + ",".join(
        (tmp_path / "metrics.jsonl").read_text().splitlines()) + "]")]
    assert steps == [(0, True), (2, False), (2, True), (4, False), (4, True)]
