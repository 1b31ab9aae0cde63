"""One real DPO step on the tiny model, drawn with its own numbers: a page to open in a browser.

    python examples/explain.py                       # trains the small model (seconds), writes runs/explain/explain.html
    python examples/explain.py --index 5 --beta 0.5  # another pair of the held-out set, another beta
    minidpo explain runs/tiny                        # the same page for examples/train_tiny.py's run

What it does, with the library's public functions (the same as `minidpo explain`):
  1. explain.tiny_run: synthetic movie reviews (minidpo.tasks.sentiment), a BPE tokenizer, SFT of a
     2-layer GPT-2 (pi_ref), preference pairs labelled by the task's ground-truth reward, and a
     few DPO steps (the policy), in runs/explain/;
  2. explain.explain_step: one DPO step on a batch of held-out pairs: model.gpt_forward,
     logprobs.token_logps / sequence_logps (eq. 7), losses.dpo_step_loss (eq. 7-9),
     logprobs.sequence_logps_backward and model.gpt_backward, optim.clip_grad_norm and
     optim.AdamW.step, then the log-probs after the step; train.dpo_step on the same batch as a check;
  3. explain.bandit_world: the tabular world of examples/bandit.py (eq. 4-6);
  4. explain.render_html and write_page: one self-contained HTML file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from minidpo import runtime
from minidpo.cli import load_model
from minidpo.data import read_preferences
from minidpo.explain import (TINY, bandit_world, explain_step, page_weight, render_html, tiny_run, tokenize_pair,
                             write_page)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=str(Path("runs") / "explain"), help="where the small model is trained")
    p.add_argument("--page", default=None, help="the page to write (default: OUT_DIR/explain.html)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the tabular world")
    p.add_argument("--index", type=int, default=0, help="the held-out pair followed token by token (0-based)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs in the step's batch")
    p.add_argument("--beta", type=float, default=TINY["beta"], help="DPO's beta for the step")
    p.add_argument("--lr", type=float, default=TINY["dpo_lr"], help="the step's learning rate (the DPO run's)")
    args = p.parse_args(argv)
    if args.seed < 0 or args.batch_size < 1 or not args.beta > 0 or not args.lr > 0:
        p.error("need --seed >= 0, --batch-size >= 1, --beta > 0 and --lr > 0")
    t0 = time.perf_counter()
    runtime.cpu_defaults()
    with runtime.use_threads(1):  # this model's matrices are small: one thread is fastest
        run = tiny_run(args.out_dir, seed=args.seed)  # sft/ (pi_ref), dpo_beta0.1/ (the policy), pairs
        reference, config, tokenizer = load_model(run / "sft", "cpu")
        policy, _, _ = load_model(run / f"dpo_beta{TINY['beta']:g}", "cpu")
        examples = read_preferences(run / "pairs_eval.jsonl")
        if not 0 <= args.index < len(examples):
            p.error(f"--index {args.index} is out of range: {run / 'pairs_eval.jsonl'} has {len(examples)} pairs")
        batch = [examples[(args.index + j) % len(examples)] for j in range(min(args.batch_size, len(examples)))]
        pairs = [tokenize_pair(tokenizer, e.prompt, e.chosen, e.rejected, config.n_ctx, e.source) for e in batch]
        expl = explain_step(policy, reference, config, tokenizer, pairs, beta=args.beta, lr=args.lr,
                            bandit=bandit_world(seed=args.seed),
                            meta={"command": "python examples/explain.py " + " ".join(argv or sys.argv[1:]),
                                  "run": str(run), "policy": str(run / f"dpo_beta{TINY['beta']:g}"),
                                  "policy_steps": TINY["dpo_steps"], "reference": str(run / "sft"),
                                  "data": str(run / "pairs_eval.jsonl")})
    html = render_html(expl)
    page = write_page(args.page or run / "explain.html", html)
    print(f"wrote {page} ({page_weight(html) / 1024:.0f} KB) in {time.perf_counter() - t0:.1f} s; open it in a browser")
    return page


if __name__ == "__main__":
    main()
