"""How close can a decode matmul get to the memory ceiling? XLA's dot against a Pallas (Triton
lowering) split-K GEMV and a Mosaic GPU GEMV (TMA pipeline, swap-AB wgmma), on the Llama-2-7B
module shapes at batch 1, over a sweep of tiles.

    python tools/gemv_sweep.py --out DIR [--kinds triton,mosaic]   # GPU; a JSON line per row

Each timed call runs 8 GEMVs over 8 distinct weights (a stack of 8 layers, unrolled as the model
runs them), so no weight is served from L2; 5 interleaved rounds of 20 calls, median.
Effective bandwidth = weight bytes / time. Each row also has the kernels' own GPU time per GEMV
from a profiler trace (`kernel_us`: the matmul kernel alone; `all_kernels_us`: with the pads,
slices and partial sums around it).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import triton as plgpu

from adafuse_jax.timing import time_pipelined
from kernel_breakdown import kernel_durations

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


MOSAIC_ROWS = 8  # the rows are wgmma's N: x padded to the narrowest it takes


def _mosaic_tiled(minor_elems: int, dtype) -> tuple:
  """Tiling and swizzle of a shared-memory wgmma operand whose rows hold `minor_elems`."""
  swizzle = plmgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
  return (plmgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plmgpu.SwizzleTransform(swizzle))


def mosaic_gemv(x, w, *, bn: int, bk: int, stages: int, splits: int):
  """y [M, N] = x [M, K] @ w [K, N] for M <= 8 on Mosaic GPU. Swap-AB: every program owns
  `bn` output columns (and one of `splits` slices of K), streams its W tiles through a
  `stages`-deep TMA pipeline and multiplies W^T [bn, bk] by x^T [bk, 8] with wgmma, so the
  tensor cores do 8 rows of work, not 64. Split K leaves f32 partials that XLA sums."""
  m, k = x.shape
  n = w.shape[1]
  dt = w.dtype
  if n % bn or k % (bk * splits):
    raise ValueError(f"({k}, {n}) does not fit bn{bn} bk{bk} x{splits}")
  k_len = k // splits
  out_dt = dt if splits == 1 else jnp.float32
  xp = jnp.pad(x.astype(dt), ((0, MOSAIC_ROWS - m), (0, 0)))

  def kernel(x_gmem, w_gmem, o_gmem, o_smem):
    cols = pl.ds(jax.lax.axis_index("n") * bn, bn)
    split = jax.lax.axis_index("s")
    ks = pl.ds(split * k_len, k_len)

    @functools.partial(pl.run_scoped, acc=plmgpu.ACC((bn, MOSAIC_ROWS), jnp.float32))
    def _(acc):
      def body(_, x_smem, w_smem):
        plmgpu.wgmma(acc, plmgpu.transpose_ref(w_smem, (1, 0)),
                     plmgpu.transpose_ref(x_smem, (1, 0)))
        plmgpu.wgmma_wait(0)

      plmgpu.emit_pipeline(
          body, grid=(k_len // bk,), max_concurrent_steps=stages,
          in_specs=[plmgpu.BlockSpec((MOSAIC_ROWS, bk), lambda i: (0, i),
                                     transforms=_mosaic_tiled(bk, dt)),
                    plmgpu.BlockSpec((bk, bn), lambda i: (i, 0),
                                     transforms=_mosaic_tiled(bn, dt))],
      )(x_gmem.at[:, ks], w_gmem.at[ks, cols])
      o_smem[...] = acc[...].astype(out_dt)

    plmgpu.commit_smem()
    plmgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, cols, :])
    plmgpu.wait_smem_to_gmem(0)

  out = plmgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((splits, n, MOSAIC_ROWS), out_dt),
      scratch_types=[plmgpu.SMEM((bn, MOSAIC_ROWS), out_dt)], grid=(n // bn, splits),
      grid_names=("n", "s"))(xp, w)
  return (out.sum(0) if splits > 1 else out[0]).T[:m].astype(x.dtype)


def timed(fn, args, rounds_of: int = 20) -> float:
  """Seconds per weight: `rounds_of` calls back to back (after one warm call), each over
  LAYERS distinct weights."""
  per_call = time_pipelined(lambda: fn(*args), warmup=1, steps=rounds_of, repeats=1)
  return per_call.median_ms / 1e3 / LAYERS


def kernel_us(fn, args, calls: int = 5, layers: int = LAYERS) -> dict[str, float]:
  """The GPU kernels' own time per layer of a call running `layers` of them (a profiler trace
  of `calls` calls): `kernel_us`, the kernel with the most time (the matmul), and
  `all_kernels_us`, every kernel (pads, slices, partial sums too). Empty on the CPU."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    durations = kernel_durations(pathlib.Path(tmp))
  if not durations:
    return {}
  per = calls * layers
  return {"kernel_us": round(max(sum(d) for d in durations.values()) / per, 2),
          "all_kernels_us": round(sum(sum(d) for d in durations.values()) / per, 2)}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="a few configs (a smoke run)")
  p.add_argument("--kinds", default="triton,mosaic", help="comma-separated: triton, mosaic")
  args = p.parse_args()
  kinds = set(args.kinds.split(","))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  key = jax.random.key(0)
  grid = list(itertools.product([64, 128, 256], [128, 256], [1, 2, 4, 8], [4, 8], [3]))
  mosaic_grid = [*itertools.product([64], [128, 256], [3, 6], [1, 2]), (128, 128, 3, 2)]
  if args.quick:
    grid, mosaic_grid = grid[:3], mosaic_grid[:3]
  candidates = []
  if "triton" in kinds:
    candidates += [(f"bn{bn}-bk{bk}-s{s}-w{w}-st{st}",
                    functools.partial(pallas_gemv, bn=bn, bk=bk, splits=s, warps=w, stages=st))
                   for bn, bk, s, w, st in grid]
  if "mosaic" in kinds:
    candidates += [(f"mosaic-bn{bn}-bk{bk}-s{s}-st{st}",
                    functools.partial(mosaic_gemv, bn=bn, bk=bk, splits=s, stages=st))
                   for bn, bk, st, s in mosaic_grid]
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
    for label, f in candidates:
      try:
        got = jax.jit(f)(x, ws[0]).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - ref)))
        if err > 0.05 * float(jnp.max(jnp.abs(ref))):
          print(json.dumps({"shape": name, "variant": label,
                            "error": f"wrong result: max abs err {err}"}))
          continue
      except Exception as e:  # a tile the lowering refuses: record and go on
        print(json.dumps({"shape": name, "variant": label,
                          "error": str(e).splitlines()[0][:200]}))
        continue
      variants[label] = stack(f)
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
             **kernel_us(variants[v], (x, ws)),
             "device": jax.devices()[0].device_kind, "jax": jax.__version__}
      results.append(row)
      print(json.dumps(row), flush=True)
  (out / "gemv_sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
