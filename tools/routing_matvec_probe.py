"""Why is plain-XLA layer-wise routing slower here than FACTS.md's +102%? Formulations side by side.

    python tools/routing_matvec_probe.py --out DIR            # GPU: 7B shapes, 32 layers
    python tools/routing_matvec_probe.py --preset tiny --steps 2 --warmup 1   # CPU smoke run

A decode step of the linear layers only (FACTS.md's setting: batch 1, 32 layers unrolled, each
layer's q, k, v, o, gate, up, down in a dependent chain), with experts applied in plain jitted
XLA in several formulations. `docs/benchmarks/h100-layerwise/` found that XLA lowers the narrow
matrix-vector products of routing (x [1, in] @ W_router [in, E]) and of the gathered shrink
(x @ A[:, e] [in, k, r]) to reductions over the weight's *major* dimension, ~20 us each. Here
each candidate layout is timed beside the backbone in the same process:

- `backbone`: x @ W[l] only;
- `layerwise` (the library's XLA path: router [in, E], gathered A[:, e], gathered B[e]);
- `layerwise-router-t`: the router stored transposed, [E, in] (a row reduction);
- `layerwise-t`: router and A stored with the contracted dimension minor ([E, in], [E, r, in]);
- `layerwise-tview`: as `layerwise-t`, but A transposed inside the step (no stored copy);
- `layerwise-dense`: every expert's shrink as one GEMV [in, E*r], the expansion as one [E*r, out];
- `layerwise-t-dense`: transposed router, dense experts;
- `pregated` (route once at layer 0, the library's gather), `pregated-t`, `pregated-tview`,
  `pregated-dense`.

Every variant's delta for one module (q and down, layer 0) is checked against the f32 reference
(`module error`), its whole step against the `layerwise` / `pregated` step (`step diff`: the
chain of 224 modules amplifies rounding, and a flipped top-k choice shows as O(1)), then timed: median of synced calls after warm-up and of pipelined calls (back to back), fresh random
inputs cycled. Writes DIR/probe.json and DIR/probe.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.benchmarks import environment, time_calls, time_pipelined
from adafuse_jax.config import PRESETS, ModelConfig
from adafuse_jax.experts import dense_gates, expert_delta, expert_delta_reference
from adafuse_jax.routing import top_k_gates

MODULES = ("q", "k", "v", "o", "gate", "up", "down")
from adafuse_jax.bench import TINY as TINY_SHAPES  # noqa: E402
TINY = ModelConfig(**TINY_SHAPES)


def make_weights(cfg: ModelConfig, num_experts: int, rank: int, dtype, seed: int) -> dict:
  """Stacked backbone and adapter weights, seeded random, every layout a variant reads."""
  shapes = cfg.linear_shapes()
  keys = iter(jax.random.split(jax.random.key(seed), 4 * len(MODULES)))
  L, E, r = cfg.layers, num_experts, rank
  w = {}
  for m in MODULES:
    d_in, d_out = shapes[m]
    w[f"W_{m}"] = (jax.random.normal(next(keys), (L, d_in, d_out)) / d_in ** 0.5).astype(dtype)
    w[f"R_{m}"] = (jax.random.normal(next(keys), (L, d_in, E)) / d_in ** 0.5).astype(dtype)
    w[f"A_{m}"] = (jax.random.normal(next(keys), (L, d_in, E, r)) / d_in ** 0.5).astype(dtype)
    w[f"B_{m}"] = (jax.random.normal(next(keys), (L, E, r, d_out)) * 0.5 / r ** 0.5).astype(dtype)
    w[f"RT_{m}"] = jnp.swapaxes(w[f"R_{m}"], 1, 2)  # [L, E, in]
    w[f"AT_{m}"] = jnp.transpose(w[f"A_{m}"], (0, 2, 3, 1))  # [L, E, r, in]
  w["R_pre"] = w["R_q"][0]  # the pre-gated router, at layer 0's input
  return w


def _router(w, m, l, x, transposed):
  if transposed:
    return jnp.einsum("ni,ei->ne", x, w[f"RT_{m}"][l], preferred_element_type=jnp.float32)
  return jnp.dot(x, w[f"R_{m}"][l], preferred_element_type=jnp.float32)


def _delta(w, m, l, x, experts, gates, shrink):
  num_experts = w[f"A_{m}"].shape[2]
  if shrink == "gather":
    return expert_delta(x, w[f"A_{m}"][l], w[f"B_{m}"][l], experts, gates).astype(jnp.float32)
  if shrink in ("t", "tview", "tsum"):
    # "tview": the stored [in, E, r] transposed inside the step (a copy per step, no second
    # copy of the pool kept); "t": a transposed copy made once, outside the step; "tsum": that
    # copy, the contraction written as an f32 multiply and row sum.
    at = (jnp.transpose(w[f"A_{m}"][l], (1, 2, 0)) if shrink == "tview" else w[f"AT_{m}"][l])
    a_sel = at[experts]  # [N, k, r, in]
    if shrink == "tsum":
      h = jnp.sum(x.astype(jnp.float32)[:, None, None, :] * a_sel.astype(jnp.float32), -1)
    else:
      h = jnp.einsum("ni,nkri->nkr", x, a_sel, preferred_element_type=jnp.float32)
    h = (h * gates[..., None]).astype(x.dtype)
    b_sel = w[f"B_{m}"][l][experts]
    return jnp.einsum("nkr,nkro->no", h, b_sel, preferred_element_type=jnp.float32)
  dense = dense_gates(experts, gates, num_experts)
  a = w[f"A_{m}"][l]
  h = jnp.dot(x, a.reshape(a.shape[0], -1), preferred_element_type=jnp.float32)
  h = (h.reshape(x.shape[0], num_experts, -1) * dense[..., None]).reshape(x.shape[0], -1)
  b = w[f"B_{m}"][l]
  return jnp.dot(h.astype(x.dtype), b.reshape(-1, b.shape[-1]), preferred_element_type=jnp.float32)


# A variant's suffix -> how its delta gathers and shrinks (`_delta`).
SHRINK_OF_FORM = {"": "gather", "router-t": "gather", "t": "t", "tview": "tview", "tsum": "tsum",
                  "dense": "dense", "t-dense": "dense"}


def step_fn(variant: str, top_k: int):
  """x [N, dim] -> [N, dim]: the 32 layers' linear chain with experts as `variant` applies them."""
  mode, _, form = variant.partition("-")
  router_t = form.startswith("t") or form == "router-t"  # tview, tsum: RT copied, too
  shrink = SHRINK_OF_FORM[form]

  def step(w, x):
    layers = w["W_q"].shape[0]
    route = None
    if mode == "pregated":
      route = top_k_gates(jnp.dot(x, w["R_pre"], preferred_element_type=jnp.float32), top_k)

    def lin(m, l, xin):
      # The GEMV in the weights' dtype: asking for an f32 product converts the whole weight.
      y = xin @ w[f"W_{m}"][l]
      if mode == "backbone":
        return y
      experts, gates = route if route else top_k_gates(_router(w, m, l, xin, router_t), top_k)
      delta = 0.5 * _delta(w, m, l, xin, experts, gates, shrink)
      return (y.astype(jnp.float32) + delta).astype(xin.dtype)

    h = x
    for l in range(layers):
      # RMS-normalised inputs, as a decoder's: random weights would blow the chain up.
      h = (h * jax.lax.rsqrt(jnp.mean(jnp.square(h.astype(jnp.float32)), -1, keepdims=True)
                             + 1e-6)).astype(x.dtype)
      q, k, v = lin("q", l, h), lin("k", l, h), lin("v", l, h)
      # attention's place: every projection feeds the next
      kv = (k.astype(jnp.float32).mean() + v.astype(jnp.float32).mean()) * 1e-3
      o = lin("o", l, (q * (1 + kv)).astype(q.dtype))
      g, u = lin("gate", l, o), lin("up", l, o)
      h = h + lin("down", l, (jax.nn.silu(g) * u).astype(x.dtype))
    return h

  return jax.jit(step)


def module_error(w, variant: str, top_k: int, seed: int = 7) -> float:
  """Largest error of one module's delta (q and down, layer 0, 4 tokens) against the f32
  reference `expert_delta_reference`, relative to the reference's largest |value|."""
  mode, _, form = variant.partition("-")
  if mode == "backbone":
    return 0.0
  shrink = SHRINK_OF_FORM[form]
  worst = 0.0
  for m in ("q", "down"):
    d_in, num_experts = w[f"A_{m}"].shape[1:3]
    kx, ke = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (4, d_in)).astype(w[f"A_{m}"].dtype)
    experts = jnp.argsort(jax.random.uniform(ke, (4, num_experts)), -1)[:, :top_k].astype(
        jnp.int32)
    gates = jax.nn.softmax(jnp.arange(top_k, dtype=jnp.float32))[None].repeat(4, 0)
    got = jax.jit(lambda x, e, g: _delta(w, m, 0, x, e, g, shrink))(x, experts, gates)
    ref = expert_delta_reference(x, w[f"A_{m}"][0], w[f"B_{m}"][0], experts, gates)
    worst = max(worst, float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))))
  return worst


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS) + ["tiny"])
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--variants", default="backbone,layerwise,layerwise-router-t,layerwise-t,"
                 "layerwise-tview,layerwise-dense,layerwise-t-dense,pregated,pregated-t,"
                 "pregated-tview,pregated-dense")
  p.add_argument("--out")
  args = p.parse_args(argv)
  cfg = TINY if args.preset == "tiny" else PRESETS[args.preset]
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  w = make_weights(cfg, args.experts, args.rank, dtype, seed=0)
  xs = [jax.random.normal(jax.random.key(i + 1), (args.batch, cfg.hidden)).astype(dtype)
        for i in range(4)]
  rows, refs = [], {}
  for variant in args.variants.split(","):
    fn = step_fn(variant, args.top_k)
    out = np.asarray(fn(w, xs[0]), np.float32)
    mode = variant.split("-")[0]
    refs.setdefault(mode, out)
    err = float(np.max(np.abs(out - refs[mode])) / (np.max(np.abs(refs[mode])) + 1e-30))
    it = iter(range(1 << 30))
    call = lambda: fn(w, xs[next(it) % len(xs)])
    synced = time_calls(call, warmup=args.warmup, steps=args.steps)
    piped = time_pipelined(call, warmup=1, steps=args.steps)
    merr = module_error(w, variant, args.top_k)
    rows.append({"variant": variant, "synced_ms": synced.median_ms,
                 "pipelined_ms": piped.median_ms, "max_rel_diff": err, "module_error": merr})
    print(f"{variant:22s} synced {synced.median_ms:8.3f} ms  pipelined"
          f" {piped.median_ms:8.3f} ms  diff {err:.1e}  module error {merr:.1e}", flush=True)
  base = next((r for r in rows if r["variant"] == "backbone"), rows[0])
  lines = [f"Linear layers only, {args.preset}, batch {args.batch}, E={args.experts},"
           f" r={args.rank}, top-{args.top_k}, {jnp.dtype(dtype).name};"
           f" {environment()['device']}.", "",
           "| variant | synced ms | vs backbone | pipelined ms | vs backbone | step diff | module error |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['synced_ms']:.3f} | {r['synced_ms'] / base['synced_ms']:.3f}x"
                 f" | {r['pipelined_ms']:.3f} | {r['pipelined_ms'] / base['pipelined_ms']:.3f}x"
                 f" | {r['max_rel_diff']:.1e} | {r['module_error']:.1e} |")
  report = {"environment": environment(), "args": vars(args), "rows": rows}
  print("\n".join(lines))
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    (out / "probe.md").write_text("\n".join(lines) + "\n")
  return report


if __name__ == "__main__":
  main()
