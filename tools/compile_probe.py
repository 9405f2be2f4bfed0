"""Why do the server's 7B programs take 30-50 s each to compile on the H200? Compiles one
engine decode step and one `generate` decode step of the same shape, times each compile and
the compiled step, and prints one JSON line. Run it under different XLA_FLAGS to compare:

    python tools/compile_probe.py                                   # XLA's defaults
    XLA_FLAGS=--xla_gpu_autotune_level=0 python tools/compile_probe.py
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.adapters.io import load_pool
from adafuse_jax.generation import Generator
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.serving.steps import SlotSteps
from adafuse_jax.weights import load_model


def main(preset: str = "llama2-7b", batch: int = 32, span: int = 256, steps_timed: int = 30) -> None:
  t0 = time.perf_counter()
  loaded = load_model(preset, dtype=jnp.bfloat16, progress=False)
  pool = load_pool("random:0", loaded.model.cfg, dtype=jnp.bfloat16)
  gen = Generator(loaded.model, adapters=pool, path="packed")
  ready_s = time.perf_counter() - t0
  engine = SlotSteps(gen, max_batch=64, max_len=span, chunk=128, prefill_lengths=[128])
  t = time.perf_counter()
  fn = engine.decode_fn(batch, span)
  engine_compile_s = time.perf_counter() - t
  t = time.perf_counter()
  gen.compiled(batch, 1, span, SamplingConfig())
  generate_compile_s = time.perf_counter() - t
  cache, nxt = engine.new_cache(), engine.new_tokens()
  active = np.ones(batch, bool)
  args = (active, np.zeros(batch, np.float32), np.ones(batch, np.float32),
          np.zeros(batch, np.int32), np.zeros(batch, np.uint32))
  for _ in range(3):
    cache, nxt, new, _ = fn(gen.params, gen.adapter_params, gen.derived, cache, nxt, *args)
  jax.block_until_ready(new)
  t = time.perf_counter()
  for _ in range(steps_timed):
    cache, nxt, new, _ = fn(gen.params, gen.adapter_params, gen.derived, cache, nxt, *args)
  jax.block_until_ready(new)
  step_ms = (time.perf_counter() - t) * 1e3 / steps_timed
  print(json.dumps({"preset": preset, "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": batch, "span": span,
                    "model_and_pool_s": round(ready_s, 1),
                    "engine_decode_compile_s": round(engine_compile_s, 1),
                    "generate_decode_compile_s": round(generate_compile_s, 1),
                    "engine_step_ms": round(step_ms, 3), "device": jax.devices()[0].device_kind,
                    "jax": jax.__version__}))


if __name__ == "__main__":
  import sys
  main(*sys.argv[1:2])
