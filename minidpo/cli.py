"""The ``minidpo`` command: tokenizer, sft, dpo, sample, eval, export, explain over your own files.

    minidpo tokenizer --corpus reviews.txt --vocab-size 4000 --out tok/
    minidpo sft   --data sft.jsonl --tokenizer tok/ --out runs/sft
    minidpo dpo   --data prefs.jsonl --ref runs/sft --out runs/dpo --beta 0.1
    minidpo sample --model runs/dpo --prompt "the movie was"
    minidpo eval  --policy runs/dpo --ref runs/sft --data heldout.jsonl
    minidpo export --model runs/dpo --out gpt2-dpo/        # a Hugging Face GPT-2 directory
    minidpo verify mypkg.losses:dpo_loss --framework torch # property-check anyone's DPO loss
    minidpo explain runs/tiny --index 3 --out step.html   # one DPO step as a page, with its own numbers

A model argument (--model, --ref, --policy) is any of: a run folder written by ``sft``/``dpo``
(it holds checkpoint/ and tokenizer.json), a checkpoint folder, or a GPT-2 model directory
(config.json + model.safetensors + tokenizer files, e.g. one saved by ``transformers``).

Run folders (--out of sft/dpo): re-running the same command resumes from its checkpoint
("resuming at step N of M"); a finished run says "already complete at step N"; more --steps
extend a run (constant schedule); any other changed option, data file, tokenizer or model
stops with the differences named: use a new --out, or --overwrite to discard the old run.
Ctrl-C saves a checkpoint and exits with status 130. A model is used only with the tokenizer
its run recorded.

Data parallel: ``mpiexec -n K minidpo sft|dpo ...`` splits every batch over K processes (CPU, MPI)
or K GPUs (--device cuda, NCCL); --zero1 shards the optimizer state. Needs ``pip install -e ".[mpi]"``.
Rank 0 alone writes the run folder and prints; an error (in reading the inputs or in training)
stops every rank with one line and exit status 1, a Ctrl-C with status 130.

Exit status: 0 done (or already complete); 1 an error (bad data, model, checkpoint, run folder,
file, disk, device or memory; one line "minidpo: error: ..."); 2 a bad command line or option
value (one line with a pointer to --help, and "did you mean" for a misspelt option); 3 training
stopped on a non-finite loss, gradient or parameter (the last good checkpoint is kept; for
`verify`: 1 a property failed, 3 the loss's framework is not installed); 130 interrupted (Ctrl-C; during training a checkpoint is saved first); 141 the output pipe was
closed (e.g. piped into head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 130, 141

def losses_description() -> str:
    """The losses of losses.LOSS_TABLE, one line each, for ``minidpo dpo|eval --help``."""
    from .losses import LOSS_TABLE

    w = max(len(n) for n in LOSS_TABLE)
    rows = []
    for name, row in LOSS_TABLE.items():
        own = [o for o, opt in row.options.items() if opt.role != "score"]
        extra = [f"--{o.replace('_', '-')}" for o in own] + ([] if row.reference else ["no pi_ref"])
        extra += ["per-token mean log-probs"] if row.average_logps else []
        extra += ["f-DPO"] if any(opt.role == "score" for opt in row.options.values()) else []
        extra += [f"needs {k}" for k, spec in row.inputs.items() if spec.default is None and spec.units != "count"]
        rows.append(f"  {name:<{w}}  {row.help}" + (f" ({', '.join(extra)})" if extra else ""))
    return ("losses (--loss), h = (log pi_w - log ref_w) - (log pi_l - log ref_l), r = beta log pi/pi_ref; "
            "f-DPO: --f-divergence\n" + "\n".join(rows))


class CLIError(Exception):
    """A one-line error the command prints as ``minidpo: error: ...`` (exit status 1)."""


class UsageError(CLIError):
    """A bad command line that argparse cannot see (options that do not go together): exit status 2."""


def _die(msg: str):
    raise CLIError(msg)


_COMM = None  # under mpiexec (sft, dpo): this process's communicator; rank 0 alone prints notes and shared errors


def _rank() -> int:
    return _COMM.rank if _COMM is not None else 0


# ------------------------------------------------------------------------------------------ models


def find_tokenizer(path: Path):
    """(the tokenizer beside a model in ``path``, the file it was read from: tokenizer.json, or
    the folder holding GPT-2's vocab.json and merges.txt)."""
    from .tokenizer import BPETokenizer

    for cand in (path, path / "tokenizer.json", path.parent / "tokenizer.json"):
        if cand.is_file() or (cand.is_dir() and ((cand / "tokenizer.json").exists() or (cand / "vocab.json").exists())):
            return BPETokenizer.load(cand), (cand / "tokenizer.json" if (cand / "tokenizer.json").is_file() else cand)
    _die(f"{path}: no tokenizer.json found beside the model (pass --tokenizer)")


def tokenizer_fingerprint(tokenizer) -> str:
    """The fingerprint a run folder records of its tokenizer (train.fingerprint of tokenizer.json's text)."""
    from .train import fingerprint

    return fingerprint(tokenizer.backend_tokenizer.to_str())


def _same_tokenizer(policy, reference, policy_path, reference_path) -> None:
    """Refuse a policy and a reference read with different tokenizers: token ids would mean
    different text, and every log-prob ratio would compare unrelated sequences."""
    a, b = tokenizer_fingerprint(policy), tokenizer_fingerprint(reference)
    if a != b:
        _die(f"--policy {policy_path} and --ref {reference_path} use different tokenizers (fingerprints {a} and {b}); "
             f"a policy is scored against the reference it was trained from, with the same tokenizer")


def _checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint folder of a run folder or a checkpoint folder; None for anything else."""
    from .checkpoint import MODEL_FILE, has_checkpoint

    for ck_dir in (path / "checkpoint", path):
        if has_checkpoint(ck_dir) or (ck_dir / MODEL_FILE).exists():  # the latter: damaged, reported on load
            return ck_dir
    return None


def load_model(path: str | Path, backend):
    """(params, GPTConfig, tokenizer) from a run folder, a checkpoint folder or a GPT-2 directory.

    Checkpoints are verified before use (names, shapes, dtype, finiteness), and the tokenizer
    must fit the model's vocabulary."""
    from .checkpoint import CheckpointError, load_checkpoint, verify_params
    from .model import GPTConfig
    from .pretrained import is_pretrained_dir, load_pretrained

    path = Path(path)
    if not path.exists():
        _die(f"{path}: no such model folder")
    if is_pretrained_dir(path):
        params, config, tokenizer = load_pretrained(path, backend=backend)
        if tokenizer is None:
            _die(f"{path}: GPT-2 directory without tokenizer files (tokenizer.json or vocab.json + merges.txt)")
        return params, config, tokenizer
    ck_dir = _checkpoint_dir(path)
    if ck_dir is None:
        _die(f"{path}: not a minidpo run/checkpoint folder or a GPT-2 model directory")
    ck = load_checkpoint(ck_dir, backend=backend)
    try:
        config = GPTConfig.from_dict(ck.config.get("model", ck.config))
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ck_dir}: no usable model config in trainer_state.json ({err})") from None
    verify_params(ck.params, config, ck_dir)
    tokenizer, where = find_tokenizer(path if ck_dir != path else path.parent)
    if tokenizer.vocab_size > config.vocab_size:
        _die(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}; "
             f"they do not belong together")
    inputs = ck.config.get("inputs")
    recorded, now = inputs.get("tokenizer") if isinstance(inputs, dict) else None, tokenizer_fingerprint(tokenizer)
    if recorded is not None and recorded != now:  # the run recorded the tokenizer it was trained with
        _die(f"{where}: this tokenizer (fingerprint {now}) is not the one {path} was trained with (fingerprint "
             f"{recorded} in {ck_dir / 'trainer_state.json'}); put that run's tokenizer.json back beside it")
    return ck.params, config, tokenizer


def _check_fits(config, backend) -> None:
    """Refuse a new model whose float32 weights, gradients and AdamW's two moments (16 bytes a
    parameter, before any activation) exceed the device's memory, saying how much it would need."""
    import math
    import os

    from .model import param_shapes

    n = sum(math.prod(shape) for shape in param_shapes(config).values())
    if backend.is_cuda:
        have = backend.xp.cuda.runtime.memGetInfo()[1]
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 16 * n > have:
        _die(f"a model of {n:,} parameters (n_layer {config.n_layer}, n_embd {config.n_embd}, n_ctx {config.n_ctx:,}, "
             f"vocabulary {config.vocab_size:,}) needs {16 * n / 2**30:,.1f} GiB for its float32 weights, gradients "
             f"and AdamW's two moments alone; {backend.device} has {have / 2**30:,.1f} GiB")


def _unfinished(path: str | Path) -> tuple[int, int] | None:
    """(step reached, steps planned) when ``path`` is a run or checkpoint folder whose training
    stopped before its planned steps; None otherwise."""
    from .checkpoint import has_checkpoint, read_checkpoint_state

    ck_dir = _checkpoint_dir(Path(path))
    if ck_dir is None or not has_checkpoint(ck_dir):
        return None
    state = read_checkpoint_state(ck_dir)
    planned = state["config"].get("train", {}).get("steps")
    if isinstance(planned, int) and state["step"] < planned:
        return state["step"], planned
    return None


def _train_config(args, **extra):
    from .train import TrainConfig

    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
               schedule=args.schedule, weight_decay=args.weight_decay, adam_betas=args.adam_betas,
               grad_clip=args.grad_clip, seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
               save_every=args.save_every, eval_batch_size=args.eval_batch_size, progress=not args.no_progress,
               plain=args.plain, pack=not args.no_pack)
    kw.update(extra)
    try:
        return TrainConfig(**kw)
    except ValueError as err:  # options that do not go together (each alone passed argparse)
        raise UsageError(f"{err} (see `minidpo {args.command} --help`)") from None


def _split_eval(items: list, args):
    """Held-out split: --eval-data if given (handled by the caller), else the last --eval-fraction."""
    n_eval = int(round(len(items) * args.eval_fraction))
    if n_eval == 0:
        return items, []
    if n_eval >= len(items):
        _die(f"--eval-fraction {args.eval_fraction} of {len(items)} examples leaves none to train on")
    return items[:-n_eval], items[-n_eval:]


def _loss_settings(args) -> dict:
    """TrainConfig's loss fields from the command line: the --loss row's options that were given
    (an option of another loss, or out of range, is a usage error), --average-logps (None: the
    loss's own rule)."""
    from .losses import LOSS_TABLE

    row = LOSS_TABLE[args.loss]
    given = {name: getattr(args, name) for name in _loss_option_names() if getattr(args, name, None) is not None}
    for name, value in given.items():
        flag = f"--{name.replace('_', '-')}"
        see = f" (see `minidpo {args.command} --help`)"
        try:
            opt = row.accepts(name, given)
        except ValueError as err:  # a weighted sum's terms are themselves bad
            raise UsageError(f"{err}{see}") from None
        if opt is None:
            takes = [n for n, r in LOSS_TABLE.items() if name in r.options]
            raise UsageError(f"{flag} applies to --loss {' or '.join(takes)}, not {args.loss}{see}")
        try:
            given[name] = opt.check(flag, value, args.loss)
        except ValueError as err:
            raise UsageError(f"{err}{see}") from None
    return dict(loss_type=args.loss, loss_options=given, reference_free=args.reference_free,
                average_logps=True if args.average_logps else None, ld_alpha=args.ld_alpha, wpo=args.wpo)


def _loss_option_names() -> list[str]:
    """Every option name of every loss in the table, each once, in table order."""
    from .losses import LOSS_TABLE

    return list(dict.fromkeys(n for row in LOSS_TABLE.values() for n in row.options))


def _loss_option_flag(name: str, rows: list) -> dict:
    """argparse keywords of one loss option's flag, from the rows that have it: its help (the
    losses, each's range and default) and its parser (a number, a name among choices, or a string a
    row checks later)."""
    from .losses import _show

    first = rows[0][1]
    kinds = {f"{o.interval()} (default {_show(o.default)})": None for _, o in rows}  # the distinct ones
    where = (f"{next(iter(kinds))}" if len(kinds) == 1 else
             "; ".join(f"{n}: {o.interval()} (default {_show(o.default)})" for n, o in rows))
    if len(rows) > 4:
        losses = f"{len(rows)} losses ({', '.join(n for n, _ in rows[:3])}, ...)"
    else:
        losses = f"--loss {' or '.join(n for n, _ in rows)}"
    kw = dict(default=None, help=f"{first.help}; for {losses}; {where}")
    if first.choices:
        kw.update(choices=list(first.choices), metavar="NAME")
    elif first.weights:
        kw.update(type=str, metavar="NAME=WEIGHT,...")
    else:
        kw.update(type=_float_in(-INF, INF, True, True))
    return kw


def _communicator(args):
    """SingleProcess, or the MPI/NCCL communicator when started by ``mpiexec -n K`` (distributed.py)."""
    global _COMM
    from .distributed import from_environment

    try:
        _COMM = from_environment(args.device, zero1=args.zero1)
    except (RuntimeError, ValueError) as err:
        _die(str(err))
    return _COMM


def _save_tokenizer(tokenizer, out: Path) -> None:
    """Write out/tokenizer.json unless the same tokenizer is already there (the run-folder check
    before it has refused a different one)."""
    file = out / "tokenizer.json"
    if file.is_file() and file.read_text(encoding="utf-8") == tokenizer.backend_tokenizer.to_str(pretty=True):
        return
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)


def _note_skipped(data, path) -> None:
    if getattr(data, "skipped", 0) and _rank() == 0:
        print(f"{path}: skipped {data.skipped} bad line(s) (--on-error warn); {len(data)} kept", file=sys.stderr)


def _finish(res, out: Path, title: str, comm) -> int:
    """Exit status and last words of a training command: 130 after an interrupt (no "done:").
    Rank 0 alone draws the curves (also for a run already complete whose curves are missing,
    as after a Ctrl-C while they were drawn) and prints."""
    from .plots import plot_training_curves
    from .train import read_metrics

    if res.stopped_early:
        return EXIT_INTERRUPTED
    png = out / "training_curves.png"
    if comm.rank > 0 or (res.already_complete and png.exists()):
        return EXIT_OK
    plot_training_curves(read_metrics(out / "metrics.jsonl"), png, title=title)
    if res.already_complete:
        print(f"drew the missing {png}")
        return EXIT_OK
    print(f"done: {out}/checkpoint (model.safetensors, trainer_state.json), {out}/metrics.jsonl, "
          f"{out}/training_curves.png")
    return EXIT_OK


# -------------------------------------------------------------------------------------- commands


def cmd_tokenizer(args) -> int:
    from .data import read_sft_corpus
    from .tokenizer import BPETokenizer

    out = Path(args.out)
    if out.exists() and not out.is_dir() and out.suffix != ".json":
        _die(f"--out {out} is a file; give a folder, or a path ending in .json")
    texts = []
    for f in args.corpus:
        data = read_sft_corpus(f, on_error=args.on_error)
        _note_skipped(data, f)
        texts += [p + r for p, r in data]
    tok = BPETokenizer.train(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    _keep_a_models_tokenizer(out, tok)
    path = tok.save(out)
    print(f"trained a byte-level BPE with {tok.vocab_size} tokens on {len(texts)} texts -> {path}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: {tok.vocab_size} tokens, not {args.vocab_size}: the corpus has no more pairs seen at least "
              f"--min-frequency {args.min_frequency} times to merge (use more text or a lower --min-frequency)",
              file=sys.stderr)
    return EXIT_OK


def _keep_a_models_tokenizer(out: Path, new) -> None:
    """Refuse to replace the tokenizer.json of a model's folder (a run, checkpoint or GPT-2
    directory) by a different one: the model's token ids would silently mean other text."""
    from .pretrained import is_pretrained_dir

    file = out if out.suffix == ".json" else out / "tokenizer.json"
    folder = file.parent
    if not file.is_file() or (_checkpoint_dir(folder) is None and not is_pretrained_dir(folder)):
        return
    theirs, ours = tokenizer_fingerprint(find_tokenizer(file)[0]), tokenizer_fingerprint(new)
    if theirs != ours:
        _die(f"--out {out}: {file} belongs to the model in {folder} (tokenizer fingerprint {theirs}); the new tokenizer "
             f"(fingerprint {ours}) would not match its weights: choose another --out")


def cmd_sft(args) -> int:
    from .backend import get_backend
    from .data import build_sft_dataset, read_sft_corpus
    from .model import GPTConfig, init_params, num_params
    from .tokenizer import BPETokenizer
    from .distributed import on_every_rank, on_rank0
    from .train import check_run_folder, discard_stage, fingerprint, run_lock, stage_inputs, train_sft

    comm = _communicator(args)
    out = Path(args.out)
    tc = _train_config(args)

    def read_inputs():  # every rank alike; a failure on any rank is reported once (distributed.on_every_rank)
        backend = get_backend(comm.device or args.device)  # under NCCL: this rank's own GPU
        if args.model:
            params, config, tokenizer = load_model(args.model, backend)
            start = f"model {fingerprint(params)}"
        else:
            tokenizer = BPETokenizer.load(args.tokenizer)
            config = GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=args.n_ctx, n_layer=args.n_layer,
                               n_head=args.n_head, n_embd=args.n_embd)
            _check_fits(config, backend)
            params = init_params(config, backend, seed=args.seed)
            start = f"random init, seed {args.seed}"
        data = read_sft_corpus(args.data, on_error=args.on_error)
        _note_skipped(data, args.data)
        items, _ = build_sft_dataset(data, tokenizer, max_length=min(args.max_length, config.n_ctx))
        if args.eval_data:
            eval_data = read_sft_corpus(args.eval_data, on_error=args.on_error)
            _note_skipped(eval_data, args.eval_data)
            eval_items, _ = build_sft_dataset(eval_data, tokenizer, max_length=min(args.max_length, config.n_ctx))
        else:
            items, eval_items = _split_eval(items, args)
        return backend, params, config, tokenizer, items, eval_items, start

    backend, params, config, tokenizer, items, eval_items, start = on_every_rank(comm, read_inputs)
    inputs = {"start": start, "tokenizer": tokenizer_fingerprint(tokenizer)}

    def prepare_folder():  # rank 0 alone: the lock (held until training ends), the checks, then the writes
        held.enter_context(run_lock(out))
        if args.overwrite:
            discard_stage(out)
        # everything is checked before anything is written
        check_run_folder(out, "sft", config, tc, stage_inputs(items, eval_items, inputs))
        print(f"SFT: {len(items)} training / {len(eval_items)} held-out examples; model {num_params(params):,} params; "
              f"device {backend.device}" + (f"; {comm.size} ranks" if comm.size > 1 else ""), flush=True)
        _save_tokenizer(tokenizer, out)

    with contextlib.ExitStack() as held:
        on_rank0(comm, prepare_folder)  # also the barrier before training: the other ranks wait for it
        res = train_sft(params, config, items, tokenizer.pad_id, tc, out, backend=backend,
                        eval_items=eval_items or None, inputs=inputs, comm=comm)
    return _finish(res, out, "SFT", comm)


def _preference_pairs(path, tokenizer, config, args):
    from .data import build_preference_dataset, read_preferences

    examples = read_preferences(path, on_error=args.on_error)
    _note_skipped(examples, path)
    max_length = min(args.max_length, config.n_ctx)
    pairs, stats = build_preference_dataset(examples, tokenizer, max_length=max_length,
                                            max_prompt_length=min(args.max_prompt_length, max_length // 2),
                                            truncation_mode=args.truncation_mode)
    if stats.n_dropped and _rank() == 0:
        print(f"{path}: {stats.n_dropped} pair(s) dropped (empty or identical responses after truncation)")
    if not pairs:
        _die(f"{path}: no usable preference pairs")
    return pairs


def _kto_examples(path, tokenizer, config, args):
    from .data import build_kto_dataset, read_kto

    examples = read_kto(path, on_error=args.on_error)
    _note_skipped(examples, path)
    max_length = min(args.max_length, config.n_ctx)
    items, stats = build_kto_dataset(examples, tokenizer, max_length=max_length,
                                     max_prompt_length=min(args.max_prompt_length, max_length // 2))
    if stats["dropped_empty"] and _rank() == 0:
        print(f"{path}: {stats['dropped_empty']} example(s) dropped (empty completion)")
    return items


def cmd_dpo(args) -> int:
    from .backend import get_backend
    from .data import is_kto_file
    from .distributed import on_every_rank, on_rank0
    from .train import check_run_folder, discard_stage, fingerprint, run_lock, stage_inputs, train_dpo, train_kto

    comm = _communicator(args)
    out = Path(args.out)
    ref_path = args.ref or args.model
    tc = _train_config(args, beta=args.beta, rpo_alpha=args.rpo_alpha, **_loss_settings(args),
                       cache_reference=not args.recompute_reference, share_prompt=not args.no_share_prompt)
    # KTO learns from unpaired examples ({"prompt", "completion", "label"}); preference pairs are
    # KTO data too (each pair one desirable and one undesirable completion), trained as pairs
    unpaired = is_kto_file(args.data)
    if unpaired and args.loss != "kto":
        raise UsageError(f"{args.data} holds unpaired KTO examples (prompt, completion, label); they train with "
                         f"--loss kto, not {args.loss} (see `minidpo dpo --help`)")
    if args.eval_data and is_kto_file(args.eval_data) != unpaired:
        raise UsageError(f"--eval-data {args.eval_data} is not in --data's format "
                         f"({'unpaired KTO examples' if unpaired else 'preference pairs'})")
    read_items = _kto_examples if unpaired else _preference_pairs
    what = "examples" if unpaired else "pairs"

    def read_inputs():  # every rank alike; a failure on any rank is reported once (distributed.on_every_rank)
        backend = get_backend(comm.device or args.device)  # under NCCL: this rank's own GPU
        for flag, path in (("--ref" if args.ref else "--model", ref_path), ("--policy", args.policy)):
            stopped = _unfinished(path) if path else None
            if stopped and not args.allow_unfinished_ref:
                _die(f"{flag} {path} stopped at step {stopped[0]} of its {stopped[1]} (interrupted?); finish it by "
                     f"re-running its command, or pass --allow-unfinished-ref to use it as it is")
        reference, config, tokenizer = load_model(ref_path, backend)
        if args.policy:
            policy, pconfig, ptokenizer = load_model(args.policy, backend)
            _same_tokenizer(ptokenizer, tokenizer, args.policy, ref_path)
            if pconfig != config:
                _die("--policy and --ref have different model configs")
            start = f"policy {fingerprint(policy)}"
        else:
            policy = {k: v.copy() for k, v in reference.items()}
            start = "a copy of the reference"
        items = read_items(args.data, tokenizer, config, args)
        if args.eval_data:
            eval_items = read_items(args.eval_data, tokenizer, config, args)
        else:
            items, eval_items = _split_eval(items, args)
        if not tc.uses_reference:  # a loss without pi_ref: the model only started the policy
            reference = None
        return backend, reference, policy, config, tokenizer, items, eval_items, start

    backend, reference, policy, config, tokenizer, items, eval_items, start = on_every_rank(comm, read_inputs)
    inputs = {"start": start, "tokenizer": tokenizer_fingerprint(tokenizer)}
    stage = "kto" if unpaired else "dpo"

    def prepare_folder():  # rank 0 alone: the lock (held until training ends), the checks, then the writes
        held.enter_context(run_lock(out))
        if args.overwrite:
            discard_stage(out)
        check_run_folder(out, stage, config, tc, stage_inputs(
            items, eval_items, inputs, reference=fingerprint(reference) if reference is not None else None))
        print(f"{stage.upper()}: {len(items)} training / {len(eval_items)} held-out {what}; beta={args.beta} "
              f"loss={args.loss}; device {backend.device}" + (f"; {comm.size} ranks" if comm.size > 1 else "")
              + ("" if reference is not None else "; no reference model (the loss has none)"), flush=True)
        _save_tokenizer(tokenizer, out)

    train = train_kto if unpaired else train_dpo
    with contextlib.ExitStack() as held:
        on_rank0(comm, prepare_folder)  # also the barrier before training: the other ranks wait for it
        res = train(policy, reference, config, items, tokenizer.pad_id, tc, out, backend,
                    eval_items or None, inputs=inputs, comm=comm)
    return _finish(res, out, f"{stage.upper()}, beta={args.beta:g}, loss={args.loss}", comm)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape_prompt(text: str) -> str:
    r"""``--prompt`` text with the escapes \n (newline), \t (tab) and \\ (a backslash) replaced,
    so "Human: hi\n\nAssistant:" is a three-line prompt; other backslashes stay as they are."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a file: ``.jsonl``, one JSON string or {"prompt": str} a line (so prompts may
    hold newlines); anything else, one prompt a line. Blank lines are skipped."""
    from .data import DataError

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "expected a prompts file, got a directory", str(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [l for l in lines if l.strip()]
    prompts = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
        except ValueError as err:
            raise DataError(path, i, f"invalid JSON ({err})") from None
        except RecursionError:
            raise DataError(path, i, "invalid JSON: nested too deeply to read") from None
        if isinstance(v, dict):
            v = v.get("prompt")
        if not isinstance(v, str):
            raise DataError(path, i, 'expected a JSON string or {"prompt": string}')
        prompts.append(v)
    return prompts


def cmd_sample(args) -> int:
    import numpy as np

    from .backend import get_backend
    from .evaluate import sample_continuations
    from .tokenizer import UNDECODABLE_NOTE

    backend = get_backend(args.device)
    prompts = [unescape_prompt(p) for p in (args.prompt or [])]
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        _die(f"{args.prompts_file}: no prompts in it")
    params, config, tokenizer = load_model(args.model, backend)
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
    for k, (p, t) in enumerate(zip(s.prompts, s.texts)):
        if args.jsonl:
            print(json.dumps({"prompt": p, "completion": t}))
            continue
        if len(s.texts) > 1:  # a sample may span lines: each one under its own header
            print(f"--- sample {k % args.n + 1} of {args.n}" + (f", prompt {k // args.n + 1} of {len(prompts)}"
                                                               if len(prompts) > 1 else "") + " ---")
        print(f"{p}{t}")
    if any("\ufffd" in t for t in s.texts):
        print(f"note: {UNDECODABLE_NOTE}", file=sys.stderr)
    return EXIT_OK


def cmd_eval(args) -> int:
    from .backend import get_backend
    from .scoring import batched_sequence_logps
    from .train import TrainConfig, batcher_for, evaluate_preferences

    backend = get_backend(args.device)
    try:
        tc = TrainConfig(beta=args.beta, rpo_alpha=args.rpo_alpha, **_loss_settings(args),
                         eval_batch_size=args.batch_size, share_prompt=not args.no_share_prompt, pack=not args.no_pack)
    except ValueError as err:
        raise UsageError(f"{err} (see `minidpo eval --help`)") from None
    policy, config, tokenizer = load_model(args.policy, backend)
    reference, rconfig, rtokenizer = load_model(args.ref, backend)
    _same_tokenizer(tokenizer, rtokenizer, args.policy, args.ref)
    if rconfig != config:
        _die("--policy and --ref have different model configs")
    pairs = _preference_pairs(args.data, tokenizer, config, args)
    batcher = batcher_for(tc, tokenizer.pad_id, backend)
    rc, rr = (batched_sequence_logps(reference, config, pairs, batcher, args.batch_size) if tc.uses_reference
              else (None, None))
    inputs = {}
    if args.loss == "kto":  # the held-out set's own reference point, as training's held-out evaluation takes it
        from .train import pair_examples, kto_batch_reference_point

        inputs["reference_point"] = kto_batch_reference_point(policy, reference, config, *pair_examples(pairs),
                                                              batcher, tc)
    m = evaluate_preferences(policy, config, pairs, rc, rr, batcher, tc, inputs=inputs)
    m = {"n_pairs": len(pairs), "average_logps": tc.logps_averaged, **{k[5:]: v for k, v in m.items()}}
    print(json.dumps(m, indent=2))
    return EXIT_OK


def cmd_export(args) -> int:
    from .backend import get_backend
    from .pretrained import is_pretrained_dir, save_pretrained

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_pretrained_dir(out))):
        _die(f"--out {out} exists and is not an empty folder or a GPT-2 model directory; choose a new folder")
    params, config, tokenizer = load_model(args.model, get_backend("cpu"))
    existed = is_pretrained_dir(out)
    try:
        path = save_pretrained(out, params, config, tokenizer)
    except OSError as err:  # a full or read-only disk: atomic_directory left ``out`` as it was
        _die(f"cannot write {out} ({err.strerror or err}); "
             + ("the model directory there is intact" if existed else "nothing was written"))
    print(f"wrote a GPT-2 model directory (config.json, model.safetensors, tokenizer.json) -> {path or out}")
    return EXIT_OK


EXPLAIN_TINY_DIR = Path("runs") / "explain-tiny"
_SEE_EXPLAIN = " (see `minidpo explain --help`)"


def _dpo_run_settings(path: Path):
    """(TrainConfig, step) of the DPO run that made the model in ``path``; (None, None) for any
    other model (an SFT run, a GPT-2 directory)."""
    from .checkpoint import has_checkpoint, read_checkpoint_state
    from .train import TrainConfig

    ck_dir = _checkpoint_dir(path)
    if ck_dir is None or not has_checkpoint(ck_dir):
        return None, None
    state = read_checkpoint_state(ck_dir)
    if state["config"].get("stage") != "dpo":
        return None, None
    try:
        return TrainConfig.from_dict(state["config"].get("train", {})), int(state["step"])
    except (TypeError, ValueError):
        return None, int(state["step"])


def _explain_models(run: Path, args):
    """(policy path, reference path, note) for ``minidpo explain RUN``: a folder holding sft/ (pi_ref)
    and dpo_beta*/ (the policy), as examples/train_tiny.py and the default model write it, or one
    model folder (the policy) with --ref."""
    if not run.exists():
        _die(f"{run}: no such run folder")
    dpos = sorted(d for d in run.glob("dpo_beta*") if d.is_dir()) if run.is_dir() else []
    if (run / "sft").is_dir() and (dpos or args.ref is None):
        ref = Path(args.ref) if args.ref else run / "sft"
        if not dpos:
            return ref, ref, f"{run} holds no dpo_beta*/ policy: the policy is pi_ref itself (DPO's first step)"
        if len(dpos) == 1:
            return dpos[0], ref, None
        want = run / f"dpo_beta{args.beta:g}" if args.beta is not None else None
        if want in dpos:
            return want, ref, None
        raise UsageError(f"{run} holds {len(dpos)} policies ({', '.join(d.name for d in dpos)}): choose one with "
                         f"--beta, or give its folder as RUN with --ref {run / 'sft'}{_SEE_EXPLAIN}")
    if args.ref is None:
        raise UsageError(f"{run} is one model, the policy: give its reference with --ref (the SFT run it was "
                         f"trained from), or a folder holding sft/ and dpo_beta*/{_SEE_EXPLAIN}")
    return run, Path(args.ref), None


def _explain_pairs(args, tokenizer, max_length: int, default_data: Path | None):
    """The batch to explain: the --prompt/--chosen/--rejected pair and/or pairs of --data from
    --index on (wrapping round), --batch-size in all; the first is shown token by token."""
    from .data import read_preferences
    from .explain import ExplainError, tokenize_pair

    pairs = []
    if not (args.prompt is None) == (args.chosen is None) == (args.rejected is None):
        raise UsageError(f"give --prompt, --chosen and --rejected together{_SEE_EXPLAIN}")
    if args.prompt is not None:
        texts = [unescape_prompt(t) for t in (args.prompt, args.chosen, args.rejected)]
        pairs.append(tokenize_pair(tokenizer, *texts, max_length=max_length, source="--prompt/--chosen/--rejected"))
    data = args.data or (str(default_data) if not pairs and default_data is not None and default_data.is_file() else None)
    if data is None:
        if not pairs:
            raise UsageError(f"give the pair: --data FILE (with --index I), or --prompt, --chosen and --rejected{_SEE_EXPLAIN}")
        return pairs, None
    examples = read_preferences(data, on_error=args.on_error)
    _note_skipped(examples, data)
    n = len(examples)
    if not 0 <= args.index < n:
        raise UsageError(f"--index {args.index} is out of range: {data} has {n} preference pair{'s' if n != 1 else ''} "
                         f"(indices 0 to {n - 1}){_SEE_EXPLAIN}")
    for j in range(min(args.batch_size, n + len(pairs)) - len(pairs)):
        e = examples[(args.index + j) % n]
        try:
            pairs.append(tokenize_pair(tokenizer, e.prompt, e.chosen, e.rejected, max_length=max_length, source=e.source))
        except ExplainError as err:
            if not pairs:  # the pair the page follows: an error
                raise
            print(f"note: left out of the batch: {err}", file=sys.stderr)
    return pairs, data


def cmd_explain(args) -> int:
    import time

    from .backend import get_backend
    from .explain import bandit_world, explain_step, page_weight, render_html, tiny_run, write_page

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.is_dir():
        _die(f"--out {out} is a folder; give the page's file name, e.g. {out / 'explain.html'}")
    backend = get_backend(args.device)
    if args.run is None:
        run = Path(args.tiny_dir)
        tiny_run(run, seed=args.seed, backend=backend, progress=not args.no_progress)
    else:
        run = Path(args.run)
    policy_path, ref_path, note = _explain_models(run, args)
    for path in {policy_path, ref_path}:  # a run folder's tokenizer lies in it or in the folder above
        if _checkpoint_dir(path) not in (None, path) and not any(
                (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file() for d in (path, path.parent)):
            _die(f"{path}: no tokenizer.json in it or in {path.parent}: the page needs the tokenizer its model "
                 f"was trained with")
    reference, config, tokenizer = load_model(ref_path, backend)
    if policy_path == ref_path:
        policy = {k: v.copy() for k, v in reference.items()}
    else:
        policy, pconfig, ptokenizer = load_model(policy_path, backend)
        _same_tokenizer(ptokenizer, tokenizer, policy_path, ref_path)
        if pconfig != config:
            _die(f"the policy {policy_path} and the reference {ref_path} have different model configs")
    if note:
        print(f"note: {note}", file=sys.stderr)
    run_tc, steps = _dpo_run_settings(policy_path)
    beta = args.beta if args.beta is not None else (run_tc.beta if run_tc is not None else 0.1)
    lr = args.lr if args.lr is not None else (run_tc.lr if run_tc is not None else 1e-5)
    max_length = min(args.max_length, config.n_ctx)
    pairs, data = _explain_pairs(args, tokenizer, max_length, run / "pairs_eval.jsonl" if run.is_dir() else None)
    argv = ["minidpo", "explain"] + ([str(args.run)] if args.run else [])
    for flag, value in (("--ref", args.ref), ("--data", args.data), ("--index", args.index if data else None),
                        ("--beta", args.beta), ("--lr", args.lr), ("--out", args.out)):
        if value is not None:
            argv += [flag, str(value)]
    meta = {"command": " ".join(argv) + (" --prompt ..." if args.prompt is not None else ""),
            "run": str(run), "policy": str(policy_path), "reference": str(ref_path), "data": data,
            "policy_steps": steps if policy_path != ref_path else 0,
            "beta_from": "--beta" if args.beta is not None else ("the policy's run" if run_tc else "the default"),
            "lr_from": "--lr" if args.lr is not None else ("the policy's run" if run_tc else "minidpo dpo's default")}
    bandit = None if args.no_bandit else bandit_world(seed=args.seed)
    expl = explain_step(policy, reference, config, tokenizer, pairs, beta=beta, lr=lr, train_config=run_tc,
                        backend=backend, meta=meta, bandit=bandit)
    html = render_html(expl)
    write_page(out, html)
    print(f"wrote {out} ({page_weight(html) / 1024:.0f} KB, {time.perf_counter() - t0:.1f} s): one DPO step on "
          f"{len(pairs)} pair{'s' if len(pairs) != 1 else ''} at beta {beta:g}, lr {lr:g}; open it in a browser")
    return EXIT_OK


EXIT_NO_FRAMEWORK = 3  # verify: the loss's framework is not installed (nothing was checked)


def cmd_verify(args) -> int:
    """Property-check a DPO loss function (minidpo.verify.check_loss).

    Exit status: 0 all properties hold, 1 a property failed, 3 the framework is not installed.
    """
    try:
        import hypothesis  # noqa: F401 - verify draws its inputs with it
    except ImportError:
        _die("minidpo verify needs hypothesis, which is not installed: pip install 'minidpo[verify]'")
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
            return EXIT_NO_FRAMEWORK
        _die(f"cannot import {args.function}: {err}")
    except ImportError as err:  # also a module that fails to run: a syntax error, an exception at import
        _die(f"cannot import {args.function}: {err}")
    try:
        report = check_loss(fn, framework=args.framework, variant=args.variant, label_smoothing=args.label_smoothing,
                            kwargs=kwargs, max_examples=args.max_examples, reduction=args.reduction,
                            ipo_convention=args.ipo_convention, require_detached_reference=args.require_detached_reference)
    except FrameworkUnavailable as err:
        print(f"{args.function}: not checked: {err}")
        return EXIT_NO_FRAMEWORK
    print(report.table())
    return EXIT_OK if report.ok else EXIT_ERROR


# ---------------------------------------------------------------------------------------- parser


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors, ``PROG: error: MESSAGE (see `PROG --help`)`` and exit
    status 2 (not the whole usage first), with "did you mean" for a misspelt option or command.
    The ``minidpo`` command and the examples parse their options with it."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog.split()[0]}: error: {message}{_did_you_mean(self, message)} "
                              f"(see `{self.prog} --help`)\n")


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """"; did you mean --steps?" for an unrecognised option or an invalid choice close to a known one."""
    import difflib

    if message.startswith("unrecognized arguments:"):
        known = [s for s in parser._option_string_actions if s.startswith("--")]
        for word in message.split(":", 1)[1].split():
            close = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("--") else []
            if close:
                return f"; did you mean {close[0]}?"
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        close = difflib.get_close_matches(m.group(1), re.findall(r"'([^']*)'", m.group(2)), n=1)
        if close:
            return f"; did you mean {close[0]!r}?"
    return ""


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept, and every option's default shown (unless the help already
    says it, or there is none: a required option, a flag that is off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not off and "(default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _int_at_least(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}" + (f" and <= {hi:,}" if hi is not None else "") +
                                             f", got {v}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (v > lo if lo_open else v >= lo) or not (v < hi if hi_open else v <= hi):
            raise argparse.ArgumentTypeError(f"must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                             f"{')' if hi_open else ']'}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def _device(text: str) -> str:
    """--device: cpu, cuda or cuda:N (checked here, so a typo is a usage error before any work)."""
    from .backend import parse_device

    try:
        parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _adam_betas(text: str) -> tuple[float, float]:
    try:
        b = tuple(float(x) for x in text.split(","))
    except ValueError:
        b = ()
    if len(b) != 2 or not all(0 <= x < 1 for x in b):
        raise argparse.ArgumentTypeError(f"expected two numbers in [0, 1) such as 0.9,0.999, got {text!r}")
    return b


INF = float("inf")


def verify_variants() -> list[str]:
    """``minidpo verify --variant`` names: minidpo.verify.variants(), i.e. the loss table's losses."""
    from .verify import variants

    return [*variants(), "sigmoid"]


def build_parser() -> argparse.ArgumentParser:
    from .tokenizer import MAX_VOCAB_SIZE

    p = ArgumentParser(prog="minidpo", description="Direct Preference Optimization from scratch: "
                                "SFT a GPT-2, then DPO it against the frozen SFT model.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw):
        return sub.add_parser(name, formatter_class=_Formatter, allow_abbrev=False, **kw)

    def common(sp, train: bool):
        sp.add_argument("--device", type=_device, default="cpu", help="cpu (NumPy) or cuda / cuda:N (CuPy)")
        sp.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (init, batch order, sampling)")
        sp.add_argument("--on-error", choices=["raise", "warn"], default="raise",
                        help="bad data lines: stop with file:line (raise) or skip them with a warning and a count (warn)")
        sp.add_argument("--max-length", type=_int_at_least(2), default=512,
                        help="longest prompt+response in tokens (at most the model's context)")
        sp.add_argument("--threads", type=_int_at_least(0), default=1,
                        help="CPU threads: the fast path's pool, which shares every pass and matrix product "
                             "among them (the BLAS on one thread each); 0 = the BLAS library's own threading "
                             "(all cores), which ran SFT of the default model 3-4x slower on 2 cores")
        sp.add_argument("--plain", action="store_true",
                        help="run the plain reference (layers.py, logprobs.py) instead of the fast paths (slower)")
        if not train:
            return
        sp.add_argument("--out", required=True,
                        help="run folder (checkpoint/, metrics.jsonl, tokenizer.json, training_curves.png); "
                             "the same command again resumes it")
        sp.add_argument("--overwrite", action="store_true",
                        help="discard a run already in --out (its checkpoint and metrics) instead of refusing")
        sp.add_argument("--steps", type=_int_at_least(0), default=1000,
                        help="optimizer steps in all (a larger value extends a finished run)")
        sp.add_argument("--batch-size", type=_int_at_least(1), default=16,
                        help="sequences (SFT) or preference pairs (DPO) per step")
        sp.add_argument("--lr", type=_float_in(0, INF, lo_open=True, hi_open=True), default=None,
                        help="peak learning rate (default: 1e-3 for sft, 1e-5 for dpo)")
        sp.add_argument("--warmup-steps", type=_int_at_least(0), default=50, help="linear warmup steps")
        sp.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="learning rate after warmup")
        sp.add_argument("--weight-decay", type=_float_in(0, INF, hi_open=True), default=0.0,
                        help="AdamW decoupled weight decay")
        sp.add_argument("--adam-betas", type=_adam_betas, default="0.9,0.95", metavar="B1,B2",
                        help="AdamW's moment decay rates beta1,beta2 (not DPO's --beta); 0.9,0.999 is PyTorch's default")
        sp.add_argument("--grad-clip", type=_float_in(0, INF, hi_open=True), default=1.0,
                        help="global gradient-norm clip (0: off)")
        sp.add_argument("--log-every", type=_int_at_least(1), default=10,
                        help="steps per metrics.jsonl record (means over those steps)")
        sp.add_argument("--eval-every", type=_int_at_least(1), default=100,
                        help="steps between held-out evaluations (and one at the end)")
        sp.add_argument("--save-every", type=_int_at_least(1), default=200,
                        help="steps between checkpoints (and one at the end, and on Ctrl-C)")
        sp.add_argument("--eval-data", default=None, help="held-out file (default: the last --eval-fraction of --data)")
        sp.add_argument("--eval-fraction", type=_float_in(0, 1, hi_open=True), default=0.05,
                        help="share of --data held out for evaluation when --eval-data is not given")
        sp.add_argument("--eval-batch-size", type=_int_at_least(1), default=16,
                        help="pairs (or sequences) per no-gradient forward pass: reference log-probs, held-out eval")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--zero1", action="store_true",
                        help="under mpiexec -n K: shard the AdamW moments across the K ranks (ZeRO-1)")
        sp.add_argument("--no-pack", action="store_true", help=_NO_PACK_HELP)

    sp = add("tokenizer", help="train a byte-level BPE tokenizer on text/JSONL files")
    sp.add_argument("--corpus", nargs="+", required=True, help=".txt (one document a line) or .jsonl files")
    sp.add_argument("--vocab-size", type=_int_at_least(257, MAX_VOCAB_SIZE), default=8000,
                    help=f"largest vocabulary (256 bytes + EOS + merges), at most {MAX_VOCAB_SIZE:,}; "
                         f"a small corpus may give fewer")
    sp.add_argument("--min-frequency", type=_int_at_least(1), default=2,
                    help="merge only pairs seen at least this often")
    sp.add_argument("--on-error", choices=["raise", "warn"], default="raise",
                    help="bad .jsonl lines: stop with file:line (raise) or skip them (warn)")
    sp.add_argument("--out", required=True, help="folder (gets tokenizer.json) or a .json path")
    sp.set_defaults(func=cmd_tokenizer)

    sp = add("sft", help="supervised fine-tuning (NLL on responses): makes pi_ref")
    common(sp, train=True)
    sp.add_argument("--data", required=True, help='JSONL {"prompt","response"} or {"text"}, or .txt')
    start = sp.add_mutually_exclusive_group(required=True)
    start.add_argument("--tokenizer", help="tokenizer.json or its folder (for a new model)")
    start.add_argument("--model", help="start from this model (run folder, checkpoint or GPT-2 directory) "
                                       "instead of a new one")
    sp.add_argument("--n-layer", type=_int_at_least(1), default=4, help="transformer blocks of a new model")
    sp.add_argument("--n-head", type=_int_at_least(1), default=4, help="attention heads of a new model")
    sp.add_argument("--n-embd", type=_int_at_least(1), default=128,
                    help="channels of a new model (a multiple of --n-head)")
    sp.add_argument("--n-ctx", type=_int_at_least(2), default=256, help="context length (positions) of a new model")
    sp.set_defaults(func=cmd_sft, lr_default=1e-3)

    sp = add("dpo", help="Direct Preference Optimization against a frozen reference (eq. 7)")
    common(sp, train=True)
    sp.add_argument("--data", required=True, help='preference JSONL: {"prompt","chosen","rejected"} or HH {"chosen","rejected"}')
    start = sp.add_mutually_exclusive_group(required=True)
    start.add_argument("--ref", help="the frozen reference pi_ref (usually the SFT run)")
    start.add_argument("--model", help="the starting point, used as both pi_ref and the initial policy (same as --ref)")
    sp.add_argument("--policy", help="initial policy (default: a copy of the reference)")
    sp.add_argument("--allow-unfinished-ref", action="store_true",
                    help="accept a reference (or --policy) run that stopped before its planned steps")
    _dpo_options(sp, train=True)
    sp.add_argument("--recompute-reference", action="store_true",
                    help="run the reference forward every step instead of caching its log-probs once")
    sp.set_defaults(func=cmd_dpo, lr_default=1e-5)

    sp = add("sample", help="sample continuations of prompts")
    common(sp, train=False)
    sp.add_argument("--model", required=True, help="run folder, checkpoint or GPT-2 directory")
    sp.add_argument("--prompt", action="append",
                    help=r"a prompt (repeatable); \n, \t and \\ in it are a newline, a tab and a backslash")
    sp.add_argument("--prompts-file",
                    help='prompts: .jsonl with a JSON string or {"prompt": ...} a line (newlines allowed), '
                         "or any other text file with one prompt a line")
    sp.add_argument("--n", type=_int_at_least(1), default=1,
                    help="samples per prompt (more than one sample in all: each under a '--- sample i of n ---' line)")
    sp.add_argument("--max-new-tokens", type=_int_at_least(1), default=64,
                    help="tokens generated per sample at most (lowered to fit the context)")
    sp.add_argument("--temperature", type=_float_in(0, INF, lo_open=True, hi_open=True), default=1.0,
                    help="softmax temperature (> 0)")
    sp.add_argument("--top-k", type=_int_at_least(1), default=None, help="sample among the k most likely tokens")
    sp.add_argument("--greedy", action="store_true", help="argmax decoding")
    sp.add_argument("--jsonl", action="store_true", help="print JSON lines")
    sp.set_defaults(func=cmd_sample, usage_check=lambda a: None if a.prompt or a.prompts_file else
                    "give --prompt TEXT (repeatable) or --prompts-file FILE")

    sp = add("eval", help="DPO loss and implicit-reward accuracy/margins of a policy on preference pairs")
    common(sp, train=False)
    sp.add_argument("--policy", required=True, help="the policy pi (run folder, checkpoint or GPT-2 directory)")
    sp.add_argument("--ref", required=True, help="the reference pi_ref")
    sp.add_argument("--data", required=True, help="preference JSONL")
    sp.add_argument("--batch-size", type=_int_at_least(1), default=32, help="pairs per forward pass")
    sp.add_argument("--no-pack", action="store_true", help=_NO_PACK_HELP)
    _dpo_options(sp, train=False)
    sp.set_defaults(func=cmd_eval)

    sp = add("export", help="write a model as a Hugging Face GPT-2 directory")
    sp.add_argument("--model", required=True, help="run folder, checkpoint or GPT-2 directory")
    sp.add_argument("--out", required=True, help="a new or empty folder (or a GPT-2 directory to replace)")
    sp.set_defaults(func=cmd_export)

    sp = add("explain", help="one real DPO step, drawn with its own numbers: a self-contained HTML page")
    sp.description = ("Runs one DPO step (eq. 7-9) on a batch of preference pairs through minidpo's own functions and "
                      "writes a single HTML file that shows it: the pair as tokens, log pi and log pi_ref per token, "
                      "the implicit rewards, loss and weight with a beta slider, the gradient on each token's logits, "
                      "the log-probs before and after one optimizer step, the batch sorted by weight, and the tabular "
                      "world of eq. 4-6. Without RUN it first trains a small model (seconds) into --tiny-dir.")
    common(sp, train=False)
    sp.add_argument("run", nargs="?", metavar="RUN",
                    help="a folder holding sft/ (pi_ref) and dpo_beta*/ (the policy), as examples/train_tiny.py "
                         "writes it; or one model folder (the policy) with --ref. Default: the small model of "
                         "--tiny-dir, trained first if needed")
    sp.add_argument("--ref", help="the reference pi_ref (run folder, checkpoint or GPT-2 directory)")
    sp.add_argument("--data", help="preference JSONL (default: RUN/pairs_eval.jsonl when there)")
    sp.add_argument("--index", type=_int_at_least(0), default=0,
                    help="the pair of --data to follow token by token (0-based, in file order); the batch is it "
                         "and the pairs after it")
    sp.add_argument("--prompt", help=r"a pair typed in: the prompt (with --chosen and --rejected; \n is a newline)")
    sp.add_argument("--chosen", help="the preferred response y_w")
    sp.add_argument("--rejected", help="the dispreferred response y_l")
    sp.add_argument("--batch-size", type=_int_at_least(1), default=8, help="preference pairs in the step's batch")
    sp.add_argument("--beta", type=_float_in(0, INF, lo_open=True, hi_open=True), default=None,
                    help="DPO's beta (default: the policy's run's, else 0.1); with several dpo_beta*/ in RUN it "
                         "also picks the policy")
    sp.add_argument("--lr", type=_float_in(0, INF, lo_open=True, hi_open=True), default=None,
                    help="the optimizer step's learning rate (default: the policy's run's, else 1e-5)")
    sp.add_argument("--out", default="explain.html", help="the page to write (atomically)")
    sp.add_argument("--tiny-dir", default=str(EXPLAIN_TINY_DIR), help="where the default small model is trained")
    sp.add_argument("--no-bandit", action="store_true", help="leave out the tabular world (examples/bandit.py)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars while training the small model")
    sp.set_defaults(func=cmd_explain, lr_default=None)

    sp = add("verify", help="check a DPO loss function (yours, in NumPy/PyTorch/JAX) against the paper's properties")
    sp.add_argument("function", help="MODULE:FUNCTION or path/to/file.py:FUNCTION, called as "
                    "fn(pi_w, pi_l, ref_w, ref_l, beta, **hyper-parameters) on (N,) arrays")
    sp.add_argument("--framework", choices=["numpy", "torch", "jax"], default=None,
                    help="the function's array library (gradients by its autograd; NumPy: central differences); "
                         "default: read from what the function's module imports (torch, jax, else numpy)")
    sp.add_argument("--variant", choices=verify_variants(), default="dpo", metavar="VARIANT",
                    help=f"which loss the function claims to compute (its laws are checked): "
                         f"{', '.join(verify_variants())}")
    sp.add_argument("--label-smoothing", type=float, default=0.1,
                    help="eps for the variants with label smoothing (cdpo, robust, exo_pair, aot, aot_unpaired), "
                         "passed as label_smoothing=")
    sp.add_argument("--arg", action="append", metavar="KEY=VALUE", help="a fixed keyword argument (JSON value), e.g. ipo=true")
    sp.add_argument("--max-examples", type=_int_at_least(1), default=25, help="hypothesis examples per property")
    sp.add_argument("--reduction", choices=["none", "mean", "sum"], default=None, help="require this batch reduction (default: detect and report it)")
    sp.add_argument("--ipo-convention", choices=["summed", "per_token"], default=None, help="require this IPO log-prob convention (default: detect and report it)")
    sp.add_argument("--require-detached-reference", action="store_true",
                    help="fail if gradient reaches reference log-probs that require grad")
    sp.set_defaults(func=cmd_verify)
    return p


_NO_PACK_HELP = ("pad every sequence to the longest of its batch instead of packing sequences into rows "
                 "(same numbers; packing skips the padding's work)")


def _dpo_options(sp, train: bool) -> None:
    """The loss and layout options of ``dpo`` and ``eval``, the losses and their options read from
    losses.LOSS_TABLE."""
    from .losses import LOSS_TABLE

    sp.description = losses_description()
    sp.add_argument("--no-share-prompt", action="store_true",
                    help="run each prompt twice, [x; y_w] and [x; y_l], instead of once per pair with both "
                         "responses after it under a block mask (same numbers; sharing skips the repeat)")
    sp.add_argument("--beta", type=_float_in(0, INF, lo_open=True, hi_open=True), default=0.1,
                    help="beta: strength of the KL leash to pi_ref (eq. 3/7); smaller lets the policy move further")
    sp.add_argument("--loss", default="sigmoid", choices=list(LOSS_TABLE), metavar="LOSS",
                    help="the preference loss, one of the list above")
    for name in _loss_option_names():
        rows = [(n, r.options[name]) for n, r in LOSS_TABLE.items() if name in r.options]
        sp.add_argument(f"--{name.replace('_', '-')}", **_loss_option_flag(name, rows))
    sp.add_argument("--rpo-alpha", type=_float_in(0, INF, hi_open=True), default=0.0,
                    help="add alpha * NLL of the chosen responses (RPO-style SFT term)")
    sp.add_argument("--reference-free", action="store_true",
                    help="ignore pi_ref: the implicit reward is beta log pi (reference-free DPO)")
    sp.add_argument("--average-logps", action="store_true",
                    help="use per-token mean log-probs instead of sums (a loss marked 'per-token mean log-probs' "
                         "always does)")
    sp.add_argument("--ld-alpha", type=_float_in(0, 1), default=1.0,
                    help="LD-DPO (Liu et al. 2024): a pair's longer response counts its tokens past the shorter "
                         "one's length times this, in [0, 1] (default 1: plain sums)")
    sp.add_argument("--wpo", action="store_true",
                    help="WPO (Zhou et al. 2024): weight each pair's loss by its responses' length-normalised "
                         "probability under the policy (a constant; not with aot)")
    sp.add_argument("--max-prompt-length", type=_int_at_least(1), default=128,
                    help="prompt tokens kept when truncating (at most half of --max-length)")
    sp.add_argument("--truncation-mode", choices=["keep_end", "keep_start"], default="keep_end",
                    help="which end of a long prompt to keep")


def _error_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:  # "file: reason", without "[Errno N]"
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


def _run(args) -> int:
    from . import fast, runtime

    runtime.cpu_defaults()  # the fast path's pool threads, NumPy's hugepage advice, freed memory kept
    with fast.plain(getattr(args, "plain", False)):  # --plain: the plain reference for every layer
        if getattr(args, "threads", 0):
            with runtime.use_threads(args.threads):  # the pool's threads, the BLAS on one each
                return args.func(args)
        return args.func(args)


def main(argv=None) -> int:
    """Run one ``minidpo`` command; returns its exit status (see the module docstring)."""
    from .backend import DeviceError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import NonFiniteError, RunFolderError

    global _COMM
    _COMM = None
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 terminal gets escapes, not a traceback
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        sub = _subparser(parser, args.command)
        if unknown:
            sub.error(f"unrecognized arguments: {' '.join(unknown)}")
        problem = getattr(args, "usage_check", lambda a: None)(args)
        if problem:
            sub.error(problem)
        if getattr(args, "lr", "absent") is None:
            args.lr = args.lr_default
        return _run(args)
    except KeyboardInterrupt:
        if _COMM is not None and _COMM.size > 1:
            from .distributed import stop_interrupted

            stop_interrupted(_COMM)  # one line from rank 0, every rank ends with 130
        print("minidpo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except NonFiniteError as err:
        _report(err, str(err))
        return EXIT_NONFINITE
    except UsageError as err:
        _report(err, str(err))
        return EXIT_USAGE
    except MemoryError as err:
        _report(err, f"out of memory: {err}")
        return EXIT_ERROR
    except (CLIError, DataError, CheckpointError, RunFolderError, DeviceError, OSError, ValueError) as err:
        # the project's own errors (DataError, CheckpointError, PretrainedError, RunFolderError are
        # ValueErrors), a device that cannot be used, and the file system's, one line each
        _report(err, _error_line(err))
        return EXIT_ERROR


def _report(err: BaseException, line: str) -> None:
    """The one error line; under mpiexec an error every rank raised alike (rank 0's run-folder
    check, handed to all) is printed by rank 0 alone."""
    if _rank() == 0 or not getattr(err, "same_on_every_rank", False):
        print(f"minidpo: error: {line}", file=sys.stderr)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
