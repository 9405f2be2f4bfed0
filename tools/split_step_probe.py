"""Would a decode step split into several programs wait less on the host? (GPU; `--small` on
the CPU.)

    python tools/split_step_probe.py [--parts 2] [--rounds 7]            # GPU; JSON lines
    python tools/split_step_probe.py --small --rounds 2                  # the probe, on a CPU

Why: of a synced 7B step's ~1.1 ms host call, `cuGraphLaunch` of the step's one CUDA graph takes
~840 µs (about 2 µs a kernel) before the GPU starts (docs/benchmarks/h100/host-trace/). A step
run as P programs of L/P layers each would start the GPU after the first program's launch and
launch the others while it runs. The library's step is one program; this probe asks whether the
split is worth building without building it: beside the whole model (`whole`) it runs P models
of L/P layers each (`split-P`: the same preset with fewer layers, random weights), each through
the library's `Decoder` (the fused-weight backbone), one after the other, each fed the token the
one before sampled. Every part carries its own embedding and head, so the split rows do P - 1
heads' more work on the GPU (for Llama-2-7B 262 MB of head weights each, and one more sampling
and dispatch): a gain they show is the lower bound of what a real split would gain. Rows are timed synced (each step waits for its
last token) and pipelined, in interleaved rounds; ratios to `whole` paired by round, median
[95% t-interval].
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench import measure as B
from adafuse_jax.bench.measure import ratio_interval
from adafuse_jax.config import PRESETS
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.stepper import Decoder
from adafuse_jax.timing import time_calls, time_pipelined
from adafuse_jax.vocab import parse_variant


def decoders(preset: str, parts: int, cache_len: int, dtype) -> list[Decoder]:
  """`parts` Decoders of the fused-weight backbone, each over L/parts layers of `preset`."""
  cfg = PRESETS[preset]
  if cfg.layers % parts:
    raise SystemExit(f"error: {cfg.layers} layers do not split into {parts} parts")
  cfg = dataclasses.replace(cfg, layers=cfg.layers // parts)
  variant, _ = parse_variant("backbone-packed")
  out = []
  for i in range(parts):
    gen = B.variant_generator(LlamaModel(cfg, dtype=dtype, seed=i), variant, None)
    cache = gen.new_cache(1, cache_len)
    out.append(Decoder(gen, jnp.ones((1,), jnp.int32), cache, jax.random.key(i),
                       SamplingConfig()))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="llama2-7b")
  p.add_argument("--parts", default="2", help="comma-separated part counts, a row each")
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--small", action="store_true", help="smollm2-135m in f32 (a CPU smoke run)")
  args = p.parse_args()
  preset = "smollm2-135m" if args.small else args.preset
  dtype = jnp.float32 if args.small else jnp.bfloat16
  rows = {"whole": decoders(preset, 1, args.cache_len, dtype)}
  rows.update({f"split-{n}": decoders(preset, int(n), args.cache_len, dtype)
               for n in args.parts.split(",")})

  def reset(parts: list[Decoder]) -> None:  # every timing starts from a half-filled cache
    for d in parts:
      d.cache = d.cache.replace(length=jnp.asarray(args.cache_len // 2, jnp.int32))

  def step(parts: list[Decoder]) -> jax.Array:
    token = None
    for d in parts:  # each part takes the token the part before it sampled
      if token is not None:
        d.state = dataclasses.replace(d.state, tokens=token[:, None])
      token = d.step()[0]
    return token

  times = {name: {"synced": [], "pipelined": []} for name in rows}
  for name, parts in rows.items():  # compile and warm
    reset(parts)
    jax.block_until_ready(step(parts))
  steps = 3 if args.small else args.steps
  for _ in range(args.rounds):
    for name, parts in rows.items():
      reset(parts)
      times[name]["synced"].append(
          time_calls(lambda parts=parts: step(parts), warmup=1, steps=steps).median_ms)
      reset(parts)
      times[name]["pipelined"].append(
          time_pipelined(lambda parts=parts: step(parts), warmup=1, steps=steps,
                         repeats=1).median_ms)
  device = jax.devices()[0].device_kind
  for name in rows:
    print(json.dumps({
        "row": name, "preset": preset, "device": device, "jax": jax.__version__,
        **{f"{kind}_ms": round(float(np.median(t)), 3) for kind, t in times[name].items()},
        **{f"vs_whole_{kind}": ratio_interval(t, times["whole"][kind])
           for kind, t in times[name].items()}}), flush=True)


if __name__ == "__main__":
  main()
