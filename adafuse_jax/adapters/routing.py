"""Routers: token-level pre-gating (decide once), layer-wise top-k, top-k gates, aux loss, stats.

Gates are a softmax over the k chosen logits (not over all E): the chosen experts' gates sum to
one whatever k is, so a token's total adapter strength does not depend on how peaked the router
is, and the gates equal those of a softmax over all E renormalised to the top k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from adafuse_jax.config import AdapterConfig, ModelConfig
from adafuse_jax.adapters.pool import RouterParam


def top_k_gates(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k experts and their gates. logits [N, E] -> (experts [N, k] int32, gates [N, k] f32)."""
  top_logits, experts = jax.lax.top_k(logits.astype(jnp.float32), k)
  return experts.astype(jnp.int32), jax.nn.softmax(top_logits, axis=-1)


def dense_gates(experts: jax.Array, gates: jax.Array, num_experts: int) -> jax.Array:
  """Scatters top-k gates to all experts: experts, gates [..., k] -> [..., E] (0 if unchosen)."""
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [..., k, E]
  return jnp.einsum("...ke,...k->...e", one_hot, gates.astype(jnp.float32))


def gates_for(logits: jax.Array, experts: jax.Array) -> jax.Array:
  """Softmax over the logits of already chosen experts. logits [..., E], experts [..., k]."""
  return jax.nn.softmax(jnp.take_along_axis(logits.astype(jnp.float32), experts, axis=-1), axis=-1)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> RouterParam:
  return RouterParam((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


class PreGateRouter(nnx.Module):
  """One router at the first adapted module: experts and gates for every layer at once.

  Attributes:
    w: RouterParam [in, E], the router proper.
    w_layers: RouterParam [in, L * E] when per-layer gates are on: one matmul yields a gate
      logit per layer and expert; the experts themselves still come from `w`.
    w_ctx: RouterParam [in, E], zeros, when cfg.route_context is on: the logits' share of the
      running mean of earlier inputs (`context_mean`).
  """

  def __init__(self, model_cfg: ModelConfig, cfg: AdapterConfig, *, rngs: nnx.Rngs,
               dtype: jnp.dtype = jnp.float32):
    d_in = model_cfg.linear_shapes()[cfg.modules[0]][0]
    self.num_layers = model_cfg.layers
    self.w = _init(rngs, (d_in, cfg.num_experts), cfg.router_init_std, dtype)
    self.w_layers = (_init(rngs, (d_in, model_cfg.layers * cfg.num_experts), cfg.router_init_std,
                           dtype) if cfg.per_layer_gates else None)
    self.w_ctx = (RouterParam(jnp.zeros((d_in, cfg.num_experts), dtype)) if cfg.route_context
                  else None)

  def __call__(self, x: jax.Array, context: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """x [N, in] (and, with route_context, context [N, in]) -> (logits [N, E], per-layer logits
    [N, L, E] or None), in f32."""
    logits = jnp.dot(x, self.w[...], preferred_element_type=jnp.float32)
    if self.w_ctx is not None:
      if context is None:
        raise ValueError("this router reads the context (route_context): pass context=")
      logits = logits + jnp.dot(context, self.w_ctx[...], preferred_element_type=jnp.float32)
    if self.w_layers is None:
      return logits, None
    per_layer = jnp.dot(x, self.w_layers[...], preferred_element_type=jnp.float32)
    return logits, per_layer.reshape(x.shape[0], self.num_layers, -1)


class LayerwiseRouter(nnx.Module):
  """A router at every adapted module of every layer (the MoLA / MixLoRA baseline).

  Attributes (per adapted module m): `w_m`: RouterParam [L, in_m, E].
  """

  def __init__(self, model_cfg: ModelConfig, cfg: AdapterConfig, *, rngs: nnx.Rngs,
               dtype: jnp.dtype = jnp.float32):
    shapes = model_cfg.linear_shapes()
    for m in cfg.modules:
      setattr(self, f"w_{m}", _init(rngs, (model_cfg.layers, shapes[m][0], cfg.num_experts),
                                    cfg.router_init_std, dtype))

  def __call__(self, module: str, layer: int, x: jax.Array) -> jax.Array:
    """x [N, in] -> logits [N, E] (f32)."""
    return jnp.dot(x, getattr(self, f"w_{module}")[layer], preferred_element_type=jnp.float32)


def context_mean(x: jax.Array, decay: float) -> jax.Array:
  """Running mean of each position's earlier inputs: x [B, T, D] -> [B, T, D] (f32), position t
  holding Σ_{s<t} decay^(t-1-s) x_s / Σ_{s<t} decay^(t-1-s), and zeros at t = 0."""
  t = x.shape[1]
  dist = jnp.arange(t)[:, None] - 1 - jnp.arange(t)[None, :]  # t - 1 - s
  w = jnp.where(dist >= 0, decay ** jnp.maximum(dist, 0).astype(jnp.float32), 0.0)  # [T, T]
  w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-30)
  return jnp.einsum("ts,bsd->btd", w, x.astype(jnp.float32))


def load_balancing_loss(logits: jax.Array, experts: jax.Array) -> jax.Array:
  """Switch-Transformer auxiliary loss E · Σ_e f_e · P_e (1.0 when perfectly balanced).

  f_e: the share of the N·k routing choices that went to expert e; P_e: the mean router
  probability of e. logits [N, E], experts [N, k].
  """
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  f = jax.nn.one_hot(experts, num_experts).sum(axis=(0, 1)) / experts.size
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * probs.mean(axis=0))


def router_stats(logits: jax.Array, experts: jax.Array) -> dict[str, jax.Array]:
  """Expert load (share of choices, [E]) and the mean entropy (nats) of the router's softmax."""
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(probs * jnp.log(probs + 1e-20), axis=-1).mean()
  load = jax.nn.one_hot(experts, num_experts).sum(axis=(0, 1)) / experts.size
  return {"load": load, "entropy": entropy}
