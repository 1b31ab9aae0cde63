"""The xp switch: device parsing, dtype discipline, scatter-add with repeated indices."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidpo import backend as B
from tests.conftest import CUDA_OK, requires_cuda


def test_parse_device():
    assert B.parse_device("cpu") == ("cpu", 0)
    assert B.parse_device("cuda") == ("cuda", 0)
    assert B.parse_device("cuda:3") == ("cuda", 3)
    for bad in ["tpu", "cuda:x", "cuda:", ""]:
        with pytest.raises(ValueError, match="unknown device"):
            B.parse_device(bad)


def test_cpu_backend_is_numpy_float32():
    be = B.Backend("cpu")
    assert be.xp is np and be.device == "cpu" and not be.is_cuda
    assert be.asarray([1.0, 2.0]).dtype == np.float32
    assert be.asarray(np.arange(3, dtype=np.int64)).dtype == np.int64
    assert be.zeros((2, 3)).dtype == np.float32
    assert be.normal(be.rng(0), (4, 5), std=0.02).dtype == np.float32
    assert B.Backend("cpu", dtype=np.float64).normal(be.rng(0), (2,)).dtype == np.float64


@pytest.mark.skipif(CUDA_OK, reason="this machine has CUDA")
def test_cuda_without_gpu_fails_clearly():
    with pytest.raises(RuntimeError, match="cuda"):
        B.Backend("cuda")


def test_rng_is_seeded_and_state_roundtrips():
    be = B.Backend("cpu")
    r1, r2 = be.rng(7), be.rng(7)
    np.testing.assert_array_equal(be.normal(r1, (3,)), be.normal(r2, (3,)))
    state = r1.bit_generator.state
    a = be.normal(r1, (5,))
    r3 = be.rng(0)
    r3.bit_generator.state = state
    np.testing.assert_array_equal(a, be.normal(r3, (5,)))


@given(st.lists(st.integers(0, 4), min_size=1, max_size=20))
def test_scatter_add_accumulates_repeated_indices(idx):
    idx = np.array(idx)
    vals = np.arange(len(idx) * 2, dtype=np.float64).reshape(-1, 2) + 1
    target = np.zeros((5, 2))
    B.scatter_add(target, idx, vals)
    expected = np.zeros((5, 2))
    for i, v in zip(idx, vals):
        expected[i] += v
    np.testing.assert_array_equal(target, expected)


@requires_cuda
def test_cuda_roundtrip_and_scatter_add():  # pragma: no cover - needs a GPU
    be = B.Backend("cuda")
    x = be.asarray(np.arange(6, dtype=np.float32).reshape(3, 2))
    assert B.get_array_module(x) is be.xp
    idx = be.asarray(np.array([0, 0, 2]))
    t = be.zeros((3, 2))
    B.scatter_add(t, idx, x)
    np.testing.assert_array_equal(B.to_numpy(t), np.array([[2, 4], [0, 0], [4, 5]], dtype=np.float32))
