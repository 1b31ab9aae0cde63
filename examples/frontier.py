"""The paper's sentiment frontier (Fig. 2, left), with its baselines, in miniature.

    python examples/frontier.py                    # the default grid, about 30 minutes on 2 CPU cores
    python examples/frontier.py --quick            # a smoke test of the pipeline, seconds (runs/frontier-quick)
    python examples/frontier.py --device cuda      # the same on a GPU

One shared SFT model (pi_ref) and one shared preference set (pairs of SFT samples labelled by the
ground-truth reward, VADER's sentiment score, as examples/train_tiny.py makes them), then every
method of the paper's comparison, each a point (KL(pi || pi_ref), mean ground-truth reward):

  SFT           pi_ref itself (KL 0)
  DPO           eq. (7) on the preference set, a grid of beta
  Online DPO    the same number of pairs and steps, but in rounds of fresh pairs sampled from the
                current policy and labelled by the ground truth (reference: pi_ref)
  PPO           RLHF: a reward model (eq. 2) fit to the preference set, then PPO on eq. (3) with
                per-token KL penalty beta_KL, a grid of beta_KL and learning rates
  PPO-GT        the same PPO with the ground-truth reward in place of the reward model
  Preferred-FT  SFT of pi_ref on the chosen responses
  Unlikelihood  likelihood of chosen, unlikelihood (coefficient alpha) of rejected responses
  Best-of-N     N samples from pi_ref, the reward model keeps one; KL = log N - (N - 1)/N

Every policy is evaluated on the same held-out prompts with the same sampling seed: mean
ground-truth reward of its samples (standard error over samples) and KL(pi || pi_ref) estimated
from them (standard error likewise; Best-of-N's KL is the analytic value, standard error 0).

Output in --out (default runs/frontier, runs/frontier-quick with --quick): run.json (the options),
tokenizer.json, sft/, pairs_*.jsonl with pairs.json (the SFT model they were sampled from),
reward_model/, one record per finished run in records/, frontier.json (every run: method,
setting, reward +- se, KL +- se, wall time) and frontier.png (every method's points with error
bars and its upper frontier).

Re-running with the same --out resumes: the SFT model continues from its checkpoint, and a
finished run is skipped. Each stage records what it was built from (the pairs the SFT model's
fingerprint, the reward model and every record the SFT model's, the pairs' and the reward
model's), and is rebuilt when that differs, so nothing built from an unfinished or replaced
stage is kept. Ctrl-C exits with status 130 (in SFT after saving a checkpoint; an interrupted
run is redone from its start) and runs nothing after it. Another --seed or --quick on an existing
--out stops with the difference named (use another --out, or --overwrite).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from minidpo.backend import DeviceError, get_backend, parse_device
from minidpo.baselines import (
    best_of_n_kl,
    best_of_n_select,
    online_dpo,
    optimize,
    preferred_ft_step,
    unlikelihood_step,
)
from minidpo.checkpoint import atomic_write_text, has_checkpoint, load_checkpoint, save_checkpoint
from minidpo.cli import ArgumentParser
from minidpo.data import PreferenceExample, TokenizedSFT, build_preference_dataset, build_sft_dataset
from minidpo.evaluate import kl_from_samples, mean_and_stderr, sample_continuations
from minidpo.model import GPTConfig, init_params, num_params
from minidpo.ppo import PPOConfig, add_value_head, train_ppo
from minidpo.reward_model import init_reward_model, pair_accuracy, pearson, reward_model_step, score_batch, score_pairs
from minidpo.reward_model import split_head
from minidpo.tasks import sentiment
from minidpo.tokenizer import BPETokenizer
from minidpo.packing import Batcher
from minidpo.scoring import batched_sequence_logps
from minidpo.train import (TrainConfig, check_run_options, dpo_step, fingerprint, interrupt_hook, run_lock,
                           train_sft)

# Sizes. "default" fits in about 30 minutes on 2 shared CPU cores; "quick" in under 2 minutes.
PRESETS = {
    "default": dict(
        n_reviews=4000, vocab=384, n_layer=2, n_head=4, n_embd=128, n_ctx=48, sft_steps=800, sft_batch=32,
        sft_lr=3e-3, n_train_prompts=1024, n_eval_prompts=256, n_eval_samples=2, max_new_tokens=24,
        rm_steps=200, rm_lr=3e-4, batch=16, lr=1e-4, steps=128,
        dpo_betas=[0.03, 0.1, 0.3, 1.0, 3.0], online_betas=[0.1, 0.3, 1.0], online_rounds=4,
        ppo_grid=[(k, l) for l in (3e-5, 1e-4) for k in (0.03, 0.1, 0.3, 1.0)], ppo_iterations=16,
        ppo_rollout=64, ppo_epochs=2, pft_lrs=[3e-5, 1e-4, 3e-4], ul_alphas=[0.1, 0.5, 1.0],
        bon_ns=[2, 4, 8, 16, 32],
    ),
    "quick": dict(
        n_reviews=800, vocab=320, n_layer=1, n_head=2, n_embd=48, n_ctx=40, sft_steps=150, sft_batch=32,
        sft_lr=3e-3, n_train_prompts=160, n_eval_prompts=32, n_eval_samples=2, max_new_tokens=16,
        rm_steps=30, rm_lr=1e-3, batch=8, lr=3e-4, steps=16,
        dpo_betas=[0.1, 1.0], online_betas=[0.1], online_rounds=2,
        ppo_grid=[(0.1, 3e-4)], ppo_iterations=3, ppo_rollout=16,
        ppo_epochs=1, pft_lrs=[3e-4], ul_alphas=[0.5], bon_ns=[2, 4],
    ),
}

# options that change the results, recorded in --out/run.json; what this script writes in --out
RESULT_OPTIONS = ("quick", "seed")
OUTPUTS = ("tokenizer.json", "tokenizer_config.json", "sft", "pairs_train.jsonl", "pairs_eval.jsonl", "pairs.json",
           "reward_model", "records", "frontier.json", "frontier.md", "frontier.png")
SMOKE_TEST = ("quick preset: a smoke test of the pipeline on tiny data and a few steps; its numbers are not results "
              "(run without --quick for those)")

METHODS = ["SFT", "DPO", "Online DPO", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood", "Best-of-N"]
STYLE = {"SFT": ("gray", "s"), "DPO": ("C0", "o"), "Online DPO": ("C9", "D"), "PPO": ("C1", "^"),
         "PPO-GT": ("C3", "v"), "Preferred-FT": ("C2", "P"), "Unlikelihood": ("C4", "X"), "Best-of-N": ("C5", "*")}


def parse_args(argv=None):
    p = ArgumentParser(prog="frontier.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda / cuda:N (CuPy)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/frontier, runs/frontier-quick with --quick); re-use it to resume")
    p.add_argument("--overwrite", action="store_true", help="discard a run with other options already in --out")
    p.add_argument("--quick", action="store_true", help="a smoke test: a tiny grid that finishes in seconds on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, the models, the batches and the sampling")
    p.add_argument("--only", default=None, help="comma-separated methods to run (default: all), e.g. DPO,PPO")
    p.add_argument("--threads", type=int, default=1, help="CPU BLAS threads (0 = the library default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = p.parse_args(argv)
    for name in ("threads", "seed"):
        if getattr(args, name) < 0:
            p.error(f"argument --{name}: must be >= 0, got {getattr(args, name)}")
    try:
        parse_device(args.device)
    except ValueError as err:
        p.error(f"argument --device: {err}")
    only = {m.strip() for m in args.only.split(",")} if args.only else None
    if only and not only <= set(METHODS):
        p.error(f"argument --only: unknown methods {sorted(only - set(METHODS))}; known: {', '.join(METHODS)}")
    args.only = only
    if args.out is None:
        args.out = str(Path("runs") / ("frontier-quick" if args.quick else "frontier"))
    return args


T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    """Atomic write: a half-written file never replaces a good one."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def seconds(s: float) -> str:
    """A wall time in seconds for the log and the tables: '0.4' below 10 s (not '0'), '25' above."""
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def main(argv=None) -> dict | None:
    """Run the comparison; the summary dict, or None when an interrupt stopped SFT (a checkpoint
    was saved: the same command resumes)."""
    args = parse_args(argv)
    if args.threads > 0:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.threads, user_api="blas"):
            return run(args)
    return run(args)


# ---------------------------------------------------------------------------------------------
# the upper frontier and the dominance read-out
# ---------------------------------------------------------------------------------------------


def upper_frontier(points: list[dict]) -> list[dict]:
    """The points no other point of the list beats on both axes (lower or equal KL, higher
    reward), sorted by KL: the method's reward-vs-KL frontier."""
    pts = sorted(points, key=lambda p: (p["kl"], -p["reward_mean"]))
    out, best = [], -math.inf
    for p in pts:
        if p["reward_mean"] > best:
            out.append(p)
            best = p["reward_mean"]
    return out


def frontier_at(frontier: list[dict], kl: float) -> float:
    """The best reward a method reaches at KL <= kl (-inf if none of its points is that close)."""
    vals = [p["reward_mean"] for p in frontier if p["kl"] <= kl]
    return max(vals) if vals else -math.inf


def compare(records: list[dict], a: str, b: str) -> dict:
    """Does method a's frontier lie above method b's points? For each point of b: the best reward
    among a's own points at no more KL (SFT not counted), the difference and its standard error
    (the two standard errors combined), and whether |difference| > 2 standard errors. Counts:
    b's points beaten by a, beating a, beaten/beating by more than 2 standard errors, and with
    no point of a at that little KL."""
    fa = [r for r in records if r["method"] == a]
    rows = []
    for p in sorted((r for r in records if r["method"] == b), key=lambda r: r["kl"]):
        cands = [q for q in fa if q["kl"] <= p["kl"]]
        row = {"setting": p["setting"], "kl": p["kl"], "reward": p["reward_mean"], "reward_se": p["reward_se"]}
        if cands:
            q = max(cands, key=lambda q: q["reward_mean"])
            diff = q["reward_mean"] - p["reward_mean"]
            se = math.hypot(q["reward_se"], p["reward_se"])
            row.update({"a_setting": q["setting"], "a_kl": q["kl"], "a_reward": q["reward_mean"], "diff": diff,
                        "diff_se": se})
        rows.append(row)
    cmp_rows = [r for r in rows if "diff" in r]
    return {
        "a": a, "b": b, "points": rows,
        "b_points": len(rows),
        "no_a_point_at_that_kl": len(rows) - len(cmp_rows),
        "a_higher": sum(r["diff"] > 0 for r in cmp_rows),
        "b_higher": sum(r["diff"] <= 0 for r in cmp_rows),
        "a_higher_by_2se": sum(r["diff"] > 2 * r["diff_se"] for r in cmp_rows),
        "b_higher_by_2se": sum(-r["diff"] > 2 * r["diff_se"] for r in cmp_rows),
    }


def describe(c: dict) -> str:
    return (f"{c['b']}'s {c['b_points']} point{'s' if c['b_points'] != 1 else ''} vs {c['a']}'s best at no more KL: "
            f"{c['a']} higher at "
            f"{c['a_higher']} ({c['a_higher_by_2se']} by > 2 s.e.), {c['b']} higher at {c['b_higher']} "
            f"({c['b_higher_by_2se']} by > 2 s.e.), no {c['a']} point at that little KL for "
            f"{c['no_a_point_at_that_kl']}")


def plot_frontier(records: list[dict], out_png: Path, title: str) -> Path:
    """Every method's points (error bars: one standard error each way) and its upper frontier.
    The KL axis ends past the furthest DPO / PPO point; points beyond it are listed in a note."""
    from minidpo.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    main = [r["kl"] for r in records if r["method"] in ("DPO", "Online DPO", "PPO", "PPO-GT", "Best-of-N")]
    x_max = 1.12 * max(main + [1.0])
    off = [r for r in records if r["kl"] > x_max]
    for method in METHODS:
        pts = [r for r in records if r["method"] == method]
        if not pts:
            continue
        color, marker = STYLE[method]
        ax.errorbar([p["kl"] for p in pts], [p["reward_mean"] for p in pts],
                    xerr=[p["kl_se"] for p in pts], yerr=[p["reward_se"] for p in pts],
                    fmt=marker, color=color, ms=7, capsize=2, alpha=0.9, label=method)
        if method != "SFT":
            front = upper_frontier(pts + [r for r in records if r["method"] == "SFT"])
            ax.plot([p["kl"] for p in front], [p["reward_mean"] for p in front], "-", color=color, lw=1.3, alpha=0.7)
    ax.set_xlim(-0.02 * x_max, x_max)
    if off:
        ax.text(0.99, 0.02, "off the chart:\n" + "\n".join(
            f"{r['method']} {r['setting']}: KL {r['kl']:.1f}, reward {r['reward_mean']:+.3f}" for r in off),
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
            bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax.set_xlabel("KL(pi || pi_ref), nats per sample (from the policy's samples; Best-of-N: analytic)")
    ax.set_ylabel("mean ground-truth reward (VADER)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=90)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run(args) -> dict | None:
    preset = "quick" if args.quick else "default"
    cfg = PRESETS[preset]
    out = Path(args.out)
    with run_lock(out):  # one process at a time; run.json checked before anything is written
        check_run_options(out, {k: getattr(args, k) for k in RESULT_OPTIONS}, args.overwrite, OUTPUTS)
        return _run(args, preset, cfg, out)


def _run(args, preset: str, cfg: dict, out: Path) -> dict | None:
    (out / "records").mkdir(parents=True, exist_ok=True)
    backend = get_backend(args.device)
    only = args.only
    progress = not args.no_progress
    log(f"sentiment frontier: preset={preset} device={backend.device} out={out}")
    if args.quick:
        log(SMOKE_TEST)

    # 1. corpus, tokenizer, SFT = pi_ref --------------------------------------------------------
    corpus = sentiment.sft_corpus(cfg["n_reviews"], seed=args.seed)
    reward_fn = sentiment.SentimentReward()
    tok_path = out / "tokenizer.json"
    if tok_path.exists():
        tokenizer = BPETokenizer.load(tok_path)
    else:
        tokenizer = BPETokenizer.train([p + c for p, c in corpus], vocab_size=cfg["vocab"])
        tokenizer.save(tok_path)
    mcfg = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=cfg["n_ctx"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"])
    batcher = Batcher(tokenizer.pad_id, backend=backend)  # every preference batch: shared prompts, packed rows
    sft_items, _ = build_sft_dataset(corpus, tokenizer, max_length=mcfg.n_ctx)
    sft_tc = TrainConfig(steps=cfg["sft_steps"], batch_size=cfg["sft_batch"], lr=cfg["sft_lr"], warmup_steps=20,
                         schedule="cosine", weight_decay=0.01, seed=args.seed, log_every=20,
                         eval_every=cfg["sft_steps"], save_every=max(cfg["sft_steps"] // 2, 1), progress=progress)
    reference = init_params(mcfg, backend, seed=args.seed)
    log(f"[1/4] SFT: GPT-2 {mcfg.n_layer} layers x {mcfg.n_embd} channels ({num_params(reference):,} params), "
        f"{len(sft_items)} reviews, {sft_tc.steps} steps")
    if train_sft(reference, mcfg, sft_items, tokenizer.pad_id, sft_tc, out / "sft", backend=backend).stopped_early:
        return None  # nothing is built from an unfinished pi_ref
    made_from = {"reference": fingerprint(reference)}  # what every later stage is built from, growing

    # 2. the shared preference set: SFT samples labelled by the ground truth ------------------
    rng = np.random.default_rng([args.seed, 4])
    gen_kw = dict(max_new_tokens=cfg["max_new_tokens"], temperature=1.0, backend=backend)

    def sampler(params):
        def sample_fn(prompts, n):
            s = sample_continuations(params, mcfg, tokenizer, prompts, n, rng=rng,
                                     on_batch=lambda: interrupt_hook("pairs"), **gen_kw)
            return [s.texts[i * n : (i + 1) * n] for i in range(len(prompts))]
        return sample_fn

    prompts_train = sentiment.make_prompts(cfg["n_train_prompts"], seed=args.seed + 1)
    prompts_eval = sentiment.make_prompts(cfg["n_eval_prompts"], seed=args.seed + 2)
    splits = {"train": prompts_train, "eval": prompts_eval}
    paths = {split: out / f"pairs_{split}.jsonl" for split in splits}
    meta = out / "pairs.json"  # written last: the pairs on disk are whole and sampled from this pi_ref
    if meta.exists() and json.loads(meta.read_text(encoding="utf-8")) == made_from and all(
            p.exists() for p in paths.values()):
        raw_pairs = {split: [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
                     for split, path in paths.items()}
    else:
        if meta.exists():
            log("    the pairs were sampled from another pi_ref: sampling them again")
            meta.unlink()
        raw_pairs = {}
        for split, prompts in splits.items():
            raw_pairs[split], _ = sentiment.build_preference_pairs(prompts, sampler(reference), reward_fn, n_samples=2,
                                                                   mode="argmax", rng=rng)
            atomic_write_text(paths[split], "".join(json.dumps(p) + "\n" for p in raw_pairs[split]))
        write_json(meta, made_from)
    pair_sets = {}
    for split, pairs in raw_pairs.items():
        examples = [PreferenceExample(p["prompt"], p["chosen"], p["rejected"], f"{paths[split].name}:{i + 1}")
                    for i, p in enumerate(pairs)]
        pair_sets[split], _ = build_preference_dataset(examples, tokenizer, max_length=mcfg.n_ctx,
                                                       max_prompt_length=mcfg.n_ctx // 2)
        log(f"[2/4] {'training' if split == 'train' else 'held-out'}: {len(pair_sets[split])} preference pairs from "
            f"{len(splits[split])} prompts -> {paths[split]}")
    train_pairs = pair_sets["train"]
    made_from["pairs"] = fingerprint(raw_pairs)

    # 3. the reward model (eq. 2) on the same pairs -------------------------------------------
    rm_dir = out / "reward_model"
    ck = load_checkpoint(rm_dir, backend=backend) if has_checkpoint(rm_dir) else None
    if ck is not None and ck.config.get("made_from") == made_from:
        rm = {k: backend.asarray(v) for k, v in ck.params.items()}
        rm_eval = ck.config["eval"]
    else:
        if ck is not None:
            log("    the reward model was trained on other pairs or from another pi_ref: training it again")
        t0 = time.perf_counter()
        rm = init_reward_model(reference, mcfg, seed=args.seed)

        def rm_step(p, idx):
            loss, _, grads = reward_model_step(p, mcfg, batcher.pairs([train_pairs[i] for i in idx]))
            return loss, grads

        optimize(rm, len(train_pairs), rm_step, cfg["rm_steps"], cfg["batch"], cfg["rm_lr"], seed=args.seed,
                 warmup_steps=10, weight_decay=0.0,
                 on_log=lambda s, l: log(f"    reward model step {s}/{cfg['rm_steps']}: eq. 2 loss {l:.4f}"),
                 log_every=max(cfg["rm_steps"] // 4, 1))
        ev = pair_sets["eval"]
        rw, rl = score_pairs(rm, mcfg, ev, tokenizer.pad_id, backend)
        gt = [raw_pairs["eval"][int(p.source.rsplit(":", 1)[1]) - 1] for p in ev]
        gt_all = np.array([g["chosen_reward"] for g in gt] + [g["rejected_reward"] for g in gt])
        rm_eval = {"heldout_pair_accuracy": pair_accuracy(rw, rl), "heldout_pairs": len(ev),
                   "pearson_with_ground_truth": pearson(np.concatenate([rw, rl]), gt_all),
                   "train_steps": cfg["rm_steps"], "time_s": round(time.perf_counter() - t0, 1)}
        save_checkpoint(rm_dir, rm, {"model": mcfg.to_dict(), "eval": rm_eval, "made_from": made_from},
                        step=cfg["rm_steps"])
    log(f"[3/4] reward model: held-out pair accuracy {rm_eval['heldout_pair_accuracy']:.3f} on "
        f"{rm_eval['heldout_pairs']} pairs, Pearson r with the ground truth {rm_eval['pearson_with_ground_truth']:.3f}"
        + (" (quick preset: a smoke test)" if args.quick else ""))
    made_from = dict(made_from, reward_model=fingerprint(rm))

    # 4. every method ----------------------------------------------------------------------------
    eval_seed = [args.seed, 5]
    n_eval = cfg["n_eval_samples"]

    def evaluate_policy(policy) -> dict:
        samples = sample_continuations(policy, mcfg, tokenizer, prompts_eval, n_eval,
                                       rng=np.random.default_rng(eval_seed), **gen_kw)
        interrupt_hook("evaluation")
        rewards = reward_fn([p + t for p, t in zip(samples.prompts, samples.texts)])
        kls = kl_from_samples(policy, reference, mcfg, samples, tokenizer.pad_id, backend=backend)
        r, r_se = mean_and_stderr(rewards)
        k, k_se = mean_and_stderr(kls)
        return {"reward_mean": r, "reward_se": r_se, "kl": k, "kl_se": k_se, "n_samples": len(rewards),
                "example": samples.texts[0]}

    def copy_ref():
        return {k: v.copy() for k, v in reference.items()}

    def rm_score(prompts, texts, items):
        return score_batch(rm, mcfg, items, tokenizer.pad_id, backend)

    def gt_score(prompts, texts, items):
        return reward_fn.score(prompts, texts)

    prompt_ids_train = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts_train]
    B, lr, steps = cfg["batch"], cfg["lr"], cfg["steps"]

    def dpo_tc(beta):
        return TrainConfig(steps=steps, batch_size=B, lr=lr, beta=beta, grad_clip=1.0, progress=False)

    def run_dpo(beta):
        policy = copy_ref()
        tc = dpo_tc(beta)
        ref_c, ref_r = batched_sequence_logps(reference, mcfg, train_pairs, batcher, 32)
        ref_c, ref_r = backend.asarray(ref_c, dtype=ref_c.dtype), backend.asarray(ref_r, dtype=ref_r.dtype)

        def step_fn(p, idx):
            batch = batcher.pairs([train_pairs[i] for i in idx])
            didx = backend.asarray(idx)
            loss, _, grads = dpo_step(p, mcfg, batch, ref_c[didx], ref_r[didx], tc)
            return loss, grads

        optimize(policy, len(train_pairs), step_fn, steps, B, lr, seed=args.seed, warmup_steps=10,
                 on_log=lambda s, l: log(f"    step {s}/{steps}: DPO loss {l:.4f}"), log_every=max(steps // 4, 1))
        return policy, {}

    def run_online_dpo(beta):
        policy = copy_ref()
        rounds = cfg["online_rounds"]
        label_rng = np.random.default_rng([args.seed, 7])

        def sample_fn(params, prompts, n):
            s = sample_continuations(params, mcfg, tokenizer, prompts, n, rng=label_rng, **gen_kw)
            return [s.texts[i * n : (i + 1) * n] for i in range(len(prompts))]

        def label_fn(prompts, sample):
            return sentiment.build_preference_pairs(prompts, sample, reward_fn, n_samples=2, mode="argmax",
                                                    rng=label_rng)

        hist = online_dpo(policy, reference, mcfg, tokenizer, prompts_train, sample_fn, label_fn, dpo_tc(beta),
                          rounds=rounds, prompts_per_round=len(prompts_train) // rounds,
                          steps_per_round=steps // rounds, backend=backend, seed=args.seed,
                          on_round=lambda r: log(f"    round {r['round']}/{rounds}: {r['pairs']} fresh pairs, "
                                                 f"mean sampled reward {r['mean_sample_reward']:+.3f}, "
                                                 f"DPO loss {r.get('dpo_loss') or float('nan'):.4f}"))
        return policy, {"rounds": hist}

    def run_ppo(kl_coef, plr, ground_truth):
        params = add_value_head(copy_ref(), mcfg)
        pc = PPOConfig(kl_coef=kl_coef, lr=plr, iterations=cfg["ppo_iterations"], rollout_batch=cfg["ppo_rollout"],
                       minibatch=B, epochs=cfg["ppo_epochs"], max_new_tokens=cfg["max_new_tokens"], seed=args.seed)
        every = max(pc.iterations // 4, 1)
        hist = train_ppo(params, reference, mcfg, prompt_ids_train, prompts_train,
                         gt_score if ground_truth else rm_score, tokenizer, pc, backend,
                         progress=lambda r: r["iteration"] % every == 0 and log(
                             f"    iteration {r['iteration']}/{pc.iterations}: score {r['score']:+.3f}, "
                             f"rollout KL {r['kl']:.3f}, clipfrac {r['clipfrac']:.3f}"))
        policy, _ = split_head(params, "value")
        return policy, {"ppo": pc.to_dict(), "last_iteration": hist[-1]}

    def run_pft(plr):
        policy = copy_ref()
        optimize(policy, len(train_pairs), lambda p, idx: preferred_ft_step(p, mcfg, train_pairs, idx,
                                                                            tokenizer.pad_id, backend),
                 steps, B, plr, seed=args.seed, warmup_steps=10,
                 on_log=lambda s, l: log(f"    step {s}/{steps}: NLL {l:.4f}"), log_every=max(steps // 4, 1))
        return policy, {}

    def run_ul(alpha):
        policy = copy_ref()

        def step_fn(p, idx):
            return unlikelihood_step(p, mcfg, batcher.pairs([train_pairs[i] for i in idx]), alpha)

        optimize(policy, len(train_pairs), step_fn, steps, B, lr, seed=args.seed, warmup_steps=10,
                 on_log=lambda s, l: log(f"    step {s}/{steps}: loss {l:.4f}"), log_every=max(steps // 4, 1))
        return policy, {}

    def run_bon(n):
        samples = sample_continuations(reference, mcfg, tokenizer, prompts_eval, n_eval * n,
                                       rng=np.random.default_rng([args.seed, 9, n]), **gen_kw)
        items = [TokenizedSFT(prompt_ids=list(p), response_ids=list(y)) for p, y in zip(samples.prompt_ids, samples.ids)]
        scores = score_batch(rm, mcfg, items, tokenizer.pad_id, backend).reshape(-1, n)  # (P * n_eval, N)
        pick = best_of_n_select(scores) + np.arange(scores.shape[0]) * n
        texts = [samples.prompts[i] + samples.texts[i] for i in pick]
        r, r_se = mean_and_stderr(reward_fn(texts))
        return None, {"reward_mean": r, "reward_se": r_se, "kl": best_of_n_kl(n), "kl_se": 0.0,
                      "kl_note": "analytic: log N - (N - 1)/N", "n_samples": len(texts),
                      "example": samples.texts[int(pick[0])]}

    jobs = [("SFT", "pi_ref", lambda: (reference, {}))]
    jobs += [("DPO", f"beta={b:g}", lambda b=b: run_dpo(b)) for b in cfg["dpo_betas"]]
    jobs += [("Online DPO", f"beta={b:g}", lambda b=b: run_online_dpo(b)) for b in cfg["online_betas"]]
    for gt in (False, True):
        jobs += [("PPO-GT" if gt else "PPO", f"beta_KL={k:g}, lr={l:g}", lambda k=k, l=l, gt=gt: run_ppo(k, l, gt))
                 for k, l in cfg["ppo_grid"]]
    jobs += [("Preferred-FT", f"lr={l:g}", lambda l=l: run_pft(l)) for l in cfg["pft_lrs"]]
    jobs += [("Unlikelihood", f"alpha={a:g}", lambda a=a: run_ul(a)) for a in cfg["ul_alphas"]]
    jobs += [("Best-of-N", f"N={n}", lambda n=n: run_bon(n)) for n in cfg["bon_ns"]]
    records = []
    for k, (method, setting, fn) in enumerate(jobs):
        name = f"{method}_{setting}".replace(" ", "").replace(",", "_").replace("=", "")
        path = out / "records" / f"{name}.json"
        rec = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        if rec is not None and rec.get("made_from") == made_from:
            log(f"[4/4] run {k + 1}/{len(jobs)} {method} {setting}: done before (skipped)")
        elif only and method not in only and method != "SFT":
            continue  # not asked for this time (a record of an earlier run with these inputs counts above)
        else:
            log(f"[4/4] run {k + 1}/{len(jobs)} {method} {setting} ..."
                + (" (its record was built from other inputs: run again)" if rec is not None else ""))
            t0 = time.perf_counter()
            policy, extra = fn()
            point = evaluate_policy(policy) if policy is not None else {}
            rec = {"method": method, "setting": setting, **point, **extra,
                   "wall_s": round(time.perf_counter() - t0, 1), "made_from": made_from}
            write_json(path, rec)
        records.append(rec)
        log(f"    {method} {setting}: reward {rec['reward_mean']:+.3f} ± {rec['reward_se']:.3f}, "
            f"KL {rec['kl']:.3f} ± {rec['kl_se']:.3f}  ({seconds(rec['wall_s'])} s)")

    summary = {
        "preset": preset, "device": backend.device, "model": mcfg.to_dict(), "n_params": num_params(reference),
        "n_pairs": {k: len(v) for k, v in pair_sets.items()}, "n_eval_prompts": len(prompts_eval),
        "n_eval_samples_per_prompt": n_eval, "reward_model": rm_eval, "settings": {k: v for k, v in cfg.items()},
        "runs": [{k: v for k, v in r.items() if k not in ("rounds", "example", "made_from")} for r in records],
        "comparisons": [compare(records, "DPO", "PPO"), compare(records, "DPO", "PPO-GT"),
                        compare(records, "PPO", "DPO"), compare(records, "PPO-GT", "DPO"),
                        compare(records, "Online DPO", "PPO-GT"), compare(records, "Online DPO", "DPO")],
        "total_wall_s": round(sum(r["wall_s"] for r in records), 1),
    }
    summary["machine"] = machine()
    summary["elapsed_s_this_invocation"] = round(time.perf_counter() - T_START, 1)
    write_json(out / "frontier.json", summary)
    (out / "frontier.md").write_text(markdown_table(summary), encoding="utf-8")
    plot_frontier(records, out / "frontier.png",
                  f"Sentiment: reward vs KL ({preset} preset, {backend.device}, {len(prompts_eval)} held-out prompts)")
    if args.quick:
        log(SMOKE_TEST)
    print_table(records)
    for c in summary["comparisons"]:
        log(describe(c))
    log(f"frontier.json, frontier.md and frontier.png written to {out}")
    return summary


def machine() -> str:
    """The CPU model and core count (for the record beside measured times)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def markdown_table(summary: dict) -> str:
    """The figure's numbers as a Markdown table (reward and KL with one standard error)."""
    lines = [f"> {SMOKE_TEST}", ""] if summary["preset"] == "quick" else []
    lines += ["| method | setting | mean ground-truth reward | KL(pi \\|\\| pi_ref), nats | wall time, s |",
              "|---|---|---|---|---|"]
    for r in summary["runs"]:
        kl = f"{r['kl']:.2f} (analytic)" if r.get("kl_note") else f"{r['kl']:.2f} ± {r['kl_se']:.2f}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['reward_mean']:+.3f} ± {r['reward_se']:.3f} | {kl} "
                     f"| {seconds(r['wall_s'])} |")
    rm = summary["reward_model"]
    lines += ["", f"Reward model: held-out pair accuracy {rm['heldout_pair_accuracy']:.3f} on {rm['heldout_pairs']} "
              f"pairs, Pearson r with the ground-truth reward {rm['pearson_with_ground_truth']:.3f}.", ""]
    lines += [f"- {describe(c)}" for c in summary["comparisons"]]
    return "\n".join(lines) + "\n"


def print_table(records: list[dict]) -> None:
    log(f"{'method':14s} {'setting':24s} {'reward':>16s} {'KL':>16s} {'wall s':>7s}")
    for r in records:
        log(f"{r['method']:14s} {r['setting']:24s} {r['reward_mean']:+8.3f} ± {r['reward_se']:.3f} "
            f"{r['kl']:8.3f} ± {r['kl_se']:.3f} {seconds(r['wall_s']):>7s}")


if __name__ == "__main__":
    try:
        sys.exit(0 if main() is not None else 130)  # 130: interrupted in SFT, a checkpoint saved; re-run to resume
    except KeyboardInterrupt:
        print("interrupted (nothing half-written is kept); run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, DeviceError) as err:  # RunFolderError, CheckpointError, disk errors, device
        print(f"frontier.py: error: {err}", file=sys.stderr)
        sys.exit(1)
