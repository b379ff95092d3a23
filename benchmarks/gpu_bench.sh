#!/bin/sh
# The GPU suite in one command (`make gpu-bench`), for a CUDA machine (not yet run: no session so
# far had a device). Runs with the machine's own python3 from the repository root:
#
#   sh benchmarks/gpu_bench.sh [RESULTS_DIR]
#
# RESULTS_DIR (default benchmarks/results) receives every result file, named by device (the slug
# of torch.cuda.get_device_name()), and gpu_bench.log with each step's whole output: 7 files. On
# the device machine pass $OUT, so that what a run cut short had measured still comes back.
#   1. GPU parity of both impls against the float64 reference at real shapes (pytest -m gpu)
#   2. the kernel grid, bf16: N 8192 256 1024, V 128256 32000 151936, B 10 50, masked fraction
#      0 0.99 (shapes in that order), modes fwd and fwd_bwd, for the fast impls triton triton_1sm
#      triton_1warp liger_ce torch_ce (kernel_<device>.csv), then
#   3. the same grid for the slow ones, torch and torch_compile (kernel_<device>_reference.csv):
#      each stops starting shapes after its time budget, so the slow impls' few seconds per call
#      and torch.compile's compilations cannot crowd out the fast impls' grid
#   4. decoding against `generate` on a random 1B-shaped Llama (hidden 2048, 16 layers, 32 heads,
#      MLP 8192: 1.1B parameters with the benchmark's 8192-token vocabulary)
#   5. the training-time benchmark
# Each step runs under its own time limit (the limits sum to 470 s, and a step that ignores
# SIGTERM is killed 10 s after its limit, so the suite ends within the 8 minutes it is budgeted;
# the Liger install before it takes seconds) and the next step runs whatever the last one did;
# the script exits 1 naming the steps that failed.
# Environment:
#   PYTHON          the interpreter (default python3)
#   BEAR_DATA       the folder holding Office/ and Clothing/ for step 4 (default ../shared/data/
#                   amazon, which does not travel to a device machine: copy both into an ignored
#                   folder of the checkout and carry it; benchmarks/README.md, "GPU suite")
#   GPU_BENCH_SMOKE 1: every step at toy sizes on the CPU, to check the script, not to measure
# Liger-Kernel is not on the device image: carry its wheel in .whl/ (benchmarks/README.md, "GPU
# suite"); it is installed from there when present, and liger_ce is skipped without it.
set -u
PY=${PYTHON:-python3}
RESULTS=${1:-benchmarks/results}
DATA=${BEAR_DATA:-../shared/data/amazon}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_bench.log
: >"$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# TRITON_INTERPRET=0: tests/conftest.py turns the interpreter on unless the variable is set, and
# the parity step must test the compiled kernels (interpreted, it would also take hours).
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 \
    TRITON_INTERPRET=0 TQDM_DISABLE=1
if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then
    DEVICE=cpu
    KERNEL_SHAPES="--n-rows 8 --vocab 512 --beam-width 10 --masked-fraction 0 0.99 --dtype fp32"
    FAST_IMPLS="torch_ce"
    SLOW_IMPLS="torch"
    DECODING="--users 2 --batch 2 --hidden 32 --layers 1 --heads 2 --synth-items 2000"
    TRAINING="--limit-train 16 --batch-size 8 --warmup-steps 1 --losses msl bear"
else
    DEVICE=cuda
    KERNEL_SHAPES="--n-rows 8192 256 1024 --vocab 128256 32000 151936 --beam-width 10 50 \
        --masked-fraction 0 0.99 --dtype bf16"
    FAST_IMPLS="triton triton_1sm triton_1warp liger_ce torch_ce"
    SLOW_IMPLS="torch torch_compile"
    DECODING="--hidden 2048 --layers 16 --heads 32 --intermediate 8192"
    TRAINING=""
fi

failed=""
step() {  # step NAME SECONDS COMMAND...: COMMAND under a time limit, its output into the log
    name=$1
    limit=$2
    shift 2
    echo "== $name (limit $limit s): $*" | tee -a "$LOG"
    begin=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1  # -k: a step deaf to SIGTERM is killed 10 s on
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - begin)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed="$failed $name"
}

# shellcheck disable=SC2086  # the size settings are word lists
# the two files holding gpu tests: collecting the whole suite would import the Hugging Face stack,
# where one failed import would stop every test
step parity 70 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py \
    tests/test_kernels_triton.py
KERNELS="benchmarks/kernel_speed.py --device $DEVICE $KERNEL_SHAPES --modes fwd fwd_bwd \
    --repeats 5 --warmup 2"
# shellcheck disable=SC2086
step kernels 120 $PY $KERNELS --impls $FAST_IMPLS --time-budget 90 --results-dir "$RESULTS"
# shellcheck disable=SC2086
step kernels-reference 100 $PY $KERNELS --impls $SLOW_IMPLS --time-budget 60 --tag reference \
    --results-dir "$RESULTS"
# shellcheck disable=SC2086
step decoding 100 $PY benchmarks/decoding_speed.py --device $DEVICE $DECODING --data "$DATA" \
    --results-dir "$RESULTS"
# shellcheck disable=SC2086
step training 80 $PY benchmarks/train_time.py --device $DEVICE $TRAINING --results-dir "$RESULTS"

if [ -n "$failed" ]; then
    echo "failed:$failed (their output: $LOG)"
    exit 1
fi
echo "all steps passed; results in $RESULTS"
