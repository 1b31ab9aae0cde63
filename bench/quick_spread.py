"""The main job's --quick figures over training seeds, recorded; and the check that a re-run lies
within them.

    python bench/quick_spread.py                  # record: train_tiny.py --quick --seeds 0,...,7 -> docs/quick_spread.json
    python bench/quick_spread.py --check          # re-run train_tiny.py --quick (the default seed), hold it to that file
    python -m pytest -q --reproduce tests/test_reproduce.py   # the same check as a test (not in the default run)

Why a spread and not the digits: training amplifies last-bit differences (the NLL of two runs
that differ only in how their BLAS rounds already parts within a few hundred SFT steps), so on
another CPU, BLAS or Numba build the main job gives other last digits. What carries over is the
spread over training seeds (examples/train_tiny.py --seeds: the model's initialisation, the batch
orders and the pairs' sampling drawn anew, the data fixed): a re-run on another machine is one
more draw from it. The check passes when each figure of the re-run lies in its band,

    [min(min, mean - K std), max(max, mean + K std)]      (K = 3; std: sample std over the seeds)

and fails (exit status 1, the figures outside named) otherwise: a change that silently alters what
the job computes (DPO doing nothing, a sign error, a broken sampler) moves a figure far outside.

The recording names the CPU path it ran on (compiled kernels or NumPy passes, which BLAS); the
default install (`pip install -e ".[fast]"`) has no MKL, so record with MINIDPO_GEMM=numpy where
the `mkl` extra is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_tiny.py"
SPREAD = ROOT / "docs" / "quick_spread.json"
K = 3.0


def train_tiny():
    """examples/train_tiny.py as a module (its figures_of and spread)."""
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def band(f: dict, k: float = K) -> tuple[float, float]:
    """The interval a re-run's figure must lie in: the seeds' min-max, widened to mean +- k std."""
    std = f["std"] or 0.0
    return min(f["min"], f["mean"] - k * std), max(f["max"], f["mean"] + k * std)


def check(figures: dict, recorded: dict, k: float = K) -> list[dict]:
    """One row per recorded figure: the re-run's value, its band, and whether it lies inside. A
    figure recorded but missing from the re-run (or the other way round) is a failure too."""
    rows = []
    for name, f in recorded.items():
        lo, hi = band(f, k)
        v = figures.get(name)
        rows.append({"figure": name, "value": v, "lo": lo, "hi": hi, "mean": f["mean"], "std": f["std"],
                     "ok": v is not None and lo <= v <= hi})
    for name in sorted(set(figures) - set(recorded)):
        rows.append({"figure": name, "value": figures[name], "lo": None, "hi": None, "mean": None, "std": None,
                     "ok": False})
    return rows


def run_quick(out: Path, *extra: str) -> dict:
    """train_tiny.py --quick in a subprocess (as a user runs it); its summary.json."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out), *extra],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"train_tiny.py --quick {' '.join(extra)} exited {p.returncode}: {p.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def record(seeds: list[int], out: Path, path: Path) -> dict:
    """Run --quick once per training seed (in ``out``, resumable) and write the spread to ``path``."""
    summary = run_quick(out, "--seeds", ",".join(map(str, seeds)))
    doc = {
        "what": "examples/train_tiny.py --quick once per training seed (data seed 0): each figure's mean, sample "
                "std (ddof 1) and min-max over the seeds; bench/quick_spread.py --check holds a re-run of "
                f"`python examples/train_tiny.py --quick` to [min(min, mean - {K:g} std), max(max, mean + {K:g} std)]",
        "command": f"python bench/quick_spread.py --seeds {','.join(map(str, seeds))}",
        "train_seeds": seeds, "data_seed": summary["data_seed"], "k": K,
        "cpu_path": summary["cpu_path"], "minidpo_gemm": os.environ.get("MINIDPO_GEMM"),
        "ran": {k: v for k, v in summary["ran"].items() if k != "command"},
        "wall_s": {s: v["wall_s"] for s, v in summary["per_seed"].items()},
        "figures": summary["spread"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return doc


def run_check(path: Path, k: float = K) -> tuple[bool, list[dict], dict]:
    """Re-run --quick at the default seed in a temporary folder and hold it to ``path``'s spread."""
    recorded = json.loads(path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="minidpo-quick-") as tmp:
        summary = run_quick(Path(tmp) / "run", "--seed", str(recorded["data_seed"]))
    rows = check(train_tiny().figures_of(summary), recorded["figures"], k)
    return all(r["ok"] for r in rows), rows, summary


def print_rows(rows: list[dict]) -> None:
    print(f"{'figure':26s}{'re-run':>10s}{'recorded mean ± std':>24s}{'band':>22s}")
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.3f}"
        rec = "-" if r["mean"] is None else f"{r['mean']:.3f} ± {r['std'] or 0:.3f}"
        b = "-" if r["lo"] is None else f"[{r['lo']:.3f}, {r['hi']:.3f}]"
        print(f"{r['figure']:26s}{v:>10s}{rec:>24s}{b:>22s}  {'ok' if r['ok'] else 'OUTSIDE'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="quick_spread.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="training seeds to record (default 0..7)")
    p.add_argument("--out", default="runs/quick-spread", help="the seeds' run folders (resumable)")
    p.add_argument("--spread", default=str(SPREAD), help="the recorded spread (default docs/quick_spread.json)")
    p.add_argument("--check", action="store_true", help="re-run --quick and check it against --spread")
    p.add_argument("--k", type=float, default=K, help="band half-width in sample standard deviations (default 3)")
    args = p.parse_args(argv)
    if args.check:
        ok, rows, summary = run_check(Path(args.spread), args.k)
        print(f"cpu path: {summary['cpu_path']}")
        print_rows(rows)
        print("every figure lies within the recorded spread" if ok else "a figure lies OUTSIDE the recorded spread")
        return 0 if ok else 1
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 3:
        p.error("--seeds: record at least 3 seeds")
    doc = record(seeds, Path(args.out), Path(args.spread))
    print(f"recorded {len(seeds)} seeds on: {doc['cpu_path']} -> {args.spread}")
    for name, f in doc["figures"].items():
        lo, hi = band(f)
        print(f"  {name:26s} mean {f['mean']:.3f}  std {f['std']:.3f}  min {f['min']:.3f}  max {f['max']:.3f}  "
              f"band [{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
