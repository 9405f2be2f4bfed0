#!/usr/bin/env bash
# Decode latency of backbone / lora / pregated under XLA flag variants (GPU), one process each.
# Usage: bash tools/xla_flags_probe.sh OUT_DIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
cb="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,DYNAMIC_SLICE_FUSION --xla_gpu_graph_min_graph_size=1"
declare -A variants=([default]="" [graphs]="$cb")
for name in default graphs; do
  echo "## XLA_FLAGS variant: $name (${variants[$name]:-none})"
  XLA_FLAGS="${variants[$name]}" timeout 240 python3 -m adafuse_jax.bench --preset llama2-7b \
    --modes backbone,lora,pregated --prefill "" --steps 30 --out "$out/$name" 2>&1 | grep -E "^#   |^\| (backbone|lora|pregated)"
done
