#!/usr/bin/env bash
# Bring your own LoRAs, end to end on the CPU with the embedded SmolLM2-135M:
#   1. three plain LoRAs, each trained on one domain's text, saved as PEFT folders;
#   2. the three PEFT folders made into one pre-gated pool, only its router trained on the mix;
#   3. decoded from the CLI with --show-routing (a prompt per domain);
#   4. the pool exported as PEFT folders, loaded back here with the same logits, and (with
#      FIXENV pointing at an environment with torch, transformers, peft, gguf) in PEFT itself.
#   bash tools/peft_pool_demo.sh OUT [STEPS_LORA] [STEPS_ROUTER]
# The domain text is the training cache's own (`python -m adafuse_jax.train data`), decoded
# back to text files: the commands read it as a user's --data folder would be read.
set -euo pipefail
out=${1:?OUT}; lora_steps=${2:-60}; router_steps=${3:-200}
work=$out/work
mkdir -p "$work"
log=$out/demo.log
: > "$log"
say() { echo "\$ $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }

python - "$work/text" <<'EOF'
import pathlib, sys
import numpy as np
from adafuse_jax.train import data
from adafuse_jax.weights import load_model
tok = load_model(progress=False).tokenizer
out = pathlib.Path(sys.argv[1])
for domain in ("code", "quotes", "math"):
  stream = np.load(data.default_cache() / f"{domain}.train.npy")[:120_000].astype(np.int64)
  folder = out / domain
  folder.mkdir(parents=True, exist_ok=True)
  for i, start in enumerate(range(0, len(stream), 4000)):  # documents of ~4000 tokens
    (folder / f"{i:03d}.txt").write_text(tok.decode(stream[start:start + 4000].tolist()))
print("domain text:", sorted(p.name for p in out.iterdir()))
EOF

common=(--batch 4 --seq-len 64 --eval-every 1000 --checkpoint-every 1000 --quiet)
for d in code quotes math; do
  say python -m adafuse_jax.train fit --mode lora --num-experts 1 --rank 8 --modules q,k,v,o \
    --data "$work/text/$d" --workdir "$work/runs/lora-$d" --steps "$lora_steps" "${common[@]}" \
    --export "$work/lora-$d"
  say python -m adafuse_jax.export --adapters "$work/lora-$d" --out "$work/peft-$d"
done
say python -m adafuse_jax.train fit --data "$work/text" \
  --adapters "$work/peft-code,$work/peft-quotes,$work/peft-math" \
  --workdir "$work/runs/router" --steps "$router_steps" "${common[@]}" --export "$work/pool3"
say python -m adafuse_jax.decode --adapters "$work/pool3" --show-routing --max-new-tokens 12 \
  --prompt "def merge_sorted(a, b):" --prompt "A fool and his money" \
  --prompt "Let x = 3*y + 2. Solve 4*x - 12 = 0 for y."
say python -m adafuse_jax.export --adapters "$work/pool3" --out "$work/pool3-peft"
python - "$work" "$out/our_logits.npz" <<'EOF' 2>&1 | tee -a "$log"
import pathlib, sys
import numpy as np
from adafuse_jax.adapters.io import load_pool
from adafuse_jax.paths import registry
from adafuse_jax.model import KVCache
from adafuse_jax.weights import load_model
import jax, jax.numpy as jnp
jax.config.update("jax_default_matmul_precision", "highest")
work = pathlib.Path(sys.argv[1])
loaded = load_model(progress=False)
m = loaded.model
ids = np.asarray([loaded.tokenizer.encode("def merge_sorted(a, b):\n    out = []")], np.int32)
def logits(pool):
  cache = KVCache.create(m.cfg, 1, ids.shape[1], m.dtype)
  return np.asarray(m(jnp.asarray(ids), cache, all_logits=True, linear=registry.runtime(pool))[0][0])
arrays = {"prompt": ids[0]}
before, after = load_pool(str(work / "pool3"), m.cfg), load_pool(str(work / "pool3-peft"), m.cfg)
a, b = logits(before), logits(after)
print(f"pool3 -> PEFT folders -> pool3: max |logit difference| {np.abs(a - b).max():.3g}")
for e in range(3):
  arrays[f"expert-{e:02d}"] = logits(load_pool(str(work / "pool3-peft" / f"expert-{e:02d}"), m.cfg))
np.savez(sys.argv[2], **arrays)
EOF
if [ -n "${FIXENV:-}" ]; then
  gguf_path=$(python -c "from adafuse_jax.weights import default_model_path; print(default_model_path())")
  say "$FIXENV/bin/python" tools/peft_check.py "$gguf_path" "$work/pool3-peft" "$out/our_logits.npz"
fi
