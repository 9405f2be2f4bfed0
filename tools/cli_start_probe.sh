#!/usr/bin/env bash
# How long the decode CLI takes to start and answer on the CPU without a compile cache, into an
# empty one, and from the filled one (the default model and its pool, 8 new tokens), ROUNDS
# rounds in that order, each a fresh process: wall seconds and the CLI's own compile_s.
#   bash tools/cli_start_probe.sh [ROUNDS]    (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
for round in $(seq "${1:-1}"); do
  dir=$(mktemp -d)
  for run in off empty filled; do
    opt=$([ "$run" = off ] && echo off || echo "$dir")
    start=$(date +%s.%N)
    compile=$(python -m adafuse_jax.decode --json --adapters default --max-new-tokens 8 \
      --compile-cache "$opt" "def fibonacci(n):" 2>/dev/null \
      | python -c "import json, sys; print(json.load(sys.stdin)['compile_s'])")
    echo "{\"round\": $round, \"cache\": \"$run\", \"wall_s\": $(echo "$(date +%s.%N) - $start" | bc), \"compile_s\": $compile, \"date\": \"$(date -Iseconds)\"}"
  done
  rm -rf "$dir"
done
