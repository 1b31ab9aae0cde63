"""The loss functions' cost next to a model step, and what a loss without a reference saves.

Times, on one CPU thread and float32 (the training dtype):
    loss        dpo_step_loss, the training step's loss part (every loss of losses.LOSS_TABLE at its
                defaults: the loss, its hand-written gradient, the rewards), on the batch's N pairs
    step        train.dpo_step on a padded batch of the same N pairs: forward, log-probs, the loss,
                the backward (the model's cost; clipping and AdamW excluded)
    reference   the frozen reference's forward on that batch (scoring.batch_logps): what a step costs
                more when the reference is run every step (--recompute-reference), and what the
                reference cache pass costs per batch; a loss without a reference (SimPO, CPO, ORPO,
                AlphaPO, sft) needs neither
Medians of repeated runs; the machine and its load are recorded with the rows.

    python bench/bench_losses.py                      # C0's shape (bench_step.py), 16 pairs
    python bench/bench_losses.py --config micro --reps 20 --steps 3 --json ''
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_step import CONFIGS, cpu_model  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def run(config: str, reps: int, steps: int, seed: int = 0) -> dict:
    from minidpo import runtime
    from minidpo.data import TokenizedPair
    from minidpo.losses import LOSS_TABLE, dpo_step_loss
    from minidpo.model import init_params
    from minidpo.scoring import batch_logps
    from minidpo.train import TrainConfig, batcher_for, dpo_step

    cfg = CONFIGS[config]
    mc = cfg.model_config()
    n = cfg.pairs
    rng = np.random.default_rng(seed)
    half = cfg.T // 2
    pairs = [TokenizedPair([int(t) for t in rng.integers(1, cfg.vocab, half // 2)],
                           [int(t) for t in rng.integers(1, cfg.vocab, int(rng.integers(half // 2, half)))],
                           [int(t) for t in rng.integers(1, cfg.vocab, int(rng.integers(half // 2, half)))])
             for _ in range(n)]
    batch = batcher_for(TrainConfig(), 0, "cpu").pairs(pairs)  # the default layout, as training runs it
    policy = init_params(mc, seed=1, dtype=np.float32)
    reference = init_params(mc, seed=2, dtype=np.float32)
    rows = []
    with runtime.use_threads(1):
        ref, counts = batch_logps(reference, mc, batch)
        ref_c, ref_r = ref[:n], ref[n:]
        tc = TrainConfig()
        dpo_step(policy, mc, batch, ref_c, ref_r, tc)  # warm-up (kernel compilation, allocator)
        step_ms = statistics.median(_median_ms(lambda: dpo_step(policy, mc, batch, ref_c, ref_r, tc), 1)
                                    for _ in range(steps))
        ref_ms = statistics.median(_median_ms(lambda: batch_logps(reference, mc, batch), 1)
                                   for _ in range(steps))
        logps = np.concatenate([ref_c + rng.normal(0, 1, n), ref_r + rng.normal(0, 1, n)]).astype(np.float32)
        for name, row in LOSS_TABLE.items():
            t = TrainConfig(loss_type=name)
            lp = logps / counts.astype(np.float32) if t.logps_averaged else logps
            rc, rr = (ref_c, ref_r) if row.needs_reference() else (None, None)
            inputs = {"reference_point": 0.1} if name == "kto" else None
            loss_ms = _median_ms(lambda: dpo_step_loss(lp, counts, rc, rr, t, inputs), reps)
            rows.append({"loss": name, "loss_ms": loss_ms, "fraction_of_step": loss_ms / step_ms,
                         "reference": row.needs_reference()})
    machine = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": 1, "numpy": np.__version__,
               "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return {"config": config, "pairs": n, "T": int(batch.shape[1]), "dtype": "float32",
            "step_ms": step_ms, "reference_forward_ms": ref_ms,
            "reference_free_saving_recomputed": ref_ms / (ref_ms + step_ms), "rows": rows, "machine": machine}


def report(res: dict) -> str:
    lines = [f"{res['config']}: {res['pairs']} pairs x {res['T']} tokens, {res['dtype']}, one thread, "
             f"{res['machine']['cpu']} (load {res['machine']['load_avg_1m']:.1f})",
             f"DPO step (forward + loss + backward): {res['step_ms']:.1f} ms; the reference's forward: "
             f"{res['reference_forward_ms']:.1f} ms",
             f"a loss without a reference, with the reference recomputed each step: "
             f"{res['reference_free_saving_recomputed']:.0%} of the step saved", "",
             "| loss | loss part, ms | of the model step | needs pi_ref |", "|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['loss']} | {r['loss_ms']:.3f} | {r['fraction_of_step']:.2%} | {'yes' if r['reference'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="C0", choices=sorted(CONFIGS))
    ap.add_argument("--reps", type=int, default=200, help="timed calls of each loss (median)")
    ap.add_argument("--steps", type=int, default=7, help="timed model steps and reference forwards (median)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "losses-cpu.json"), help="'' to skip")
    args = ap.parse_args(argv)
    res = run(args.config, args.reps, args.steps)
    print(report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
