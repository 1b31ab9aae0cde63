"""Two versions of minidpo's DPO step, A/B interleaved step by step: the same batch, the same
parameters, the same thread settings, two checkouts.

    python bench/ab_step.py --a /path/to/old/checkout --b . --configs C0,C1 --threads 1
    python bench/ab_step.py --a OLD --b . --configs LP --layout shared_packed --threads 1

Each side is a worker process that imports minidpo and bench/bench_step.py from its own checkout
(PYTHONPATH), builds bench_step's step for the config (its LayoutStep, so each side runs its own
version's layout and step code: train.dpo_step, clipping, AdamW, cached reference log-probs) and
applies the run's CPU settings as that version's CLI would (the fast path's pool on --threads
threads, the BLAS on one thread when there are several, NumPy's hugepage advice off, freed memory
kept). The parent then asks A and B for one step each, alternately, ``--steps`` times after
``--warmup`` rounds, with ``--gap`` idle seconds before each, so both see the same machine
conditions; each worker times its own step (wall clock around the step). Before timing, the two
sides' losses of the same step are compared (a version that computes something else is not a
speed-up): they must agree to float32 round-off.

Output: a line per config and the JSON rows in ``--out`` (a file name per config and thread
count): medians, p10 and p90 in ms, the ratio B / A, the machine and both checkouts' commits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.bench_step import cpu_model  # noqa: E402

WORKER = r"""
import json, os, sys, time
import numpy as np
root, config, layout, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, root)
import bench.bench_step as bs
# the settings' home: runtime.py after the one-model change, fast.py before it (asked of the checkout's
# own files: an editable install's import hook would find another checkout's runtime.py)
if os.path.exists(os.path.join(root, "minidpo", "runtime.py")):
    from minidpo import runtime as rt
else:
    from minidpo import fast as rt
rt.cpu_defaults(threads)
from threadpoolctl import threadpool_limits
limiter = threadpool_limits(limits=1 if threads > 1 else threads, user_api="blas")
cfg = bs.CONFIGS[config]
device = bs.Device("cpu", "fp32")
policy, reference = bs.make_params(cfg, 0)
pairs = bs.make_pairs(cfg, 0) if cfg.prompt_range is not None else None
ids, mask = bs.make_batch(cfg, 0)
impl = bs.LayoutStep(cfg, policy, reference, device, layout, pairs) if pairs is not None else \
    bs.MinidpoStep(cfg, policy, reference, device)
b = impl.batch(ids, mask)
ref = impl.reference_logps(*b)
import minidpo
print(json.dumps({"ready": minidpo.__file__}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
        break
    t0 = time.perf_counter()
    loss = impl.step(*b, ref_logps=ref)
    dt = time.perf_counter() - t0
    print(json.dumps({"s": dt, "loss": float(loss)}), flush=True)
"""


def _commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "minidpo", "bench"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Worker:
    """One side: a process that runs one step per request and answers with its time and loss."""

    def __init__(self, root: Path, config: str, layout: str, threads: int):
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}
        self.p = subprocess.Popen([sys.executable, "-c", WORKER, str(root), config, layout, str(threads)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))
        ready = json.loads(self._line())
        if not ready["ready"].startswith(str(root.resolve())):
            raise SystemExit(f"the worker for {root} imported minidpo from {ready['ready']}")

    def _line(self) -> str:
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"a worker died (exit {self.p.wait()})")
        return line

    def step(self) -> dict:
        self.p.stdin.write("step\n")
        self.p.stdin.flush()
        return json.loads(self._line())

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except OSError:
            pass
        self.p.wait(timeout=60)


def _stats(times: list[float]) -> dict:
    import numpy as np

    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "n": len(times)}


def run(a: Path, b: Path, config: str, layout: str, threads: int, steps: int, warmup: int, gap: float) -> dict:
    """A and B interleaved, A B A B ...; returns the row."""
    sides = {"A": Worker(a, config, layout, threads), "B": Worker(b, config, layout, threads)}
    try:
        first = {k: w.step() for k, w in sides.items()}  # the same first step on both: the same loss
        la, lb = first["A"]["loss"], first["B"]["loss"]
        if abs(la - lb) > 1e-4 * max(1.0, abs(la)):
            raise SystemExit(f"{config}: the two versions' first-step losses differ: A {la} vs B {lb}")
        times = {"A": [], "B": []}
        for i in range(warmup + steps):
            for k in ("A", "B") if i % 2 == 0 else ("B", "A"):  # alternate who goes first
                time.sleep(gap)
                r = sides[k].step()
                if i >= warmup:
                    times[k].append(r["s"])
    finally:
        for w in sides.values():
            w.close()
    sa, sb = _stats(times["A"]), _stats(times["B"])
    return {"config": config, "layout": layout, "threads": threads, "steps": steps, "warmup": warmup, "gap_s": gap,
            "A": {"root": str(a), "commit": _commit(a), **sa}, "B": {"root": str(b), "commit": _commit(b), **sb},
            "ratio_B_over_A": sb["median_ms"] / sa["median_ms"], "first_step_loss": {"A": la, "B": lb}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=Path, help="checkout A (the baseline)")
    ap.add_argument("--b", required=True, type=Path, help="checkout B")
    ap.add_argument("--configs", default="C0,C1", help="bench_step configs, comma-separated")
    ap.add_argument("--layout", default="padded", help="bench_step layout (configs with per-pair lengths: LP)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gap", type=float, default=0.2, help="idle seconds before each step (untimed)")
    ap.add_argument("--out", type=Path, default=None, help="a folder for the JSON rows")
    args = ap.parse_args(argv)
    rows = []
    for config in args.configs.split(","):
        row = run(args.a, args.b, config, args.layout, args.threads, args.steps, args.warmup, args.gap)
        row["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "load_avg_start": os.getloadavg()}
        rows.append(row)
        print(f"{config} {args.layout} threads {args.threads}: A {row['A']['median_ms']:.1f} ms "
              f"({row['A']['p10_ms']:.1f}-{row['A']['p90_ms']:.1f}), B {row['B']['median_ms']:.1f} ms "
              f"({row['B']['p10_ms']:.1f}-{row['B']['p90_ms']:.1f}): B/A {row['ratio_B_over_A']:.3f}", flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"ab-{config}-{args.layout}-t{args.threads}.json").write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
