"""Tile sweep of the fused expert matmul on the GPU, against XLA's dot + dot + add.

    python tools/tile_sweep.py --out DIR

For each 7B module shape, one jitted function applies the kernel to all 32 stacked layers (so
launch overhead is amortised as in a decode step) and reports ms and effective bandwidth
(bytes of W and B read / time); the XLA row does `x @ W[l] + h @ B[l]` for the same layers.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from adafuse_jax.benchmarks import time_calls
from pallas_kernels.expert_matmul import Tiles, fused_expert_matmul

SHAPES = {"q/o (4096x4096)": (4096, 4096), "gate/up (4096x11008)": (4096, 11008),
          "down (11008x4096)": (11008, 4096)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--rank-total", type=int, default=128, help="E*r")
  args = p.parse_args()
  L, R = args.layers, args.rank_total
  rows = []
  key = jax.random.key(0)
  for name, (k, n) in SHAPES.items():
    w = (jax.random.normal(key, (L, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    b = (jax.random.normal(key, (L, R, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(key, (1, k), jnp.bfloat16)
    h = jax.random.normal(key, (1, R), jnp.float32)
    g = jnp.ones((1, R), jnp.float32)
    nbytes = (w.size + b.size) * 2

    def xla(x, w, h, g, b):
      hg = (h * g).astype(b.dtype)
      return sum((x @ w[l] + hg @ b[l]).astype(jnp.float32) for l in range(L))

    candidates = [("xla", None)] + [
        (f"pallas bn={bn} bk={bk} w={nw} s={ns}", Tiles(16, bn, bk, nw, ns))
        for bn, bk, nw, ns in itertools.product((32, 64, 128), (128, 256), (4,), (3, 4))]
    for label, tiles in candidates:
      if tiles is None:
        fn = jax.jit(xla)
      else:
        fn = jax.jit(lambda x, w, h, g, b, t=tiles: sum(
            fused_expert_matmul(x, w, l, h, g, b, tiles=t).astype(jnp.float32) for l in range(L)))
      try:
        t = time_calls(functools.partial(fn, x, w, h, g, b), warmup=3, steps=20)
      except Exception as e:  # a tile the lowering rejects: record and go on
        rows.append({"shape": name, "impl": label, "error": str(e).splitlines()[0][:120]})
        continue
      rows.append({"shape": name, "impl": label, "ms": t.median_ms,
                   "tb_s": nbytes / (t.median_ms / 1e3) / 1e12})
    best = min((r for r in rows if r["shape"] == name and "ms" in r and r["impl"] != "xla"),
               key=lambda r: r["ms"])
    ref = next(r for r in rows if r["shape"] == name and r["impl"] == "xla")
    print(f"{name}: xla {ref['ms']:.3f} ms ({ref['tb_s']:.2f} TB/s) | best {best['impl']}"
          f" {best['ms']:.3f} ms ({best['tb_s']:.2f} TB/s)", flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tile_sweep.json").write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                                   "jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
