"""SFT step time with and without packing (minidpo.packing.pack_sft vs data.collate_sft), one thread.

Random items whose prompt and response lengths are drawn uniformly from the ranges below; the
step is train.sft_step on each packing.Batch: the same model, the layout as data. Interleaved
A B A B; the first round is a warm-up; prints the medians.

    python bench/sft_packing.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minidpo.data import TokenizedSFT, collate_sft  # noqa: E402
from minidpo.model import GPTConfig, init_params  # noqa: E402
from minidpo.packing import pack_sft  # noqa: E402
from minidpo.train import sft_step  # noqa: E402

SHAPES = (  # name, model, prompt length range, response length range, items, rounds
    ("C0 model, lengths 4-31", GPTConfig(512, 64, 4, 4, 128), (4, 32), (4, 32), 32, 7),
    ("C0 model, lengths 10-11", GPTConfig(512, 64, 4, 4, 128), (10, 12), (10, 12), 32, 7),
    ("C1 model, prompts 16-127, responses 8-127", GPTConfig(8192, 256, 6, 6, 384), (16, 128), (8, 128), 16, 3),
)


def main() -> None:
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        print("note: threadpoolctl missing; BLAS threads not pinned", file=sys.stderr)
    for name, cfg, plen, rlen, B, rounds in SHAPES:
        p = init_params(cfg, seed=0)
        rng = np.random.default_rng(0)
        items = [TokenizedSFT(rng.integers(1, cfg.vocab_size, int(rng.integers(*plen))).tolist(),
                              rng.integers(1, cfg.vocab_size, int(rng.integers(*rlen))).tolist()) for _ in range(B)]
        batches = {"padded": collate_sft(items, 0), "packed": pack_sft(items, 0)}
        ts = {k: [] for k in batches}
        for _ in range(rounds):
            for k, b in batches.items():
                time.sleep(0.1)
                t = time.perf_counter()
                sft_step(p, cfg, b)
                ts[k].append(time.perf_counter() - t)
        shapes = f"padded {batches['padded'].shape}, packed {batches['packed'].shape}"
        med = {k: statistics.median(v[1:]) * 1e3 for k, v in ts.items()}
        print(f"{name}: {shapes}: padded {med['padded']:.1f} ms, packed {med['packed']:.1f} ms "
              f"({med['padded'] / med['packed']:.2f}x)")


if __name__ == "__main__":
    main()
