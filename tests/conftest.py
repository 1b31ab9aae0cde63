"""Shared test settings: hypothesis profiles and the CUDA skip marker."""

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


def _cuda_ok() -> bool:
    from minidpo.backend import cuda_available

    return cuda_available()


CUDA_OK = _cuda_ok()
requires_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs CuPy and a CUDA GPU")
