"""Data parallelism: K processes (ranks), each with a full copy of the model, split every
global batch; one all-reduce of the gradients a step keeps the copies identical.

Launch ``mpiexec -n K minidpo sft|dpo ...`` (CPU: K NumPy processes over MPI, via mpi4py) or
the same on GPUs (one device per rank, the gradient all-reduce on NCCL through
``cupy.cuda.nccl``, bootstrapped over MPI). Without a launcher, :class:`SingleProcess` has the
same interface and every collective is the identity, so the training loop has one code path.

The one piece of math: the loss of the global batch of B examples is a weighted SUM of the
shards' losses, so its gradient is the same weighted sum of the shards' gradients. Rank r holds
n_r examples (uneven shards allowed, sum_r n_r = B):

    DPO (eq. 7 is a mean over pairs):   L = (1/B) sum_i l_i = sum_r (n_r / B) * L_r
                                        L_r = the mean over rank r's pairs
    SFT (a per-token mean):             L = (sum_r S_r) / N = sum_r (N_r / N) * L_r
                                        S_r = -sum of rank r's response-token log-probs,
                                        N_r = its response tokens, N = sum_r N_r, L_r = S_r / N_r

so each rank scales its gradient (and its loss and metrics, which are means too) by its weight
w_r = n_r / B or N_r / N, and the all-reduce SUMS. The naive average (1/K) sum_r L_r is wrong
whenever the shards differ in size (uneven DPO shards) or in token count (SFT): every rank can
count N_r and N on the host from the global batch's items, so the right weights cost no
communication. With w_r in place, the reduced gradient equals the single-process gradient of the
global batch up to float32 summation order, and clipping and AdamW then run identically on
every rank (or, with ZeRO-1, each on its slice).

Shapes: P = number of parameter entries (all tensors, flattened and concatenated in the
params dict's order); the gradient buffer is (P + M,) with the M weighted loss/metric scalars
appended, so loss, metrics and gradients travel in ONE all-reduce. The only other collective of
a step is a one-integer all-reduce on the host: the Ctrl-C flag, so that every rank stops at the
same step (:meth:`SingleProcess.any`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import sys
import time
import traceback
from typing import Callable, Mapping, Sequence

import numpy as np

from . import kernels
from .backend import get_array_module
from .optim import AdamW, check_hparams, SCALAR_KEYS, adamw_update, default_decay_filter

__all__ = [
    "SingleProcess", "MPIComm", "NCCLComm", "from_environment", "launched_ranks",
    "shard_range", "local_shard", "all_reduce_step", "gather_concat", "gather_scatter", "make_optimizer", "ZeroAdamW",
    "abort_on_error", "on_rank0", "on_every_rank", "stop_interrupted",
]

_ABORT_GRACE_S = 20.0  # how long a rank waits for rank 0 to report an error every rank raised
_FORWARD_S = 1.0  # time for the launcher to forward the message before the abort tears the job down

# environment variables a launcher sets in every rank (MPICH/Hydra, Open MPI, Slurm's PMI)
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


# ---------------------------------------------------------------------------------------------
# communicators: one interface, three implementations
# ---------------------------------------------------------------------------------------------


class SingleProcess:
    """The communicator of one process: rank 0 of 1; every collective is the identity.

    Interface (shared by :class:`MPIComm` and :class:`NCCLComm`):
        rank, size, zero1 (ZeRO-1 optimizer wanted), device (None: as the caller chose);
        allreduce_sum(buf)           in place, a flat float array (NumPy, or CuPy on NCCL)
        allgather_chunks(buf)        in place: buf (size * c,), rank r's chunk buf[r c:(r+1) c] to all
        allgather_host(obj) -> list  one Python object from each rank, in rank order
        allreduce_host(x) -> array   sum of a small NumPy float64 array, on the host
        any(flag) -> bool            True on every rank if any rank passed True
        barrier(), abort(code)
    """

    rank = 0
    size = 1

    def __init__(self, zero1: bool = False):
        self.zero1 = bool(zero1)
        self.device = None
        self.step_buffer = _FlatBuffer()  # all_reduce_step's flat buffer, reused every step

    def allreduce_sum(self, buf):
        return buf

    def allgather_chunks(self, buf):
        return buf

    def allgather_host(self, obj) -> list:
        return [obj]

    def allreduce_host(self, x):
        return np.asarray(x, dtype=np.float64)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:  # pragma: no cover - exits the process
        sys.stderr.flush()
        os._exit(code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, zero1={self.zero1})"


class MPIComm(SingleProcess):
    """K CPU processes over MPI (mpi4py). Array collectives take NumPy buffers (no pickling)."""

    def __init__(self, mpi_comm=None, zero1: bool = False):
        super().__init__(zero1)
        from mpi4py import MPI  # the [mpi] extra; imported only when launched with K > 1

        self._MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allreduce_sum(self, buf):
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return buf

    def allgather_chunks(self, buf):
        self.comm.Allgather(self._MPI.IN_PLACE, buf)
        return buf

    def allgather_host(self, obj) -> list:
        return self.comm.allgather(obj)

    def allreduce_host(self, x):
        x = np.array(x, dtype=np.float64)  # a copy, reduced in place
        self.comm.Allreduce(self._MPI.IN_PLACE, x, op=self._MPI.SUM)
        return x

    def any(self, flag: bool) -> bool:
        f = np.array([1 if flag else 0], dtype=np.int32)
        self.comm.Allreduce(self._MPI.IN_PLACE, f, op=self._MPI.MAX)
        return bool(f[0])

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:  # pragma: no cover - exits every rank
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def _nccl_dtype(nccl, dtype) -> int:
    codes = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "float16": "NCCL_FLOAT16"}
    name = np.dtype(dtype).name
    if name not in codes:
        raise TypeError(f"NCCL collectives here take float16/32/64 buffers, got {name}")
    return getattr(nccl, codes[name])


class NCCLComm(MPIComm):
    """One GPU per rank: device buffers are reduced by NCCL (``cupy.cuda.nccl``); host objects
    (the stop flag, gathered evaluation numbers) still go over MPI, which also hands NCCL its
    unique id. Rank r uses device ``local_rank`` (ranks on one node fill its GPUs in order).

    ``nccl`` and ``cupy`` may be given (tests run this class's bookkeeping against stand-ins);
    by default both are imported here, lazily: the rest of minidpo never needs them."""

    def __init__(self, mpi_comm=None, zero1: bool = False, nccl=None, cupy=None, local_rank: int | None = None):
        super().__init__(mpi_comm, zero1)
        if cupy is None:
            import cupy
        if nccl is None:
            from cupy.cuda import nccl
        if not getattr(nccl, "available", True):
            raise RuntimeError("CuPy cannot load NCCL (cupy.cuda.nccl.available is False): install it, "
                               "e.g. pip install nvidia-nccl-cu12, for data parallelism on GPUs")
        self._cp, self._nccl = cupy, nccl
        if local_rank is None:
            local_rank = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED).Get_rank()
        self.local_rank = int(local_rank)
        self.device = f"cuda:{self.local_rank}"
        cupy.cuda.Device(self.local_rank).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _stream(self) -> int:
        return self._cp.cuda.get_current_stream().ptr

    def allreduce_sum(self, buf):
        if isinstance(buf, np.ndarray):
            return super().allreduce_sum(buf)
        # in place: send and receive buffers are the same device memory
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, _nccl_dtype(self._nccl, buf.dtype),
                                 self._nccl.NCCL_SUM, self._stream())
        return buf

    def allgather_chunks(self, buf):
        if isinstance(buf, np.ndarray):
            return super().allgather_chunks(buf)
        chunk = buf.size // self.size
        # NCCL's in-place all-gather: sendbuff = recvbuff + rank * chunk elements
        send = buf.data.ptr + self.rank * chunk * buf.itemsize
        self.nccl_comm.allGather(send, buf.data.ptr, chunk, _nccl_dtype(self._nccl, buf.dtype), self._stream())
        return buf


def launched_ranks(environ: Mapping[str, str] | None = None) -> int:
    """How many ranks the launcher (mpiexec/mpirun/srun) started, from its environment; 1 when
    this process was not started by one."""
    env = os.environ if environ is None else environ
    for var in _SIZE_VARS:
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return 1


def from_environment(device: str = "cpu", zero1: bool = False):
    """The communicator for this process: :class:`SingleProcess` when not launched by an MPI
    launcher (or launched with one rank, unless ZeRO-1 asks for MPI anyway), :class:`MPIComm` for
    CPU ranks, :class:`NCCLComm` for ``device`` "cuda" (one GPU per rank). A clear error if the
    launcher started several ranks but mpi4py is missing."""
    k = launched_ranks()
    if k <= 1:
        return SingleProcess(zero1=zero1)
    try:
        import mpi4py  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            f"launched as {k} ranks, but mpi4py is not installed: pip install -e '.[mpi]' "
            f"(or run without mpiexec)") from err
    if str(device).startswith("cuda"):
        if str(device) not in ("cuda", "cuda:0"):
            raise ValueError(f"with {k} ranks each rank takes its own GPU; pass --device cuda, not {device!r}")
        return NCCLComm(zero1=zero1)
    return MPIComm(zero1=zero1)


# ---------------------------------------------------------------------------------------------
# shards and the one all-reduce of a step
# ---------------------------------------------------------------------------------------------


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of n items: sizes differ by at most one
    (uneven shards when size does not divide n); concatenating the shards in rank order gives
    the n items in order."""
    return n * rank // size, n * (rank + 1) // size


def local_shard(idx: np.ndarray, comm, item_tokens: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """This rank's examples of the global batch ``idx`` (B,) and its weight w_r (module docstring).

    item_tokens: None for DPO (w_r = n_r / B), or (n_items,) int counts of each item's loss tokens
    for SFT (w_r = N_r / N, counted on the host from the global batch: no communication).
    Returns (local_idx (n_r,) int64, w_r float); (idx, 1.0) on one process."""
    idx = np.asarray(idx)
    if comm.size == 1:
        return idx, 1.0
    if len(idx) < comm.size:
        raise ValueError(f"the global batch has {len(idx)} examples but there are {comm.size} ranks: "
                         f"use a batch size of at least {comm.size}")
    lo, hi = shard_range(len(idx), comm.rank, comm.size)
    local = idx[lo:hi]
    if item_tokens is None:
        return local, len(local) / len(idx)
    n_all = int(np.asarray(item_tokens)[idx].sum())
    return local, int(np.asarray(item_tokens)[local].sum()) / max(n_all, 1)


class _FlatBuffer:
    """A reused flat (n,) buffer for the step's all-reduce (one per dtype and device)."""

    def __init__(self):
        self.buf = None

    def get(self, xp, n: int, dtype):
        b = self.buf
        if b is None or b.size != n or b.dtype != dtype or get_array_module(b) is not xp:
            self.buf = b = xp.empty((n,), dtype=dtype)
        return b


def all_reduce_step(comm, loss, metrics: dict, grads: dict, weight: float):
    """Weight this rank's loss, metrics and gradients by w_r and sum them over the ranks in ONE
    all-reduce of a flat buffer (P + 1 + len(metrics),), the module docstring's equation.

    ``grads`` is updated in place: its values become views of the reduced buffer (dL/dp of the
    global batch). Returns (loss, metrics) of the global batch as 0-d arrays on the device; no
    host sync. On :class:`SingleProcess` everything is returned unchanged (an MPI or NCCL
    communicator of one rank still packs and reduces: a check of that path on one device)."""
    if type(comm) is SingleProcess:
        return loss, metrics
    names, keys = list(grads), list(metrics)
    xp = get_array_module(loss)
    dtype = np.result_type(*[grads[k].dtype for k in names])
    sizes = [int(grads[k].size) for k in names]
    n_params = sum(sizes)
    flat = comm.step_buffer.get(xp, n_params + 1 + len(keys), dtype)
    w = float(weight)
    o = 0
    for k, n in zip(names, sizes):  # pack: flat[o:o+n] = w * g
        xp.multiply(grads[k].reshape(-1), w, out=flat[o : o + n])
        o += n
    for j, v in enumerate([loss] + [metrics[k] for k in keys]):
        flat[o + j] = v * w
    comm.allreduce_sum(flat)  # sum_r w_r * (g_r, L_r, metrics_r)
    o = 0
    for k, n in zip(names, sizes):  # unpack: views, no copy
        grads[k] = flat[o : o + n].reshape(grads[k].shape)
        o += n
    scal = flat[o:].copy()  # the scalars outlive the buffer's next use
    return scal[0].reshape(()), {k: scal[1 + j].reshape(()) for j, k in enumerate(keys)}


def gather_concat(comm, rows: np.ndarray) -> np.ndarray:
    """Every rank's host array of rows (its share, first axis = rows) concatenated in rank order,
    on every rank: the reference log-prob cache and held-out evaluation are computed in shares
    (shard_range) and gathered with this."""
    if comm.size == 1:
        return rows
    return np.concatenate([np.asarray(p) for p in comm.allgather_host(np.asarray(rows))])


def gather_scatter(comm, index: np.ndarray, values: np.ndarray, n: int, dtype) -> np.ndarray:
    """The (n,) host array whose entries ``index`` are ``values``, assembled from every rank's
    (index, values) (each entry set by exactly one rank), on every rank."""
    out = np.zeros(n, dtype=dtype)
    for idx, val in comm.allgather_host((np.asarray(index), np.asarray(values))):
        out[idx] = val
    return out


# ---------------------------------------------------------------------------------------------
# optimizers: AdamW everywhere, or ZeRO-1 (moments sharded)
# ---------------------------------------------------------------------------------------------


class RanksDisagreeError(ValueError):
    """Raised on every rank alike, from gathered values (so rank 0 alone reports it)."""

    same_on_every_rank = True


def check_same_params(comm, params: dict) -> None:
    """Data parallelism assumes every rank starts from the same parameters: compare per-tensor
    float64 sums across the ranks (once, at the start) and name the first tensor that differs."""
    if comm.size == 1:
        return
    sums = np.array([float(get_array_module(v).asarray(v, dtype=np.float64).sum()) for v in params.values()],
                    dtype=np.float64)
    everyone = comm.allgather_host(sums)
    for r, other in enumerate(everyone):
        diff = np.flatnonzero(other != everyone[0])
        if len(diff):
            raise RanksDisagreeError(f"rank {r}'s starting parameters differ from rank 0's (first: "
                             f"{list(params)[diff[0]]!r}); every rank must load or initialise the same model")


def make_optimizer(comm, params: dict, **kw):
    """AdamW (optim.py) on every rank, or :class:`ZeroAdamW` when ``comm.zero1``; first checks
    that every rank starts from the same parameters."""
    check_same_params(comm, params)
    if getattr(comm, "zero1", False):
        return ZeroAdamW(params, comm, **kw)
    return AdamW(params, **kw)


def _address(a) -> int:
    """The device or host address of an array's first element."""
    return int(a.__array_interface__["data"][0]) if isinstance(a, np.ndarray) else int(a.data.ptr)


class ZeroAdamW:
    """AdamW with its moments sharded across the ranks (ZeRO stage 1, Rajbhandari et al. 2020).

    The P parameter entries, flattened in the params dict's order and padded to K * c
    (c = ceil(P / K)), are cut into K equal chunks; rank r keeps m and v for chunk r only
    (2c floats instead of 2P) and applies update (A) of optim.py to that chunk. An in-place
    all-gather of the chunks then gives every rank all the updated parameters.

    To all-gather in place, the parameters are moved into one flat (K c,) buffer at
    construction: ``params[name]`` is REPLACED by a view of it (same values, shape, dtype). The
    gradients are the all-reduced global ones (every rank holds them, so global-norm clipping
    stays local); the update is elementwise, so it matches AdamW's bit for bit given the same
    gradients. ``state_dict`` gathers the full moments (a collective: every rank calls it) in
    AdamW's format, so checkpoints do not depend on the rank count.
    """

    def __init__(self, params: dict, comm, lr: float = 3e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay_filter=None):
        if not params:
            raise ValueError("AdamW needs at least one parameter")
        check_hparams(lr, betas, eps, weight_decay)
        self.comm = comm
        self.lr = float(lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        decay_filter = decay_filter or default_decay_filter
        self.t = 0
        first = next(iter(params.values()))
        xp = get_array_module(first)
        self.dtype = first.dtype
        self.names = list(params)
        self.shapes = {k: tuple(params[k].shape) for k in self.names}
        self.sizes = {k: int(params[k].size) for k in self.names}
        self.decay = {k: bool(decay_filter(k, params[k])) for k in self.names}
        for k in self.names:
            if params[k].dtype != self.dtype:
                raise TypeError(f"ZeRO-1 needs one parameter dtype; {k!r} is {params[k].dtype}, not {self.dtype}")
        self.n = sum(self.sizes.values())
        K = comm.size
        self.chunk = c = -(-self.n // K)
        self.lo, self.hi = min(comm.rank * c, self.n), min((comm.rank + 1) * c, self.n)
        # the parameters, moved into one flat buffer; params[k] become views of it
        self.flat = xp.zeros((K * c,), dtype=self.dtype)
        self.offsets = {}
        o = 0
        for k in self.names:
            n = self.sizes[k]
            self.flat[o : o + n] = params[k].reshape(-1)
            params[k] = self.flat[o : o + n].reshape(self.shapes[k])
            self.offsets[k] = o
            o += n
        self.m = xp.zeros((c,), dtype=self.dtype)  # this rank's chunk only (padding stays 0)
        self.v = xp.zeros((c,), dtype=self.dtype)
        # the tensors' pieces inside [lo, hi): (name, start, stop) in the tensor's flat index
        self.pieces = []
        for k in self.names:
            a, b = max(self.lo, self.offsets[k]), min(self.hi, self.offsets[k] + self.sizes[k])
            if a < b:
                self.pieces.append((k, a - self.offsets[k], b - self.offsets[k]))

    @property
    def step_count(self) -> int:
        return self.t

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (m and v chunks)."""
        return int(self.m.nbytes + self.v.nbytes)

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """Update (A) of optim.py on this rank's chunk, then all-gather the parameters."""
        if set(params) != set(self.names) or set(grads) != set(self.names):
            raise KeyError("ZeroAdamW.step: params/grads must have exactly the optimizer's names")
        base = _address(self.flat)
        for k in self.names:
            if _address(params[k]) != base + self.offsets[k] * self.flat.itemsize:
                raise ValueError(f"ZeroAdamW.step: params[{k!r}] is no longer a view of the optimizer's "
                                 f"flat buffer (was the dict's entry replaced?)")
        lr = self.lr if lr is None else float(lr)
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"lr must be finite and >= 0, got {lr}")
        self.t += 1
        b1, b2, eps, t = self.beta1, self.beta2, self.eps, self.t
        bc1 = 1.0 - b1**t
        sqrt_bc2 = math.sqrt(1.0 - b2**t)
        step_size = lr / bc1
        on_gpu = []
        for k, a, b in self.pieces:
            o = self.offsets[k] + a - self.lo  # the piece's place in this rank's moment chunk
            p = self.flat[self.offsets[k] + a : self.offsets[k] + b]  # a view: updated in place
            g = grads[k].reshape(-1)[a:b]
            m, v = self.m[o : o + b - a], self.v[o : o + b - a]
            if kernels.use(p):
                on_gpu.append((p, g, m, v, self.decay[k]))
                continue
            adamw_update(p, g, m, v, b1, b2, eps, step_size, sqrt_bc2,
                         lr * self.weight_decay if self.decay[k] else 0.0)
        if on_gpu:  # pragma: no cover - needs a GPU
            p_, g_, m_, v_, d_ = (list(z) for z in zip(*on_gpu))
            kernels.adamw_multi_tensor(p_, g_, m_, v_, d_, b1, b2, eps, step_size, sqrt_bc2, lr * self.weight_decay)
        self.comm.allgather_chunks(self.flat)  # every rank's updated chunk, to every rank

    def state_dict(self) -> dict:
        """AdamW.state_dict's format with the FULL moments (gathered: every rank must call it)."""
        xp = get_array_module(self.m)
        K, c = self.comm.size, self.chunk
        d: dict = {}
        for c_name, mine in (("m", self.m), ("v", self.v)):
            full = xp.zeros((K * c,), dtype=self.dtype)
            full[self.comm.rank * c : self.comm.rank * c + c] = mine
            self.comm.allgather_chunks(full)
            for k in self.names:
                o = self.offsets[k]
                d[f"{c_name}.{k}"] = full[o : o + self.sizes[k]].reshape(self.shapes[k])
        d.update(step=self.t, lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                 weight_decay=self.weight_decay)
        return d

    def load_state_dict(self, d: Mapping[str, object]) -> None:
        """Take this rank's chunk of full moments (a checkpoint written with any rank count)."""
        missing = [k for k in SCALAR_KEYS if k not in d]
        missing += [f"{c}.{n}" for n in self.names for c in ("m", "v") if f"{c}.{n}" not in d]
        if missing:
            raise KeyError(f"optimizer state is missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        check_hparams(d["lr"], (d["beta1"], d["beta2"]), d["eps"], d["weight_decay"])
        xp = get_array_module(self.m)
        for c_name, store in (("m", self.m), ("v", self.v)):
            for k, a, b in self.pieces:
                src = d[f"{c_name}.{k}"]
                if tuple(src.shape) != self.shapes[k]:
                    raise ValueError(f"optimizer state {c_name}.{k} has shape {tuple(src.shape)}, expected {self.shapes[k]}")
                o = self.offsets[k] + a - self.lo
                store[o : o + b - a] = xp.asarray(src, dtype=self.dtype).reshape(-1)[a:b]
        self.t = int(d["step"])
        self.lr = float(d["lr"])
        self.beta1, self.beta2 = float(d["beta1"]), float(d["beta2"])
        self.eps = float(d["eps"])
        self.weight_decay = float(d["weight_decay"])


# ---------------------------------------------------------------------------------------------
# failure: one rank's exception stops every rank
# ---------------------------------------------------------------------------------------------


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def stop_interrupted(comm) -> None:
    """End a job of K ranks after a Ctrl-C raised KeyboardInterrupt on this rank (mpiexec hands the
    signal to every rank): rank 0 says so once and MPI-aborts every rank with exit status 130;
    another rank waits for that, and ends the job itself (saying which rank) if rank 0 was not
    interrupted. Never returns."""
    if comm.rank > 0:
        time.sleep(_ABORT_GRACE_S)  # rank 0's abort, if it was interrupted too, ends this process here
        print(f"minidpo: rank {comm.rank} of {comm.size} interrupted; stopping all ranks", file=sys.stderr, flush=True)
    else:
        print(f"minidpo: interrupted (all {comm.size} ranks stopped)", file=sys.stderr, flush=True)
    time.sleep(_FORWARD_S)  # mpiexec relays output asynchronously; an immediate abort can lose it
    comm.abort(130)
    os._exit(130)  # pragma: no cover - in case the launcher's kill arrives after abort returned


@contextlib.contextmanager
def abort_on_error(comm):
    """With K > 1 ranks, an exception on any rank would leave the others waiting forever in the
    next collective. This prints ONE line naming the rank and the error (the traceback only with
    MINIDPO_TRACEBACK=1), then MPI-aborts every rank (exit code 1; a Ctrl-C: one line and exit
    code 130, :func:`stop_interrupted`). Checkpoints are written atomically
    (checkpoint.atomic_directory), so an abort during a save leaves the previous one whole. On
    one process the exception propagates unchanged."""
    if comm.size == 1:
        yield
        return
    try:
        yield
    except BaseException as err:  # noqa: BLE001 - every rank must stop, whatever it was
        if isinstance(err, SystemExit) and not err.code:
            raise
        if isinstance(err, KeyboardInterrupt):
            stop_interrupted(comm)
        if os.environ.get("MINIDPO_TRACEBACK"):
            traceback.print_exc()
        if getattr(err, "same_on_every_rank", False) and comm.rank > 0:
            # decided from all-reduced numbers (a non-finite loss): every rank raises it at the
            # same step; rank 0 prints it and aborts the job, which ends this process too
            time.sleep(_ABORT_GRACE_S)
        elif getattr(err, "same_on_every_rank", False):
            print(f"minidpo: {_describe(err)} (all {comm.size} ranks stopped)", file=sys.stderr, flush=True)
        else:
            print(f"minidpo: rank {comm.rank} of {comm.size} failed: {_describe(err)}; stopping all ranks",
                  file=sys.stderr, flush=True)
        time.sleep(_FORWARD_S)  # mpiexec relays output asynchronously; an immediate abort can lose it
        comm.abort(1)
        os._exit(1)  # pragma: no cover - in case the launcher's kill arrives after abort returned


def on_rank0(comm, fn: Callable[[], object]):
    """Run ``fn()`` on rank 0 alone (work on shared files: a run folder's lock, checks and
    writes) and return its result on every rank, as one collective. An exception it raises is
    raised on every rank, marked ``same_on_every_rank`` (so rank 0 alone reports it, and no rank
    is left waiting in a later collective): it travels as its class's name and its text (a class
    that cannot be imported or rebuilt from its text arrives as a RuntimeError naming it). The result must be something
    mpi4py can send. On one process this is ``fn()``."""
    if comm.size == 1:
        return fn()
    result, error = None, None
    if comm.rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - handed to every rank, raised there
            error = err
    # an exception travels as plain strings: its class's module and name, and its text
    travelling = None if error is None else (type(error).__module__, type(error).__qualname__, str(error))
    shared, shared_error = comm.allgather_host((result, travelling))[0]
    if shared_error is not None:
        if comm.rank != 0:  # rank 0 keeps its own (and its traceback)
            error = _rebuild_error(*shared_error)
        error.same_on_every_rank = True
        raise error
    return result if comm.rank == 0 else shared


def on_every_rank(comm, fn: Callable[[], object]):
    """Run ``fn()`` on every rank (work each rank does alike on the same inputs: reading the data,
    loading the models) and agree on failure, as one collective that every rank reaches whether
    or not ``fn`` raised: when any rank raised, every rank raises the lowest such rank's exception,
    marked ``same_on_every_rank``, so rank 0 alone reports it and no rank waits in a later
    collective. Returns this rank's own result. On one process this is ``fn()``."""
    if comm.size == 1:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - agreed on below, raised on every rank
        error = err
    travelling = None if error is None else (type(error).__module__, type(error).__qualname__, str(error))
    first = next((e for e in comm.allgather_host(travelling) if e is not None), None)
    if first is not None:
        error = error if travelling == first else _rebuild_error(*first)
        error.same_on_every_rank = True
        raise error
    return result


def _rebuild_error(module: str, qualname: str, text: str) -> BaseException:
    """The exception class ``module.qualname`` made from ``text``; a RuntimeError naming the
    class where it cannot be imported (a class defined inside a function) or rebuilt."""
    try:
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        error = cls(text)
        if isinstance(error, BaseException):
            return error
    except Exception:  # noqa: BLE001 - any failure: fall back to the name and the text
        pass
    return RuntimeError(f"{qualname.rsplit('.', 1)[-1]}: {text}")


def collective(fn):
    """Decorator for a training entry point taking ``comm=``: runs it under
    :func:`abort_on_error` (the communicator defaulting to :class:`SingleProcess`)."""

    @functools.wraps(fn)
    def wrapper(*args, comm=None, **kw):
        comm = comm if comm is not None else SingleProcess()
        with abort_on_error(comm):
            return fn(*args, comm=comm, **kw)

    return wrapper
