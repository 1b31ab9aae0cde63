"""The xp switch: one code path, NumPy on the CPU or CuPy on a CUDA GPU.

Every array function in minidpo is written against an array module ``xp`` that is either
``numpy`` or ``cupy``. Functions that take arrays find it from their inputs with
:func:`get_array_module`, so the same line runs on both; only the places that *create* data
(parameter init, batches) need a :class:`Backend`, which says where new arrays live.

    >>> be = Backend("cpu")            # NumPy
    >>> be = Backend("cuda")           # CuPy on GPU 0  (pip install 'minidpo[cuda12]')
    >>> x = be.asarray([[1.0, 2.0]])   # float32 on the device
    >>> be.to_numpy(x)                 # back on the host

Design rules kept here:
- float32 is the training dtype; float64 is used only when a caller asks (gradient checks).
- CuPy is imported lazily, and only when a CUDA device is asked for, so a CPU-only install
  never needs it; asking for CUDA without it fails with the command that installs it.
- Random numbers come from a seeded NumPy ``Generator`` on the host and are copied to the
  device: a run draws the same numbers on either backend, and the generator's state is plain
  JSON, so checkpoints can save and restore it exactly.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

DEFAULT_DTYPE = np.float32

_CUDA_INSTALL_HINT = (
    "install CuPy for your CUDA version, e.g. `pip install 'minidpo[cuda12]'` "
    "(CUDA 12.x) or `pip install 'minidpo[cuda13]'` (CUDA 13.x)"
)


def get_array_module(*arrays: Any):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    CuPy is only consulted if it has already been imported, so CPU code never pays for it.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def is_cuda_array(x: Any) -> bool:
    """True when ``x`` is a CuPy (device) array."""
    return get_array_module(x) is not np


def to_numpy(x: Any) -> np.ndarray:
    """Copy a NumPy or CuPy array (or scalar) to a host NumPy array; NumPy input is returned as is."""
    if is_cuda_array(x):
        return x.get()
    return np.asarray(x)


def scatter_add(target, indices, values) -> None:
    """In place: ``target[indices[i]] += values[i]`` with repeated indices *accumulated*.

    Plain fancy-index ``target[idx] += v`` keeps only one update per repeated index, which
    silently drops gradient for a token that occurs twice in a batch (the embedding case).
    Shapes: target (N, C), indices (M,) int, values (M, C).
    """
    get_array_module(target).add.at(target, indices, values)  # numpy.add.at or cupy.add.at


class DeviceError(RuntimeError):
    """The device asked for cannot be used here (no CuPy, no driver, no such GPU); the message
    says what to install or pass instead."""


def _import_cupy():
    try:
        import cupy  # noqa: F401
    except ImportError:  # the common case on a CPU-only machine
        raise DeviceError(f"device 'cuda' needs CuPy, which is not installed: {_CUDA_INSTALL_HINT}") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy present but no driver / no GPU
        raise DeviceError(
            f"device 'cuda' was asked for but CUDA is not usable here ({type(err).__name__}: {err}); "
            f"check the NVIDIA driver, or use --device cpu"
        ) from None
    if n == 0:
        raise DeviceError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return cupy


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' -> ('cuda', 0); 'cuda:N' -> ('cuda', N). Anything else is a
    ValueError (also 'gpu': one name for each device, never a guess)."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', got {device!r}")
    d = device.strip().lower()
    if d == "cpu":
        return "cpu", 0
    if d == "cuda":
        return "cuda", 0
    if d.startswith("cuda:"):
        idx = d[5:]
        if idx.isdigit():
            return "cuda", int(idx)
    hint = "; did you mean 'cuda'?" if d.startswith("gpu") else ""
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'{hint}")


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        _import_cupy()
        return True
    except Exception:
        return False


class Backend:
    """Where arrays live: ``Backend('cpu')`` (NumPy) or ``Backend('cuda[:N]')`` (CuPy).

    Attributes:
        device: the normalised name, 'cpu' or 'cuda:N'.
        xp: the array module, ``numpy`` or ``cupy``.
        dtype: the floating dtype new arrays get (float32 unless asked otherwise).
    """

    def __init__(self, device: str = "cpu", dtype=DEFAULT_DTYPE):
        kind, index = parse_device(device)
        self.kind = kind
        self.dtype = np.dtype(dtype)
        if kind == "cpu":
            self.xp = np
            self.device = "cpu"
        else:
            cupy = _import_cupy()
            n = cupy.cuda.runtime.getDeviceCount()
            if index >= n:
                raise DeviceError(f"device 'cuda:{index}' asked for, but only {n} GPU(s) are visible")
            cupy.cuda.Device(index).use()
            self.xp = cupy
            self.device = f"cuda:{index}"

    def __repr__(self) -> str:
        return f"Backend({self.device!r}, dtype={self.dtype.name})"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def asarray(self, x, dtype=None):
        """Put ``x`` (host or device data) on this backend. Floating input takes ``dtype``
        (default: the backend's dtype); integer and bool input keep their dtype unless given one."""
        if dtype is None:
            kind = np.asarray(x).dtype.kind if not is_cuda_array(x) else x.dtype.kind
            dtype = self.dtype if kind == "f" else None
        if self.xp is np:
            return np.asarray(to_numpy(x), dtype=dtype)
        return self.xp.asarray(x, dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        return to_numpy(x)

    def zeros(self, shape, dtype=None):
        return self.xp.zeros(shape, dtype=dtype or self.dtype)

    def scatter_add(self, target, indices, values) -> None:
        scatter_add(target, indices, values)

    def synchronize(self) -> None:
        """Wait for queued GPU work (no-op on CPU); use only around timings, never inside a step."""
        if self.is_cuda:  # pragma: no cover - needs a GPU
            self.xp.cuda.get_current_stream().synchronize()

    @staticmethod
    def rng(seed: int | None) -> np.random.Generator:
        """A seeded host generator (PCG64). Its ``bit_generator.state`` is JSON-serialisable."""
        return np.random.default_rng(seed)

    def normal(self, rng: np.random.Generator, shape, std: float = 1.0, dtype=None):
        """Normal(0, std^2) samples of ``shape`` drawn on the host by ``rng``, placed on this device."""
        dt = np.dtype(dtype or self.dtype)
        host = rng.standard_normal(size=shape, dtype=np.float64 if dt == np.float64 else np.float32)
        if std != 1.0:
            host *= dt.type(std)
        return self.asarray(host.astype(dt, copy=False), dtype=dt)


def get_backend(device: str | Backend = "cpu") -> Backend:
    """Accept either a device string or an existing Backend."""
    return device if isinstance(device, Backend) else Backend(device)
