#!/usr/bin/env bash
# One GPU call on a machine without network: the kernel tests compiled, the layer-loop facts,
# and the decode bench of the 7B preset on every path.
#   bash tools/gpu_check.sh OUT_DIR [PART...]    PART: tests layers bench floor serve probe swiglu-down append-delta gemv norm-fold flags step host prefill autotune expand attention switch bgmv-sweep gathered-probe
#   (default: tests layers bench)
# Carry `.whl` (the gguf wheel the GPU image lacks: `python3 -m pip download --no-deps -d .whl
# gguf==0.19.0`); the default model's GGUF does not travel, so its tests are left out here.
# OUT_DIR gets at most 8 files: tests.log, layer-loop/{layer_loop.json,.md}, batch1/{results.json,
# table.md,decode.png}, bench.log. `floor`: the 7B preset at batch 1 and 32 with the memory
# ceiling, rows interleaved over rounds and the PyTorch peer (floor-b1/, floor-b32/, floor.log).
# `serve`: the OpenAI server under load beside the static-batch and sequential decoders
# (load/{results.json,results.md,load.png}, load.log); COMPILE_CACHE=DIR loads and fills JAX's
# compilation cache there, SAVE_CACHE=1 sends it back as jcc.tgz.* (at most 3 pieces fit $OUT).
# `gathered-probe`: the whole gathered SERE step with the expansion's settings varied
# (gathered-probe.jsonl; EXPERTS, RANK, TOP_K, BATCH, ROUNDS, VARIANTS=library,fused-base,load,registers,
# static,static-summed,xla-base,xla-base-static; `python tools/gathered_probe.py --table FILE`
# renders it).
set -uo pipefail
out=${1:?OUT_DIR}; shift
parts=${*:-tests layers bench}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/gguf-*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site JAX_COMPILATION_CACHE_DIR=/tmp/jcc
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for part in $parts; do
  case $part in
    tests)
      timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py tests/test_rms_norm.py \
        tests/test_bgmv.py tests/test_sgmv.py tests/test_sgmm.py tests/test_sgmm_mosaic.py -k "not default_model" \
        2>&1 | tee "$out/tests.log" | tail -5 ;;
    layers)
      timeout "${LAYERS_S:-150}" python3 tools/layer_loop_bench.py --out "$out/layer-loop" ;;
    bench)
      timeout "${BENCH_S:-420}" python3 -m adafuse_jax.bench --preset llama2-7b --prefill "" \
        --steps "${STEPS:-30}" --out "$out/batch1" \
        --modes "${MODES:-backbone,pregated-xla,pregated-packed,pregated-gathered,pregated-merged}" \
        2>&1 | tee "$out/bench.log" | tail -25 ;;
    floor)
      # JAX preallocates 75% of the GPU by default: leave room for the PyTorch peer's weights
      # and cache in the same process.
      export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.6}
      export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
      # MODES_B1 / MODES_B32 pick rows per batch size (MODES both); PEER_SMALL=off / PEER_LARGE=off
      # leave the PyTorch peer out at batch 8 and below / above it; EXPERTS, RANK, TOP_K shape
      # the pool (default 8, 16, 2; the folder then ends in -eEXPERTSrRANK-bBATCH; a pool of 64
      # rank-64 experts wants MEM_FRACTION=0.9 and the peer off: every row's weights stay alive).
      for b in ${BATCHES:-1 32}; do
        modes=${MODES:-${MODES_B1:-backbone,backbone-packed,pregated-packed,pregated-gathered,layerwise-packed}}
        peer=${PEER_SMALL:-auto}
        if [ "$b" -gt 8 ]; then
          modes=${MODES:-${MODES_B32:-backbone,backbone-packed,pregated-packed,pregated-gathered,layerwise-packed}}
          peer=${PEER_LARGE:-auto}
        fi
        timeout "${FLOOR_S:-280}" python3 -m adafuse_jax.bench --preset "${PRESET:-llama2-7b}" \
          --prefill "" --batch "$b" --steps "${STEPS:-32}" --rounds "${ROUNDS:-5}" \
          ${EXPERTS:+--experts $EXPERTS} ${RANK:+--rank $RANK} ${TOP_K:+--top-k $TOP_K} \
          --modes "$modes" --torch-peer "$peer" --out "$out/floor${PRESET:+-$PRESET}${EXPERTS:+-e$EXPERTS}${RANK:+r$RANK}-b$b" 2>&1 \
          | tee -a "$out/floor.log" | tail -14
      done ;;
    serve)
      # The server stack's wheels travel in .whl too (`python3 -m pip download -d .whl fastapi
      # uvicorn prometheus-client httpx` plus pydantic-core for the image's Python; HTTP_STACK=
      # "httptools uvloop" installs those too, which uvicorn then takes by itself).
      python3 -m pip install -q --no-index --find-links .whl --no-compile --target /tmp/site \
        fastapi uvicorn prometheus-client httpx ${HTTP_STACK:-} >/dev/null 2>&1 || exit 1
      export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.85}
      timeout "${SERVE_S:-595}" python3 -m adafuse_jax.bench.load --model "${PRESET:-llama2-7b}" \
        --tokenizer bytes --adapters "${POOL:-random:0}" --path "${SERVE_PATH:-packed}" \
        --concurrency "${LEVELS:-1,8,32,64}" ${REQUESTS:+--requests $REQUESTS} --rounds "${ROUNDS:-3}" --max-tokens "${TOKENS:-128}" \
        --sequential "${SEQUENTIAL:-8}" --chunk "${CHUNK:-256}" ${PREFILL_LENGTHS:+--prefill-lengths $PREFILL_LENGTHS} \
        ${PACKED:+--packed-prefill $PACKED} ${PREFILL_ROWS:+--prefill-rows $PREFILL_ROWS} ${MIXED:+--mixed-prefill $MIXED} ${COMPARE_MIXED:+--compare-mixed} ${IN_PROCESS:+--in-process} \
        ${PREFILL_WAIT:+--prefill-wait $PREFILL_WAIT} ${COMPARE_WAIT:+--compare-prefill-wait} \
        --time-limit "${LIMIT_S:-480}" ${COMPILE_CACHE:+--compile-cache $COMPILE_CACHE} \
        --out "$out/load" 2>&1 | tee "$out/load.log" | tail -20
      # The filled cache goes back in pieces of at most 15 MiB, for the next call to carry:
      # `cat jcc.tgz.* | tar -xz -C .jcc` here, then carry .jcc (ignored) with COMPILE_CACHE=.jcc.
      if [ -n "${COMPILE_CACHE:-}" ] && [ -n "${SAVE_CACHE:-}" ]; then
        tar -C "$COMPILE_CACHE" -cz . | split -b 15m - "$out/jcc.tgz."
      fi ;;
    probe)
      # Why compiles are slow and where a step's time goes: compile_probe under XLA's defaults
      # and without autotuning, then the per-kernel profile of two decode steps.
      for flags in "" "--xla_gpu_autotune_level=0"; do
        XLA_FLAGS="$flags" timeout "${PROBE_S:-240}" python3 tools/compile_probe.py 2>>"$out/probe.log" \
          | tee -a "$out/compile_probe.jsonl"
      done
      for mode in ${PROFILE_MODES:-backbone backbone-packed pregated-packed}; do
        timeout 200 python3 tools/kernel_breakdown.py --preset llama2-7b --mode "$mode" \
          --out /tmp/kb >>"$out/probe.log" 2>&1 && cat /tmp/kb/kernels_"$mode".md >>"$out/kernels.md"
      done ;;
    swiglu-down)
      # The MLP's tail as one Pallas launch (pallas_kernels/swiglu_down) and q/k/v's expert delta
      # in the appending attention kernel: their tests compiled, the MLP probe against XLA's
      # kernels (swiglu-down.jsonl), and the 7B step at batch 1 with both (backend "triton" on
      # the packed path) beside XLA's, interleaved (fused-mlp-b1/).
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_swiglu_down.py \
        tests/test_decode_attention.py -k "swiglu or delta" 2>&1 \
        | tee "$out/swiglu-down-tests.log" | tail -3
      timeout "${FLOOR_S:-300}" python3 -m adafuse_jax.bench --preset llama2-7b --prefill "" \
        --batch "${BATCH:-1}" --steps 32 --rounds "${ROUNDS:-5}" --torch-peer off \
        --modes "${MODES:-backbone-packed,backbone-packed@triton,pregated-packed,pregated-packed@triton}" \
        --out "$out/fused-mlp-b${BATCH:-1}" 2>&1 | tee -a "$out/swiglu-down.log" | tail -8
      (cd tools && timeout "${SWIGLU_S:-200}" python3 swiglu_down_probe.py --rounds "${ROUNDS:-5}" \
        ${TILES:+--tiles $TILES} 2>>"$out/swiglu-down.log" | tee "$out/swiglu-down.jsonl" | cut -c1-150) ;;
    append-delta)
      # The appending attention kernel with q/k/v's expert delta at several widths of its column
      # block and grids (tools/append_delta_probe.py; VARIANTS) against the plain kernel.
      (cd tools && timeout "${APPEND_DELTA_S:-200}" python3 append_delta_probe.py --rounds "${ROUNDS:-5}" \
        ${VARIANTS:+--variants $VARIANTS} 2>>"$out/append-delta.log" | tee "$out/append-delta.jsonl" | cut -c1-150) ;;
    gemv)
      # XLA's dot against Pallas GEMVs (Triton split-K, Mosaic GPU swap-AB; KINDS) on the 7B
      # module shapes (tools/gemv_sweep.py).
      timeout "${GEMV_S:-480}" python3 tools/gemv_sweep.py --out "$out" --kinds "${KINDS:-triton,mosaic}" \
        2>>"$out/gemv.log" | tee "$out/gemv.jsonl" | grep -v error | cut -c1-110 ;;
    norm-fold)
      # RMSNorm folded into the next matmul (its scale applied to the output) against the
      # library's norm-then-matmul, 7B q/k/v and gate/up shapes (tools/norm_fold_probe.py).
      timeout "${NORM_FOLD_S:-300}" python3 tools/norm_fold_probe.py 2>"$out/norm-fold.log" \
        | tee "$out/norm-fold.jsonl" | cut -c1-140 ;;
    flags)
      # One decode row under several XLA flag sets (a process each: flags are per process):
      # XLA's Triton GEMMs, cuBLAS, and command buffers (CUDA graphs) for every kernel kind.
      XLA_FLAGS=--help python3 -c "import jax; jax.numpy.zeros(1)" 2>&1 \
        | grep -E -A2 "command_buffer|graph_min|triton_gemm[= ]" >"$out/xla_flags_help.txt"
      i=0
      while IFS= read -r flags; do
        i=$((i + 1))
        echo "== flags: ${flags:-(defaults)}" | tee -a "$out/flags.log"
        XLA_FLAGS="$flags" timeout "${FLAGS_S:-150}" python3 -m adafuse_jax.bench --preset llama2-7b \
          --prefill "" --batch 1 --steps 32 --rounds 3 --modes "${MODES:-backbone-packed}" --torch-peer off \
          --out "/tmp/flags/$i" 2>&1 | grep -E "^\| (backbone|pregated)" | tee -a "$out/flags.log"
      done <<< "${FLAG_SETS:-$(printf '%s\n' "" "--xla_gpu_enable_triton_gemm=false" \
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION --xla_gpu_graph_min_graph_size=1")}" ;;
    host)
      # The host threads' time in synced decode steps through the library's Decoder, per mode
      # and hand-out form (tools/host_trace.py; host_MODE_FORM.md, at most 4 files).
      for mode in ${HOST_MODES:-backbone-packed pregated-packed}; do
        for form in ${HAND_OUTS:-program outputs}; do
          timeout "${HOST_S:-150}" python3 tools/host_trace.py --mode "$mode" --hand-out "$form" \
            --out /tmp/host 2>>"$out/host.log" | head -12
          cp /tmp/host/host_*.md "$out/" 2>/dev/null
        done
      done ;;
    step)
      # Pipelined, synced and host-dispatch time of one decode step per XLA compiler option set
      # (tools/step_probe.py; STEP_OPTIONS=defaults compiles only XLA's defaults beside the
      # swapped, no-work and stable-buffer programs), interleaved in one process.
      for mode in ${STEP_MODES:-backbone-packed pregated-packed}; do
        timeout "${STEP_S:-200}" python3 tools/step_probe.py --mode "$mode" \
          ${STEP_OPTIONS:+--options "$STEP_OPTIONS"} ${STEP_SWAPS:+--swaps "$STEP_SWAPS"} 2>>"$out/step.log" \
          | tee -a "$out/step.jsonl"
      done
      # The host's cost of one call by its number of arrays (a 7B packed step takes ~206).
      timeout 120 python3 tools/dispatch_probe.py --out "$out/dispatch.jsonl" 2>>"$out/step.log" \
        | cut -c1-60 ;;
    prefill)
      # A prompt pass with XLA's attention in token order (dot_generals, the CPU's form) beside
      # the head order (einsums, the GPU's), interleaved in one process (tools/prefill_probe.py;
      # prefill.jsonl).
      timeout "${PREFILL_S:-300}" python3 tools/prefill_probe.py --mode "${PREFILL_MODE:-backbone-packed}" \
        --batches "${BATCHES:-1,8}" --length "${LENGTH:-512}" --rounds "${ROUNDS:-5}" \
        2>"$out/prefill.log" | tee "$out/prefill.jsonl" | cut -c1-200 ;;
    autotune)
      # What a second start of the server saves: compile_probe on empty caches, then again with
      # XLA's per-fusion autotune cache kept on disk (JAX's compilation cache off, so it compiles
      # again), then with JAX's compilation cache too (populate, reuse).
      XLA_FLAGS=--help python3 -c "import jax; jax.numpy.zeros(1)" 2>&1 \
        | grep -E -A2 "autotune_cache|autotune_level" >"$out/autotune_flags_help.txt"
      rm -rf /tmp/atc /tmp/jcc-probe
      for run in autotune-populate autotune-reuse jax-populate jax-reuse; do
        jcc=; [ "${run#jax}" != "$run" ] && jcc=/tmp/jcc-probe
        JAX_COMPILATION_CACHE_DIR=$jcc XLA_FLAGS="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/atc" \
          timeout "${PROBE_S:-240}" python3 tools/compile_probe.py 2>>"$out/autotune.log" \
          | sed "s/^{/{\"run\": \"$run\", /" | tee -a "$out/autotune.jsonl"
      done
      ls /tmp/atc | wc -l >>"$out/autotune.log" ;;
    expand)
      # The packed path's expansion written several ways: kernels per step and interleaved time
      # beside the backbone's packed step (expand.jsonl).
      timeout "${EXPAND_S:-540}" python3 tools/expand_probe.py --preset "${PRESET:-llama2-7b}" \
        --batches "${BATCHES:-1,32}" --rounds "${ROUNDS:-5}" ${VARIANTS:+--variants "$VARIANTS"} \
        2>"$out/expand.log" | tee "$out/expand.jsonl" ;;
    attention)
      # One decode token's grouped-query attention written several ways, alone, per preset and
      # batch (attention.jsonl; kernel tables in attention.log).
      timeout "${ATTENTION_S:-240}" python3 tools/attention_probe.py \
        --presets "${PRESETS:-llama2-7b,mistral-7b}" --batches "${BATCHES:-1,32}" \
        ${VARIANTS:+--variants "$VARIANTS"} \
        2>"$out/attention.log" | tee "$out/attention.jsonl" | cut -c1-160 ;;
    switch)
      # The SGMM switch kernel alone on the 7B shapes (Triton lowering at its default tiles,
      # Mosaic GPU at several, plain XLA), against the memory ceiling of the same run.
      timeout "${SWITCH_S:-240}" python3 tools/sgmm_bench.py --quick --mosaic --out "$out/sgmm" \
        2>&1 | tee "$out/switch.log" | grep -E "ceiling|xla|mosaic|pallas" | head -20 ;;
    bgmv-sweep)
      # The gathered shrink and the expansion-only kernel for wide pools, per 7B group and
      # module, over a grid of tiles, wall time and the kernels' own GPU time
      # (tools/bgmv_large_sweep.py; QUICK=1: four tile sets each; KINDS=expand,expand-static...
      # and SWEEP_GROUPS=q/k/v,... pick rows; the static slot loop is checked against the
      # default one first).
      timeout "${SWEEP_S:-540}" python3 tools/bgmv_large_sweep.py --out "$out/bgmv-sweep" \
        --experts "${EXPERTS:-64}" --rank "${RANK:-64}" --rows "${ROWS:-32}" --check \
        --active "${ACTIVE:-26,56}" ${QUICK:+--quick} ${KINDS:+--kinds "$KINDS"} \
        ${SWEEP_GROUPS:+--groups "$SWEEP_GROUPS"} 2>"$out/bgmv-sweep.log" \
        | tee "$out/bgmv-sweep.jsonl" | cut -c1-140 ;;
    gathered-probe)
      # The whole pregated-gathered(+sere) step with the expansion kernel's settings varied,
      # interleaved beside the fused-weight backbone and pregated-packed (tools/gathered_probe.py).
      export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9}
      timeout "${PROBE_S:-420}" python3 tools/gathered_probe.py --experts "${EXPERTS:-64}" \
        --rank "${RANK:-64}" --top-k "${TOP_K:-4}" --batch "${BATCH:-32}" --rounds "${ROUNDS:-5}" \
        ${VARIANTS:+--variants "$VARIANTS"} 2>"$out/gathered-probe.log" \
        | tee "$out/gathered-probe.jsonl" | cut -c1-160 ;;
    *) echo "unknown part $part (tests, layers, bench, floor, serve, probe, gemv, norm-fold, flags, step, prefill, autotune, expand, attention, switch, bgmv-sweep, gathered-probe)"; exit 2 ;;
  esac
done
