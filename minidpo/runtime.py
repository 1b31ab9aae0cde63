"""The fast path's process settings, apart from its math: threads, memory, compiled-code loaders.

None of this changes a number the model computes (beyond the order of a sum over a thread's
part); it decides where and how fast fast.py's functions run:

    threads    set_threads / use_threads (a run's thread count: the pool's, with the BLAS on one
               thread), parallel_for (items on the calling thread and the pool's workers), parts,
               flat_parts and cache_blocks (how a pass is cut among threads and into cache-sized
               blocks)
    memory     keep_freed_memory (glibc's mallopt), set_hugepage_advice (NumPy's madvise),
               cpu_defaults (both, and the threads, for a training or benchmark run)
    loaders    cpu_kernels (the Numba kernels of cpu_kernels.py: loaded once, on first use, and
               whether they should run on given arrays), gemm_lib (MKL's GEMM, mkl_blas.py, where
               its one-time calibration measured it faster), set_gemm / gemm_choice,
               set_cpu_kernels / no_cpu_kernels (``MINIDPO_CPU_KERNELS=0``: NumPy passes only)

NumPy's ufuncs, reductions and BLAS calls release the GIL, so a long elementwise pass cut into
row blocks runs on several cores from a small pool of Python threads. Each part writes its own
rows of a preallocated output; reductions over rows add per-part partial sums in a fixed order,
so a given thread count always gives the same numbers. CuPy arrays never go through the pool.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import layers

__all__ = [
    "set_threads", "get_threads", "default_threads", "use_threads", "parallel_for", "parts", "half_threads",
    "flat_parts", "cache_blocks", "BLOCK", "MIN_PAR", "cpu_defaults", "hugepage_advice", "set_hugepage_advice",
    "keep_freed_memory", "cpu_kernels", "cpu_name", "machine", "set_cpu_kernels", "no_cpu_kernels", "gemm_lib", "gemm_choice",
    "set_gemm", "describe_cpu_path", "calibration_path", "gemm_machine_key", "GEMM_CHOICES", "GEMM_MARGIN",
]

# ------------------------------------------------------------------------------------ threads

_THREADS: int | None = None  # None: default_threads()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
MIN_PAR = 1 << 18  # elements: a part smaller than this is not worth a thread hand-off (~90 us on
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
    - the GEMM library decided now (:func:`gemm_lib`: a first run on this machine calibrates);
    - NumPy's transparent-hugepage advice off, unless NUMPY_MADVISE_HUGEPAGE is set. Every step
      allocates fresh activation arrays; on a VM a hugepage fault may first compact memory, and
      C1's step (bench/README.md) took 12.0 s with the advice and 8.8 s without (1 thread);
    - freed memory kept for reuse (:func:`keep_freed_memory`), unless MINIDPO_KEEP_MEMORY=0.
    """
    set_threads(threads)
    gemm_lib()  # a first run's GEMM calibration now, not inside a timed step or a thread's part
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


# ------------------------------------------------------------------------------------ compiled CPU kernels

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


def half_threads() -> int:
    """Threads for each of two equal halves of a pass (at least 1)."""
    return max(1, get_threads() // 2)


def parts(n: int, row_size: int = 1, align: int = 1, threads: int | None = None) -> list[slice]:
    """Contiguous slices covering rows 0..n, one per thread (``threads``, default all; fewer when a
    part would hold under MIN_PAR elements), each starting at a multiple of ``align`` rows."""
    k = max(1, min(get_threads() if threads is None else threads, (n * row_size) // MIN_PAR, n))
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


# ------------------------------------------------------------------------------------ matrix products

# On NumPy the fast path does its own matrix products: through MKL's GEMM where the opt-in ``mkl``
# extra is installed and MKL measures faster than NumPy's BLAS on this machine (mkl_blas.py: 10-16%
# faster than OpenBLAS on the model's shapes on the Xeon here, 0-15% slower on an AMD EPYC), else
# np.matmul; with several threads each product is shared among them, each part one GEMM on its own
# rows (or its own rows of dw), the BLAS on one thread (see use_threads), so that no BLAS worker
# spins on a core the pool's thread wants.
#
# Which library: MINIDPO_GEMM=auto (the default) times both once on this machine
# (mkl_blas.calibrate, about a second) and caches the verdict in gemm-calibration.json beside
# Numba's cache of the compiled kernels (see calibration_path), keyed by the CPU, NumPy, its BLAS
# and MKL's version, so a changed install calibrates again; MINIDPO_GEMM=mkl or =numpy decides
# without timing. MKL must be faster by more than GEMM_MARGIN: within the timing noise NumPy stays.

GEMM_CHOICES = ("auto", "mkl", "numpy")
GEMM_MARGIN = 0.97  # MKL only when its total time is under 97% of NumPy's on the calibration shapes
_GEMM = os.environ.get("MINIDPO_GEMM", "auto")
_MKL = None  # the mkl_blas module when it does the products; False: np.matmul
_GEMM_RECORD: dict | None = None  # how that was decided (gemm_choice)
_GEMM_LOCK = threading.Lock()


def set_gemm(choice: str) -> str:
    """Which library multiplies on the CPU fast path: "auto" (MKL where it loads and its
    calibration measured it faster), "mkl" (MKL where it loads) or "numpy". Returns the previous
    choice; the next product decides again."""
    global _GEMM, _MKL, _GEMM_RECORD
    if choice not in GEMM_CHOICES:
        raise ValueError(f"the GEMM choice must be one of {', '.join(GEMM_CHOICES)}, got {choice!r}")
    with _GEMM_LOCK:
        old, _GEMM, _MKL, _GEMM_RECORD = _GEMM, choice, None, None
    return old


def calibration_path() -> str:
    """Where the GEMM calibration is cached: $NUMBA_CACHE_DIR when set (Numba keeps the compiled
    kernels there), else minidpo's own __pycache__ (where Numba caches them by default), else
    ~/.cache/minidpo when the package folder is read-only."""
    name = "gemm-calibration.json"
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.path.join(os.environ["NUMBA_CACHE_DIR"], name)
    here = os.path.dirname(os.path.abspath(__file__))
    pycache = os.path.join(here, "__pycache__")
    if os.access(pycache if os.path.isdir(pycache) else here, os.W_OK):
        return os.path.join(pycache, name)
    return os.path.join(os.path.expanduser("~"), ".cache", "minidpo", name)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's, else the platform's), for records beside measured times."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """'<CPU model>, <n> logical cores': the machine a measured time or result came from."""
    return f"{cpu_name()}, {os.cpu_count()} logical cores"


def gemm_machine_key() -> dict:
    """What a calibration holds for: the CPU, NumPy's version and BLAS, MKL's version."""
    from threadpoolctl import threadpool_info

    from . import mkl_blas

    blas = sorted(f"{i.get('internal_api')} {i.get('version')}" for i in threadpool_info() if i.get("user_api") == "blas")
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "numpy": np.__version__, "blas": blas, "mkl": mkl_blas.version()}


def _read_calibration(path: str, key: dict) -> dict | None:
    import json

    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    ok = (isinstance(rec, dict) and rec.get("key") == key and isinstance(rec.get("mkl_s"), list)
          and isinstance(rec.get("numpy_s"), list) and len(rec["mkl_s"]) == len(rec["numpy_s"]) > 0)
    return rec if ok else None


def _write_calibration(path: str, rec: dict) -> None:
    """Atomically (a temporary file renamed over it); a folder that cannot be written is skipped:
    the next run calibrates again."""
    import json
    import tempfile

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".gemm-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def _decide_gemm():
    """(mkl_blas or False, record) by the current choice; the record says why."""
    from threadpoolctl import threadpool_limits

    from . import mkl_blas

    if _GEMM not in GEMM_CHOICES:
        raise ValueError(f"MINIDPO_GEMM must be one of {', '.join(GEMM_CHOICES)}, got {_GEMM!r}")
    if _GEMM == "numpy":
        return False, {"gemm": "numpy", "why": "MINIDPO_GEMM=numpy"}
    if mkl_blas.load() is None:
        return False, {"gemm": "numpy", "why": "MKL is not installed (pip install minidpo[mkl])"}
    if _GEMM == "mkl":
        return mkl_blas, {"gemm": "mkl", "why": "MINIDPO_GEMM=mkl"}
    key = gemm_machine_key()
    path = calibration_path()
    rec = _read_calibration(path, key)
    cached = rec is not None
    if not cached:
        with threadpool_limits(limits=1, user_api="blas"):  # as the fast path runs them
            rec = dict(mkl_blas.calibrate(), key=key)
        _write_calibration(path, rec)
    ratio = sum(rec["mkl_s"]) / sum(rec["numpy_s"])
    use = ratio < GEMM_MARGIN
    why = (f"calibrated on this machine: MKL takes {ratio:.3f}x NumPy's time on the model's shapes "
           f"({'under' if use else 'not under'} {GEMM_MARGIN})")  # the same words from the cache
    return (mkl_blas if use else False), {"gemm": "mkl" if use else "numpy", "why": why, "mkl_over_numpy": ratio,
                                          "cached": cached, "path": path}


def gemm_lib():
    """mkl_blas when MKL's GEMM should do the products (the CPU kernels are on, the ``mkl``
    package loads and the choice, by default its calibration, says so), else None (np.matmul).
    Decided once (thread-safe); :func:`set_gemm` decides again."""
    global _MKL, _GEMM_RECORD
    if not _CPU_KERNELS:
        return None
    if _MKL is None:
        with _GEMM_LOCK:
            if _MKL is None:
                _MKL, _GEMM_RECORD = _decide_gemm()
    return _MKL or None


def gemm_choice() -> dict:
    """How the CPU fast path multiplies, and why: {"gemm": "mkl" | "numpy", "why": ..., and for a
    calibration "mkl_over_numpy" (time ratio), "cached", "path"}."""
    if not _CPU_KERNELS:
        return {"gemm": "numpy", "why": "the compiled CPU kernels are off (MINIDPO_CPU_KERNELS=0)"}
    gemm_lib()
    return dict(_GEMM_RECORD)


def describe_cpu_path() -> str:
    """One line: what the CPU fast path runs on here (compiled kernels or NumPy passes, and which
    library multiplies), for a run's log and summary."""
    kernels = "compiled CPU kernels" if cpu_kernels() is not None else "NumPy passes (no compiled CPU kernels)"
    g = gemm_choice()
    return f"{kernels}; matrix products by {'MKL' if g['gemm'] == 'mkl' else 'NumPy'} ({g['why']})"


# ------------------------------------------------------------------------------------ blocks

BLOCK = 1 << 16  # elements: 256 KiB of float32 per operand, so a block's temporaries stay in L2


def cache_blocks(n: int, xp):
    """Slices covering 0..n: a chain of elementwise passes run block by block reads the cache,
    not memory, after its first pass. On CuPy (the kernels' twin) one block."""
    if xp is not np or n <= BLOCK:
        return [slice(0, n)]
    return [slice(i, min(i + BLOCK, n)) for i in range(0, n, BLOCK)]


def flat_parts(n: int, xp) -> list[slice]:
    """The flat range 0..n cut into one part per thread, at block edges (NumPy only)."""
    if xp is not np:
        return [slice(0, n)]
    return parts(n, 1, align=min(BLOCK, max(1, n)))
