"""Matrix products through Intel MKL's GEMM, for the fast path on the CPU (the opt-in ``mkl`` extra).

NumPy's wheels multiply matrices with OpenBLAS. On the 2-core Xeon where minidpo is measured
(bench/README.md), MKL's sgemm, which PyTorch's CPU build uses, was 10-16% faster on the
model's shapes (N x 384 @ 384 x 1152: 45.0 ms against 51.0; the 2048^3 ceiling 159 GFLOP/s
against 149), and the matrix products are about 80% of a training step; on an AMD EPYC it was
0-15% slower. So it is used only where it measures faster: :func:`calibrate` times both
libraries on the model's shapes once per machine and runtime.gemm_lib caches the verdict
(runtime.gemm_choice). This module calls
``cblas_sgemm`` / ``cblas_dgemm`` of the ``mkl`` package's ``libmkl_rt`` through ctypes, with
MKL's sequential threading layer: the fast path's thread pool shares each product among its
threads (fast.py), as it does with NumPy's BLAS on one thread.

:func:`matmul` takes the 2-D operands NumPy's matmul does and gives the same numbers to float
round-off; an operand in a layout a GEMM cannot read (no unit stride) goes to ``np.matmul``.
fast.py imports this module on first use only; without the ``mkl`` package, with
``MINIDPO_CPU_KERNELS=0``, or where the calibration found MKL no faster, ``np.matmul`` does all
products.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import time

import numpy as np

__all__ = ["load", "version", "matmul", "bmm", "calibrate", "CALIBRATION_SHAPES"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL
_LIB = None  # the loaded library, or False when it cannot be loaded


def _library_path() -> str | None:
    """Where the ``mkl`` package put libmkl_rt (the installed files' own record), else None."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            path = str(f.locate())
            if os.path.exists(path):
                return path
    return None


def version() -> str | None:
    """The installed ``mkl`` package's version, or None."""
    try:
        return importlib.metadata.version("mkl")
    except importlib.metadata.PackageNotFoundError:
        return None


def load():
    """libmkl_rt with its GEMMs typed and MKL on one thread, or None when it is not installed or
    does not load. Loaded once."""
    global _LIB
    if _LIB is None:
        _LIB = _load() or False
    return _LIB or None


def _load():
    path = _library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)  # RTLD_LOCAL: its symbols stay out of other libraries' way
        lib.MKL_Set_Threading_Layer(_SEQUENTIAL)  # before any other MKL call
    except (OSError, AttributeError):
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    try:
        for name, real in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
            f = getattr(lib, name)
            f.argtypes = [i, i, i, i, i, i, real, p, i, p, i, real, p, i]
            f.restype = None
        for name, real in (("cblas_sgemm_batch_strided", ctypes.c_float),
                           ("cblas_dgemm_batch_strided", ctypes.c_double)):
            f = getattr(lib, name)
            f.argtypes = [i, i, i, i, i, i, real, p, i, i, p, i, i, real, p, i, i, i]
            f.restype = None
    except AttributeError:  # an MKL older than 2020.2 (no batch-strided GEMM)
        return None
    return lib


def _as_gemm_operand(a):
    """(transpose flag, leading dimension) to read the 2-D array ``a`` as a GEMM operand in
    row-major order, or None when neither of its strides is one element (or it is empty)."""
    item = a.itemsize
    rows, cols = a.shape
    s0, s1 = a.strides
    if (s1 == item or cols == 1) and s0 % item == 0 and s0 >= max(cols, 1) * item:
        return _NO_TRANS, max(s0 // item, cols, 1)  # row-major: row i starts s0 / item elements on
    if (s0 == item or rows == 1) and s1 % item == 0 and s1 >= max(rows, 1) * item:
        return _TRANS, max(s1 // item, rows, 1)  # the transpose of a row-major (cols, rows) array
    return None


def matmul(a, b, out=None):
    """out (M, N) = a (M, K) @ b (K, N) for 2-D float32 or float64 NumPy arrays of one dtype.

    ``a`` and ``b`` may be C- or F-ordered or views with a row stride (``x[:, s]``, ``w.T``);
    ``out`` (made when None) must be C-contiguous. Through MKL's GEMM when it is loaded and the
    layouts allow, else ``np.matmul``: the same numbers to round-off either way."""
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = np.empty((M, N), dtype=np.result_type(a, b))
    lib = load()
    fa, fb = _as_gemm_operand(a), _as_gemm_operand(b)
    ok = (lib is not None and fa is not None and fb is not None and a.dtype == b.dtype == out.dtype
          and a.dtype in (np.float32, np.float64) and out.flags.c_contiguous and M and N and K
          and max(M, N, K, fa[1], fb[1]) < 2**31)
    if not ok:
        return np.matmul(a, b, out=out)
    gemm = lib.cblas_sgemm if a.dtype == np.float32 else lib.cblas_dgemm
    gemm(_ROW_MAJOR, fa[0], fb[0], M, N, K, 1.0, a.ctypes.data, fa[1], b.ctypes.data, fb[1], 0.0,
         out.ctypes.data, max(N, 1))
    return out


def _batch_stride(x, P: int, Q: int):
    """The one stride (in elements) between consecutive matrices of x (P, Q, ., .) taken in (p, q)
    order, or None when the P and Q axes do not flatten into one."""
    item = x.itemsize
    if P * Q == 1:
        return 0
    if Q == 1:
        return x.strides[0] // item
    if P == 1 or x.strides[0] == Q * x.strides[1]:
        return x.strides[1] // item
    return None


def bmm(a, b, out, alpha: float = 1.0, beta: float = 0.0):
    """out = alpha a @ b + beta out for 4-D arrays: a (P, Q, M, K), b (P, Q, K, N), out (P, Q, M, N),
    each matrix of a and b with a unit stride in one of its two last axes (views such as a
    transposed ``x[:, :, i0:i1]`` are read in place). ``out`` may be a view into a larger array:
    where its matrices interleave (heads side by side), the product goes to a contiguous
    temporary first. Batch-strided GEMMs through MKL: one call when the P and Q axes of a, b and
    out flatten into one, else one a leading index; np.matmul (and the same alpha, beta
    arithmetic) where MKL or a layout does not allow it."""
    P, Q, M, K = a.shape
    N = b.shape[3]
    lib = load()
    fa = _as_gemm_operand(a[0, 0]) if P and Q else None
    fb = _as_gemm_operand(b[0, 0]) if P and Q else None
    item = out.itemsize
    ok = (lib is not None and fa is not None and fb is not None and a.dtype == b.dtype == out.dtype
          and a.dtype in (np.float32, np.float64) and M and N and K
          and all(x.strides[1] % item == 0 and x.strides[1] >= 0 for x in (a, b))
          and max(M, N, K, fa[1], fb[1]) < 2**31)
    if not ok:
        if beta == 0.0:
            np.matmul(a, b, out=out)
            if alpha != 1.0:
                out *= out.dtype.type(alpha)
        else:
            out *= out.dtype.type(beta)
            out += out.dtype.type(alpha) * np.matmul(a, b)
        return out
    direct = out.flags.c_contiguous  # MKL writes its matrices one after another
    tgt = out if direct else np.empty(out.shape, dtype=out.dtype)
    gemm = lib.cblas_sgemm_batch_strided if a.dtype == np.float32 else lib.cblas_dgemm_batch_strided
    g_beta = beta if direct else 0.0
    sa, sb, sc = _batch_stride(a, P, Q), _batch_stride(b, P, Q), _batch_stride(tgt, P, Q)
    if sa is not None and sb is not None:  # one call for all P Q matrices
        gemm(_ROW_MAJOR, fa[0], fb[0], M, N, K, alpha, a.ctypes.data, fa[1], sa, b.ctypes.data, fb[1], sb,
             g_beta, tgt.ctypes.data, N, max(sc, M * N), P * Q)
    else:  # one call a leading index, over Q
        sa, sb = a.strides[1] // item, b.strides[1] // item
        for p in range(P):
            gemm(_ROW_MAJOR, fa[0], fb[0], M, N, K, alpha, a[p].ctypes.data, fa[1], sa, b[p].ctypes.data, fb[1], sb,
                 g_beta, tgt[p].ctypes.data, N, M * N, Q)
    if not direct:
        if beta == 0.0:
            np.copyto(out, tgt)
        else:
            if beta != 1.0:
                out *= out.dtype.type(beta)
            out += tgt
    return out


# The products of a training step, (M, K, N) for out (M, N) = a (M, K) @ b (K, N), at 2048 tokens:
# C = 128 (the main job's model) and C = 384 (C1 in bench/): the attention and MLP projections,
# the weight gradient (a transposed operand) and the unembedding. About 9.6 GFLOP a library a round.
CALIBRATION_SHAPES = (
    (2048, 128, 384), (2048, 128, 512), (2048, 512, 128),  # C = 128: qkv, fc, proj
    (2048, 384, 1152), (2048, 1536, 384),                   # C = 384: qkv, MLP proj
    (384, 2048, 1152),                                      # dW = x^T (C, N) @ dy (N, 3C)
    (2048, 384, 2048),                                      # logits (N, C) @ wte^T (C, V)
)


def calibrate(shapes=CALIBRATION_SHAPES, rounds: int = 3, seed: int = 0) -> dict:
    """Time MKL's sgemm (this module's :func:`matmul`) against ``np.matmul`` on float32 products of
    the given (M, K, N) shapes, A/B interleaved shape by shape for ``rounds`` rounds, each product
    once untimed first. Call it with NumPy's BLAS on the threads it will run on (runtime's
    use_threads: one). Returns {"mkl_s": [median seconds per shape], "numpy_s": [...], "shapes":
    [...], "rounds": rounds}; raises RuntimeError when MKL does not load."""
    if load() is None:
        raise RuntimeError("MKL's GEMM does not load here (is the `mkl` extra installed?)")
    rng = np.random.default_rng(seed)
    mkl_s, np_s = [], []
    for M, K, N in shapes:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        if M < K:  # the weight-gradient form: a is read transposed, as x.T is
            a = np.ascontiguousarray(a.T).T
        out = np.empty((M, N), dtype=np.float32)
        fns = (lambda: matmul(a, b, out), lambda: np.matmul(a, b, out=out))
        for f in fns:
            f()
        times = ([], [])
        for _ in range(rounds):
            for j, f in enumerate(fns):
                t0 = time.perf_counter()
                f()
                times[j].append(time.perf_counter() - t0)
        mkl_s.append(float(np.median(times[0])))
        np_s.append(float(np.median(times[1])))
    return {"shapes": [list(s) for s in shapes], "rounds": rounds, "mkl_s": mkl_s, "numpy_s": np_s}
