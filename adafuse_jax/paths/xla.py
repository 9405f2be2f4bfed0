"""Path "xla": the chosen experts applied with plain XLA matmuls beside the backbone's.

Per adapted module: the base matmul, then the delta (alpha/r) Σ_k g_k (x A_k) B_k in one of two
formulations, chosen by size (`Thresholds`): *gather* the chosen experts when a decode step's
tokens touch a small share of the pool, else run *dense* over all E with zero gates (two plain
matmuls of inner size E·r). Prompts that touch much of the pool run as one GEMM with the
expansion beside it (`dense_bias_output`). A shared expert (or a tied pool's dense part) goes
through the same formulation at gate 1. This is also the path training and evaluation use.

Decode copies (`build_rows`, on the GPU). At decode a step's tokens gather two of E experts and
route with a few output columns. With the stored layouts (A [L, in, E, r], router [L, in, E])
the products `x @ A[:, e]` and `x @ R` contract the weight's *major* dimension, and XLA:GPU lowers
them to column reductions that take ~20 us each whatever their size. Stored as A^T [L, E, r, in]
and R^T [L, E, in], the gathered rows are contiguous and the contraction is a row reduction.
Measured on the H200 (7B linear layers, batch 1, E=8, r=16, all 7 modules, pipelined):
layer-wise +192% -> +48% over the backbone, pre-gated +43% -> +25%. The gathered shrink is an
f32 multiply and row sum (`gathered_rows_delta`): the same contraction as an einsum gave the
same module outputs but, inside the whole step, drifted from the gather formulation's; the
explicit sum matched it exactly. The copy costs the A half of the pool (0.3 GB for 8 rank-16
experts on the 7B shape) and is made only where a batch-1 step gathers and only on the GPU:
XLA:CPU reduces either dimension at the same speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.adapters.routing import dense_gates
from adafuse_jax.adapters.sere import SereSettings
from adafuse_jax.config import AdapterConfig
from adafuse_jax.model.layers import matmul
from adafuse_jax.model.llama import LlamaModel, per_layer
from adafuse_jax.paths.base import AdapterRuntime, DecodePath, Thresholds
from adafuse_jax.vocab import Mode, PathName

# Backends whose decode steps read the row layout (tests add "cpu" to check the arithmetic).
ROW_LAYOUT_BACKENDS = ("gpu",)


class XlaRuntime(AdapterRuntime):
  """Experts beside the base matmul in plain XLA; with `rows` (`build_rows`) the gather
  formulation and the layer-wise routers read A^T and R^T."""

  def __init__(self, adapters: MixtureOfLoRA, thresholds: Thresholds,
               sere: SereSettings | None = None, rows: dict | None = None):
    super().__init__(adapters, thresholds, sere)
    self.rows = rows

  def router_logits(self, name: str, layer: int, xf: jax.Array) -> jax.Array:
    if self.rows is not None:
      return jnp.einsum("ni,ei->ne", xf, self.rows[f"R_{name}"][layer],
                        preferred_element_type=jnp.float32)
    return super().router_logits(name, layer, xf)

  def apply(self, name, layer, xf, weights, experts, gates, dense):
    a, b = self.adapters.pool.factors(name, layer)
    a_t = self.rows[f"A_{name}"][layer] if self.rows is not None else None
    if self.cfg.has_shared:
      return self._shared_and_routed(name, layer, xf, weights[layer], a, b, experts, gates,
                                     dense, a_t)
    return self.unmerged(xf, weights[layer], a, b, experts, gates, dense, a_t)

  def unmerged(self, xf: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
               experts: jax.Array, gates: jax.Array, dense: jax.Array | None,
               a_t: jax.Array | None = None) -> jax.Array:
    """xf @ w + (alpha/r) Σ_k g_k (xf A_k) B_k in plain XLA, in xf's dtype: prompts that touch
    much of the pool as one GEMM with the expansion beside it (`dense_bias_output`), else the
    base matmul plus `expert_delta`. xf [N, in]; a [in, E, r]; b [E, r, out] -> [N, out]."""
    n, k = experts.shape
    num_experts = a.shape[1]
    gather = self.thresholds.use_gather(n, k, num_experts)
    if not self.thresholds.is_decode(n) and not gather:
      if dense is None:
        dense = dense_gates(experts, gates, num_experts)
      return dense_bias_output(xf, w, a, b, dense, self.cfg.scale)
    y = matmul(xf, w)
    delta = expert_delta(xf, a, b, experts, gates, dense, a_t=a_t, gather=gather)
    return y + (delta * self.cfg.scale).astype(y.dtype)

  def _shared_and_routed(self, name: str, layer: int, xf: jax.Array, w: jax.Array, a: jax.Array,
                         b: jax.Array, experts, gates, dense, a_t) -> jax.Array:
    """The shared expert (its own SA, SB; with `tied_shared` the whole pool, a LoRA of rank
    E*r) through the plain LoRA's own formulation, `unmerged` with one expert at gate 1, then
    the routed experts (times beta when tied) added in f32. A tied pool with beta = 0 therefore
    computes exactly what the LoRA of rank E*r computes, bit for bit in bf16 too, gradients
    included: with the shared term in another formulation (its expansion in f32), the bf16
    gradients of the same function left the LoRA's by 8%.
    xf [N, in] -> [N, out] in xf's dtype."""
    if self.cfg.tied_shared:
      sa, sb = a.reshape(a.shape[0], 1, -1), b.reshape(1, -1, b.shape[-1])  # [in,1,E*r], [1,E*r,out]
    else:
      sa, sb = self.adapters.pool.factors(name, layer, "S")
      sa, sb = sa[:, None, :], sb[None]
    n = xf.shape[0]
    one = jnp.ones((n, 1), jnp.float32)
    shared = self.unmerged(xf, w, sa, sb, jnp.zeros((n, 1), jnp.int32), one, one)
    gather = self.thresholds.use_gather(n, experts.shape[1], a.shape[1])
    routed = expert_delta(xf, a, b, experts, gates, dense, a_t=a_t,
                          gather=gather).astype(jnp.float32)
    if self.cfg.tied_shared:  # the routed experts again at beta * g
      routed = routed * getattr(self.adapters.pool, f"beta_{name}")[layer]
    return (shared.astype(jnp.float32) + routed * self.cfg.scale).astype(xf.dtype)


class XlaPath(DecodePath):
  name = PathName.XLA
  summary = "plain XLA matmuls beside the backbone's (any backend, any layout; what training runs)"

  def blocker(self, adapter_cfg: AdapterConfig | None, layout: str) -> str | None:
    return None  # runs every configuration: shared experts, context routing, any layout

  def wants_rows(self, adapter_cfg: AdapterConfig | None) -> bool:
    """Whether decode steps of these adapters read the row layout here (`build_rows`)."""
    return (adapter_cfg is not None and adapter_cfg.mode in (Mode.PREGATED, Mode.LAYERWISE)
            and jax.default_backend() in ROW_LAYOUT_BACKENDS
            and self.thresholds.use_gather(1, adapter_cfg.top_k, adapter_cfg.num_experts))

  def prepare(self, model, adapters, *, release=False):
    return build_rows(adapters) if adapters is not None and self.wants_rows(adapters.cfg) else None

  def extra_bytes(self, model: LlamaModel, adapters: MixtureOfLoRA) -> int:
    return rows_nbytes(adapters) if self.wants_rows(adapters.cfg) else 0

  def runtime(self, adapters, derived=None, *, sere=None, backend="auto", mesh=None):
    return XlaRuntime(adapters, self.thresholds, sere, rows=derived)


def build_rows(adapters: MixtureOfLoRA) -> dict:
  """{"A_m": A^T of every adapted module [L, E, r, in], "R_m": the layer-wise router's R^T
  [L, E, in]}, per layer tuples where the pool keeps the "list" layout."""
  pool, out = adapters.pool, {}
  for m in adapters.cfg.modules:
    a = jnp.transpose(pool.stacked(m)[0], (0, 2, 3, 1))
    out[f"A_{m}"] = per_layer(a) if pool.layout == "list" else a
    if adapters.cfg.mode == Mode.LAYERWISE:
      r = jnp.swapaxes(getattr(adapters.router, f"w_{m}").get_value(), 1, 2)
      out[f"R_{m}"] = per_layer(r) if pool.layout == "list" else r
  return out


def rows_nbytes(adapters: MixtureOfLoRA) -> int:
  """Device bytes `build_rows(adapters)` allocates, from its shapes (nothing is allocated)."""
  return sum(x.size * x.dtype.itemsize
             for x in jax.tree.leaves(jax.eval_shape(lambda: build_rows(adapters))))


def expert_delta(x: jax.Array, a: jax.Array, b: jax.Array, experts: jax.Array,
                 gates: jax.Array, dense: jax.Array | None = None,
                 a_t: jax.Array | None = None, *, gather: bool = False) -> jax.Array:
  """Σ_k gates[..., k] · (x @ A[:, experts[..., k]]) @ B[experts[..., k]], unmerged.

  Args:
    x: [N, in] tokens (flattened batch and time).
    a: [in, E, r]; b: [E, r, out].
    experts: [N, k] int32 expert ids; gates: [N, k] weights.
    dense: optional precomputed `dense_gates(experts, gates, E)` [N, E] (routing once per step
      lets every module reuse it).
    a_t: optional A^T [E, r, in] (`build_rows`): the gather formulation reads it instead.
    gather: gather the chosen experts (a few tokens on a large pool, `Thresholds.use_gather`)
      rather than run all E densely with zero gates.
  Returns:
    [N, out] in x's dtype.
  """
  num_experts, r = a.shape[1:]
  if gather and a_t is not None:
    return gathered_rows_delta(x, a_t, b, experts, gates)
  if gather:
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
  shrink is a row reduction (the module docstring says why).

  Args:
    x: [N, in]; a_t: [E, r, in]; b: [E, r, out]; experts, gates: [N, k].
  Returns:
    [N, out] in x's dtype.
  """
  a_sel = a_t[experts]  # [N, k, r, in]
  # An f32 multiply and sum, not an einsum: in the whole decode step the einsum's lowering left
  # the gather formulation's outputs, this one matched them exactly .
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
  form (f32 delta, then scaled and added; 512 tokens, 8 rank-16 experts): +14% vs +15% (gate),
  +16% vs +25% (down), +31% vs +27% (q) over the base GEMM.

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
