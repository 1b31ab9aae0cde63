"""Shared test settings: hypothesis profiles, and the CuPy path on a GPU or on the strict stand-in.

``@requires_cuda`` tests run on real CuPy where a GPU is visible, and otherwise on the strict CuPy
stand-in (tests/cupy_standin), so the GPU code path runs on every machine. ``@requires_gpu``
marks the few tests that mean something only on real hardware (the CUDA C of the fused kernels
run for real, memory-pool measurements): they skip without a GPU.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_addoption(parser):
    parser.addoption("--reproduce", action="store_true", default=False,
                     help="also run the tests marked reproduce: re-run the main job's --quick and hold its figures "
                          "to the spread recorded in docs/quick_spread.json (minutes; not in the default run)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``reproduce`` run only with --reproduce (they re-run a whole job and compare it
    with a recorded spread: a check of the science, not of the code, and slow)."""
    if config.getoption("--reproduce"):
        return
    skip = pytest.mark.skip(reason="a reproduction check: run with python -m pytest --reproduce tests/test_reproduce.py")
    for item in items:
        if "reproduce" in item.keywords:
            item.add_marker(skip)


def _cuda_ok() -> bool:
    from minidpo.backend import cuda_available

    return cuda_available()


CUDA_OK = _cuda_ok()


@pytest.fixture
def cuda_or_standin():
    """Real CuPy on a GPU; otherwise the strict stand-in, installed as ``cupy`` for this test."""
    if CUDA_OK:  # pragma: no cover - needs a GPU
        import cupy

        yield cupy
        return
    from tests import cupy_standin

    cupy = cupy_standin.install()
    try:
        yield cupy
    finally:
        cupy_standin.uninstall()


requires_cuda = pytest.mark.usefixtures("cuda_or_standin")
requires_gpu = pytest.mark.skipif(not CUDA_OK, reason="needs CuPy and a CUDA GPU (real hardware)")


def numeric_grad(f, x, h=1e-6):
    """Central finite differences of a scalar function: df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / 2h.

    ``x`` (float64, any shape) is perturbed in place, one entry at a time, and restored."""
    import numpy as np

    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = f(x)
        x[i] = old - h
        fm = f(x)
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def numeric_grad_richardson(f, x, h=1e-6, rtol=1e-7):
    """Central differences with a Richardson step, R(e) = (4 D(e/2) - D(e)) / 3 (error O(e^4)), the step
    e = h, h/4, ... shrunk until two estimates agree to ``rtol`` (and the rounding level of f): for
    losses that bend sharply (exponential scores at large negative log-ratios), where one fixed step
    is too coarse. ``x`` (float64) is perturbed in place, one entry at a time, and restored."""
    import numpy as np

    size = max(1.0, abs(f(x)))  # the rounding of a difference quotient at step e is about 1e-16 * size / e
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]

        def d(e):
            x[i] = old + e
            fp = f(x)
            x[i] = old - e
            fm = f(x)
            x[i] = old
            return (fp - fm) / (2 * e)

        e, prev = h, None
        for _ in range(6):
            est = (4.0 * d(e / 2) - d(e)) / 3.0
            if prev is not None and abs(est - prev) <= rtol * abs(est) + 1e-14 * size / e:
                est = prev
                break
            prev, e = est, e / 4
        g[i] = est
    return g


@pytest.fixture(scope="session")
def explain_run(tmp_path_factory):
    """The small model of ``minidpo explain`` (minidpo.explain.tiny_run: SFT, then a few DPO steps),
    trained once per test session for tests/test_explain*.py (about 10 s on 2 cores)."""
    from minidpo import runtime
    from minidpo.explain import tiny_run

    out = tmp_path_factory.mktemp("explain") / "tiny"
    runtime.cpu_defaults()
    with runtime.use_threads(1):
        tiny_run(out, seed=0, say=lambda msg: None)
    return out
