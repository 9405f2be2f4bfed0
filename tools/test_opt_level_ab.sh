#!/usr/bin/env bash
# The test suite's compile level on the CPU: three of its heaviest tests (a notebook, the decode
# CLI twice in subprocesses, a bf16 training run) under XLA's default LLVM level (2) and at -O0
# (what tests/conftest.py sets on a CPU-only run), alternating over ROUNDS rounds, one pytest
# process each. Prints one line per test and round:  round level seconds test.
#   bash tools/test_opt_level_ab.sh [ROUNDS]    (default 2; ~4 min a pytest process on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
tests=(
  "tests/test_notebooks.py::test_notebook_runs_top_to_bottom[01_quickstart]"
  "tests/test_cli.py::test_shipped_pool_is_trained_and_decodes_merged_as_unmerged"
  "tests/test_adapters.py::test_tied_pool_at_beta_zero_trains_bit_for_bit_as_its_lora_in_bf16[8-layerwise]"
)
for round in $(seq "${1:-2}"); do
  for level in 2 0; do
    XLA_FLAGS="--xla_backend_optimization_level=$level" python -m pytest -q -p no:cacheprovider \
      --durations=0 --durations-min=1 "${tests[@]}" 2>&1 \
      | awk -v r="$round" -v l="$level" '/s call / {print r, "O" l, $1, $3} / passed| failed/ {print r, "O" l, "total", $0}'
  done
done
