"""Does folding RMSNorm into the next matmul save the decode step a kernel? (GPU probe)

    python tools/norm_fold_probe.py [--batches 1,32 --rounds 5]      # one JSON line per row

RMSNorm's per-row scale factors out of the matmul that follows it:

    rms_norm(x, γ) @ W  =  rsqrt(mean(x²) + eps) · (x @ (γ ∘ W))

so with γ folded into the weight once (at packing), the step multiplies the matmul's *output*
by the scale instead of writing a normalised copy of x first. Whether that saves anything
depends on what XLA fuses: the library's form runs a reduction, a multiply that writes the
normalised x, then the GEMM; the folded form runs the reduction and the GEMM, and a multiply
after it unless XLA fuses it into the GEMM's epilogue. This probe times both forms on the
Llama-2-7B shapes that follow a norm (fused q/k/v, fused gate/up) over 8 distinct layers,
chained as a decode step chains them, in interleaved rounds, and counts each compiled
program's kernels (fusions, custom calls, library calls).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from adafuse_jax.bench.measure import count_kernels, ratio_interval
from adafuse_jax.model.layers import rms_norm
from adafuse_jax.timing import time_pipelined

HIDDEN = 4096
SHAPES = {"qkv": 12288, "gate_up": 22016}
LAYERS = 8
EPS = 1e-5


def library_form(x, gamma, w):
  return rms_norm(x, gamma, EPS) @ w


def folded_form(x, gamma_unused, w_folded):
  del gamma_unused  # folded into the weight
  x32 = x.astype(jnp.float32)
  scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)
  y = jnp.dot(x, w_folded, preferred_element_type=jnp.float32)
  return (y * scale).astype(x.dtype)


def chained(form):
  """LAYERS layers of norm + matmul, each layer's input the last one's output (a residual add of
  its first columns), as a decode step chains its layers."""
  @jax.jit
  def run(x, gammas, ws):
    for gamma, w in zip(gammas, ws):
      x = x + form(x, gamma, w)[:, :x.shape[1]]
    return x
  return run


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batches", default="1,32")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--shrink", type=int, default=1,
                 help="divide every dimension by this (a CPU smoke run; the figures need 1)")
  args = p.parse_args()
  key = jax.random.key(0)
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  hidden = HIDDEN // args.shrink
  for name, n in SHAPES.items():
    n //= args.shrink
    ws = [jax.random.normal(jax.random.fold_in(key, i), (hidden, n), dtype) * 0.02
          for i in range(LAYERS)]
    gammas = [1.0 + 0.1 * jax.random.normal(jax.random.fold_in(key, 100 + i), (hidden,), dtype)
              for i in range(LAYERS)]
    folded = [(g.astype(jnp.float32)[:, None] * w.astype(jnp.float32)).astype(dtype)
              for g, w in zip(gammas, ws)]
    forms = {"library": (chained(library_form), ws), "folded": (chained(folded_form), folded)}
    for batch in (int(b) for b in args.batches.split(",")):
      x = jax.random.normal(jax.random.fold_in(key, batch), (batch, hidden), dtype)
      want = forms["library"][0](x, gammas, ws).astype(jnp.float32)
      got = forms["folded"][0](x, gammas, folded).astype(jnp.float32)
      err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
      tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
      assert err < tol, f"{name} batch {batch}: folded form differs by {err}"
      kernels = {f: count_kernels(fn.lower(x, gammas, w).compile()) for f, (fn, w) in forms.items()}
      times = {f: [] for f in forms}
      for _ in range(args.rounds):
        for f, (fn, w) in forms.items():
          times[f].append(time_pipelined(lambda: fn(x, gammas, w), warmup=2, steps=args.steps,
                                         repeats=1).median_ms * 1e3 / LAYERS)
      for f, ts in times.items():
        ratio = ratio_interval(ts, times["library"])
        print(json.dumps({"shape": name, "batch": batch, "form": f, "shrink": args.shrink,
                          "us_per_layer": round(sorted(ts)[len(ts) // 2], 2),
                          "median_ratio_to_library": round(ratio["median"], 4),
                          "ratio_95": [round(ratio.get("low", ratio["median"]), 4),
                                       round(ratio.get("high", ratio["median"]), 4)],
                          "kernels_per_call": kernels[f], "rounds": len(ts),
                          "max_rel_err": round(err, 6), "device": jax.devices()[0].device_kind,
                          "jax": jax.__version__,
                          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}), flush=True)


if __name__ == "__main__":
  main()
