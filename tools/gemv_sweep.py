"""How close can a decode matmul get to the memory ceiling? XLA's dot against a Pallas (Triton
lowering) split-K GEMV, on the Llama-2-7B module shapes at batch 1, over a sweep of tiles.

    python tools/gemv_sweep.py --out DIR           # GPU; one JSON line per (shape, variant)

Each timed call runs 8 GEMVs over 8 distinct weights (a stack of 8 layers, unrolled as the model
runs them), so no weight is served from L2; 5 interleaved rounds of 20 calls, median.
Effective bandwidth = weight bytes / time.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from adafuse_jax.timing import time_pipelined

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
LAYERS = 8


def _kernel(x_ref, w_ref, o_ref, *, bn: int, bk: int, k_per_split: int):
  j, s = pl.program_id(0), pl.program_id(1)
  k_total, n_total = w_ref.shape
  cols = j * bn + jnp.arange(bn)
  col_mask = cols < n_total
  k0 = s * k_per_split

  def body(t, acc):
    ks = k0 + t * bk + jnp.arange(bk)
    k_mask = ks < k_total
    x = plgpu.load(x_ref.at[pl.ds(k0 + t * bk, bk)], mask=k_mask, other=0.0)
    w = plgpu.load(w_ref.at[pl.ds(k0 + t * bk, bk), pl.ds(j * bn, bn)],
                   mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    return acc + jnp.sum(x.astype(jnp.float32)[:, None] * w.astype(jnp.float32), axis=0)

  acc = jax.lax.fori_loop(0, k_per_split // bk, body, jnp.zeros((bn,), jnp.float32))
  plgpu.store(o_ref.at[s, pl.ds(j * bn, bn)], acc, mask=col_mask)


def pallas_gemv(x, w, *, bn, bk, splits, warps, stages):
  k, n = w.shape
  k_per_split = pl.cdiv(pl.cdiv(k, splits), bk) * bk
  part = pl.pallas_call(
      functools.partial(_kernel, bn=bn, bk=bk, k_per_split=k_per_split),
      out_shape=jax.ShapeDtypeStruct((splits, n), jnp.float32),
      grid=(pl.cdiv(n, bn), splits),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=jax.default_backend() == "cpu",
  )(x.reshape(k), w)
  return part.sum(0, keepdims=True).astype(x.dtype)


def timed(fn, args, rounds_of: int = 20) -> float:
  """Seconds per weight: `rounds_of` calls back to back (after one warm call), each over
  LAYERS distinct weights."""
  per_call = time_pipelined(lambda: fn(*args), warmup=1, steps=rounds_of, repeats=1)
  return per_call.median_ms / 1e3 / LAYERS


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="a few configs (a smoke run)")
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  key = jax.random.key(0)
  grid = list(itertools.product([64, 128, 256], [128, 256], [1, 2, 4, 8], [4, 8], [3]))
  if args.quick:
    grid = grid[:3]
  results = []
  for name, (k, n) in SHAPES.items():
    ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) * 0.02
          for i in range(LAYERS)]
    x = jax.random.normal(key, (1, k), jnp.bfloat16)
    gb = k * n * 2 / 1e9

    def stack(gemv):
      @jax.jit
      def run(x, ws):
        y = x
        outs = []
        for w in ws:  # independent GEMVs, as the 8 layers' modules
          outs.append(gemv(y, w))
        return jnp.stack(outs)
      return run

    variants = {"xla": stack(lambda x, w: x @ w)}
    ref = (x.astype(jnp.float32) @ ws[0].astype(jnp.float32))
    for bn, bk, s, warps, stages in grid:
      if s > 1 and k // s < bk:
        continue
      f = functools.partial(pallas_gemv, bn=bn, bk=bk, splits=s, warps=warps, stages=stages)
      try:
        got = jax.jit(f)(x, ws[0]).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - ref)))
        if err > 0.05 * float(jnp.max(jnp.abs(ref))):
          print(json.dumps({"shape": name, "variant": f"bn{bn}-bk{bk}-s{s}-w{warps}-st{stages}",
                            "error": f"wrong result: max abs err {err}"}))
          continue
      except Exception as e:  # a tile the lowering refuses: record and go on
        print(json.dumps({"shape": name, "variant": f"bn{bn}-bk{bk}-s{s}-w{warps}-st{stages}",
                          "error": str(e).splitlines()[0][:200]}))
        continue
      variants[f"bn{bn}-bk{bk}-s{s}-w{warps}-st{stages}"] = stack(f)
    times = {v: [] for v in variants}
    # First a quick pass over all, then interleaved rounds over the xla row and the best 8.
    for v, fn in variants.items():
      times[v].append(timed(fn, (x, ws), 5))
    best = sorted((v for v in variants if v != "xla"), key=lambda v: times[v][0])[:8]
    for _ in range(args.rounds):
      for v in ["xla", *best]:
        times[v].append(timed(variants[v], (x, ws)))
    for v in ["xla", *best]:
      ts = sorted(times[v][1:])
      med = ts[len(ts) // 2]
      row = {"shape": name, "k": k, "n": n, "variant": v, "us": round(med * 1e6, 2),
             "tb_s": round(gb / med / 1e3, 3), "rounds": len(ts),
             "device": jax.devices()[0].device_kind, "jax": jax.__version__}
      results.append(row)
      print(json.dumps(row), flush=True)
  (out / "gemv_sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
