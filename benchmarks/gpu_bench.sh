#!/bin/sh
# The GPU suite in one command (`make gpu-bench`), for a CUDA machine; about 8 minutes budgeted on
# an H100 (not yet run: no session so far had a device). Runs with the machine's own python3
# (PYTHON=... to override) from the repository root; results land in benchmarks/results/, named
# by device (the slug of torch.cuda.get_device_name()).
#   1. GPU parity of both impls against the float64 reference at real shapes (pytest -m gpu)
#   2. the kernel grid: N 256 1024 8192, V 32000 128256 151936, B 10 50, masked fraction 0 0.99,
#      impls triton triton_1sm triton_1warp torch torch_compile torch_ce liger_ce (bf16)
#   3. decoding against `generate` on a random 1B-shaped Llama (hidden 2048, 16 layers)
#   4. the training-time benchmark
# Liger-Kernel is not on the device image: carry its wheel in .whl/ (benchmarks/README.md, "GPU
# suite"); it is installed from there when present, and liger_ce is skipped without it.
set -eu
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
$PY -m pytest -q -p no:cacheprovider -m gpu tests
$PY benchmarks/kernel_speed.py --device cuda --n-rows 256 1024 8192 --vocab 32000 128256 151936 \
    --beam-width 10 50 --masked-fraction 0 0.99 --dtype bf16 \
    --impls triton triton_1sm triton_1warp torch torch_compile torch_ce liger_ce --repeats 5 --warmup 2
$PY benchmarks/decoding_speed.py --device cuda --hidden 2048 --layers 16
$PY benchmarks/train_time.py --device cuda
