"""The appending attention kernel with q/k/v's expert delta, at several widths of the delta's
column block and grid (GPU; `--small` runs the Pallas interpreter on the CPU).

    python tools/append_delta_probe.py [--variants b32,b64,b128,b128-p64-w8] [--rounds 5] [--small]

Why: in the 7B pre-gated step the kernel took 18.9 µs a layer with the delta against 4.5 without
(docs/benchmarks/h200/own-kernels/). Every (head, split) program computes its head's delta
before its attention, `Tiles.delta_block_r` of B's columns a trip (one trip, no loop, where R
fits the block): q's (its columns and their rotary partners) in every split, k's and v's in
split 0. Fewer splits (`Tiles.target_programs`) mean fewer repeated q deltas. Rows: `plain` (no
delta) and `delta-SPEC` per variant, SPEC `bN[-pP][-wW]`: N columns a trip, a grid of about P
programs (default 264), W warps (default 4); each is `--layers` calls of the kernel on one row
at the 7B shape (32 heads of 128, R = 8 experts x rank 16, a 512-slot cache with 256 written),
timed in interleaved rounds, with the kernel's own GPU time per call from a profiler trace (the
kernel with the most time); every variant's output is checked against the first one's. JSON
lines on stdout (docs/benchmarks/h100/append-delta/).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench.measure import ratio_interval
from adafuse_jax.timing import time_calls
from gemv_sweep import kernel_us  # tools/ is this script's directory
from pallas_kernels.decode_attention import triton as da_triton


def inputs(heads: int, head_dim: int, rank: int, slots: int, written: int, layers: int) -> dict:
  ks = jax.random.split(jax.random.key(0), 6)
  bf = jnp.bfloat16
  proj = 3 * heads * head_dim
  return dict(
      qkv=jax.random.normal(ks[0], (1, proj + 3 * rank)).astype(bf),
      k_buf=jax.random.normal(ks[1], (1, slots, heads, head_dim)).astype(bf),
      v_buf=jax.random.normal(ks[2], (1, slots, heads, head_dim)).astype(bf),
      slot=jnp.asarray([written], jnp.int32),
      mask=(jnp.arange(slots) <= written)[None],
      cos=jnp.cos(jnp.arange(head_dim // 2, dtype=jnp.float32))[None],
      sin=jnp.sin(jnp.arange(head_dim // 2, dtype=jnp.float32))[None],
      gates=(jax.random.uniform(ks[3], (1, rank)) * (jnp.arange(rank) < rank // 4)),
      b_t=(jax.random.normal(ks[4], (layers, proj, rank)) / 8).astype(bf))


def parse_variant(spec: str) -> da_triton.Tiles:
  """`bN[-pP][-wW]` -> the kernel's Tiles: delta_block_r N, target_programs P, num_warps W."""
  fields = {"b": "delta_block_r", "p": "target_programs", "w": "num_warps"}
  return da_triton.Tiles(**{fields[part[0]]: int(part[1:]) for part in spec.split("-")})


def program(x: dict, layers: int, tiles: da_triton.Tiles | None):
  """`layers` calls of the kernel (one per layer of the stacked B), outputs summed; tiles None:
  the plain kernel (no delta) at its default tiles."""
  low = None if tiles is None else da_triton.QkvLowRank(x["gates"], x["b_t"])
  tiles = da_triton.Tiles() if tiles is None else tiles
  proj = x["b_t"].shape[1]

  @jax.jit
  def run(qkv, k_buf, v_buf):
    if low is None:  # the plain kernel takes the projections without the shrink columns
      qkv = qkv[:, :proj]
    total = jnp.zeros(qkv.shape[:1] + (1,), jnp.float32)
    for layer in range(layers):
      out, k_buf, v_buf = da_triton.decode_attention_append(
          qkv, k_buf, v_buf, x["slot"], x["mask"], x["cos"], x["sin"], low,
          layer=None if low is None else layer, tiles=tiles,
          interpret=jax.default_backend() == "cpu")
      total = total + out.astype(jnp.float32).sum(axis=(1, 2))[:, None]
    return total, k_buf, v_buf

  return run.lower(x["qkv"], x["k_buf"], x["v_buf"]).compile()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="b32,b64,b128",
                 help="comma-separated bN[-pP][-wW]: delta columns a trip, grid programs, warps")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
  args = p.parse_args()
  shape = (dict(heads=2, head_dim=16, rank=16, slots=32, written=9) if args.small else
           dict(heads=32, head_dim=128, rank=128, slots=512, written=256))
  layers = 2 if args.small else args.layers
  x = inputs(**shape, layers=layers)
  variants = args.variants.split(",")
  rows = {"plain": program(x, layers, None)}
  rows.update({f"delta-{v}": program(x, layers, parse_variant(v)) for v in variants})
  operands = (x["qkv"], x["k_buf"], x["v_buf"])
  want = np.asarray(rows[f"delta-{variants[0]}"](*operands)[0])
  errors = {name: float(np.max(np.abs(np.asarray(fn(*operands)[0]) - want)) / max(
      float(np.max(np.abs(want))), 1e-30)) for name, fn in rows.items() if name != "plain"}
  times = {name: [] for name in rows}
  for _ in range(args.rounds):
    for name, fn in rows.items():
      times[name].append(time_calls(lambda fn=fn: fn(*operands), warmup=2,
                                    steps=3 if args.small else 50).median_ms * 1e3 / layers)
  for name, fn in rows.items():
    print(json.dumps({"row": name, **shape, "us_per_call": round(float(np.median(times[name])), 2),
                      "vs_plain": ratio_interval(times[name], times["plain"]),
                      "kernel_us": kernel_us(fn, operands, 3, layers).get("kernel_us"),
                      "rel_err_vs_first": errors.get(name)}), flush=True)


if __name__ == "__main__":
  main()
