"""One data-parallel training run on a tiny GPT-2, for tests/test_distributed.py.

Run as ``python tests/dp_worker.py ...`` (one process) or ``mpiexec -n K python tests/dp_worker.py ...``.
It trains through minidpo.train.train_sft / train_dpo and records, per step, what the loop sees:
the gradients after the all-reduce (as clip_grad_norm receives them) and the parameters after
AdamW, in ``<out>/trace.rank<r>.npz``. ``--fail-rank``/``--fail-step`` make one rank raise in
its step; ``--sleep`` slows every step down (for the Ctrl-C test).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minidpo import distributed, train  # noqa: E402
from minidpo.data import TokenizedPair, TokenizedSFT  # noqa: E402
from minidpo.model import GPTConfig, init_params  # noqa: E402

CONFIG = GPTConfig(vocab_size=48, n_ctx=24, n_layer=2, n_head=2, n_embd=16)


def sft_items(n: int, seed: int = 1) -> list:
    """Items with very different response lengths (1 to 14 tokens): the token-weighted mean of the
    batch differs from the naive average of shard means."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(1, 48, size=int(rng.integers(1, 6))).tolist()
        r = rng.integers(1, 48, size=int(1 + (i * 7) % 14)).tolist()
        out.append(TokenizedSFT(p, r, source=f"synthetic:{i}"))
    return out


def pairs(n: int, seed: int = 2) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(1, 48, size=int(rng.integers(1, 6))).tolist()
        c = rng.integers(1, 48, size=int(rng.integers(1, 9))).tolist()
        r = rng.integers(1, 48, size=int(rng.integers(1, 9))).tolist()
        out.append(TokenizedPair(p, c, r, source=f"synthetic:{i}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["sft", "dpo"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--n-items", type=int, default=15)
    ap.add_argument("--zero1", action="store_true")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--fail-step", type=int, default=-1)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--nan-rank", type=int, default=-1, help="this rank's loss and gradients become NaN ...")
    ap.add_argument("--nan-step", type=int, default=-1, help="... in this step")
    ap.add_argument("--recompute-reference", action="store_true")
    ap.add_argument("--float64", action="store_true",
                    help="train in float64: K ranks and one process then agree to ~1e-12, so the comparison "
                         "sees the sharding and weighting themselves, not float32 round-off amplified by AdamW")
    ap.add_argument("--no-pack", action="store_true", help="padded batches (TrainConfig.pack=False)")
    ap.add_argument("--no-share-prompt", action="store_true", help="TrainConfig.share_prompt=False")
    ap.add_argument("--seed-by-rank", action="store_true", help="initialise each rank differently (an error)")
    args = ap.parse_args(argv)

    comm = distributed.from_environment("cpu", zero1=args.zero1)
    dt = np.float64 if args.float64 else np.float32  # the training dtype, kept in the trace
    out = Path(args.out)
    trace: dict = {}
    calls = {"n": 0}
    real_clip = train.clip_grad_norm

    def recording_clip(grads, max_norm):  # the gradients after the all-reduce, before clipping
        s = calls["n"] - 1  # this step's index (sft_step/dpo_step counted it already)
        for k, g in grads.items():
            trace[f"grad/{s}/{k}"] = np.array(g, dtype=dt, copy=True)
        if args.sleep:
            time.sleep(args.sleep)
        return real_clip(grads, max_norm)

    train.clip_grad_norm = recording_clip
    real_sft, real_dpo = train.sft_step, train.dpo_step

    def maybe_fail():
        calls["n"] += 1
        if comm.rank == args.fail_rank and calls["n"] - 1 == args.fail_step:
            raise ValueError(f"injected failure in step {args.fail_step} on rank {comm.rank}")

    def sft_step(*a, **k):
        maybe_fail()
        loss, grads = real_sft(*a, **k)
        if comm.rank == args.nan_rank and calls["n"] - 1 == args.nan_step:
            loss = loss * np.float32("nan")
            grads = {n: g * np.float32("nan") for n, g in grads.items()}
        return loss, grads

    def dpo_step(*a, **k):
        maybe_fail()
        return real_dpo(*a, **k)

    train.sft_step, train.dpo_step = sft_step, dpo_step

    tc = train.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=3e-3, warmup_steps=1, grad_clip=1.0,
                           weight_decay=0.1, seed=0, log_every=1, eval_every=2, save_every=args.save_every,
                           eval_batch_size=4, progress=False, pack=not args.no_pack,
                           share_prompt=not args.no_share_prompt)
    params = init_params(CONFIG, "cpu", seed=comm.rank if args.seed_by_rank else 0, dtype=dt)
    # after every step the params are recorded by wrapping the optimizer's step
    real_make = train.make_optimizer

    def make_optimizer(c, p, **kw):
        opt = real_make(c, p, **kw)
        real_step = opt.step

        def step(params_, grads_, lr=None):
            real_step(params_, grads_, lr=lr)
            for k, v in params_.items():
                trace[f"param/{calls['n'] - 1}/{k}"] = np.array(v, dtype=dt, copy=True)

        opt.step = step
        if hasattr(opt, "state_bytes"):
            trace["opt_state_bytes"] = np.array(opt.state_bytes(), dtype=np.int64)
        else:
            trace["opt_state_bytes"] = np.array(sum(m.nbytes for m in opt.m.values()) * 2, dtype=np.int64)
        return opt

    train.make_optimizer = make_optimizer
    if args.stage == "sft":
        items = sft_items(args.n_items)
        res = train.train_sft(params, CONFIG, items, 0, tc, out, eval_items=sft_items(7, seed=9), comm=comm)
    else:
        reference = init_params(CONFIG, "cpu", seed=0, dtype=dt)
        policy = init_params(CONFIG, "cpu", seed=5, dtype=dt)
        tc.beta = 0.5
        tc.cache_reference = not args.recompute_reference
        res = train.train_dpo(policy, reference, CONFIG, pairs(args.n_items), 0, tc, out,
                              eval_pairs=pairs(7, seed=9), comm=comm)
    trace["final_step"] = np.array(res.step, dtype=np.int64)
    trace["stopped_early"] = np.array(res.stopped_early)
    for k, v in res.params.items():
        trace[f"final/{k}"] = np.array(v, dtype=dt, copy=True)
    for h in res.history:
        for k, v in h.items():
            if isinstance(v, float):
                trace[f"history/{h['step']}/{k}"] = np.array(v, dtype=np.float64)
    np.savez(out / f"trace.rank{comm.rank}.npz", **trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
