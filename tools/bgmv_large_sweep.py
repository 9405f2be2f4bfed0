"""Tile sweep of the gathered shrink and the expansion-only kernel for wide pools (GPU).

    python tools/bgmv_large_sweep.py --out DIR [--experts 64 --rank 64 --rows 32 --active 26,56]

What a step of path `gathered` runs for a pool wider than `Thresholds.fused_base_max_width`
(docs/benchmarks.md, "Large pools"): per layer, one `gathered_shrink` per input group (q/k/v,
o, gate/up, down) and one `gathered_expand` per module, beside XLA's base GEMMs. For each of the
Llama-2-7B groups and modules and each number of active experts (SERE's ~26 and no SERE's ~56
of 64 at batch 32, top-4), one jitted function runs the kernel on all `--layers` stacked layers;
every tile candidate is timed (median of calls) and reported with the bytes it must read (the
active experts' A or B) over its time; on the GPU also the kernels' own time per layer from a
profiler trace (the wall time of a call also holds the host's dispatch of 32 launches and the
partial sums). Beside the library's two kernels, each checked against them first (`--check`):
the expansion's other slot loops (`expand-registers`, `expand-static`: `Tiles.slot_loop`;
`-summed`: h's partial sums added once before the static one), two layout probes that read each
expert's block contiguously (`shrink-expert-major`: A as [L, E, K, r]; `expand-bt`: B as
[L, E, N, r]), and XLA's dense products over all E experts (`*-xla-dense`: what path `packed`
reads), the time a gathered kernel has to beat. JSON lines on stdout, a table in DIR/sweep.md.
`--dims` scales the model's widths down for a CPU smoke run (the Pallas interpreter).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp

from adafuse_jax.timing import time_calls
import gathered_probe  # tools/ is this script's directory
from kernel_breakdown import kernel_durations
from pallas_kernels.bgmv.reference import active_experts
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.bgmv.triton import (EXPAND_TILES, Tiles, expert_splits, gathered_expand,
                                        gathered_shrink, shrink_splits)
from pallas_kernels.common import dot_block

# name -> (input width, output widths of the modules that share it), Llama-2-7B.
GROUPS = {"q/k/v": (4096, (4096, 4096, 4096)), "o": (4096, (4096,)),
          "gate/up": (4096, (11008, 11008)), "down": (11008, (4096,))}


def candidates(kind: str, full: bool) -> list[Tiles]:
  """The default tiles first, then settings that put more bytes in flight per SM than the
  defaults (the first H200 sweep had both kernels at 0.2-1.2 TB/s: a few serial loads per
  program). Shrink: (K step, K per program, target programs, warps, stages); one K step per
  program (K per program = K step, many programs) against a pipelined loop. Expand: (column
  strip, target programs, warps, stages); wider strips and more parts, so that each program
  reads fewer slots."""
  if kind == "shrink":
    grid = [Tiles(block_k=bk, shrink_k=sk, min_programs=mp, num_warps=nw, num_stages=ns)
            for bk, sk, mp, nw, ns in ((256, 256, 8192, 4, 1), (256, 256, 8192, 4, 2),
                                       (512, 512, 8192, 4, 1), (512, 512, 8192, 8, 1),
                                       (128, 128, 8192, 4, 1), (128, 512, 1024, 4, 4),
                                       (256, 1024, 512, 4, 4), (64, 256, 264, 2, 3))]
    return [Tiles()] + (grid if full else grid[:3])
  grid = [Tiles(block_n=bn, min_programs=mp, num_warps=nw, num_stages=ns)
          for bn, mp, nw, ns in ((64, 1056, 4, 3), (128, 528, 4, 3), (128, 1056, 8, 3),
                                 (256, 528, 8, 3), (256, 264, 8, 3), (128, 264, 4, 2),
                                 (32, 528, 2, 3), (32, 132, 2, 3))]
  return [EXPAND_TILES] + (grid if full else grid[:3])


def expand_loop(h, b, layer, ids, count, *, rows: int, tiles: Tiles, interpret: bool,
                loop: str = "static", unroll: int = 1):
  """`gathered_expand` with this slot loop (`Tiles.slot_loop`, `slot_unroll`) at these tiles."""
  return gathered_expand(h, b, layer, ids, count, rows=rows, interpret=interpret,
                         tiles=dataclasses.replace(tiles, slot_loop=loop, slot_unroll=unroll))


def _shrink_expert_major_kernel(layer_ref, ids_ref, count_ref, x_ref, a_ref, h_ref, *,
                                rank: int, block_m: int, block_r: int, block_k: int,
                                k_per_split: int):
  """`gathered_shrink`'s kernel (one module, no gates) over A stored expert-major,
  [L, E, K, r]: a K-slice of one expert is one contiguous block, where the pool's [L, K, E, r]
  interleaves the experts every r values."""
  u, s = pl.program_id(0), pl.program_id(1)
  m_total, k_total = x_ref.shape
  row_mask = jnp.arange(block_m) < m_total
  r_mask = jnp.arange(block_r) < rank
  out = h_ref.at[s, pl.ds(0, block_m), pl.ds(u * block_r, block_r)]
  active = u < count_ref[0]
  layer, expert, k0 = layer_ref[0], ids_ref[u], s * k_per_split

  def body(t, acc):
    ks = k0 + t * block_k + jnp.arange(block_k)
    k_mask = (ks < k_total) & active
    x = plgpu.load(x_ref.at[pl.ds(0, block_m), pl.ds(k0 + t * block_k, block_k)],
                   mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    a = plgpu.load(a_ref.at[layer, expert, pl.ds(k0 + t * block_k, block_k), pl.ds(0, block_r)],
                   mask=k_mask[:, None] & r_mask[None, :], other=0.0)
    return acc + plgpu.dot(x, a.astype(x.dtype)).astype(jnp.float32)

  acc = jax.lax.fori_loop(0, k_per_split // block_k, body,
                          jnp.zeros((block_m, block_r), jnp.float32))
  plgpu.store(out, acc)


def shrink_expert_major(x, a_em, layer, ids, count, *, tiles: Tiles, interpret: bool):
  """x [M, K] @ the active experts of A [L, E, K, r] -> f32 partials [S, M', U·r'] (the probe's
  layout question: does reading each expert's block contiguously move the shrink's rate?)."""
  m, k = x.shape
  rank = a_em.shape[-1]
  slots = ids.shape[0]
  block_m, block_r = dot_block(m), dot_block(rank)
  tiles = tiles.fit_shared_memory(block_m, block_r, x.dtype.itemsize)
  splits = shrink_splits(k, 1, slots, tiles)
  k_per_split = pl.cdiv(pl.cdiv(k, splits), tiles.block_k) * tiles.block_k
  kernel = functools.partial(_shrink_expert_major_kernel, rank=rank, block_m=block_m,
                             block_r=block_r, block_k=tiles.block_k, k_per_split=k_per_split)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, block_m, slots * block_r), jnp.float32),
      grid=(slots, splits),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret, name="gathered_shrink_expert_major",
  )(jnp.asarray(layer, jnp.int32).reshape(1), ids, count, x, a_em)


def _expand_unrolled_kernel(layer_ref, ids_ref, count_ref, h_ref, b_ref, o_ref, *, rank: int,
                            parts: int, unroll: int, transposed: bool, static: bool,
                            block_m: int, block_n: int, block_r: int):
  """The expansion over h1 (partial sums added) with a loop whose every trip takes `unroll` of
  the part's slots at once: their B tiles are loaded before any is used, so `unroll` loads are
  in flight without relying on Triton's pipelining of the loop. The loop runs over the part's
  active slots, or (`static`) over all its slots with those past `count` masked. B as
  [L, E, r, N] or, `transposed`, [L, E, N, r] (a strip of one expert contiguous)."""
  n_total = b_ref.shape[2] if transposed else b_ref.shape[3]
  j, p = pl.program_id(0), pl.program_id(1)
  layer, count = layer_ref[0], count_ref[0]
  cols = j * block_n + jnp.arange(block_n)
  col_mask = cols < n_total
  r_mask = jnp.arange(block_r) < rank
  slots = ids_ref.shape[0]
  lanes = jnp.arange(pl.next_power_of_2(slots))
  ids = plgpu.load(ids_ref.at[pl.ds(0, lanes.shape[0])], mask=lanes < slots, other=0)
  mine = jnp.maximum(count - p + parts - 1, 0) // parts

  def body(t, acc):
    tiles = []
    for i in range(unroll):  # every load first, then the products
      u = p + (t * unroll + i) * parts
      active = u < count
      expert = jnp.sum(jnp.where(lanes == u, ids, 0))
      h = plgpu.load(h_ref.at[pl.ds(0, block_m), pl.ds(u * block_r, block_r)],
                     mask=jnp.broadcast_to(active, (block_m, block_r)), other=0.0)
      if transposed:
        b = plgpu.load(b_ref.at[layer, expert, pl.ds(j * block_n, block_n), pl.ds(0, block_r)],
                       mask=active & col_mask[:, None] & r_mask[None, :], other=0.0)
      else:
        b = plgpu.load(b_ref.at[layer, expert, pl.ds(0, block_r), pl.ds(j * block_n, block_n)],
                       mask=active & r_mask[:, None] & col_mask[None, :], other=0.0)
      tiles.append((h, b))
    for h, b in tiles:
      acc = acc + plgpu.dot(h.astype(b.dtype), b, trans_b=transposed).astype(jnp.float32)
    return acc

  trips = pl.cdiv(pl.cdiv(slots, parts) if static else mine, unroll)
  acc = jax.lax.fori_loop(0, trips, body, jnp.zeros((block_m, block_n), jnp.float32))
  plgpu.store(o_ref.at[p, pl.ds(0, block_m), pl.ds(j * block_n, block_n)], acc,
              mask=col_mask[None, :])


def expand_unrolled(h1, b, layer, ids, count, *, rows: int, tiles: Tiles, interpret: bool,
                    unroll: int, transposed: bool = False, static: bool = False):
  """Σ_u h1[:, u] @ B[layer, ids[u]] with `unroll` slots per loop trip; b [L, E, r, N] or
  (`transposed`) [L, E, N, r]; h1 [M', U·r'] -> [rows, N] f32."""
  n, rank = (b.shape[2], b.shape[3]) if transposed else (b.shape[3], b.shape[2])
  slots = ids.shape[0]
  block_m = h1.shape[0]
  parts = expert_splits(n, slots, tiles)
  kernel = functools.partial(_expand_unrolled_kernel, rank=rank, parts=parts, unroll=unroll,
                             transposed=transposed, static=static, block_m=block_m,
                             block_n=tiles.block_n, block_r=dot_block(rank))
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((parts, block_m, n), jnp.float32),
      grid=(pl.cdiv(n, tiles.block_n), parts),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret, name="gathered_expand_bt" if transposed and unroll == 1
      else "gathered_expand_unrolled",
  )(jnp.asarray(layer, jnp.int32).reshape(1), ids, count, h1, b)
  return jnp.sum(out[:, :rows], axis=0)


def expand_bt(h1, bt, layer, ids, count, *, rows: int, tiles: Tiles, interpret: bool):
  """The expansion (static slot loop) over B stored transposed per expert, bt [L, E, N, r]: a
  column strip of one expert is one contiguous block of block_n rows of r values; h1 [M', U·r']
  (the partial sums already added) -> [rows, N] f32."""
  return expand_unrolled(h1, bt, layer, ids, count, rows=rows, tiles=tiles, interpret=interpret,
                         unroll=1, transposed=True, static=True)


def gpu_us(call, layers: int, calls: int = 5, prefix: str = "gathered_"
           ) -> tuple[float, float] | None:
  """(µs per layer in the kernels named `prefix`..., µs per layer in everything else; "" counts
  every kernel as the first: XLA's formulations) of `calls` calls,
  from a profiler trace: the kernels' own time, without the host's dispatch that the wall
  time of a call holds. None on the CPU."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        jax.block_until_ready(call())
    durations = kernel_durations(pathlib.Path(tmp))
  if not durations:
    return None
  ours = sum(sum(d) for name, d in durations.items() if name.startswith(prefix))
  rest = sum(sum(d) for name, d in durations.items() if not name.startswith(prefix))
  return ours / (calls * layers), rest / (calls * layers)


def label(t: Tiles | None) -> str:
  if t is None:
    return "XLA"
  return (f"bn={t.block_n} bk={t.block_k} sk={t.shrink_k} programs={t.min_programs}"
          f" w={t.num_warps} s={t.num_stages}")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--rows", type=int, default=32)
  p.add_argument("--active", default="26,56", help="active experts per step, comma-separated")
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--dims", type=float, default=1.0, help="scale the widths (CPU smoke: 0.02)")
  p.add_argument("--quick", action="store_true", help="the default tiles and three others")
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--groups", default=",".join(GROUPS), help="which groups, comma-separated")
  p.add_argument("--kinds", default="",
                 help="shrink,shrink-splits,shrink-expert-major,shrink-xla-dense,expand,expand-registers,"
                      "expand-static,"
                      "expand-registers-unroll2,expand-h3d,expand-h3d-unroll2,expand-static-summed,expand-bt,expand-unroll2,expand-unroll4,expand-bt-unroll2,"
                      "expand-xla-dense (default all)")
  p.add_argument("--check", action="store_true",
                 help="compare every formulation with the library's before timing")
  args = p.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  item = jnp.dtype(dtype).itemsize
  L, E, r, m = args.layers, args.experts, args.rank, args.rows
  scale = lambda d: max(16, int(d * args.dims))  # noqa: E731
  env = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "experts": E, "rank": r, "rows": m}
  key = jax.random.key(0)
  lines = [f"Gathered kernels for {E} experts of rank {r}, {m} rows, {L} layers per call;"
           f" {env['device']}, jax {env['jax']}, {env['date']}.", "",
           "| kernel | shape | active | tiles | ms per call | GB read | TB/s | kernel µs per layer"
           " (GPU) | kernel TB/s | other µs per layer |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for group in args.groups.split(","):
    d_in, outs = GROUPS[group]
    d_in, outs = scale(d_in), tuple(scale(n) for n in outs)
    a = [(jax.random.normal(key, (L, d_in, E, r), jnp.float32) * 0.02).astype(dtype)
         for _ in outs]
    b = (jax.random.normal(key, (L, E, r, outs[0]), jnp.float32) * 0.02).astype(dtype)
    x = jax.random.normal(key, (m, d_in), dtype)
    for active in (int(v) for v in args.active.split(",")):
      # Row i takes experts 4i .. 4i+3 (mod active): exactly min(active, 4m) distinct ones.
      experts = (jnp.arange(m * 4).reshape(m, 4) % active).astype(jnp.int32)
      ids, count, gmat = active_experts(experts, jnp.full((m, 4), 0.25), E)
      h = gathered_shrink(x, a, 0, ids, count, gmat, interpret=on_cpu)
      a_bytes = L * len(outs) * d_in * int(count[0]) * r * item
      b_bytes = L * int(count[0]) * r * outs[0] * item
      # The layout probes read one module's experts; XLA's dense products read all E of them
      # (what path "packed" does), the baseline a gathered kernel has to beat in time.
      a_one = L * d_in * int(count[0]) * r * item
      shrink_tiles, expand_tiles = (candidates(k, not args.quick) for k in ("shrink", "expand"))
      # The library's shrink with more programs per (module, slot): S partial sums over K
      # (`shrink_splits` counts every slot, active or not, so the default leaves SMs idle).
      split_tiles = [Tiles(min_programs=mp) for mp in (96, 192, 384, 768, 1536)]
      kinds = [("shrink", shrink_tiles, a_bytes),
               ("shrink-splits", split_tiles, a_bytes),
               ("shrink-expert-major", shrink_tiles, a_one),
               ("shrink-xla-dense", [None], L * len(outs) * d_in * E * r * item),
               ("expand", expand_tiles, b_bytes),
               ("expand-registers", expand_tiles, b_bytes),
               ("expand-registers-unroll2", expand_tiles, b_bytes),
               ("expand-h3d", expand_tiles, b_bytes),
               ("expand-h3d-unroll2", expand_tiles, b_bytes),
               ("expand-static", expand_tiles, b_bytes),
               ("expand-static-summed", expand_tiles, b_bytes),
               ("expand-bt", expand_tiles, b_bytes),
               ("expand-unroll2", expand_tiles, b_bytes),
               ("expand-unroll4", expand_tiles, b_bytes),
               ("expand-bt-unroll2", expand_tiles, b_bytes),
               ("expand-xla-dense", [None], L * E * r * outs[0] * item)]
      a_em = jnp.moveaxis(a[0], 2, 1)  # [L, E, K, r]
      bt = jnp.moveaxis(b, 3, 2)       # [L, E, N, r]
      h1 = h[0].sum(axis=0)            # [M', U·r'], the partial sums added once
      h_dense = jax.random.normal(key, (m, E * r), dtype)
      if args.check:  # every other formulation against the library's default, before timing
        def same(what, got, want, tiles):
          err = float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-9))
          assert err < 1e-2, (what, group, label(tiles), err)
          print(f"# {what} matches the library ({group}, {label(tiles)}): relative error"
                f" {err:.1e}, largest |value| {float(jnp.max(jnp.abs(want))):.2e}")

        for tiles in candidates("expand", False):
          want = gathered_expand(h, b, 1, ids, count, rows=m, tiles=tiles, interpret=on_cpu)
          for loop in ("registers", "static"):
            same(f"expand-{loop}", expand_loop(h, b, 1, ids, count, rows=m, tiles=tiles,
                                               interpret=on_cpu, loop=loop), want, tiles)
          same("expand-bt", expand_bt(h1, bt, 1, ids, count, rows=m, tiles=tiles,
                                      interpret=on_cpu), want, tiles)
          for unroll, transposed in ((2, False), (4, False), (2, True)):
            same(f"expand-{'bt-' if transposed else ''}unroll{unroll}", expand_unrolled(
                h1, bt if transposed else b, 1, ids, count, rows=m, tiles=tiles,
                interpret=on_cpu, unroll=unroll, transposed=transposed), want, tiles)
        ungated = jnp.ones_like(gmat)
        for tiles in candidates("shrink", False):
          want = gathered_shrink(x, a[:1], 1, ids, count, ungated, tiles=tiles,
                                 interpret=on_cpu)[0].astype(jnp.float32).sum(0)
          got = shrink_expert_major(x, a_em, 1, ids, count, tiles=tiles, interpret=on_cpu)
          same("shrink-expert-major", got.sum(0), want, tiles)
      for kind, tiles_list, nbytes in kinds:
        if args.kinds and kind not in args.kinds.split(","):
          continue
        for tiles in tiles_list:
          if kind == "shrink-xla-dense":
            fn = jax.jit(lambda x, a: [[x @ ag[l].reshape(ag.shape[1], -1) for ag in a]
                                       for l in range(L)])
            call = lambda fn=fn: fn(x, a)  # noqa: E731
          elif kind == "expand-xla-dense":
            fn = jax.jit(lambda hd, b: [hd @ b[l].reshape(-1, b.shape[-1]) for l in range(L)])
            call = lambda fn=fn: fn(h_dense, b)  # noqa: E731
          elif kind == "shrink-expert-major":
            fn = jax.jit(lambda x, a_em, t=tiles: [shrink_expert_major(
                x, a_em, l, ids, count, tiles=t, interpret=on_cpu) for l in range(L)])
            call = lambda fn=fn: fn(x, a_em)  # noqa: E731
          elif kind == "expand-bt":
            fn = jax.jit(lambda h1, bt, t=tiles: [expand_bt(
                h1, bt, l, ids, count, rows=m, tiles=t, interpret=on_cpu) for l in range(L)])
            call = lambda fn=fn: fn(h1, bt)  # noqa: E731
          elif kind in ("expand-registers-unroll2", "expand-h3d", "expand-h3d-unroll2"):
            # The library's kernel with 2 slots per trip; "h3d": with h loaded as before, one
            # 3-D tile of its partial sums (gathered_probe.slot_tiles_3d), traced inside.
            unroll = 2 if kind.endswith("unroll2") else 1

            def run(h, b, t=tiles, unroll=unroll, h3d="h3d" in kind):
              with gathered_probe.patched(None, False, False, h_3d=h3d):
                return [expand_loop(h, b, l, ids, count, rows=m, tiles=t, interpret=on_cpu,
                                    loop="registers", unroll=unroll) for l in range(L)]

            fn = jax.jit(run)
            call = lambda fn=fn: fn(h, b)  # noqa: E731
          elif "unroll" in kind:
            transposed, unroll = "-bt-" in kind, int(kind[-1])
            fn = jax.jit(lambda h1, b, t=tiles, u=unroll, tr=transposed: [expand_unrolled(
                h1, b, l, ids, count, rows=m, tiles=t, interpret=on_cpu, unroll=u,
                transposed=tr) for l in range(L)])
            call = lambda fn=fn, bb=(bt if transposed else b): fn(h1, bb)  # noqa: E731
          elif kind in ("shrink", "shrink-splits"):
            fn = jax.jit(lambda x, a, t=tiles: [gathered_shrink(
                x, a, l, ids, count, gmat, tiles=t, interpret=on_cpu) for l in range(L)])
            call = lambda fn=fn: fn(x, a)  # noqa: E731
          elif kind.startswith(("expand-static", "expand-registers")):
            # "-summed": h's S partial sums added once per layer before the kernel (one small
            # XLA reduction), so that its programs load one h tile per slot. (Here every layer
            # reads the same h, so XLA may add them once for all layers: a step adds them once
            # per layer and group, a few µs each.)
            once = (lambda h: h.sum(axis=1, keepdims=True)) if kind.endswith("summed") else (
                lambda h: h)
            loop = kind.split("-")[1]
            fn = jax.jit(lambda h, b, t=tiles, once=once, loop=loop: [expand_loop(
                once(h), b, l, ids, count, rows=m, tiles=t, interpret=on_cpu, loop=loop)
                for l in range(L)])
            call = lambda fn=fn: fn(h, b)  # noqa: E731
          else:
            fn = jax.jit(lambda h, b, t=tiles: [gathered_expand(
                h, b, l, ids, count, rows=m, tiles=t, interpret=on_cpu) for l in range(L)])
            call = lambda fn=fn: fn(h, b)  # noqa: E731
          try:
            ms = time_calls(call, warmup=2, steps=args.calls).median_ms
          except Exception as e:  # a tile set that does not compile (shared memory): skip it
            print(json.dumps({"kernel": kind, "group": group, "tiles": label(tiles),
                              "error": str(e).splitlines()[0][:200]}), flush=True)
            continue
          gpu = None if on_cpu else gpu_us(call, L, prefix="" if tiles is None else "gathered_")
          row = {"kernel": kind, "group": group, "active": int(count[0]), "tiles": label(tiles),
                 "ms": round(ms, 4), "gb": round(nbytes / 1e9, 4),
                 "tb_s": round(nbytes / (ms / 1e3) / 1e12, 3), **env}
          if kind in ("shrink", "shrink-splits"):
            row["splits"] = shrink_splits(d_in, len(outs), int(ids.shape[0]), tiles)
          if gpu:
            row.update(kernel_us=round(gpu[0], 2), other_us=round(gpu[1], 2),
                       kernel_tb_s=round(nbytes / L / (gpu[0] * 1e-6) / 1e12, 3))
          print(json.dumps(row), flush=True)
          lines.append(f"| {kind} | {group} | {row['active']} | {label(tiles)} | {ms:.3f} |"
                       f" {row['gb']:.3f} | {row['tb_s']:.2f} | {row.get('kernel_us', '-')} |"
                       f" {row.get('kernel_tb_s', '-')} | {row.get('other_us', '-')} |")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
