"""Pools of LoRA experts and the math that applies the chosen ones.

Per adapted module m, the pool holds stacked `A[m]: [L, E, in, r]` and `B[m]: [L, E, r, out]`.
B starts at zero, so an untrained pool leaves the model unchanged. Adapter weights are their own
NNX Variable types (subclasses of `nnx.LoRAParam`): an optimizer (`nnx.Optimizer(..., wrt=
AdapterParam)`) or a checkpoint selects them alone and the backbone's `nnx.Param`s stay frozen.
"""

from __future__ import annotations

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
    A_m: ExpertParam [L, E, in, r], Kaiming-style random.
    B_m: ExpertParam [L, E, r, out], zeros (or random with `random_b`, for tests/benchmarks).
  """

  def __init__(self, model_cfg: ModelConfig, cfg: AdapterConfig, *, rngs: nnx.Rngs,
               dtype: jnp.dtype = jnp.float32, random_b: bool = False):
    self.modules = cfg.modules
    shapes = model_cfg.linear_shapes()
    e, r, L = cfg.num_experts, cfg.rank, model_cfg.layers
    for m in cfg.modules:
      d_in, d_out = shapes[m]
      a = jax.random.normal(rngs.params(), (L, e, d_in, r), jnp.float32) / jnp.sqrt(d_in)
      if random_b:
        b = jax.random.normal(rngs.params(), (L, e, r, d_out), jnp.float32) / jnp.sqrt(r)
        b = b * 0.5  # deltas of the backbone's order of magnitude would drown it
      else:
        b = jnp.zeros((L, e, r, d_out), jnp.float32)
      setattr(self, f"A_{m}", ExpertParam(a.astype(dtype)))
      setattr(self, f"B_{m}", ExpertParam(b.astype(dtype)))

  def factors(self, module: str, layer: int) -> tuple[jax.Array, jax.Array]:
    """(A [E, in, r], B [E, r, out]) of one module at one layer."""
    return getattr(self, f"A_{module}")[layer], getattr(self, f"B_{module}")[layer]


def expert_delta(x: jax.Array, a: jax.Array, b: jax.Array, experts: jax.Array,
                 gates: jax.Array) -> jax.Array:
  """Σ_k gates[..., k] · (x @ A[experts[..., k]]) @ B[experts[..., k]], unmerged.

  Args:
    x: [N, in] tokens (flattened batch and time).
    a: [E, in, r]; b: [E, r, out].
    experts: [N, k] int32 expert ids; gates: [N, k] weights.
  Returns:
    [N, out] in x's dtype.

  Few tokens (decode) gather the k chosen experts per token, reading only those. Many tokens
  (prefill) run all E experts densely with the gates scattered to an [N, E] matrix (zero for
  unchosen experts): the same numbers, with no [N, k, in, r] gather that would dwarf the matmul.
  """
  n, k = experts.shape
  num_experts = a.shape[0]
  if n * k < num_experts:
    a_sel, b_sel = a[experts], b[experts]  # [N, k, in, r], [N, k, r, out]
    h = jnp.einsum("ni,nkir->nkr", x, a_sel, preferred_element_type=jnp.float32)
    h = h * gates[..., None].astype(jnp.float32)
    out = jnp.einsum("nkr,nkro->no", h.astype(x.dtype), b_sel, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
  dense_gates = jnp.zeros((n, num_experts), jnp.float32)
  dense_gates = dense_gates.at[jnp.arange(n)[:, None], experts].add(gates.astype(jnp.float32))
  h = jnp.einsum("ni,eir->ner", x, a, preferred_element_type=jnp.float32)
  h = h * dense_gates[..., None]
  out = jnp.einsum("ner,ero->no", h.astype(x.dtype), b, preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


def expert_delta_reference(x, a, b, experts, gates):
  """Plain f32 loop over tokens and choices: the truth for tests."""
  x, a, b = (t.astype(jnp.float32) for t in (x, a, b))
  out = jnp.zeros((x.shape[0], b.shape[-1]), jnp.float32)
  for j in range(experts.shape[1]):
    e = experts[:, j]
    out = out + gates[:, j, None] * jnp.einsum("ni,nir,nro->no", x, a[e], b[e])
  return out
