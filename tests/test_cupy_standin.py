"""The strict CuPy stand-in: it has CuPy's names, refuses what CuPy refuses, counts every
device-to-host read-back, checks kernel launches, and so catches the classic GPU bugs on a
machine without a GPU. Also: the regression tests of the GPU-path bugs it found in minidpo, and
the held sync counts of a DPO step, an SFT step, a generated token and an evaluation pass."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests import cupy_standin as S
from tests.cupy_standin import kernels as SK


@pytest.fixture
def cp():
    m = S.install()
    try:
        yield m
    finally:
        S.uninstall()


# ---------------------------------------------------------------------------------------------
# the stand-in is CuPy's shape
# ---------------------------------------------------------------------------------------------

def test_names_are_exactly_the_recorded_cupy_names(cp):
    import cupyx

    for name in ("errstate", "seterr", "nditer", "memmap"):  # NumPy has them, CuPy not
        assert hasattr(np, name) and name not in S.API["cupy"]
        with pytest.raises(AttributeError):
            getattr(cp, name)
    for name in S.API["cupy"]:  # every recorded name is there, or says it is not emulated
        try:
            getattr(cp, name)
        except NotImplementedError:
            pass
    x = cp.zeros(3, dtype=np.float32)
    with pytest.raises(AttributeError):
        x.resize  # NumPy arrays have it; CuPy arrays do not
    assert "__index__" not in S.API["ndarray"] and not hasattr(x, "__index__")
    with pytest.raises(AttributeError):
        cupyx.scatter_mul  # not a cupyx name
    # nothing the stand-in emulates carries a name CuPy lacks
    for key, obj in [("cupy", cp), ("cuda", cp.cuda), ("cuda.runtime", cp.cuda.runtime), ("random", cp.random),
                     ("cupyx", cupyx), ("ndarray", cp.ndarray), ("ufunc", cp.add), ("cuda.Device", cp.cuda.Device),
                     ("cuda.Stream", cp.cuda.Stream), ("cuda.Event", cp.cuda.Event),
                     ("cuda.MemoryPool", cp.cuda.MemoryPool), ("cuda.PinnedMemoryPool", cp.cuda.PinnedMemoryPool),
                     ("cuda.MemoryHook", cp.cuda.MemoryHook)]:
        names = vars(obj) if isinstance(obj, type(cp)) else dir(obj)
        extra = sorted(n for n in names if not n.startswith("_") and n not in S.API[key])
        assert not extra, (key, extra)
    assert cp.random.default_rng(0).standard_normal((2,)).shape == (2,)
    with pytest.raises(AttributeError):
        cp.random.default_rng(0).permutation(3)  # CuPy's Generator has no permutation


def test_recorded_names_match_the_installed_cupy():
    """Guards the recording: re-run record_api.py when CuPy changes."""
    real = pytest.importorskip("cupy")
    if real is S.cupy or not hasattr(real, "cuda"):
        pytest.skip("the stand-in is installed as cupy in this process")
    from tests.cupy_standin.record_api import record

    if real.__version__ != S.API["cupy_version"]:
        pytest.skip(f"installed CuPy {real.__version__} differs from the recorded {S.API['cupy_version']}: "
                    f"re-run tests/cupy_standin/record_api.py")
    assert record() == S.API


def test_kernel_constructors_take_cupys_signatures(cp):
    for name, sig in S.API["signatures"].items():
        assert getattr(cp, name).__doc__.strip().split("``")[1].replace("\n    ", " ") == sig
    with pytest.raises(TypeError):
        cp.ElementwiseKernel(in_params="T x", out_params="T y", body="y = x", name="k")


def test_arrays_are_their_own_type_and_behave_like_cupys(cp):
    h = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = cp.asarray(h)
    assert isinstance(x, cp.ndarray) and not isinstance(h, cp.ndarray) and not isinstance(x, np.ndarray)
    s = x.sum()
    assert isinstance(s, cp.ndarray) and s.shape == ()  # a reduction stays on the device
    assert isinstance(x[0, 0], cp.ndarray)
    np.testing.assert_array_equal(x.get(), h)
    np.testing.assert_array_equal(cp.asnumpy(np.concatenate([x, x])), np.concatenate([h, h]))  # NEP-18
    assert isinstance(np.exp(x), cp.ndarray)  # NumPy ufuncs dispatch to CuPy's
    assert float(s) == 15.0 and int(x[1, 2]) == 5 and x[0, 1].item() == 1.0
    x[0] = 7  # scalars assign
    x[np.array([1])] = cp.ones((1, 3), dtype=np.float32)  # advanced indexing uploads host indices
    assert x.get().tolist() == [[7, 7, 7], [1, 1, 1]]


# ---------------------------------------------------------------------------------------------
# the classic GPU bugs, injected, fail as CuPy fails
# ---------------------------------------------------------------------------------------------

def test_a_numpy_array_in_device_math_is_refused(cp):
    def add_bias(x):  # the bug: a NumPy constant array in device math
        return x + np.ones(x.shape[-1], dtype=x.dtype)

    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        add_bias(cp.zeros((2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="Unsupported type"):
        np.ones(3, dtype=np.float32) * cp.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.maximum(cp.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        cp.zeros(3)[:] = np.ones(3)  # CuPy refuses a host array through basic indexing


def test_an_implicit_device_to_host_conversion_is_refused(cp):
    def mean_on_host(x):  # the bug: np.asarray of a device array
        return float(np.asarray(x).mean())

    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        mean_on_host(cp.ones(3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(cp.ones(3))


def test_a_numpy_only_name_through_xp_is_refused(cp):
    def safe_log(x):  # the bug: errstate is NumPy's, not CuPy's
        from minidpo.backend import get_array_module

        xp = get_array_module(x)
        with xp.errstate(divide="ignore"):
            return xp.log(x)

    assert safe_log(np.ones(2)).tolist() == [0.0, 0.0]  # fine on NumPy
    with pytest.raises(AttributeError, match="errstate"):
        safe_log(cp.ones(2))


def test_a_host_sync_in_an_inner_loop_is_counted(cp):
    def total(x):  # the bug: one read-back per row
        return sum(float(row.sum()) for row in x)

    x = cp.ones((5, 3))
    with S.counting() as c:
        total(x)
    assert c["float"] == 5 and S.syncs(c) == 5
    with S.counting() as c:
        x.sum(axis=1)  # the fix stays on the device
    assert S.syncs(c) == 0
    with pytest.raises(TypeError, match="list indices must be integers or slices, not ndarray"):
        list(range(10))[cp.asarray(np.int64(3))]  # CuPy arrays have no __index__


def test_out_of_range_ids_wrap_silently_so_the_model_checks_them(cp):
    """CuPy wraps an out-of-bounds integer-array index (NumPy raises): an embedding lookup with a
    bad token id would silently read another row, so the model's id check is what stands guard."""
    from minidpo.model import gpt_forward

    table = cp.asarray(np.arange(8, dtype=np.float32).reshape(4, 2))
    assert table[np.array([5])].get().tolist() == [[2.0, 3.0]]  # row 5 of 4 -> row 1, no error
    with pytest.raises(IndexError):
        table.get()[np.array([5])]
    cfg, params = _tiny(cp)
    with pytest.raises(ValueError, match="idx must lie in"):
        gpt_forward(params, np.array([[1, cfg.vocab_size + 3]]), cfg)


def test_an_rng_call_cupy_lacks_is_refused(cp):
    def shuffled(n, xp):  # the bug: Generator.permutation exists in NumPy, not CuPy
        return xp.random.default_rng(0).permutation(n)

    assert len(shuffled(4, np)) == 4
    with pytest.raises(AttributeError, match="permutation"):
        shuffled(4, cp)


def test_kernel_launches_are_checked(cp):
    code = 'typedef float real;\nextern "C" __global__ void k(real* x, const long long n, const int c) {}'
    SK.RAW_TWINS["k"] = lambda grid, block, x, n, c: None
    try:
        k = cp.RawKernel(code, "k")
        x = cp.zeros(4, dtype=np.float32)
        k((1,), (32,), (x, np.int64(4), np.int32(1)))
        with pytest.raises(TypeError, match="int given int64"):
            k((1,), (32,), (x, np.int64(4), 1))  # a Python int is passed as 64 bits
        with pytest.raises(TypeError, match="grid must be a tuple"):
            k(1, (32,), (x, np.int64(4), np.int32(1)))
        with pytest.raises(RuntimeError, match="1024 threads"):
            k((1,), (2048,), (x, np.int64(4), np.int32(1)))
        with pytest.raises(TypeError, match="takes 3 arguments"):
            k((1,), (32,), (x, np.int64(4)))
        with pytest.raises(TypeError, match="float\\* given a float64"):
            k((1,), (32,), (cp.zeros(4), np.int64(4), np.int32(1)))
        with pytest.raises(TypeError, match="Unsupported type"):
            k((1,), (32,), (np.zeros(4, np.float32), np.int64(4), np.int32(1)))
        with pytest.raises(ValueError, match="C-contiguous"):
            k((1,), (32,), (cp.zeros((4, 2), dtype=np.float32)[:, 0], np.int64(4), np.int32(1)))
    finally:
        del SK.RAW_TWINS["k"]


def test_a_grid_that_misses_rows_leaves_them_unwritten(cp):
    from minidpo import kernels

    x = cp.asarray(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32))
    y, mean, rstd = kernels.layernorm_forward(x, cp.ones(8, np.float32), cp.zeros(8, np.float32), 1e-5)
    k = kernels._raw("layernorm_forward", np.float32)
    y2 = cp.zeros_like(x)
    k((3,), (32,), (x, cp.ones(8, np.float32), cp.zeros(8, np.float32), y2, cp.empty((5, 1), np.float32),
                    cp.empty((5, 1), np.float32), np.int64(5), np.int32(8), np.float32(1e-5)))
    np.testing.assert_allclose(y2.get()[:3], y.get()[:3], rtol=1e-5, atol=1e-6)
    assert not y2.get()[3:].any()  # rows 3 and 4: no block ran them


# ---------------------------------------------------------------------------------------------
# GPU-path bugs found in minidpo (each failed before its fix)
# ---------------------------------------------------------------------------------------------

def test_top_k_given_as_a_numpy_integer_samples_on_cupy(cp):
    from minidpo.generate import next_token_probs

    logits = cp.asarray(np.random.default_rng(0).standard_normal((2, 9)).astype(np.float32))
    p = next_token_probs(logits, temperature=1.0, top_k=np.int64(3)).get()
    assert ((p > 0).sum(axis=1) == 3).all()


def test_device_metrics_are_json_serialisable_in_a_checkpoint(cp, tmp_path):
    from minidpo.checkpoint import load_checkpoint, save_checkpoint

    params = {"w": cp.ones((2, 2), dtype=np.float32)}
    save_checkpoint(tmp_path / "ck", params, {"metrics": {"acc": cp.asarray(np.float32(0.75))}}, step=3)
    assert json.loads((tmp_path / "ck" / "trainer_state.json").read_text())["config"]["metrics"]["acc"] == 0.75
    assert load_checkpoint(tmp_path / "ck").step == 3


def test_scatter_add_uses_cupy_add_at_without_a_deprecation_warning(cp):
    from minidpo.backend import scatter_add

    t = cp.zeros((3, 2), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scatter_add(t, cp.asarray(np.array([0, 0, 2])), cp.ones((3, 2), dtype=np.float32))
    assert t.get().tolist() == [[2, 2], [0, 0], [1, 1]]


# ---------------------------------------------------------------------------------------------
# syncs per step, measured and held
# ---------------------------------------------------------------------------------------------

def _tiny(cp, seed=0):
    from minidpo.model import GPTConfig, init_params

    cfg = GPTConfig(vocab_size=61, n_ctx=32, n_layer=2, n_head=2, n_embd=16)
    return cfg, init_params(cfg, "cuda", seed=seed)


def _pairs(n, rng, V=61):
    from minidpo.data import TokenizedPair

    out = []
    for _ in range(n):
        p = rng.integers(1, V, int(rng.integers(2, 6))).tolist()
        out.append(TokenizedPair(p, rng.integers(1, V, int(rng.integers(1, 8))).tolist(),
                                 rng.integers(1, V, int(rng.integers(1, 8))).tolist()))
    return out


def _measure(cp, capsys=None):
    from minidpo.backend import Backend
    from minidpo.data import TokenizedSFT, collate_preferences, collate_sft
    from minidpo.generate import generate
    from minidpo.optim import AdamW, clip_grad_norm
    from minidpo.packing import Batcher, pack_preferences, pack_sft
    from minidpo.train import TrainConfig, batcher_for, dpo_step, evaluate_preferences, sft_step

    be = Backend("cuda")
    cfg, params = _tiny(cp)
    rng = np.random.default_rng(0)
    pairs = _pairs(8, rng)
    tc = TrainConfig(beta=0.1, eval_batch_size=4)
    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    counts = {}
    items = [TokenizedSFT(p.prompt_ids, p.chosen_ids) for p in pairs[:4]]
    ref = cp.asarray(rng.standard_normal(4).astype(np.float32))
    # the padded batch, and the default layout as train_dpo / train_sft build it (host arrays copied)
    for name, b in (("dpo step", collate_preferences(pairs[:4], 0, backend=be)),
                    ("sft step", collate_sft(items, 0, backend=be)),
                    ("dpo step (packed)", pack_preferences(pairs[:4], 0, backend=be)),
                    ("sft step (packed)", pack_sft(items, 0, backend=be))):
        if name.startswith("dpo"):
            step = lambda: dpo_step(params, cfg, b, ref, ref + 1, tc)  # noqa: E731
        else:
            step = lambda: (lambda r: (r[0], None, r[1]))(sft_step(params, cfg, b))  # noqa: E731
        step()  # the first call builds the kernels
        with S.counting() as c:
            loss, _, grads = step()
            gnorm = clip_grad_norm(grads, 1.0)
            finite = cp.isfinite(loss) & cp.isfinite(gnorm)
            opt.step(params, grads, lr=1e-3)
        counts[name] = S.syncs(c)
    with S.counting() as c:
        generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=6, rng=np.random.default_rng(1), top_k=5)
    with S.counting() as c1:
        generate(params, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=1, rng=np.random.default_rng(1), top_k=5)
    counts["generated token"] = (S.syncs(c) - S.syncs(c1)) / 5
    ref_c = np.zeros(8, np.float32)
    with S.counting() as c:
        evaluate_preferences(params, cfg, pairs, ref_c, ref_c, batcher_for(tc, 0, be), tc)
    counts["evaluation pass (8 pairs, chunks of 4)"] = S.syncs(c)
    padded = TrainConfig(beta=0.1, eval_batch_size=4, share_prompt=False, pack=False)
    with S.counting() as c:
        evaluate_preferences(params, cfg, pairs, ref_c, ref_c, batcher_for(padded, 0, be), padded)
    counts["evaluation pass, padded (8 pairs, chunks of 4)"] = S.syncs(c)
    assert bool(finite)
    return counts


# The held numbers: raising one fails CI. A training step reads back nothing (metrics are
# accumulated on the device and read once per log interval); a generated token reads back its
# B sampled ids once; an evaluation pass reads back each chunk's log-probs once.
# The steps are measured on both layouts: collated and padded, and packed with shared prompts
# (the default); the evaluation pass on the default layout and on the padded one.
HELD = {"dpo step": 0, "sft step": 0, "dpo step (packed)": 0, "sft step (packed)": 0, "generated token": 1,
        "evaluation pass (8 pairs, chunks of 4)": 2, "evaluation pass, padded (8 pairs, chunks of 4)": 2}


def test_syncs_per_step_are_held(cp, capsys):
    counts = _measure(cp)
    with capsys.disabled():
        print("\n  device-to-host read-backs and syncs on the CuPy path: "
              + ", ".join(f"{k} {v:g}" for k, v in counts.items()))
    assert counts == HELD


def test_a_default_dpo_step_on_the_gpu_runs_fused_kernels_only(cp, monkeypatch):
    """The kernel launches of one default DPO step (shared prompts, packed rows) on --device cuda,
    counted on the stand-in, are held: the attention softmax (the layout's mask applied inside the
    kernel), GELU, layernorm and the log-softmax all fused, AdamW in one launch. No attention mask or
    bias is built on the way: the array-code mask (layers.sees, fast._causal_bias) must not run."""
    from minidpo import fast, layers
    from minidpo.backend import Backend
    from minidpo.optim import AdamW, clip_grad_norm
    from minidpo.packing import pack_preferences
    from minidpo.train import TrainConfig, dpo_step

    be = Backend("cuda")
    cfg, params = _tiny(cp)
    pairs = _pairs(4, np.random.default_rng(3))
    batch = pack_preferences(pairs, 0, backend=be)  # the default layout: shared prompts, packed rows
    assert not batch.layout.causal
    ref = cp.asarray(np.full(4, -20.0, np.float32))
    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    dpo_step(params, cfg, batch, ref, ref, TrainConfig())  # the first call builds the kernels

    def no_mask(*a, **k):
        raise AssertionError("an attention mask was built on the fused path")

    monkeypatch.setattr(layers, "sees", no_mask)
    monkeypatch.setattr(fast, "_causal_bias", no_mask)
    with S.counting() as c:
        _, _, grads = dpo_step(params, cfg, batch, ref, ref, TrainConfig())
        clip_grad_norm(grads, 1.0)
        opt.step(params, grads, lr=1e-3)
    n, blocks = cfg.n_layer, len(batch.layout.blocks)
    assert S.launches(c) == {
        "adamw_multi_tensor": 1,
        "gelu_backward": n, "gelu_forward": n,
        "layernorm_backward_dx": 2 * n + 1, "layernorm_dw": 2 * n + 1, "layernorm_forward": 2 * n + 1,
        "logsoftmax_gather": 1, "logsoftmax_gather_backward": 1,
        "masked_softmax": n * blocks, "softmax_backward": n * blocks,
    }
