"""PNG plots of a run: training curves from metrics.jsonl, and the reward-vs-KL frontier
(the paper's Figure 2, left). matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``out_png`` whole or not at all (a sibling temporary file, then a rename:
    a Ctrl-C or a full disk while drawing never leaves half a PNG), and close it."""
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format=out_png.suffix[1:] or "png")
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)
        _pyplot().close(fig)
    return out_png


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_DPO_PANELS = [
    ("loss", "DPO loss (eq. 7)"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin r_w - r_l"),
    (("rewards/chosen", "rewards/rejected"), "implicit rewards (eq. 8)"),
]
_SFT_PANELS = [
    (("loss", "nll"), "SFT loss: NLL per response token"),
    ("perplexity", "held-out perplexity"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("lr", "learning rate"),
]


def _series(records: Sequence[dict], key: str, held_out: bool) -> tuple[list, list]:
    """(steps, values) of one metric. The held-out accuracy at step 0 is left out: every margin
    is exactly 0 there (pi = pi_ref), so "margin > 0" counts none and 0.0 would be a false jump."""
    k = f"eval/{key}" if held_out else key
    rows = [r for r in records if k in r and ("eval/loss" in r or "eval/nll" in r) == held_out]
    if held_out and key == "rewards/accuracies":
        rows = [r for r in rows if r["step"] > 0]
    return [r["step"] for r in rows], [r[k] for r in rows]


def plot_training_curves(records: Sequence[dict] | dict, out_png: str | Path, title: str = "DPO training") -> Path:
    """Four panels against the step, training records as lines and held-out (``eval/``) ones as
    dots. DPO records (they hold ``rewards/*``): loss, reward accuracy, reward margin, and the
    chosen and rejected implicit rewards (eq. 8). SFT records: NLL, held-out perplexity,
    gradient norm, learning rate. ``records`` may be a dict {label: records} to overlay several
    runs (a beta sweep), one colour each."""
    plt = _pyplot()
    runs = records if isinstance(records, dict) else {"": records}
    is_dpo = any("rewards/margins" in r or "eval/rewards/margins" in r for rs in runs.values() for r in rs)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (keys, label) in zip(axes.ravel(), _DPO_PANELS if is_dpo else _SFT_PANELS):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for i, (run, recs) in enumerate(runs.items()):
            colour = f"C{i}" if len(runs) > 1 else None
            for j, k in enumerate(keys):
                name = (f"{run} " if run else "") + k.split("/")[-1]
                style = "-" if j == 0 else ":"
                xs, ys = _series(recs, k, held_out=False)
                if xs:
                    ax.plot(xs, ys, style, color=colour, label=f"train {name}")
                ex, ey = _series(recs, k, held_out=True)
                if ex:
                    ax.plot(ex, ey, "o" + ("--" if j == 0 else ":"), color=colour, label=f"held-out {name}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=110)


def plot_reward_vs_kl(points: Sequence[dict], out_png: str | Path, sft: dict | None = None,
                      title: str = "Reward vs KL(pi || pi_ref)") -> Path:
    """The frontier: each point a policy, x = KL(pi || pi_ref) estimated from its samples,
    y = mean ground-truth reward of its samples, with standard-error bars.

    points: dicts with "beta", "kl", "kl_se", "reward_mean", "reward_se"; sft: the reference
    policy's {"reward_mean", "reward_se"}, drawn at KL 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = sorted(points, key=lambda p: p["kl"])
    if sft is not None:
        ax.errorbar([0.0], [sft["reward_mean"]], yerr=[sft["reward_se"]], fmt="s", color="gray", label="SFT (pi_ref)")
    ax.errorbar([p["kl"] for p in pts], [p["reward_mean"] for p in pts],
                xerr=[p.get("kl_se", 0.0) for p in pts], yerr=[p["reward_se"] for p in pts],
                fmt="o-", color="C0", label="DPO")
    for p in pts:
        ax.annotate(f"beta={p['beta']:g}", (p["kl"], p["reward_mean"]), textcoords="offset points", xytext=(5, -12),
                    fontsize=8)
    ax.margins(x=0.2, y=0.1)  # room for the rightmost label inside the axes
    ax.set_xlabel("KL(pi || pi_ref), nats per sample")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=110)
