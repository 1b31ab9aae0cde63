"""Data parallelism (minidpo/distributed.py): the shard weights, ZeRO-1, the NCCL bookkeeping,
and K-rank training against single-process training under ``mpiexec``.

The in-process tests need nothing extra. The MPI tests launch ``mpiexec -n K python
tests/dp_worker.py`` in a subprocess and are skipped, with the reason, when mpi4py or an MPI
runtime is missing (``pip install -e ".[mpi]"`` installs both)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minidpo import distributed
from minidpo.data import collate_preferences, collate_sft
from minidpo.distributed import SingleProcess, ZeroAdamW, local_shard, shard_range
from minidpo.model import init_params
from minidpo.optim import AdamW
from minidpo.train import TrainConfig, dpo_step, sft_step
from tests import dp_worker

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dp_worker.py"


class _Rank:
    """Rank r of K for the functions that only read .rank and .size."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


# ------------------------------------------------------------------------------ shards, weights


def test_shard_range_covers_in_order_with_uneven_sizes():
    for n in range(1, 30):
        for k in range(1, 6):
            parts = [shard_range(n, r, k) for r in range(k)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(parts[r][1] == parts[r + 1][0] for r in range(k - 1))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def test_local_shard_refuses_fewer_examples_than_ranks():
    with pytest.raises(ValueError, match="batch size of at least 3"):
        local_shard(np.arange(2), _Rank(0, 3))


def _flat(grads):
    return np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in grads.values()])


@pytest.mark.parametrize("k", [2, 3])
def test_sft_token_weighted_shards_sum_to_the_batch_gradient_and_naive_mean_does_not(k):
    """SFT: sum_r (N_r / N) grad L_r = grad L of the global batch; (1/K) sum_r grad L_r is not."""
    items = dp_worker.sft_items(7)
    params = init_params(dp_worker.CONFIG, "cpu", seed=0)
    idx = np.arange(7)
    tokens = np.array([len(t.response_ids) for t in items], dtype=np.int64)
    full_loss, full = sft_step(params, dp_worker.CONFIG, collate_sft(items, 0))
    weighted, naive, loss_w = 0.0, 0.0, 0.0
    for r in range(k):
        local, w = local_shard(idx, _Rank(r, k), tokens)
        batch = collate_sft([items[i] for i in local], 0)
        assert w == pytest.approx(float(batch.host_token_counts.sum()) / float(tokens.sum()))  # host count = scored
        loss_r, g = sft_step(params, dp_worker.CONFIG, batch)
        weighted = weighted + w * _flat(g)
        naive = naive + _flat(g) / k
        loss_w += w * float(loss_r)
    ref = _flat(full)
    scale = np.abs(ref).max()
    assert np.abs(weighted - ref).max() <= 1e-5 * scale
    assert loss_w == pytest.approx(float(full_loss), rel=1e-6)
    assert np.abs(naive - ref).max() > 1e-2 * scale  # the naive average is visibly wrong


def test_dpo_uneven_shards_weighted_by_pairs_and_naive_mean_does_not():
    """DPO, B = 5 pairs on 2 ranks (2 + 3): sum_r (n_r / B) grad L_r = grad L; the naive mean is off."""
    pairs = dp_worker.pairs(5)
    policy = init_params(dp_worker.CONFIG, "cpu", seed=5)
    ref_c = np.linspace(-20, -10, 5).astype(np.float32)
    ref_r = np.linspace(-12, -18, 5).astype(np.float32)
    tc = TrainConfig(beta=0.5)
    full_loss, full_m, full = dpo_step(policy, dp_worker.CONFIG, collate_preferences(pairs, 0), ref_c, ref_r, tc)
    weighted, naive, acc = 0.0, 0.0, 0.0
    for r in range(2):
        local, w = local_shard(np.arange(5), _Rank(r, 2))
        assert len(local) == (2, 3)[r] and w == len(local) / 5
        loss_r, m, g = dpo_step(policy, dp_worker.CONFIG, collate_preferences([pairs[i] for i in local], 0),
                                ref_c[local], ref_r[local], tc)
        weighted = weighted + w * _flat(g)
        naive = naive + _flat(g) / 2
        acc += w * float(m["rewards/accuracies"])
    ref = _flat(full)
    scale = np.abs(ref).max()
    assert np.abs(weighted - ref).max() <= 1e-5 * scale
    assert acc == pytest.approx(float(full_m["rewards/accuracies"]), abs=1e-6)
    assert np.abs(naive - ref).max() > 1e-2 * scale


def test_single_process_reduction_is_the_identity():
    comm = SingleProcess()
    g = {"a": np.ones((2, 3), dtype=np.float32)}
    loss = np.asarray(np.float32(2.0))
    out_loss, out_m = distributed.all_reduce_step(comm, loss, {}, g, 1.0)
    assert out_loss is loss and out_m == {} and g["a"].base is None
    assert local_shard(np.arange(4), comm) [1] == 1.0
    assert comm.any(True) and not comm.any(False)


class _FromRank0(SingleProcess):
    """Rank ``rank`` of 2 whose host all-gather delivers ``rank0_sends`` as rank 0's object."""

    def __init__(self, rank, rank0_sends=None):
        super().__init__()
        self.rank, self.size, self.rank0_sends = rank, 2, rank0_sends

    def allgather_host(self, obj):
        return [obj, obj] if self.rank == 0 else [self.rank0_sends, obj]


def test_on_rank0_runs_once_and_hands_its_result_or_its_error_to_every_rank():
    from minidpo.train import RunFolderError

    calls = []
    assert distributed.on_rank0(_FromRank0(0), lambda: calls.append(0) or 7) == 7
    assert distributed.on_rank0(_FromRank0(1, (7, None)), lambda: calls.append(1)) == 7
    assert calls == [0]  # rank 1 never ran it

    def refuse():
        raise RunFolderError("runs/x: its sft run was made with other settings")

    with pytest.raises(RunFolderError) as on0:
        distributed.on_rank0(_FromRank0(0), refuse)
    wire = (RunFolderError.__module__, RunFolderError.__qualname__, str(on0.value))  # what rank 0 sends: strings
    with pytest.raises(RunFolderError, match="other settings") as on1:  # rank 0's error, raised on rank 1
        distributed.on_rank0(_FromRank0(1, (None, wire)), lambda: calls.append(1))
    assert on0.value.same_on_every_rank and on1.value.same_on_every_rank and calls == [0]

    class LocalError(Exception):
        pass

    with pytest.raises(LocalError):  # rank 0 raises its own error
        distributed.on_rank0(_FromRank0(0), lambda: (_ for _ in ()).throw(LocalError("cannot travel")))
    local = (__name__, "test_on_rank0_runs_once_and_hands_its_result_or_its_error_to_every_rank.<locals>.LocalError",
             "cannot travel")
    with pytest.raises(RuntimeError, match="LocalError: cannot travel"):  # a class rank 1 cannot import
        distributed.on_rank0(_FromRank0(1, (None, local)), lambda: calls.append(1))
    assert distributed.on_rank0(SingleProcess(), lambda: 3) == 3


# ------------------------------------------------------------------------------ ZeRO-1


class _Chunks(SingleProcess):
    """Rank r of K with a no-op all-gather: the test assembles the chunks itself."""

    def __init__(self, rank, size):
        super().__init__(zero1=True)
        self.rank, self.size = rank, size


def test_zero1_chunks_equal_adamw_bit_for_bit_and_state_round_trips():
    rng = np.random.default_rng(0)
    k = 3
    base = init_params(dp_worker.CONFIG, "cpu", seed=0)
    ref_params = {n: v.copy() for n, v in base.items()}
    ref = AdamW(ref_params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    shards = []
    for r in range(k):
        p = {n: v.copy() for n, v in base.items()}
        shards.append((p, ZeroAdamW(p, _Chunks(r, k), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)))
    n_total = shards[0][1].n
    assert shards[0][1].state_bytes() == 2 * 4 * shards[0][1].chunk < 2 * 4 * n_total
    for step in range(3):
        grads = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
        ref.step(ref_params, grads, lr=1e-2)
        full = np.zeros(k * shards[0][1].chunk, dtype=np.float32)
        for r, (p, opt) in enumerate(shards):
            opt.step(p, grads, lr=1e-2)
            full[opt.lo : opt.hi] = opt.flat[opt.lo : opt.hi]
        want = np.concatenate([ref_params[n].ravel() for n in base])
        np.testing.assert_array_equal(full[:n_total], want)  # elementwise: identical bits
        for p, opt in shards:  # what the all-gather does
            opt.flat[:] = full
    for r, (p, opt) in enumerate(shards):
        np.testing.assert_array_equal(p["transformer.wte.weight"], ref_params["transformer.wte.weight"])
    # a full AdamW state loads into the chunks, and the chunks hold exactly their slices of it
    sd = ref.state_dict()
    for r, (p, opt) in enumerate(shards):
        fresh = ZeroAdamW({n: v.copy() for n, v in base.items()}, _Chunks(r, k), lr=1e-2)
        fresh.load_state_dict(sd)
        m_full = np.concatenate([sd[f"m.{n}"].ravel() for n in base])
        np.testing.assert_array_equal(fresh.m[: fresh.hi - fresh.lo], m_full[fresh.lo : fresh.hi])
        assert fresh.t == 3


def test_zero1_refuses_a_replaced_parameter():
    p = init_params(dp_worker.CONFIG, "cpu", seed=0)
    opt = ZeroAdamW(p, _Chunks(0, 1), lr=1e-3)
    p["transformer.wte.weight"] = p["transformer.wte.weight"].copy()
    with pytest.raises(ValueError, match="no longer a view"):
        opt.step(p, {n: np.zeros_like(v) for n, v in p.items()})


def test_zero1_gpu_update_path_matches_adamw_on_the_standin(cuda_or_standin):
    """ZeroAdamW's CuPy branch (one fused adamw kernel launch over the chunk's pieces)."""
    cp = cuda_or_standin
    base = init_params(dp_worker.CONFIG, "cpu", seed=0)
    p1 = {n: cp.asarray(v) for n, v in base.items()}
    p2 = {n: cp.asarray(v) for n, v in base.items()}
    a, z = AdamW(p1, lr=1e-2, weight_decay=0.1), ZeroAdamW(p2, _Chunks(0, 1), lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(1)
    for _ in range(2):
        g = {n: cp.asarray(rng.standard_normal(v.shape).astype(np.float32)) for n, v in base.items()}
        a.step(p1, g)
        z.step(p2, g)
    for n in base:
        np.testing.assert_allclose(cp.asnumpy(p2[n]), cp.asnumpy(p1[n]), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ environment, NCCL


def test_launched_ranks_and_single_process_default(monkeypatch):
    assert distributed.launched_ranks({}) == 1
    assert distributed.launched_ranks({"PMI_SIZE": "4"}) == 4
    assert distributed.launched_ranks({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    for var in distributed._SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    comm = distributed.from_environment("cpu", zero1=True)
    assert isinstance(comm, SingleProcess) and comm.size == 1 and comm.zero1


def test_launched_without_mpi4py_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(RuntimeError, match=r"launched as 2 ranks, but mpi4py is not installed: pip install"):
        distributed.from_environment("cpu")


def _mpi4py_loads() -> str | None:
    """None if mpi4py and an MPI library load, else why not."""
    try:
        from mpi4py import MPI  # noqa: F401
    except Exception as err:  # ImportError, or RuntimeError: cannot load MPI library
        return f"mpi4py with an MPI library is needed ({type(err).__name__}: {str(err).splitlines()[0]}); pip install -e '.[mpi]'"
    return None


class _FakeNCCL:
    """Records the calls NCCLComm makes; behaves as K ranks that all hold the same buffer."""

    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_FLOAT16, NCCL_SUM = 7, 8, 6, 0

    def __init__(self, k):
        self.k, self.calls = k, []

    def get_unique_id(self):
        return (1, 2, 3)

    def NcclCommunicator(self, ndev, uid, rank):  # noqa: N802 - cupy's name
        self.calls.append(("init", ndev, uid, rank))
        return self

    def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802
        self.calls.append(("allReduce", send, recv, count, dtype, op, stream))
        self.buf[...] *= self.k  # K identical contributions

    def allGather(self, send, recv, count, dtype, stream):  # noqa: N802
        self.calls.append(("allGather", send, recv, count, dtype, stream))


class _FakeMPIComm:
    def __init__(self, rank, size, root_value=None):
        self.rank, self.size, self.root_value = rank, size, root_value

    def Get_rank(self):  # noqa: N802
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.size

    def bcast(self, obj, root=0):  # what rank 0 sent
        return obj if self.rank == root else self.root_value


def test_nccl_comm_bookkeeping_on_the_standin(cuda_or_standin):
    """NCCLComm's Python side: device choice, unique id, pointers, counts, dtype codes, the
    in-place all-gather offset. NCCL itself runs only on GPUs (bench/gpu_check.sh)."""
    why = _mpi4py_loads()
    if why:
        pytest.skip(why)
    cp = cuda_or_standin
    nccl = _FakeNCCL(2)

    class _Cupy:
        cuda = cp.cuda

    comm = distributed.NCCLComm(_FakeMPIComm(1, 2, root_value=(1, 2, 3)), nccl=nccl, cupy=_Cupy, local_rank=0)
    assert comm.device == "cuda:0" and nccl.calls[0] == ("init", 2, (1, 2, 3), 1)
    g = {"w": cp.asarray(np.full((3, 4), 2.0, dtype=np.float32)), "b": cp.asarray(np.ones(5, dtype=np.float32))}
    loss = cp.asarray(np.float32(3.0))
    buf = comm.step_buffer.get(cp, 12 + 5 + 1, np.float32)
    nccl.buf = buf
    out_loss, _ = distributed.all_reduce_step(comm, loss, {}, g, 0.5)  # two identical ranks, w = 1/2 each
    name, send, recv, count, dtype, op, stream = nccl.calls[1]
    assert name == "allReduce" and send == recv == buf.data.ptr and count == 18
    assert dtype == nccl.NCCL_FLOAT32 and op == nccl.NCCL_SUM
    np.testing.assert_array_equal(cp.asnumpy(g["w"]), np.full((3, 4), 2.0, dtype=np.float32))
    assert float(out_loss) == 3.0
    flat = cp.asarray(np.zeros(8, dtype=np.float32))
    comm.allgather_chunks(flat)
    name, send, recv, count, dtype, stream = nccl.calls[2]
    assert name == "allGather" and count == 4 and send == recv + 1 * 4 * 4  # rank 1's chunk, in place
    with pytest.raises(TypeError, match="float16/32/64"):
        distributed._nccl_dtype(nccl, np.int32)


# ------------------------------------------------------------------------------ mpiexec runs


def _mpi_skip_reason() -> str | None:
    if not shutil.which("mpiexec"):
        return "no mpiexec on PATH (pip install -e '.[mpi]' installs MPICH's)"
    r = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True, text=True)
    if r.returncode:
        return "mpi4py cannot load an MPI library: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


MPI_SKIP = _mpi_skip_reason()
needs_mpi = pytest.mark.skipif(MPI_SKIP is not None, reason=str(MPI_SKIP))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for var in distributed._SIZE_VARS:  # a plain run must not look launched
        env.pop(var, None)
    return env


def _run(out: Path, ranks: int, *args, check=True, timeout=120):
    cmd = [sys.executable, str(WORKER), "--out", str(out), *args]
    if ranks:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _trace(out: Path, rank=0):
    with np.load(out / f"trace.rank{rank}.npz") as z:
        return {k: z[k] for k in z.files}


_single_cache: dict = {}


def _single(tmp_path_factory, stage, *extra):
    key = (stage, *extra)
    if key not in _single_cache:
        out = tmp_path_factory.mktemp(f"single-{stage}")
        _run(out, 0, "--stage", stage, *extra)
        _single_cache[key] = _trace(out)
    return _single_cache[key]


def _compare(a: dict, b: dict, steps: int):
    """Step by step: loss and metrics, every gradient after the all-reduce, every parameter after
    AdamW, to float32 reduction-order tolerance.

    Step 0's gradients are taken at the same parameters, so only the order of the float32 sums
    differs: 2e-6 of the step's largest entry. From step 1 on the two runs hold parameters that
    already differ by that round-off, amplified by AdamW's m / sqrt(v) on entries whose gradient
    is itself round-off sized (measured: parameters up to 1e-5 apart after one step, the later
    gradients then up to 3x step 0's tolerance, more with some batch layouts than others), so
    those gradients get 1e-5 of the largest entry. That the sharding itself is exact is checked
    in float64, where the same runs agree to ~1e-15 (test_k_ranks_equal_one_process_in_float64)."""
    names = [k.split("/", 2)[2] for k in a if k.startswith("grad/0/")]
    assert names
    for s in range(steps):
        # a sum of float32 terms is exact to ~1e-7 of its terms' size, not of its (maybe cancelled)
        # value: the tolerance is relative to the step's largest gradient entry
        scale = max(float(np.abs(a[f"grad/{s}/{n}"]).max()) for n in names)
        tol = (2e-6 if s == 0 else 1e-5) * scale
        for n in names:
            ga, gb = a[f"grad/{s}/{n}"], b[f"grad/{s}/{n}"]
            assert np.abs(ga - gb).max() <= tol, (s, n, np.abs(ga - gb).max(), scale)
            pa, pb = a[f"param/{s}/{n}"], b[f"param/{s}/{n}"]
            assert np.abs(pa - pb).max() <= 2e-5, (s, n, np.abs(pa - pb).max())
        for k in a:
            if k.startswith(f"history/{s + 1}/") and not k.endswith("time_s"):
                assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), k


@needs_mpi
@pytest.mark.parametrize("ranks,stage,zero1,extra", [
    (2, "sft", False, ()), (2, "sft", True, ()), (2, "dpo", False, ()), (2, "dpo", True, ()),
    (3, "sft", False, ()), (3, "dpo", True, ()), (2, "dpo", False, ("--recompute-reference",)),
])
def test_k_ranks_equal_one_process_step_by_step(tmp_path, tmp_path_factory, stage, zero1, ranks, extra):
    """Global batch 5 (uneven shards: 2+3 on 2 ranks, 1+2+2 on 3), 4 steps, eval every 2; the
    reference log-probs cached (gathered from shares) or recomputed on each rank's shard."""
    one = _single(tmp_path_factory, stage, *extra)
    _run(tmp_path, ranks, "--stage", stage, *extra, *(["--zero1"] if zero1 else []))
    traces = [_trace(tmp_path, r) for r in range(ranks)]
    _compare(one, traces[0], 4)
    for t in traces[1:]:  # every rank holds the same model, bit for bit
        for k in traces[0]:
            if k.startswith(("param/", "final/")):
                np.testing.assert_array_equal(t[k], traces[0][k])
    state = [int(t["opt_state_bytes"]) for t in traces]
    if zero1:  # the moments are split: each rank holds ~1/K of them
        assert all(s <= int(one["opt_state_bytes"]) // ranks + 8 * ranks for s in state)
    else:
        assert state == [int(one["opt_state_bytes"])] * ranks
    # rank 0 alone wrote metrics.jsonl: each step logged once
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "eval/loss" not in r and "eval/nll" not in r] == [1, 2, 3, 4]


@needs_mpi
@pytest.mark.parametrize("ranks,stage,zero1,layout", [
    (2, "sft", False, ()), (3, "sft", True, ("--no-pack",)),
    (2, "dpo", False, ()), (3, "dpo", True, ()), (3, "dpo", False, ("--no-share-prompt",)),
    (2, "dpo", True, ("--no-pack", "--no-share-prompt")), (3, "dpo", False, ("--recompute-reference",)),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_k_ranks_equal_one_process_in_float64(tmp_path, tmp_path_factory, ranks, stage, zero1, layout):
    """The same runs in float64, in every batch layout (each rank packs its own share, or collates
    it): K ranks and one process agree to 1e-12 of the largest gradient entry at every step, and
    in every parameter, so the shards, their weights (n_r / B for DPO, N_r / N response tokens for
    SFT) and the per-shard layouts add up to the global batch's step exactly, round-off aside; a
    wrongly weighted shard is off by ~1e-2."""
    one = _single(tmp_path_factory, stage, "--float64", *layout)
    _run(tmp_path, ranks, "--stage", stage, "--float64", *layout, *(["--zero1"] if zero1 else []))
    two = _trace(tmp_path)
    names = [k.split("/", 2)[2] for k in one if k.startswith("grad/0/")]
    assert names and one[f"grad/0/{names[0]}"].dtype == np.float64
    for s in range(4):
        scale = max(float(np.abs(one[f"grad/{s}/{n}"]).max()) for n in names)
        for n in names:
            assert np.abs(one[f"grad/{s}/{n}"] - two[f"grad/{s}/{n}"]).max() <= 1e-12 * scale, (s, n)
            assert np.abs(one[f"param/{s}/{n}"] - two[f"param/{s}/{n}"]).max() <= 1e-12, (s, n)
    for k in one:
        if k.startswith("history/") and not k.endswith("time_s"):
            assert two[k] == pytest.approx(one[k], rel=1e-10, abs=1e-12), k


@needs_mpi
@pytest.mark.parametrize("first,second", [(2, 0), (0, 2)], ids=["2-ranks-then-1", "1-then-2-ranks-zero1"])
def test_resume_with_a_different_rank_count(tmp_path, first, second):
    whole = tmp_path / "whole"
    _run(whole, 0, "--stage", "dpo", "--steps", "6")
    split = tmp_path / "split"
    _run(split, first, "--stage", "dpo", "--steps", "3")
    _run(split, second, "--stage", "dpo", "--steps", "6", *(["--zero1"] if second else []))
    a, b = _trace(whole), _trace(split)
    assert int(b["final_step"]) == 6
    for k in a:
        if k.startswith("final/"):
            assert np.abs(a[k] - b[k]).max() <= 2e-5, k
    rows = [json.loads(l) for l in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "eval/loss" not in r] == [1, 2, 3, 4, 5, 6]


@needs_mpi
def test_a_failing_rank_stops_every_rank_with_one_message(tmp_path):
    from minidpo.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    r = _run(tmp_path, 2, "--stage", "sft", "--steps", "8", "--save-every", "2", "--fail-rank", "1",
             "--fail-step", "3", check=False, timeout=120)
    assert r.returncode != 0, r.stderr
    assert time.perf_counter() - t0 < 60, r.stderr  # no rank left waiting in a collective
    msg = "minidpo: rank 1 of 2 failed: ValueError: injected failure in step 3 on rank 1; stopping all ranks"
    assert r.stderr.count(msg) == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    ck = load_checkpoint(tmp_path / "checkpoint")  # the last checkpoint is whole
    assert ck.step == 2, r.stderr
    assert not list(tmp_path.glob(".checkpoint.tmp-*")), r.stderr


@needs_mpi
def test_a_non_finite_loss_on_one_shard_stops_every_rank_with_one_message(tmp_path):
    """NaN on rank 1's shard reaches every rank through the all-reduce; each raises NonFiniteError
    at the same step, rank 0 alone reports it."""
    from minidpo.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    r = _run(tmp_path, 2, "--stage", "sft", "--steps", "8", "--save-every", "2", "--nan-rank", "1",
             "--nan-step", "3", check=False)
    assert r.returncode != 0 and time.perf_counter() - t0 < 60
    assert r.stderr.count("minidpo: NonFiniteError: sft: non-finite loss or gradient between steps 3 and 4") == 1, r.stderr
    assert r.stderr.count("(all 2 ranks stopped)") == 1 and "rank 1 of 2 failed" not in r.stderr
    assert load_checkpoint(tmp_path / "checkpoint").step == 2


@needs_mpi
def test_ranks_starting_from_different_parameters_are_refused(tmp_path):
    r = _run(tmp_path, 2, "--stage", "sft", "--seed-by-rank", check=False)
    assert r.returncode != 0
    msg = "rank 1's starting parameters differ from rank 0's (first: 'transformer.wte.weight')"
    assert r.stderr.count(msg) == 1, r.stderr


@needs_mpi
def test_ctrl_c_stops_all_ranks_at_the_same_step_with_a_checkpoint(tmp_path):
    p = subprocess.Popen(["mpiexec", "-n", "2", sys.executable, str(WORKER), "--out", str(tmp_path), "--stage", "sft",
                          "--steps", "400", "--sleep", "0.1", "--zero1"], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    steps = [int(_trace(tmp_path, r)["final_step"]) for r in (0, 1)]
    assert steps[0] == steps[1] and 3 <= steps[0] < 400
    assert all(bool(_trace(tmp_path, r)["stopped_early"]) for r in (0, 1))
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == steps[0]
    assert (out + err).count("interrupted: checkpoint saved") == 1


@needs_mpi
def test_cli_under_mpiexec_trains_what_one_process_trains(tmp_path):
    """``mpiexec -n 2 python -m minidpo sft|dpo`` (ZeRO-1 for dpo) against the same commands in
    one process: the same checkpoint to float32 round-off, one banner, one metrics log."""
    from minidpo.checkpoint import load_checkpoint
    from minidpo.tasks import sentiment
    from minidpo.tokenizer import BPETokenizer

    corpus = sentiment.sft_corpus(60, seed=0)
    with open(tmp_path / "sft.jsonl", "w") as f:
        for p, r in corpus:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": corpus[i][0], "chosen": corpus[i][1], "rejected": corpus[59 - i][1]}) + "\n")
    BPETokenizer.train([p + r for p, r in corpus], vocab_size=300).save(tmp_path / "tok")
    train = ["--steps", "4", "--batch-size", "5", "--log-every", "1", "--eval-every", "2", "--warmup-steps", "1",
             "--no-progress", "--eval-fraction", "0.2"]

    def cli(ranks, *argv):
        cmd = [sys.executable, "-m", "minidpo", *map(str, argv), *train]
        if ranks:
            cmd = ["mpiexec", "-n", str(ranks), *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    model = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--n-ctx", 64]
    for ranks, tag in ((0, "one"), (2, "two")):
        out = cli(ranks, "sft", "--data", tmp_path / "sft.jsonl", "--tokenizer", tmp_path / "tok",
                  "--out", tmp_path / f"sft-{tag}", *model)
        assert out.count("SFT: ") == 1 and ("2 ranks" in out) == bool(ranks)
        out = cli(ranks, "dpo", "--data", tmp_path / "prefs.jsonl", "--ref", tmp_path / "sft-one",
                  "--out", tmp_path / f"dpo-{tag}", *(["--zero1"] if ranks else []))
        assert out.count("DPO: ") == 1
    for stage in ("sft", "dpo"):
        a = load_checkpoint(tmp_path / f"{stage}-one" / "checkpoint")
        b = load_checkpoint(tmp_path / f"{stage}-two" / "checkpoint")
        assert a.step == b.step == 4
        for k in a.params:
            assert np.abs(a.params[k] - b.params[k]).max() <= 2e-5, (stage, k)
        for k in a.optimizer_state:  # the ZeRO-1 run saved the full moments, gathered
            if k.startswith(("m.", "v.")):
                ma, mb = np.asarray(a.optimizer_state[k]), np.asarray(b.optimizer_state[k])
                assert np.abs(ma - mb).max() <= 1e-4 * np.abs(ma).max(), (stage, k)
        la = [json.loads(l) for l in (tmp_path / f"{stage}-one" / "metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(l) for l in (tmp_path / f"{stage}-two" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in la] == [r["step"] for r in lb]
        for ra, rb in zip(la, lb):
            # rewards are beta (log pi - log pi_ref) of float32 sums of ~-250: one ulp of such a sum
            # is 3e-5, so they are known to beta times a few of its ulps (here 1.2e-5), not to 1e-6
            big = max([abs(v) for k, v in ra.items() if "logps/" in k] or [0.0])
            reward_abs = max(1e-6, 4 * 0.1 * float(np.spacing(np.float32(big))))  # beta: the CLI's 0.1
            for k, v in ra.items():
                if k not in ("time_s", "stage"):
                    tol = reward_abs if "rewards/" in k and "accuracies" not in k else 1e-6
                    assert rb[k] == pytest.approx(v, rel=1e-4, abs=tol), (stage, k)


@needs_mpi
def test_cli_run_folder_checks_under_mpiexec_are_rank_0s_and_every_rank_exits_with_them(tmp_path):
    """Rank 0 alone holds the run folder's lock and makes its checks: a re-run with another option
    is refused with ONE error line and exit status 1 on every rank (no rank left waiting), nothing
    in the folder changes; the same command again says "already complete" once; --overwrite
    retrains it on 2 ranks."""
    from minidpo.tasks import sentiment
    from minidpo.tokenizer import BPETokenizer

    corpus = sentiment.sft_corpus(40, seed=1)
    with open(tmp_path / "sft.jsonl", "w") as f:
        for p, r in corpus:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    BPETokenizer.train([p + r for p, r in corpus], vocab_size=280).save(tmp_path / "tok")
    out = tmp_path / "run"
    base = ["sft", "--data", tmp_path / "sft.jsonl", "--tokenizer", tmp_path / "tok", "--out", out, "--steps", "2",
            "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-ctx", "64",
            "--warmup-steps", "1", "--no-progress"]

    def cli(*extra, ranks=2):
        cmd = [sys.executable, "-m", "minidpo", *map(str, base), *extra]
        return subprocess.run(["mpiexec", "-n", str(ranks), *cmd], capture_output=True, text=True, env=_env(),
                              timeout=120, cwd=ROOT)

    r = cli()
    assert r.returncode == 0 and r.stdout.count("SFT: ") == 1 and "2 ranks" in r.stdout, r.stderr[-3000:]
    state = (out / "checkpoint" / "trainer_state.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    t0 = time.perf_counter()
    r = cli("--lr", "0.005")
    assert r.returncode == 1, (r.stdout, r.stderr[-3000:])
    assert time.perf_counter() - t0 < 60
    assert r.stderr.count("minidpo: error: ") == 1 and "lr (0.001 there, 0.005 now)" in r.stderr, r.stderr
    assert "SFT: " not in r.stdout and "Traceback" not in r.stderr
    assert (out / "checkpoint" / "trainer_state.json").read_text() == state
    assert (out / "metrics.jsonl").read_text() == metrics
    r = cli()
    assert r.returncode == 0 and r.stdout.count("already complete at step 2") == 1, r.stderr[-3000:]
    r = cli("--lr", "0.005", "--overwrite")
    assert r.returncode == 0 and r.stdout.count("done: ") == 1, r.stderr[-3000:]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["config"]["train"]["lr"] == 0.005


def test_bench_dp_writes_a_row(tmp_path):
    """bench/bench_dp.py on one process (the micro shape): one row with the phase split."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dp.py"), "--config", "micro", "--steps", "2",
                        "--warmup", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = tmp_path.glob("dp-cpu-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["ranks"] == 1 and row["comm"] == "SingleProcess" and row["allreduce_s"] < row["step_s"]
    assert row["tokens_per_s"] > 0 and 0.0 <= row["comm_share"] < 1.0 and row["per_rank"][0]["opt_state_mb"] > 0


@needs_mpi
def test_train_tiny_under_mpiexec_matches_one_process(tmp_path):
    """examples/train_tiny.py on 2 ranks (ZeRO-1): the same pairs, the same rewards, KL to
    round-off; rank 0 alone prints the report."""
    args = ["--quick", "--sft-steps", "20", "--dpo-steps", "10", "--no-progress"]
    script = str(ROOT / "examples" / "train_tiny.py")
    outs = {}
    for ranks, tag in ((0, "one"), (2, "two")):
        cmd = [sys.executable, script, *args, "--out", str(tmp_path / tag)] + (["--zero1"] if ranks else [])
        if ranks:
            cmd = ["mpiexec", "-n", str(ranks), *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[tag] = r.stdout
    assert outs["two"].count("[5/5] held-out prompts") == 1
    for name in ("pairs_train.jsonl", "pairs_eval.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert a["sft"] == b["sft"] and a["n_pairs"] == b["n_pairs"]
    for k in ("reward_mean", "kl", "accuracy"):
        assert b["dpo"][k] == pytest.approx(a["dpo"][k], rel=1e-3, abs=1e-4), k


@needs_mpi
def test_an_input_error_under_mpiexec_is_printed_once(tmp_path):
    """Every rank reads the same bad line; the ranks agree (distributed.on_every_rank) and rank 0
    alone prints it, every rank exiting with status 1."""
    from minidpo.tasks import sentiment
    from minidpo.tokenizer import BPETokenizer

    corpus = sentiment.sft_corpus(20, seed=0)
    BPETokenizer.train([p + r for p, r in corpus], vocab_size=280).save(tmp_path / "tok")
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in corpus]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    r = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "minidpo", "sft", "--data", str(tmp_path / "bad.jsonl"),
                        "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "run"), "--no-progress"],
                       capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("minidpo: error: ") == 1 and f"{tmp_path / 'bad.jsonl'}:3: invalid JSON" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_an_interrupt_outside_training_under_mpiexec_exits_130_with_one_line(tmp_path):
    """A Ctrl-C while train_tiny.py samples its pairs (every rank gets it, as from mpiexec): exit
    status 130, one line, no rank reporting a failure."""
    env = dict(_env(), MINIDPO_TEST_INTERRUPT_AT="pairs")
    r = subprocess.run(["mpiexec", "-n", "2", sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--quick",
                        "--sft-steps", "10", "--dpo-steps", "4", "--no-progress", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.count("minidpo: interrupted (all 2 ranks stopped)") == 1, r.stderr
    assert "failed" not in r.stderr and "Traceback" not in r.stderr and "rank 1" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "pairs.json").exists()
