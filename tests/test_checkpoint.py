"""Checkpoints: exact round trips, atomic replacement under failures, clear errors, no pickle."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from minidpo import checkpoint as ck
from minidpo.checkpoint import (
    CheckpointError,
    atomic_write_text,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from minidpo.optim import AdamW
from tests.conftest import requires_cuda

CONFIG = {"vocab_size": 11, "n_ctx": 8, "n_layer": 1, "n_head": 2, "n_embd": 4, "layer_norm_epsilon": 1e-5}


def make_params(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        "transformer.wte.weight": rng.standard_normal((11, 4)).astype(dtype),
        "transformer.h.0.attn.c_attn.bias": rng.standard_normal(12).astype(dtype),
        "transformer.ln_f.weight": np.ones(4, dtype=dtype),
    }


def trained_state(seed=0, steps=2):
    params = make_params(seed)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(seed + 100)
    for _ in range(steps):
        opt.step(params, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()})
    return params, opt


def test_roundtrip_bit_identical(tmp_path):
    params, opt = trained_state()
    params["f64.extra"] = np.arange(3, dtype=np.float64) / 3  # dtypes are kept as saved
    opt_params = {k: v for k, v in params.items() if k != "f64.extra"}
    extra = {"metrics": {"loss": 0.5, "acc": np.float32(0.75)}, "epoch": np.int64(2), "tags": ("a", "b")}
    out = save_checkpoint(tmp_path / "ck", params, CONFIG, step=7, optimizer_state=opt.state_dict(), extra=extra)
    assert out == tmp_path / "ck"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp or .old left

    c = load_checkpoint(out)
    assert c.step == 7 and c.config == CONFIG and c.path == out
    assert c.extra == {"metrics": {"loss": 0.5, "acc": 0.75}, "epoch": 2, "tags": ["a", "b"]}
    assert set(c.params) == set(params)
    for k, v in params.items():
        assert c.params[k].dtype == v.dtype and c.params[k].shape == v.shape
        assert c.params[k].tobytes() == v.tobytes()

    # the optimizer restores identical next steps
    params2 = {k: c.params[k] for k in opt_params}
    opt2 = AdamW(params2)
    opt2.load_state_dict(c.optimizer_state)
    assert opt2.step_count == opt.step_count == 2
    g = {k: np.full(v.shape, 0.3, np.float32) for k, v in opt_params.items()}
    opt.step(opt_params, g)
    opt2.step(params2, g)
    for k in opt_params:
        assert params2[k].tobytes() == opt_params[k].tobytes()


def test_big_ints_in_plain_json_and_no_optimizer(tmp_path):
    save_checkpoint(tmp_path / "c", make_params(0), CONFIG, step=0, extra={"seed": 2**100 + 12345})
    c = load_checkpoint(tmp_path / "c")
    assert c.optimizer_state is None and c.extra == {"seed": 2**100 + 12345}


def test_atomic_write_text_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    f = tmp_path / "metrics.jsonl"
    atomic_write_text(f, "old\n")
    monkeypatch.setattr(ck.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(f, "new\n")
    monkeypatch.undo()
    assert f.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp left
    atomic_write_text(f, "new\n")
    assert f.read_text() == "new\n"


def _fail_on_call(monkeypatch, name, n):
    """Make ck.<name> raise on its n-th call (1-based); earlier calls go through."""
    real = getattr(ck, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(f"simulated crash in {name}")
        return real(*a, **k)

    monkeypatch.setattr(ck, name, wrapper)


@pytest.mark.parametrize("where", [("save_file", 1), ("save_file", 2), ("_write_json", 1), ("_fsync_dir", 1)])
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, where):
    old_params, old_opt = trained_state(seed=1)
    path = save_checkpoint(tmp_path / "ck", old_params, CONFIG, step=1, optimizer_state=old_opt.state_dict())
    new_params, new_opt = trained_state(seed=2, steps=3)
    _fail_on_call(monkeypatch, *where)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, new_params, dict(CONFIG, n_layer=9), step=2, optimizer_state=new_opt.state_dict())
    monkeypatch.undo()
    c = load_checkpoint(path)
    assert c.step == 1 and c.config == CONFIG and c.optimizer_state["step"] == 2
    for k, v in old_params.items():
        assert c.params[k].tobytes() == v.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the temp dir was cleaned up
    # and a later save works normally
    save_checkpoint(path, new_params, CONFIG, step=2)
    assert load_checkpoint(path).step == 2


def test_crash_between_renames_recovers_old(tmp_path, monkeypatch):
    old_params = make_params(3)
    path = save_checkpoint(tmp_path / "ck", old_params, CONFIG, step=5)
    real_replace = ck.os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] >= 2:  # path -> path.old done; then every rename fails, as in a crash
            raise OSError("simulated crash between renames")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)  # a dead process cleans nothing
    with pytest.raises(OSError, match="between renames"):
        save_checkpoint(path, make_params(4), CONFIG, step=6)
    monkeypatch.undo()
    assert calls["n"] == 3  # the save did try to put the old checkpoint back
    assert not path.exists() and (tmp_path / "ck.old").is_dir()
    assert has_checkpoint(path) and not (path / "trainer_state.json").exists()
    assert any(p.name.startswith(".ck.tmp-") for p in tmp_path.iterdir())
    c = load_checkpoint(path)  # recovers ck.old -> ck
    assert c.step == 5 and path.is_dir() and not (tmp_path / "ck.old").exists()
    for k, v in old_params.items():
        assert c.params[k].tobytes() == v.tobytes()
    save_checkpoint(path, make_params(4), CONFIG, step=6)  # removes the stale temp dir too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and load_checkpoint(path).step == 6


def test_failed_final_rename_rolls_back(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ck", make_params(3), CONFIG, step=5)
    real_replace = ck.os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, make_params(4), CONFIG, step=6)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and load_checkpoint(path).step == 5


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing")
    assert not has_checkpoint(tmp_path / "missing")
    path = save_checkpoint(tmp_path / "ck", make_params(0), CONFIG, step=1,
                           optimizer_state=AdamW(make_params(0)).state_dict())
    state_file = path / "trainer_state.json"
    good_state = state_file.read_text()

    state_file.write_text(good_state[: len(good_state) // 2])
    with pytest.raises(CheckpointError, match="trainer_state.json: corrupt JSON"):
        load_checkpoint(path)
    state_file.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not a minidpo-checkpoint"):
        load_checkpoint(path)
    state_file.unlink()  # weights without their state: damaged, never taken for "no checkpoint"
    with pytest.raises(CheckpointError, match="model.safetensors but no trainer_state.json: a damaged checkpoint"):
        load_checkpoint(path)
    state_file.write_text(good_state)

    model = path / "model.safetensors"
    blob = model.read_bytes()
    model.write_bytes(blob[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_checkpoint(path)
    ck.save_file({"transformer.wte.weight": np.zeros((11, 4), np.float32)}, str(model))  # tensors missing
    with pytest.raises(CheckpointError, match=r"missing model tensors .*ln_f.weight.*\(2 of 3\)"):
        load_checkpoint(path)
    model.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(path)
    model.write_bytes(blob)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.safetensors"):
        load_checkpoint(path)


def test_bad_inputs_fail_before_touching_disk(tmp_path):
    path = save_checkpoint(tmp_path / "ck", make_params(0), CONFIG, step=1)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(path, make_params(1), {"f": object()}, step=2)
    with pytest.raises(TypeError, match="expected a NumPy/CuPy array"):
        save_checkpoint(path, {"w": [1.0, 2.0]}, CONFIG, step=2)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(path, make_params(1), CONFIG, step=-1)
    assert load_checkpoint(path).step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle was used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(np, "load", boom)  # np.load is the usual pickle back door
    monkeypatch.setattr(np, "save", boom)
    params, opt = trained_state()
    path = save_checkpoint(tmp_path / "ck", params, CONFIG, step=3, optimizer_state=opt.state_dict())
    c = load_checkpoint(path)
    assert c.step == 3
    # only safetensors and JSON on disk, and the safetensors files carry no pickle opcodes header
    for f in path.iterdir():
        assert f.suffix in (".safetensors", ".json")
        assert not f.read_bytes().startswith(b"\x80")  # pickle protocol 2+ magic
    src = Path(ck.__file__).read_text()
    assert "import pickle" not in src and "allow_pickle" not in src


@requires_cuda
def test_cuda_roundtrip(tmp_path):  # pragma: no cover - needs a GPU
    import cupy

    params = {k: cupy.asarray(v) for k, v in make_params(0).items()}
    opt = AdamW(params, lr=1e-2)
    opt.step(params, {k: cupy.ones_like(v) for k, v in params.items()})
    path = save_checkpoint(tmp_path / "ck", params, CONFIG, step=1, optimizer_state=opt.state_dict())
    c = load_checkpoint(path, backend="cuda")
    for k, v in params.items():
        assert isinstance(c.params[k], cupy.ndarray) and c.params[k].dtype == v.dtype
        np.testing.assert_array_equal(cupy.asnumpy(c.params[k]), cupy.asnumpy(v))
    opt2 = AdamW(c.params)
    opt2.load_state_dict(c.optimizer_state)
    assert opt2.step_count == 1


def test_verify_params_refuses_a_float16_tensor_when_no_dtype_is_given():
    """Without a dtype to match, a float16 tensor is refused by name: the
    training dtype is float32 (or float64 in checks), and a half tensor would be trained as one."""
    from minidpo.checkpoint import CheckpointError, verify_params
    from minidpo.model import GPTConfig, init_params

    cfg = GPTConfig(**CONFIG)
    params = init_params(cfg, seed=0)
    verify_params(params, cfg, "ck")  # float32: accepted
    verify_params({k: v.astype(np.float64) for k, v in params.items()}, cfg, "ck")
    half = dict(params, **{"transformer.ln_f.weight": params["transformer.ln_f.weight"].astype(np.float16)})
    with pytest.raises(CheckpointError, match=r"ck: tensor transformer.ln_f.weight has dtype float16, expected "
                                              r"float32 or float64"):
        verify_params(half, cfg, "ck")
    all_half = {k: v.astype(np.float16) for k, v in params.items()}
    with pytest.raises(CheckpointError, match="has dtype float16, expected float32 or float64"):
        verify_params(all_half, cfg, "ck")
