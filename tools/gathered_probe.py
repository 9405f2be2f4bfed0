"""The gathered path's decode step with the expansion kernel's settings varied (GPU).

    python tools/gathered_probe.py --experts 64 --rank 64 --top-k 4 --batch 32 --rounds 5

The BGMV sweep (`tools/bgmv_large_sweep.py`) times each kernel alone; this probe asks the
question that decides a default: the whole `pregated-gathered+sere` step of the Llama-2-7B
preset with `bgmv.expand` as the library runs it (`library`), with each form of its slot loop
(`Tiles.slot_loop`: `load`, `registers`, `static`; `registers-unroll2/3` take 2 or 3 slots per
trip, `Tiles.slot_unroll`; `h-3d` loads h as the kernel did before, one 3-D tile of all partial
sums reshaped or summed; `one-partial`, `split4-one-partial`, `split8-one-partial`: the shrink's
K split for the library's, 768 or 1536 programs, its partial sums added into one bf16 partial
by XLA before the expansion), with the static loop over an h whose
partial sums were added first (`static-summed`; here once per module, a step that adopts it would add
them once per group), and, for narrow pools whose base GEMM the library fuses into the
expansion, with XLA's base GEMM and the expansion alone (`xla-base`, `xla-base-static`) or, at
batches above `Thresholds.fused_base_max_rows`, with the base GEMM fused all the same
(`fused-base`),
interleaved in rounds beside the fused-weight backbone and `pregated-packed` (the path the
gathered one has to beat). Each variant is patched in while its step compiles, and only then
(the compiled step keeps what it traced). Ratios to the backbone are paired by round: median
[95% t-interval]. JSON lines on stdout; `--table RUN.jsonl` writes RUN.md beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels.bgmv as bgmv
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from adafuse_jax.bench import measure as B
from adafuse_jax.config import PRESETS, AdapterConfig
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.paths import registry
from adafuse_jax.vocab import Mode, PathName
from pallas_kernels.bgmv import triton

_LIBRARY_EXPAND = bgmv.expand


def _expand_summed(h, b, layer, ids, count, *, group=0, rows, tiles=None, backend="auto"):
  """`bgmv.expand` over h with its S partial sums added first (S = 1 then)."""
  h = h.astype(jnp.float32).sum(axis=1, keepdims=True)
  return _LIBRARY_EXPAND(h, b, layer, ids, count, group=group, rows=rows, tiles=tiles,
                         backend=backend)


_LIBRARY_SLOT_TILES = triton._slot_tiles
_LIBRARY_SHRINK = bgmv.shrink


def shrink_one_partial(min_programs: int | None):
  """`bgmv.shrink` whose input dimension is split for `min_programs` (None: the library's
  tiles), its S partial sums then added in f32 and cast to x's dtype by XLA (one small fusion
  per group and layer): the expansion then always takes its one-partial, 2-D load of h."""
  def shrink(x, a_pools, layer, ids, count, gmat, *, scale=1.0, tiles=triton.Tiles(),
             backend="auto"):
    if min_programs is not None:
      tiles = dataclasses.replace(tiles, min_programs=min_programs)
    h = _LIBRARY_SHRINK(x, a_pools, layer, ids, count, gmat, scale=scale, tiles=tiles,
                        backend=backend)
    return h if h.shape[1] == 1 else h.astype(jnp.float32).sum(1, keepdims=True).astype(x.dtype)
  return shrink


def slot_tiles_3d(h_ref, b_ref, layer, j, col_mask, u, expert, active=None, *, group, rank,
                  splits, block_m, block_n, block_r):
  """`triton._slot_tiles` as it loaded h before: one 3-D load of every partial sum [S, M', r'],
  upcast to f32, then summed over S (S > 1) or reshaped to 2-D (S = 1)."""
  h_mask = None if active is None else jnp.broadcast_to(active, (splits, block_m, block_r))
  h = plgpu.load(h_ref.at[jnp.int32(group), pl.ds(0, splits), pl.ds(0, block_m),
                          pl.ds(u * block_r, block_r)], mask=h_mask,
                 other=None if active is None else 0.0).astype(jnp.float32)
  h = jnp.sum(h, axis=0) if splits > 1 else h.reshape(block_m, block_r)
  b_mask = (jnp.arange(block_r) < rank)[:, None] & col_mask[None, :]
  b = plgpu.load(b_ref.at[layer, expert, pl.ds(0, block_r), pl.ds(j * block_n, block_n)],
                 mask=b_mask if active is None else b_mask & active, other=0.0)
  return h, b


# name -> (the expansion's slot loop, h summed first, XLA's base GEMM whatever the pool's width,
# slots per trip of the loop).
VARIANTS = {"library": (None, False, False, None), "load": ("load", False, False, 1),
            "registers": ("registers", False, False, 1),
            "registers-unroll2": ("registers", False, False, 2),
            "registers-unroll3": ("registers", False, False, 3),
            "static": ("static", False, False, 1), "static-summed": ("static", True, False, 1),
            "xla-base": (None, False, True, None), "xla-base-static": ("static", False, True, 1),
            "h-3d": (None, False, False, None), "h-3d-unroll2": (None, False, False, 2)}
# name -> the shrink's min_programs, its partial sums added into one before the expansion.
SHRINK_VARIANTS = {"one-partial": None, "split4-one-partial": 768, "split8-one-partial": 1536}


@contextlib.contextmanager
def patched(slot_loop: str | None = None, summed: bool = False, xla_base: bool = False,
            unroll: int | None = None, h_3d: bool = False, shrink=None, fused_base: bool = False):
  """The expansion's settings for the steps compiled inside (None: the library's). `xla_base` moves
  `Thresholds.fused_base_max_width` to 0, so that a narrow pool (E·r <= 512, whose base GEMM
  the library fuses into the Pallas expansion) runs XLA's base GEMM and `bgmv.expand` too;
  `fused_base` lifts `Thresholds.fused_base_max_rows`, so that a narrow pool fuses its base GEMM
  into the expansion at any batch."""
  library_tiles = triton.EXPAND_TILES
  gathered = registry.PATHS[PathName.GATHERED]
  library_thresholds = gathered.thresholds
  if slot_loop is not None:
    triton.EXPAND_TILES = dataclasses.replace(library_tiles, slot_loop=slot_loop)
  if unroll is not None:
    triton.EXPAND_TILES = dataclasses.replace(triton.EXPAND_TILES, slot_unroll=unroll)
  if h_3d:
    triton._slot_tiles = slot_tiles_3d
  if shrink is not None:
    bgmv.shrink = shrink
  # The kernels' jitted entry points cache what they traced by their arguments alone: a
  # variant that patches a kernel's body (not its Tiles) must trace them again.
  for kernel in (triton.gathered_expand, triton.gathered_expand_matmul):
    kernel.clear_cache()
  if summed:
    bgmv.expand = _expand_summed
  if xla_base:
    gathered.thresholds = dataclasses.replace(library_thresholds, fused_base_max_width=0)
  if fused_base:
    gathered.thresholds = dataclasses.replace(library_thresholds, fused_base_max_rows=1 << 30)
  try:
    yield
  finally:
    triton.EXPAND_TILES, bgmv.expand, bgmv.shrink = library_tiles, _LIBRARY_EXPAND, _LIBRARY_SHRINK
    triton._slot_tiles = _LIBRARY_SLOT_TILES
    for kernel in (triton.gathered_expand, triton.gathered_expand_matmul):
      kernel.clear_cache()
    gathered.thresholds = library_thresholds


def table(path: pathlib.Path) -> str:
  """The markdown table of one run's JSON lines (written beside them as .md)."""
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  env = rows[0]
  lines = [f"`{env['preset']}`, batch {env['batch']}, E={env['experts']} r={env['rank']}"
           f" top-{env['top_k']}{', SERE (rho 0, S 1) on the gathered rows' if env['sere'] else ''};"
           f" {env['device']}, JAX {env['jax']}, {env['date']}."
           + (f" Command: `{env['command']}`." if "command" in env else ""), "",
           "| program | pipelined ms | vs backbone [95%] | distinct experts | kernels / step |",
           "|---|---|---|---|---|"]
  for r in rows:
    v = r["vs_backbone"]
    interval = f" [{v['low']:.3f}, {v['high']:.3f}]" if "low" in v else ""
    lines.append(f"| {r['program']} | {r['pipelined_ms']:.3f} | {v['median']:.3f}x{interval}"
                 f" | {r['distinct_experts'] or '-'} |"
                 f" {r['kernels_per_step']} |")
  text = "\n".join(lines) + "\n"
  path.with_suffix(".md").write_text(text)
  return text


def main() -> None:
  if sys.argv[1:2] == ["--table"]:
    print(table(pathlib.Path(sys.argv[2])))
    return
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="llama2-7b")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--top-k", type=int, default=4)
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--no-sere", action="store_true", help="the gathered rows without SERE")
  args = p.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  model = LlamaModel(PRESETS[args.preset], dtype=dtype)
  acfg = AdapterConfig(num_experts=args.experts, rank=args.rank, top_k=args.top_k,
                       modules=("q", "k", "v", "o", "gate", "up", "down"))
  adapters = B.build_adapters(model.cfg, Mode.PREGATED, acfg, dtype, 0)
  sere = None if args.no_sere else B.calibrated_sere(model, adapters, primary_k=1, rho=0.0,
                                                      seed=0)
  common = dict(batch=args.batch, cache_len=args.cache_len, warmup=3, steps=args.steps,
                prefill_lengths=(), seed=0, keep=True)
  rows = {"backbone-packed": B.bench_mode(model, None, path=PathName.PACKED, **common),
          "pregated-packed": B.bench_mode(model, adapters, path=PathName.PACKED, **common)}
  for name in args.variants.split(","):
    if name in SHRINK_VARIANTS:
      settings = dict(shrink=shrink_one_partial(SHRINK_VARIANTS[name]))
    elif name == "fused-base":
      settings = dict(fused_base=True)
    else:
      settings = dict(zip(("slot_loop", "summed", "xla_base", "unroll"), VARIANTS[name]),
                      h_3d=name.startswith("h-3d"))
    with patched(**settings):
      rows[f"gathered-{name}"] = B.bench_mode(model, adapters, path=PathName.GATHERED,
                                              sere=sere, **common)
  times = {n: [] for n in rows}
  for _ in range(args.rounds):
    for name, r in rows.items():
      times[name].append(r["round"]()[0])
  env = {"preset": args.preset, "batch": args.batch, "experts": args.experts,
         "rank": args.rank, "top_k": args.top_k, "sere": sere is not None,
         "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "command": " ".join(["python tools/gathered_probe.py", *sys.argv[1:]])}
  for name, r in rows.items():
    print(json.dumps({"program": name, "pipelined_ms": round(float(np.median(times[name])), 3),
                      "vs_backbone": {k: round(v, 4) for k, v in B.ratio_interval(
                          times[name], times["backbone-packed"]).items()},
                      "distinct_experts": r.get("distinct_experts"),
                      "kernels_per_step": r.get("kernels_per_step"), **env}), flush=True)


if __name__ == "__main__":
  main()
