"""The paper's controlled-sentiment experiment (Sec. 6.1), in miniature, from nothing.

    python examples/train_tiny.py                      # CPU, a few minutes on 2 cores
    python examples/train_tiny.py --quick              # about 30 s: the pipeline end to end
    python examples/train_tiny.py --device cuda        # the same on a GPU (pip install 'minidpo[cuda12]')
    python examples/train_tiny.py --betas 0.05,0.1,0.5 # the reward-vs-KL frontier (Fig. 2, left)
    python examples/train_tiny.py --seeds 0,1,2        # the job once per training seed: mean and spread
    mpiexec -n 2 python examples/train_tiny.py         # SFT and DPO data-parallel on 2 processes

What happens, as in the paper:
  1. corpus: seeded synthetic movie reviews (minidpo.tasks.sentiment), positive, negative, mixed;
  2. tokenizer: a byte-level BPE trained on that corpus (`tokenizers`);
  3. SFT: a small GPT-2 learns to write reviews; the result is pi_ref;
  4. preferences: for each training prompt (the first words of a review) sample continuations
     from pi_ref and label each pair with the ground-truth reward, VADER's sentiment score;
  5. DPO: a policy initialised at pi_ref minimises eq. (7) against the frozen pi_ref;
  6. evaluation on held-out prompts: mean ground-truth reward of SFT samples vs DPO samples
     (with standard errors), KL(pi || pi_ref) estimated from the DPO samples, held-out
     preference accuracy of the implicit reward (eq. 8), example continuations.

Everything lands in --out (default runs/tiny, or runs/tiny-quick etc.: the options that differ
from the defaults name the folder): run.json (the options), tokenizer.json, sft/ and dpo_beta*/
(checkpoints, metrics.jsonl, training_curves.png), pairs_train.jsonl / pairs_eval.jsonl with
pairs.json (what they were sampled from), summary.json, training_curves.png and reward_vs_kl.png.

Re-running with the same --out resumes: finished stages are not redone, and an interrupted
stage continues where it stopped. Ctrl-C saves a checkpoint and exits with status 130; nothing
after the interrupted stage runs. Each stage records what it was built from (the SFT model's
fingerprint for the pairs; reference and data fingerprints for DPO) and is rebuilt when that
differs. Other options on an existing --out stop with the differences named (use another
--out, or --overwrite); more --dpo-steps extend the DPO runs, a new beta adds a dpo_beta* folder.

Two seeds. --seed (the data seed) draws the corpus (hence the tokenizer), the training and
held-out prompts and the evaluation's sampling stream. --train-seed (default: --seed) draws
everything training does: the model's initialisation, the SFT and DPO batch orders and the
continuations sampled from pi_ref to make the pairs. --seeds 0,1,2 runs the job once per training
seed, the data seed fixed, in <out>/train_seed<S>/ (each an ordinary run folder: it resumes, and
the one whose training seed equals --seed is the plain run, bit for bit), then writes
<out>/summary.json with each figure's mean, sample standard deviation and min-max over the seeds
beside the default seed's value. Why the data stay fixed: another CPU or BLAS rounds the last bits
differently, which changes every trained model and everything sampled from one, but not the corpus
or the prompts; the spread over training seeds is the yardstick for such a re-run, and the
held-out prompts (and the evaluation's sampling stream) being the same, it is the spread of
training, not of the evaluation set (that is the standard error beside each mean).

Under mpiexec every rank computes the same corpus, tokenizer, pairs and samples (same seeds), SFT
and DPO split each batch over the ranks, and rank 0 alone prints and writes --out; an error on
any rank stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from minidpo import distributed, runtime
from minidpo.backend import DeviceError, get_backend, parse_device
from minidpo.cli import ArgumentParser, tokenizer_fingerprint
from minidpo.data import PreferenceExample, build_preference_dataset, build_sft_dataset
from minidpo.evaluate import kl_from_samples, mean_and_stderr, sample_continuations
from minidpo.model import GPTConfig, init_params, num_params
from minidpo.losses import LOSS_TABLE
from minidpo.plots import plot_reward_vs_kl, plot_training_curves
from minidpo.tasks import sentiment
from minidpo.tokenizer import UNDECODABLE_NOTE, BPETokenizer
from minidpo.scoring import batched_sequence_logps
from minidpo.train import (TrainConfig, batcher_for, check_run_options, evaluate_preferences, fingerprint,
                           interrupt_hook, read_metrics, run_lock, train_dpo, train_sft)

# Two sizes of the same experiment. "default" is sized for a 2-core CPU in under 10 minutes.
PRESETS = {
    "default": dict(n_reviews=4000, vocab=512, n_layer=4, n_head=4, n_embd=128, n_ctx=64,
                    sft_steps=700, sft_batch=32, sft_lr=2e-3, n_train_prompts=1600, n_eval_prompts=256,
                    n_samples=2, dpo_steps=300, dpo_batch=16, dpo_lr=5e-5, max_new_tokens=40),
    "quick": dict(n_reviews=1200, vocab=384, n_layer=2, n_head=2, n_embd=64, n_ctx=64,
                  sft_steps=160, sft_batch=32, sft_lr=3e-3, n_train_prompts=400, n_eval_prompts=96,
                  n_samples=2, dpo_steps=60, dpo_batch=16, dpo_lr=2e-4, max_new_tokens=32),
}


# options that change what the run computes, recorded in --out/run.json; a re-run with other
# values stops (new --out, or --overwrite). --dpo-steps may grow (DPO's constant schedule resumes),
# and each --beta/--betas value is its own dpo_beta*/ folder, so neither is in this list.
RESULT_OPTIONS = ("quick", "seed", "train_seed", "loss", "label_smoothing", "pair_mode", "bt_temperature", "n_samples", "sft_steps")
# what this script writes in --out (fnmatch patterns): all that --overwrite removes
OUTPUTS = ("sft", "dpo_beta*", "tokenizer.json", "tokenizer_config.json", "pairs_train.jsonl", "pairs_eval.jsonl",
           "pairs.json", "summary.json", "training_curves.png", "reward_vs_kl.png")


def parse_args(argv=None):
    p = ArgumentParser(prog="train_tiny.py", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda / cuda:N (CuPy)")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/tiny, plus the options that differ from the defaults, "
                        "e.g. runs/tiny-quick); re-use it to resume")
    p.add_argument("--overwrite", action="store_true", help="discard a run with other options already in --out")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 30 s on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0,
                   help="the data seed: the corpus, the tokenizer, the prompts and the evaluation's sampling")
    p.add_argument("--train-seed", type=int, default=None,
                   help="the training seed: the model's initialisation, the SFT and DPO batch orders and the "
                        "sampling of the pairs (default: --seed)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds, e.g. 0,1,2: the job once per seed (data seed fixed), "
                        "then each figure's mean and spread over them")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's KL strength beta (eq. 7); small = further from pi_ref")
    p.add_argument("--betas", default=None, help="comma-separated betas for a sweep, e.g. 0.05,0.1,0.5 (first is the main run)")
    p.add_argument("--loss", default="sigmoid", choices=list(LOSS_TABLE),
                   help="DPO loss variant (see minidpo.losses)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO epsilon")
    p.add_argument("--pair-mode", default="argmax", choices=["argmax", "bt"],
                   help="label pairs best-vs-worst (argmax) or by Bradley-Terry sampling (eq. 1)")
    p.add_argument("--bt-temperature", type=float, default=0.1, help="Bradley-Terry temperature for --pair-mode bt")
    p.add_argument("--n-samples", type=int, default=None, help="continuations sampled per prompt to build pairs")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the preset's, 700 or 160 with --quick)")
    p.add_argument("--dpo-steps", type=int, default=None,
                   help="DPO steps (default: the preset's, 300 or 60 with --quick); more extend a finished run")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for minidpo's fast path, each matrix product shared among them with the "
                        "BLAS on one thread each (default 1: this model's matrices are small); 0 = the BLAS "
                        "library's own threading, whose idle threads spinning on a busy machine can slow every "
                        "matmul several-fold")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--zero1", action="store_true", help="under mpiexec: shard the AdamW moments across the ranks")
    args = p.parse_args(argv)
    for name, lo in (("n_samples", 2), ("sft_steps", 1), ("dpo_steps", 1), ("threads", 0), ("seed", 0),
                     ("train_seed", 0)):
        v = getattr(args, name)
        if v is not None and v < lo:
            p.error(f"argument --{name.replace('_', '-')}: must be >= {lo}, got {v}")
    try:
        parse_device(args.device)
    except ValueError as err:
        p.error(f"argument --device: {err}")
    betas = args.betas.split(",") if args.betas else [str(args.beta)]
    try:
        args.beta_list = [float(b) for b in betas]
    except ValueError:
        p.error(f"--betas: expected numbers separated by commas, got {args.betas!r}")
    if not all(b > 0 for b in args.beta_list):
        p.error("every beta must be > 0")
    if args.train_seed == args.seed:
        args.train_seed = None  # the default: one run, one name, one run.json
    args.seed_list = None
    if args.seeds is not None:
        try:
            args.seed_list = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            p.error(f"argument --seeds: expected integers separated by commas, got {args.seeds!r}")
        if not args.seed_list or min(args.seed_list) < 0 or len(set(args.seed_list)) != len(args.seed_list):
            p.error(f"argument --seeds: expected distinct integers >= 0, got {args.seeds!r}")
        if args.train_seed is not None:
            p.error("argument --seeds: not with --train-seed (--seeds runs each training seed)")
    if args.out is None:
        args.out = default_out(args, p)
    return args


def default_out(args, parser) -> str:
    """runs/tiny, with a suffix for each result option that differs from its default: different
    runs never share a folder by default (runs/tiny-quick, runs/tiny-quick-seed1-ipo, ...)."""
    parts = ["tiny"]
    for name in RESULT_OPTIONS:
        v = getattr(args, name)
        if v != parser.get_default(name):
            if v is True:
                parts.append(name)
            else:
                parts.append(f"{name.replace('_', '')}{v:g}" if isinstance(v, float) else f"{name.replace('_', '')}{v}")
    if args.seeds is not None:
        parts.append("seeds")
    return str(Path("runs") / "-".join(parts))


def training_seed(args) -> int:
    """The seed of everything training draws (init, batch orders, the pairs' sampling): --train-seed,
    or --seed when it is not given."""
    return args.seed if args.train_seed is None else args.train_seed


_RANK = 0  # under mpiexec, rank 0 alone prints and writes


def log(msg: str) -> None:
    if _RANK == 0:
        print(msg, flush=True)


def main(argv=None) -> dict | None:
    """Run the experiment; the summary dict, or None when an interrupt stopped it (a checkpoint
    was saved: the same command resumes)."""
    args = parse_args(argv)
    runtime.cpu_defaults()  # NumPy's hugepage advice off, freed memory kept for reuse (minidpo/runtime.py)
    go = run_seeds if args.seed_list is not None else run
    if args.threads > 0:
        with runtime.use_threads(args.threads):  # the fast path's pool threads, the BLAS on one each
            return go(args)
    return go(args)


def cpu_path_of(backend) -> str | None:
    """What the CPU fast path ran on (runtime.describe_cpu_path), None on a GPU: figures differ in
    their last digits between the compiled kernels and the NumPy passes, and between BLAS libraries."""
    return runtime.describe_cpu_path() if backend.device == "cpu" else None


def build_pairs(out: Path, args, cfg, reference, mcfg, tokenizer, reward_fn, prompts_by_split, gen_kw, comm):
    """Preference pairs sampled from pi_ref and labelled by the ground-truth reward, both splits.

    pairs.json records what they were built from (the SFT model's fingerprint, the pairing
    options); pairs whose record differs, or was never written (an interrupted sampling), are
    rebuilt, so a re-run never reuses pairs of another or a half-trained pi_ref. Under mpiexec
    rank 0 decides and writes; every rank samples the same pairs (same model, same seeds)."""
    made_from = {"reference": fingerprint(reference), "pair_mode": args.pair_mode,
                 "bt_temperature": args.bt_temperature, "n_samples": cfg["n_samples"], "seed": training_seed(args),
                 "max_new_tokens": cfg["max_new_tokens"]}
    meta = out / "pairs.json"
    paths = {split: out / f"pairs_{split}.jsonl" for split in prompts_by_split}

    def reusable() -> bool:  # rank 0: are the pairs on disk this pi_ref's? if not, forget them
        if meta.exists() and json.loads(meta.read_text(encoding="utf-8")) == made_from and all(
                p.exists() for p in paths.values()):
            return True
        if meta.exists():
            log("      pairs were built from another pi_ref or other options: rebuilding them")
            meta.unlink()
        return False

    if distributed.on_rank0(comm, reusable):
        return {split: [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
                for split, path in paths.items()}
    rng = np.random.default_rng([training_seed(args), 4])

    def sample_fn(prompts, n):
        s = sample_continuations(reference, mcfg, tokenizer, prompts, n, rng=rng, progress=progress_name,
                                 on_batch=lambda: interrupt_hook("pairs"), **gen_kw)
        return [s.texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    result = {}
    for split, prompts in prompts_by_split.items():
        progress_name = None if args.no_progress or comm.rank > 0 else f"sampling {split} pairs"
        pairs, _ = sentiment.build_preference_pairs(
            prompts, sample_fn, reward_fn, n_samples=cfg["n_samples"], mode=args.pair_mode, rng=rng,
            temperature=args.bt_temperature)
        if comm.rank == 0:
            tmp = paths[split].with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
            tmp.replace(paths[split])
        result[split] = pairs
    if comm.rank == 0:
        tmp = meta.with_suffix(".tmp")  # written last: the pairs are complete and belong to this pi_ref
        tmp.write_text(json.dumps(made_from, indent=2) + "\n", encoding="utf-8")
        tmp.replace(meta)
    return result


def run(args) -> dict | None:
    cfg = dict(PRESETS["quick" if args.quick else "default"])
    for key, val in (("sft_steps", args.sft_steps), ("dpo_steps", args.dpo_steps), ("n_samples", args.n_samples)):
        if val is not None:
            cfg[key] = val
    betas = args.beta_list
    out = Path(args.out)
    global _RANK
    comm = distributed.from_environment(args.device, zero1=args.zero1)  # SingleProcess without mpiexec
    _RANK = comm.rank
    backend = get_backend(comm.device or args.device)  # under NCCL: this rank's own GPU
    # K ranks: an error on one stops every rank (one line), none is left waiting in a collective
    with distributed.abort_on_error(comm), contextlib.ExitStack() as held:

        def claim_folder():  # rank 0 alone: the lock (held to the end), then run.json's check or write
            held.enter_context(run_lock(out))
            check_run_options(out, {k: getattr(args, k) for k in RESULT_OPTIONS}, args.overwrite, OUTPUTS)

        distributed.on_rank0(comm, claim_folder)
        return _run(args, cfg, betas, out, backend, comm)


def _run(args, cfg, betas, out, backend, comm) -> dict | None:
    t_start = time.perf_counter()
    train_seed = training_seed(args)
    timings = {}
    show = not args.no_progress and comm.rank == 0  # progress bars: rank 0's
    log(f"minidpo controlled-sentiment run: device={backend.device} out={out} preset={'quick' if args.quick else 'default'} "
        f"data seed {args.seed}, training seed {train_seed}")
    if backend.device == "cpu":
        log(f"  cpu path: {cpu_path_of(backend)}")

    # 1. corpus --------------------------------------------------------------------------------
    corpus = sentiment.sft_corpus(cfg["n_reviews"], seed=args.seed)  # [(prompt, continuation)]
    reward_fn = sentiment.SentimentReward()

    # 2. tokenizer (a function of the corpus, which run.json pins) -----------------------------
    tok_path = out / "tokenizer.json"
    tokenizer = None

    def make_tokenizer():  # rank 0 alone trains and writes it; the other ranks then read that file
        nonlocal tokenizer
        if tok_path.exists():
            tokenizer = BPETokenizer.load(tok_path)
        else:
            tokenizer = BPETokenizer.train([p + c for p, c in corpus], vocab_size=cfg["vocab"])
            tokenizer.save(tok_path)

    distributed.on_rank0(comm, make_tokenizer)
    if tokenizer is None:
        tokenizer = BPETokenizer.load(tok_path)
    log(f"[1/5] corpus {len(corpus)} reviews; BPE tokenizer with {tokenizer.vocab_size} tokens -> {tok_path}")

    # 3. SFT -----------------------------------------------------------------------------------
    mcfg = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=cfg["n_ctx"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"])
    n_eval_sft = max(len(corpus) // 20, 16)
    sft_items, _ = build_sft_dataset(corpus, tokenizer, max_length=mcfg.n_ctx)
    sft_train, sft_eval = sft_items[n_eval_sft:], sft_items[:n_eval_sft]
    sft_tc = TrainConfig(steps=cfg["sft_steps"], batch_size=cfg["sft_batch"], lr=cfg["sft_lr"], warmup_steps=20,
                         schedule="cosine", weight_decay=0.01, seed=train_seed, log_every=20,
                         eval_every=max(cfg["sft_steps"] // 4, 1), save_every=200, progress=show)
    reference = init_params(mcfg, backend, seed=train_seed)
    log(f"[2/5] SFT of a GPT-2 ({mcfg.n_layer} layers, {mcfg.n_embd} channels, {num_params(reference):,} params) "
        f"on {len(sft_train)} reviews for {sft_tc.steps} steps")
    t0 = time.perf_counter()
    tok_id = {"tokenizer": tokenizer_fingerprint(tokenizer)}  # checked when a stage's model is loaded (cli.load_model)
    res = train_sft(reference, mcfg, sft_train, tokenizer.pad_id, sft_tc, out / "sft", backend=backend,
                    eval_items=sft_eval, inputs={"start": f"random init, seed {train_seed}", **tok_id}, stale="rebuild",
                    comm=comm)
    if res.stopped_early:
        return None
    timings["sft_s"] = time.perf_counter() - t0

    # 4. preference pairs sampled from pi_ref, labelled by the ground-truth reward -------------
    gen_kw = dict(max_new_tokens=cfg["max_new_tokens"], temperature=1.0, backend=backend)
    t0 = time.perf_counter()
    prompts_train = sentiment.make_prompts(cfg["n_train_prompts"], seed=args.seed + 1)
    prompts_eval = sentiment.make_prompts(cfg["n_eval_prompts"], seed=args.seed + 2)
    raw_pairs = build_pairs(out, args, cfg, reference, mcfg, tokenizer, reward_fn,
                            {"train": prompts_train, "eval": prompts_eval}, gen_kw, comm)
    pair_sets = {}
    for split, pairs in raw_pairs.items():
        path = out / f"pairs_{split}.jsonl"
        examples = [PreferenceExample(p["prompt"], p["chosen"], p["rejected"], f"{path.name}:{i + 1}")
                    for i, p in enumerate(pairs)]
        tokenized, pstats = build_preference_dataset(examples, tokenizer, max_length=mcfg.n_ctx,
                                                     max_prompt_length=mcfg.n_ctx // 2)
        pair_sets[split] = tokenized
        log(f"[3/5] {'training' if split == 'train' else 'held-out'}: {len(tokenized)} preference pairs from "
            f"{len(pairs)} labelled samples ({pstats.n_dropped} dropped) -> {path}")
    timings["pairs_s"] = time.perf_counter() - t0

    # 4. DPO for each beta ----------------------------------------------------------------------
    policies = {}
    for beta in betas:
        run_dir = out / f"dpo_beta{beta:g}"
        tc = TrainConfig(steps=cfg["dpo_steps"], batch_size=cfg["dpo_batch"], lr=cfg["dpo_lr"], warmup_steps=10,
                         schedule="constant", seed=train_seed, log_every=10, eval_every=max(cfg["dpo_steps"] // 5, 1),
                         save_every=100, beta=beta, loss_type=args.loss,
                         loss_options={"label_smoothing": args.label_smoothing} if args.label_smoothing else {},
                         progress=show)
        policy = {k: v.copy() for k, v in reference.items()}
        log(f"[4/5] DPO beta={beta:g} loss={args.loss} on {len(pair_sets['train'])} pairs for {tc.steps} steps")
        t0 = time.perf_counter()
        res = train_dpo(policy, reference, mcfg, pair_sets["train"], tokenizer.pad_id, tc, run_dir, backend=backend,
                        eval_pairs=pair_sets["eval"], inputs=tok_id, stale="rebuild", comm=comm)
        if res.stopped_early:
            return None
        timings[f"dpo_beta{beta:g}_s"] = time.perf_counter() - t0
        policies[beta] = (policy, tc, run_dir)

    # 5. evaluation on held-out prompts: SFT, then each DPO policy ------------------------------
    t0 = time.perf_counter()
    eval_rng_seed = [args.seed, 5]  # the data seed's: every training seed is evaluated on the same samples' stream
    log(f"[5/5] held-out evaluation of SFT (pi_ref): {len(prompts_eval) * 2} samples")
    sft_samples = sample_continuations(reference, mcfg, tokenizer, prompts_eval, 2,
                                       rng=np.random.default_rng(eval_rng_seed),
                                       progress="sampling SFT" if show else None, **gen_kw)
    interrupt_hook("evaluation")
    sft_rewards = reward_fn([p + t for p, t in zip(sft_samples.prompts, sft_samples.texts)])
    sft_mean, sft_se = mean_and_stderr(sft_rewards)
    summary = {"device": backend.device, "preset": "quick" if args.quick else "default", "model": mcfg.to_dict(),
               "cpu_path": cpu_path_of(backend), "data_seed": args.seed, "train_seed": train_seed,
               "ran": what_ran(args),
               "n_params": num_params(reference), "pair_mode": args.pair_mode, "loss": args.loss,
               "n_pairs": {k: len(v) for k, v in pair_sets.items()},
               "sft": {"reward_mean": sft_mean, "reward_se": sft_se, "n_samples": len(sft_rewards)}}
    runs = []
    curves = {}
    for beta, (policy, tc, run_dir) in policies.items():
        log(f"[5/5] held-out evaluation of DPO beta={beta:g}: {len(prompts_eval) * 2} samples, their reward, KL, "
            f"implicit-reward accuracy on {len(pair_sets['eval'])} held-out pairs")
        samples = sample_continuations(policy, mcfg, tokenizer, prompts_eval, 2,
                                       rng=np.random.default_rng(eval_rng_seed),
                                       progress=f"sampling DPO beta={beta:g}" if show else None, **gen_kw)
        interrupt_hook("evaluation-dpo")
        rewards = reward_fn([p + t for p, t in zip(samples.prompts, samples.texts)])
        kls = kl_from_samples(policy, reference, mcfg, samples, tokenizer.pad_id, backend=backend)
        batcher = batcher_for(tc, tokenizer.pad_id, backend)  # the layout DPO trained with
        acc = evaluate_preferences(policy, mcfg, pair_sets["eval"], *batched_sequence_logps(
            reference, mcfg, pair_sets["eval"], batcher, tc.eval_batch_size, comm=comm), batcher, tc,
            comm=comm)["eval/rewards/accuracies"]
        r_mean, r_se = mean_and_stderr(rewards)
        kl_mean, kl_se = mean_and_stderr(kls)
        runs.append({"beta": beta, "reward_mean": r_mean, "reward_se": r_se, "kl": kl_mean, "kl_se": kl_se,
                     "accuracy": acc, "dir": str(run_dir),
                     "examples": [{"prompt": sft_samples.prompts[i], "sft": sft_samples.texts[i],
                                   "dpo": samples.texts[i]} for i in range(0, 6, 2)]})
        if comm.rank == 0:
            curves[f"beta={beta:g}"] = read_metrics(run_dir / "metrics.jsonl")
            plot_training_curves(curves[f"beta={beta:g}"], run_dir / "training_curves.png", title=f"DPO, beta={beta:g}")
    timings["evaluation_s"] = time.perf_counter() - t0
    summary["dpo"] = {k: v for k, v in runs[0].items() if k != "examples"}
    summary["sweep"] = [{k: v for k, v in r.items() if k != "examples"} for r in runs]
    summary["examples"] = runs[0]["examples"]
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 1) for k, v in timings.items()}

    # outputs ------------------------------------------------------------------------------------
    if comm.rank > 0:  # rank 0 writes the figures, summary.json and the report
        return summary
    plot_training_curves(curves, out / "training_curves.png",
                         title="DPO training curves" + (" across betas" if len(curves) > 1 else f", {next(iter(curves))}"))
    plot_training_curves(read_metrics(out / "sft" / "metrics.jsonl"), out / "sft" / "training_curves.png",
                         title="SFT (pi_ref)")
    plot_reward_vs_kl(summary["sweep"], out / "reward_vs_kl.png", sft=summary["sft"])
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tmp.replace(out / "summary.json")
    print_report(summary)
    return summary


def what_ran(args) -> dict:
    """The options that made the figures and the software and machine that computed them (beside
    summary.json's "cpu_path"): what a reader needs to reproduce the run or to see why its last
    digits differ."""
    import platform

    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import numba

        versions["numba"] = numba.__version__
    except ImportError:
        versions["numba"] = None
    options = {k: getattr(args, k) for k in RESULT_OPTIONS}
    options.update(train_seed=training_seed(args), betas=args.beta_list, dpo_steps=args.dpo_steps)
    return {"options": options, "versions": versions, "machine": machine()}


def machine() -> str:
    """The CPU model and its logical core count (runtime.machine)."""
    return runtime.machine()


# ---------------------------------------------------------------------------------------------
# --seeds: the job once per training seed, each figure's mean and spread
# ---------------------------------------------------------------------------------------------


def figures_of(summary: dict) -> dict:
    """The figures of the main job's table, by name: the SFT reward, then for each beta the DPO
    reward, KL and held-out implicit-reward accuracy."""
    out = {"SFT reward": summary["sft"]["reward_mean"]}
    for r in summary["sweep"]:
        b = format(r["beta"], "g")
        out[f"DPO beta={b} reward"] = r["reward_mean"]
        out[f"DPO beta={b} KL"] = r["kl"]
        out[f"DPO beta={b} accuracy"] = r["accuracy"]
    return out


def spread(values) -> dict:
    """n, mean, sample standard deviation (ddof 1; None for one value), min and max of a figure
    over seeds, and the values themselves."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else None
    return {"n": int(len(v)), "mean": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()),
            "values": [float(x) for x in v]}


def seed_spread(summaries: dict, default_seed: int | None) -> dict:
    """{figure: spread over the seeds, plus "default": the default seed's value (None if that seed
    did not run)}, from {training seed: summary}. Every summary must hold the same figures."""
    per_seed = {s: figures_of(x) for s, x in summaries.items()}
    names = list(next(iter(per_seed.values())))
    for s, f in per_seed.items():
        if list(f) != names:
            raise ValueError(f"training seed {s} has the figures {list(f)}, the others {names}")
    out = {}
    for name in names:
        out[name] = spread([per_seed[s][name] for s in summaries])
        out[name]["default"] = per_seed[default_seed][name] if default_seed in per_seed else None
    return out


def run_seeds(args) -> dict | None:
    """The job once per training seed in --out/train_seed<S>/ (the data seed fixed), then
    --out/summary.json: every seed's figures, their mean and spread, what ran. None when an
    interrupt stopped a seed's run (the same command resumes)."""
    import copy

    out = Path(args.out)
    summaries, walls = {}, {}
    for s in args.seed_list:
        sub = copy.copy(args)
        sub.train_seed = None if s == args.seed else s
        sub.seeds, sub.seed_list, sub.out = None, None, str(out / f"train_seed{s}")
        log(f"=== training seed {s} ({args.seed_list.index(s) + 1} of {len(args.seed_list)}) -> {sub.out}")
        t0 = time.perf_counter()
        res = run(sub)
        if res is None:
            return None
        summaries[s], walls[s] = res, round(time.perf_counter() - t0, 1)
    if _RANK > 0:
        return {"spread": seed_spread(summaries, args.seed)}
    first = summaries[args.seed_list[0]]
    summary = {
        "what": "the main job once per training seed (model init, SFT and DPO batch orders, the pairs' sampling), "
                "the data seed (corpus, tokenizer, prompts, evaluation sampling) fixed",
        "data_seed": args.seed, "train_seeds": args.seed_list, "default_seed": args.seed,
        "cpu_path": first.get("cpu_path"), "device": first["device"], "preset": first["preset"],
        "ran": dict(what_ran(args), command="python examples/train_tiny.py " + " ".join(sys.argv[1:])),
        "spread": seed_spread(summaries, args.seed),
        "per_seed": {str(s): {"figures": figures_of(x), "sft_se": x["sft"]["reward_se"],
                              "dpo_se": {format(r["beta"], "g"): {"reward_se": r["reward_se"], "kl_se": r["kl_se"]}
                                         for r in x["sweep"]},
                              "wall_s": walls[s], "dir": str(out / f"train_seed{s}")}
                     for s, x in summaries.items()},
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tmp.replace(out / "summary.json")
    print_spread(summary)
    return summary


def print_spread(summary: dict) -> None:
    seeds = summary["train_seeds"]
    d = summary["default_seed"]
    log(f"\n  over {len(seeds)} training seeds ({', '.join(map(str, seeds))}; data seed {summary['data_seed']}); "
        f"std: sample standard deviation over the seeds")
    log(f"  {'figure':28s}{'seed ' + str(d):>12s}{'mean ± std':>22s}{'min .. max':>22s}")
    for name, f in summary["spread"].items():
        fmt = "+.3f" if name.endswith("reward") else ".3f"  # a reward has a sign; a KL or an accuracy does not
        default = "-" if f["default"] is None else format(f["default"], fmt)
        std = "-" if f["std"] is None else f"{f['std']:.3f}"
        log(f"  {name:28s}{default:>12s}{format(f['mean'], fmt):>13s} ± {std:<6s}"
            f"{format(f['min'], fmt):>11s} .. {format(f['max'], fmt)}")
    log(f"\n  {Path(summary['per_seed'][str(seeds[0])]['dir']).parent / 'summary.json'} written.")


def print_report(s: dict) -> None:
    d = s["dpo"]
    log("\n[5/5] held-out prompts: before (SFT = pi_ref) vs after (DPO)")
    log(f"  {'':28s}{'SFT':>18s}{'DPO (beta=' + format(d['beta'], 'g') + ')':>22s}")
    log(f"  {'mean ground-truth reward':28s}{s['sft']['reward_mean']:>+11.3f} ± {s['sft']['reward_se']:.3f}"
        f"{d['reward_mean']:>+15.3f} ± {d['reward_se']:.3f}")
    log(f"  {'KL(pi || pi_ref), nats':28s}{0.0:>18.3f}{d['kl']:>15.3f} ± {d['kl_se']:.3f}")
    log(f"  {'held-out pair accuracy':28s}{'':>18s}{d['accuracy']:>22.3f}   (implicit reward, eq. 8)")
    if len(s["sweep"]) > 1:
        log("\n  beta sweep (the reward-vs-KL frontier):")
        for r in s["sweep"]:
            log(f"    beta={r['beta']:<6g} reward {r['reward_mean']:+.3f} ± {r['reward_se']:.3f}   "
                f"KL {r['kl']:.3f} ± {r['kl_se']:.3f}   held-out pair accuracy {r['accuracy']:.3f}")
    log("\n  held-out examples (prompt | SFT continuation | DPO continuation):")
    for e in s["examples"]:
        log(f"    {e['prompt']!r}\n      SFT:{e['sft']}\n      DPO:{e['dpo']}")
    if any("\ufffd" in e["sft"] + e["dpo"] for e in s["examples"]):
        log(f"    ({UNDECODABLE_NOTE})")
    log(f"\n  total time {s['timings_s']['total_s']:.0f} s; summary.json, training_curves.png and reward_vs_kl.png written.")


if __name__ == "__main__":
    try:
        sys.exit(0 if main() is not None else 130)  # 130: interrupted, a checkpoint saved; re-run to resume
    except KeyboardInterrupt:
        print("interrupted (nothing half-written is kept); run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, DeviceError) as err:  # RunFolderError, CheckpointError, DataError, disk, device
        print(f"train_tiny.py: error: {err}", file=sys.stderr)
        sys.exit(1)
