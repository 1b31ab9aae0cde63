"""log pi(y|x) from the logits of the scored positions, and its backward: the plain reference.

Checked two ways: against a plain Python loop written from the definition, and the backward
against central finite differences in float64 (and torch autograd when installed, through the
official DPO code's padded-batch rule). The fast twins are checked against these functions in
tests/test_fast.py; the input checks, which both share, are run on both here. How a padded
(B, T) batch becomes scored tokens (packing.padded_batch) is checked here too: exactly the
masked positions, each predicted by the logits before it.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo import fast
from minidpo.logprobs import (
    log_softmax,
    log_softmax_backward,
    logsumexp,
    sequence_logps,
    sequence_logps_backward,
    token_logps,
    token_logps_backward,
)
from minidpo.packing import padded_batch
from tests.conftest import numeric_grad, requires_cuda

BOTH = pytest.mark.parametrize("impl", [fast.PLAIN, fast.FAST], ids=["plain", "fast"])


# ----------------------------------------------------------------------------------------------
# scored tokens: logits (M, V), labels (M,), and E examples of at least one token each


def weights_of(example, E, average, dtype):
    """(E, M): 1 where token m belongs to example e (1 / n_e when averaging), as packing builds it."""
    M = len(example)
    counts = np.bincount(example, minlength=E)
    w = np.zeros((E, M), dtype=dtype)
    w[example, np.arange(M)] = (1.0 / counts[example]) if average else 1.0
    return w


@st.composite
def scored(draw, max_E=3, max_M=8, max_V=7, dtype=np.float64):
    E = draw(st.integers(1, max_E))
    M = draw(st.integers(E, max(E, max_M)))
    V = draw(st.integers(2, max_V))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    logits = (scale * rng.standard_normal((M, V))).astype(dtype)
    labels = rng.integers(0, V, size=M)
    example = np.concatenate([np.arange(E), rng.integers(0, E, M - E)])  # every example has a token
    rng.shuffle(example)
    return logits, labels, example, E


def loop_reference(logits, labels, example, E, average=False):
    """The definition, one scored token at a time, in Python floats."""
    total, n = [0.0] * E, [0] * E
    for m in range(len(labels)):
        row = [float(v) for v in logits[m]]
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        total[example[m]] += row[labels[m]] - lse
        n[example[m]] += 1
    return np.array([t / k if average else t for t, k in zip(total, n)])


# ----------------------------------------------------------------------------------------------
# forward


@given(scored(), st.booleans())
def test_forward_matches_the_definition(s, average):
    logits, labels, example, E = s
    logps, cache = sequence_logps(logits, labels, weights_of(example, E, average, logits.dtype))
    np.testing.assert_allclose(logps, loop_reference(logits, labels, example, E, average), rtol=1e-12, atol=1e-12)
    lp, _ = token_logps(logits, labels)
    np.testing.assert_array_equal(cache["lse"], logsumexp(logits, axis=-1))
    np.testing.assert_allclose(lp, logits[np.arange(len(labels)), labels] - logsumexp(logits, axis=-1), rtol=1e-15)


@given(scored())
def test_sum_and_average_are_consistent(s):
    logits, labels, example, E = s
    total, _ = sequence_logps(logits, labels, weights_of(example, E, False, logits.dtype))
    mean, _ = sequence_logps(logits, labels, weights_of(example, E, True, logits.dtype))
    np.testing.assert_allclose(mean * np.bincount(example, minlength=E), total, rtol=1e-12, atol=1e-12)


@given(scored(dtype=np.float32), st.booleans())
def test_dtype_is_preserved_float32(s, average):
    logits, labels, example, E = s
    logps, cache = sequence_logps(logits, labels, weights_of(example, E, average, np.float32))
    assert logps.dtype == np.float32
    assert sequence_logps_backward(np.ones(E, np.float64), cache).dtype == np.float32
    ref = loop_reference(logits.astype(np.float64), labels, example, E, average)
    np.testing.assert_allclose(logps, ref, rtol=1e-5, atol=1e-4)


@BOTH
def test_stable_for_huge_logits(impl):
    """log-softmax is shift-invariant per row; adding 1e4 (or 1e30) must not overflow."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((10, 9))
    labels = rng.integers(0, 9, 10)
    example = np.repeat([0, 1], 5)
    base, _ = impl.sequence_logps(logits, labels, weights_of(example, 2, False, np.float64))
    for dt, shift in ((np.float64, 1e4), (np.float32, 1e4), (np.float64, 1e30)):
        shifts = shift * rng.choice([-1.0, 1.0], size=(10, 1))
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            out, cache = impl.sequence_logps((logits + shifts).astype(dt), labels, weights_of(example, 2, False, dt))
            d = impl.sequence_logps_backward(np.ones(2, dt), cache)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(d))
        if shift == 1e4 and dt == np.float64:
            np.testing.assert_allclose(out, base, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# backward


@given(scored(max_M=6, max_V=5), st.booleans(), st.integers(0, 2**32 - 1))
def test_backward_matches_finite_differences(s, average, seed):
    logits, labels, example, E = s
    w = weights_of(example, E, average, logits.dtype)
    dlogps = np.random.default_rng(seed).standard_normal(E)
    _, cache = sequence_logps(logits, labels, w)
    analytic = sequence_logps_backward(dlogps, cache)
    numeric = numeric_grad(lambda L: float(np.dot(dlogps, sequence_logps(L, labels, w)[0])), logits.copy())
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@given(scored(max_M=6, max_V=5), st.integers(0, 2**32 - 1))
def test_token_backward_matches_finite_differences(s, seed):
    logits, labels, _, _ = s
    dlp = np.random.default_rng(seed).standard_normal(len(labels))
    _, cache = token_logps(logits, labels)
    numeric = numeric_grad(lambda L: float(np.dot(dlp, token_logps(L, labels)[0])), logits.copy())
    np.testing.assert_allclose(token_logps_backward(dlp, cache), numeric, rtol=1e-6, atol=1e-8)


@given(scored())
def test_backward_rows_sum_to_zero_and_overwrite_matches(s):
    """Each row of dlogits is g * (onehot - p): it sums to 0 over the vocabulary.
    overwrite_logits=True reuses the logits buffer and gives the same numbers."""
    logits, labels, example, E = s
    w = weights_of(example, E, False, logits.dtype)
    dlogps = np.linspace(-1.0, 2.0, E)
    _, cache = sequence_logps(logits, labels, w)
    fresh = sequence_logps_backward(dlogps, cache)
    np.testing.assert_allclose(fresh.sum(-1), 0.0, atol=1e-12)
    mine = logits.copy()
    _, cache2 = fast.sequence_logps(mine, labels, w)
    reused = fast.sequence_logps_backward(dlogps, cache2, overwrite_logits=True)
    assert reused is mine
    np.testing.assert_allclose(reused, fresh, rtol=1e-12, atol=1e-15)


def test_overwrite_refuses_read_only_logits():
    logits = np.zeros((2, 4))
    logits.flags.writeable = False
    _, cache = fast.sequence_logps(logits, np.array([0, 1]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="read-only"):
        fast.sequence_logps_backward(np.ones(1), cache, overwrite_logits=True)


@given(st.integers(1, 3), st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_log_softmax_backward_matches_finite_differences(X, Y, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((X, Y))
    up = rng.standard_normal((X, Y))
    analytic = log_softmax_backward(up, log_softmax(x))
    numeric = numeric_grad(lambda z: float(np.sum(up * log_softmax(z))), x)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_logsumexp_all_minus_inf_row():
    x = np.array([[-np.inf, -np.inf], [0.0, 0.0]])
    with np.errstate(all="raise"):
        out = logsumexp(x, axis=-1)
    assert out[0] == -np.inf and out[1] == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------------------------
# bad input is reported, not computed on


@BOTH
def test_shape_and_dtype_errors_name_the_argument(impl):
    logits = np.zeros((4, 5))
    labels = np.zeros(4, np.int64)
    w = np.ones((2, 4))
    with pytest.raises(ValueError, match="logits must be"):
        impl.sequence_logps(logits[None], labels, w)
    with pytest.raises(ValueError, match="labels must be"):
        impl.sequence_logps(logits, labels[:3], w)
    with pytest.raises(TypeError, match="labels must be integer"):
        impl.sequence_logps(logits, labels.astype(np.float64), w)
    with pytest.raises(ValueError, match="weights must be"):
        impl.sequence_logps(logits, labels, w[:, :3])
    with pytest.raises(TypeError, match="weights are float32"):
        impl.sequence_logps(logits, labels, w.astype(np.float32))
    with pytest.raises(TypeError, match="floating"):
        impl.token_logps(logits.astype(np.int64), labels)
    _, cache = impl.sequence_logps(logits, labels, w)
    with pytest.raises(ValueError, match="dlogps must be"):
        impl.sequence_logps_backward(np.ones(3), cache)


# ----------------------------------------------------------------------------------------------
# a padded batch's scored tokens (packing.padded_batch), and the official code's rule


@st.composite
def padded(draw, max_B=3, max_T=6, max_V=7, dtype=np.float64):
    B = draw(st.integers(1, max_B))
    T = draw(st.integers(2, max_T))
    V = draw(st.integers(2, max_V))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = (rng.choice([0.1, 1.0, 5.0]) * rng.standard_normal((B, T, V))).astype(dtype)
    ids = rng.integers(0, V, size=(B, T))
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = rng.random(B) < 0.5  # column 0 is ignored whatever it holds
    for b in range(B):  # at least one counted label per row
        if not mask[b, 1:].any():
            mask[b, rng.integers(1, T)] = True
    return logits, ids, mask


def padded_logps(logits, ids, mask, average=False, impl=fast.PLAIN):
    """log pi(y|x) of each row of a padded batch: its scored positions' logits, then sequence_logps."""
    b = padded_batch(ids, mask, average=average)
    V = logits.shape[-1]
    return b, impl.sequence_logps(logits.reshape(-1, V)[b.logits_at], b.labels, b.weights(logits.dtype))


@given(padded())
def test_padded_batch_scores_exactly_the_masked_positions(p):
    logits, ids, mask = p
    B, T, _ = logits.shape
    b = padded_batch(ids, mask)
    want = [(r, t) for r in range(B) for t in range(1, T) if mask[r, t]]  # row-major, column 0 never
    assert [divmod(int(a), T) for a in b.host_at] == want
    np.testing.assert_array_equal(b.logits_at, b.host_at - 1)  # the logits just before the token
    np.testing.assert_array_equal(b.labels, [ids[r, t] for r, t in want])
    np.testing.assert_array_equal(b.host_example, [r for r, _ in want])
    np.testing.assert_array_equal(b.token_counts, mask[:, 1:].sum(1))
    assert b.layout.causal and b.shape == (B, T)


def test_padded_batch_reports_rows_without_a_scored_token():
    ids = np.zeros((3, 4), np.int64)
    mask = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], bool)  # row 1: only column 0 -> empty
    with pytest.raises(ValueError, match=r"rows 1 have no scored token"):
        padded_batch(ids, mask)


@BOTH
@given(padded(max_B=2, max_T=5, max_V=6), st.booleans())
def test_matches_torch_autograd(impl, p, average):
    """The official DPO code's _get_batch_logps, in torch, with autograd for the backward: the
    padded batch's scored tokens and sequence_logps give its log-probs and its dlogits."""
    torch = pytest.importorskip("torch")
    logits, ids, mask = p
    dlogps = np.linspace(0.5, -1.5, logits.shape[0])
    t_logits = torch.tensor(logits, requires_grad=True)
    t_labels = torch.tensor(np.where(mask, ids, -100))[:, 1:].clone()
    lg = t_logits[:, :-1, :]
    m = t_labels != -100
    t_labels[~m] = 0
    per_tok = torch.gather(lg.log_softmax(-1), dim=2, index=t_labels.unsqueeze(2)).squeeze(2)
    ref = (per_tok * m).sum(-1) / m.sum(-1) if average else (per_tok * m).sum(-1)
    (ref * torch.tensor(dlogps)).sum().backward()
    b, (logps, cache) = padded_logps(logits, ids, mask, average, impl)
    np.testing.assert_allclose(logps, ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    dl = np.zeros_like(logits).reshape(-1, logits.shape[-1])
    np.add.at(dl, b.logits_at, impl.sequence_logps_backward(dlogps, cache))  # into every position
    np.testing.assert_allclose(dl.reshape(logits.shape), t_logits.grad.numpy(), rtol=1e-10, atol=1e-12)


@requires_cuda
@pytest.mark.parametrize("average", [False, True])
def test_cupy_matches_numpy(average):  # pragma: no cover - needs a GPU
    import cupy as cp

    rng = np.random.default_rng(3)
    M, V, E = 20, 50, 3
    logits = rng.standard_normal((M, V)).astype(np.float32)
    labels = rng.integers(0, V, M)
    w = weights_of(np.arange(M) % E, E, average, np.float32)
    dlogps = rng.standard_normal(E).astype(np.float32)
    lp, c = sequence_logps(logits, labels, w)
    d = sequence_logps_backward(dlogps, c)
    lp_g, c_g = sequence_logps(cp.asarray(logits), cp.asarray(labels), cp.asarray(w))
    d_g = sequence_logps_backward(cp.asarray(dlogps), c_g)
    assert isinstance(lp_g, cp.ndarray) and lp_g.dtype == np.float32 and d_g.dtype == np.float32
    np.testing.assert_allclose(lp_g.get(), lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_g.get(), d, rtol=1e-5, atol=1e-6)
