"""Prompt-time expert deltas on the 7B shapes: the segmented Pallas kernels beside their Triton
peer, `jax.lax.ragged_dot` and plain XLA, against the base GEMM they ride beside.

    python tools/segmented_bench.py --out DIR [--tokens 512,2048] [--configs 8x16,64x64]
    python tools/segmented_bench.py --preset smollm2-135m --layers 2 --tokens 70 \
        --configs 4x8 --steps 2 --warmup 1           # CPU smoke run (interpreter)

For each module shape (q: 4096->4096, gate: 4096->11008, down: 11008->4096), prompt length T and
pool (E experts of rank r, top-k), one jitted function computes the module for every one of the
32 layers (unrolled, each layer its own weights, as a prefill does), so one call runs for
milliseconds and the timing measures the GPU, not dispatch. Variants, all computing the same
delta `scale Σ_j g_j (x A[l, e_j]) B[l, e_j]`:

- `base`: the backbone's GEMM `x @ W[l]` alone (what the delta must stay small beside);
- `pallas`: `segmented.segmented_delta` (row gather, shrink, expand, combine);
- `triton`: the same algorithm with the Triton-language peer (`triton_peer.triton_delta`);
- `pallas-kernels` / `triton-kernels`: the shrink and expand launches alone, same table and rows:
  the like-for-like answer to "does Pallas cost anything";
- `ragged_dot`: XLA's grouped GEMM on the sorted pairs (`segmented.ragged_dot_delta`);
- `xla-dense`: every expert's shrink and expand with zero gates for the unchosen, then added to
  the base output (`experts.expert_delta` as the XLA path ran it for prompts);
- `xla-dense-bias`: the same dense delta written so that XLA folds the base output into the
  expansion GEMM as its bias (`experts.dense_bias_output`).

Every variant but `-kernels` returns the module's whole output (x @ W[l] + delta, bf16) for
every layer, so nothing can be elided and each pays for its own way of adding the delta.

Each variant is checked against the f32 reference (`segmented_reference`) on layer 0 before it
is timed. Median of `--steps` synced calls after `--warmup`, fresh random activations per call
(a few drawn up front, cycled). Writes DIR/segmented.json, DIR/segmented.md and DIR/segmented.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench.measure import Timing, environment, time_calls
from adafuse_jax.config import PRESETS
from adafuse_jax.adapters.routing import dense_gates
from adafuse_jax.paths.xla import dense_bias_output, expert_delta
from pallas_kernels.sgmv import jax_triton as triton_peer
from pallas_kernels.sgmv.reference import (gather_rows, ragged_dot_delta, segment_table,
                                           segmented_reference)
from pallas_kernels.sgmv.triton import Tiles as SegmentTiles
from pallas_kernels.sgmv.triton import segmented_delta, segmented_expand, segmented_shrink

MODULES = ("q", "gate", "down")
SCALE = 0.5
INTERPRET = jax.default_backend() != "gpu"  # a CPU smoke run goes through the interpreter


def _problem(key, num_layers, d_in, d_out, num_experts, rank, dtype):
  ks = jax.random.split(key, 3)
  w = (jax.random.normal(ks[0], (num_layers, d_in, d_out), jnp.float32) * d_in ** -0.5).astype(dtype)
  a = (jax.random.normal(ks[1], (num_layers, d_in, num_experts, rank), jnp.float32)
       * d_in ** -0.5).astype(dtype)
  b = (jax.random.normal(ks[2], (num_layers, num_experts, rank, d_out), jnp.float32)
       * rank ** -0.5).astype(dtype)
  return w, a, b


def _routing(rng, tokens, num_experts, top_k):
  experts = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)])
  gates = rng.dirichlet(np.ones(top_k), size=tokens).astype(np.float32)
  return jnp.asarray(experts, jnp.int32), jnp.asarray(gates)


def variants(tiles: SegmentTiles, num_layers: int) -> dict:
  """name -> fn(x, w, a, b, experts, gates, dense, table) -> every layer's output (a tuple, so
  nothing is elided): the module's full output y = x @ W[l] + delta in bf16, or, for the
  `-kernels` variants, the expand's rows alone."""
  def over_layers(one):
    def run(x, w, a, b, experts, gates, dense, table):
      return tuple(one(l, x, w, a, b, experts, gates, dense, table) for l in range(num_layers))
    return run

  def plus(delta_fn):
    # As the model's "pallas" prompt path: the GEMM in the weights' dtype, the delta in f32.
    def one(l, x, w, a, b, experts, gates, dense, table):
      y = (x @ w[l]).astype(jnp.float32) + delta_fn(l, x, a, b, experts, gates, table)
      return y.astype(x.dtype)
    return one

  def kernels(l, x, w, a, b, experts, gates, dense, table):
    h = segmented_shrink(gather_rows(x, table), [a], l, table, scale=SCALE, tiles=tiles,
                         interpret=INTERPRET)
    return segmented_expand(h, b, l, table, tiles=tiles, interpret=INTERPRET)

  # The Triton peer keeps one shrink program per tile (its like-for-like Pallas run is S = 1).
  t_tiles = dataclasses.replace(tiles, shrink_splits=1)

  def t_kernels(l, x, w, a, b, experts, gates, dense, table):
    h = triton_peer.triton_shrink(gather_rows(x, table), a, l, table, scale=SCALE, tiles=t_tiles)
    return triton_peer.triton_expand(h, b, l, table, tiles=t_tiles)

  def xla_dense(l, x, w, a, b, experts, gates, dense, table):
    # The XLA path as `AdapterRuntime` runs it for prompts (experts.expert_delta, "dense").
    return x @ w[l] + (expert_delta_path(x, a[l], b[l], experts, gates, "dense")).astype(x.dtype)

  def xla_dense_bias(l, x, w, a, b, experts, gates, dense, table):
    return dense_bias_output(x, w[l], a[l], b[l], dense, SCALE)

  out = {
      "base": lambda l, x, w, *_: x @ w[l],
      "xla-dense": xla_dense,
      "xla-dense-bias": xla_dense_bias,
      "pallas": plus(lambda l, x, a, b, e, g, table: segmented_delta(
          x, [a], [b], l, table, scale=SCALE, tiles=tiles, interpret=INTERPRET)[0]),
      "triton": plus(lambda l, x, a, b, e, g, table: triton_peer.triton_delta(
          x, a, b, l, table, scale=SCALE, tiles=t_tiles)),
      "ragged_dot": plus(lambda l, x, a, b, e, g, table: ragged_dot_delta(
          x, a, b, l, e, g, SCALE)),
      "pallas-kernels": kernels,
      "triton-kernels": t_kernels,
  }
  return {name: over_layers(fn) for name, fn in out.items()}


def expert_delta_path(x, a, b, experts, gates, path):
  """`paths.xla.expert_delta` in one formulation ("gather" or "dense")."""
  return expert_delta(x, a, b, experts, gates, gather=path == "gather").astype(jnp.float32) * SCALE


def check(fn, x, w, a, b, experts, gates, dense, table) -> float:
  """Max error of the variant's layer-0 output against the f32 reference, relative to the max
  |delta| (the part that differs between variants)."""
  delta = segmented_reference(x, a, b, 0, experts, gates, SCALE)
  want = x.astype(jnp.float32) @ w[0].astype(jnp.float32) + delta
  got = fn(x, w, a, b, experts, gates, dense, table)[0].astype(jnp.float32)
  return float(jnp.abs(got - want).max() / jnp.abs(delta).max())


def run(args, write=None) -> dict:
  """Every case and variant; `write(report)` after each case, so a run cut short keeps what it
  measured."""
  cfg = PRESETS[args.preset]
  shapes = cfg.linear_shapes()
  num_layers = args.layers or cfg.layers
  dtype = jnp.bfloat16
  triton_ok, triton_why = triton_peer.available()
  report = {"environment": environment(), "preset": args.preset, "layers": num_layers,
            "tiles": dataclasses.asdict(SegmentTiles()), "rows": [], "skipped": {}}
  key = jax.random.key(args.seed)
  rng = np.random.default_rng(args.seed)
  configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
  tokens_list = [int(t) for t in args.tokens.split(",")]
  names = [n.strip() for n in args.variants.split(",")]
  for case, ((num_experts, rank), module) in enumerate(
      itertools.product(configs, args.modules.split(","))):
    d_in, d_out = shapes[module]
    w, a, b = _problem(jax.random.fold_in(key, case), num_layers, d_in, d_out, num_experts,
                       rank, dtype)
    for t in tokens_list:
      experts, gates = _routing(rng, t, num_experts, args.top_k)
      tiles = (dataclasses.replace(SegmentTiles(), block_m=args.block_m) if args.block_m else
               SegmentTiles.get_default(t * args.top_k, num_experts))
      tiles = dataclasses.replace(tiles, shrink_splits=args.shrink_splits)
      fns = variants(tiles, num_layers)
      dense = dense_gates(experts, gates, num_experts)
      table = segment_table(experts, gates, num_experts, tiles.block_m)
      xs = [jax.random.normal(jax.random.fold_in(key, 7 * t + i), (t, d_in), jnp.float32)
            .astype(dtype) for i in range(4)]
      for name in names:
        if name.startswith("triton") and not triton_ok:
          report["skipped"][name] = triton_why
          continue
        fn = jax.jit(fns[name])
        err = None if name == "base" or name.endswith("-kernels") else check(fn, xs[0], w, a, b, experts, gates,
                                                             dense, table)
        cycle = itertools.cycle(xs)
        timing: Timing = time_calls(lambda: fn(next(cycle), w, a, b, experts, gates, dense, table),
                                    warmup=args.warmup, steps=args.steps)
        report["rows"].append({
            "experts": num_experts, "rank": rank, "top_k": args.top_k, "module": module,
            "d_in": d_in, "d_out": d_out, "tokens": t, "variant": name,
            "ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
            "rel_err": err, "layers": num_layers, "block_m": tiles.block_m,
            "shrink_splits": tiles.shrink_splits,
            "distinct_experts": int((np.asarray(table.group_sizes) > 0).sum())})
        print(f"E={num_experts} r={rank} {module:5s} T={t:5d} {name:15s} {timing.median_ms:8.3f} ms"
              + (f"  err {err:.1e}" if err is not None else ""), flush=True)
      if write:
        write(report)
  return report


def markdown(report: dict) -> str:
  env = report["environment"]
  lines = [f"Segmented (SGMV) prompt deltas, {env['device']}, jax {env['jax']}, {env['date']}.",
           "", f"Command: `{env['command']}`", "",
           f"ms for the module over {report['layers']} layers of the {report['preset']} shapes"
           " (bf16), median of synced calls. `base` is the GEMM x @ W alone; the other columns"
           " compute the whole output x @ W + delta, in brackets their cost over `base` in the"
           " same run; `-kernels` columns time the shrink and expand launches alone, in brackets"
           " their time as a share of `base`.", ""]
  rows = report["rows"]
  names = list(dict.fromkeys(r["variant"] for r in rows))
  keys = list(dict.fromkeys((r["experts"], r["rank"], r["module"], r["tokens"]) for r in rows))
  # Runs before 2026-11-30 05:40 UTC used 64-row tiles throughout.
  block_m = {(r["experts"], r["rank"], r["module"], r["tokens"]):
             f"{r.get('block_m', 64)} / {r.get('shrink_splits', 1)}" for r in rows}
  lines.append("| E x r | module | tokens | rows/tile / K splits | " + " | ".join(names) + " |")
  lines.append("|---" * (4 + len(names)) + "|")
  for e, r, m, t in keys:
    cell = {x["variant"]: x for x in rows if (x["experts"], x["rank"], x["module"], x["tokens"])
            == (e, r, m, t)}
    base = cell.get("base", {}).get("ms")
    vals = []
    for n in names:
      if n not in cell:
        vals.append("-")
      elif n == "base" or not base:
        vals.append(f"{cell[n]['ms']:.2f}")
      else:
        # Full outputs: the overhead over the GEMM alone; the -kernels rows: their own share.
        share = (cell[n]["ms"] / base - (0 if n.endswith("-kernels") else 1)) * 100
        vals.append(f"{cell[n]['ms']:.2f} ({share:.0f}%)" if n.endswith('-kernels')
                    else f"{cell[n]['ms']:.2f} ({share:+.0f}%)")
    lines.append(f"| {e}x{r} | {m} | {t} | {block_m[(e, r, m, t)]} | " + " | ".join(vals) + " |")
  errs = [x for x in rows if x["rel_err"] is not None]
  if errs:
    worst = max(errs, key=lambda x: x["rel_err"])
    lines += ["", f"Largest error of an output against the f32 reference (layer 0, relative to"
              " max |delta|; bf16 outputs):"
              f" {worst['rel_err']:.1e} ({worst['variant']}, {worst['module']}, T={worst['tokens']})."]
  for n, why in report["skipped"].items():
    lines += ["", f"`{n}` not run: {why}"]
  return "\n".join(lines) + "\n"


def plot(report: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in report["rows"] if r["variant"] != "base"]
  keys = list(dict.fromkeys((r["experts"], r["rank"], r["module"], r["tokens"]) for r in rows))
  names = list(dict.fromkeys(r["variant"] for r in rows))
  base = {(r["experts"], r["rank"], r["module"], r["tokens"]): r["ms"]
          for r in report["rows"] if r["variant"] == "base"}
  fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.9), 4.5))
  width = 0.8 / max(1, len(names))
  for i, n in enumerate(names):
    ys = [next(((r["ms"] / base[k] - (not n.endswith("-kernels"))) * 100 for r in rows
                if r["variant"] == n and
                (r["experts"], r["rank"], r["module"], r["tokens"]) == k), np.nan) for k in keys]
    ax.bar(np.arange(len(keys)) + i * width, ys, width, label=n)
  ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
  ax.set_xticklabels([f"{e}x{r}\n{m} T={t}" for e, r, m, t in keys], fontsize=7)
  ax.set_ylabel("cost over the base GEMM, %")
  ax.set_yscale("log")
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(f"Prompt-time expert deltas, {report['environment']['device']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  p.add_argument("--tokens", default="512,2048")
  p.add_argument("--configs", default="8x16,64x64", help="pools as EXPERTSxRANK, comma-separated")
  p.add_argument("--modules", default=",".join(MODULES))
  p.add_argument("--variants", default="base,xla-dense,xla-dense-bias,pallas,triton,ragged_dot,"
                 "pallas-kernels,triton-kernels")
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--block-m", type=int, default=0,
                 help="rows per segment tile (16, 32 or 64); 0: SegmentTiles.for_problem")
  p.add_argument("--shrink-splits", type=int, default=1,
                 help="Pallas shrink programs per tile over the input dimension (power of two)")
  p.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS),
                 help="module shapes (seeded random weights)")
  p.add_argument("--layers", type=int, default=0, help="layers per call (default: the preset's)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="folder for segmented.json / .md / .png")
  args = p.parse_args(argv)
  if args.shrink_splits < 1 or args.shrink_splits & (args.shrink_splits - 1):
    p.error(f"--shrink-splits {args.shrink_splits}: a power of two (1, 2, 4, ...)")
  if args.block_m not in (0, 16, 32, 64):
    p.error(f"--block-m {args.block_m}: choose 16, 32 or 64 (or 0 for the default choice)")
  if args.top_k < 1 or any(int(c.split("x")[0]) < args.top_k for c in args.configs.split(",")):
    p.error(f"--top-k {args.top_k} must be between 1 and each pool's number of experts")
  out = pathlib.Path(args.out) if args.out else None

  def write(report):
    out.mkdir(parents=True, exist_ok=True)
    (out / "segmented.json").write_text(json.dumps(report, indent=1))
    (out / "segmented.md").write_text(markdown(report))

  report = run(args, write if out else None)
  print(markdown(report))
  if out:
    write(report)
    plot(report, out / "segmented.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
