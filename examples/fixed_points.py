"""What each loss of the family converges to, exactly: its fixed point on the paper's tabular world.

The world of examples/bandit.py: X prompts, Y responses, a known reward r(x, y), a reference
policy pi_ref, preferences from Bradley-Terry (eq. 1) on uniformly drawn pairs, and here also a
length L(x, y) in tokens for each response (the losses defined on per-token mean log-probs see
log pi / L). For every loss of minidpo.losses.LOSS_TABLE the exact expected loss over all labelled
pairs is minimised by descent on a tabular softmax policy started at pi_ref
(minidpo.theory.fixed_point), and the policy it stops at is compared with eq. (4)'s optimum
pi_r = pi_ref exp(r / beta) / Z(x): KL(pi || pi_ref), the expected reward E_pi r, and KL(pi || pi_r)
(0 exactly when the loss recovers eq. 4). Where the fixed point is known in closed form
(minidpo.theory.derived_fixed_point: eq. 4 itself, IPO's, f-DPO's, the per-token losses' length
scaling, SimPO's length bias, the SFT pull of the NLL terms) the gap to it is printed too.

    python examples/fixed_points.py                 # the table, docs/fixed_points.json and .png
    python examples/fixed_points.py --no-plot --json ''
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from minidpo.logprobs import log_softmax
from minidpo.losses import LOSS_TABLE
from minidpo.theory import derived_fixed_point, fixed_point, optimal_policy, policy_summary

ROOT = Path(__file__).resolve().parents[1]

# (label, loss, options): every loss of the table (the cDPO and robust rows at eps = 0.1, where they
# differ from eq. 7), and f-DPO's three divergences on eq. 7
CONFIGS = [("DPO (eq. 7)", "sigmoid", {}), ("cDPO eps=0.1", "sigmoid", {"label_smoothing": 0.1}),
           ("robust eps=0.1", "robust", {"label_smoothing": 0.1})] + [
    (name, name, {}) for name in LOSS_TABLE if name not in ("sigmoid", "robust")] + [
    (f"f-DPO {d}", "sigmoid", {"f_divergence": d}) for d in ("forward_kl", "js_divergence", "alpha_divergence")]

DERIVED = {"DPO (eq. 7)", "ipo", "sigmoid_norm", "sft", "f-DPO forward_kl", "f-DPO js_divergence",
           "f-DPO alpha_divergence"}


def make_world(seed: int, n_prompts: int, n_responses: int, max_length: int):
    """reward (X, Y) ~ N(0, 1), log pi_ref a random softmax, lengths uniform in 1..max_length."""
    rng = np.random.default_rng(seed)
    reward = rng.standard_normal((n_prompts, n_responses))
    log_pi_ref = log_softmax(rng.standard_normal((n_prompts, n_responses)))
    lengths = rng.integers(1, max_length + 1, (n_prompts, n_responses)).astype(np.float64)
    return reward, log_pi_ref, lengths


def frontier(reward, log_pi_ref):
    """eq. (4)'s optimum over beta: (KL(pi_r || pi_ref), E_pi_r r) for beta from 0.01 to 100, KL increasing."""
    pts = [policy_summary(optimal_policy(reward, log_pi_ref, b), reward, log_pi_ref, b) for b in np.geomspace(100, 0.01, 400)]
    return np.array([p["kl_ref_opt"] for p in pts]), np.array([p["reward_opt"] for p in pts])


def closest_optimum(log_pi, reward, log_pi_ref):
    """(beta*, KL(pi || pi_r at beta*)): the eq. 4 optimum, over all beta, nearest to pi (golden-section
    search on log beta after a coarse grid)."""
    def kl(log_b):
        opt = optimal_policy(reward, log_pi_ref, float(np.exp(log_b)))
        return float(np.mean(np.sum(np.exp(log_pi) * (log_pi - opt), axis=-1)))

    grid = np.linspace(np.log(1e-3), np.log(1e3), 121)
    i = int(np.argmin([kl(g) for g in grid]))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(80):
        c, d = b - g * (b - a), a + g * (b - a)
        if kl(c) < kl(d):
            b = d
        else:
            a = c
    m = 0.5 * (a + b)
    return float(np.exp(m)), kl(m)


def run(reward, log_pi_ref, lengths, beta: float, steps: int) -> list[dict]:
    kl_f, r_f = frontier(reward, log_pi_ref)
    rows = []
    for label, name, options in CONFIGS:
        row = {"label": label, "loss": name, "options": options}
        if name in ("aot", "aot_unpaired"):
            row["note"] = "couples the pairs of a batch (a sort): no per-pair expectation to minimise"
            rows.append(row)
            continue
        fp = fixed_point(reward, log_pi_ref, beta, name, lengths=lengths, steps=steps, **options)
        row.update(policy_summary(fp["log_pi"], reward, log_pi_ref, beta))
        # how much reward eq. 4's optimum (at another beta) gets at the same KL from pi_ref, above this one
        row["below_frontier"] = float(np.interp(row["kl_ref"], kl_f, r_f) - row["reward"])
        row["beta_star"], row["kl_star"] = closest_optimum(fp["log_pi"], reward, log_pi_ref)
        row.update(steps=fp["steps"], converged=bool(fp["converged"]), grad=fp["grad"],
                   min_log_pi=float(fp["log_pi"].min()), inputs=fp["inputs"])
        if label in DERIVED:
            d = derived_fixed_point(reward, log_pi_ref, beta, name, lengths=lengths, **options)
            row["derived_gap"] = float(np.max(np.abs(fp["log_pi"] - d)))
        if not fp["converged"]:
            row["note"] = ("no finite minimiser: some log pi heads to -inf" if row["min_log_pi"] < -25 else
                           "stops on a kink of a non-smooth loss")
        rows.append(row)
    return rows


def length_and_sft_worlds(seed: int, beta: float, steps: int) -> dict:
    """Two worlds for two biases: SimPO where every reward is equal (its fixed point, log pi = c L,
    prefers short responses whatever pi_ref), and ORPO as beta (its lambda) -> 0 (pi -> the chosen
    responses' distribution over lengths, q / L: the pull of its NLL term)."""
    reward, log_pi_ref, lengths = make_world(seed + 1, 2, 5, 4)
    flat = np.zeros_like(reward)
    fp = fixed_point(flat, log_pi_ref, beta, "simpo", lengths=lengths, steps=steps)
    simpo_gap = float(np.max(np.abs(fp["log_pi"] - derived_fixed_point(flat, log_pi_ref, beta, "simpo", lengths=lengths))))
    orpo = {}
    for lam in (0.5, 0.1, 0.01, 0.001):
        fp = fixed_point(reward, log_pi_ref, lam, "orpo", lengths=lengths, steps=steps)
        d = derived_fixed_point(reward, log_pi_ref, lam, "orpo", lengths=lengths)
        orpo[lam] = float(np.max(np.abs(fp["log_pi"] - d)))
    return {"simpo_equal_rewards_gap": simpo_gap, "simpo_lengths": lengths.tolist(), "orpo_gap_by_lambda": orpo}


def table(rows) -> str:
    out = ["| loss | KL(pi \\|\\| pi_ref) | E_pi r | KL(pi \\|\\| pi_r) | recovers eq. 4 | E r below eq. 4's frontier at that KL "
           "| nearest eq. 4 optimum: beta*, KL | gap to the derived fixed point | descent |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "kl_ref" not in r:
            out.append(f"| {r['label']} | - | - | - | - | - | - | - | {r['note']} |")
            continue
        rec = "yes" if r["kl_opt"] < 1e-10 else "no"
        gap = f"{r['derived_gap']:.1e}" if "derived_gap" in r else "-"
        how = f"stationary in {r['steps']} steps" if r["converged"] else f"{r['note']} (|grad| {r['grad']:.0e} after {r['steps']})"
        moving = "" if r["converged"] else " (still moving)"
        out.append(f"| {r['label']} | {r['kl_ref']:.4f}{moving} | {r['reward']:+.4f} | {max(r['kl_opt'], 0.0):.2e} | {rec} | "
                   f"{max(r['below_frontier'], 0.0):.4f} | {r['beta_star']:.3g}, {max(r['kl_star'], 0.0):.1e} | {gap} | {how} |")
    return "\n".join(out)


def plot(path: str, rows, reward, log_pi_ref, beta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    kl_f, r_f = frontier(reward, log_pi_ref)
    keep = kl_f <= 2.0
    ax1.plot(kl_f[keep], r_f[keep], color="gray", lw=1.5, label="eq. 4's optimum over beta (the frontier)")
    done = [r for r in rows if "kl_ref" in r]
    for r in done:
        marker = "o" if r["converged"] else "x"
        ax1.scatter(r["kl_ref"], r["reward"], marker=marker, s=30)
        ax1.annotate(r["label"], (r["kl_ref"], r["reward"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    opt = done[0]
    ax1.scatter(opt["kl_ref_opt"], opt["reward_opt"], marker="*", s=200, color="black", zorder=5,
                label=f"eq. 4 at beta = {beta:g}")
    ax1.set_xlabel("KL(pi || pi_ref), mean over prompts (nats)")
    ax1.set_ylabel("expected reward E_pi r")
    ax1.set_title("each loss's fixed point (x: no stationary point reached)")
    ax1.legend(loc="lower right", fontsize=8)
    labels = [r["label"] for r in done]
    vals = [max(r["kl_opt"], 1e-17) for r in done]
    ax2.barh(range(len(done)), vals, color=["tab:green" if v < 1e-10 else "tab:red" for v in vals])
    ax2.set_yticks(range(len(done)))
    ax2.set_yticklabels(labels, fontsize=8)
    ax2.set_xscale("log")
    ax2.invert_yaxis()
    ax2.set_xlabel("KL(pi || pi_r): distance to eq. 4's optimum (green: recovered)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)  # whole or not at all: a temporary file, then a rename
    tmp.replace(path)
    plt.close(fig)
    print(f"plot written to {path}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--responses", type=int, default=5)
    p.add_argument("--max-length", type=int, default=4, help="response lengths are drawn from 1..this")
    p.add_argument("--steps", type=int, default=300, help="at most this many descent steps per loss")
    p.add_argument("--json", default=str(ROOT / "docs" / "fixed_points.json"), help="write the results here ('' to skip)")
    p.add_argument("--out", default=str(ROOT / "docs" / "fixed_points.png"), help="the figure")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    reward, log_pi_ref, lengths = make_world(args.seed, args.prompts, args.responses, args.max_length)
    rows = run(reward, log_pi_ref, lengths, args.beta, args.steps)
    extra = length_and_sft_worlds(args.seed, args.beta, args.steps)
    print(f"world: X={args.prompts} prompts, Y={args.responses} responses, lengths 1..{args.max_length}, "
          f"beta={args.beta}, seed={args.seed}\n")
    print(table(rows))
    print(f"\nSimPO with all rewards equal: max |log pi - c L| = {extra['simpo_equal_rewards_gap']:.1e} "
          "(its fixed point prefers short responses, whatever pi_ref)")
    print("ORPO as its lambda (beta) -> 0, max |log pi - log(q / L)|: " +
          ", ".join(f"lambda {k:g}: {v:.1e}" for k, v in extra["orpo_gap_by_lambda"].items()))
    result = {"world": {"seed": args.seed, "beta": args.beta, "prompts": args.prompts, "responses": args.responses,
                        "max_length": args.max_length}, "rows": rows, **extra}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
    if not args.no_plot:
        plot(args.out, rows, reward, log_pi_ref, args.beta)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
