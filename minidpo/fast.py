"""The fast paths: layers.py and logprobs.py made fast, with the same signatures.

Read layers.py and logprobs.py for the math; this module computes the same numbers (to
round-off; tests/test_fast.py checks every function against its plain twin) with:

- cache blocking on the CPU: GELU's elementwise chain and the log-softmax over the (B, T, V)
  logits run in pieces that stay in the cache, in place, with no full-size temporaries;
- the causal skip: attention cuts its queries into a few blocks, each scored only against the
  keys it can see;
- fused CUDA kernels (kernels.py) on CuPy arrays, one visible ``if kernels.use(x):`` per layer;
- fused compiled CPU kernels (cpu_kernels.py, Numba, when installed) on NumPy arrays, one visible
  ``ck = cpu_kernels(x)`` per layer; their rows are shared among the threads like the NumPy passes.

One switch picks the path for the model, the trainer and everything built on them:

    ops()                       the functions in use: this module (default) or the plain ones
    set_plain(True)             use the plain reference everywhere (for reading, and for checks)
    with plain():               the same, inside a block

Shapes: B batch, T time, C channels, V vocabulary, H heads, D head size, N = B * T rows.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from . import checks, kernels, layers, logprobs
from .backend import get_array_module, scatter_add
from .logprobs import log_softmax, log_softmax_backward, logsumexp

__all__ = [
    "ops", "set_plain", "is_plain", "plain", "PLAIN", "FAST", "set_threads", "get_threads",
    "default_threads", "parallel_for", "cpu_defaults", "hugepage_advice", "set_hugepage_advice",
    "cpu_kernels", "set_cpu_kernels", "no_cpu_kernels", "keep_freed_memory", "use_threads",
    *layers.__all__, "sequence_logps", "sequence_logps_backward",
]

# ------------------------------------------------------------------------------------ the switch

_PLAIN = False


def set_plain(flag: bool = True) -> None:
    """Use the plain reference (True) or the fast paths (False, the default) from now on."""
    global _PLAIN
    _PLAIN = bool(flag)


def is_plain() -> bool:
    return _PLAIN


@contextlib.contextmanager
def plain(flag: bool = True):
    """``with plain():`` runs the plain reference inside the block (``plain(False)``: the fast one)."""
    old = _PLAIN
    set_plain(flag)
    try:
        yield
    finally:
        set_plain(old)


def ops():
    """The namespace of layer and log-prob functions in use: :data:`PLAIN` or :data:`FAST`."""
    return PLAIN if _PLAIN else FAST


# ------------------------------------------------------------------------------------ the thread pool
# NumPy's ufuncs, reductions and BLAS calls release the GIL, so a long elementwise pass cut into
# row blocks runs on several cores from a small pool of Python threads. Each part writes its own
# rows of a preallocated output; reductions over rows add per-part partial sums in a fixed order,
# so a given thread count always gives the same numbers. CuPy arrays never go through the pool.

_THREADS: int | None = None  # None: default_threads()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_MIN_PAR = 1 << 18  # elements: a part smaller than this is not worth a thread hand-off (~90 us on
#                   the 2-core VM; C0's step at 2 threads: 2^17 94.2 ms, 2^18 92.5, 2^19 102.8)


def default_threads() -> int:
    """1. Measured on the 2-core Xeon (bench/README.md): with the BLAS on both cores, a second pool
    thread made the C1 step slower (5.29 -> 5.61 s) and C0's no faster, because OpenBLAS's worker
    threads keep spinning between calls and take the core the pool's thread wants. Raise it with
    :func:`set_threads` where the BLAS runs on fewer threads than there are cores."""
    return 1


def set_threads(n: int | None) -> None:
    """Threads for the fast path's CPU elementwise passes (None: :func:`default_threads`)."""
    global _THREADS
    if n is not None and (int(n) != n or n < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {n!r}")
    _THREADS = None if n is None else int(n)


def get_threads() -> int:
    """The thread count the fast path's CPU passes use now."""
    return default_threads() if _THREADS is None else _THREADS


def _pool() -> ThreadPoolExecutor:
    """The pool's n - 1 worker threads (the calling thread is the n-th)."""
    global _POOL, _POOL_SIZE
    n = max(1, get_threads() - 1)
    if _POOL is None or _POOL_SIZE != n:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL, _POOL_SIZE = ThreadPoolExecutor(n, thread_name_prefix="minidpo-fast"), n
    return _POOL


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _POOL, _POOL_SIZE
    _POOL, _POOL_SIZE = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _madvise():
    """NumPy's multiarray module if it has the hugepage switch (NumPy >= 1.20 on Linux), else None."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    m = getattr(core, "multiarray", None)
    return m if hasattr(m, "_set_madvise_hugepage") and hasattr(m, "_get_madvise_hugepage") else None


def hugepage_advice() -> bool | None:
    """Whether NumPy advises transparent hugepages for its large arrays now (None: no switch)."""
    m = _madvise()
    return None if m is None else bool(m._get_madvise_hugepage())


def set_hugepage_advice(flag: bool) -> bool | None:
    """Turn NumPy's hugepage advice on or off (the run-time form of NUMPY_MADVISE_HUGEPAGE);
    returns the previous setting (None: this NumPy has no switch, nothing done)."""
    m = _madvise()
    return None if m is None else bool(m._set_madvise_hugepage(bool(flag)))


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def _glibc():
    """The C library as a ctypes handle when it is glibc (it has mallopt), else None."""
    import ctypes
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:  # pragma: no cover - a Linux without a loadable C library
        return None


def keep_freed_memory(flag: bool = True) -> bool:
    """glibc only: keep freed memory in the process for the next allocation (True) or give it back
    to the system as glibc does by default (False). Returns whether the setting was applied.

    glibc serves an allocation over 32 MiB with its own mmap and unmaps it when freed, so every
    step's fresh (B, T, 4C) activations and (B, T, V) logits are page-faulted in again, page by
    page: C1's step (bench/README.md) took 526,000 minor faults and 0.8 s of system time. With
    mmap off and the heap never trimmed, those pages are reused: 0 faults a step after the first.
    The price: the process keeps its peak heap until it exits (a training run's peak anyway)."""
    libc = _glibc()
    if libc is None:
        return False
    if flag:
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    else:  # glibc's documented defaults
        ok = libc.mallopt(_M_MMAP_MAX, 65536) and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    return bool(ok)


def cpu_defaults(threads: int | None = None) -> None:
    """The fast path's CPU settings, for a training or benchmark run (the CLI and bench/ call it):

    - ``threads`` for the elementwise passes (:func:`set_threads`; None: :func:`default_threads`);
    - NumPy's transparent-hugepage advice off, unless NUMPY_MADVISE_HUGEPAGE is set. Every step
      allocates fresh activation arrays; on a VM a hugepage fault may first compact memory, and
      C1's step (bench/README.md) took 12.0 s with the advice and 8.8 s without (1 thread);
    - freed memory kept for reuse (:func:`keep_freed_memory`), unless MINIDPO_KEEP_MEMORY=0.
    """
    set_threads(threads)
    if "NUMPY_MADVISE_HUGEPAGE" not in os.environ:
        set_hugepage_advice(False)
    if os.environ.get("MINIDPO_KEEP_MEMORY", "1") != "0":
        keep_freed_memory(True)


@contextlib.contextmanager
def use_threads(n: int):
    """``with use_threads(n):`` a run on n CPU threads: the pool has n and, when n > 1, the fast
    path shares each matrix product among them with the BLAS on one thread (threadpoolctl), so the
    BLAS's idle workers do not spin on the cores the pool's threads want; n = 1: one thread for
    both. Restores both on exit."""
    from threadpoolctl import threadpool_limits

    if int(n) != n or n < 1:
        raise ValueError(f"threads must be an int >= 1, got {n!r}")
    old = _THREADS
    set_threads(int(n))
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        set_threads(old)


# ------------------------------------------------------------------------------------ CPU kernels

_CPU_KERNELS = os.environ.get("MINIDPO_CPU_KERNELS", "1") != "0"
_CK = None  # the cpu_kernels module once imported and working; False: not available


def set_cpu_kernels(flag: bool) -> bool:
    """Use the compiled CPU kernels (True, the default when Numba is installed) or the NumPy
    passes (False); returns the previous setting. ``MINIDPO_CPU_KERNELS=0`` starts a run with False."""
    global _CPU_KERNELS
    old, _CPU_KERNELS = _CPU_KERNELS, bool(flag)
    return old


@contextlib.contextmanager
def no_cpu_kernels():
    """``with no_cpu_kernels():`` the fast path runs its NumPy passes inside the block."""
    old = set_cpu_kernels(False)
    try:
        yield
    finally:
        set_cpu_kernels(old)


def _load_cpu_kernels():
    """cpu_kernels, compiled (or loaded from Numba's disk cache) and tried once on small float32
    arrays; False when Numba is missing (silently) or fails here (with one warning)."""
    try:
        from . import cpu_kernels as ck
    except ImportError:
        return False
    try:
        x = np.linspace(-3, 3, 8, dtype=np.float32)
        y = np.empty_like(x)
        ck.gelu_forward(x, y)
        if not np.allclose(y, layers.gelu_forward(x)[0], rtol=1e-5, atol=1e-6):
            raise RuntimeError("gelu_forward gave wrong numbers")
    except Exception as e:  # a Numba that cannot compile here: the NumPy passes still work
        import warnings

        warnings.warn(f"minidpo: the compiled CPU kernels are off ({type(e).__name__}: {e}); "
                      "set MINIDPO_CPU_KERNELS=0 to silence this", RuntimeWarning, stacklevel=3)
        return False
    return ck


def cpu_kernels(*arrays):
    """The compiled CPU kernels module when they should run on these arrays, else None: they are
    on, Numba is installed, and every array is a NumPy float32 or float64 array. With no arrays:
    whether the kernels run at all."""
    global _CK
    if not _CPU_KERNELS:
        return None
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype not in _KERNEL_DTYPES:
            return None
    if _CK is None:
        _CK = _load_cpu_kernels()
    return _CK or None


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _half_threads() -> int:
    """Threads for each of two equal halves of a pass (at least 1)."""
    return max(1, get_threads() // 2)


def _parts(n: int, row_size: int = 1, align: int = 1, threads: int | None = None) -> list[slice]:
    """Contiguous slices covering rows 0..n, one per thread (``threads``, default all; fewer when a
    part would hold under _MIN_PAR elements), each starting at a multiple of ``align`` rows."""
    k = max(1, min(get_threads() if threads is None else threads, (n * row_size) // _MIN_PAR, n))
    if k == 1:
        return [slice(0, n)]
    edges = [min(n, round(j * n / k / align) * align) for j in range(k)] + [n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def parallel_for(fn, items) -> None:
    """``fn(item)`` for each item, on the calling thread and the pool's workers at once when there
    are several: each takes the next item until none is left (so a worker is woken only when there
    is more than one item). Exceptions are re-raised here; ``fn`` must not itself call parallel_for.
    Which thread runs an item varies; what it computes does not (each item writes its own rows)."""
    items = list(items)
    n = get_threads()
    if len(items) <= 1 or n == 1:
        for it in items:
            fn(it)
        return
    todo = iter(items)
    lock = threading.Lock()

    def drain():
        while True:
            with lock:
                item = next(todo, _DONE)
            if item is _DONE:
                return
            fn(item)

    workers = [_pool().submit(drain) for _ in range(min(n, len(items)) - 1)]
    try:
        drain()
    finally:
        for w in workers:  # every worker finishes before this returns (or raises)
            w.result()


_DONE = object()


# ------------------------------------------------------------------------------------ embedding, linear


def embedding_forward(idx, wte, wpe, position_ids=None):
    """layers.embedding_forward, the position rows added in place."""
    T = idx.shape[1]
    x = wte[idx]  # (B, T, C)
    x += wpe[:T] if position_ids is None else wpe[position_ids]
    return x, (idx, position_ids, wte.shape, wpe.shape)


def embedding_backward(dx, cache, dwte=None):
    """layers.embedding_backward; positions 0..T-1 (the training case) by a sum over B instead
    of a scatter-add."""
    idx, position_ids, wte_shape, wpe_shape = cache
    xp = get_array_module(dx)
    B, T, C = dx.shape
    dx2 = dx.reshape(B * T, C)  # (N, C)
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)  # (V, C)
    ck = cpu_kernels(dwte, dx2) if dwte.flags.c_contiguous and dx2.flags.c_contiguous and dwte.dtype == dx2.dtype \
        else None
    if ck:  # np.add.at's row by row loop, compiled
        ck.scatter_add_rows(dwte, np.ascontiguousarray(idx.reshape(-1), dtype=np.int64), dx2)
    else:
        scatter_add(dwte, idx.reshape(-1), dx2)
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)  # (n_ctx, C)
    if position_ids is None:
        dwpe[:T] = dx.sum(axis=0)  # positions 0..T-1 are distinct: a plain sum over B
    elif position_ids.ndim == 1:
        scatter_add(dwpe, position_ids, dx.sum(axis=0))  # (T,) ids, (T, C) values
    else:
        scatter_add(dwpe, position_ids.reshape(-1), dx2)  # (N,) ids, (N, C) values
    return None, {"wte": dwte, "wpe": dwpe}


# On NumPy the fast path does its own matrix products: through MKL's GEMM when the ``mkl``
# package is installed (mkl_blas.py: 10-16% faster than NumPy's OpenBLAS on the model's shapes
# here), else np.matmul; with several threads each product is shared among them, each part one
# GEMM on its own rows (or its own rows of dw), the BLAS on one thread (see use_threads), so that
# no BLAS worker spins on a core the pool's thread wants.

_MKL = None  # the mkl_blas module once it loaded MKL; False: not available


def _gemm_lib():
    """mkl_blas when MKL's GEMM should do the products (the CPU kernels are on and the ``mkl``
    package loads), else None (np.matmul)."""
    global _MKL
    if not _CPU_KERNELS:
        return None
    if _MKL is None:
        from . import mkl_blas

        _MKL = mkl_blas if mkl_blas.load() is not None else False
    return _MKL or None


def _matmul(a, b, out):
    """out (M, P) = a (M, K) @ b (K, P) on NumPy: MKL's GEMM or np.matmul (see _gemm_lib)."""
    lib = _gemm_lib()
    return lib.matmul(a, b, out) if lib is not None else np.matmul(a, b, out=out)


def _bmm(mkl, a, b, out):
    """out = a @ b for stacks of matrices (a (P, Q, M, K), b (P, Q, K, N)): through MKL's batched
    GEMM when ``mkl`` is mkl_blas, else the arrays' own matmul."""
    return mkl.bmm(a, b, out) if mkl is not None else get_array_module(a).matmul(a, b, out=out)


def _numpy(*arrays) -> bool:
    return all(type(a) is np.ndarray for a in arrays)


def _matmul_rows(a, b, bias=None):
    """a (M, K) @ b (K, P) (+ bias (P,), added in place), the rows of a shared among the threads."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))

    def part(s):
        _matmul(a[s], b, out[s])
        if bias is not None:
            out[s] += bias

    parallel_for(part, _parts(a.shape[0], a.shape[1] * b.shape[1]))
    return out


def _two_products(a, b, p, q, db_of=None):
    """The two products of a matrix product's backward, at once, each on half the threads:
    (a @ b, p^T @ q) with a (N, I), b (I, J), p (N, R), q (N, S) -> (N, J), (R, S); the first
    by rows of a, the second by its own rows (p[:, s]^T @ q). ``db_of`` (N, S): also its column
    sums (the bias gradient), by columns. Returns (a @ b, p^T @ q, sums or None)."""
    N = a.shape[0]
    dt = np.result_type(a, b, p, q)
    first = np.empty((N, b.shape[1]), dtype=dt)
    second = np.empty((p.shape[1], q.shape[1]), dtype=dt)
    sums = None if db_of is None else np.empty(db_of.shape[1], dtype=dt)
    half = _half_threads()  # both products cost N I J = N R S multiply-adds
    tasks = [(0, s) for s in _parts(N, a.shape[1] * b.shape[1], threads=half)]
    tasks += [(1, s) for s in _parts(p.shape[1], N * q.shape[1], threads=half)]
    if db_of is not None:
        tasks += [(2, s) for s in _parts(db_of.shape[1], N, threads=half)]

    def part(task):
        which, s = task
        if which == 0:
            _matmul(a[s], b, first[s])
        elif which == 1:
            _matmul(p[:, s].T, q, second[s])
        else:
            np.sum(db_of[:, s], axis=0, out=sums[s])

    parallel_for(part, tasks)
    return first, second, sums


def linear_forward(x, w, b=None):
    """layers.linear_forward, the bias added in place; on NumPy the rows shared among the threads."""
    x2 = x.reshape(-1, w.shape[0])  # (N, Cin)
    if _numpy(x2, w):
        y = _matmul_rows(x2, w, bias=b)  # (N, Cout)
    else:
        y = x2 @ w  # (N, Cout)
        if b is not None:
            y += b
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)


def linear_backward(dy, cache):
    """layers.linear_backward; on NumPy dx by row parts, dw by parts of its rows (x[:, s]^T @ dy)
    and db by column parts, all on the pool at once."""
    x, w, has_bias = cache
    x2 = x.reshape(-1, w.shape[0])  # (N, Cin)
    dy2 = dy.reshape(-1, w.shape[1])  # (N, Cout)
    if not _numpy(x2, dy2, w):
        return layers.linear_backward(dy, cache)
    dx, dw, db = _two_products(dy2, w.T, x2, dy2, db_of=dy2 if has_bias else None)  # (N, Cin), (Cin, Cout)
    return dx.reshape(x.shape), {"w": dw, "b": db}


def unembed_forward(x, wte):
    """layers.unembed_forward; on NumPy the rows shared among the threads."""
    B, T, C = x.shape
    if not _numpy(x, wte):
        return layers.unembed_forward(x, wte)
    logits = _matmul_rows(x.reshape(B * T, C), wte.T)  # (N, V)
    return logits.reshape(B, T, wte.shape[0]), (x, wte)


def unembed_backward(dlogits, cache):
    """layers.unembed_backward; on NumPy dx by row parts and dwte by parts of its rows
    (dlogits[:, s]^T @ x), on the pool at once."""
    x, wte = cache
    if not _numpy(dlogits, x, wte):
        return layers.unembed_backward(dlogits, cache)
    B, T, C = x.shape
    dl2 = dlogits.reshape(B * T, wte.shape[0])  # (N, V)
    dx, dwte, _ = _two_products(dl2, wte, dl2, x.reshape(B * T, C))  # (N, C), (V, C)
    return dx.reshape(B, T, C), {"wte": dwte}


# ------------------------------------------------------------------------------------ layernorm


def _row_blocks(rows: slice, C: int) -> list[slice]:
    """The rows of one part cut into blocks of about _BLOCK elements (their temporaries stay in L2)."""
    nb = max(1, _BLOCK // max(1, C))
    return [slice(i, min(i + nb, rows.stop)) for i in range(rows.start, rows.stop, nb)]


def _layernorm_forward_rows(x2, w, b, eps, y, mean, rstd, rows):
    """y, mean, rstd of layers.layernorm_forward for ``rows`` of x2 (N, C), block by block."""
    C = x2.shape[1]
    t = x2.dtype.type
    for r in _row_blocks(rows, C):
        x_, y_, m_, s_ = x2[r], y[r], mean[r], rstd[r]  # (n, C), (n, C), (n, 1), (n, 1)
        np.einsum("nc->n", x_, out=m_[:, 0])
        m_ *= t(1.0 / C)
        np.subtract(x_, m_, out=y_)  # centred; becomes the output in place
        np.einsum("nc,nc->n", y_, y_, out=s_[:, 0])
        s_ *= t(1.0 / C)
        s_ += t(eps)
        np.sqrt(s_, out=s_)
        np.reciprocal(s_, out=s_)  # rstd
        y_ *= s_  # x_hat
        y_ *= w
        y_ += b


def layernorm_forward(x, w, b, eps=1e-5):
    """layers.layernorm_forward: row sums as einsum (one read, no (N, C) square), in place, in
    row blocks shared among the threads. CuPy: one fused kernel, one block per row."""
    C = x.shape[-1]
    xp = get_array_module(x)
    x2 = x.reshape(-1, C)  # (N, C)
    if kernels.use(x):
        y, mean, rstd = kernels.layernorm_forward(x2, w, b, eps)  # (N, C), (N, 1), (N, 1)
        return y.reshape(x.shape), (x, w, mean, rstd)
    if xp is np:
        N = x2.shape[0]
        y = np.empty((N, C), dtype=x.dtype)
        mean = np.empty((N, 1), dtype=x.dtype)
        rstd = np.empty((N, 1), dtype=x.dtype)
        ck = cpu_kernels(x2, w, b) if x2.flags.c_contiguous else None
        if ck:
            m1, r1 = mean.reshape(-1), rstd.reshape(-1)  # (N,) views
            parallel_for(lambda r: ck.layernorm_forward(x2[r], w, b, eps, y[r], m1[r], r1[r]), _parts(N, C))
        else:
            parallel_for(lambda r: _layernorm_forward_rows(x2, w, b, eps, y, mean, rstd, r), _parts(N, C))
        return y.reshape(x.shape), (x, w, mean, rstd)
    t = x.dtype.type
    mean = xp.einsum("nc->n", x2)[:, None]  # (N, 1)
    mean *= t(1.0 / C)
    y = x2 - mean  # (N, C) centred; becomes the output in place
    var = xp.einsum("nc,nc->n", y, y)[:, None]  # (N, 1)
    var *= t(1.0 / C)
    var += t(eps)
    rstd = xp.sqrt(var)
    xp.reciprocal(rstd, out=rstd)  # (N, 1)
    y *= rstd  # x_hat
    y *= w
    y += b
    return y.reshape(x.shape), (x, w, mean, rstd)


def _layernorm_dx_(g, xhat, rstd):
    """In place: g (n, C) = dy w on entry, dx = rstd (g - mean(g) - x_hat mean(g x_hat)) on exit;
    x_hat (n, C) is overwritten."""
    xp = get_array_module(g)
    t = g.dtype.type
    C = g.shape[1]
    m_g = xp.einsum("nc->n", g)[:, None]  # (n, 1)
    m_g *= t(1.0 / C)
    m_gx = xp.einsum("nc,nc->n", g, xhat)[:, None]  # (n, 1)
    m_gx *= t(1.0 / C)
    g -= m_g
    xhat *= m_gx
    g -= xhat
    g *= rstd


def _layernorm_backward_rows(dy2, x2, w, mean, rstd, dx, rows):
    """dx of layers.layernorm_backward for ``rows``, block by block."""
    C = x2.shape[1]
    for r in _row_blocks(rows, C):
        xhat = x2[r] - mean[r]  # (n, C)
        xhat *= rstd[r]
        np.multiply(dy2[r], w, out=dx[r])  # g = dy w
        _layernorm_dx_(dx[r], xhat, rstd[r])


def layernorm_backward(dy, cache):
    """layers.layernorm_backward: four einsum reductions, in place; dx in row blocks shared among
    the threads, dw and db over all rows at once.
    CuPy: dx by one kernel per row, dw by one reduction kernel."""
    x, w, mean, rstd = cache
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    dy2 = dy.reshape(-1, C)  # (N, C)
    mean, rstd = mean.reshape(-1, 1), rstd.reshape(-1, 1)  # (N, 1): a plain cache works too
    if kernels.use(dy):
        dx, dw, db = kernels.layernorm_backward(dy2, x2, w, mean, rstd)
        return dx.reshape(x.shape), {"w": dw, "b": db}
    xp = get_array_module(dy)
    ck = cpu_kernels(dy2, x2, w) if xp is np and dy2.flags.c_contiguous and x2.flags.c_contiguous else None
    if ck:
        N = x2.shape[0]
        dx = np.empty((N, C), dtype=dy.dtype)
        parts = _parts(N, C)
        m1 = np.ascontiguousarray(mean.reshape(-1))  # (N,)
        r1 = np.ascontiguousarray(rstd.reshape(-1))
        dws = np.zeros((len(parts), C), dtype=dy.dtype)  # one partial sum per part, added in order
        dbs = np.zeros((len(parts), C), dtype=dy.dtype)
        parallel_for(lambda i: ck.layernorm_backward(dy2[parts[i]], x2[parts[i]], w, m1[parts[i]], r1[parts[i]],
                                                     dx[parts[i]], dws[i], dbs[i]), range(len(parts)))
        return dx.reshape(x.shape), {"w": dws.sum(axis=0), "b": dbs.sum(axis=0)}
    if xp is np:
        N = x2.shape[0]
        dx = np.empty((N, C), dtype=dy.dtype)
        parallel_for(lambda r: _layernorm_backward_rows(dy2, x2, w, mean, rstd, dx, r), _parts(N, C))
        xhat = x2 - mean  # (N, C); dw and db as sums over all N rows at once: the numbers of the
        xhat *= rstd  # unblocked path (and of the CuPy path without kernels), bit for bit
        db = dy2.sum(axis=0)  # (C,)
        dw = np.einsum("nc,nc->c", dy2, xhat)  # (C,)
        return dx.reshape(x.shape), {"w": dw, "b": db}
    xhat = x2 - mean  # (N, C)
    xhat *= rstd
    db = dy2.sum(axis=0)  # (C,)
    dw = xp.einsum("nc,nc->c", dy2, xhat)  # (C,)
    g = dy2 * w  # (N, C)
    _layernorm_dx_(g, xhat, rstd)
    return g.reshape(x.shape), {"w": dw, "b": db}


# ------------------------------------------------------------------------------------ GELU

_BLOCK = 1 << 16  # elements: 256 KiB of float32 per operand, so a block's temporaries stay in L2
_GELU_K, _GELU_C = layers.GELU_K, layers.GELU_C


def _cache_blocks(n: int, xp):
    """Slices covering 0..n: a chain of elementwise passes run block by block reads the cache,
    not memory, after its first pass. On CuPy (the kernels' twin) one block."""
    if xp is not np or n <= _BLOCK:
        return [slice(0, n)]
    return [slice(i, min(i + _BLOCK, n)) for i in range(0, n, _BLOCK)]


def _flat_parts(n: int, xp) -> list[slice]:
    """The flat range 0..n cut into one part per thread, at block edges (NumPy only)."""
    if xp is not np:
        return [slice(0, n)]
    return _parts(n, 1, align=min(_BLOCK, max(1, n)))


def _gelu_forward_part(x_, y_, t):
    """y_ = GELU(x_) for flat views x_, y_, block by block."""
    xp = get_array_module(x_)
    for s in _cache_blocks(x_.size, xp):
        x, u = x_[s], y_[s]
        xp.multiply(x, x, out=u)  # x^2
        u *= t(_GELU_C)
        u += t(1.0)
        u *= x  # x + c x^3
        u *= t(_GELU_K)
        xp.tanh(u, out=u)  # tanh z
        u += t(1.0)
        u *= x
        u *= t(0.5)


def gelu_forward(x):
    """layers.gelu_forward, block by block, the blocks shared among the threads.
    CuPy: one fused elementwise kernel."""
    if kernels.use(x):
        return kernels.gelu_forward(x), x
    xp = get_array_module(x)
    t = x.dtype.type
    y = xp.empty(x.shape, dtype=x.dtype)
    xf, yf = x.reshape(-1), y.reshape(-1)  # flat views
    ck = cpu_kernels(x) if x.flags.c_contiguous else None
    if ck:
        parallel_for(lambda s: ck.gelu_forward(xf[s], yf[s]), _flat_parts(xf.size, xp))
        return y, x
    parallel_for(lambda s: _gelu_forward_part(xf[s], yf[s], t), _flat_parts(xf.size, xp))
    return y, x


def _gelu_backward_part(x_, dy_, dx_, t):
    """dx_ = GELU'(x_) dy_ for flat views, block by block."""
    xp = get_array_module(x_)
    for s in _cache_blocks(x_.size, xp):
        x, d = x_[s], dx_[s]
        th = x * x  # x^2
        xp.multiply(th, t(3.0 * _GELU_C * _GELU_K), out=d)
        d += t(_GELU_K)  # dz/dx = k (1 + 3 c x^2)
        th *= t(_GELU_C)
        th += t(1.0)
        th *= x
        th *= t(_GELU_K)
        xp.tanh(th, out=th)  # tanh z
        d *= x  # x dz/dx
        d -= d * th  # x dz/dx (1 - tanh z)
        d += t(1.0)
        th += t(1.0)
        d *= th
        d *= t(0.5)
        d *= dy_[s]


def gelu_backward(dy, cache):
    """layers.gelu_backward, block by block, the blocks shared among the threads, with
    dy/dx = 0.5 (1 + tanh z) (1 + x dz/dx (1 - tanh z)). CuPy: one fused elementwise kernel."""
    x = cache
    if kernels.use(x):
        return kernels.gelu_backward(dy, x), {}
    xp = get_array_module(x)
    t = x.dtype.type
    dx = xp.empty(x.shape, dtype=x.dtype)
    xf, dyf, dxf = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)  # flat views
    ck = cpu_kernels(dy, x) if x.flags.c_contiguous and dy.flags.c_contiguous and dy.dtype == x.dtype else None
    if ck:
        parallel_for(lambda s: ck.gelu_backward(dyf[s], xf[s], dxf[s]), _flat_parts(xf.size, xp))
        return dx, {}
    parallel_for(lambda s: _gelu_backward_part(xf[s], dyf[s], dxf[s], t), _flat_parts(xf.size, xp))
    return dx, {}


# ------------------------------------------------------------------------------------ attention

_BIAS_CACHE: dict = {}


def _device_key(xp):
    if xp.__name__ == "numpy":
        return ("numpy", 0)
    return (xp.__name__, xp.cuda.Device().id)  # pragma: no cover - needs a GPU


def attention_bias(xp, dtype, t_q, t_k, offset=0, key_mask=None):
    """layers.attention_bias; without a key mask built once per (device, dtype, shape, offset)
    and reused (read-only)."""
    if key_mask is not None:
        return layers.attention_bias(xp, dtype, t_q, t_k, offset, key_mask)
    key = (_device_key(xp), np.dtype(dtype).str, t_q, t_k, offset)
    bias = _BIAS_CACHE.get(key)
    if bias is None:
        if len(_BIAS_CACHE) > 256:
            _BIAS_CACHE.clear()
        bias = layers.attention_bias(xp, dtype, t_q, t_k, offset)
        if xp is np:
            bias.flags.writeable = False  # shared by every call
        _BIAS_CACHE[key] = bias
    return bias


def _softmax_lastaxis_(s):
    """In-place softmax over the last axis (max-subtracted)."""
    xp = get_array_module(s)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _biased_softmax_(att, bias):
    """att += bias; softmax over the last axis; in place. att (..., nq, L), bias None or
    broadcastable to att. On NumPy with a contiguous att and a bias of at most 2 dims, in blocks
    of whole (nq, L) matrices that fit in L2, so the five passes read the cache, not memory; every
    row is computed as unblocked, so the numbers are identical."""
    xp = get_array_module(att)
    if (xp is not np or not att.flags.c_contiguous or (bias is not None and bias.ndim > 2) or att.ndim < 2
            or att.size < _SOFTMAX_BLOCKED):
        if bias is not None:
            att += bias
        return _softmax_lastaxis_(att)
    nq, L = att.shape[-2:]
    mats = att.reshape(-1, nq, L)  # (M, nq, L) view
    m = max(1, _BLOCK // max(1, nq * L))  # matrices per block
    for i in range(0, mats.shape[0], m):
        a = mats[i:i + m]  # (m, nq, L)
        if bias is not None:
            a += bias
        a -= a.max(axis=-1, keepdims=True)
        np.exp(a, out=a)
        a /= a.sum(axis=-1, keepdims=True)  # (m, nq, 1): the same numbers as unblocked
    return att


def softmax(s):
    """layers.softmax, on a copy, in place."""
    return _softmax_lastaxis_(s.copy())


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """[(i0, i1), ...]: T queries cut into T // 64 blocks (1 to 4) of near-equal size (attention
    forward + backward, one thread, 32 rows x 6 heads: T 128 45 ms with 2 blocks against 56 with 1;
    T 256 155 ms with 4 against 160 with 2 and 168 with 8)."""
    n = max(1, min(4, T // 64))
    edges = [round(j * T / n) for j in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _batch_parts(B: int, work_per_row: int, xp) -> list[slice]:
    """Batch rows cut into one part per thread (NumPy); on CuPy one part."""
    return _parts(B, work_per_row) if xp is np else [slice(0, B)]


_MKL_ATTENTION_T = 256  # from this T on, attention's products go through MKL's batched GEMM (C1, T 256:
#                         160 against 167 ms forward + backward a layer at 1 thread; C0, T 64: 29 against
#                         15 ms a step at 2 threads, the small products faster through np.matmul)
_COPY_KV_T = 128  # from this T on, attention copies k and v (C1, T 256: -12 ms a layer forward +
#                   backward at 1 thread; C0, T 64: +0.8 ms, so not there)
_SOFTMAX_BLOCKED = 1 << 20  # elements: from this size on the masked softmax runs in L2-sized blocks


def attention_forward(qkv, n_head, attention_mask=None, *, bias=None):
    """layers.attention_forward with the causal skip: the queries i0..i1-1 of each block of
    :func:`_query_blocks` are scored against keys 0..i1-1 only (the later keys are masked for all
    of them). The batch rows are shared among the threads. CuPy: the scaled, masked softmax as one
    kernel pass.

    Cache: (qs, k, v, atts, y) with qs = q / sqrt(D), atts each block's (B, H, i1 - i0, i1)
    softmax and y the output, referenced.
    """
    checks.qkv(qkv, n_head)
    xp = get_array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = qkv.dtype.type(1.0 / math.sqrt(D))
    q, k_view, v_view = layers._split_heads(qkv, n_head)  # (B, H, T, D) views
    qs = xp.empty(q.shape, dtype=qkv.dtype)  # (B, H, T, D) = q / sqrt(D), filled per part
    copy_kv = T >= _COPY_KV_T  # (B, H, T, D) contiguous copies of k and v, filled per part: the
    k = xp.empty(q.shape, dtype=qkv.dtype) if copy_kv else k_view  # batched matmuls run faster
    v = xp.empty(q.shape, dtype=qkv.dtype) if copy_kv else v_view  # on them, and qkv is freed
    fused = bias is None and attention_mask is None and kernels.use(qkv)
    ck = cpu_kernels(qkv) if bias is None and attention_mask is None else None  # causal only
    if bias is None and not (fused or ck):
        bias = attention_bias(xp, qkv.dtype, T, T, 0, attention_mask)  # (T, T) or (B, 1, T, T)
    yh = xp.empty((B, T, n_head, D), dtype=qkv.dtype)  # heads side by side
    blocks = _query_blocks(T)
    atts = [xp.empty((B, n_head, i1 - i0, i1), dtype=qkv.dtype) for i0, i1 in blocks]
    mkl = _gemm_lib() if xp is np and T >= _MKL_ATTENTION_T else None  # MKL's batched GEMM

    def part(bs):
        xp.multiply(q[bs], scale, out=qs[bs])
        if copy_kv:
            k[bs] = k_view[bs]
            v[bs] = v_view[bs]
        bias_b = bias if bias is None or bias.ndim < 4 or bias.shape[0] == 1 else bias[bs]
        for (i0, i1), att_full in zip(blocks, atts):
            att = att_full[bs]  # (b, H, i1 - i0, i1)
            kt = k[bs, :, :i1].transpose(0, 1, 3, 2)  # (b, H, D, i1)
            if fused:
                xp.matmul(q[bs, :, i0:i1], kt, out=att)  # unscaled
                kernels.causal_softmax_(att, 1.0 / math.sqrt(D))
            elif ck:  # query i0 + r sees keys 0..i0 + r
                _bmm(mkl, qs[bs, :, i0:i1], kt, att)
                ck.causal_softmax_(att.reshape(-1, i1 - i0, i1), 1.0, i0)
            else:
                _bmm(mkl, qs[bs, :, i0:i1], kt, att)
                _biased_softmax_(att, bias_b[..., i0:i1, :i1])
            if mkl is not None:  # straight into the heads-side-by-side output
                mkl.bmm(att, v[bs, :, :i1], yh[bs, i0:i1].transpose(0, 2, 1, 3))
            else:
                yh[bs, i0:i1] = (att @ v[bs, :, :i1]).transpose(0, 2, 1, 3)  # (b, i1 - i0, H, D)

    parallel_for(part, _batch_parts(B, n_head * T * T, xp))
    y = yh.reshape(B, T, C)
    return y, (qs, k, v, atts, y)


def attention_backward(dy, cache):
    """layers.attention_backward, block by block as the forward: a block reaches keys 0..i1-1,
    so their dk and dv sum the blocks that see them. The softmax's row sum is taken on the
    (T, D) side, sum_j datt_ij att_ij = dy_i . y_i. The batch rows are shared among the threads.
    CuPy: ds = att (datt - delta) in one pass."""
    qs, k, v, atts, y = cache
    xp = get_array_module(dy)
    B, H, T, D = qs.shape
    C = H * D
    scale = dy.dtype.type(1.0 / math.sqrt(D))
    dqkv = xp.empty((B, T, 3, H, D), dtype=dy.dtype)
    d = dqkv.transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D) view: dq, dk, dv
    blocks = _query_blocks(T)
    mkl = _gemm_lib() if xp is np and T >= _MKL_ATTENTION_T else None  # MKL: dq, dk, dv written or added

    def part(bs):
        dyb = dy[bs]  # (b, T, C)
        b = dyb.shape[0]
        dyh = dyb.reshape(b, T, H, D).transpose(0, 2, 1, 3)  # (b, H, T, D)
        delta = (dyb * y[bs]).reshape(b, T, H, D).sum(axis=-1)  # (b, T, H)
        delta = delta.transpose(0, 2, 1)[..., None]  # (b, H, T, 1)
        ck = cpu_kernels(dyb, atts[0])
        for (i0, i1), att_full in reversed(list(zip(blocks, atts))):  # the last block sees every key
            att = att_full[bs]  # (b, H, nq, i1)
            dy_b = dyh[:, :, i0:i1]  # (b, H, nq, D)
            first = i1 == T  # the first block here: dk, dv written; the others add theirs
            if mkl is not None:
                mkl.bmm(att.transpose(0, 1, 3, 2), dy_b, d[2][bs, :, :i1], beta=0.0 if first else 1.0)  # dv
                ds = mkl.bmm(dy_b, v[bs, :, :i1].transpose(0, 1, 3, 2), np.empty(att.shape, dtype=dy.dtype))
            else:
                dv = att.transpose(0, 1, 3, 2) @ dy_b  # (b, H, i1, D)
                ds = dy_b @ v[bs, :, :i1].transpose(0, 1, 3, 2)  # datt (b, H, nq, i1)
            if kernels.use(ds):
                kernels.softmax_backward_(ds, att, delta[:, :, i0:i1])
            elif ck and ds.flags.c_contiguous and att.flags.c_contiguous:
                nq = i1 - i0
                ck.softmax_backward_(ds.reshape(-1, nq, i1), att.reshape(-1, nq, i1),
                                     np.ascontiguousarray(delta[:, :, i0:i1, 0]).reshape(-1, nq))
            else:
                ds -= delta[:, :, i0:i1]
                ds *= att
            if mkl is not None:
                mkl.bmm(ds.transpose(0, 1, 3, 2), qs[bs, :, i0:i1], d[1][bs, :, :i1], beta=0.0 if first else 1.0)
                mkl.bmm(ds, k[bs, :, :i1], d[0][bs, :, i0:i1], alpha=float(scale))  # dq
                continue
            dk = ds.transpose(0, 1, 3, 2) @ qs[bs, :, i0:i1]  # (b, H, i1, D)
            if first:
                d[2][bs], d[1][bs] = dv, dk
            else:
                d[2][bs, :, :i1] += dv
                d[1][bs, :, :i1] += dk
            dq = ds @ k[bs, :, :i1]  # (b, H, nq, D)
            dq *= scale
            d[0][bs, :, i0:i1] = dq

    parallel_for(part, _batch_parts(B, H * T * T, xp))
    return dqkv.reshape(B, T, 3 * C), {}


def attention_forward_kv(qkv, n_head, k_cache, v_cache, start, key_mask=None, *, bias=None):
    """layers.attention_forward_kv, the scale applied to q; without padding with the causal skip
    and, on CuPy, the fused causal softmax."""
    checks.qkv(qkv, n_head)
    xp = get_array_module(qkv)
    B, Tn, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    L = start + Tn
    q, k, v = layers._split_heads(qkv, n_head)  # (B, H, Tn, D) views
    k_cache[:, :, start:L] = k
    v_cache[:, :, start:L] = v
    qs = q * qkv.dtype.type(1.0 / math.sqrt(D))  # (B, H, Tn, D)
    if bias is not None or key_mask is not None:  # padding: one (B, H, Tn, L) softmax
        att = qs @ k_cache[:, :, :L].transpose(0, 1, 3, 2)  # (B, H, Tn, L)
        att += attention_bias(xp, qkv.dtype, Tn, L, start, key_mask) if bias is None else bias
        _softmax_lastaxis_(att)
        return (att @ v_cache[:, :, :L]).transpose(0, 2, 1, 3).reshape(B, Tn, C)  # (B, Tn, C)
    yh = xp.empty((B, Tn, n_head, D), dtype=qkv.dtype)
    ck = cpu_kernels(qkv)
    mkl = _gemm_lib() if xp is np and start + Tn >= _MKL_ATTENTION_T else None  # MKL's batched GEMM

    def part(bs):  # query i (position start + i) sees keys 0 .. start + i
        for i0, i1 in _query_blocks(Tn):
            kt = k_cache[bs, :, : start + i1].transpose(0, 1, 3, 2)  # (b, H, D, start + i1)
            if kernels.use(qkv):
                att = q[bs, :, i0:i1] @ kt  # (b, H, i1 - i0, start + i1) unscaled
                kernels.causal_softmax_(att, 1.0 / math.sqrt(D))
            elif ck:
                att = np.empty((qs[bs].shape[0], n_head, i1 - i0, start + i1), dtype=qkv.dtype)
                _bmm(mkl, qs[bs, :, i0:i1], kt, att)  # (b, H, i1 - i0, start + i1)
                ck.causal_softmax_(att.reshape(-1, i1 - i0, start + i1), 1.0, start + i0)
            else:
                att = qs[bs, :, i0:i1] @ kt
                if i1 - i0 > 1:  # one query sees every key before it: no bias
                    att += attention_bias(xp, qkv.dtype, i1 - i0, start + i1, start + i0)
                _softmax_lastaxis_(att)
            if mkl is not None:
                mkl.bmm(att, v_cache[bs, :, : start + i1], yh[bs, i0:i1].transpose(0, 2, 1, 3))
            else:
                yh[bs, i0:i1] = (att @ v_cache[bs, :, : start + i1]).transpose(0, 2, 1, 3)

    parallel_for(part, _batch_parts(B, n_head * Tn * L, xp))  # the batch rows shared among the threads
    return yh.reshape(B, Tn, C)  # (B, Tn, C)


# ------------------------------------------------------------------------------------ log pi(y|x)

_PIECE = 1 << 18  # elements (1 MiB of float32) per piece of the (B, T-1, V) loops


def _row_pieces(B: int, rows: int, V: int, xp):
    """(batch slice, row slice) pieces of about _PIECE elements covering the (B, rows, V)
    scoring rows: several batch rows, or some positions of one. On CuPy: the whole array."""
    if xp is not np or B * rows * V <= _PIECE:
        return [(slice(None), slice(None))]
    if rows * V <= _PIECE:
        nb = _PIECE // (rows * V)
        return [(slice(b, b + nb), slice(None)) for b in range(0, B, nb)]
    nt = max(1, _PIECE // V)
    return [(slice(b, b + 1), slice(t, t + nt)) for b in range(B) for t in range(0, rows, nt)]


def _token_logps(logits, safe_labels):
    """lp = logits[label] - lse and lse, each (B, T-1), for the scoring rows 0..T-2, without a
    (B, T-1, V) temporary. CuPy: one fused kernel, one read of each row."""
    if kernels.use(logits):
        return kernels.logsoftmax_gather(logits, safe_labels)
    xp = get_array_module(logits)
    B, T, V = logits.shape
    ck = cpu_kernels(logits) if logits.flags.c_contiguous and V else None
    if ck:
        lp = np.empty((B, T - 1), dtype=logits.dtype)
        lse = np.empty((B, T - 1), dtype=logits.dtype)
        labels = np.ascontiguousarray(safe_labels, dtype=np.int64)  # (B, T-1)
        parallel_for(lambda bs: ck.logsoftmax_gather(logits, labels, lp, lse, bs.start, bs.stop), _parts(B, T * V))
        return lp, lse
    scoring = logits[:, :-1]  # (B, T-1, V) view
    lse = xp.empty((B, T - 1), dtype=logits.dtype)

    def piece(p):
        bs, ts = p
        lse[bs, ts] = logsumexp(scoring[bs, ts], axis=-1)

    parallel_for(piece, _row_pieces(B, T - 1, V, xp))  # the pieces shared among the threads
    picked = scoring[xp.arange(B)[:, None], xp.arange(T - 1)[None, :], safe_labels]  # (B, T-1)
    return picked - lse, lse


def sequence_logps(logits, labels, loss_mask, average: bool = False, *, validate: bool = True,
                   allow_empty: bool = False):
    """logprobs.sequence_logps, the log-softmax in cache-sized pieces (see :func:`_token_logps`)."""
    checks.sequence_logps_args(logits, labels, loss_mask, validate=validate, allow_empty=allow_empty)
    xp = get_array_module(logits, labels, loss_mask)
    V = logits.shape[-1]
    dt = logits.dtype
    mask = loss_mask[:, 1:]  # (B, T-1)
    mask = mask if mask.dtype == np.bool_ else (mask != 0)
    counts = xp.sum(mask, axis=1, dtype=xp.int64)  # (B,)
    safe = xp.where(mask, labels[:, 1:], 0)  # (B, T-1)
    if not validate:
        safe = xp.clip(safe, 0, V - 1)
    lp, lse = _token_logps(logits, safe)  # (B, T-1), (B, T-1)
    weights = mask.astype(dt)  # (B, T-1)
    if average:
        weights /= xp.maximum(counts, 1).astype(dt)[:, None]
    logps = xp.sum(xp.where(mask, lp, dt.type(0)) * weights, axis=1)  # (B,)
    return logps, {"logits": logits, "labels": safe, "lse": lse, "weights": weights, "token_counts": counts}


def sequence_logps_backward(dlogps, cache, *, overwrite_logits: bool = False):
    """logprobs.sequence_logps_backward writing one (B, T, V) array, piece by piece: the softmax
    exp(logits - lse) into it, the one-hot subtracted in place, the row scale applied in place.
    ``overwrite_logits``: that array is the forward's logits (destroyed; call once per cache).
    CuPy: the (B, T, V) array written in one kernel pass."""
    logits = cache["logits"]
    xp = get_array_module(logits)
    B, T, V = logits.shape
    dt = logits.dtype
    checks.dlogps(dlogps, B)
    g = xp.asarray(dlogps).astype(dt, copy=False)[:, None] * cache["weights"]  # (B, T-1)
    if kernels.use(logits) and logits.flags.c_contiguous:
        return kernels.logsoftmax_gather_backward(logits, cache["lse"], cache["labels"], g,
                                                  out=logits if overwrite_logits else None)
    if overwrite_logits:
        if xp is np and not logits.flags.writeable:
            raise ValueError("overwrite_logits=True needs writable logits, got a read-only array")
        dlogits = logits  # (B, T, V) the forward's buffer, reused
    else:
        dlogits = xp.empty_like(logits)
    lse, labels = cache["lse"], cache["labels"]
    ck = cpu_kernels(logits, lse, g) if dlogits.flags.c_contiguous and V else None
    if ck:
        if dlogits is not logits:
            np.copyto(dlogits, logits)  # the kernel works in place
        lse_c, g_c = np.ascontiguousarray(lse, dtype=dt), np.ascontiguousarray(g, dtype=dt)  # (B, T-1)
        lab = np.ascontiguousarray(labels, dtype=np.int64)
        parallel_for(lambda bs: ck.logsoftmax_gather_backward_(dlogits, lse_c, lab, g_c, bs.start, bs.stop),
                     _parts(B, T * V))
        return dlogits

    def piece(p):
        bs, ts = p
        body = dlogits[:, :-1][bs, ts]  # (b, t, V) view
        xp.subtract(logits[:, :-1][bs, ts], lse[bs, ts][:, :, None], out=body)  # log p
        xp.exp(body, out=body)  # p
        nb, nt = body.shape[:2]
        body[xp.arange(nb)[:, None], xp.arange(nt)[None, :], labels[bs, ts]] -= dt.type(1)  # p - onehot
        body *= (-g[bs, ts])[:, :, None]  # g (onehot - p)

    parallel_for(piece, _row_pieces(B, T - 1, V, xp))  # the pieces shared among the threads
    dlogits[:, -1] = 0
    return dlogits


# ------------------------------------------------------------------------------------ the two namespaces

_NAMES = [*layers.__all__, "logsumexp", "log_softmax", "log_softmax_backward", "sequence_logps",
          "sequence_logps_backward"]
PLAIN = SimpleNamespace(name="plain", **{n: getattr(layers, n, None) or getattr(logprobs, n) for n in _NAMES})
"""The plain reference: layers.py and logprobs.py."""
FAST = SimpleNamespace(name="fast", **{n: globals()[n] for n in _NAMES})
"""This module's functions (the default)."""
