"""The paper's sentiment frontier (Fig. 2, left), with its baselines and the loss family, tuned alike.

    python examples/frontier.py --size quick       # a smoke test of the whole pipeline, under a minute
    python examples/frontier.py --size middle      # the main comparison (DPO, PPO, PPO-GT, Best-of-N), 3 seeds
    python examples/frontier.py                    # --size full: every method and every loss of the table
    python examples/frontier.py --device cuda      # the same on a GPU
    python examples/frontier_figure.py runs/frontier/frontier.json --out frontier.png   # the figure, from the JSON

One shared SFT model (pi_ref, seeded by --seed), then for each training seed (--seeds, default
0,1,2) a preference set (pairs of pi_ref samples labelled best-vs-worst by the ground-truth reward,
VADER's sentiment score), a reward model fit to it (eq. 2), and every method trained from pi_ref:

  SFT           pi_ref itself (KL 0)
  DPO           eq. (7) on the preference set: beta x learning rate x training length
  each loss     every other row of minidpo.losses.LOSS_TABLE (IPO, SLiC, robust DPO, ... as the table
                grows), trained and tuned exactly as DPO: beta x learning rate x training length
                (per-loss beta grids in LOSS_GRIDS; KTO on the pairs split into unpaired examples, UNPAIRED_LOSSES)
  Online DPO    the same labels and steps in rounds of fresh pairs from the current policy:
                beta x learning rate x rounds
  PPO           RLHF on the reward model, per-token KL penalty beta_KL: beta_KL x learning rate x iterations
  PPO-GT        the same PPO with the ground-truth reward: beta_KL x learning rate x iterations
  Preferred-FT  SFT of pi_ref on the chosen responses: learning rate x training length
  Unlikelihood  likelihood of chosen, unlikelihood of rejected: alpha x learning rate x training length
  Best-of-N     N samples from pi_ref, the reward model keeps one: N; KL = log N - (N - 1)/N

Training length is covered by checkpoints along one run (1/4, 1/2 and all of the longest run), so a
method's points are its settings x its checkpoints, alike for all. What a training seed varies: the
pairs (sampled from pi_ref), the reward model, and every method's initialisation, batch order and
sampling; pi_ref, the prompts and the evaluation's sampling stream (Best-of-N's candidates among
them) are the same for every seed.

Every checkpoint is evaluated twice, with separate prompts and sampling streams: on VALIDATION
prompts (an independent draw of prompts) and on EVALUATION prompts, each giving the mean
ground-truth reward of the policy's samples and KL(pi || pi_ref) estimated from them (each with its
standard error over samples). A method's frontier is chosen on validation: the points (setting x
checkpoint, averaged over seeds) that no other point of the method beats in validation reward at
no more validation KL; the evaluation-prompt numbers of those points are what is reported, with
error bars over the seeds (and the samples' standard error beside them). Each record states the
labels its method used: ground-truth scores, reward-model scores, pairs, rollouts.

Output in --out (default runs/frontier; runs/frontier-quick for --size quick): run.json (the data
seed and the world), tokenizer.json, sft/, seed<S>/ (that seed's pairs and reward model), records/
(one record per finished run: every checkpoint's numbers, its labels and wall time), frontier.json
(every run and checkpoint, the seed averages, each method's selected frontier, the comparisons),
frontier.md and frontier.png.

Resumable per run: a finished run's record is kept and skipped on a re-run; --size middle and
--size full share one folder, so full reuses middle's runs. Each stage records what it was built
from (the pairs the SFT model's fingerprint; the reward model and every record the SFT model's,
the pairs' and the reward model's) and is rebuilt when that differs. Ctrl-C exits with status 130
(in SFT after saving a checkpoint; an interrupted run is redone from its start) and runs nothing
after it. The log shows each run's wall time and an ETA. Another --seed or world (--size quick vs
the others) on an existing --out stops with the difference named (use another --out, or --overwrite).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from minidpo import runtime
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
from minidpo.data import PreferenceExample, TokenizedKTO, TokenizedSFT, build_preference_dataset, build_sft_dataset
from minidpo.evaluate import kl_from_samples, mean_and_stderr, sample_continuations
from minidpo.losses import LOSS_TABLE
from minidpo.model import GPTConfig, init_params, num_params
from minidpo.packing import Batcher
from minidpo.ppo import PPOConfig, add_value_head, train_ppo
from minidpo.reward_model import init_reward_model, pair_accuracy, pearson, reward_model_step, score_batch, score_pairs
from minidpo.reward_model import split_head
from minidpo.scoring import batched_sequence_logps, item_logps
from minidpo.tasks import sentiment
from minidpo.tokenizer import BPETokenizer
from minidpo.train import (NonFiniteError, TrainConfig, batcher_for, check_run_options, dpo_step, fingerprint,
                           interrupt_hook, kto_batch_reference_point, kto_step, pair_examples, run_lock, train_sft)

# ---------------------------------------------------------------------------------------------
# sizes: a world (model, data, evaluation) and a grid (each method's knobs and longest run)
# ---------------------------------------------------------------------------------------------

WORLDS = {
    "default": dict(
        n_reviews=4000, vocab=384, n_layer=2, n_head=4, n_embd=128, n_ctx=48, sft_steps=800, sft_batch=32,
        sft_lr=3e-3, n_train_prompts=1024, n_val_prompts=128, n_eval_prompts=256, n_val_samples=2,
        n_eval_samples=2, max_new_tokens=24, rm_steps=200, rm_lr=3e-4, batch=16,
    ),
    "quick": dict(
        n_reviews=800, vocab=320, n_layer=1, n_head=2, n_embd=48, n_ctx=40, sft_steps=150, sft_batch=32,
        sft_lr=3e-3, n_train_prompts=160, n_val_prompts=16, n_eval_prompts=32, n_val_samples=2,
        n_eval_samples=2, max_new_tokens=16, rm_steps=30, rm_lr=1e-3, batch=8,
    ),
}
# every method: 2 values of each knob, 2 learning rates, checkpoints at 1/4, 1/2 and 1 of the longest
# run: 12 points a seed (Preferred-FT: 4 learning rates x 3 checkpoints; Best-of-N: 7 values of N)
GRIDS = {
    "default": dict(
        fractions=(0.25, 0.5, 1.0),
        steps=256,  # the longest run of DPO, each loss, Preferred-FT and Unlikelihood (4 epochs of the pairs)
        loss=dict(beta=(0.1, 1.0), lr=(1e-4, 3e-4)),  # DPO and every loss of the table (LOSS_GRIDS: per loss)
        online=dict(beta=(0.1, 1.0), lr=(1e-4, 3e-4), rounds=4),
        ppo=dict(kl_coef=(0.03, 0.3), lr=(1e-4, 3e-4), iterations=32, rollout=64, epochs=2),
        pft=dict(lr=(3e-5, 1e-4, 3e-4, 1e-3)),
        ul=dict(alpha=(0.1, 1.0), lr=(1e-4, 3e-4)),
        bon=dict(n=(2, 3, 4, 6, 8, 12, 16)),
    ),
    "quick": dict(
        fractions=(0.5, 1.0), steps=16,
        loss=dict(beta=(0.1,), lr=(3e-4,)),
        online=dict(beta=(0.1,), lr=(3e-4,), rounds=2),
        ppo=dict(kl_coef=(0.1,), lr=(3e-4,), iterations=4, rollout=16, epochs=1),
        pft=dict(lr=(3e-4,)),
        ul=dict(alpha=(0.5,), lr=(3e-4,)),
        bon=dict(n=(2, 4)),
    ),
}
BASELINES = ["SFT", "DPO", "Online DPO", "PPO", "PPO-GT", "Preferred-FT", "Unlikelihood", "Best-of-N"]
MAIN = ["SFT", "DPO", "PPO", "PPO-GT", "Best-of-N"]
SIZES = {  # size -> its world, its grid, its methods (None: every baseline and every loss of the table)
    "quick": dict(world="quick", grid="quick", methods=None, seeds=(0, 1, 2)),
    "middle": dict(world="default", grid="default", methods=MAIN, seeds=(0, 1, 2)),
    "full": dict(world="default", grid="default", methods=None, seeds=(0, 1, 2)),
}

# A loss's own grid where the shared one does not suit it (its beta lives on another scale), by its
# name in LOSS_TABLE; a name not in the table is ignored. Any of the row's options may be swept the
# same way (e.g. "gamma": (0.5, 1.0)); the rest stay at the row's defaults. Keep 4 runs a seed like
# every method: an option swept in place of beta gives beta one value ("beta": (2.0,)).
LOSS_GRIDS = {
    "ipo": dict(beta=(0.3, 3.0)),  # per-token mean log-ratios pulled to 1/(2 beta): 1.7 and 0.17 nats a token
    "simpo": dict(beta=(2.0, 10.0)),  # per-token mean log pi, no reference (SimPO's paper: 2 to 10)
}
# Losses that train on unpaired examples (prompt, completion, desirable?): each pair becomes two
# examples (the chosen one desirable, the rejected one not), trained by train.kto_step with the
# batch's own reference point (SeedRuns.unpaired). A batch holds 2 x batch examples, so each step
# reads as many sequences as a paired loss's step and a run covers the same epochs of the same data.
UNPAIRED_LOSSES = {"kto": "KTO (Ethayarajh et al. 2024): the pairs split into 2N unpaired examples"}
COMPARISONS = [("DPO", "PPO"), ("DPO", "PPO-GT"), ("PPO", "DPO"), ("PPO-GT", "DPO"), ("DPO", "Best-of-N"),
               ("Online DPO", "DPO"), ("Online DPO", "PPO-GT"), ("Preferred-FT", "DPO"), ("Unlikelihood", "DPO")]

# options that change the results, recorded in --out/run.json; what this script writes in --out
RESULT_OPTIONS = ("quick", "seed")
OUTPUTS = ("tokenizer.json", "tokenizer_config.json", "sft", "seed*", "records", "frontier.json", "frontier.md",
           "frontier.png")
SMOKE_TEST = ("quick size: a smoke test of the pipeline on tiny data and a few steps; its numbers are not results "
              "(run --size middle or full for those)")


def loss_method(name: str) -> str:
    """The method name of a row of LOSS_TABLE: "DPO" for eq. 7 (sigmoid), the row's name otherwise."""
    return "DPO" if name == "sigmoid" else name


def all_methods() -> list[str]:
    """Every method this script knows: the baselines, then each loss of the table."""
    return BASELINES + [loss_method(n) for n in LOSS_TABLE if loss_method(n) not in BASELINES]


def parse_args(argv=None):
    p = ArgumentParser(prog="frontier.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda / cuda:N (CuPy)")
    p.add_argument("--size", default=None, choices=list(SIZES),
                   help="quick (a smoke test, under a minute), middle (the main comparison), full (every method "
                        "and loss; the default)")
    p.add_argument("--quick", action="store_true", help="the same as --size quick")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/frontier, runs/frontier-quick for --size quick); re-use it to "
                        "resume")
    p.add_argument("--overwrite", action="store_true", help="discard a run with other options already in --out")
    p.add_argument("--seed", type=int, default=0,
                   help="the data seed: the corpus, the tokenizer, pi_ref, the prompts and the evaluation's sampling")
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds (default 0,1,2): the pairs, the reward model and every "
                        "method's training")
    p.add_argument("--only", default=None, help="comma-separated methods to run (default: all of the size's), e.g. "
                                                "DPO,PPO-GT")
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
    if args.quick and args.size not in (None, "quick"):
        p.error(f"argument --quick: not with --size {args.size}")
    args.size = "quick" if args.quick else (args.size or "full")
    args.quick = args.size == "quick"
    if args.seeds is None:
        args.seed_list = list(SIZES[args.size]["seeds"])
    else:
        try:
            args.seed_list = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            p.error(f"argument --seeds: expected integers separated by commas, got {args.seeds!r}")
        if min(args.seed_list) < 0 or len(set(args.seed_list)) != len(args.seed_list):
            p.error(f"argument --seeds: expected distinct integers >= 0, got {args.seeds!r}")
    known = all_methods()
    only = [m.strip() for m in args.only.split(",")] if args.only else None
    if only and not set(only) <= set(known):
        p.error(f"argument --only: unknown methods {sorted(set(only) - set(known))}; known: {', '.join(known)}")
    args.only = set(only) if only else None
    if args.out is None:
        args.out = str(Path("runs") / ("frontier-quick" if args.quick else "frontier"))
    return args


T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    """Atomic write: a half-written file never replaces a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def seconds(s: float) -> str:
    """A wall time in seconds for the log and the tables: '0.4' below 10 s (not '0'), '25' above."""
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def duration(s: float) -> str:
    """A longer wall time: '45 s', '12 min', '3 h 05 min'."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


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
# the plan: every run of every method, and what each one costs in labels
# ---------------------------------------------------------------------------------------------


def fmt(v) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def checkpoint_lengths(longest: int, fractions) -> list[int]:
    """The checkpoints along one run of ``longest`` steps (iterations, rounds): each fraction of it,
    at least 1, without repeats."""
    return sorted({max(1, int(round(f * longest))) for f in fractions})


def loss_grid(name: str, grid: dict) -> list[dict]:
    """The knob settings of one loss of the table: LOSS_GRIDS[name] where given, the shared grid
    otherwise; a swept option of the row is checked against the row (its range)."""
    shared = grid["loss"]
    # an override keeps the shared grid's number of values (the quick size: the first)
    own = dict(shared, **{k: tuple(v)[: len(shared[k])] if k in shared else tuple(v)
                          for k, v in LOSS_GRIDS.get(name, {}).items()})
    row = LOSS_TABLE[name]
    opts = [k for k in own if k not in ("beta", "lr")]
    for k in opts:
        if k not in row.options:
            raise ValueError(f"LOSS_GRIDS[{name!r}] sweeps {k!r}, which the {name!r} loss does not have")
    keys = ["beta", *opts, "lr"]
    return [dict(zip(keys, vals)) for vals in itertools.product(*(own[k] for k in keys))]


def plan(size: str, methods: list[str] | None = None) -> dict:
    """Each method of the size: its kind, its settings (knob dicts), the unit and longest length of
    one run, its checkpoints; and the loss rows left out, with why. ``methods`` narrows the size's."""
    grid = GRIDS[SIZES[size]["grid"]]
    wanted = SIZES[size]["methods"] or all_methods()
    if methods is not None:
        wanted = [m for m in wanted if m in methods or m == "SFT"]
    out, skipped = {}, {}
    steps, ppo = grid["steps"], grid["ppo"]

    def add(method, kind, settings, unit, longest):
        if method in wanted:
            out[method] = {"kind": kind, "settings": settings, "unit": unit, "longest": longest,
                           "checkpoints": checkpoint_lengths(longest, grid["fractions"]) if longest else [None]}

    add("SFT", "reference", [{}], None, None)
    for name in LOSS_TABLE:
        if loss_method(name) not in wanted:
            continue
        add(loss_method(name), "loss", [dict(loss=name, **k) for k in loss_grid(name, grid)], "steps", steps)
    add("Online DPO", "online", [{"beta": b, "lr": l} for b in grid["online"]["beta"] for l in grid["online"]["lr"]],
        "rounds", grid["online"]["rounds"])
    for method in ("PPO", "PPO-GT"):
        add(method, "ppo", [{"beta_KL": k, "lr": l} for k in ppo["kl_coef"] for l in ppo["lr"]], "iterations",
            ppo["iterations"])
    add("Preferred-FT", "pft", [{"lr": l} for l in grid["pft"]["lr"]], "steps", steps)
    add("Unlikelihood", "ul", [{"alpha": a, "lr": l} for a in grid["ul"]["alpha"] for l in grid["ul"]["lr"]],
        "steps", steps)
    add("Best-of-N", "bon", [{"N": n} for n in grid["bon"]["n"]], None, None)
    order = [m for m in wanted if m in out]
    return {"methods": {m: out[m] for m in order}, "skipped": skipped}


def run_constants(kind: str, world: dict, grid: dict) -> dict:
    """What a run of this kind is besides its knobs (the longest run, batch, rollouts, N's): part of
    its record, so a changed grid runs it again."""
    c = {"batch": world["batch"], "fractions": list(grid["fractions"])}
    if kind in ("loss", "pft", "ul"):
        c["steps"] = grid["steps"]
    elif kind == "online":
        c.update(steps=grid["steps"], rounds=grid["online"]["rounds"])
    elif kind == "ppo":
        c.update({k: v for k, v in grid["ppo"].items() if k not in ("kl_coef", "lr")})
    elif kind == "bon":
        c["n"] = list(grid["bon"]["n"])
    return c


def setting_name(knobs: dict) -> str:
    """'beta=0.1, lr=0.0003' (a loss's name is its method's, not part of the setting)."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in knobs.items() if k != "loss") or "pi_ref"


def labels_used(kind: str, method: str, knobs: dict, length, world: dict, n_pairs: int, grid: dict) -> dict:
    """The labelled samples a method's point used: samples scored by the ground-truth reward
    (gt_scores) or by the reward model (rm_scores), preference pairs and rollouts. The preference
    set costs 2 ground-truth scores a training prompt (2 samples, each scored once); the reward
    model is trained on it; PPO scores one rollout a prompt each iteration; online DPO scores 2
    fresh samples a prompt each round; Best-of-N scores N samples per evaluated sample with the reward
    model (at inference)."""
    pair_scores = 2 * world["n_train_prompts"]
    if kind == "reference":
        return {"gt_scores": 0, "rm_scores": 0, "pairs": 0, "rollouts": 0}
    if kind in ("loss", "pft", "ul"):
        return {"gt_scores": pair_scores, "rm_scores": 0, "pairs": n_pairs, "rollouts": 0}
    if kind == "online":
        per_round = world["n_train_prompts"] // grid["online"]["rounds"]
        return {"gt_scores": 2 * per_round * length, "rm_scores": 0, "pairs": None, "rollouts": 0}
    if kind == "ppo":
        rollouts = length * grid["ppo"]["rollout"]
        if method == "PPO-GT":
            return {"gt_scores": rollouts, "rm_scores": 0, "pairs": 0, "rollouts": rollouts}
        return {"gt_scores": pair_scores, "rm_scores": rollouts, "pairs": n_pairs, "rollouts": rollouts}
    if kind == "bon":
        return {"gt_scores": pair_scores, "rm_scores": 0, "pairs": n_pairs, "rollouts": 0,
                "rm_scores_per_evaluated_sample": knobs["N"]}
    raise ValueError(f"unknown kind {kind!r}")


def grid_table(size: str) -> dict:
    """Each method's grid as stated: its knobs' values, checkpoints, runs and points a seed."""
    out = {}
    for method, spec in plan(size)["methods"].items():
        knobs = {}
        for s in spec["settings"]:
            for k, v in s.items():
                if k != "loss" and v not in knobs.setdefault(k, []):
                    knobs[k].append(v)
        runs = 1 if spec["kind"] in ("bon", "reference") else len(spec["settings"])
        points = len(spec["settings"]) * len(spec["checkpoints"])
        out[method] = {"kind": spec["kind"], "knobs": knobs, "unit": spec["unit"], "checkpoints": spec["checkpoints"],
                       "runs_per_seed": runs, "points_per_seed": points}
    return out


# ---------------------------------------------------------------------------------------------
# seeds, validation selection, the frontier and the read-out
# ---------------------------------------------------------------------------------------------


def upper_frontier(points: list[dict], kl: str = "kl", reward: str = "reward_mean") -> list[dict]:
    """The points no other point of the list beats on both axes (lower or equal KL, higher
    reward), sorted by KL: the method's reward-vs-KL frontier. ``kl``, ``reward``: the keys read
    (the validation numbers select: "val_kl", "val_reward_mean")."""
    pts = sorted(points, key=lambda p: (p[kl], -p[reward]))
    out, best = [], -math.inf
    for p in pts:
        if p[reward] > best:
            out.append(p)
            best = p[reward]
    return out


def frontier_at(frontier: list[dict], kl: float) -> float:
    """The best reward a method reaches at KL <= kl (-inf if none of its points is that close)."""
    vals = [p["reward_mean"] for p in frontier if p["kl"] <= kl]
    return max(vals) if vals else -math.inf


def _seed_stats(values: list[float], ses: list[float]) -> dict:
    """Mean over seeds, the sample std over seeds (ddof 1), its standard error std / sqrt(n), and
    the samples' standard error of the mean over seeds, sqrt(sum se_i^2) / n."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(v.mean()), "seed_std": std, "seed_se": std / math.sqrt(n),
            "sample_se": float(math.sqrt(sum(s * s for s in ses)) / n)}


def aggregate(runs: list[dict]) -> list[dict]:
    """One point per (method, setting incl. checkpoint), averaged over its seeds: reward and KL on
    evaluation prompts (mean, seed std, seed se, samples' se) and on validation prompts. The point's
    ``reward_se`` / ``kl_se`` are the seed-level standard errors where there are 2 seeds or more,
    the samples' otherwise (one seed, or SFT, which no training seed changes)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (method, setting), rs in groups.items():
        rs = sorted(rs, key=lambda r: -1 if r["seed"] is None else r["seed"])
        p = {k: rs[0][k] for k in ("method", "kind", "setting", "run_setting", "knobs", "checkpoint", "fraction",
                                   "labels") if k in rs[0]}
        p["seeds"] = [r["seed"] for r in rs]
        p["n_seeds"] = len(rs)
        for prefix in ("", "val_"):
            rw = _seed_stats([r[f"{prefix}reward_mean"] for r in rs], [r[f"{prefix}reward_se"] for r in rs])
            kl = _seed_stats([r[f"{prefix}kl"] for r in rs], [r[f"{prefix}kl_se"] for r in rs])
            p[f"{prefix}reward_mean"], p[f"{prefix}kl"] = rw["mean"], kl["mean"]
            p[f"{prefix}reward_seed_std"], p[f"{prefix}kl_seed_std"] = rw["seed_std"], kl["seed_std"]
            p[f"{prefix}reward_sample_se"], p[f"{prefix}kl_sample_se"] = rw["sample_se"], kl["sample_se"]
            many = len(rs) > 1
            p[f"{prefix}reward_se"] = rw["seed_se"] if many else rw["sample_se"]
            p[f"{prefix}kl_se"] = kl["seed_se"] if many else kl["sample_se"]
        if any(r.get("kl_note") for r in rs):
            p["kl_note"] = rs[0]["kl_note"]
        p["wall_s"] = round(float(np.mean([r["wall_s"] for r in rs])), 1)
        out.append(p)
    return out


def select(points: list[dict], method: str, max_gt_scores: int | None = None) -> list[dict]:
    """A method's frontier chosen on VALIDATION prompts: among its points run on every seed (and
    using at most ``max_gt_scores`` ground-truth scores, if given), those that no other beats in
    validation reward at no more validation KL, in order of validation KL. Each keeps its
    evaluation-prompt numbers, which are the ones reported."""
    mine = [p for p in points if p["method"] == method]
    if max_gt_scores is not None:
        mine = [p for p in mine if p["labels"]["gt_scores"] <= max_gt_scores]
    if not mine:
        return []
    n = max(p["n_seeds"] for p in mine)
    return upper_frontier([p for p in mine if p["n_seeds"] == n], kl="val_kl", reward="val_reward_mean")


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


def envelopes(points: list[dict], max_gt_scores: int | None = None) -> dict:
    """{method: its frontier chosen on validation} for every method with points."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    return {m: select(points, m, max_gt_scores) for m in methods}


def comparisons(env: dict, pairs) -> list[dict]:
    """compare() on the selected frontiers (seed-level standard errors), for each (a, b) present."""
    flat = [p for pts in env.values() for p in pts]
    return [compare(flat, a, b) for a, b in pairs if env.get(a) and env.get(b)]


def matched_budget(points: list[dict], a: str = "DPO", b: str = "PPO-GT") -> dict | None:
    """The two methods on the same ground-truth budget: ``a``'s (the most ground-truth scores any of
    its points used) caps both; each frontier is chosen on validation among the points within it."""
    pa = [p for p in points if p["method"] == a]
    if not pa or not any(p["method"] == b for p in points):
        return None
    budget = max(p["labels"]["gt_scores"] for p in pa)
    env = {m: select(points, m, budget) for m in (a, b)}
    return {"gt_scores": budget, "methods": [a, b],
            "frontiers": {m: [p["setting"] for p in pts] for m, pts in env.items()},
            "comparisons": comparisons(env, [(a, b), (b, a)])}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run(args) -> dict | None:
    out = Path(args.out)
    with run_lock(out):  # one process at a time; run.json checked before anything is written
        check_run_options(out, {k: getattr(args, k) for k in RESULT_OPTIONS}, args.overwrite, OUTPUTS)
        return _run(args, out)


class Shared:
    """What every seed's runs share: the sizes, pi_ref, the tokenizer, the ground truth, the prompts,
    and the evaluation of a policy on the validation or the evaluation prompts."""

    def __init__(self, args, world, grid, the_plan, backend, mcfg, tokenizer, reference, reward_fn):
        self.args, self.world, self.grid, self.plan = args, world, grid, the_plan
        self.backend, self.mcfg, self.tokenizer, self.reference, self.reward_fn = (backend, mcfg, tokenizer,
                                                                                 reference, reward_fn)
        self.pad = tokenizer.pad_id
        self.batcher = Batcher(self.pad, backend=backend)  # shared prompts, packed rows: the reward model, Unlikelihood
        self.gen_kw = dict(max_new_tokens=world["max_new_tokens"], temperature=1.0, backend=backend)
        # the prompts: training, validation (selects), evaluation (reports); fixed by the data seed
        seed = args.seed
        self.prompts_train = sentiment.make_prompts(world["n_train_prompts"], seed=seed + 1)
        self.prompts_eval = sentiment.make_prompts(world["n_eval_prompts"], seed=seed + 2)
        self.prompts_val = sentiment.make_prompts(world["n_val_prompts"], seed=seed + 3)
        self.prompt_ids_train = [tokenizer.encode(p) or [tokenizer.eos_id] for p in self.prompts_train]
        self.splits = {"val": (self.prompts_val, world["n_val_samples"], [seed, 6]),
                       "eval": (self.prompts_eval, world["n_eval_samples"], [seed, 5])}
        self.evaluation = {"val_prompts": len(self.prompts_val), "val_samples_per_prompt": world["n_val_samples"],
                           "eval_prompts": len(self.prompts_eval), "eval_samples_per_prompt": world["n_eval_samples"],
                           "max_new_tokens": world["max_new_tokens"]}
        self._bon: dict = {}

    def evaluate(self, policy, split: str) -> dict:
        """Mean ground-truth reward of the policy's samples on ``split``'s prompts ("val" or "eval",
        each its own sampling stream) and KL(pi || pi_ref) estimated from them, each with its
        standard error."""
        prompts, n, rng_seed = self.splits[split]
        samples = sample_continuations(policy, self.mcfg, self.tokenizer, prompts, n,
                                       rng=np.random.default_rng(rng_seed), **self.gen_kw)
        interrupt_hook("evaluation")
        rewards = self.reward_fn([p + t for p, t in zip(samples.prompts, samples.texts)])
        kls = kl_from_samples(policy, self.reference, self.mcfg, samples, self.pad, backend=self.backend)
        r, r_se = mean_and_stderr(rewards)
        k, k_se = mean_and_stderr(kls)
        return {"reward_mean": r, "reward_se": r_se, "kl": k, "kl_se": k_se, "n_samples": len(rewards),
                "example": samples.texts[0]}

    @staticmethod
    def point(val: dict, ev: dict) -> dict:
        """One checkpoint's numbers: evaluation prompts plain, validation prompts prefixed val_."""
        return {**{k: ev[k] for k in ("reward_mean", "reward_se", "kl", "kl_se", "n_samples", "example")},
                **{f"val_{k}": val[k] for k in ("reward_mean", "reward_se", "kl", "kl_se", "n_samples")}}

    def bon_candidates(self, nmax: int) -> dict:
        """{split: (samples, their TokenizedSFT items, ground-truth rewards (P * n_per, nmax))}:
        Best-of-N's candidates, max(N) samples of pi_ref per evaluated sample from the split's own
        stream, drawn once for every seed (a seed changes the reward model that picks)."""
        if nmax not in self._bon:
            out = {}
            for split, (prompts, n_per, rng_seed) in self.splits.items():
                samples = sample_continuations(self.reference, self.mcfg, self.tokenizer, prompts, n_per * nmax,
                                               rng=np.random.default_rng([*rng_seed, 9]), **self.gen_kw)
                interrupt_hook("evaluation")
                items = [TokenizedSFT(prompt_ids=list(p), response_ids=list(y))
                         for p, y in zip(samples.prompt_ids, samples.ids)]
                gt = np.asarray(self.reward_fn([p + t for p, t in zip(samples.prompts, samples.texts)]),
                                dtype=np.float64).reshape(-1, nmax)
                out[split] = (samples, items, gt)
            self._bon[nmax] = out
        return self._bon[nmax]


class SeedRuns:
    """One training seed: its pairs and reward model, and one runner per kind of method. A runner
    trains from pi_ref with the setting's knobs and appends each checkpoint's numbers to ``pts``
    (:meth:`checkpointer`); it returns what else its record keeps."""

    def __init__(self, sh: Shared, seed: int, train_pairs, rm):
        self.sh, self.seed, self.pairs, self.rm = sh, seed, train_pairs, rm
        self.n_pairs = len(train_pairs)
        self._ref: dict = {}
        self.steps, self.B = sh.grid["steps"], sh.world["batch"]
        self.every = math.gcd(*checkpoint_lengths(self.steps, sh.grid["fractions"]))  # log (and check) this often

    def run(self, method: str, knobs: dict, pts: list, t0: float) -> dict:
        kind = self.sh.plan["methods"][method]["kind"]
        return getattr(self, kind)(method, knobs, pts, t0) or {}

    def copy_ref(self) -> dict:
        return {k: v.copy() for k, v in self.sh.reference.items()}

    def ref_logps(self, bt):
        """pi_ref's log-probs of the pairs under ``bt``'s log-prob rule (sums or per-token means), once each."""
        if bt.average not in self._ref:
            c, r = batched_sequence_logps(self.sh.reference, self.sh.mcfg, self.pairs, bt, 32)
            self._ref[bt.average] = (self.sh.backend.asarray(c, dtype=c.dtype), self.sh.backend.asarray(r, dtype=r.dtype))
        return self._ref[bt.average]

    def checkpointer(self, method: str, knobs: dict, pts: list, t0: float, total: int):
        """The callback a run calls after each step (iteration, round) with its policy: at a
        checkpoint, both evaluations and the labels used so far go into ``pts``."""
        sh, spec = self.sh, self.sh.plan["methods"][method]

        def at(length, policy):
            if length not in spec["checkpoints"]:
                return
            p = sh.point(sh.evaluate(policy, "val"), sh.evaluate(policy, "eval"))
            pts.append({"checkpoint": length, "fraction": length / total, **p,
                        "labels": labels_used(spec["kind"], method, knobs, length, sh.world, self.n_pairs, sh.grid),
                        "checkpoint_s": round(time.perf_counter() - t0, 1)})
            log(f"      {spec['unit']}={length}: reward {p['reward_mean']:+.3f}, KL {p['kl']:.3f} "
                f"(val {p['val_reward_mean']:+.3f} at KL {p['val_kl']:.3f})")
            interrupt_hook(f"checkpoint:{method}:seed{self.seed}")  # tests: a Ctrl-C between a run's checkpoints
        return at

    def _optimize(self, policy, step_fn, lr, at, what, n_items=None, batch=None):
        """``self.steps`` AdamW steps of ``step_fn`` on batches of ``batch`` (default: the world's)
        of ``n_items`` items (default: the pairs), calling ``at`` at each log step."""
        optimize(policy, n_items or self.n_pairs, step_fn, self.steps, batch or self.B, lr, seed=self.seed,
                 warmup_steps=10, log_every=self.every,
                 on_log=lambda s, l: (log(f"    step {s}/{self.steps}: {what} {l:.4f}"), at(s, policy)))

    def _loss_config(self, knobs: dict, batch: int) -> TrainConfig:
        """The TrainConfig of a loss of the table at ``knobs`` (loss, beta, lr and the row's swept options)."""
        opts = {k: v for k, v in knobs.items() if k not in ("loss", "beta", "lr")}
        return TrainConfig(steps=self.steps, batch_size=batch, lr=knobs["lr"], beta=knobs["beta"],
                           loss_type=knobs["loss"], loss_options=opts, grad_clip=1.0, seed=self.seed, progress=False)

    def loss(self, method, knobs, pts, t0):
        """DPO or another loss of the table: its eq. 7-like step on the pairs, pi_ref cached (a loss
        of UNPAIRED_LOSSES: :meth:`unpaired`)."""
        if knobs["loss"] in UNPAIRED_LOSSES:
            return self.unpaired(method, knobs, pts, t0)
        sh = self.sh
        tc = self._loss_config(knobs, self.B)
        bt = batcher_for(tc, sh.pad, sh.backend)  # the loss's log-prob rule
        ref_c, ref_r = self.ref_logps(bt)

        def step_fn(p, idx):
            didx = sh.backend.asarray(idx)
            loss, _, grads = dpo_step(p, sh.mcfg, bt.pairs([self.pairs[i] for i in idx]), ref_c[didx], ref_r[didx], tc)
            return loss, grads

        policy = self.copy_ref()
        self._optimize(policy, step_fn, knobs["lr"], self.checkpointer(method, knobs, pts, t0, self.steps), "loss")

    def unpaired(self, method, knobs, pts, t0):
        """KTO on the pairs split into 2N unpaired examples (chosen desirable, rejected not): each
        step kto_step on 2 x batch examples, z0 from the batch's mismatched examples
        (train.kto_batch_reference_point), pi_ref's log-probs of the examples cached."""
        sh = self.sh
        tc = self._loss_config(knobs, 2 * self.B)
        bt = batcher_for(tc, sh.pad, sh.backend)
        prompts, responses = pair_examples(self.pairs)
        examples = [TokenizedKTO(list(x), list(y), k < self.n_pairs) for k, (x, y) in enumerate(zip(prompts, responses))]
        if "kto" not in self._ref:
            ref = item_logps(sh.reference, sh.mcfg, examples, bt, 32)
            self._ref["kto"] = sh.backend.asarray(ref, dtype=ref.dtype)
        ref = self._ref["kto"]

        def step_fn(p, idx):
            items = [examples[i] for i in idx]
            desirable = sh.backend.asarray(np.array([t.desirable for t in items], dtype=bool))
            z0 = kto_batch_reference_point(p, sh.reference, sh.mcfg, [t.prompt_ids for t in items],
                                           [t.response_ids for t in items], bt, tc)
            loss, _, grads = kto_step(p, sh.mcfg, bt.sft(items), ref[sh.backend.asarray(idx)], desirable, z0, tc)
            return loss, grads

        policy = self.copy_ref()
        self._optimize(policy, step_fn, knobs["lr"], self.checkpointer(method, knobs, pts, t0, self.steps), "loss",
                       n_items=len(examples), batch=tc.batch_size)

    def online(self, method, knobs, pts, t0):
        """Online DPO: rounds of fresh pairs from the current policy, labelled by the ground truth."""
        sh, rounds = self.sh, self.sh.grid["online"]["rounds"]
        policy = self.copy_ref()
        label_rng = np.random.default_rng([self.seed, 7])
        tc = TrainConfig(steps=self.steps, batch_size=self.B, lr=knobs["lr"], beta=knobs["beta"], grad_clip=1.0,
                         progress=False)
        at = self.checkpointer(method, knobs, pts, t0, rounds)

        def sample_fn(params, prompts, n):
            s = sample_continuations(params, sh.mcfg, sh.tokenizer, prompts, n, rng=label_rng, **sh.gen_kw)
            return [s.texts[i * n : (i + 1) * n] for i in range(len(prompts))]

        def label_fn(prompts, sample):
            return sentiment.build_preference_pairs(prompts, sample, sh.reward_fn, n_samples=2, mode="argmax",
                                                    rng=label_rng)

        def on_round(r):
            log(f"    round {r['round']}/{rounds}: {r['pairs']} fresh pairs, mean sampled reward "
                f"{r['mean_sample_reward']:+.3f}, DPO loss {r.get('dpo_loss') or float('nan'):.4f}")
            at(r["round"], policy)

        hist = online_dpo(policy, sh.reference, sh.mcfg, sh.tokenizer, sh.prompts_train, sample_fn, label_fn, tc,
                          rounds=rounds, prompts_per_round=len(sh.prompts_train) // rounds,
                          steps_per_round=self.steps // rounds, backend=sh.backend, seed=self.seed, on_round=on_round)
        for p in pts:  # the pairs the rounds made so far
            p["labels"]["pairs"] = sum(h["pairs"] for h in hist[: p["checkpoint"]])
        return {"rounds": hist}

    def ppo(self, method, knobs, pts, t0):
        """PPO on the reward model (PPO) or on the ground truth (PPO-GT)."""
        sh, g = self.sh, self.sh.grid["ppo"]
        params = add_value_head(self.copy_ref(), sh.mcfg)
        pc = PPOConfig(kl_coef=knobs["beta_KL"], lr=knobs["lr"], iterations=g["iterations"], rollout_batch=g["rollout"],
                       minibatch=self.B, epochs=g["epochs"], max_new_tokens=sh.world["max_new_tokens"], seed=self.seed)
        at = self.checkpointer(method, knobs, pts, t0, pc.iterations)

        def rm_score(prompts, texts, items):
            return score_batch(self.rm, sh.mcfg, items, sh.pad, sh.backend)

        def gt_score(prompts, texts, items):
            return sh.reward_fn.score(prompts, texts)

        def on_iteration(r):
            if r["iteration"] in sh.plan["methods"][method]["checkpoints"]:
                log(f"    iteration {r['iteration']}/{pc.iterations}: score {r['score']:+.3f}, "
                    f"rollout KL {r['kl']:.3f}, clipfrac {r['clipfrac']:.3f}")
            at(r["iteration"], split_head(params, "value")[0])

        hist = train_ppo(params, sh.reference, sh.mcfg, sh.prompt_ids_train, sh.prompts_train,
                         gt_score if method == "PPO-GT" else rm_score, sh.tokenizer, pc, sh.backend,
                         progress=on_iteration)
        return {"ppo": pc.to_dict(), "last_iteration": hist[-1]}

    def pft(self, method, knobs, pts, t0):
        """Preferred-FT: the SFT loss on the chosen responses."""
        sh = self.sh
        policy = self.copy_ref()
        self._optimize(policy, lambda p, idx: preferred_ft_step(p, sh.mcfg, self.pairs, idx, sh.pad, sh.backend),
                       knobs["lr"], self.checkpointer(method, knobs, pts, t0, self.steps), "NLL")

    def ul(self, method, knobs, pts, t0):
        """Unlikelihood: likelihood of the chosen tokens, alpha x unlikelihood of the rejected ones."""
        sh = self.sh

        def step_fn(p, idx):
            return unlikelihood_step(p, sh.mcfg, sh.batcher.pairs([self.pairs[i] for i in idx]), knobs["alpha"])

        policy = self.copy_ref()
        self._optimize(policy, step_fn, knobs["lr"], self.checkpointer(method, knobs, pts, t0, self.steps), "loss")

    def bon(self, method, knobs, pts, t0):
        """Best-of-N for every N of the grid: the reward model scores the shared candidates, and the
        first N of each evaluated sample's candidates make its Best-of-N, on both prompt sets."""
        sh = self.sh
        ns = [s["N"] for s in sh.plan["methods"][method]["settings"]]
        nmax = max(ns)
        by_split = {split: (score_batch(self.rm, sh.mcfg, items, sh.pad, sh.backend).reshape(-1, nmax), gt, samples)
                    for split, (samples, items, gt) in sh.bon_candidates(nmax).items()}  # scores (P * n_per, Nmax)
        for n in ns:
            res = {}
            for split, (scores, gt, samples) in by_split.items():
                pick = best_of_n_select(scores[:, :n])  # (P * n_per,)
                r, r_se = mean_and_stderr(gt[np.arange(len(pick)), pick])
                res[split] = {"reward_mean": r, "reward_se": r_se, "kl": best_of_n_kl(n), "kl_se": 0.0,
                              "n_samples": len(pick), "example": samples.texts[int(pick[0])]}
            pts.append({"setting": f"N={n}", "knobs": {"N": n}, "checkpoint": None, "fraction": None,
                        **sh.point(res["val"], res["eval"]), "kl_note": "analytic: log N - (N - 1)/N",
                        "labels": labels_used("bon", method, {"N": n}, None, sh.world, self.n_pairs, sh.grid)})
        return {"n_max": nmax}


def jobs_of(the_plan: dict, seeds: list[int]) -> list[tuple]:
    """Every run, in order: (None, "SFT", {}) first, then each seed's runs, (seed, method, knobs);
    Best-of-N is one run a seed (every N from one draw)."""
    jobs = [(None, "SFT", {})] if "SFT" in the_plan["methods"] else []
    for s in seeds:
        for method, spec in the_plan["methods"].items():
            if spec["kind"] == "bon":
                ns = [x["N"] for x in spec["settings"]]
                jobs.append((s, method, {"N": f"{min(ns)}..{max(ns)}"}))
            elif spec["kind"] != "reference":
                jobs.extend((s, method, k) for k in spec["settings"])
    return jobs


def record_path(records_dir: Path, seed, method: str, knobs: dict) -> Path:
    name = f"{method}_{setting_name(knobs)}".replace(" ", "").replace(",", "_").replace("=", "")
    return records_dir / ("" if seed is None else f"seed{seed}") / f"{name}.json"


def flatten(rec: dict) -> list[dict]:
    """A run's record as one entry per checkpoint (frontier.json's "runs")."""
    out = []
    for p in rec["points"]:
        ck = p.get("checkpoint")
        setting = p.get("setting") or (rec["setting"] if ck is None else f"{rec['setting']}, {rec['unit']}={ck}")
        out.append({"method": rec["method"], "kind": rec["kind"], "setting": setting, "run_setting": rec["setting"],
                    "knobs": p.get("knobs", rec["knobs"]), "seed": rec["seed"], "checkpoint": ck,
                    "fraction": p.get("fraction"),
                    **{k: v for k, v in p.items() if k not in ("setting", "knobs", "checkpoint", "fraction")},
                    "wall_s": rec["wall_s"], "diverged": rec.get("diverged")})
    return out


def _run(args, out: Path) -> dict | None:
    size, seeds = args.size, args.seed_list
    world, grid = WORLDS[SIZES[size]["world"]], GRIDS[SIZES[size]["grid"]]
    the_plan = plan(size)
    backend = get_backend(args.device)
    log(f"sentiment frontier: size={size} device={backend.device} out={out} data seed {args.seed}, training seeds "
        f"{', '.join(map(str, seeds))}")
    cpu_path = None
    if backend.device == "cpu":
        cpu_path = runtime.describe_cpu_path()
        log(f"cpu path: {cpu_path}")
    if args.quick:
        log(SMOKE_TEST)
    for m, why in the_plan["skipped"].items():
        log(f"left out: {m}: {why}")
    stage_s: dict = {}

    # 1. corpus, tokenizer, SFT = pi_ref (shared by every seed) ---------------------------------
    corpus = sentiment.sft_corpus(world["n_reviews"], seed=args.seed)
    tok_path = out / "tokenizer.json"
    if tok_path.exists():
        tokenizer = BPETokenizer.load(tok_path)
    else:
        tokenizer = BPETokenizer.train([p + c for p, c in corpus], vocab_size=world["vocab"])
        tokenizer.save(tok_path)
    mcfg = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=world["n_ctx"], n_layer=world["n_layer"],
                     n_head=world["n_head"], n_embd=world["n_embd"])
    sft_items, _ = build_sft_dataset(corpus, tokenizer, max_length=mcfg.n_ctx)
    sft_tc = TrainConfig(steps=world["sft_steps"], batch_size=world["sft_batch"], lr=world["sft_lr"], warmup_steps=20,
                         schedule="cosine", weight_decay=0.01, seed=args.seed, log_every=20,
                         eval_every=world["sft_steps"], save_every=max(world["sft_steps"] // 2, 1),
                         progress=not args.no_progress)
    reference = init_params(mcfg, backend, seed=args.seed)
    log(f"[1/4] SFT: GPT-2 {mcfg.n_layer} layers x {mcfg.n_embd} channels ({num_params(reference):,} params), "
        f"{len(sft_items)} reviews, {sft_tc.steps} steps")
    t0 = time.perf_counter()
    if train_sft(reference, mcfg, sft_items, tokenizer.pad_id, sft_tc, out / "sft", backend=backend).stopped_early:
        return None  # nothing is built from an unfinished pi_ref
    stage_s["sft"] = round(time.perf_counter() - t0, 1)
    sh = Shared(args, world, grid, the_plan, backend, mcfg, tokenizer, reference, sentiment.SentimentReward())
    ref_fp = fingerprint(reference)

    # 2-4. each seed's pairs and reward model, then its runs; one record a run --------------------
    records_dir = out / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs_of(the_plan, seeds)
    log(f"plan: {sum(j[0] is not None for j in jobs) // max(len(seeds), 1)} runs a seed x {len(seeds)} seeds + SFT; "
        "points a seed: " + ", ".join(f"{m} {g['points_per_seed']}" for m, g in grid_table(size).items()
                                      if m != "SFT"))
    walls: dict = {}  # method -> wall times of its runs (finished before or now)
    state = {"ran": 0, "ran_s": 0.0}
    runs: list = []  # flat: one entry per (run, checkpoint)
    failed: list = []
    world_info: dict = {}

    def eta(remaining: list) -> str:
        """The time the runs left will take: each at the mean wall time of its method's runs so far
        (of all trained methods' runs, for a method not run yet); a run whose record is on disk
        counts 0. SFT's evaluation alone says nothing of a training run's time."""
        allw = [w for m, ws in walls.items() if m != "SFT" for w in ws]
        todo = [(s, m) for s, m, kn in remaining if not record_path(records_dir, s, m, kn).exists()
                and not (args.only and m not in args.only)]
        if not todo:
            return "nothing left to run"
        if not allw:
            return f"{len(todo)} runs left"
        mean_all = float(np.mean(allw))
        left = sum(float(np.mean(walls[m])) if walls.get(m) else mean_all for _, m in todo)
        return f"ETA {duration(left)} for {len(todo)} runs left"

    def do_job(k: int, made_from: dict, fn) -> None:
        """Run job k (or find its record), keep its points, log its result and the ETA."""
        seed, method, knobs = jobs[k]
        spec = the_plan["methods"][method]
        path = record_path(records_dir, seed, method, knobs)
        want = {"method": method, "knobs": knobs, "seed": seed, "checkpoints": spec["checkpoints"],
                "constants": run_constants(spec["kind"], world, grid), "evaluation": sh.evaluation}
        rec = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        label = f"{method} {setting_name(knobs) if knobs else ''}".strip() + ("" if seed is None else f" seed {seed}")
        if rec is not None and rec.get("made_from") == made_from and rec.get("spec") == want:
            log(f"[4/4] run {k + 1}/{len(jobs)} {label}: done before (skipped)")
        elif args.only and method not in args.only and method != "SFT":
            return  # not asked for this time (a record of an earlier run with these inputs counts above)
        else:
            log(f"[4/4] run {k + 1}/{len(jobs)} {label} ..."
                + (" (its record was built from other inputs: run again)" if rec is not None else ""))
            t0 = time.perf_counter()
            pts: list = []
            try:
                extra, diverged = fn(method, knobs, pts, t0) or {}, None
            except (FloatingPointError, NonFiniteError) as err:  # a diverged setting: its checkpoints so far count
                extra, diverged = {}, str(err)
                log(f"    diverged: {err}")
            except (NotImplementedError, ValueError, TypeError) as err:
                if spec["kind"] != "loss":
                    raise
                log(f"    failed (not recorded; a re-run tries again): {type(err).__name__}: {err}")
                failed.append({"method": method, "setting": setting_name(knobs), "seed": seed,
                               "error": f"{type(err).__name__}: {err}"})
                return
            rec = {"method": method, "kind": spec["kind"], "setting": setting_name(knobs), "knobs": knobs,
                   "seed": seed, "unit": spec["unit"], "longest": spec["longest"], "points": pts,
                   "diverged": diverged, **extra, "wall_s": round(time.perf_counter() - t0, 1),
                   "made_from": made_from, "spec": want}
            write_json(path, rec)
            state["ran"] += 1
            state["ran_s"] += rec["wall_s"]
        walls.setdefault(method, []).append(rec["wall_s"])
        runs.extend(flatten(rec))
        last = rec["points"][-1] if rec["points"] else None
        shown = (f"reward {last['reward_mean']:+.3f} ± {last['reward_se']:.3f}, KL {last['kl']:.3f} ± "
                 f"{last['kl_se']:.3f} (val {last['val_reward_mean']:+.3f} at KL {last['val_kl']:.3f})"
                 if last else "no checkpoint reached")
        log(f"    {label}: {shown}  ({seconds(rec['wall_s'])} s); {eta(jobs[k + 1:])}")

    def run_sft(method, knobs, pts, t0):  # pi_ref's own point (no training seed changes it)
        pts.append({"checkpoint": None, "fraction": None,
                    **sh.point(sh.evaluate(reference, "val"), sh.evaluate(reference, "eval")),
                    "labels": labels_used("reference", "SFT", {}, None, world, 0, grid)})

    k = 0
    if jobs and jobs[0][1] == "SFT":
        do_job(0, {"reference": ref_fp}, run_sft)
        k = 1
    for seed in seeds:
        t_world = time.perf_counter()
        wdir = out / f"seed{seed}"
        made_from = {"reference": ref_fp, "train_seed": seed}
        raw_pairs, pair_sets = build_pairs(wdir, seed, made_from, reference, mcfg, tokenizer, sh.reward_fn,
                                           {"train": sh.prompts_train, "eval": sh.prompts_eval}, sh.gen_kw)
        made_from = dict(made_from, pairs=fingerprint(raw_pairs))
        rm, rm_eval = build_reward_model(wdir, seed, made_from, reference, mcfg, tokenizer, world, sh.batcher,
                                         raw_pairs, pair_sets, backend)
        made_from = dict(made_from, reward_model=fingerprint(rm))
        world_info[str(seed)] = {"pairs": {s: len(v) for s, v in pair_sets.items()}, "reward_model": rm_eval,
                                 "wall_s": round(time.perf_counter() - t_world, 1)}
        seed_runs = SeedRuns(sh, seed, pair_sets["train"], rm)
        while k < len(jobs) and jobs[k][0] == seed:
            do_job(k, made_from, seed_runs.run)
            k += 1

    # 5. seeds averaged, frontiers chosen on validation, the read-out ---------------------------
    summary = summarize(runs, args, size, the_plan, grid, world, world_info, stage_s, failed, backend, mcfg,
                        reference, sh.evaluation, cpu_path, sh.prompts_val, sh.prompts_eval)
    write_json(out / "frontier.json", summary)
    (out / "frontier.md").write_text(markdown_table(summary), encoding="utf-8")
    figure_module().draw(summary, out / "frontier.png")
    if args.quick:
        log(SMOKE_TEST)
    print_table(summary)
    for c in summary["comparisons"]:
        log(describe(c))
    if summary["matched_budget"]:
        mb = summary["matched_budget"]
        log(f"matched budget (at most {mb['gt_scores']} ground-truth scores each):")
        for c in mb["comparisons"]:
            log("  " + describe(c))
    log(f"{state['ran']} runs this time ({duration(state['ran_s'])}); all runs {duration(summary['total_wall_s'])}; "
        f"frontier.json, frontier.md and frontier.png written to {out}")
    return summary


def build_pairs(wdir: Path, seed: int, made_from: dict, reference, mcfg, tokenizer, reward_fn, splits: dict,
                gen_kw: dict):
    """One training seed's preference set: 2 samples of pi_ref per prompt, labelled best-vs-worst
    by the ground truth (both splits: training, and held-out for the reward model's accuracy).
    pairs.json, written last, says what they were sampled from; pairs of another pi_ref or seed, or
    an interrupted sampling, are sampled again. Returns (raw pairs by split, tokenized pairs by split)."""
    paths = {split: wdir / f"pairs_{split}.jsonl" for split in splits}
    meta = wdir / "pairs.json"
    if meta.exists() and json.loads(meta.read_text(encoding="utf-8")) == made_from and all(
            p.exists() for p in paths.values()):
        raw = {split: [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
               for split, path in paths.items()}
    else:
        if meta.exists():
            log(f"    seed {seed}: the pairs were sampled from another pi_ref: sampling them again")
            meta.unlink()
        wdir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, 4])

        def sample_fn(prompts, n):
            s = sample_continuations(reference, mcfg, tokenizer, prompts, n, rng=rng,
                                     on_batch=lambda: interrupt_hook("pairs"), **gen_kw)
            return [s.texts[i * n : (i + 1) * n] for i in range(len(prompts))]

        raw = {}
        for split, prompts in splits.items():
            raw[split], _ = sentiment.build_preference_pairs(prompts, sample_fn, reward_fn, n_samples=2,
                                                             mode="argmax", rng=rng)
            atomic_write_text(paths[split], "".join(json.dumps(p) + "\n" for p in raw[split]))
        write_json(meta, made_from)
    sets = {}
    for split, pairs in raw.items():
        examples = [PreferenceExample(p["prompt"], p["chosen"], p["rejected"], f"{paths[split].name}:{i + 1}")
                    for i, p in enumerate(pairs)]
        sets[split], _ = build_preference_dataset(examples, tokenizer, max_length=mcfg.n_ctx,
                                                  max_prompt_length=mcfg.n_ctx // 2)
    log(f"[2/4] seed {seed}: {len(sets['train'])} training pairs from {len(splits['train'])} prompts, "
        f"{len(sets['eval'])} held-out -> {wdir}")
    return raw, sets


def build_reward_model(wdir: Path, seed: int, made_from: dict, reference, mcfg, tokenizer, world: dict, batcher,
                       raw_pairs: dict, pair_sets: dict, backend):
    """One training seed's reward model (eq. 2) on its pairs, or the saved one if built from the same."""
    rm_dir = wdir / "reward_model"
    ck = load_checkpoint(rm_dir, backend=backend) if has_checkpoint(rm_dir) else None
    if ck is not None and ck.config.get("made_from") == made_from:
        rm, rm_eval = {k: backend.asarray(v) for k, v in ck.params.items()}, ck.config["eval"]
    else:
        if ck is not None:
            log(f"    seed {seed}: the reward model was trained on other pairs or from another pi_ref: training it "
                f"again")
        t0 = time.perf_counter()
        rm = init_reward_model(reference, mcfg, seed=seed)
        train = pair_sets["train"]

        def rm_step(p, idx):
            loss, _, grads = reward_model_step(p, mcfg, batcher.pairs([train[i] for i in idx]))
            return loss, grads

        optimize(rm, len(train), rm_step, world["rm_steps"], world["batch"], world["rm_lr"], seed=seed,
                 warmup_steps=10, weight_decay=0.0,
                 on_log=lambda s, l: log(f"    reward model step {s}/{world['rm_steps']}: eq. 2 loss {l:.4f}"),
                 log_every=max(world["rm_steps"] // 4, 1))
        ev = pair_sets["eval"]
        rw, rl = score_pairs(rm, mcfg, ev, tokenizer.pad_id, backend)
        gt = [raw_pairs["eval"][int(p.source.rsplit(":", 1)[1]) - 1] for p in ev]
        gt_all = np.array([g["chosen_reward"] for g in gt] + [g["rejected_reward"] for g in gt])
        rm_eval = {"heldout_pair_accuracy": pair_accuracy(rw, rl), "heldout_pairs": len(ev),
                   "pearson_with_ground_truth": pearson(np.concatenate([rw, rl]), gt_all),
                   "train_steps": world["rm_steps"], "time_s": round(time.perf_counter() - t0, 1)}
        save_checkpoint(rm_dir, rm, {"model": mcfg.to_dict(), "eval": rm_eval, "made_from": made_from},
                        step=world["rm_steps"])
    log(f"[3/4] seed {seed}: reward model held-out pair accuracy {rm_eval['heldout_pair_accuracy']:.3f} on "
        f"{rm_eval['heldout_pairs']} pairs, Pearson r with the ground truth {rm_eval['pearson_with_ground_truth']:.3f}")
    return rm, rm_eval


def summarize(runs, args, size, the_plan, grid, world, world_info, stage_s, failed, backend, mcfg, reference,
              evaluation, cpu_path, prompts_val, prompts_eval) -> dict:
    """frontier.json: what ran, every run and checkpoint, the seed averages, the frontiers chosen on
    validation, the comparisons, the matched-budget comparison, the grids and the budgets."""
    points = aggregate(runs)
    env = envelopes(points)
    family = [m for m in the_plan["methods"] if the_plan["methods"][m]["kind"] == "loss" and m != "DPO"]
    pairs = COMPARISONS + [(m, "DPO") for m in family]
    budgets = {}
    for m in the_plan["methods"]:
        labs = [r["labels"] for r in runs if r["method"] == m]
        if labs:
            budgets[m] = {k: max((l.get(k) or 0) for l in labs) for k in labs[0]}
    eval_set = set(prompts_eval)
    return {
        "size": size, "device": backend.device, "cpu_path": cpu_path, "machine": machine(),
        "data_seed": args.seed, "train_seeds": args.seed_list,
        "what_a_training_seed_varies": "the pairs (sampled from pi_ref), the reward model, every method's "
                                       "initialisation, batch order and sampling; pi_ref, the prompts and the "
                                       "evaluation's sampling stream (Best-of-N's candidates among them) are "
                                       "shared",
        "model": mcfg.to_dict(), "n_params": num_params(reference), "world": world,
        "evaluation": dict(evaluation, train_prompts=world["n_train_prompts"],
                           val_prompts_also_in_eval=sum(p in eval_set for p in prompts_val) / max(len(prompts_val), 1)),
        "selection": "each method's frontier: its points (setting x checkpoint, averaged over the seeds) that no "
                     "other of its points beats in VALIDATION reward at no more validation KL; the reported numbers "
                     "are those points' EVALUATION-prompt numbers; reward_se and kl_se are standard errors over the "
                     "seeds, *_sample_se the evaluation samples'",
        "grids": grid_table(size), "budgets": budgets, "skipped": the_plan["skipped"], "failed": failed,
        "seeds": world_info, "stage_wall_s": stage_s,
        "runs": runs, "points": points,
        "frontiers": {m: [p["setting"] for p in pts] for m, pts in env.items()},
        "comparisons": comparisons(env, pairs),
        "matched_budget": matched_budget(points),
        "total_wall_s": round(sum({(r["method"], r["run_setting"], r["seed"]): r["wall_s"] for r in runs}.values())
                              + stage_s.get("sft", 0.0) + sum(w["wall_s"] for w in world_info.values()), 1),
        "elapsed_s_this_invocation": round(time.perf_counter() - T_START, 1),
    }


def figure_module():
    """examples/frontier_figure.py (the figure, drawn from frontier.json)."""
    spec = importlib.util.spec_from_file_location("frontier_figure", Path(__file__).with_name("frontier_figure.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine() -> str:
    """The CPU model and its logical core count (runtime.machine)."""
    return runtime.machine()


def markdown_table(summary: dict) -> str:
    """Each method's frontier chosen on validation, evaluation-prompt numbers: mean over the seeds
    ± the seeds' standard error (the samples' standard error beside it), labels used, wall time."""
    lines = [f"> {SMOKE_TEST}", ""] if summary["size"] == "quick" else []
    n = len(summary["train_seeds"])
    lines += [f"Each method's frontier (chosen on validation prompts), evaluation-prompt numbers over {n} training "
              f"seeds: mean ± standard error over the seeds (the evaluation samples' standard error in brackets).", "",
              "| method | setting | mean ground-truth reward | KL(pi \\|\\| pi_ref), nats | ground-truth scores | "
              "reward-model scores | wall time a run, s |",
              "|---|---|---|---|---|---|---|"]
    by = {(p["method"], p["setting"]): p for p in summary["points"]}
    for m, settings in summary["frontiers"].items():
        for s in settings:
            p = by[(m, s)]
            kl = (f"{p['kl']:.2f} (analytic)" if p.get("kl_note")
                  else f"{p['kl']:.2f} ± {p['kl_se']:.2f} ({p['kl_sample_se']:.2f})")
            rm = p["labels"].get("rm_scores", 0)
            if p["labels"].get("rm_scores_per_evaluated_sample"):
                rm = f"{p['labels']['rm_scores_per_evaluated_sample']} per sample"
            lines.append(f"| {m} | {s} | {p['reward_mean']:+.3f} ± {p['reward_se']:.3f} ({p['reward_sample_se']:.3f}) "
                         f"| {kl} | {p['labels']['gt_scores']} | {rm} | {seconds(p['wall_s'])} |")
    lines += [""]
    for seed, w in summary["seeds"].items():
        rm = w["reward_model"]
        lines.append(f"Seed {seed}: {w['pairs']['train']} training pairs; reward model held-out pair accuracy "
                     f"{rm['heldout_pair_accuracy']:.3f} on {rm['heldout_pairs']} pairs, Pearson r with the ground "
                     f"truth {rm['pearson_with_ground_truth']:.3f}.")
    lines += [""] + [f"- {describe(c)}" for c in summary["comparisons"]]
    if summary["matched_budget"]:
        mb = summary["matched_budget"]
        lines += ["", f"Matched budget, at most {mb['gt_scores']} ground-truth scores each:"]
        lines += [f"- {describe(c)}" for c in mb["comparisons"]]
    return "\n".join(lines) + "\n"


def print_table(summary: dict) -> None:
    log(f"{'method':14s} {'setting (frontier, chosen on validation)':44s} {'reward ± seed se':>17s} "
        f"{'KL ± seed se':>15s} {'GT scores':>9s}")
    by = {(p["method"], p["setting"]): p for p in summary["points"]}
    for m, settings in summary["frontiers"].items():
        for s in settings:
            p = by[(m, s)]
            log(f"{m:14s} {s:44s} {p['reward_mean']:+8.3f} ± {p['reward_se']:.3f} {p['kl']:7.3f} ± {p['kl_se']:.3f} "
                f"{p['labels']['gt_scores']:>9d}")


if __name__ == "__main__":
    try:
        sys.exit(0 if main() is not None else 130)  # 130: interrupted in SFT, a checkpoint saved; re-run to resume
    except KeyboardInterrupt:
        print("interrupted (nothing half-written is kept); run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, DeviceError) as err:  # RunFolderError, CheckpointError, disk errors, device
        print(f"frontier.py: error: {err}", file=sys.stderr)
        sys.exit(1)
