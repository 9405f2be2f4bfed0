"""The SGMM switch kernel alone on the 7B shapes: bandwidth against the ceiling, tiles, XLA, HLO copies.

    python tools/sgmm_bench.py --out DIR [--quick] [--mosaic]

For each adapter configuration (all 7 modules; q and v only) it switches every adapted weight of
all 32 layers, `--switches` times in one jitted `fori_loop` (the weights donated and carried, so
the loop measures back-to-back launches, not Python dispatch), with a different expert pair and
new gates each time. Bytes per switch: read W0 + write W (+ the chosen experts' A and B). It also
times a step whose flag says nothing changed, the XLA formulation, with `--mosaic` the Mosaic GPU
version (`pallas_kernels/sgmm/mosaic.py`) at several tiles, and checks the optimized HLO of a
donated switch for copies of weight-sized buffers. Each rate is given as a share of the memory
ceiling (`adafuse_jax/bench/ceiling.py`: the fastest of Pallas read/copy kernels and XLA's
reduction and element-wise pass, measured in the same run) and, beside it, of XLA's element-wise
pass alone (the rate earlier versions divided by, which under-measures the device). Writes
DIR/sgmm.json and DIR/sgmm.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench import ceiling
from adafuse_jax.bench.measure import environment
from adafuse_jax.config import PRESETS
from pallas_kernels.sgmm.mosaic import Tiles as MosaicTiles
from pallas_kernels.sgmm.mosaic import switch_weights_mosaic
from pallas_kernels.sgmm.reference import switch_weights_xla
from pallas_kernels.sgmm.triton import Tiles as SwitchTiles
from pallas_kernels.sgmm.triton import switch_weights

CONFIGS = {"all 7 modules": ("q", "k", "v", "o", "gate", "up", "down"), "q,v": ("q", "v")}
MOSAIC_TILES = [(128, 128), (64, 128), (128, 256), (64, 256)]
TILE_CANDIDATES = [SwitchTiles(64, 128, 4, 4, 2), SwitchTiles(64, 256, 4, 4, 2),
                   SwitchTiles(32, 256, 8, 4, 2), SwitchTiles(128, 128, 2, 8, 2),
                   SwitchTiles(64, 256, 8, 8, 2), SwitchTiles(32, 128, 8, 4, 2)]


def build(modules, num_experts, rank, dtype, key):
  cfg = PRESETS["llama2-7b"]
  shapes = cfg.linear_shapes()
  L = cfg.layers
  ws, a, b = [], [], []
  for i, m in enumerate(modules):
    d_in, d_out = shapes[m]
    k = jax.random.fold_in(key, i)
    ws.append((jax.random.normal(k, (L, d_in, d_out), jnp.float32) * 0.02).astype(dtype))
    a.append((jax.random.normal(jax.random.fold_in(k, 1), (L, d_in, num_experts, rank)) * 0.02).astype(dtype))
    b.append((jax.random.normal(jax.random.fold_in(k, 2), (L, num_experts, rank, d_out)) * 0.02).astype(dtype))
  return ws, a, b, L


def time_switches(fn, weights, switches, reps=5):
  """Median seconds per switch over `reps` calls of a loop of `switches` switches."""
  times = []
  out = weights
  for i in range(reps + 2):
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    out = fn(out)
    jax.block_until_ready(out)
    if i >= 2:
      times.append((time.perf_counter() - t0) / switches)
  return float(np.median(times)), out


def count_weight_copies(hlo: str, shapes) -> int:
  """`copy` instructions in the optimized HLO whose result has a weight's shape."""
  dims = {",".join(str(d) for d in s) for s in shapes}
  n = 0
  for m in re.finditer(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", hlo):
    n += m.group(1) in dims
  return n


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--switches", type=int, default=10)
  p.add_argument("--quick", action="store_true", help="default tiles only")
  p.add_argument("--mosaic", action="store_true", help="also the Mosaic GPU kernel")
  args = p.parse_args()
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  dtype = jnp.bfloat16
  env = environment()
  rates = ceiling.measure(2 << 30, log=lambda m: print(f"# {m}", flush=True))
  best = ceiling.ceiling(rates)
  ceil, bw = best.tb_s * 1e12, rates["xla-add-one"].tb_s * 1e12
  print(f"# {env['device']} jax {env['jax']} ceiling {ceil / 1e12:.3f} TB/s ({best.method}),"
        f" element-wise pass {bw / 1e12:.3f} TB/s", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for cname, modules in CONFIGS.items():
    ws, a, b, L = build(modules, args.experts, args.rank, dtype, jax.random.key(0))
    base = [w.copy() for w in ws]
    nbytes = sum(2 * w.size * 2 for w in ws) + sum(
        args.top_k * L * args.rank * (x.shape[1] + y.shape[-1]) * 2 for x, y in zip(a, b))
    experts = jnp.asarray(np.stack([rng.choice(args.experts, args.top_k, replace=False)
                                    for _ in range(args.switches)]), jnp.int32)
    coefs = jnp.asarray(rng.uniform(0.1, 1.0, (args.switches, L, args.top_k)), jnp.float32)

    def loop(switch, changed=True):
      # Pools and base are arguments, never closed over: captured they become 13 GB constants.
      def run(weights, a, b, base, experts, coefs):
        def body(i, w):
          return tuple(switch(w, a, b, experts[i], coefs[i], changed, base))
        return jax.lax.fori_loop(0, args.switches, body, tuple(weights))
      jitted = jax.jit(run, donate_argnums=(0,))
      return lambda w: jitted(w, a, b, base, experts, coefs)

    variants = [("xla", lambda w, a, b, e, c, ch, base: switch_weights_xla(w, a, b, e, c, ch, base))]
    tiles_list = TILE_CANDIDATES[:1] if args.quick else TILE_CANDIDATES
    for t in tiles_list:
      variants.append((f"pallas bm={t.block_m} bn={t.block_n} rows={t.row_steps} w={t.num_warps}",
                       lambda w, a, b, e, c, ch, base, t=t: switch_weights(w, a, b, e, c, ch, base,
                                                                           tiles=t)))
    if args.mosaic:
      for tm, tn in MOSAIC_TILES:
        variants.append((f"mosaic tm={tm} tn={tn}",
                         lambda w, a, b, e, c, ch, base, tm=tm, tn=tn: switch_weights_mosaic(
                             w, a, b, e, c, ch, base, tiles=MosaicTiles(tm, tn))))
    current = tuple(w.copy() for w in ws)
    for label, fn in variants:
      try:
        t0 = time.perf_counter()
        compiled = loop(fn)
        sec, current = time_switches(compiled, current, args.switches)
        row = {"config": cname, "variant": label, "ms": sec * 1e3, "bytes": nbytes,
               "tb_s": nbytes / sec / 1e12, "of_ceiling": nbytes / sec / ceil,
               "of_copy": nbytes / sec / bw,
               "wall_s": time.perf_counter() - t0}
      except Exception as e:  # a tile the lowering rejects: record it and go on
        row = {"config": cname, "variant": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
      rows.append(row)
      print(json.dumps(row), flush=True)
    # A step where nothing changed: the launch returns at once.
    fn = lambda w, a, b, e, c, ch, base: switch_weights(w, a, b, e, c, ch, base)  # noqa: E731
    sec, current = time_switches(loop(fn, changed=False), current, args.switches)
    rows.append({"config": cname, "variant": "pallas, unchanged (flag false)", "ms": sec * 1e3})
    print(json.dumps(rows[-1]), flush=True)
    # The HLO of one donated switch: no copy of any weight.
    kernels = [("pallas", switch_weights)] + ([("mosaic", switch_weights_mosaic)]
                                              if args.mosaic else [])
    for kname, kfn in kernels:
      one = jax.jit(lambda w, a, b, base, e, c, kfn=kfn: kfn(w, a, b, e, c, True, base),
                    donate_argnums=(0,))
      hlo = one.lower(tuple(current), a, b, base, experts[0], coefs[0]).compile().as_text()
      copies = count_weight_copies(hlo, [w.shape for w in ws])
      aliased = "input_output_alias" in hlo
      rows.append({"config": cname, "variant": "hlo", "kernel": kname, "weight_copies": copies,
                   "input_output_alias": aliased, "custom_calls": hlo.count("custom-call(")})
      print(json.dumps(rows[-1]), flush=True)
    (out_dir / f"hlo_{cname.split()[0].replace(',', '')}.txt").write_text(
        "\n".join(l for l in hlo.splitlines() if "ENTRY" in l or "custom-call" in l
                  or " copy(" in l or "alias" in l)[:20000])
    del ws, a, b, base, current
  report = {"environment": env, "ceiling_tb_s": ceil / 1e12, "ceiling_method": best.method,
            "ceiling_rates_tb_s": {n: r.tb_s for n, r in rates.items()},
            "copy_bandwidth_tb_s": bw / 1e12, "experts": args.experts,
            "rank": args.rank, "top_k": args.top_k, "switches_per_call": args.switches,
            "rows": rows}
  (out_dir / "sgmm.json").write_text(json.dumps(report, indent=2))
  lines = [f"SGMM switch, llama2-7b shapes, bf16, E={args.experts}, r={args.rank}, k={args.top_k};"
           f" {env['device']}, jax {env['jax']}; memory ceiling {ceil / 1e12:.2f} TB/s"
           f" ({best.method}), an element-wise pass {bw / 1e12:.2f} TB/s; {env['date']}",
           f"Command: `{env['command']}`", "",
           "| adapted | variant | ms/switch | TB/s | % of ceiling | % of element-wise pass |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if "tb_s" in r:
      lines.append(f"| {r['config']} | {r['variant']} | {r['ms']:.3f} | {r['tb_s']:.2f} |"
                   f" {100 * r['of_ceiling']:.0f}% | {100 * r['of_copy']:.0f}% |")
    elif "ms" in r:
      lines.append(f"| {r['config']} | {r['variant']} | {r['ms']:.4f} | - | - | - |")
    elif "error" in r:
      lines.append(f"| {r['config']} | {r['variant']} | failed: {r['error'][:80]} | | | |")
  lines += ["", "| adapted | kernel | weight-sized copies in the donated switch's HLO |"
            " input_output_alias |", "|---|---|---|---|"]
  for r in rows:
    if r.get("variant") == "hlo":
      lines.append(f"| {r['config']} | {r.get('kernel', 'pallas')} | {r['weight_copies']} |"
                   f" {r['input_output_alias']} |")
  (out_dir / "sgmm.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
