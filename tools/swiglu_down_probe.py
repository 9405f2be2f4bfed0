"""The MLP's tail of a 7B packed decode step in one Pallas launch (`pallas_kernels.swiglu_down`)
against XLA's kernels, alone (no rest of the step): which tiles, and how much it saves.

    python tools/swiglu_down_probe.py [--rounds 5] [--batch 1]      # GPU; a JSON line per row
    python tools/swiglu_down_probe.py --small --tiles k64-n256-p1    # the probe itself, on a CPU

Each timed call runs LAYERS layers over distinct weights (no weight served from L2), as the
packed step holds them: the fused gate/up output [B, 2I + 2·E·r] (base outputs, then gate's and
up's shrink), the pre-gated experts' gates [B, 1, E·r], B of gate and up [2, I, E·r] and
[W_down | A_down] [I, D + E·r], Llama-2-7B shapes, E=8 r=16, bf16. Each layer's result is added
to a running residual in f32, where XLA folds the kernel's partial sums (and its own split-K's).
Rows: `xla` (the library's formulation: the expansion, SwiGLU and the GEMM as XLA fuses them),
`xla-plain` (the backbone's: SwiGLU and the GEMM), and the kernel with and without the experts'
delta over a set of tiles. Rounds interleave the rows; `vs_xla` is each row's time over the
matching XLA row's in the same round (median and 95% t-interval, as the bench's ratios);
`kernel_us` the kernels' own GPU time per layer from a profiler trace.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench.measure import ratio_interval
from adafuse_jax.timing import time_pipelined
from gemv_sweep import LAYERS, kernel_us
from pallas_kernels.swiglu_down import LowRank, Tiles, xla_swiglu_down
from pallas_kernels.swiglu_down import triton as kernel

D, I, ER = 4096, 11008, 128
TILES = {  # programs = ceil(I / block_k) · parts; f32 products per thread = k · n / (32 · warps)
    "k128-n64-p4": Tiles(128, 64, 4),
    "k128-n128-p2": Tiles(128, 128, 2),
    "k128-n128-p4": Tiles(128, 128, 4),
    "k64-n128-p2": Tiles(64, 128, 2),
    "k64-n256-p1-w8": Tiles(64, 256, 1, num_warps=8),
    "k256-n64-p8": Tiles(256, 64, 8),
    "k32-n256-p1": Tiles(32, 256, 1),
}


def layer_inputs(batch: int, seed: int = 0) -> list[dict]:
  ks = jax.random.split(jax.random.key(seed), 5)
  bf = jnp.bfloat16
  gu = jax.random.normal(ks[0], (LAYERS, batch, 2 * I + 2 * ER)).astype(bf)
  gates = (jax.random.uniform(ks[1], (LAYERS, batch, 1, ER))
           * (jnp.arange(ER) < 2 * ER // 8)).astype(jnp.float32)  # 2 of 8 experts chosen
  b_t = (jax.random.normal(ks[2], (LAYERS, 2, I, ER)) / 8).astype(bf)
  w = (jax.random.normal(ks[3], (LAYERS, I, D + ER)) / 100).astype(bf)
  return dict(gu=gu, gates=gates, b_t=b_t, w=w)


def program(fn, low_rank: bool):
  """LAYERS layers of one row kind; the weights stay stacked and each call names its layer (the
  kernel reads it in place, XLA fuses the slice), as the packed step holds them."""
  @jax.jit
  def run(gu, gates, b_t, w):
    h = jnp.zeros((gu.shape[1], D), jnp.float32)
    for l in range(LAYERS):
      low = LowRank(gates[l], b_t) if low_rank else None
      y = fn(gu[l], w, I, low, layer=l)
      h = h + y[:, :D] + y[:, D:].sum(-1, keepdims=True)  # the shrink columns are read too
    return h
  return run


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--tiles", default=",".join(TILES))
  p.add_argument("--small", action="store_true",
                 help="widths / 32 and 2 rounds: a check of the probe itself (CPU: the interpreter)")
  args = p.parse_args()
  global D, I
  if args.small:
    D, I, args.rounds = D // 32, I // 32, 2
  inputs = layer_inputs(args.batch)
  operands = (inputs["gu"], inputs["gates"], inputs["b_t"], inputs["w"])
  rows = {"xla": program(xla_swiglu_down, True), "xla-plain": program(xla_swiglu_down, False)}
  for name in args.tiles.split(","):
    t = TILES[name]
    fn = lambda gu, w, inter, low, layer, t=t: kernel.swiglu_down(  # noqa: E731
        gu, w, inter, low, layer=layer, tiles=t, interpret=jax.default_backend() == "cpu")
    rows[f"kernel-{name}"] = program(fn, True)
    rows[f"kernel-plain-{name}"] = program(fn, False)
  # Each row against the XLA row of its kind, and checked against it.
  want = {True: np.asarray(rows["xla"](*operands)), False: np.asarray(rows["xla-plain"](*operands))}
  errors = {}
  for name, fn in rows.items():
    got = np.asarray(fn(*operands))
    ref = want["plain" not in name]
    errors[name] = float(np.abs(got - ref).max() / np.abs(ref).max())
  times = {name: [] for name in rows}
  for _ in range(args.rounds):
    for name, fn in rows.items():
      t = time_pipelined(lambda fn=fn: fn(*operands), warmup=1, steps=20, repeats=1)
      times[name].append(t.median_ms * 1e3 / LAYERS)
  device = jax.devices()[0].device_kind
  for name, fn in rows.items():
    base = times["xla-plain" if "plain" in name else "xla"]
    print(json.dumps({"row": name, "batch": args.batch, "us_per_layer": round(float(np.median(times[name])), 2),
                      "vs_xla": ratio_interval(times[name], base),
                      "kernel_us": kernel_us(fn, operands).get("all_kernels_us"), "max_rel_err": round(errors[name], 5),
                      "device": device, "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
  main()
