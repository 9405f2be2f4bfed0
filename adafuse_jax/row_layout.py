"""Decode copies of the experts' A and the layer-wise routers with the contracted dimension
minor, for the plain-XLA ("xla") decode path on the GPU.

Why: at decode a step's tokens gather two of E experts and route with a few output columns. With
the stored layouts (A [L, in, E, r], router [L, in, E]) the products `x @ A[:, e]` and
`x @ R` contract the weight's *major* dimension, and XLA:GPU lowers them to column reductions
that take ~20 us each whatever their size (docs/benchmarks/h100-layerwise: 12.5 of the
layer-wise step's 19 ms). Stored as A^T [L, E, r, in] and R^T [L, E, in], the gathered rows are
contiguous and the contraction is a row reduction. Measured by `tools/routing_matvec_probe.py`
on the H200 (7B linear layers, batch 1, E=8, r=16, all 7 modules, pipelined;
docs/benchmarks/h200-xla-rows): layer-wise +192% -> +48% over the backbone, pre-gated +43% ->
+25%. The gathered shrink is written as an f32 multiply and row sum (`experts.gathered_rows_delta`):
the same contraction as an einsum gave the same module outputs but, inside the whole step, an
output that left the gather formulation's (step diff 0.9-1.3), the explicit sum matched it exactly.

The copy costs the A half of the pool (0.3 GB for 8 rank-16 experts on the 7B shape; 9 GB for 64
rank-64 experts) and is made only where a decode step can gather (`experts.use_gather` at
batch 1) and only on the GPU: XLA:CPU reduces either dimension at the same speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adafuse_jax.experts import use_gather

# Backends whose decode steps read the row layout (tests add "cpu" to check the arithmetic).
BACKENDS = ("gpu",)


def wanted(adapters, implementation: str) -> bool:
  """Whether a Generator with these adapters and implementation should build the row layout."""
  cfg = adapters.cfg if adapters is not None else None
  return (cfg is not None and implementation == "xla" and cfg.mode in ("pregated", "layerwise")
          and jax.default_backend() in BACKENDS and use_gather(1, cfg.top_k, cfg.num_experts))


def build(adapters) -> dict:
  """{"A_m": A^T of every adapted module [L, E, r, in], "R_m": the layer-wise router's R^T
  [L, E, in]}, per layer tuples where the pool keeps the "list" layout."""
  from adafuse_jax.model.llama import per_layer

  pool, out = adapters.pool, {}
  for m in adapters.cfg.modules:
    a = jnp.transpose(pool.stacked(m)[0], (0, 2, 3, 1))
    out[f"A_{m}"] = per_layer(a) if pool.layout == "list" else a
    if adapters.cfg.mode == "layerwise":
      r = jnp.swapaxes(getattr(adapters.router, f"w_{m}").get_value(), 1, 2)
      out[f"R_{m}"] = per_layer(r) if pool.layout == "list" else r
  return out


def nbytes(adapters) -> int:
  """Device bytes `build(adapters)` allocates, from its shapes (nothing is allocated)."""
  return sum(x.size * x.dtype.itemsize
             for x in jax.tree.leaves(jax.eval_shape(lambda: build(adapters))))


def router_logits(rows: dict, module: str, layer: int, x: jax.Array) -> jax.Array:
  """x [N, in] -> layer-wise router logits [N, E] (f32) from R^T."""
  return jnp.einsum("ni,ei->ne", x, rows[f"R_{module}"][layer],
                    preferred_element_type=jnp.float32)
