"""How the decode step's layer loop is written, measured: the 7B shape's linear layers at batch 1.

    python tools/layer_loop_bench.py --out docs/benchmarks/h200/layer-loop   # on the GPU
    python tools/layer_loop_bench.py --preset smollm2-135m --dtype float32  # a CPU check

Same math, same weights (every linear module of every layer, one token), jitted four ways:
`lax.scan` over stacked `[L, in, out]` weights, a Python-unrolled loop over `W[l]` of the same
stacked arrays (what `adafuse_jax.model` does on the GPU), an unrolled loop over a list of
per-layer arrays (what it does on the CPU), and stacked `[L, out, in]` weights contracted as
`x @ W[l].T`. Modes are interleaved over rounds; the table gives each one's median ms per step
and its effective bandwidth (weight bytes / time).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench.measure import environment
from adafuse_jax.config import PRESETS
from adafuse_jax.timing import time_pipelined


def _weights(cfg, dtype, seed=0):
  """Per module, stacked [L, in, out] random weights (never zeros)."""
  key = jax.random.key(seed)
  out = {}
  for i, (name, (d_in, d_out)) in enumerate(cfg.linear_shapes().items()):
    w = jax.random.normal(jax.random.fold_in(key, i), (cfg.layers, d_in, d_out), jnp.float32)
    out[name] = (w * d_in ** -0.5).astype(dtype)
  return out


def _chain(x, mats):
  """One layer's linear modules as a chain whose every output feeds the next input (so nothing
  is dead code): q,k,v,gate,up read x; o reads q; down reads gate*up; the sum returns to x."""
  q, k, v = x @ mats["q"], x @ mats["k"], x @ mats["v"]
  attn = q @ mats["o"]
  ffn = (jax.nn.silu(x @ mats["gate"]) * (x @ mats["up"])) @ mats["down"]
  return x + attn + ffn + (k.sum() + v.sum()).astype(x.dtype) * 0


def variants(weights, layers):
  def scan_stacked(x, w):
    return jax.lax.scan(lambda h, wl: (_chain(h, wl), None), x, w)[0]

  def unrolled_stacked(x, w):
    for l in range(layers):
      x = _chain(x, {n: a[l] for n, a in w.items()})
    return x

  def unrolled_list(x, w):
    for l in range(layers):
      x = _chain(x, {n: a[l] for n, a in w.items()})
    return x

  def transposed(x, w):
    for l in range(layers):
      x = _chain(x, {n: a[l].T for n, a in w.items()})
    return x

  as_list = {n: tuple(a[l] for l in range(layers)) for n, a in weights.items()}
  as_t = {n: jnp.swapaxes(a, 1, 2) for n, a in weights.items()}
  return {"scan over stacked [L, in, out]": (scan_stacked, weights),
          "unrolled, stacked [L, in, out]": (unrolled_stacked, weights),
          "unrolled, list of [in, out]": (unrolled_list, as_list),
          "unrolled, stacked [L, out, in]": (transposed, as_t)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python tools/layer_loop_bench.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS))
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", help="folder for layer_loop.json and layer_loop.md")
  args = p.parse_args(argv)
  cfg, dtype = PRESETS[args.preset], jnp.dtype(args.dtype)
  weights = _weights(cfg, dtype)
  nbytes = cfg.linear_bytes(dtype.itemsize)
  x = jax.random.normal(jax.random.key(1), (1, cfg.hidden), jnp.float32).astype(dtype)
  runs = {}
  for name, (fn, w) in variants(weights, cfg.layers).items():
    compiled = jax.jit(fn).lower(x, w).compile()
    runs[name] = (lambda c=compiled, w=w: c(x, w))
  times = {name: [] for name in runs}
  for _ in range(args.rounds):  # interleaved: A B C D A B C D ...
    for name, run in runs.items():
      times[name].append(time_pipelined(run, warmup=2, steps=args.steps, repeats=1).median_ms)
  rows = [{"variant": n, "ms": float(np.median(t)), "min_ms": float(min(t)),
           "max_ms": float(max(t)), "tb_s": nbytes / (np.median(t) / 1e3) / 1e12}
          for n, t in times.items()]
  env = environment()
  lines = [f"{cfg.name} linear layers, batch 1, {dtype.name}; {env['device']}, jax {env['jax']},"
           f" {env['date']}; {args.rounds} interleaved rounds of {args.steps} pipelined steps;"
           f" command: `python tools/layer_loop_bench.py {' '.join(argv or sys.argv[1:])}`", "",
           "| layer loop | ms/step (median) | min-max | effective GB/s |", "|---|---|---|---|"]
  lines += [f"| {r['variant']} | {r['ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} |"
            f" {1000 * r['tb_s']:.1f} |" for r in rows]
  table = "\n".join(lines)
  print(table)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_loop.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    (out / "layer_loop.md").write_text(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
