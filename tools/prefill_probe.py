"""One prompt pass (prefill) with XLA's attention written in each of its forms, timed side by
side in one process: `library` (`model.layers.attention`: the form this backend takes),
`token-order` (`token_order_attention`: two `lax.dot_general`s, results [B, Hkv, T, G, ...], the
CPU's since 2026-12-04) and `einsum` (`head_order_attention`: einsums, results [B, Hkv, G, T,
...], the GPU's). A prompt pass runs XLA's attention on every backend (the decode kernels take
one token), so a form chosen for the CPU's decode reaches the GPU's prompts too: this says what
it does there.

    PYTHONPATH=. python tools/prefill_probe.py [--preset llama2-7b --mode backbone-packed \
        --batches 1,8 --length 512 --rounds 5]                      # GPU, bf16
    PYTHONPATH=. python tools/prefill_probe.py --preset smollm2-135m --batches 1 --length 128

Each form is one AOT-compiled `Generator._forward` over tokens [B, length] into an empty cache of
`--cache-len` slots; forms are timed in interleaved rounds (A B A B ...) of `--calls` calls each.
JSON lines: ms per pass (median over rounds), tokens/s, each form's ratio to the first form
(`vs_<first form>`: paired by round, median and 95% t-interval, as the bench's ratios), and the
largest absolute difference of its logits from the first form's.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench import measure as B
from adafuse_jax.config import PRESETS, AdapterConfig
from adafuse_jax.model.layers import attention, head_order_attention, token_order_attention
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.vocab import parse_variant

FORMS = {"library": attention, "token-order": token_order_attention,
         "einsum": head_order_attention}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="llama2-7b")
  p.add_argument("--mode", default="backbone-packed")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--length", type=int, default=512, help="prompt tokens per row")
  p.add_argument("--cache-len", type=int, default=None, help="default: twice --length")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=5, help="passes per form and round")
  p.add_argument("--forms", default="token-order,einsum")
  args = p.parse_args()
  forms = args.forms.split(",")
  unknown = sorted(set(forms) - set(FORMS))
  if unknown:
    p.error(f"--forms: unknown {', '.join(unknown)}; choose from {', '.join(FORMS)}")
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  model = LlamaModel(PRESETS[args.preset], dtype=dtype)
  variant, _ = parse_variant(args.mode)
  adapters = (B.build_adapters(model.cfg, variant.mode, AdapterConfig(), dtype, 0)
              if variant.mode is not None else None)
  gen = B.variant_generator(model, variant, adapters)
  sampling = SamplingConfig()
  cache_len = args.cache_len or 2 * args.length
  key = jax.random.key(0)
  for batch in (int(b) for b in args.batches.split(",")):
    tokens = jax.random.randint(jax.random.key(batch), (batch, args.length), 0,
                                model.cfg.vocab_size, jnp.int32)
    passes, logits = {}, {}
    for form in forms:
      gen.attend_fn = FORMS[form]
      state = {"cache": gen.new_cache(batch, cache_len)}
      t = time.perf_counter()
      fn = jax.jit(gen._forward, static_argnums=(6,), donate_argnums=(4,)).lower(
          gen.params, gen.adapter_params, gen.derived, tokens, state["cache"], key,
          sampling).compile()
      compile_s = time.perf_counter() - t

      def run(fn=fn, state=state):
        # The donated cache comes back written; its length set back to 0, the next pass
        # writes the same slots (no fresh buffers allocated inside the timing).
        nxt, out, cache, _ = fn(gen.params, gen.adapter_params, gen.derived, tokens,
                                state["cache"], key)
        state["cache"] = cache.replace(length=jnp.zeros((), jnp.int32))
        return nxt, out

      logits[form] = np.asarray(run()[1], np.float32)
      passes[form] = (run, compile_s)
    times = {form: [] for form in forms}
    for _ in range(args.rounds):
      for form in forms:
        run = passes[form][0]
        jax.block_until_ready(run())  # warm after the other form's passes
        ms = []
        for _ in range(args.calls):
          t = time.perf_counter()
          jax.block_until_ready(run()[1])
          ms.append((time.perf_counter() - t) * 1e3)
        times[form].append(float(np.median(ms)))
    first = times[forms[0]]
    for form in forms:
      ratio = B.ratio_interval(times[form], first)
      print(json.dumps({
          "form": form, "preset": args.preset, "mode": args.mode, "batch": batch,
          "length": args.length, "cache_len": cache_len, "rounds": args.rounds,
          "ms": round(float(np.median(times[form])), 3),
          "tokens_per_s": round(batch * args.length / np.median(times[form]) * 1e3, 1),
          f"vs_{forms[0]}": {k: round(v, 4) for k, v in ratio.items()},
          "max_abs_logit_diff": float(np.max(np.abs(logits[form] - logits[forms[0]]))),
          "compile_s": round(passes[form][1], 1), "rounds_ms": [round(x, 3) for x in times[form]],
          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}), flush=True)


if __name__ == "__main__":
  main()
