"""minidpo explain: the page's numbers are the library's for one real DPO step, its page is
self-contained and readable, and `minidpo explain` reports bad input in one line.

The small default model is trained once per test session (tests/conftest.py's explain_run, about
10 s on 2 cores). tests/test_explain_browser.py loads the page in headless Chromium."""

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from minidpo import explain as ex
from minidpo import runtime
from minidpo.cli import load_model, main
from minidpo.data import read_preferences
from tests.conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def run_dir(explain_run):
    """The default small model (explain.tiny_run), trained once per session (tests/conftest.py)."""
    return explain_run


def test_the_small_model_records_its_tokenizer_as_the_command_does(run_dir):
    from minidpo.cli import tokenizer_fingerprint
    from minidpo.tokenizer import BPETokenizer

    want = tokenizer_fingerprint(BPETokenizer.load(run_dir / "tokenizer.json"))
    for stage in ("sft", "dpo_beta0.1"):
        state = json.loads((run_dir / stage / "checkpoint" / "trainer_state.json").read_text())
        assert state["config"]["inputs"]["tokenizer"] == want, stage


@pytest.fixture(scope="module")
def models(run_dir):
    reference, config, tokenizer = load_model(run_dir / "sft", "cpu")
    policy, _, _ = load_model(run_dir / "dpo_beta0.1", "cpu")
    return policy, reference, config, tokenizer


@pytest.fixture(scope="module")
def pairs(run_dir, models):
    tokenizer, n_ctx = models[3], models[2].n_ctx
    examples = read_preferences(run_dir / "pairs_eval.jsonl")[:8]
    return [ex.tokenize_pair(tokenizer, e.prompt, e.chosen, e.rejected, n_ctx, e.source) for e in examples]


@pytest.fixture(scope="module")
def expl(models, pairs):
    policy, reference, config, tokenizer = models
    with runtime.use_threads(1):
        return ex.explain_step(policy, reference, config, tokenizer, pairs, beta=0.1, lr=5e-4,
                               bandit=ex.bandit_world(seed=0), meta={"policy_steps": 30})


def load_bandit():
    spec = importlib.util.spec_from_file_location("bandit_example", ROOT / "examples" / "bandit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------ the numbers


def test_log_probs_rewards_loss_and_weight_are_the_librarys(models, pairs, expl):
    """Every pair's log-probs, recomputed on the PADDED layout (another batch than the step's) by
    scoring.batched_sequence_logps, and losses.dpo_loss of them: the page's numbers."""
    from minidpo.losses import dpo_loss
    from minidpo.packing import Batcher
    from minidpo.scoring import batched_sequence_logps

    policy, reference, config, tokenizer = models
    padded = Batcher(tokenizer.pad_id, share_prompt=False, pack=False)
    pc, pr = batched_sequence_logps(policy, config, pairs, padded, 3)
    rc, rr = batched_sequence_logps(reference, config, pairs, padded, 3)
    out = dpo_loss(pc.astype(np.float64), pr.astype(np.float64), rc.astype(np.float64), rr.astype(np.float64), beta=0.1)
    P = expl.data["pairs"]
    assert len(P) == 8
    got = lambda f: np.array([f(p) for p in P])  # noqa: E731
    np.testing.assert_allclose(got(lambda p: p["chosen"]["logp"]), pc, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got(lambda p: p["rejected"]["logp"]), pr, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got(lambda p: p["chosen"]["ref_logp"]), rc, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got(lambda p: p["rejected"]["ref_logp"]), rr, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got(lambda p: p["chosen"]["reward"]), out.chosen_rewards, atol=5e-5)
    np.testing.assert_allclose(got(lambda p: p["rejected"]["reward"]), out.rejected_rewards, atol=5e-5)
    np.testing.assert_allclose(got(lambda p: p["margin"]), out.chosen_rewards - out.rejected_rewards, atol=5e-5)
    np.testing.assert_allclose(got(lambda p: p["loss"]), out.losses, atol=5e-5)
    np.testing.assert_allclose(got(lambda p: p["weight"]), out.gradient_weight, atol=5e-5)
    assert expl.data["step"]["loss"] == pytest.approx(float(np.mean(out.losses)), abs=5e-5)
    # eq. 7's sum: the per-token log-probs add up to log pi(y|x); the loss mask is 1 on every response token
    for p in P:
        for s in ("chosen", "rejected"):
            assert sum(p[s]["tokens"]["logp"]) == pytest.approx(p[s]["logp"], abs=1e-4)
            assert sum(p[s]["tokens"]["ref_logp"]) == pytest.approx(p[s]["ref_logp"], abs=1e-4)
            assert p[s]["mask"] == [1.0] * len(p[s]["ids"])
        # eq. 9 on the two sums: -/+ beta * weight / N
        assert p["chosen"]["grad_logp"] == pytest.approx(-0.1 * p["weight"] / 8, rel=1e-5)
        assert p["rejected"]["grad_logp"] == pytest.approx(0.1 * p["weight"] / 8, rel=1e-5)
    # this policy has taken DPO steps: the weights are spread, and the batch holds a pair ranked wrongly
    weights = got(lambda p: p["weight"])
    assert weights.max() > 0.5 > weights.min() and weights.max() - weights.min() > 0.1


def test_the_gradient_on_each_tokens_logits_is_eq9_carried_through_the_softmax(models, pairs, expl):
    """dL/dz_k = dL/dlog pi(y|x) (onehot(y_k) - softmax(z_k)): its norm and its entry at y_k, from
    the logits of a plain causal forward of [x | y] (no batch layout), against the page's."""
    from minidpo.logprobs import log_softmax
    from minidpo.model import gpt_forward

    policy, _, config, _ = models
    for i in (0, 3):
        p, item = pairs[i], expl.data["pairs"][i]
        for side, ids in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            seq = np.array([list(p.prompt_ids) + list(ids)])
            logits, _ = gpt_forward(policy, seq, config, keep_cache=False)  # (1, T, V)
            P = len(p.prompt_ids)
            probs = np.exp(log_softmax(logits[0, P - 1:P - 1 + len(ids)].astype(np.float64)))  # (n, V)
            onehot = np.eye(probs.shape[1])[ids]
            g = item[side]["grad_logp"]
            np.testing.assert_allclose(item[side]["tokens"]["grad_row"], abs(g) * np.linalg.norm(onehot - probs, axis=1),
                                       rtol=2e-4)
            np.testing.assert_allclose(item[side]["tokens"]["grad_label"], g * (1 - probs[np.arange(len(ids)), ids]),
                                       rtol=2e-4)
            direction = np.sign(item[side]["tokens"]["grad_label"])
            assert (direction == (-1 if side == "chosen" else 1)).all()  # descent: chosen tokens up, rejected down


def test_the_step_is_train_dpo_step_then_adamw(run_dir, models, pairs, expl):
    """The optimizer step redone with the trainer's own train.dpo_step (fast path), clipping and
    AdamW: the updated policy's log-probs are the page's 'after' numbers."""
    from minidpo.optim import AdamW, clip_grad_norm
    from minidpo.scoring import batched_sequence_logps
    from minidpo.train import TrainConfig, batcher_for, dpo_step

    policy, reference, config, tokenizer = models
    tc = TrainConfig(steps=1, batch_size=8, lr=5e-4, warmup_steps=0, beta=0.1, progress=False)
    batcher = batcher_for(tc, tokenizer.pad_id, "cpu")
    rc, rr = batched_sequence_logps(reference, config, pairs, batcher, 8)
    loss, _, grads = dpo_step(policy, config, batcher.pairs(pairs), rc, rr, tc)
    step = expl.data["step"]
    assert float(loss) == pytest.approx(step["loss"], abs=1e-5)
    assert step["grad_norm"] == pytest.approx(float(clip_grad_norm(grads, tc.grad_clip)), rel=1e-4)
    assert step["clipped"] == (step["grad_norm"] > 1.0)
    after = {k: v.copy() for k, v in policy.items()}
    AdamW(after, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay).step(after, grads, lr=tc.lr)
    assert step["update"] == pytest.approx(max(float(np.abs(after[k] - policy[k]).max()) for k in policy), rel=1e-3)
    ac, ar = batched_sequence_logps(after, config, pairs, batcher, 8)
    P = expl.data["pairs"]
    np.testing.assert_allclose([p["chosen"]["logp_after"] for p in P], ac, atol=2e-3)
    np.testing.assert_allclose([p["rejected"]["logp_after"] for p in P], ar, atol=2e-3)
    for p in P:
        for s in ("chosen", "rejected"):
            assert p[s]["delta"] == pytest.approx(p[s]["logp_after"] - p[s]["logp"])
            assert sum(p[s]["tokens"]["logp_after"]) == pytest.approx(p[s]["logp_after"], abs=1e-4)
    # the page's own check of train.dpo_step: float32 round-off
    assert step["check"]["loss_abs_diff"] < 1e-5 and step["check"]["grad_rel_diff"] < 1e-4
    # the policy the page explains is left as it was
    on_disk, _, _ = load_model(run_dir / "dpo_beta0.1", "cpu")
    assert all(np.array_equal(policy[k], on_disk[k]) for k in policy)
    # the step lowered the batch's loss, and the margin of most pairs grew
    assert step["loss_after"] < step["loss"]
    assert sum(p["margin_after"] > p["margin"] for p in P) >= 6


def test_at_the_reference_every_reward_is_zero_and_every_weight_one_half(models, pairs):
    policy, reference, config, tokenizer = models
    e = ex.explain_step(reference, reference, config, tokenizer, pairs[:3], beta=0.3, lr=1e-5)
    for p in e.data["pairs"]:
        assert p["chosen"]["reward"] == 0.0 and p["rejected"]["reward"] == 0.0
        assert p["weight"] == pytest.approx(0.5) and p["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert p["chosen"]["grad_logp"] == pytest.approx(-0.3 * 0.5 / 3)


@requires_cuda
def test_the_step_on_the_gpu_path_gives_the_cpu_numbers(models, pairs):
    """explain_step with CuPy arrays (a GPU, or the strict stand-in): the same page data."""
    from minidpo.backend import get_backend

    policy, reference, config, tokenizer = models
    be = get_backend("cuda")
    dev = {k: be.asarray(v) for k, v in policy.items()}
    dref = {k: be.asarray(v) for k, v in reference.items()}
    gpu = ex.explain_step(dev, dref, config, tokenizer, pairs[:3], beta=0.1, lr=5e-4, backend=be).data
    cpu = ex.explain_step(policy, reference, config, tokenizer, pairs[:3], beta=0.1, lr=5e-4).data
    json.dumps(gpu, allow_nan=False)  # plain host numbers, no device arrays
    for i in range(3):
        for s in ("chosen", "rejected"):
            for f in ("logp", "ref_logp", "logp_after", "reward", "grad_logp"):
                assert gpu["pairs"][i][s][f] == pytest.approx(cpu["pairs"][i][s][f], rel=1e-4, abs=1e-4), (i, s, f)
            np.testing.assert_allclose(gpu["pairs"][i][s]["tokens"]["grad_row"], cpu["pairs"][i][s]["tokens"]["grad_row"],
                                       rtol=1e-4)
        assert gpu["pairs"][i]["weight"] == pytest.approx(cpu["pairs"][i]["weight"], abs=1e-5)
    assert gpu["step"]["grad_norm"] == pytest.approx(cpu["step"]["grad_norm"], rel=1e-4)
    assert gpu["meta"]["device"] != cpu["meta"]["device"]


def test_the_tabular_world_is_bandit_pys(expl):
    """bandit_world's world and both trainings equal examples/bandit.py's functions; exact
    expected preferences reach eq. 4 and the reward (beta log Z(x) added back) to rounding."""
    from minidpo.theory import log_partition, optimal_policy, preference_distribution

    bandit = load_bandit()
    B = expl.data["bandit"]
    rng = np.random.default_rng(0)
    reward, log_ref = bandit.make_world(rng, 3, 5, 1.0)
    np.testing.assert_array_equal(B["reward"], reward)
    np.testing.assert_array_equal(B["log_pi_ref"], log_ref)
    np.testing.assert_allclose(B["log_pi_opt"], optimal_policy(reward, log_ref, 0.5), atol=1e-12)
    np.testing.assert_allclose(B["beta_log_Z"], 0.5 * log_partition(reward, log_ref, 0.5), atol=1e-12)
    x, yw, yl = bandit.sample_preferences(rng, reward, B["n_pairs"])
    W_emp = bandit.empirical_weights(x, yw, yl, reward.shape)
    sampled, _ = bandit.train_on_samples(x, yw, yl, log_ref, 0.5, B["steps"], bandit.step_size(W_emp, 0.5))
    np.testing.assert_allclose(B["sampled"]["log_pi"], sampled, atol=1e-9)
    W = preference_distribution(reward)
    exact, _ = bandit.train_on_expectation(W, log_ref, 0.5, B["steps"], bandit.step_size(W, 0.5))
    np.testing.assert_allclose(B["exact"]["log_pi"], exact, atol=1e-9)
    assert B["exact"]["policy_gap"] < 1e-8 and B["exact"]["reward_gap"] < 1e-8
    np.testing.assert_allclose(B["exact"]["recovered"], reward, atol=1e-8)  # eq. 5: r = r_hat + beta log Z(x)
    assert 1e-3 < B["sampled"]["policy_gap"] < 2 and 1e-3 < B["sampled"]["reward_gap"] < 1  # finite data: close, not exact


# ------------------------------------------------------------------------------------ the page


def embedded_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, flags=re.S)
    return json.loads(m.group(1))


def test_the_page_is_one_self_contained_file_under_300_kb(expl):
    html = ex.render_html(expl)
    weight = ex.page_weight(html)
    assert weight < 300 * 1024, weight
    data = embedded_data(html)
    assert data["meta"]["page_kb"] == f"{weight / 1024:.0f}"  # the weight the page states is its own
    # the embedded data are the Explanation's, to float32 precision (9 significant digits)
    assert data["pairs"][2]["chosen"]["tokens"]["logp"] == pytest.approx(expl.value("pairs.2.chosen.tokens.logp"), rel=1e-8)
    assert data["step"]["slider_betas"] == sorted(set(ex.SLIDER_BETAS) | {0.1})
    # nothing is fetched: no external scripts, styles, images, fonts or frames
    assert not re.search(r"<(script|img|iframe|link|source|video|audio)[^>]*\s(src|href)=\"(?!data:)", html.replace(
        '<a href="https://arxiv.org/abs/2305.18290">', "")), "a resource the page would fetch"
    assert "@import" not in html and "url(" not in html
    assert html.count("<script") == 2  # the data and the inline script
    # the inline script draws with SVG and a real range input with a label
    assert 'type="range"' in html and '<label for="beta">' in html and "createElementNS" in html
    assert "@media print" in html


def test_text_from_the_data_cannot_end_the_script(expl):
    data = json.loads(expl.to_json())
    data["pairs"][0]["prompt"]["text"][0] = "</script><script>alert(1)</script><!--"
    html = ex.render_html(ex.Explanation(data))
    inner = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, flags=re.S).group(1)
    assert "</" not in inner and "<!--" not in inner
    assert json.loads(inner)["pairs"][0]["prompt"]["text"][0] == "</script><script>alert(1)</script><!--"


def _luminance(hex_colour: str) -> float:
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    """WCAG 2.1 contrast ratio (L1 + 0.05) / (L2 + 0.05)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_contrast_ratios_of_the_palette():
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)  # the formula itself
    assert contrast("#767676", "#ffffff") == pytest.approx(4.54, abs=0.01)
    P = ex.PALETTE
    for text in ex.TEXT_COLOURS:  # text: WCAG AA, 4.5 on every background it is drawn on
        for bg in ex.BACKGROUNDS:
            assert contrast(P[text], P[bg]) >= 4.5, (text, bg, contrast(P[text], P[bg]))
    for g in ex.GRAPHIC_COLOURS:  # bars, lines, markers: 3 against the page and the panels (WCAG 1.4.11)
        for bg in ("bg", "panel"):
            assert contrast(P[g], P[bg]) >= 3.0, (g, bg)
    # the chosen and the rejected colours tell the two responses apart by more than hue alone
    assert P["chosen"] != P["rejected"]
    assert set(ex.PALETTE) >= set(ex.TEXT_COLOURS) | set(ex.BACKGROUNDS) | set(ex.GRAPHIC_COLOURS)
    css = ex.palette_css()
    assert all(f"--{k}: {v};" in css for k, v in P.items())


def test_the_page_is_written_atomically(tmp_path, monkeypatch):
    page = tmp_path / "sub" / "page.html"
    ex.write_page(page, "<p>first</p>")
    assert page.read_text() == "<p>first</p>"

    def fails(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError, match="page.html"):
        ex.write_page(page, "<p>second</p>")
    assert page.read_text() == "<p>first</p>"  # the old page is intact ...
    assert sorted(p.name for p in page.parent.iterdir()) == ["page.html"]  # ... and no temporary file is left
    monkeypatch.undo()
    with pytest.raises(ex.ExplainError, match="is a folder"):
        ex.write_page(tmp_path, "<p/>")


def test_a_pair_that_tokenizes_to_nothing_or_to_twins_is_refused(models):
    tokenizer = models[3]
    with pytest.raises(ex.ExplainError, match=r"pairs.jsonl:7: the rejected response '' tokenizes to nothing"):
        ex.tokenize_pair(tokenizer, "the film", " was good.", "", 64, "pairs.jsonl:7")
    with pytest.raises(ex.ExplainError, match="identical after tokenization and truncation to 5 tokens"):
        ex.tokenize_pair(tokenizer, "the film", " was good and long", " was good and short", 5, "x")
    p = ex.tokenize_pair(tokenizer, "the film", " was good.", " was bad.", 64)
    assert p.chosen_ids[-1] == tokenizer.eos_id and tokenizer.decode(p.chosen_ids) == " was good."


# ------------------------------------------------------------------------------------ the command


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_the_command_writes_the_page_of_explain_step(run_dir, models, pairs, expl, tmp_path, capsys):
    page = tmp_path / "page.html"
    code, out, err = run_cli(["explain", run_dir, "--out", page], capsys)
    assert code == 0, err
    assert f"wrote {page}" in out and "8 pairs at beta 0.1, lr 0.0005" in out
    data = embedded_data(page.read_text(encoding="utf-8"))
    # RUN's pairs_eval.jsonl, the DPO run's beta and lr, the same numbers as explain_step above
    assert data["meta"]["policy_steps"] == 30 and data["meta"]["beta_from"] == "the policy's run"
    for key in ("step.loss", "step.loss_after", "pairs.0.chosen.logp", "pairs.5.weight", "pairs.7.rejected.delta",
                "pairs.1.chosen.tokens.grad_row.2", "bandit.exact.log_pi.1.3"):
        want = expl.value(key)
        got = ex.Explanation(data).value(key)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), key
    assert not list(tmp_path.glob(".*tmp*"))
    # --index picks the pair followed token by token; a pair typed in comes first
    code, out, _ = run_cli(["explain", run_dir, "--index", 3, "--batch-size", 2, "--out", page, "--no-bandit"], capsys)
    d = embedded_data(page.read_text(encoding="utf-8"))
    assert code == 0 and d["pairs"][0]["source"].endswith("pairs_eval.jsonl:4") and len(d["pairs"]) == 2 and d["bandit"] is None
    code, out, _ = run_cli(["explain", run_dir, "--prompt", "the film", "--chosen", " was great.", "--rejected",
                            " was awful.", "--beta", 0.5, "--lr", 1e-4, "--out", page, "--no-bandit"], capsys)
    d = embedded_data(page.read_text(encoding="utf-8"))
    assert code == 0 and len(d["pairs"]) == 1 and d["step"]["beta"] == 0.5 and d["step"]["lr"] == 1e-4
    assert "".join(d["pairs"][0]["chosen"]["text"]) == " was great.<|endoftext|>"
    # without RUN: the small model of --tiny-dir (trained first when missing; here it is finished, and reused)
    code, out, err = run_cli(["explain", "--tiny-dir", run_dir, "--batch-size", 2, "--out", page, "--no-bandit",
                              "--no-progress"], capsys)
    assert code == 0 and "[sft] already complete" in out and "[dpo] already complete" in out, err
    assert embedded_data(page.read_text(encoding="utf-8"))["meta"]["data"] == str(run_dir / "pairs_eval.jsonl")
    # a single model folder with --ref
    code, out, err = run_cli(["explain", run_dir / "dpo_beta0.1", "--ref", run_dir / "sft", "--data",
                              run_dir / "pairs_eval.jsonl", "--batch-size", 2, "--out", page, "--no-bandit"], capsys)
    assert code == 0, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    page = tmp_path / "p.html"
    n = len(read_preferences(run_dir / "pairs_eval.jsonl"))
    code, _, err = run_cli(["explain", run_dir, "--index", n, "--out", page], capsys)
    assert code == 2 and re.search(rf"--index {n} is out of range: .*pairs_eval.jsonl has {n} preference pairs "
                                   rf"\(indices 0 to {n - 1}\)", _one_line(err))
    code, _, err = run_cli(["explain", tmp_path / "nowhere", "--out", page], capsys)
    assert code == 1 and "nowhere: no such run folder" in _one_line(err)
    code, _, err = run_cli(["explain", run_dir, "--prompt", "the film", "--chosen", "", "--rejected", " bad.",
                            "--out", page], capsys)
    assert code == 1 and "--prompt/--chosen/--rejected: the chosen response '' tokenizes to nothing" in _one_line(err)
    code, _, err = run_cli(["explain", run_dir, "--prompt", "the film", "--chosen", " good.", "--out", page], capsys)
    assert code == 2 and "give --prompt, --chosen and --rejected together" in _one_line(err)
    code, _, err = run_cli(["explain", run_dir / "dpo_beta0.1", "--out", page], capsys)
    assert code == 2 and "give its reference with --ref" in _one_line(err)
    code, _, err = run_cli(["explain", run_dir, "--out", tmp_path], capsys)
    assert code == 1 and "is a folder" in _one_line(err)
    code, _, err = run_cli(["explain", run_dir / "sft", "--ref", run_dir / "sft", "--out", page], capsys)
    assert code == 2 and "--data FILE" in _one_line(err)  # no pairs given, none beside the model
    assert not page.exists()


def test_missing_run_folder_files_are_named(run_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "dpo_beta0.1" / "checkpoint" / "model.safetensors").unlink()
    code, _, err = run_cli(["explain", broken, "--out", tmp_path / "p.html"], capsys)
    assert code == 1 and "model.safetensors" in _one_line(err)
    shutil.rmtree(broken / "dpo_beta0.1")
    shutil.copytree(run_dir / "dpo_beta0.1", broken / "dpo_beta0.05")
    shutil.copytree(run_dir / "dpo_beta0.1", broken / "dpo_beta0.1")
    code, _, err = run_cli(["explain", broken, "--out", tmp_path / "p.html"], capsys)
    assert code == 2 and "2 policies (dpo_beta0.05, dpo_beta0.1): choose one with --beta" in _one_line(err)
    (broken / "tokenizer.json").unlink()
    code, _, err = run_cli(["explain", broken, "--beta", 0.05, "--out", tmp_path / "p.html"], capsys)
    assert code == 1 and "no tokenizer.json" in _one_line(err)
    assert not (tmp_path / "p.html").exists()


def test_the_example_script_runs_on_the_trained_model(run_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("explain_example", ROOT / "examples" / "explain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    page = mod.main(["--out-dir", str(run_dir), "--page", str(tmp_path / "e.html"), "--index", "2", "--batch-size", "3"])
    d = embedded_data(page.read_text(encoding="utf-8"))
    assert len(d["pairs"]) == 3 and d["pairs"][0]["source"].endswith(":3") and d["bandit"]["X"] == 3
    assert "already complete" in capsys.readouterr().out  # the folder's finished stages were reused
