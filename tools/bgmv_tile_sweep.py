"""Tile sweep of the BGMV expand kernel (pallas_kernels/bgmv/triton.py) on the GPU.

    python tools/bgmv_tile_sweep.py --out DIR

For each Llama-2-7B module shape and two decode situations (batch 1 with its 2 active experts;
batch 32 with all 8 experts active), one jitted function applies the kernel to all 32 stacked
layers, and the same for XLA's plain `x @ W[l]` (the backbone's matmul, what the kernel must
match). Reports ms per 32 layers and the effective bandwidth (bytes of W and the active B read).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp

from adafuse_jax.bench.measure import time_calls
from pallas_kernels.bgmv.reference import active_experts
from pallas_kernels.bgmv.triton import Tiles as SgmvTiles
from pallas_kernels.bgmv.triton import gathered_expand_matmul, gathered_shrink

SHAPES = {"q/o (4096x4096)": (4096, 4096), "gate/up (4096x11008)": (4096, 11008),
          "down (11008x4096)": (11008, 4096)}
SITUATIONS = {"batch 1": (1, 2), "batch 32": (32, 8)}  # rows, active experts (E = 8)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--layers", type=int, default=32)
  args = p.parse_args()
  L, E, r = args.layers, 8, 16
  rows = []
  key = jax.random.key(0)
  for name, (k, n) in SHAPES.items():
    w = (jax.random.normal(key, (L, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    a = (jax.random.normal(key, (L, k, E, r), jnp.float32) * 0.02).astype(jnp.bfloat16)
    b = (jax.random.normal(key, (L, E, r, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    for situation, (m, active) in SITUATIONS.items():
      x = jax.random.normal(key, (m, k), jnp.bfloat16)
      experts = (jnp.arange(m * 2).reshape(m, 2) % active).astype(jnp.int32)
      ids, count, gmat = active_experts(experts, jnp.full((m, 2), 0.5), E)
      h = gathered_shrink(x, (a,), 0, ids, count, gmat)
      nbytes = (w.size + L * active * r * n) * 2

      def xla(x, w):
        return sum((x @ w[l]).astype(jnp.float32) for l in range(L))

      candidates = [("xla x@W", None)] + [
          (f"bn={bn} bk={bk} w={nw} s={ns}", SgmvTiles(block_n=bn, block_k=bk, num_warps=nw,
                                                      num_stages=ns))
          for bn, bk, nw, ns in itertools.product((16, 32, 64), (128, 256, 512), (2, 4), (3, 4))]
      for label, tiles in candidates:
        if tiles is None:
          call = functools.partial(jax.jit(xla), x, w)
        else:
          fn = jax.jit(lambda x, w, h, b, t=tiles: sum(
              gathered_expand_matmul(x, w, l, h, b, ids, count, tiles=t).astype(jnp.float32)
              for l in range(L)))
          call = functools.partial(fn, x, w, h, b)
        try:
          t = time_calls(call, warmup=3, steps=20)
        except Exception as e:  # a tile the lowering rejects: record and go on
          rows.append({"shape": name, "situation": situation, "impl": label,
                       "error": str(e).splitlines()[0][:120]})
          continue
        rows.append({"shape": name, "situation": situation, "impl": label, "ms": t.median_ms,
                     "tb_s": nbytes / (t.median_ms / 1e3) / 1e12})
      mine = [x for x in rows if x["shape"] == name and x["situation"] == situation and "ms" in x]
      ref = next(x for x in mine if x["impl"].startswith("xla"))
      best = min((x for x in mine if not x["impl"].startswith("xla")), key=lambda x: x["ms"])
      default = SgmvTiles.for_shape(m, k, n)
      dlabel = (f"bn={default.block_n} bk={default.block_k} w={default.num_warps}"
                f" s={default.num_stages}")
      dflt = next((x for x in mine if x["impl"] == dlabel), None)
      print(f"{name} {situation}: xla {ref['ms']:.3f} ms ({ref['tb_s']:.2f} TB/s) | default"
            f" {dflt['ms'] if dflt else float('nan'):.3f} | best {best['impl']} {best['ms']:.3f}"
            f" ms ({best['tb_s']:.2f} TB/s)", flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "sgmv_tile_sweep.json").write_text(json.dumps(
      {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
