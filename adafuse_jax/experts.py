"""Pools of LoRA experts and the math that applies the chosen ones.

Per adapted module m, the pool holds stacked `A[m]: [L, in, E, r]` and `B[m]: [L, E, r, out]`.
A keeps `in` first so that one layer's A reshapes for free to `[in, E*r]` and B to `[E*r, out]`:
the dense path runs all experts of a module as two plain matmuls, with no gather and no scatter
(both cost more than the matmuls themselves at batch-1 decode on the H100: measured +121% over
the backbone for the gather formulation, docs/benchmarks/h100-initial).
B starts at zero, so an untrained pool leaves the model unchanged. Adapter weights are their own
NNX Variable types (subclasses of `nnx.LoRAParam`): an optimizer (`nnx.Optimizer(..., wrt=
AdapterParam)`) or a checkpoint selects them alone and the backbone's `nnx.Param`s stay frozen.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from adafuse_jax.config import AdapterConfig, ModelConfig


class AdapterParam(nnx.LoRAParam):
  """Any trainable adapter weight (experts and routers)."""


class ExpertParam(AdapterParam):
  """LoRA expert factors A and B."""


class RouterParam(AdapterParam):
  """Router weights."""


class ExpertPool(nnx.Module):
  """Stacked LoRA experts for every adapted module of every layer.

  Attributes (per adapted module m, e.g. `A_q`, `B_q`):
    A_m: ExpertParam [L, in, E, r], Kaiming-style random.
    B_m: ExpertParam [L, E, r, out], zeros (or random with `random_b`, for tests/benchmarks).
    SA_m, SB_m: ExpertParam [L, in, rs] and [L, rs, out], the shared expert of rank
      rs = cfg.shared_rank (absent when it is 0); initialised like A and B.
    beta_m: ExpertParam [L] (f32, zeros), with cfg.tied_shared only: the routed gates' scale
      on top of the dense pool, per layer (stacked in either layout: L scalars).
  """

  def __init__(self, model_cfg: ModelConfig, cfg: AdapterConfig, *, rngs: nnx.Rngs,
               dtype: jnp.dtype = jnp.float32, random_b: bool = False, layout: str | None = None):
    from adafuse_jax.model.llama import default_layout, per_layer

    self.modules = cfg.modules
    # Same per-backend layout as the model's weights: on XLA:CPU a slice of a stacked array is
    # copied before use (measured: pregated decode of SmolLM2 at 155 ms/token with stacked
    # pools against 34 ms for the backbone).
    self.layout = layout or default_layout()
    shapes = model_cfg.linear_shapes()
    e, r, L = cfg.num_experts, cfg.rank, model_cfg.layers
    for m in cfg.modules:
      d_in, d_out = shapes[m]
      # One jitted program per shape (eager ops would compile one program each).
      a = _scaled_normal(rngs.params(), (L, d_in, e, r), jnp.dtype(dtype), 1.0 / d_in ** 0.5)
      if random_b:  # halved: deltas of the backbone's order of magnitude would drown it
        b = _scaled_normal(rngs.params(), (L, e, r, d_out), jnp.dtype(dtype), 0.5 / r ** 0.5)
      else:
        b = jnp.zeros((L, e, r, d_out), dtype)
      if self.layout == "list":
        a, b = per_layer(a), per_layer(b)
      setattr(self, f"A_{m}", ExpertParam(a))
      setattr(self, f"B_{m}", ExpertParam(b))
    for m in cfg.modules if cfg.shared_rank else ():
      d_in, d_out = shapes[m]
      rs = cfg.shared_rank
      sa = _scaled_normal(rngs.params(), (L, d_in, rs), jnp.dtype(dtype), 1.0 / d_in ** 0.5)
      sb = (_scaled_normal(rngs.params(), (L, rs, d_out), jnp.dtype(dtype), 0.5 / rs ** 0.5)
            if random_b else jnp.zeros((L, rs, d_out), dtype))
      if self.layout == "list":
        sa, sb = per_layer(sa), per_layer(sb)
      setattr(self, f"SA_{m}", ExpertParam(sa))
      setattr(self, f"SB_{m}", ExpertParam(sb))

    for m in cfg.modules if cfg.tied_shared else ():
      setattr(self, f"beta_{m}", ExpertParam(jnp.zeros((L,), jnp.float32)))

  def factors(self, module: str, layer: int, prefix: str = "") -> tuple[jax.Array, jax.Array]:
    """(A [in, E, r], B [E, r, out]) of one module at one layer; with prefix "S" the shared
    expert's (SA [in, rs], SB [rs, out])."""
    a = getattr(self, f"{prefix}A_{module}").get_value()
    b = getattr(self, f"{prefix}B_{module}").get_value()
    return a[layer], b[layer]

  def stacked(self, module: str, prefix: str = "") -> tuple[jax.Array, jax.Array]:
    """(A [L, in, E, r], B [L, E, r, out]) of one module, whatever the layout; with prefix "S"
    the shared expert's (SA [L, in, rs], SB [L, rs, out])."""
    a = getattr(self, f"{prefix}A_{module}").get_value()
    b = getattr(self, f"{prefix}B_{module}").get_value()
    if isinstance(a, tuple):
      a, b = jnp.stack(a), jnp.stack(b)
    return a, b


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _scaled_normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, scale: float
                   ) -> jax.Array:
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def dense_gates(experts: jax.Array, gates: jax.Array, num_experts: int) -> jax.Array:
  """Scatters top-k gates to all experts: experts, gates [..., k] -> [..., E] (0 if unchosen)."""
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [..., k, E]
  return jnp.einsum("...ke,...k->...e", one_hot, gates.astype(jnp.float32))


# How `expert_delta` applies experts: "auto" (gather for a few tokens on a large pool, dense
# otherwise), "gather", "dense", or "slices" (one dynamic slice per chosen expert, batch-1
# decode only). A benchmarking knob: ADAFUSE_EXPERT_PATH overrides it per process, so one run
# can compare formulations (tools/xla_flags_probe.sh).
EXPERT_PATH = os.environ.get("ADAFUSE_EXPERT_PATH", "auto")


def use_gather(num_tokens: int, top_k: int, num_experts: int) -> bool:
  """XLA formulation: gather the chosen experts when the step's tokens touch at most a quarter
  of the pool, else run all E densely. Measured on the H100 at batch 1 (7B, E=8, k=2, all
  modules; docs/benchmarks/h100-expert-paths): gather 14.2 ms/token, dense 17.2, one dynamic
  slice per expert 37.0."""
  return num_tokens * top_k * 4 <= num_experts


# Prompts: the dense formulation (`dense_bias_output`) runs every expert's shrink and expansion
# as two GEMMs of inner size E·r beside the base GEMM of inner size `in`; the segmented kernels
# (pallas_kernels/segmented.py) read only the chosen experts but write and re-read one row of
# output per (token, choice). Dense while E·r is a small share of the base GEMM's work
# (measured side by side by tools/segmented_bench.py).
SEGMENTED_MIN_SHARE = 0.25


def use_segmented(d_in: int, num_experts: int, rank: int) -> bool:
  """Whether a prompt's experts go to the segmented kernels rather than the dense GEMMs."""
  return num_experts * rank > SEGMENTED_MIN_SHARE * d_in


def use_fused_kernel(num_tokens: int, top_k: int, num_experts: int) -> bool:
  """The fused kernel reads every expert's B tile (dense over E): worth it unless the step
  touches a small share of a large pool (E=64 at batch 1, say)."""
  return num_tokens * top_k * 16 > num_experts


def expert_delta(x: jax.Array, a: jax.Array, b: jax.Array, experts: jax.Array,
                 gates: jax.Array, dense: jax.Array | None = None,
                 a_t: jax.Array | None = None) -> jax.Array:
  """Σ_k gates[..., k] · (x @ A[:, experts[..., k]]) @ B[experts[..., k]], unmerged.

  Args:
    x: [N, in] tokens (flattened batch and time).
    a: [in, E, r]; b: [E, r, out].
    experts: [N, k] int32 expert ids; gates: [N, k] weights.
    dense: optional precomputed `dense_gates(experts, gates, E)` [N, E] (routing once per step
      lets every module reuse it).
    a_t: optional A^T [E, r, in] (`adafuse_jax.row_layout`): the gather path reads it instead.
  Returns:
    [N, out] in x's dtype.
  """
  n, k = experts.shape
  d_in, num_experts, r = a.shape
  path = EXPERT_PATH
  if path == "auto":
    path = "gather" if use_gather(n, k, num_experts) else "dense"
  if path == "gather" and a_t is not None:
    return gathered_rows_delta(x, a_t, b, experts, gates)
  if path == "slices" and n == 1:
    out = jnp.zeros((1, b.shape[-1]), jnp.float32)
    for j in range(k):
      a_j = jax.lax.dynamic_index_in_dim(a, experts[0, j], axis=1, keepdims=False)  # [in, r]
      b_j = jax.lax.dynamic_index_in_dim(b, experts[0, j], axis=0, keepdims=False)  # [r, out]
      h = jnp.dot(x, a_j, preferred_element_type=jnp.float32) * gates[0, j]
      out = out + jnp.dot(h.astype(x.dtype), b_j, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
  if path == "gather":
    a_sel = a[:, experts]  # [in, N, k, r]
    h = jnp.einsum("ni,inkr->nkr", x, a_sel, preferred_element_type=jnp.float32)
    return _gated_expand(h, gates, b, experts, x.dtype)
  if dense is None:
    dense = dense_gates(experts, gates, num_experts)
  h = gated_dense_shrink(x, a, dense)
  out = jnp.dot(h.astype(x.dtype), b.reshape(num_experts * r, -1),
                preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


def gathered_rows_delta(x: jax.Array, a_t: jax.Array, b: jax.Array, experts: jax.Array,
                        gates: jax.Array) -> jax.Array:
  """`expert_delta`'s gather path from A^T: the chosen experts' rows are contiguous and the
  shrink is a row reduction (`adafuse_jax.row_layout` says why and what it measured).

  Args:
    x: [N, in]; a_t: [E, r, in]; b: [E, r, out]; experts, gates: [N, k].
  Returns:
    [N, out] in x's dtype.
  """
  a_sel = a_t[experts]  # [N, k, r, in]
  # An f32 multiply and sum, not an einsum: in the whole decode step the einsum's lowering left
  # the gather formulation's outputs, this one matched them exactly (tools/routing_matvec_probe.py).
  h = jnp.sum(x.astype(jnp.float32)[:, None, None, :] * a_sel.astype(jnp.float32), axis=-1)
  return _gated_expand(h, gates, b, experts, x.dtype)


def _gated_expand(h: jax.Array, gates: jax.Array, b: jax.Array, experts: jax.Array,
                  dtype) -> jax.Array:
  """Σ_k gates[:, k] · h[:, k] @ B[experts[:, k]]: the gather paths' expansion.
  h [N, k, r] f32; gates, experts [N, k]; b [E, r, out] -> [N, out] in `dtype`."""
  h = h * gates[..., None].astype(jnp.float32)
  out = jnp.einsum("nkr,nkro->no", h.astype(dtype), b[experts], preferred_element_type=jnp.float32)
  return out.astype(dtype)


def gated_dense_shrink(x: jax.Array, a: jax.Array, dense: jax.Array) -> jax.Array:
  """Every expert's shrink times its gate: (x @ A[:, e]) · dense[:, e], side by side.

  Args:
    x: [N, K]; a: [K, E, r]; dense: [N, E] gates (0 for unchosen experts).
  Returns:
    [N, E·r] f32, expert e's r columns at e·r.
  """
  n = x.shape[0]
  d_in, num_experts, r = a.shape
  h = jnp.dot(x, a.reshape(d_in, num_experts * r), preferred_element_type=jnp.float32)
  return (h.reshape(n, num_experts, r) * dense.astype(jnp.float32)[..., None]).reshape(
      n, num_experts * r)


def dense_bias_output(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, dense: jax.Array,
                      scale: float) -> jax.Array:
  """x @ w + scale Σ_e dense[:, e] (x @ A[:, e]) @ B[e], for prompts.

  The gated shrink is scaled and cast to x's dtype first, so the expansion is a plain GEMM of
  the weights' dtype whose sum with the base output XLA may fold into the GEMM (the base output
  as its bias): no f32 delta is written and read back. Measured on the H200 beside the earlier
  form (f32 delta, then scaled and added; docs/benchmarks/h200-segmented, 512 tokens, 8 rank-16
  experts): +14% vs +15% (gate), +16% vs +25% (down), +31% vs +27% (q) over the base GEMM.

  Args:
    x: [N, K] tokens; w: [K, N_out]; a: [K, E, r]; b: [E, r, N_out]; dense: [N, E] gates
      (`dense_gates`, 0 for unchosen experts).
  Returns:
    [N, N_out] in x's dtype.
  """
  num_experts, r = a.shape[1:]
  h = gated_dense_shrink(x, a, dense.astype(jnp.float32) * scale).astype(x.dtype)
  return x @ w + jnp.dot(h, b.reshape(num_experts * r, -1).astype(x.dtype))


def expert_delta_reference(x, a, b, experts, gates):
  """Plain f32 loop over the k choices: the truth for tests. Shapes as `expert_delta`."""
  x, a, b = (t.astype(jnp.float32) for t in (x, a, b))
  out = jnp.zeros((x.shape[0], b.shape[-1]), jnp.float32)
  for j in range(experts.shape[1]):
    e = experts[:, j]
    out = out + gates[:, j, None] * jnp.einsum("ni,inr,nro->no", x, a[:, e], b[e])
  return out
