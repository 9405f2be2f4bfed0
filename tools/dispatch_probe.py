"""What one call of a compiled program costs the host, by its number of array arguments.

    python tools/dispatch_probe.py [--counts 1,16,64,128,206,400] [--rounds 7] [--out FILE]

A program that does no work (returns its first argument plus one) is called with N small
arrays, back to back, for each N in interleaved rounds; prints JSON lines: median µs per call.
Why: a 7B decode step on the packed path takes about 206 arrays (12 of the model's parameters,
128 packed per-layer weights, 66 cache buffers and lengths), and its synced latency waits for
the host's dispatch before the GPU starts (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.timing import time_pipelined


def per_call_us(fn, args, calls: int) -> float:
  """µs per call of `calls` calls back to back, one sync at the end (after one warm call)."""
  return time_pipelined(lambda: fn(*args), warmup=1, steps=calls, repeats=1).median_ms * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--counts", default="1,16,64,128,206,400")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--calls", type=int, default=200)
  p.add_argument("--out", default=None, help="also write the JSON lines here")
  args = p.parse_args()
  counts = [int(c) for c in args.counts.split(",")]
  programs = {}
  for n in counts:
    arrays = [jnp.full((4,), float(i), jnp.float32) for i in range(n)]
    programs[n] = (jax.jit(lambda *a: a[0] + 1), arrays)
  samples: dict[int, list[float]] = {n: [] for n in counts}
  for _ in range(args.rounds):
    for n, (fn, arrays) in programs.items():
      samples[n].append(per_call_us(fn, arrays, args.calls))
  dev = jax.devices()[0]
  lines = [json.dumps({"arguments": n, "us_per_call": float(np.median(s)), "rounds_us": s,
                       "device": dev.device_kind, "jax": jax.__version__})
           for n, s in samples.items()]
  print("\n".join(lines))
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
