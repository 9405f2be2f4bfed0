"""Pools of LoRA experts: the weights, their layouts and their parameter types.

Per adapted module m, the pool holds stacked `A[m]: [L, in, E, r]` and `B[m]: [L, E, r, out]`.
A keeps `in` first so that one layer's A reshapes for free to `[in, E*r]` and B to `[E*r, out]`:
the dense formulation runs all experts of a module as two plain matmuls, with no gather and no
scatter. How a forward pass applies them is a decode path's business (`adafuse_jax.paths`).
B starts at zero, so an untrained pool leaves the model unchanged. Adapter weights are their own
NNX Variable types (subclasses of `nnx.LoRAParam`): an optimizer (`nnx.Optimizer(..., wrt=
AdapterParam)`) or a checkpoint selects them alone and the backbone's `nnx.Param`s stay frozen.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from adafuse_jax.config import AdapterConfig, ModelConfig
from adafuse_jax.model.llama import default_layout, per_layer


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
