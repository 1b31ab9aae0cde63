"""The frontier figure, drawn from frontier.json alone (examples/frontier.py writes both).

    python examples/frontier_figure.py                                   # docs/frontier.json -> docs/frontier.png
    python examples/frontier_figure.py runs/frontier/frontier.json --out frontier.png --bars std

Each method's frontier is drawn as chosen on validation prompts (frontier.json's "frontiers"), at
its evaluation-prompt numbers averaged over the training seeds, with error bars over the seeds on
both axes (--bars se: one standard error, the default; --bars std: one sample standard deviation);
the method's other points (settings x checkpoints) are the faint dots. Baselines on the left; the
loss family (every loss of the table beside DPO) on the right when frontier.json has it. Points past
the KL axis's end are listed in a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: minidpo from this checkout
    sys.path.insert(0, str(ROOT))

STYLE = {"SFT": ("gray", "s"), "DPO": ("C0", "o"), "Online DPO": ("C9", "D"), "PPO": ("C1", "^"),
         "PPO-GT": ("C3", "v"), "Preferred-FT": ("C2", "P"), "Unlikelihood": ("C4", "X"), "Best-of-N": ("C5", "*")}
# the methods whose frontiers set the KL axis (Preferred-FT and Unlikelihood can run far past it)
AXIS_METHODS = ("DPO", "Online DPO", "PPO", "PPO-GT", "Best-of-N")


def load(path: str | Path) -> dict:
    summary = json.loads(Path(path).read_text(encoding="utf-8"))
    if "points" not in summary or "frontiers" not in summary:
        raise ValueError(f"{path}: no 'points'/'frontiers' (a frontier.json from before seeds and validation "
                         f"selection); run examples/frontier.py again")
    return summary


def panels(summary: dict) -> list[tuple[str, list[str]]]:
    """(title, methods) of each panel: the baselines, then the loss family if there is one."""
    kinds = {p["method"]: p["kind"] for p in summary["points"]}
    methods = list(summary["frontiers"])
    family = [m for m in methods if kinds.get(m) == "loss" and m != "DPO"]
    base = [m for m in methods if m not in family]
    out = [("DPO and its baselines", base)]
    if family:
        out.append(("the loss family (each loss tuned as DPO)", ["SFT", "DPO", *family]))
    return out


def kl_axis(summary: dict, kl_max: float | None = None) -> float:
    """The KL axis's end: ``kl_max`` when given, else 1.12 x the largest frontier KL of the
    methods in AXIS_METHODS and of the loss family."""
    if kl_max is not None:
        if not kl_max > 0:
            raise ValueError(f"kl_max must be > 0, got {kl_max!r}")
        return float(kl_max)
    by = {(p["method"], p["setting"]): p for p in summary["points"]}
    axis = [by[(m, s)]["kl"] for m, settings in summary["frontiers"].items() for s in settings
            if m in AXIS_METHODS or m not in STYLE]
    return 1.12 * max(axis + [1.0])


def draw(summary: dict, out_png: str | Path, bars: str = "se", kl_max: float | None = None) -> Path:
    """Write the figure of ``summary`` (a frontier.json) to ``out_png``; ``bars`` "se" or "std";
    ``kl_max`` the KL axis's end (:func:`kl_axis`; frontier points past it are listed in a note)."""
    from minidpo.plots import _pyplot, save_figure

    if bars not in ("se", "std"):
        raise ValueError(f"bars must be 'se' or 'std', got {bars!r}")
    plt = _pyplot()
    by = {(p["method"], p["setting"]): p for p in summary["points"]}
    front = {m: [by[(m, s)] for s in settings] for m, settings in summary["frontiers"].items()}
    x_max = kl_axis(summary, kl_max)
    lay = panels(summary)
    fig, axes = plt.subplots(1, len(lay), figsize=(9.5 * len(lay), 6), squeeze=False)
    family_colours = plt.get_cmap("tab20").colors
    off = []
    for ax, (title, methods) in zip(axes[0], lay):
        for i, m in enumerate(methods):
            pts = front.get(m, [])
            if not pts:
                continue
            colour, marker = STYLE.get(m, (family_colours[i % len(family_colours)], "o"))
            rest = [p for p in summary["points"] if p["method"] == m and p not in pts]
            ax.plot([p["kl"] for p in rest if p["kl"] <= x_max], [p["reward_mean"] for p in rest if p["kl"] <= x_max],
                    marker, color=colour, ms=3, alpha=0.25, ls="none")

            def err(p, what):
                return p[f"{what}_seed_std"] if bars == "std" and p["n_seeds"] > 1 else p[f"{what}_se"]

            pts = sorted(pts, key=lambda p: p["kl"])  # chosen on validation, drawn at evaluation KL
            ax.errorbar([p["kl"] for p in pts], [p["reward_mean"] for p in pts],
                        xerr=[err(p, "kl") for p in pts], yerr=[err(p, "reward") for p in pts],
                        fmt=marker + "-", color=colour, ms=7, capsize=2, lw=1.3, alpha=0.9, label=m)
            off += [(m, p) for p in pts if p["kl"] > x_max]
        ax.set_xlim(-0.02 * x_max, x_max)
        ax.set_xlabel("KL(pi || pi_ref), nats per sample (from the policy's samples; Best-of-N: analytic)")
        ax.set_ylabel("mean ground-truth reward (VADER), evaluation prompts")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if off:
        seen = set()
        note = [f"{m} {p['setting']}: KL {p['kl']:.1f}, reward {p['reward_mean']:+.3f}" for m, p in off
                if not ((m, p["setting"]) in seen or seen.add((m, p["setting"])))]
        axes[0][0].text(0.99, 0.02, "off the chart:\n" + "\n".join(note), transform=axes[0][0].transAxes, ha="right",
                        va="bottom", fontsize=7, bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    n = len(summary["train_seeds"])
    what = "one standard error" if bars == "se" else "one standard deviation"
    fig.suptitle(f"Sentiment: reward vs KL, {summary['size']} size, {n} training seed{'s' if n != 1 else ''}; each "
                 f"method's frontier chosen on validation prompts\nerror bars: {what} over the seeds; faint: the "
                 f"method's other points (settings x checkpoints)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="frontier_figure.py", description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", default=str(ROOT / "docs" / "frontier.json"), help="a frontier.json")
    p.add_argument("--out", default=None, help="the PNG (default: frontier.png beside the JSON)")
    p.add_argument("--bars", default="se", choices=["se", "std"], help="error bars over the seeds: se or std")
    p.add_argument("--kl-max", type=float, default=None,
                   help="the KL axis's end (default: 1.12 x the largest frontier KL); points past it are listed")
    args = p.parse_args(argv)
    try:
        summary = load(args.json)
    except (OSError, ValueError) as err:
        print(f"frontier_figure.py: error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.json).with_name("frontier.png")
    try:
        print(draw(summary, out, args.bars, args.kl_max))
    except ValueError as err:
        print(f"frontier_figure.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
