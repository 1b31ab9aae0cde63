"""log pi(y|x) as a masked sum of shifted token log-probs, and its backward: the plain reference.

Checked two ways: against a plain Python loop over (b, t) written from the definition, and the
backward against central finite differences in float64 (and torch autograd when installed).
The fast twins are checked against these functions in tests/test_fast.py; the input checks,
which both share, are run on both here.
"""

import math
import warnings

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
)
from tests.conftest import numeric_grad, requires_cuda

BOTH = pytest.mark.parametrize("impl", [fast.PLAIN, fast.FAST], ids=["plain", "fast"])


# ----------------------------------------------------------------------------------------------
# a random batch: logits, labels with -100 on prompt/padding, a mask with >= 1 counted token per row


@st.composite
def batches(draw, max_B=3, max_T=6, max_V=7, dtype=np.float64):
    B = draw(st.integers(1, max_B))
    T = draw(st.integers(2, max_T))
    V = draw(st.integers(2, max_V))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((B, T, V))).astype(dtype)
    labels = rng.integers(0, V, size=(B, T))
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = rng.random(B) < 0.5  # column 0 is ignored whatever it holds
    for b in range(B):  # at least one counted label per row
        if not mask[b, 1:].any():
            mask[b, rng.integers(1, T)] = True
    labels = np.where(mask, labels, -100)  # the ignored positions carry the usual -100
    labels[:, 0] = rng.integers(0, V, size=B)  # the first token is an input id, never -100 in data
    return logits, labels, mask


def loop_reference(logits, labels, mask, average=False):
    """The definition, one (b, t) at a time, in Python floats."""
    B, T, V = logits.shape
    out = []
    for b in range(B):
        total, n = 0.0, 0
        for t in range(T - 1):
            if mask[b, t + 1]:
                row = [float(v) for v in logits[b, t]]
                m = max(row)
                lse = m + math.log(sum(math.exp(v - m) for v in row))
                total += row[labels[b, t + 1]] - lse
                n += 1
        out.append(total / n if average else total)
    return np.array(out)


# ----------------------------------------------------------------------------------------------
# forward


@given(batches(), st.booleans())
def test_forward_matches_the_definition(batch, average):
    logits, labels, mask = batch
    logps, cache = sequence_logps(logits, labels, mask, average=average)
    np.testing.assert_allclose(logps, loop_reference(logits, labels, mask, average), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(cache["token_counts"], mask[:, 1:].sum(1))


@given(batches())
def test_sum_and_average_are_consistent(batch):
    logits, labels, mask = batch
    s, cache = sequence_logps(logits, labels, mask)
    a, _ = sequence_logps(logits, labels, mask, average=True)
    np.testing.assert_allclose(a * cache["token_counts"], s, rtol=1e-12, atol=1e-12)


@given(batches(), st.integers(0, 2**32 - 1))
def test_masked_logits_and_labels_change_nothing(batch, seed):
    """Logits at positions scoring an ignored label (and the last position) do not enter;
    nor do ignored labels, whatever they hold (-100, a huge id, a negative id)."""
    logits, labels, mask = batch
    B, T, V = logits.shape
    rng = np.random.default_rng(seed)
    logps, cache = sequence_logps(logits, labels, mask)
    dl = sequence_logps_backward(rng.standard_normal(B), cache)

    scoring_ignored = np.zeros((B, T), bool)
    scoring_ignored[:, :-1] = ~mask[:, 1:]
    scoring_ignored[:, -1] = True
    changed = logits.copy()
    changed[scoring_ignored] = 100.0 * rng.standard_normal((scoring_ignored.sum(), V))
    garbage = np.where(mask, labels, rng.choice([-100, -1, V, 10**9], size=labels.shape))
    garbage[:, 0] = rng.choice([-100, 10**9], size=B)  # column 0 is never a label
    logps2, _ = sequence_logps(changed, garbage, mask)
    np.testing.assert_array_equal(logps2, logps)
    # and the backward puts exact zeros there
    assert np.all(dl[scoring_ignored] == 0)
    # even non-finite logits at ignored positions do not leak into the forward
    changed[scoring_ignored] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf - inf inside the ignored rows' own lse
        logps3, _ = sequence_logps(changed, garbage, mask)
    np.testing.assert_array_equal(logps3, logps)


@BOTH
def test_minus_100_never_indexes_the_vocabulary(impl):
    """-100 is a legal negative index in NumPy: reading it would silently use token V-100."""
    V = 120
    logits = np.zeros((1, 3, V))
    logits[0, 0, V - 100] = 50.0  # a trap: if -100 were gathered, log p would be ~0, not -log V
    labels = np.array([[5, -100, 7]])
    mask = np.array([[False, False, True]])
    logps, _ = impl.sequence_logps(logits, labels, mask)
    np.testing.assert_allclose(logps, [-math.log(V)], rtol=1e-12)


@BOTH
def test_mask_column_zero_is_ignored(impl):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 5))
    labels = rng.integers(0, 5, (2, 4))
    mask = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], bool)
    m2 = mask.copy()
    m2[:, 0] = True
    np.testing.assert_array_equal(impl.sequence_logps(logits, labels, mask)[0], impl.sequence_logps(logits, labels, m2)[0])


@given(batches(dtype=np.float32), st.booleans())
def test_dtype_is_preserved_float32(batch, average):
    logits, labels, mask = batch
    logps, cache = sequence_logps(logits, labels, mask, average=average)
    assert logps.dtype == np.float32
    assert sequence_logps_backward(np.ones(logits.shape[0], np.float64), cache).dtype == np.float32
    ref = loop_reference(logits.astype(np.float64), labels, mask, average)
    np.testing.assert_allclose(logps, ref, rtol=1e-5, atol=1e-4)


@BOTH
def test_dtype_is_preserved_float64_and_mask_kinds(impl):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 4, 6))
    labels = rng.integers(0, 6, (2, 4))
    mask_b = np.array([[0, 1, 1, 1], [0, 0, 1, 0]], bool)
    a, c = impl.sequence_logps(logits, labels, mask_b)
    assert a.dtype == np.float64 and impl.sequence_logps_backward(np.ones(2, np.float32), c).dtype == np.float64
    for other in (mask_b.astype(np.int64), mask_b.astype(np.float32), mask_b.astype(np.uint8)):
        np.testing.assert_array_equal(impl.sequence_logps(logits, labels, other)[0], a)


@BOTH
def test_stable_for_huge_logits(impl):
    """log-softmax is shift-invariant per row; adding 1e4 (or 1e30) must not overflow."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 5, 9))
    labels = rng.integers(0, 9, (2, 5))
    mask = np.ones((2, 5), bool)
    base, _ = impl.sequence_logps(logits, labels, mask)
    for dt, shift in ((np.float64, 1e4), (np.float32, 1e4), (np.float64, 1e30)):
        shifts = shift * rng.choice([-1.0, 1.0], size=(2, 5, 1))
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            out, cache = impl.sequence_logps((logits + shifts).astype(dt), labels, mask)
            d = impl.sequence_logps_backward(np.ones(2, dt), cache)
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(d))
        if shift == 1e4 and dt == np.float64:
            np.testing.assert_allclose(out, base, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# backward


def numeric_dlogits(logits, labels, mask, dlogps, average):
    return numeric_grad(lambda L: float(np.dot(dlogps, sequence_logps(L, labels, mask, average=average)[0])), logits)


@given(batches(max_B=2, max_T=5, max_V=5), st.booleans(), st.integers(0, 2**32 - 1))
def test_backward_matches_finite_differences(batch, average, seed):
    logits, labels, mask = batch
    dlogps = np.random.default_rng(seed).standard_normal(logits.shape[0])
    _, cache = sequence_logps(logits, labels, mask, average=average)
    analytic = sequence_logps_backward(dlogps, cache)
    numeric = numeric_dlogits(logits.copy(), labels, mask, dlogps, average)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    assert np.all(analytic[:, -1] == 0)  # the last position scores nothing


@given(batches())
def test_backward_rows_sum_to_zero_and_overwrite_matches(batch):
    """Each scoring row of dlogits is g * (onehot - p): it sums to 0 over the vocabulary.
    overwrite_logits=True reuses the logits buffer and gives the same numbers."""
    logits, labels, mask = batch
    B = logits.shape[0]
    dlogps = np.linspace(-1.0, 2.0, B)
    _, cache = sequence_logps(logits, labels, mask)
    fresh = sequence_logps_backward(dlogps, cache)
    np.testing.assert_allclose(fresh.sum(-1), 0.0, atol=1e-12)
    mine = logits.copy()
    _, cache2 = fast.sequence_logps(mine, labels, mask)
    reused = fast.sequence_logps_backward(dlogps, cache2, overwrite_logits=True)
    assert reused is mine
    np.testing.assert_allclose(reused, fresh, rtol=1e-12, atol=1e-15)


def test_overwrite_refuses_read_only_logits():
    logits = np.zeros((1, 3, 4))
    logits.flags.writeable = False
    _, cache = fast.sequence_logps(logits, np.array([[0, 1, 2]]), np.array([[0, 1, 1]]))
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
def test_empty_rows_are_reported(impl):
    logits = np.zeros((3, 4, 5))
    labels = np.zeros((3, 4), np.int64)
    mask = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], bool)  # row 1: only column 0 -> empty
    for average in (False, True):
        with pytest.raises(ValueError, match=r"rows 1 have no counted"):
            impl.sequence_logps(logits, labels, mask, average=average)
    logps, cache = impl.sequence_logps(logits, labels, mask, average=True, allow_empty=True)
    np.testing.assert_array_equal(cache["token_counts"], [2, 0, 1])
    assert logps[1] == 0 and np.all(np.isfinite(logps))


@BOTH
def test_counted_labels_out_of_range_are_reported(impl):
    logits = np.zeros((2, 3, 5))
    mask = np.array([[0, 1, 1], [0, 1, 1]], bool)
    for bad in (-100, -1, 5):
        labels = np.array([[0, 1, 2], [0, bad, 2]])
        with pytest.raises(ValueError, match=r"rows 1 have a counted label"):
            impl.sequence_logps(logits, labels, mask)
    # unchecked, they are clipped into the vocabulary rather than read out of bounds
    out, _ = impl.sequence_logps(logits, np.array([[0, 1, 2], [0, 10**9, 2]]), mask, validate=False)
    assert np.all(np.isfinite(out))


@BOTH
def test_shape_and_dtype_errors_name_the_argument(impl):
    logits = np.zeros((2, 3, 5))
    labels = np.zeros((2, 3), np.int64)
    mask = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="logits must be"):
        impl.sequence_logps(logits[0], labels, mask)
    with pytest.raises(ValueError, match="labels must be"):
        impl.sequence_logps(logits, labels[:, :2], mask)
    with pytest.raises(TypeError, match="labels must be integer"):
        impl.sequence_logps(logits, labels.astype(np.float64), mask)
    with pytest.raises(ValueError, match="loss_mask must be"):
        impl.sequence_logps(logits, labels, mask[:1])
    with pytest.raises(ValueError, match="T >= 2"):
        impl.sequence_logps(logits[:, :1], labels[:, :1], mask[:, :1])
    with pytest.raises(TypeError, match="floating"):
        impl.sequence_logps(logits.astype(np.int64), labels, mask)
    _, cache = impl.sequence_logps(logits, labels, mask)
    with pytest.raises(ValueError, match="dlogps must be"):
        impl.sequence_logps_backward(np.ones(3), cache)


# ----------------------------------------------------------------------------------------------
# independent references


@given(batches(max_B=2, max_T=5, max_V=6), st.booleans())
def test_matches_torch_autograd(batch, average):
    """The official DPO code's _get_batch_logps, in torch, with autograd for the backward."""
    torch = pytest.importorskip("torch")
    logits, labels, mask = batch
    dlogps = np.linspace(0.5, -1.5, logits.shape[0])
    t_logits = torch.tensor(logits, requires_grad=True)
    t_labels = torch.tensor(np.where(mask, labels, -100))[:, 1:].clone()
    lg = t_logits[:, :-1, :]
    m = t_labels != -100
    t_labels[~m] = 0
    per_tok = torch.gather(lg.log_softmax(-1), dim=2, index=t_labels.unsqueeze(2)).squeeze(2)
    ref = (per_tok * m).sum(-1) / m.sum(-1) if average else (per_tok * m).sum(-1)
    (ref * torch.tensor(dlogps)).sum().backward()
    logps, cache = sequence_logps(logits, labels, mask, average=average)
    np.testing.assert_allclose(logps, ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sequence_logps_backward(dlogps, cache), t_logits.grad.numpy(), rtol=1e-10, atol=1e-12)


@requires_cuda
@pytest.mark.parametrize("average", [False, True])
def test_cupy_matches_numpy(average):  # pragma: no cover - needs a GPU
    import cupy as cp

    rng = np.random.default_rng(3)
    B, T, V = 3, 7, 50
    logits = rng.standard_normal((B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, (B, T))
    mask = rng.random((B, T)) < 0.7
    mask[:, -1] = True
    labels = np.where(mask, labels, -100)
    dlogps = rng.standard_normal(B).astype(np.float32)
    lp, c = sequence_logps(logits, labels, mask, average=average)
    d = sequence_logps_backward(dlogps, c)
    lp_g, c_g = sequence_logps(cp.asarray(logits), cp.asarray(labels), cp.asarray(mask), average=average)
    d_g = sequence_logps_backward(cp.asarray(dlogps), c_g)
    assert isinstance(lp_g, cp.ndarray) and lp_g.dtype == np.float32 and d_g.dtype == np.float32
    np.testing.assert_allclose(lp_g.get(), lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_g.get(), d, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="counted label"):
        bad = labels.copy()
        bad[0, -1] = -100
        sequence_logps(cp.asarray(logits), cp.asarray(bad), cp.asarray(mask))
