"""AdamW against a literal per-element re-implementation and torch.optim.AdamW; clipping; schedule."""

import copy
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo.optim import AdamW, clip_grad_norm, lr_at
from tests.conftest import requires_cuda


def make_params(rng, dtype):
    return {
        "h.0.mlp.c_fc.weight": rng.standard_normal((3, 4)).astype(dtype),
        "h.0.mlp.c_fc.bias": rng.standard_normal(4).astype(dtype),
        "wte.weight": rng.standard_normal((5, 2)).astype(dtype),
    }


def literal_adamw(p, grads_seq, lrs, b1, b2, eps, wd):
    """The update written out per element with Python floats, exactly as the paper's algorithm."""
    p = [float(x) for x in p.ravel()]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = [float(x) for x in g.ravel()]
        for j in range(len(p)):
            m[j] = b1 * m[j] + (1 - b1) * g[j]
            v[j] = b2 * v[j] + (1 - b2) * g[j] ** 2
            m_hat = m[j] / (1 - b1**t)
            v_hat = v[j] / (1 - b2**t)
            p[j] = p[j] - lr * (m_hat / (math.sqrt(v_hat) + eps) + wd * p[j])
    return np.array(p)


def test_adamw_matches_literal_on_quadratic():
    rng = np.random.default_rng(0)
    params = make_params(rng, np.float64)
    start = copy.deepcopy(params)
    target = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    scale = {k: rng.uniform(0.1, 10.0, v.shape) for k, v in params.items()}
    b1, b2, eps, wd = 0.8, 0.95, 1e-6, 0.1
    opt = AdamW(params, lr=0.05, betas=(b1, b2), eps=eps, weight_decay=wd)
    lrs = [0.05, 0.01, 0.03, 0.02, 0.05] * 8
    seen = {k: [] for k in params}
    before_ids = {k: id(v) for k, v in params.items()}
    for lr in lrs:
        grads = {k: scale[k] * (params[k] - target[k]) for k in params}  # d/dp of 0.5 sum(s (p - t)^2)
        for k in params:
            seen[k].append(grads[k].copy())
        opt.step(params, grads, lr=lr)
    assert {k: id(v) for k, v in params.items()} == before_ids  # updated in place
    for k in params:
        decay = wd if params[k].ndim >= 2 else 0.0  # biases are not decayed by default
        expect = literal_adamw(start[k], seen[k], lrs, b1, b2, eps, decay).reshape(params[k].shape)
        np.testing.assert_allclose(params[k], expect, rtol=1e-12, atol=1e-12)
    assert opt.step_count == len(lrs)
    # and it optimizes: closer to the target than at the start (no decay on the loss here)
    loss = lambda ps: sum(float(np.sum(scale[k] * (ps[k] - target[k]) ** 2)) for k in ps)  # noqa: E731
    assert loss(params) < 0.5 * loss(start)


def test_decay_mask_and_decoupling():
    rng = np.random.default_rng(1)
    params = make_params(rng, np.float32)
    start = copy.deepcopy(params)
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    opt.step(params, zeros)
    # zero gradient: the Adam term is 0, so only the decoupled decay acts, and only on ndim >= 2
    np.testing.assert_array_equal(params["h.0.mlp.c_fc.bias"], start["h.0.mlp.c_fc.bias"])
    np.testing.assert_allclose(params["wte.weight"], start["wte.weight"] * np.float32(1 - 0.05), rtol=1e-6)
    # a custom filter: decay nothing named *.weight of wte
    params2 = copy.deepcopy(start)
    opt2 = AdamW(params2, lr=0.1, weight_decay=0.5, decay_filter=lambda n, p: not n.startswith("wte"))
    opt2.step(params2, zeros)
    np.testing.assert_array_equal(params2["wte.weight"], start["wte.weight"])
    assert not np.array_equal(params2["h.0.mlp.c_fc.bias"], start["h.0.mlp.c_fc.bias"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_stays(dtype):
    rng = np.random.default_rng(2)
    params = make_params(rng, dtype)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
        opt.step(params, grads, lr=np.float64(1e-2))  # even a float64 scalar lr must not promote
    for k, p in params.items():
        assert p.dtype == dtype and opt.m[k].dtype == dtype and opt.v[k].dtype == dtype


def test_state_dict_roundtrip_continues_identically():
    rng = np.random.default_rng(3)
    params = make_params(rng, np.float32)
    opt = AdamW(params, lr=3e-3, betas=(0.85, 0.99), weight_decay=0.01)
    grads_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()} for _ in range(6)]
    for g in grads_seq[:3]:
        opt.step(params, g)
    sd = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state_dict().items()}
    assert sd["step"] == 3 and sd["beta1"] == 0.85 and set(sd) >= {f"m.{k}" for k in params}
    params2 = copy.deepcopy(params)
    opt2 = AdamW(params2)  # different hyperparameters: all restored from the state
    opt2.load_state_dict(sd)
    for g in grads_seq[3:]:
        opt.step(params, g)
        opt2.step(params2, g)
    for k in params:
        np.testing.assert_array_equal(params[k], params2[k])
    bad = dict(sd)
    del bad["v.wte.weight"]
    with pytest.raises(KeyError, match="v.wte.weight"):
        opt2.load_state_dict(bad)
    bad = dict(sd, **{"m.wte.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        opt2.load_state_dict(bad)


def test_step_errors():
    rng = np.random.default_rng(4)
    params = make_params(rng, np.float32)
    opt = AdamW(params)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    with pytest.raises(KeyError, match="missing"):
        opt.step(params, {k: v for k, v in grads.items() if k != "wte.weight"})
    with pytest.raises(ValueError, match="shape|expected"):
        opt.step(params, dict(grads, **{"wte.weight": np.zeros((2, 5), np.float32)}))
    with pytest.raises(TypeError, match="no silent casts"):
        opt.step(params, dict(grads, **{"wte.weight": np.zeros((5, 2), np.float64)}))
    assert opt.step_count == 0 and all(not m.any() for m in opt.m.values())  # failed steps changed nothing
    with pytest.raises(ValueError, match="betas"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="floating"):
        AdamW({"idx": np.zeros(3, dtype=np.int64)})


def test_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    params = make_params(rng, np.float32)
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    decay = [t for k, t in tparams.items() if params[k].ndim >= 2]
    no_decay = [t for k, t in tparams.items() if params[k].ndim < 2]
    lr, wd = 1e-2, 0.1
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-7)
    opt = AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-7, weight_decay=wd)
    for step in range(8):
        this_lr = lr * (step + 1) / 8  # a schedule, applied to both
        for group in topt.param_groups:
            group["lr"] = this_lr
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
        opt.step(params, grads, lr=this_lr)
    for k in params:
        np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-5, atol=1e-6)


# ============================================================================ clipping


def test_clip_grad_norm_scales_when_over():
    rng = np.random.default_rng(6)
    grads = {"a": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    ref = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    before = {k: g.copy() for k, g in grads.items()}
    ids = {k: id(g) for k, g in grads.items()}
    norm = clip_grad_norm(grads, max_norm=ref / 4)
    assert isinstance(norm, np.ndarray) and norm.ndim == 0 and norm.dtype == np.float32
    assert float(norm) == pytest.approx(ref, rel=1e-6)
    after = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert after == pytest.approx(ref / 4, rel=1e-5)
    for k in grads:  # same direction, same arrays, same dtype
        assert id(grads[k]) == ids[k] and grads[k].dtype == np.float32
        np.testing.assert_allclose(grads[k] * 4, before[k], rtol=1e-5)


def test_clip_grad_norm_untouched_when_under_and_dtypes():
    rng = np.random.default_rng(7)
    grads = {"a": rng.standard_normal((3, 3))}  # float64
    before = grads["a"].copy()
    norm = clip_grad_norm(grads, max_norm=1e6)
    assert norm.dtype == np.float64 and float(norm) == pytest.approx(np.linalg.norm(before))
    np.testing.assert_array_equal(grads["a"], before)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0.0)
    assert float(clip_grad_norm(grads, math.inf)) == pytest.approx(np.linalg.norm(before))


def test_clip_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    grads = {"a": rng.standard_normal((6, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    ts = [torch.zeros(g.shape, requires_grad=True) for g in grads.values()]
    for t, g in zip(ts, grads.values()):
        t.grad = torch.tensor(g.copy())
    tnorm = torch.nn.utils.clip_grad_norm_(ts, max_norm=0.5)
    norm = clip_grad_norm(grads, 0.5)
    assert float(norm) == pytest.approx(float(tnorm), rel=1e-6)
    for t, g in zip(ts, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-7)


@requires_cuda
def test_fused_cuda_kernel_matches_array_code():  # pragma: no cover - needs a GPU
    import cupy

    rng = np.random.default_rng(9)
    params = make_params(rng, np.float32)
    dparams = {k: cupy.asarray(v) for k, v in params.items()}
    opt, dopt = AdamW(params, lr=1e-2, weight_decay=0.1), AdamW(dparams, lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        dgrads = {k: cupy.asarray(v) for k, v in grads.items()}
        n1, n2 = clip_grad_norm(grads, 1.0), clip_grad_norm(dgrads, 1.0)
        assert isinstance(n2, cupy.ndarray) and n2.ndim == 0 and n2.dtype == np.float32
        np.testing.assert_allclose(float(n2), float(n1), rtol=1e-5)
        opt.step(params, grads)
        dopt.step(dparams, dgrads)
    for k in params:
        assert dparams[k].dtype == np.float32
        np.testing.assert_allclose(cupy.asnumpy(dparams[k]), params[k], rtol=1e-5, atol=1e-6)


# ============================================================================ schedule


def test_lr_schedule_values():
    base = 2.0
    assert [lr_at(s, base, 4, 20) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert lr_at(100, base, 4, 20) == 2.0
    assert lr_at(0, base, 0, 10, "cosine") == base
    assert lr_at(4, base, 4, 20, "cosine") == pytest.approx(base)
    assert lr_at(12, base, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx((base + 0.2) / 2)
    assert lr_at(20, base, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx(0.2)
    assert lr_at(50, base, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx(0.2)
    assert lr_at(20, base, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-15)
    # a run shorter than its warmup: still warming up when it ends (no error)
    assert [lr_at(s, base, 10, 3, "cosine") for s in range(3)] == [0.2, 0.4, pytest.approx(0.6)]
    for bad in [dict(schedule="linear"), dict(step=-1), dict(total_steps=-1), dict(warmup_steps=-2), dict(base_lr=math.nan), dict(min_lr_ratio=2.0)]:
        kw = dict(step=0, base_lr=1.0, warmup_steps=4, total_steps=20)
        kw.update(bad)
        with pytest.raises(ValueError):
            lr_at(**kw)


@given(st.integers(0, 50), st.integers(1, 200), st.floats(0.0, 1.0))
def test_cosine_monotone_and_bounded(warmup, extra, ratio):
    total = warmup + extra
    lrs = [lr_at(s, 1.0, warmup, total, "cosine", ratio) for s in range(total + 5)]
    assert all(0.0 < x <= 1.0 + 1e-12 for x in lrs[:warmup])
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # warmup rises
    tail = lrs[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(tail, tail[1:]))                   # then decays
    assert all(ratio - 1e-12 <= x <= 1.0 + 1e-12 for x in tail)
    assert tail[0] == pytest.approx(1.0) and lrs[total] == pytest.approx(ratio)
