"""The ``minidpo`` command: tokenizer, sft, dpo, sample, eval, export over your own files.

    minidpo tokenizer --corpus reviews.txt --vocab-size 4000 --out tok/
    minidpo sft   --data sft.jsonl --tokenizer tok/ --out runs/sft
    minidpo dpo   --data prefs.jsonl --ref runs/sft --out runs/dpo --beta 0.1
    minidpo sample --model runs/dpo --prompt "the movie was"
    minidpo eval  --policy runs/dpo --ref runs/sft --data heldout.jsonl
    minidpo export --model runs/dpo --out gpt2-dpo/        # a Hugging Face GPT-2 directory
    minidpo verify mypkg.losses:dpo_loss --framework torch # property-check anyone's DPO loss

A model argument (--model, --ref, --policy) is any of: a run folder written by ``sft``/``dpo``
(it holds checkpoint/ and tokenizer.json), a checkpoint folder, or a GPT-2 model directory
(config.json + model.safetensors + tokenizer files, e.g. one saved by ``transformers``).
Re-running sft/dpo with the same --out resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LOSS_HELP = (
    "DPO loss: sigmoid = the paper's eq. 7, -log sigma(beta*h); robust = label-noise-corrected DPO "
    "(Chowdhury et al.) using --label-smoothing as the flip rate; ipo = (h - 1/(2 beta))^2 (Azar et al.), "
    "use with --average-logps for the official per-token convention; hinge = SLiC's max(0, 1 - beta*h). "
    "h = (log pi_w - log ref_w) - (log pi_l - log ref_l)."
)


def _die(msg: str) -> None:
    print(f"minidpo: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------------------------ models


def find_tokenizer(path: Path):
    from .tokenizer import BPETokenizer

    for cand in (path, path / "tokenizer.json", path.parent / "tokenizer.json"):
        if cand.is_file() or (cand.is_dir() and ((cand / "tokenizer.json").exists() or (cand / "vocab.json").exists())):
            return BPETokenizer.load(cand)
    _die(f"{path}: no tokenizer.json found beside the model (pass --tokenizer)")


def load_model(path: str | Path, backend):
    """(params, GPTConfig, tokenizer) from a run folder, a checkpoint folder or a GPT-2 directory."""
    from .checkpoint import has_checkpoint, load_checkpoint
    from .model import GPTConfig

    path = Path(path)
    if not path.exists():
        _die(f"{path}: no such model folder")
    from .pretrained import is_pretrained_dir, load_pretrained

    if is_pretrained_dir(path):
        params, config, tokenizer = load_pretrained(path, backend=backend)
        if tokenizer is None:
            _die(f"{path}: GPT-2 directory without tokenizer files (tokenizer.json or vocab.json + merges.txt)")
        return params, config, tokenizer
    for ck_dir in (path / "checkpoint", path):
        if has_checkpoint(ck_dir):
            ck = load_checkpoint(ck_dir, backend=backend)
            model_cfg = ck.config.get("model", ck.config)
            tok_dir = path if ck_dir != path else path.parent
            return ck.params, GPTConfig.from_dict(model_cfg), find_tokenizer(tok_dir)
    _die(f"{path}: not a minidpo run/checkpoint folder or a GPT-2 model directory")


def _train_config(args, **extra):
    from .train import TrainConfig

    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
              schedule=args.schedule, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
              log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
              eval_batch_size=args.eval_batch_size, progress=not args.no_progress, pack=not args.no_pack)
    kw.update(extra)
    return TrainConfig(**kw)


def _split_eval(items: list, args):
    """Held-out split: --eval-data if given (handled by the caller), else the last --eval-fraction."""
    n_eval = int(round(len(items) * args.eval_fraction))
    if n_eval == 0 or n_eval >= len(items):
        return items, []
    return items[:-n_eval], items[-n_eval:]


def _save_tokenizer(tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)


# -------------------------------------------------------------------------------------- commands


def cmd_tokenizer(args) -> None:
    from .data import read_sft_corpus
    from .tokenizer import BPETokenizer

    texts = []
    for f in args.corpus:
        texts += [p + r for p, r in read_sft_corpus(f)]
    tok = BPETokenizer.train(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    path = tok.save(Path(args.out))
    print(f"trained a byte-level BPE with {tok.vocab_size} tokens on {len(texts)} texts -> {path}")


def cmd_sft(args) -> None:
    from .backend import get_backend
    from .data import build_sft_dataset, read_sft_corpus
    from .model import GPTConfig, init_params, num_params
    from .tokenizer import BPETokenizer
    from .train import train_sft

    backend = get_backend(args.device)
    out = Path(args.out)
    if args.model:
        params, config, tokenizer = load_model(args.model, backend)
    else:
        if not args.tokenizer:
            _die("sft needs --tokenizer (from `minidpo tokenizer`) or --model (a model to start from)")
        tokenizer = BPETokenizer.load(args.tokenizer)
        config = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=args.n_ctx, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd)
        params = init_params(config, backend, seed=args.seed)
    data = read_sft_corpus(args.data, on_error=args.on_error)
    items, stats = build_sft_dataset(data, tokenizer, max_length=min(args.max_length, config.n_ctx))
    if args.eval_data:
        eval_items, _ = build_sft_dataset(read_sft_corpus(args.eval_data, on_error=args.on_error), tokenizer,
                                          max_length=min(args.max_length, config.n_ctx))
    else:
        items, eval_items = _split_eval(items, args)
    print(f"SFT: {len(items)} training / {len(eval_items)} held-out examples; model {num_params(params):,} params; "
          f"device {backend.device}")
    _save_tokenizer(tokenizer, out)
    train_sft(params, config, items, tokenizer.pad_id, _train_config(args), out, backend=backend,
              eval_items=eval_items or None)
    print(f"done: {out}/checkpoint (model.safetensors, trainer_state.json), {out}/metrics.jsonl")


def _preference_pairs(path, tokenizer, config, args):
    from .data import build_preference_dataset, read_preferences

    examples = read_preferences(path, on_error=args.on_error)
    max_length = min(args.max_length, config.n_ctx)
    pairs, stats = build_preference_dataset(examples, tokenizer, max_length=max_length,
                                            max_prompt_length=min(args.max_prompt_length, max_length // 2),
                                            truncation_mode=args.truncation_mode)
    if stats.n_dropped:
        print(f"{path}: {stats.n_dropped} pair(s) dropped (empty or identical responses after truncation)")
    if not pairs:
        _die(f"{path}: no usable preference pairs")
    return pairs


def cmd_dpo(args) -> None:
    from .backend import get_backend
    from .losses import average_logps_for
    from .train import train_dpo

    backend = get_backend(args.device)
    out = Path(args.out)
    if bool(args.ref) == bool(args.model):
        _die("dpo needs exactly one of --ref or --model (the frozen reference and starting point)")
    reference, config, tokenizer = load_model(args.ref or args.model, backend)
    if args.policy:
        policy, pconfig, _ = load_model(args.policy, backend)
        if pconfig != config:
            _die("--policy and --ref have different model configs")
    else:
        policy = {k: v.copy() for k, v in reference.items()}
    pairs = _preference_pairs(args.data, tokenizer, config, args)
    if args.eval_data:
        eval_pairs = _preference_pairs(args.eval_data, tokenizer, config, args)
    else:
        pairs, eval_pairs = _split_eval(pairs, args)
    average = args.average_logps or (args.loss == "ipo" and average_logps_for("ipo"))
    tc = _train_config(args, beta=args.beta, loss_type=args.loss, label_smoothing=args.label_smoothing,
                       rpo_alpha=args.rpo_alpha, reference_free=args.reference_free, average_logps=average, cache_reference=not args.recompute_reference,
                       share_prompt=not args.no_share_prompt)
    print(f"DPO: {len(pairs)} training / {len(eval_pairs)} held-out pairs; beta={args.beta} loss={args.loss}; "
          f"device {backend.device}")
    _save_tokenizer(tokenizer, out)
    train_dpo(policy, reference, config, pairs, tokenizer.pad_id, tc, out, backend=backend,
              eval_pairs=eval_pairs or None)
    print(f"done: {out}/checkpoint, {out}/metrics.jsonl")


def cmd_sample(args) -> None:
    from .backend import get_backend
    from .evaluate import sample_continuations

    backend = get_backend(args.device)
    params, config, tokenizer = load_model(args.model, backend)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [l.rstrip("\n") for l in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if l.strip()]
    if not prompts:
        _die("give --prompt TEXT (repeatable) or --prompts-file FILE")
    longest = max(len(tokenizer.encode(p)) for p in prompts)
    max_new = min(args.max_new_tokens, config.n_ctx - longest)
    if max_new < 1:
        _die(f"the longest prompt has {longest} tokens; the model's context is {config.n_ctx}")
    if max_new < args.max_new_tokens:
        print(f"note: --max-new-tokens lowered to {max_new} to fit the model's context of {config.n_ctx}",
              file=sys.stderr)
    s = sample_continuations(params, config, tokenizer, prompts, args.n, max_new_tokens=max_new,
                             temperature=args.temperature, top_k=args.top_k, greedy=args.greedy,
                             rng=np.random.default_rng(args.seed), backend=backend)
    for p, t in zip(s.prompts, s.texts):
        print(json.dumps({"prompt": p, "completion": t}) if args.jsonl else f"{p}{t}")


def cmd_eval(args) -> None:
    from .backend import get_backend
    from .train import TrainConfig, batched_sequence_logps, evaluate_preferences

    backend = get_backend(args.device)
    policy, config, tokenizer = load_model(args.policy, backend)
    reference, rconfig, _ = load_model(args.ref, backend)
    if rconfig != config:
        _die("--policy and --ref have different model configs")
    pairs = _preference_pairs(args.data, tokenizer, config, args)
    tc = TrainConfig(beta=args.beta, loss_type=args.loss, label_smoothing=args.label_smoothing,
                     reference_free=args.reference_free, average_logps=args.average_logps,
                     eval_batch_size=args.batch_size, share_prompt=not args.no_share_prompt, pack=not args.no_pack)
    rc, rr = batched_sequence_logps(reference, config, pairs, tokenizer.pad_id, args.batch_size, backend,
                                    args.average_logps, tc.share_prompt, tc.pack)
    m = evaluate_preferences(policy, config, pairs, rc, rr, tokenizer.pad_id, tc, backend)
    m = {"n_pairs": len(pairs), **{k[5:]: v for k, v in m.items()}}
    print(json.dumps(m, indent=2))


def cmd_export(args) -> None:
    from .backend import get_backend
    from .pretrained import save_pretrained

    params, config, tokenizer = load_model(args.model, get_backend("cpu"))
    path = save_pretrained(args.out, params, config, tokenizer)
    print(f"wrote a GPT-2 model directory (config.json, model.safetensors, tokenizer.json) -> {path or args.out}")


def cmd_verify(args) -> None:
    """Property-check a DPO loss function (minidpo.verify.check_loss).

    Exit status: 0 all properties hold, 1 a property failed, 3 the framework is not installed.
    """
    from .verify import FrameworkUnavailable, check_loss, load_function

    kwargs = {}
    for item in args.arg or []:
        key, sep, value = item.partition("=")
        if not sep:
            _die(f"--arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    try:
        fn = load_function(args.function)
    except ModuleNotFoundError as err:
        if err.name in ("torch", "jax", "jaxlib"):  # the loss's own framework is missing: report it
            print(f"{args.function}: not checked: framework {err.name!r} is not installed")
            raise SystemExit(3) from None
        _die(f"cannot import {args.function}: {err}")
    except ImportError as err:
        _die(f"cannot import {args.function}: {err}")
    try:
        report = check_loss(fn, framework=args.framework, variant=args.variant, label_smoothing=args.label_smoothing,
                            kwargs=kwargs, max_examples=args.max_examples, reduction=args.reduction,
                            ipo_convention=args.ipo_convention, require_detached_reference=args.require_detached_reference)
    except FrameworkUnavailable as err:
        print(f"{args.function}: not checked: {err}")
        raise SystemExit(3) from None
    print(report.table())
    if not report.ok:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidpo", description="Direct Preference Optimization from scratch: "
                                "SFT a GPT-2, then DPO it against the frozen SFT model.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, train: bool):
        sp.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda / cuda:N (CuPy)")
        sp.add_argument("--seed", type=int, default=0, help="random seed (init, batch order, sampling)")
        sp.add_argument("--on-error", choices=["raise", "warn"], default="raise",
                        help="bad data lines: stop with file:line (raise) or skip them with a warning (warn)")
        sp.add_argument("--max-length", type=int, default=512, help="longest prompt+response in tokens")
        sp.add_argument("--threads", type=int, default=0,
                        help="CPU BLAS threads (0: the library default; 1 is often fastest for small models)")
        if not train:
            return
        sp.add_argument("--out", required=True, help="run folder (checkpoint/, metrics.jsonl); re-use it to resume")
        sp.add_argument("--steps", type=int, default=1000, help="optimizer steps")
        sp.add_argument("--batch-size", type=int, default=16, help="sequences (SFT) or preference pairs (DPO) per step")
        sp.add_argument("--lr", type=float, default=None, help="peak learning rate")
        sp.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps")
        sp.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="after warmup")
        sp.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
        sp.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
        sp.add_argument("--log-every", type=int, default=10)
        sp.add_argument("--eval-every", type=int, default=100)
        sp.add_argument("--save-every", type=int, default=200)
        sp.add_argument("--eval-data", default=None, help="held-out file (default: the last --eval-fraction of --data)")
        sp.add_argument("--eval-fraction", type=float, default=0.05)
        sp.add_argument("--eval-batch-size", type=int, default=16,
                        help="pairs (or sequences) per no-gradient forward pass: reference log-probs, held-out eval")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        sp.add_argument("--no-pack", action="store_true", help=_NO_PACK_HELP)

    sp = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text/JSONL files")
    sp.add_argument("--corpus", nargs="+", required=True, help=".txt (one document a line) or .jsonl files")
    sp.add_argument("--vocab-size", type=int, default=8000)
    sp.add_argument("--min-frequency", type=int, default=2)
    sp.add_argument("--out", required=True, help="folder or .json path for tokenizer.json")
    sp.set_defaults(func=cmd_tokenizer)

    sp = sub.add_parser("sft", help="supervised fine-tuning (NLL on responses): makes pi_ref")
    common(sp, train=True)
    sp.add_argument("--data", required=True, help='JSONL {"prompt","response"} or {"text"}, or .txt')
    sp.add_argument("--tokenizer", help="tokenizer.json or its folder (for a new model)")
    sp.add_argument("--model", help="start from this model (run folder, checkpoint or GPT-2 directory)")
    sp.add_argument("--n-layer", type=int, default=4)
    sp.add_argument("--n-head", type=int, default=4)
    sp.add_argument("--n-embd", type=int, default=128)
    sp.add_argument("--n-ctx", type=int, default=256)
    sp.set_defaults(func=cmd_sft, lr_default=1e-3)

    sp = sub.add_parser("dpo", help="Direct Preference Optimization against a frozen reference (eq. 7)")
    common(sp, train=True)
    sp.add_argument("--data", required=True, help='preference JSONL: {"prompt","chosen","rejected"} or HH {"chosen","rejected"}')
    sp.add_argument("--ref", help="the frozen reference pi_ref (usually the SFT run)")
    sp.add_argument("--model", help="the starting point, used as both pi_ref and the initial policy (same as --ref)")
    sp.add_argument("--policy", help="initial policy (default: a copy of the reference)")
    _dpo_options(sp)
    sp.add_argument("--recompute-reference", action="store_true",
                    help="run the reference forward every step instead of caching its log-probs once")
    sp.set_defaults(func=cmd_dpo, lr_default=1e-5)

    sp = sub.add_parser("sample", help="sample continuations of prompts")
    common(sp, train=False)
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sp.add_argument("--prompts-file", help="one prompt a line")
    sp.add_argument("--n", type=int, default=1, help="samples per prompt")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    sp.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    sp.add_argument("--greedy", action="store_true", help="argmax decoding")
    sp.add_argument("--jsonl", action="store_true", help="print JSON lines")
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser("eval", help="DPO loss and implicit-reward accuracy/margins of a policy on preference pairs")
    common(sp, train=False)
    sp.add_argument("--policy", required=True)
    sp.add_argument("--ref", required=True)
    sp.add_argument("--data", required=True)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--no-pack", action="store_true", help=_NO_PACK_HELP)
    _dpo_options(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("export", help="write a model as a Hugging Face GPT-2 directory")
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("verify", help="check a DPO loss function (yours, in NumPy/PyTorch/JAX) against the paper's properties")
    sp.add_argument("function", help="MODULE:FUNCTION or path/to/file.py:FUNCTION, called as "
                    "fn(pi_w, pi_l, ref_w, ref_l, beta, **hyper-parameters) on (N,) arrays")
    sp.add_argument("--framework", choices=["numpy", "torch", "jax"], default="torch")
    sp.add_argument("--variant", choices=["dpo", "cdpo", "robust", "ipo", "hinge"], default="dpo")
    sp.add_argument("--label-smoothing", type=float, default=0.1, help="eps for cdpo/robust, passed as label_smoothing=")
    sp.add_argument("--arg", action="append", metavar="KEY=VALUE", help="a fixed keyword argument (JSON value), e.g. ipo=true")
    sp.add_argument("--max-examples", type=int, default=25, help="hypothesis examples per property")
    sp.add_argument("--reduction", choices=["none", "mean", "sum"], default=None, help="require this batch reduction")
    sp.add_argument("--ipo-convention", choices=["summed", "per_token"], default=None, help="require this IPO log-prob convention")
    sp.add_argument("--require-detached-reference", action="store_true",
                    help="fail if gradient reaches reference log-probs that require grad")
    sp.set_defaults(func=cmd_verify)
    return p


_NO_PACK_HELP = ("pad every sequence to the longest of its batch instead of packing sequences into rows "
                 "(same numbers; packing skips the padding's work)")


def _dpo_options(sp) -> None:
    sp.add_argument("--no-share-prompt", action="store_true",
                    help="run each prompt twice, [x; y_w] and [x; y_l], instead of once per pair with both "
                         "responses after it under a block mask (same numbers; sharing skips the repeat)")
    sp.add_argument("--beta", type=float, default=0.1,
                    help="beta: strength of the KL leash to pi_ref (eq. 3/7); smaller lets the policy move further")
    sp.add_argument("--loss", default="sigmoid", choices=["sigmoid", "robust", "ipo", "hinge"], help=LOSS_HELP)
    sp.add_argument("--label-smoothing", type=float, default=0.0,
                    help="conservative DPO: assumed probability epsilon that a preference label is flipped")
    sp.add_argument("--rpo-alpha", type=float, default=0.0,
                    help="add alpha * NLL of the chosen responses (RPO-style SFT term)")
    sp.add_argument("--reference-free", action="store_true",
                    help="ignore pi_ref: the implicit reward is beta log pi (reference-free DPO)")
    sp.add_argument("--average-logps", action="store_true",
                    help="use per-token mean log-probs instead of sums (IPO's official convention)")
    sp.add_argument("--max-prompt-length", type=int, default=128, help="prompt tokens kept when truncating (at most half of --max-length)")
    sp.add_argument("--truncation-mode", choices=["keep_end", "keep_start"], default="keep_end",
                    help="which end of a long prompt to keep")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "lr", "absent") is None:
        args.lr = args.lr_default
    try:
        if getattr(args, "threads", 0):
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=args.threads, user_api="blas"):
                args.func(args)
        else:
            args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"minidpo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
