#!/usr/bin/env bash
# The one prepared check for a CUDA machine (H100/H200 with CuPy and a CUDA build of torch).
#
#   OUT=/some/dir bash bench/gpu_check.sh          # default OUT=./out
#
# 1. what is installed (missing pieces are reported and their steps skipped, never fatal);
# 2. the CuPy tests: every fused kernel against its array-code twin, the model, log-probs and
#    losses on CuPy against NumPy, AdamW's multi-tensor kernel (pytest -k "cuda or cupy");
# 3. the correctness gate on CuPy (minidpo vs torch, C0 C1 C2, fp32; C0 C1 also against float64);
# 4. bench_step.py for the GPU rows: C0 C1 C2, fp32 then TF32 (kernels on), then fp32 with the
#    kernels off (the array code on CuPy) for C1 and C2, to show what the kernels buy;
# 5. examples/train_tiny.py --device cuda --quick, and bench/memory_dpo.py on CUDA (issue: memory);
# 6. data parallelism on NCCL (cupy.cuda.nccl, bootstrapped by MPI): bench/bench_dp.py with
#    NCCLComm, plain and ZeRO-1; K = the GPUs present (one GPU: K = 1 through NCCL all the same).
# Results: $OUT/cuda-<gpu>.json (rows merged across the runs), the tables and logs in $OUT.
# Budget: about 9 minutes (+2 for the NCCL step); each step has its own timeout, so a slow step cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
START=$(date +%s)
declare -A RESULT

step() { echo; echo "=== $1  (t+$(( $(date +%s) - START ))s)"; }
run() {  # run NAME TIMEOUT CMD...: record pass/fail/timeout, never abort the script
    local name=$1 limit=$2; shift 2
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    case $rc in
        0) RESULT[$name]="pass" ;;
        124|137) RESULT[$name]="TIMEOUT after ${limit}s" ;;
        *) RESULT[$name]="FAIL (exit $rc)" ;;
    esac
    echo "--- $name: ${RESULT[$name]}"
}

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi not available"
"$PY" - <<'EOF'
import importlib
for m in ("numpy", "cupy", "torch", "pytest", "hypothesis", "safetensors", "tokenizers", "threadpoolctl", "tqdm"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:14} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m:14} MISSING ({type(e).__name__}: {e})")
try:
    import cupy, torch
    print("cupy sees", cupy.cuda.runtime.getDeviceCount(), "GPU(s); torch.cuda.is_available():", torch.cuda.is_available())
except Exception as e:
    print("GPU check:", type(e).__name__, e)
EOF
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
# no network there: install test dependencies only from a local wheel directory, if one is given
if [ -n "${WHEELS:-}" ]; then
    for pkg in hypothesis safetensors tokenizers threadpoolctl vaderSentiment mpi4py mpich; do
        have "$pkg" || "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$pkg" || echo "could not install $pkg from $WHEELS"
    done
fi
if ! have cupy || ! have torch; then
    echo "CuPy or torch is missing: nothing on this machine can be checked"; exit 2
fi

step "CuPy tests (kernels vs twins, model, log-probs, optimizer)"
if have pytest && have hypothesis; then
    # the GPU tests are named test_cuda_* or test_cupy_*; without a GPU they skip
    run tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs -k "cuda or cupy" tests/test_kernels.py \
        tests/test_backend.py tests/test_model.py tests/test_logprobs.py tests/test_losses.py tests/test_optim.py
else
    RESULT[tests]="SKIPPED (pytest or hypothesis missing; set WHEELS=dir-of-wheels)"; echo "${RESULT[tests]}"
fi

step "correctness gate on CuPy (fp32; C0 C1 also against float64 torch on the CPU)"
run gate_c0c1 75 "$PY" bench/bench_step.py --device cuda --configs C0,C1 --gate-only --gate-f64 --out "$OUT"
run gate_c2 45 "$PY" bench/bench_step.py --device cuda --configs C2 --gate-only --out "$OUT"

step "bench: fp32, kernels on"
run bench_fp32 120 "$PY" bench/bench_step.py --device cuda --mode fp32 --configs C0,C1,C2 --out "$OUT"
step "bench: TF32 (CUPY_TF32=1 / torch allow_tf32), kernels on"
run bench_tf32 90 "$PY" bench/bench_step.py --device cuda --mode tf32 --configs C0,C1,C2 --out "$OUT"
step "bench: fp32, kernels off (minidpo's array code on CuPy)"
run bench_nokernels 60 "$PY" bench/bench_step.py --device cuda --mode fp32 --configs C1,C2 --no-kernels \
    --steps 10 --variants cached_ref --out "$OUT"

step "the main job on CUDA (--quick) and the GPT-2-small DPO step's memory on CUDA"
if have vaderSentiment; then
    run train_tiny 120 "$PY" examples/train_tiny.py --device cuda --quick --out "$OUT/train_tiny_cuda" --no-progress
    cp "$OUT/train_tiny_cuda/summary.json" "$OUT/train_tiny_cuda_summary.json" 2>/dev/null
else
    RESULT[train_tiny]="SKIPPED (vaderSentiment missing; set WHEELS=dir-of-wheels)"; echo "${RESULT[train_tiny]}"
fi
run memory 90 "$PY" bench/memory_dpo.py --device cuda --json "$OUT/memory_cuda.json"

step "data parallel on NCCL (bench_dp.py: step time, all-reduce share, ZeRO-1 state per rank)"
NGPU=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
NCCL_OK=$("$PY" -c "from cupy.cuda import nccl; print(int(nccl.available))" 2>/dev/null || echo 0)
if have mpi4py && command -v mpiexec >/dev/null && [ "$NCCL_OK" = 1 ]; then
    K=$(( NGPU >= 2 ? 2 : 1 ))
    run dp_nccl 60 mpiexec -n "$K" "$PY" bench/bench_dp.py --device cuda --force-comm nccl --config D1 --out "$OUT"
    run dp_nccl_zero1 60 mpiexec -n "$K" "$PY" bench/bench_dp.py --device cuda --force-comm nccl --config D1 --zero1 --out "$OUT"
else
    RESULT[dp_nccl]="SKIPPED (needs mpi4py + mpiexec (pip install mpi4py mpich; WHEELS=dir) and NCCL for CuPy (nccl.available=$NCCL_OK))"
    RESULT[dp_nccl_zero1]="${RESULT[dp_nccl]}"
    echo "${RESULT[dp_nccl]}"
fi

step "summary (t+$(( $(date +%s) - START ))s)"
status=0
for k in tests gate_c0c1 gate_c2 bench_fp32 bench_tf32 bench_nokernels train_tiny memory dp_nccl dp_nccl_zero1; do
    printf '%-16s %s\n' "$k" "${RESULT[$k]:-not run}"
    case "${RESULT[$k]:-}" in pass|SKIPPED*) ;; *) status=1 ;; esac
done
ls -l "$OUT"
exit $status
