"""Prompt-time expert deltas on the 7B shapes: the segmented Pallas kernels beside their Triton
peer, `jax.lax.ragged_dot` and plain XLA, against the base GEMM they ride beside.

    python tools/segmented_bench.py --out DIR [--tokens 512,2048] [--configs 8x16,64x64]
    python tools/segmented_bench.py --preset smollm2-135m --layers 2 --tokens 70 \
        --configs 4x8 --steps 2 --warmup 1           # CPU smoke run (interpreter)

For each module shape (q: 4096->4096, gate: 4096->11008, down: 11008->4096), prompt length T and
pool (E experts of rank r, top-k), one jitted function computes the module for every one of the
32 layers (unrolled, each layer its own weights, as a prefill does), so one call runs for
milliseconds and the timing measures the GPU, not dispatch. Variants, all computing the same
delta `scale Σ_j g_j (x A[l, e_j]) B[l, e_j]` as [T, N] f32:

- `base`: the backbone's GEMM `x @ W[l]` alone (what the delta must stay small beside);
- `pallas`: `segmented.segmented_delta` (row gather, shrink, expand, combine);
- `triton`: the same algorithm with the Triton-language peer (`triton_peer.triton_delta`);
- `pallas-kernels` / `triton-kernels`: the shrink and expand launches alone, same table and rows:
  the like-for-like answer to "does Pallas cost anything";
- `ragged_dot`: XLA's grouped GEMM on the sorted pairs (`segmented.ragged_dot_delta`);
- `xla-dense`: every expert's shrink and expand with zero gates for the unchosen
  (`experts.expert_delta`, the XLA path's choice for prompts);
- `xla-gather`: the chosen experts' factors gathered per token (`expert_delta` "gather").

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

from adafuse_jax.benchmarks import Timing, environment, time_calls
from adafuse_jax.config import PRESETS
from adafuse_jax.experts import expert_delta
from pallas_kernels import triton_peer
from pallas_kernels.segmented import (SegmentTiles, combine, gather_rows, ragged_dot_delta,
                                      segment_table, segmented_delta, segmented_expand,
                                      segmented_reference, segmented_shrink)

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


def variants(tiles: SegmentTiles, num_layers: int, top_k: int) -> dict:
  """name -> fn(x, w, a, b, experts, gates, table, rows) -> a value depending on every layer."""
  def over_layers(one):
    def run(x, w, a, b, experts, gates, table, rows):
      # A few columns of each layer's result keep every layer live; their sum is cheap.
      return sum(one(l, x, w, a, b, experts, gates, table, rows)[:, :8].sum() for l in range(num_layers))
    return run

  def dense(l, x, w, a, b, experts, gates, table, rows):
    return expert_delta_path(x, a[l], b[l], experts, gates, "dense")

  def gather(l, x, w, a, b, experts, gates, table, rows):
    return expert_delta_path(x, a[l], b[l], experts, gates, "gather")

  def kernels(l, x, w, a, b, experts, gates, table, rows):
    h = segmented_shrink(rows, [a], l, table, scale=SCALE, tiles=tiles,
                         interpret=INTERPRET)
    return segmented_expand(h, b, l, table, tiles=tiles, interpret=INTERPRET)

  def t_kernels(l, x, w, a, b, experts, gates, table, rows):
    h = triton_peer.triton_shrink(rows, a, l, table, scale=SCALE, tiles=tiles)
    return triton_peer.triton_expand(h, b, l, table, tiles=tiles)

  out = {
      "base": lambda l, x, w, *_: x @ w[l],
      "pallas": lambda l, x, w, a, b, e, g, table, rows: segmented_delta(
          x, [a], [b], l, table, scale=SCALE, tiles=tiles, interpret=INTERPRET)[0],
      "pallas-kernels": kernels,
      "triton": lambda l, x, w, a, b, e, g, table, rows: triton_peer.triton_delta(
          x, a, b, l, table, scale=SCALE, tiles=tiles),
      "triton-kernels": t_kernels,
      "ragged_dot": lambda l, x, w, a, b, e, g, table, rows: ragged_dot_delta(
          x, a, b, l, e, g, SCALE),
      "xla-dense": dense,
      "xla-gather": gather,
  }
  return {name: over_layers(fn) for name, fn in out.items()}


def expert_delta_path(x, a, b, experts, gates, path):
  """`experts.expert_delta` with its formulation forced (the module reads EXPERT_PATH)."""
  import adafuse_jax.experts as ex

  saved, ex.EXPERT_PATH = ex.EXPERT_PATH, path
  try:
    return expert_delta(x, a, b, experts, gates).astype(jnp.float32) * SCALE
  finally:
    ex.EXPERT_PATH = saved


def check(name, x, w, a, b, experts, gates, table, rows, tiles) -> float | None:
  """Max error of the variant's layer-0 delta relative to max |reference| (None for base)."""
  want = segmented_reference(x, a, b, 0, experts, gates, SCALE)
  if name == "base":
    return None
  if name.endswith("-kernels"):
    return None  # the same launches as the full variant, checked there
  got = {
      "pallas": lambda: segmented_delta(x, [a], [b], 0, table, scale=SCALE, tiles=tiles,
                                        interpret=INTERPRET)[0],
      "triton": lambda: triton_peer.triton_delta(x, a, b, 0, table, scale=SCALE, tiles=tiles),
      "ragged_dot": lambda: ragged_dot_delta(x, a, b, 0, experts, gates, SCALE),
      "xla-dense": lambda: expert_delta_path(x, a[0], b[0], experts, gates, "dense"),
      "xla-gather": lambda: expert_delta_path(x, a[0], b[0], experts, gates, "gather"),
  }[name]()
  return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def run(args) -> dict:
  cfg = PRESETS[args.preset]
  shapes = cfg.linear_shapes()
  num_layers = args.layers or cfg.layers
  dtype = jnp.bfloat16
  tiles = SegmentTiles()
  triton_ok, triton_why = triton_peer.available()
  rows_out, skipped = [], {}
  key = jax.random.key(args.seed)
  rng = np.random.default_rng(args.seed)
  configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
  tokens_list = [int(t) for t in args.tokens.split(",")]
  names = [n.strip() for n in args.variants.split(",")]
  for case, ((num_experts, rank), module) in enumerate(
      itertools.product(configs, args.modules.split(","))):
    d_in, d_out = shapes[module]
    w, a, b = _problem(jax.random.fold_in(key, case), num_layers,
                       d_in, d_out, num_experts, rank, dtype)
    for t in tokens_list:
      experts, gates = _routing(rng, t, num_experts, args.top_k)
      table = segment_table(experts, gates, num_experts, tiles.block_m)
      xs = [jax.random.normal(jax.random.fold_in(key, 7 * t + i), (t, d_in), jnp.float32)
            .astype(dtype) for i in range(4)]
      fns = variants(tiles, num_layers, args.top_k)
      for name in names:
        if name.startswith("triton") and not triton_ok:
          skipped[name] = triton_why
          continue
        fn = jax.jit(fns[name])
        err = check(name, xs[0], w, a, b, experts, gates, table, gather_rows(xs[0], table), tiles)
        cycle = itertools.cycle([(x, gather_rows(x, table)) for x in xs])

        def call():
          x, rows = next(cycle)
          return fn(x, w, a, b, experts, gates, table, rows)

        timing: Timing = time_calls(call, warmup=args.warmup, steps=args.steps)
        row = {"experts": num_experts, "rank": rank, "top_k": args.top_k, "module": module,
               "d_in": d_in, "d_out": d_out, "tokens": t, "variant": name,
               "ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
               "rel_err": err, "layers": num_layers,
               "distinct_experts": int((np.asarray(table.group_sizes) > 0).sum())}
        rows_out.append(row)
        print(f"E={num_experts} r={rank} {module:5s} T={t:5d} {name:15s} {timing.median_ms:8.3f} ms"
              + (f"  err {err:.1e}" if err is not None else ""), flush=True)
  return {"environment": environment(), "preset": args.preset, "layers": num_layers,
          "tiles": dataclasses.asdict(tiles), "rows": rows_out, "skipped": skipped}


def markdown(report: dict) -> str:
  env = report["environment"]
  lines = [f"Segmented (SGMV) prompt deltas, {env['device']}, jax {env['jax']}, {env['date']}.",
           "", f"Command: `{env['command']}`", "",
           f"ms for the module over {report['layers']} layers of the {report['preset']} shapes"
           " (bf16), median of synced calls; in brackets the share of the base GEMM's time in the"
           " same run.", ""]
  rows = report["rows"]
  names = list(dict.fromkeys(r["variant"] for r in rows))
  keys = list(dict.fromkeys((r["experts"], r["rank"], r["module"], r["tokens"]) for r in rows))
  lines.append("| E x r | module | tokens | " + " | ".join(names) + " |")
  lines.append("|---" * (3 + len(names)) + "|")
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
        vals.append(f"{cell[n]['ms']:.2f} ({100 * cell[n]['ms'] / base:.0f}%)")
    lines.append(f"| {e}x{r} | {m} | {t} | " + " | ".join(vals) + " |")
  errs = [x for x in rows if x["rel_err"] is not None]
  if errs:
    worst = max(errs, key=lambda x: x["rel_err"])
    lines += ["", f"Largest error against the f32 reference (layer 0, relative to max |ref|):"
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
    ys = [next((r["ms"] / base[k] * 100 for r in rows if r["variant"] == n and
                (r["experts"], r["rank"], r["module"], r["tokens"]) == k), np.nan) for k in keys]
    ax.bar(np.arange(len(keys)) + i * width, ys, width, label=n)
  ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
  ax.set_xticklabels([f"{e}x{r}\n{m} T={t}" for e, r, m, t in keys], fontsize=7)
  ax.set_ylabel("delta time, % of the base GEMM")
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
  p.add_argument("--variants", default="base,pallas,pallas-kernels,triton,triton-kernels,"
                 "ragged_dot,xla-dense,xla-gather")
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS),
                 help="module shapes (seeded random weights)")
  p.add_argument("--layers", type=int, default=0, help="layers per call (default: the preset's)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="folder for segmented.json / .md / .png")
  args = p.parse_args(argv)
  if args.top_k < 1 or any(int(c.split("x")[0]) < args.top_k for c in args.configs.split(",")):
    p.error(f"--top-k {args.top_k} must be between 1 and each pool's number of experts")
  report = run(args)
  text = markdown(report)
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "segmented.json").write_text(json.dumps(report, indent=1))
    (out / "segmented.md").write_text(text)
    plot(report, out / "segmented.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
