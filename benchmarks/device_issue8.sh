#!/usr/bin/env bash
# Issue 8's GPU checks in one device-tool call (about 8 minutes on an H100/H200; the tool allows 10):
#   1. the CUDA tests (kernels, decode, pipeline on CUDA),
#   2. benchmarks/kernels.py (per-shape table, Tuner picks, decode tokens/s),
#   3. benchmarks/gptq_solver_speed.py (one 8B layer: eager vs Triton column loop),
#   4. benchmarks/gptq_gpu_speed.py (qforge on the 32-layer 8B shape; llm-compressor on 4 layers).
# Here first: `bash scripts/device_wheels.sh`; then the device tool's run with carry [".whl"] and the
# command `bash benchmarks/device_issue8.sh [STEP ...]` (steps: tests kernels solver gptq; default all). Logs and JSON rows land in $OUT; each step has its own limit,
# so a slow step cannot take the later ones with it.
set -uo pipefail
OUT=${OUT:-/tmp/qforge-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
STEPS=${*:-tests kernels solver gptq}             # a later call can run what an earlier one had no time for
for step in $STEPS; do
  case $step in
    # the CUDA tests only: the interpreter and sm_90-compile tests are CI's (the image's Triton 3.6 interpreter
    # mis-evaluates scalar loop bounds; its compiler was checked here with the sm_90 tests under Triton 3.6)
    tests) timeout 120 python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_kernels.py tests/test_gptq.py \
             tests/test_decode.py tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    kernels) timeout 200 python3 benchmarks/kernels.py --out "$OUT/kernels.jsonl" 2>&1 | tee "$OUT/kernels.log" | tail -45 ;;
    solver) timeout 40 python3 benchmarks/gptq_solver_speed.py --device cuda 2>&1 | tee "$OUT/solver.log" ;;
    gptq) timeout 240 python3 benchmarks/gptq_gpu_speed.py --device cuda --peer-layers 4 2>&1 | tee "$OUT/gptq.log" ;;
    *) echo "unknown step $step (tests, kernels, solver, gptq)"; exit 2 ;;
  esac
done
