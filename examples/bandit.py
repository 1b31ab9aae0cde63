"""The reward model falls out for free: DPO on a tabular bandit, checked against eq. (4).

A world of X prompts and Y responses with a known reward r(x, y) and a reference policy
pi_ref(y|x). Preferences are drawn from Bradley-Terry, eq. (1): for a prompt x and a pair
(y1, y2), y1 is preferred with probability sigma(r(x, y1) - r(x, y2)). A tabular softmax policy
pi(y|x) = softmax(theta[x])_y, started at pi_ref, is trained by gradient descent on the DPO loss
eq. (7) with minidpo's dpo_loss and its eq. (9) gradient, carried through the table's
log-softmax by hand. No reward model is ever fitted, yet

  * the learned policy approaches eq. (4)'s optimum pi_r = pi_ref exp(r / beta) / Z(x), the
    maximiser of the KL-regularised objective eq. (3), and
  * its implicit reward beta log pi/pi_ref (eq. 8) approaches the true reward up to the
    per-prompt shift beta log Z(x) (eq. 5), which preferences cannot see.

Two kinds of training data:

  sampled   N labelled pairs drawn from the process above; the empirical loss is minimised.
            Finite data makes the optimum only approximate: the gaps printed are honest.
  exact     every ordered pair weighted by its Bradley-Terry probability: the expected loss,
            whose minimiser is eq. (4)'s pi_r exactly, so the gaps go to rounding level.

    python examples/bandit.py                          # both modes, plot to runs/bandit.png
    python examples/bandit.py --beta 0.1 --pairs 2000 --no-plot
    python examples/bandit.py --mode exact --loss ipo  # another loss of the table: where it ends instead

Every loss of the family on this world, with its fixed point against eq. (4) and the derived ones:
examples/fixed_points.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from minidpo.logprobs import log_softmax, log_softmax_backward
from minidpo.losses import dpo_loss
from minidpo.theory import (
    expected_dpo_loss,
    expected_loss,
    kl_regularized_objective,
    log_partition,
    optimal_policy,
    preference_distribution,
    reward_from_policy,
)


def make_world(rng: np.random.Generator, n_prompts: int, n_responses: int, reward_scale: float):
    """A random reward table and a random full-support reference policy, both (X, Y) float64."""
    reward = reward_scale * rng.standard_normal((n_prompts, n_responses))  # (X, Y) r(x, y)
    log_pi_ref = log_softmax(rng.standard_normal((n_prompts, n_responses)))  # (X, Y) log pi_ref(y|x)
    return reward, log_pi_ref


def sample_preferences(rng: np.random.Generator, reward, n_pairs: int):
    """n_pairs labelled pairs: x uniform, (y1, y2) a uniform pair of distinct responses,
    y1 preferred with the Bradley-Terry probability sigma(r(x, y1) - r(x, y2)), eq. (1).

    Returns:
        x, chosen, rejected: (N,) int arrays.
    """
    X, Y = reward.shape
    x = rng.integers(0, X, size=n_pairs)  # (N,)
    y1 = rng.integers(0, Y, size=n_pairs)  # (N,)
    y2 = (y1 + rng.integers(1, Y, size=n_pairs)) % Y  # (N,) uniform over responses != y1
    p1 = 1.0 / (1.0 + np.exp(-(reward[x, y1] - reward[x, y2])))  # (N,) eq. (1)
    y1_wins = rng.random(n_pairs) < p1  # (N,)
    chosen = np.where(y1_wins, y1, y2)
    rejected = np.where(y1_wins, y2, y1)
    return x, chosen, rejected


def empirical_weights(x, chosen, rejected, shape):
    """W[x, i, j] = (count of pairs (x, y_w = i, y_l = j)) / N: the sampled data as a table."""
    W = np.zeros((shape[0], shape[1], shape[1]))  # (X, Y, Y)
    np.add.at(W, (x, chosen, rejected), 1.0)  # add.at: repeated triples must all count
    return W / len(x)


def step_size(W, beta: float) -> float:
    """1 / (a bound on the loss's curvature in theta), so plain gradient descent cannot diverge.

    Each pair's loss -log sigma(beta (theta_i - theta_j) + const) has second derivative
    <= beta^2 / 4 along e_i - e_j; summed with weights W, the Hessian is at most
    beta^2 / 4 times the graph Laplacian of W, whose largest eigenvalue is at most twice the
    largest weighted degree.
    """
    degree = (W + W.transpose(0, 2, 1)).sum(axis=2)  # (X, Y)
    return 2.0 / (beta**2 * float(degree.max()))


def train_on_samples(x, chosen, rejected, log_pi_ref, beta: float, steps: int, lr: float):
    """Full-batch gradient descent on the empirical DPO loss of the sampled pairs.

    This is the DPO training step of a language model with the model replaced by a table:
    log-probs of the chosen and rejected responses, dpo_loss for the loss and its eq. (9)
    gradient, then the chain rule back to the parameters.
    """
    theta = log_pi_ref.copy()  # (X, Y) the policy starts at the reference
    ref_w, ref_l = log_pi_ref[x, chosen], log_pi_ref[x, rejected]  # (N,) constants
    losses = []
    for _ in range(steps):
        log_pi = log_softmax(theta)  # (X, Y)
        out = dpo_loss(log_pi[x, chosen], log_pi[x, rejected], ref_w, ref_l, beta=beta)
        # eq. (9): grad chosen = -beta sigma(r_l - r_w) / N, grad rejected = the opposite;
        # scatter them onto the table entries they came from (responses repeat: add.at)
        dlog_pi = np.zeros_like(theta)  # (X, Y)
        np.add.at(dlog_pi, (x, chosen), out.grad_policy_chosen_logps)
        np.add.at(dlog_pi, (x, rejected), out.grad_policy_rejected_logps)
        theta -= lr * log_softmax_backward(dlog_pi, log_pi)  # through log pi = log_softmax(theta)
        losses.append(float(out.loss))
    return log_softmax(theta), losses


def train_on_expectation(W, log_pi_ref, beta: float, steps: int, lr: float, loss_type: str = "sigmoid"):
    """Gradient descent on the expected loss sum W L (theory.expected_dpo_loss for eq. 7; another row
    of the loss table through theory.expected_loss)."""
    theta = log_pi_ref.copy()  # (X, Y)
    losses = []
    for _ in range(steps):
        if loss_type == "sigmoid":
            loss, dtheta = expected_dpo_loss(theta, log_pi_ref, W, beta)
        else:
            loss, dtheta = expected_loss(theta, log_pi_ref, W, beta, loss_type)
        theta -= lr * dtheta
        losses.append(float(loss))
    return log_softmax(theta), losses


def compare(name: str, training: str, log_pi, reward, log_pi_ref, beta: float, log_pi_opt, log_Z) -> dict:
    """Print, under a header naming the mode, how training went (``training``: one line), the
    learned policy against eq. (4) and the implicit reward against r; return the gaps."""
    r_hat = reward_from_policy(log_pi, log_pi_ref, beta)  # (X, Y) eq. (8)
    shift = (reward - r_hat).mean(axis=1)  # (X,) the per-prompt shift; eq. (5) says beta log Z(x)
    reward_gap = float(np.abs(reward - r_hat - shift[:, None]).max())
    policy_gap = float(np.abs(log_pi - log_pi_opt).max())
    X, Y = reward.shape
    print(f"\n== {name} ==")
    print(training)
    for xi in range(X):
        print(f" prompt {xi}:  shift r - r_hat = {shift[xi]:+.4f}   beta log Z(x) = {beta * log_Z[xi]:+.4f}")
        print("   y   r(x,y)  r_hat+shift   log pi_r (eq.4)   log pi (learned)")
        for yi in range(Y):
            print(
                f"  {yi:2d}  {reward[xi, yi]:+7.3f}  {r_hat[xi, yi] + shift[xi]:+11.3f}"
                f"  {log_pi_opt[xi, yi]:+16.4f}  {log_pi[xi, yi]:+17.4f}"
            )
    J = float(kl_regularized_objective(log_pi, reward, log_pi_ref, beta, mean=True))
    J_opt = float(kl_regularized_objective(log_pi_opt, reward, log_pi_ref, beta, mean=True))
    print(f" max |log pi - log pi_r|                         = {policy_gap:.3e}")
    print(f" max |r_hat - r| after removing per-prompt shift = {reward_gap:.3e}")
    print(f" eq. (3) objective: learned {J:.6f}  vs optimum {J_opt:.6f}")
    return {"policy_gap": policy_gap, "reward_gap": reward_gap, "objective": J, "objective_opt": J_opt, "log_pi": log_pi, "r_hat": r_hat + shift[:, None]}


def plot(path: str, results: dict, reward, log_pi_opt) -> None:
    from minidpo.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    markers = {"sampled": ("o", "tab:blue"), "exact": ("x", "tab:red")}
    r_centred = reward - reward.mean(axis=1, keepdims=True)
    for name, res in results.items():
        m, c = markers[name]
        ax1.scatter(log_pi_opt.ravel(), res["log_pi"].ravel(), marker=m, color=c, label=f"{name}: max gap {res['policy_gap']:.1e}")
        r_hat_c = res["r_hat"] - res["r_hat"].mean(axis=1, keepdims=True)
        ax2.scatter(r_centred.ravel(), r_hat_c.ravel(), marker=m, color=c, label=f"{name}: max gap {res['reward_gap']:.1e}")
    for ax in (ax1, ax2):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", zorder=0)
        ax.legend(loc="upper left", fontsize=8)
    ax1.set_xlabel("log pi_r(y|x), eq. (4) optimum")
    ax1.set_ylabel("log pi(y|x), learned by DPO")
    ax1.set_title("policy vs the KL-regularised optimum")
    ax2.set_xlabel("true reward r(x,y) (centred per prompt)")
    ax2.set_ylabel("beta log pi/pi_ref (centred per prompt)")
    ax2.set_title("implicit reward vs true reward")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)
    print(f"\nplot written to {path}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.5, help="KL coefficient (> 0)")
    p.add_argument("--prompts", type=int, default=3, help="X, the number of prompts")
    p.add_argument("--responses", type=int, default=5, help="Y, responses per prompt (>= 2)")
    p.add_argument("--reward-scale", type=float, default=1.0, help="std of the random true rewards")
    p.add_argument("--pairs", type=int, default=20000, help="sampled preference pairs (sampled mode)")
    p.add_argument("--steps", type=int, default=1000, help="gradient-descent steps")
    p.add_argument("--mode", choices=("both", "sampled", "exact"), default="both")
    p.add_argument("--loss", default="sigmoid", help="exact mode: the loss of minidpo.losses.LOSS_TABLE to minimise "
                   "(eq. 7 recovers eq. 4; most others end elsewhere: examples/fixed_points.py)")
    p.add_argument("--out", default=str(Path("runs") / "bandit.png"), help="PNG path for the plot (its folder is created)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    args = p.parse_args(argv)
    if not args.beta > 0:
        p.error(f"--beta must be > 0, got {args.beta}")
    if args.prompts < 1 or args.responses < 2:
        p.error("need --prompts >= 1 and --responses >= 2")
    if args.steps < 1 or args.pairs < 1:
        p.error("need --steps >= 1 and --pairs >= 1")
    from minidpo.losses import LOSS_TABLE

    if args.loss not in LOSS_TABLE or args.loss in ("aot", "aot_unpaired") or LOSS_TABLE[args.loss].inputs:
        p.error(f"--loss must be a loss of the table with a per-pair expectation and no per-step input, got {args.loss!r}")
    if args.loss != "sigmoid" and args.mode != "exact":
        p.error("--loss applies to --mode exact")

    rng = np.random.default_rng(args.seed)
    beta = args.beta
    reward, log_pi_ref = make_world(rng, args.prompts, args.responses, args.reward_scale)
    log_pi_opt = optimal_policy(reward, log_pi_ref, beta)  # (X, Y) eq. (4)
    log_Z = log_partition(reward, log_pi_ref, beta)  # (X,)
    print(f"bandit: X={args.prompts} prompts, Y={args.responses} responses, beta={beta}, seed={args.seed}")

    results = {}
    if args.mode in ("both", "sampled"):
        x, chosen, rejected = sample_preferences(rng, reward, args.pairs)
        W_emp = empirical_weights(x, chosen, rejected, reward.shape)
        log_pi, losses = train_on_samples(x, chosen, rejected, log_pi_ref, beta, args.steps, step_size(W_emp, beta))
        results["sampled"] = compare(f"sampled pairs (N={args.pairs})",
                                     f" loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps",
                                     log_pi, reward, log_pi_ref, beta, log_pi_opt, log_Z)
    if args.mode in ("both", "exact"):
        W = preference_distribution(reward)  # (X, Y, Y) the Bradley-Terry pair distribution
        if args.loss == "sigmoid":
            log_pi, losses = train_on_expectation(W, log_pi_ref, beta, args.steps, step_size(W, beta))
            loss_opt = float(expected_dpo_loss(log_pi_opt, log_pi_ref, W, beta)[0])
            how = f"in {args.steps} steps "
        else:  # another loss: descent to its own fixed point (theory.fixed_point), reported against eq. 4
            from minidpo.theory import fixed_point

            fp = fixed_point(reward, log_pi_ref, beta, args.loss, pair_weights=W)
            log_pi, losses = fp["log_pi"], [float(expected_loss(log_pi_ref, log_pi_ref, W, beta, args.loss)[0]), fp["loss"]]
            loss_opt = float(expected_loss(log_pi_opt, log_pi_ref, W, beta, args.loss)[0])
            how = "at its fixed point "
        title = "exact expected preferences" + ("" if args.loss == "sigmoid" else f", loss {args.loss}")
        results["exact"] = compare(title, f" expected loss {losses[0]:.6f} -> {losses[-1]:.6f} {how}"
                                          f"(at eq. 4's optimum: {loss_opt:.6f})",
                                   log_pi, reward, log_pi_ref, beta, log_pi_opt, log_Z)

    print("\nsummary (max gaps):")
    for name, res in results.items():
        print(f"  {name:8s} policy {res['policy_gap']:.3e}   reward (shift removed) {res['reward_gap']:.3e}")
    if "sampled" in results:
        print(
            "  (sampled pairs: the empirical loss's minimiser misses eq. 4 by sampling noise, about\n"
            "   1/sqrt(pairs) in reward units and that divided by beta in log-prob units)"
        )
    if not args.no_plot:
        plot(args.out, results, reward, log_pi_opt)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
