"""PNG plots of a run: training curves from metrics.jsonl, and the reward-vs-KL frontier
(the paper's Figure 2, left). matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(records: Sequence[dict], out_png: str | Path, title: str = "DPO training") -> Path:
    """Four panels against the step: loss, reward accuracy, reward margin, and the chosen and
    rejected implicit rewards (eq. 8); training records as lines, held-out (``eval/``) as dots."""
    plt = _pyplot()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("loss", "DPO loss (eq. 7)"),
        ("rewards/accuracies", "reward accuracy"),
        ("rewards/margins", "reward margin r_w - r_l"),
        (("rewards/chosen", "rewards/rejected"), "implicit rewards (eq. 8)"),
    ]
    for ax, (keys, label) in zip(axes.ravel(), panels):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for k in keys:
            name = k.split("/")[-1]
            xs = [r["step"] for r in train if k in r]
            if xs:
                ax.plot(xs, [r[k] for r in train if k in r], label=f"train {name}")
            ex = [r["step"] for r in evals if f"eval/{k}" in r]
            if ex:
                ax.plot(ex, [r[f"eval/{k}"] for r in evals if f"eval/{k}" in r], "o--", label=f"held-out {name}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


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
    ax.set_xlabel("KL(pi || pi_ref), nats per sample")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
