"""Checkpoints: safetensors for arrays, JSON for everything else, written atomically. No pickle.

A checkpoint is a directory:

    <path>/
      model.safetensors      the parameters, host NumPy copies, dtypes as given (float32 in training)
      optimizer.safetensors  the optimizer's array state ("m.<name>", "v.<name>"), when given
                             (both files record the step in their metadata, checked on load)
      trainer_state.json     {"format", "version", "step", "config", "optimizer" (its scalars),
                              "extra", "tensors": {"model": [names], "optimizer": [names]}}

(Training needs no saved random state: each step's batch is a function of the seed and the
step, ``train.batch_for_step``.)

Atomic replacement. ``save_checkpoint`` writes everything into a sibling temporary directory,
fsyncs each file and the directory, then swaps it in with two renames:

    <path>  -> <path>.old       (only when a previous checkpoint exists)
    tmp     -> <path>
    remove <path>.old

A crash or exception before the first rename leaves the previous checkpoint untouched (the temp
directory is removed on exceptions; a killed process leaves a ``.<name>.tmp-*`` that the next
save removes). A crash between the renames leaves only ``<path>.old``: :func:`load_checkpoint`
and the next save move it back. One writer per path is assumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .backend import get_array_module, get_backend, is_cuda_array, to_numpy

FORMAT = "minidpo-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be read: corrupt JSON or safetensors, missing tensors."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    params: {name: array} on the requested backend, dtypes as saved.
    config: the JSON config dict given to save_checkpoint.
    step: the training step saved.
    optimizer_state: None, or {"m.<name>": array (on the backend), ..., "step": int, "lr": float,
        ...} -- ready for ``AdamW.load_state_dict``.
    extra: the JSON dict given as ``extra`` ({} when none).
    path: the directory read.
    """

    params: dict
    config: dict
    step: int
    optimizer_state: dict | None = None
    extra: dict = field(default_factory=dict)
    path: Path | None = None


# ============================================================================ saving


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or is_cuda_array(x)


def _host_tensors(tensors: dict, what: str) -> dict[str, np.ndarray]:
    out = {}
    for name, a in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: tensor names must be strings, got {name!r}")
        if not _is_array(a):
            raise TypeError(f"{what}: {name!r} is a {type(a).__name__}, expected a NumPy/CuPy array")
        h = to_numpy(a)
        if h.dtype == object or h.dtype.kind not in "biuf":
            raise TypeError(f"{what}: {name!r} has dtype {h.dtype}, which safetensors cannot store")
        out[name] = np.ascontiguousarray(h)
    return out


def _jsonable(x: Any, where: str) -> Any:
    """Plain-JSON copy of x: numpy scalars become Python numbers, tuples lists, dataclasses dicts."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: JSON keys must be strings, got {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, (np.generic,)) and x.dtype.kind in "biuf":
        return x.item()
    if _is_array(x) and x.ndim == 0 and x.dtype.kind in "biuf":
        return x.item()  # a 0-d NumPy or CuPy array (a device metric): one read-back
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"{where}: {type(x).__name__} is not JSON-serialisable (arrays belong in tensors)")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half:
    a sibling temporary file, fsynced, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full or read-only disk: name the file the user knows, not the temp
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _old_path(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _recover(path: Path) -> None:
    """Finish an interrupted swap: only <path>.old left -> move it back; both -> drop .old."""
    old = _old_path(path)
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
            _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Write the directory ``path`` all or nothing (the swap described in the module docstring).

    Yields a sibling temporary directory to fill. On a normal exit its files and the directory
    are fsynced and it replaces ``path`` (the previous ``path`` moved aside to ``<path>.old``
    first and removed last); on an exception the temporary directory is removed and ``path`` is
    left as it was, and an OSError (a full or read-only disk) is raised again naming ``path``
    and the file being written, not the temporary directory. Used for checkpoints and for GPT-2
    model directories alike.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    for stale in parent.glob(f".{path.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        what = f" while writing {Path(err.filename).name}" if err.filename else ""
        raise OSError(err.errno, f"{err.strerror or err}{what}", str(path)) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old = _old_path(path)
    if path.exists():
        os.replace(path, old)           # the previous directory kept as <path>.old
    try:
        os.replace(tmp, path)           # the new one in place
    except BaseException:
        try:                            # put the previous one back (load_checkpoint would too)
            if old.exists() and not path.exists():
                os.replace(old, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def write_safetensors(file: Path, tensors: dict, metadata: dict) -> None:
    """``safetensors.numpy.save_file``, whose I/O failures (a full disk) arrive as a
    SafetensorError: raised as the OSError they are ("... (os error 28)": ENOSPC), naming ``file``."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(file)) from err


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    path: str | os.PathLike,
    params: dict,
    config: dict,
    step: int,
    optimizer_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring).

    Args:
        path: the checkpoint directory (its parent is created if needed). An existing checkpoint
            there is replaced only once the new one is completely written.
        params: {name: array}, NumPy or CuPy; copied to the host, dtype kept.
        config: JSON-able dict (a dataclass is accepted and converted) describing the run/model.
        step: the training step, an int >= 0.
        optimizer_state: e.g. ``AdamW.state_dict()``: array values -> optimizer.safetensors,
            the rest (JSON-able scalars) -> trainer_state.json["optimizer"].
        extra: any JSON-able dict (metrics, data position, ...).
    Returns:
        the checkpoint directory as a Path.
    """
    path = Path(path)
    if int(step) != step or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not params:
        raise ValueError("save_checkpoint: params is empty")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"checkpoint path exists and is not a directory: {path}")

    # Everything that can fail on bad input is checked before the disk is touched.
    model_tensors = _host_tensors(params, "params")
    opt_tensors, opt_scalars = None, None
    if optimizer_state is not None:
        arrays = {k: v for k, v in optimizer_state.items() if _is_array(v) and v.ndim > 0}
        opt_tensors = _host_tensors(arrays, "optimizer_state")
        scalars = {k: (to_numpy(v).item() if _is_array(v) else v)  # 0-d arrays -> Python numbers
                   for k, v in optimizer_state.items() if k not in arrays}
        opt_scalars = _jsonable(scalars, "optimizer_state")
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config": _jsonable(config if config is not None else {}, "config"),
        "optimizer": opt_scalars,
        "extra": _jsonable(extra or {}, "extra"),
        "tensors": {"model": list(model_tensors),
                    "optimizer": list(opt_tensors) if opt_tensors is not None else None},
    }
    json.dumps(state)  # fail here, not half-way, on anything the checks above missed

    with atomic_directory(path) as tmp:
        metadata = {"format": "np", "writer": FORMAT, "step": str(int(step))}
        write_safetensors(tmp / MODEL_FILE, model_tensors, metadata)
        if opt_tensors is not None:
            write_safetensors(tmp / OPTIMIZER_FILE, opt_tensors, metadata)
        _write_json(tmp / STATE_FILE, state)
    return path


# ============================================================================ loading


def _read_tensors(file: Path, expected: list[str] | None, what: str, step: int) -> dict[str, np.ndarray]:
    """The tensors of ``file``; CheckpointError when one listed in ``expected`` is missing, or when
    the step the file was saved at (its metadata, where recorded) is not trainer_state.json's ``step``."""
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {file}")
    try:
        tensors = load_file(str(file))
        with safe_open(str(file), framework="np") as f:
            saved_at = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot read safetensors ({err})") from err
    if saved_at is not None and saved_at != str(step):
        raise CheckpointError(f"{file.parent / STATE_FILE}: 'step' is {step}, but {file.name} was saved at step "
                              f"{saved_at}: the state and the {what} tensors are from different steps")
    if expected is not None:
        missing = [n for n in expected if n not in tensors]
        if missing:
            raise CheckpointError(f"{file}: missing {what} tensors {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''} ({len(missing)} of {len(expected)})")
    return tensors


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The parsed and checked ``trainer_state.json`` of the checkpoint directory ``path`` (no
    tensors are read): a dict with at least "step" (int >= 0), "config" (dict) and "tensors"
    ({"model": [names], "optimizer": [names] or None}).

    Recovers an interrupted swap first (see :func:`load_checkpoint`). Raises FileNotFoundError
    when there is no checkpoint, CheckpointError when its state file is unreadable or malformed."""
    path = _resolve(Path(path))
    state_file = path / STATE_FILE
    if not state_file.is_file():
        if path.is_dir() and (path / MODEL_FILE).exists():
            raise CheckpointError(f"{path} holds {MODEL_FILE} but no {STATE_FILE}: a damaged checkpoint")
        raise FileNotFoundError(f"checkpoint file missing: {state_file}")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{state_file}: corrupt JSON ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_file}: not a {FORMAT} file")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{state_file}: version {state.get('version')!r}, this code reads {VERSION}")
    for key in ("step", "config", "tensors"):
        if key not in state:
            raise CheckpointError(f"{state_file}: missing key {key!r}")
    step, names = state["step"], state["tensors"]
    if not is_integer(step) or step < 0:
        raise CheckpointError(f"{state_file}: 'step' must be an integer >= 0, got {step!r}")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{state_file}: 'config' must be an object, got {state['config']!r:.40}")
    ok_list = lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)  # noqa: E731
    if not (isinstance(names, dict) and ok_list(names.get("model"))
            and (names.get("optimizer") is None or ok_list(names.get("optimizer")))):
        raise CheckpointError(f"{state_file}: 'tensors' must be {{\"model\": [names], \"optimizer\": [names] or null}}, "
                              f"got {names!r:.60}")
    for key in ("optimizer", "extra"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise CheckpointError(f"{state_file}: {key!r} must be an object, got {state[key]!r:.40}")
    state["path"] = str(path)
    return state


def _resolve(path: Path) -> Path:
    """``path``, after moving back a ``<path>.old`` left by an interrupted swap (or the .old copy
    itself when the location is read-only)."""
    old = _old_path(path)
    if not path.exists() and old.is_dir():
        try:
            _recover(path)
        except OSError:  # read-only location: read the .old copy in place
            return old
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    return path


def load_checkpoint(path: str | os.PathLike, backend="cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint directory. If it is missing but ``<path>.old`` exists (a save
            stopped between its two renames), the .old one is moved back and read.
        backend: "cpu", "cuda[:N]" or a Backend; tensors are placed there with their saved dtype.
    Returns:
        :class:`Checkpoint`.
    Raises:
        FileNotFoundError for a missing directory or file; CheckpointError for corrupt JSON or
        safetensors, a wrong format, or tensors listed in trainer_state.json but absent.
        (Shapes, dtypes and finiteness against a model are checked by :func:`verify_params`.)
    """
    state = read_checkpoint_state(path)
    path = Path(state["path"])
    names = state["tensors"]

    be = get_backend(backend)
    host = _read_tensors(path / MODEL_FILE, names.get("model"), "model", state["step"])
    params = {k: be.asarray(v, dtype=v.dtype) for k, v in host.items()}

    optimizer_state = None
    if state.get("optimizer") is not None:
        opt_host = _read_tensors(path / OPTIMIZER_FILE, names.get("optimizer"), "optimizer", state["step"])
        optimizer_state = {k: be.asarray(v, dtype=v.dtype) for k, v in opt_host.items()}
        optimizer_state.update(state["optimizer"])

    return Checkpoint(
        params=params,
        config=state["config"],
        step=int(state["step"]),
        optimizer_state=optimizer_state,
        extra=state.get("extra") or {},
        path=path,
    )


def verify_params(params: dict, model_config, where, like: dict | None = None) -> None:
    """Check loaded parameters before they are used: exactly the names of ``model_config``'s
    GPT-2, each with its shape, one floating dtype (float32 or float64; the dtype of ``like``'s
    arrays when given), and every value finite. Raises CheckpointError naming ``where`` and the
    first offending key (a broadcastable wrong shape is never broadcast, an integer tensor never
    truncated, NaN weights never sampled from)."""
    from .model import param_shapes

    expected = param_shapes(model_config)
    missing = [k for k in expected if k not in params]
    extra = [k for k in params if k not in expected]
    if missing or extra:
        parts = ([f"missing {missing[:3]}" + (" ..." if len(missing) > 3 else "")] if missing else []) + \
                ([f"unexpected {extra[:3]}" + (" ..." if len(extra) > 3 else "")] if extra else [])
        raise CheckpointError(f"{where}: tensors do not match the model config: {'; '.join(parts)}")
    for k, shape in expected.items():
        a = params[k]
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(a.shape)}, the model needs {tuple(shape)}")
        want = like[k].dtype if like is not None else None
        if a.dtype.kind != "f" or a.dtype.itemsize < 4 or (want is not None and a.dtype != want):
            raise CheckpointError(f"{where}: tensor {k} has dtype {a.dtype}, expected "
                                  f"{want if want is not None else 'float32 or float64'}")
    first = params[next(iter(expected))].dtype
    for k in expected:
        if params[k].dtype != first:
            raise CheckpointError(f"{where}: tensor {k} has dtype {params[k].dtype}, the others {first}")
    for k in expected:
        a = params[k]
        if not bool(get_array_module(a).isfinite(a).all()):
            raise CheckpointError(f"{where}: tensor {k} holds non-finite values (NaN or inf)")


def is_integer(v) -> bool:
    """A JSON value that is an integer (not a boolean)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A JSON value that is a finite number (not a boolean)."""
    return (is_integer(v) or isinstance(v, float)) and math.isfinite(v)


def verify_optimizer_state(ck: Checkpoint, params: dict, scalars: dict) -> None:
    """Check the AdamW state of a checkpoint against the parameters it will update, before any of
    it is restored: trainer_state.json's "optimizer" entry present, its "step" the checkpoint's
    step and its other entries exactly the numbers in ``scalars`` (the run's lr, beta1, beta2, eps,
    weight_decay); optimizer.safetensors holding exactly "m.<name>" and "v.<name>" for each
    parameter, with the parameter's shape and dtype, m finite, v finite and >= 0. Raises
    CheckpointError naming the file and the key: nothing is cast, reset or dropped silently."""
    state_file, tensor_file = ck.path / STATE_FILE, ck.path / OPTIMIZER_FILE
    opt = ck.optimizer_state
    if opt is None:
        raise CheckpointError(f"{state_file}: no 'optimizer' entry: AdamW's step and moments are missing (resuming "
                              f"would restart them from zero)")
    entries = {k: v for k, v in opt.items() if not _is_array(v)}  # from trainer_state.json
    if not is_integer(entries.get("step")) or entries["step"] != ck.step:
        raise CheckpointError(f"{state_file}: 'optimizer.step' is {entries.get('step')!r}, not the checkpoint's "
                              f"'step' {ck.step}")
    for k in sorted(set(entries) - {"step"} | set(scalars)):
        v = entries.get(k)
        if k not in scalars:
            raise CheckpointError(f"{state_file}: unknown entry 'optimizer.{k}'")
        if not is_number(v):
            raise CheckpointError(f"{state_file}: 'optimizer.{k}' must be a number, got {v!r}")
        if v != scalars[k]:
            raise CheckpointError(f"{state_file}: 'optimizer.{k}' is {v!r}, this run's is {scalars[k]!r}")
    tensors = {k: v for k, v in opt.items() if _is_array(v)}
    want = {f"{c}.{n}": n for n in params for c in ("m", "v")}
    missing, unknown = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unknown:
        raise CheckpointError(f"{tensor_file}: " + "; ".join(
            ([f"missing {missing[:3]}" + (" ..." if len(missing) > 3 else "")] if missing else []) +
            ([f"unknown {unknown[:3]}" + (" ..." if len(unknown) > 3 else "")] if unknown else [])))
    for k, name in want.items():
        a, p = tensors[k], params[name]
        if tuple(a.shape) != tuple(p.shape) or a.dtype != p.dtype:
            raise CheckpointError(f"{tensor_file}: tensor {k} is {a.dtype} {tuple(a.shape)}, its parameter "
                                  f"{p.dtype} {tuple(p.shape)}")
        xp = get_array_module(a)
        if not bool(xp.isfinite(a).all()):
            raise CheckpointError(f"{tensor_file}: tensor {k} holds non-finite values (NaN or inf)")
        if k.startswith("v.") and bool((a < 0).any()):
            raise CheckpointError(f"{tensor_file}: tensor {k} holds negative values (a second moment is a mean "
                                  f"of squares)")


def has_checkpoint(path: str | os.PathLike) -> bool:
    """True when :func:`load_checkpoint` would find a checkpoint at ``path``: its
    trainer_state.json exists, or an interrupted save left ``<path>.old`` holding one.
    (Use this rather than testing for trainer_state.json, which misses the .old case.)"""
    path = Path(path)
    return (path / STATE_FILE).is_file() or (not path.exists() and (_old_path(path) / STATE_FILE).is_file())


__all__ = [
    "Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "has_checkpoint", "atomic_write_text",
    "write_safetensors",
    "read_checkpoint_state", "verify_params", "verify_optimizer_state", "is_integer", "is_number", "MODEL_FILE",
    "OPTIMIZER_FILE", "STATE_FILE",
]
