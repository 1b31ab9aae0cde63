"""Data-parallel scaling of the DPO step: K ranks on one global batch.

    OMP_NUM_THREADS=1 python bench/bench_dp.py --config D1                   # K = 1, plain AdamW
    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/bench_dp.py --config D1      # K = 2
    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/bench_dp.py --config D1 --zero1
    mpiexec -n 2 python bench/bench_dp.py --device cuda                      # 2 GPUs, NCCL
    python bench/bench_dp.py --device cuda --force-comm nccl                  # 1 GPU: the NCCL path, K = 1

One step, as minidpo.train runs it with a communicator, timed phase by phase on every rank:

    compute    this rank's shard: policy forward + DPO loss + backward (train.dpo_step)
    wait       a barrier before the all-reduce: time lost to the slowest rank (load imbalance)
    allreduce  distributed.all_reduce_step: pack w_r * grads into one flat buffer, sum over the
               ranks, unpack (the communication of the step)
    optimizer  global-norm clip + AdamW (ZeRO-1: this rank's chunk + the parameter all-gather)

Rank 0 writes one row per run to bench/results/dp-<device>-<machine>.json (rows merged by
(config, ranks, zero1, device)): median step time, tokens/s of the global batch (non-pad
tokens of its 2N rows), the communication share (wait + allreduce) / step, the optimizer state
held per rank (bytes, exact) and each rank's peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minidpo import distributed  # noqa: E402
from minidpo.backend import get_backend  # noqa: E402
from minidpo.data import TokenizedPair, collate_preferences  # noqa: E402
from minidpo.model import GPTConfig, init_params, num_params  # noqa: E402
from minidpo.optim import clip_grad_norm  # noqa: E402
from minidpo.train import TrainConfig, batch_for_step, dpo_step  # noqa: E402

from bench.bench_step import cpu_model  # noqa: E402

# (layers, channels, heads, T, vocab, pairs in the global batch)
CONFIGS = {
    "D0": dict(n_layer=4, n_embd=128, n_head=4, T=64, vocab=512, pairs=16),  # bench_step's C0: tiny
    "D1": dict(n_layer=4, n_embd=256, n_head=4, T=128, vocab=8192, pairs=8),  # a small GPT-2
    "micro": dict(n_layer=1, n_embd=16, n_head=2, T=16, vocab=64, pairs=4),  # for the tests
}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "unknown"


def synthetic_pairs(n: int, T: int, vocab: int, seed: int = 0) -> list:
    """n pairs whose rows are T tokens or shorter (prompt T/4, responses T/2 .. 3T/4)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(1, vocab, size=T // 4).tolist()
        c = rng.integers(1, vocab, size=int(rng.integers(T // 2, 3 * T // 4 + 1))).tolist()
        r = rng.integers(1, vocab, size=int(rng.integers(T // 2, 3 * T // 4 + 1))).tolist()
        out.append(TokenizedPair(p, c, r))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="D1", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--zero1", action="store_true")
    ap.add_argument("--force-comm", choices=["mpi", "nccl"], default=None,
                    help="use this communicator even with one rank (checks its path on one device)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--note", default="", help="free text stored with the row (e.g. the machine's load)")
    args = ap.parse_args(argv)

    if args.force_comm == "nccl":
        comm = distributed.NCCLComm(zero1=args.zero1)
    elif args.force_comm == "mpi":
        comm = distributed.MPIComm(zero1=args.zero1)
    else:
        comm = distributed.from_environment(args.device, zero1=args.zero1)
    backend = get_backend(comm.device or args.device)
    xp = backend.xp
    c = CONFIGS[args.config]
    mc = GPTConfig(vocab_size=c["vocab"], n_ctx=c["T"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"])
    params = init_params(mc, backend, seed=0)
    n_pairs = c["pairs"] * 4  # a small pool; each step draws a global batch of c["pairs"] from it
    pairs = synthetic_pairs(n_pairs, c["T"], c["vocab"])
    ref_c = xp.asarray(np.full(n_pairs, -200.0, dtype=np.float32))
    ref_r = xp.asarray(np.full(n_pairs, -200.0, dtype=np.float32))
    tc = TrainConfig(batch_size=c["pairs"], beta=0.1)
    opt = distributed.make_optimizer(comm, params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    state_bytes = opt.state_bytes() if hasattr(opt, "state_bytes") else sum(
        int(m.nbytes) + int(v.nbytes) for m, v in zip(opt.m.values(), opt.v.values()))

    def sync():
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()

    times = {k: [] for k in ("step", "compute", "wait", "allreduce", "optimizer")}
    tokens = []
    for step in range(args.warmup + args.steps):
        idx = batch_for_step(step, n_pairs, tc.batch_size, seed=0)
        local, w = distributed.local_shard(idx, comm)
        batch = collate_preferences([pairs[i] for i in local], 0, backend=backend)
        didx = xp.asarray(local)
        comm.barrier()
        t0 = time.perf_counter()
        loss, metrics, grads = dpo_step(params, mc, batch, ref_c[didx], ref_r[didx], tc)
        sync()
        t1 = time.perf_counter()
        comm.barrier()
        t2 = time.perf_counter()
        loss, metrics = distributed.all_reduce_step(comm, loss, metrics, grads, w)
        sync()
        t3 = time.perf_counter()
        clip_grad_norm(grads, 1.0)
        opt.step(params, grads, lr=1e-4)
        sync()
        t4 = time.perf_counter()
        del grads
        if step >= args.warmup:
            for k, v in (("step", t4 - t0), ("compute", t1 - t0), ("wait", t2 - t1), ("allreduce", t3 - t2),
                         ("optimizer", t4 - t3)):
                times[k].append(v)
            n_tok = sum(len(pairs[i].prompt_ids) * 2 + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)
                        for i in idx)
            tokens.append(n_tok)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the slowest rank sets the pace: report rank 0's phases and every rank's step and memory
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    per_rank = comm.allgather_host({"rank": comm.rank, "step_s": round(med["step"], 4), "compute_s": round(med["compute"], 4),
                                    "opt_state_mb": round(state_bytes / 2**20, 2), "peak_rss_mb": round(peak_mb, 1)})
    if comm.rank != 0:
        return 0
    machine = cpu_model() if backend.device == "cpu" else f"{backend.device}"
    if xp is not np:
        machine = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode()
    row = {
        "config": args.config, **c, "params": num_params(params), "ranks": comm.size, "zero1": args.zero1,
        "device": "cpu" if xp is np else "cuda", "comm": type(comm).__name__,
        "threads_per_rank": os.environ.get("OMP_NUM_THREADS"),
        "steps": args.steps, "step_s": round(med["step"], 4),
        "tokens_per_s": round(statistics.median(tokens) / med["step"], 1),
        "compute_s": round(med["compute"], 4), "wait_s": round(med["wait"], 4),
        "allreduce_s": round(med["allreduce"], 4), "optimizer_s": round(med["optimizer"], 4),
        "comm_share": round((med["wait"] + med["allreduce"]) / med["step"], 4),
        "allreduce_share": round(med["allreduce"] / med["step"], 4),
        "grad_buffer_mb": round(num_params(params) * 4 / 2**20, 2),
        "per_rank": per_rank, "machine": machine, "logical_cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "note": args.note,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dp-{row['device']}-{_slug(machine)}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    key = lambda r: (r["config"], r["ranks"], r["zero1"], r["device"], r["comm"], r.get("threads_per_rank"))  # noqa: E731
    rows = [r for r in rows if key(r) != key(row)] + [row]
    rows.sort(key=lambda r: (r["device"], r["config"], r["zero1"], r["ranks"]))
    path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"{args.config} ranks={comm.size} zero1={args.zero1}: step {med['step'] * 1e3:.1f} ms "
          f"(compute {med['compute'] * 1e3:.1f}, wait {med['wait'] * 1e3:.1f}, all-reduce {med['allreduce'] * 1e3:.1f}, "
          f"optimizer {med['optimizer'] * 1e3:.1f}); {row['tokens_per_s']:.0f} tokens/s; comm share "
          f"{row['comm_share']:.1%}; optimizer state {state_bytes / 2**20:.1f} MiB/rank; peak RSS "
          f"{[r['peak_rss_mb'] for r in per_rank]} MiB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
