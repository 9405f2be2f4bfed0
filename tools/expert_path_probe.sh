#!/usr/bin/env bash
# Decode latency of the unmerged adapter modes under each expert_delta formulation (GPU), one
# process per formulation (ADAFUSE_EXPERT_PATH), plus the backbone and the fused kernel once.
# Usage: bash tools/expert_path_probe.sh OUT_DIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
timeout 150 python3 -m adafuse_jax.bench --preset llama2-7b --modes backbone,pregated-fused \
  --prefill "" --steps 30 --out "$out/base" 2>&1 | grep -E "^#   "
for path in gather dense slices; do
  echo "## ADAFUSE_EXPERT_PATH=$path"
  ADAFUSE_EXPERT_PATH=$path timeout 120 python3 -m adafuse_jax.bench --preset llama2-7b \
    --modes lora,pregated --prefill "" --steps 30 --out "$out/$path" 2>&1 | grep -E "^#   "
done
