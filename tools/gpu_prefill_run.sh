#!/usr/bin/env bash
# One GPU call: the kernel tests compiled (segmented + its Triton peer, gathered), the
# segmented-kernel benchmark, and whole-model prefill of the 7B preset on every expert path.
#   bash tools/gpu_prefill_run.sh OUT_DIR [PART...]   PART: tests kernels prefill (default: all)
# Needs the jax-triton wheel in .whl/ (see README, "GPU runs").
set -uo pipefail
out=${1:?OUT_DIR}; shift
parts=${*:-tests kernels prefill}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for part in $parts; do
  case $part in
    tests)
      timeout 150 python3 -m pytest -q -x tests/test_segmented.py tests/test_sgmv.py 2>&1 \
        | tail -15 | tee "$out/tests.txt" ;;
    kernels)
      timeout ${KERNELS_S:-200} python3 tools/segmented_bench.py --out "$out/kernels" \
        ${KERNEL_ARGS:-} 2>&1 | tail -40 ;;
    prefill)
      timeout ${PREFILL_S:-280} python3 -m adafuse_jax.bench --preset llama2-7b \
        --modes ${MODES:-backbone,pregated,pregated-fused,pregated-packed} \
        --prefill ${PREFILL:-512,2048} \
        --prefill-modes ${MODES:-backbone,pregated,pregated-fused,pregated-packed} \
        --steps 20 --warmup 3 --out "$out/prefill" 2>&1 | tail -40 ;;
  esac
done
