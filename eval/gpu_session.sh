#!/usr/bin/env bash
# One device call that re-checks and re-measures everything GPU-specific (about 8 minutes on an
# H200): the GPU tests (kernel compiled, diagonal through it), the model-scale agreement check,
# then the inference benchmark with every schedule. Results land in $OUT (or ./out).
#   run: bash eval/gpu_session.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_grouped_matmul.py tests/test_diagonal.py \
    -k "gpu or pallas" 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
python3 -m eval.agreement --tokens 16384 2>&1 | grep -v "^[WI]0000" | tee "$OUT/agreement.txt"
python3 -m eval.bench --out "$OUT/inference_h200.json" 2>&1 | grep -v "^[WI]0000" | tee "$OUT/bench.txt"
