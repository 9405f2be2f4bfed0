"""The dynamic adapter as weights: an expert pool + the router(s) its mode needs, and the
one-off folds (a plain LoRA merged into the backbone, a shared expert folded into it).

How a forward pass applies a `MixtureOfLoRA` (routing once or per layer, and which kernels) is
a decode path's business: `adafuse_jax.paths`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from adafuse_jax.adapters.pool import ExpertPool
from adafuse_jax.adapters.routing import LayerwiseRouter, PreGateRouter
from adafuse_jax.config import AdapterConfig, ModelConfig
from adafuse_jax.errors import UserError
from adafuse_jax.model.llama import LlamaModel, per_layer
from adafuse_jax.vocab import Mode


class MixtureOfLoRA(nnx.Module):
  """Expert pool + the router(s) that the adapter mode needs.

  Attributes:
    cfg: the AdapterConfig.
    pool: ExpertPool.
    router: PreGateRouter ("pregated"), LayerwiseRouter ("layerwise"), or None ("lora").
  """

  def __init__(self, model_cfg: ModelConfig, cfg: AdapterConfig, *, seed: int = 0,
               dtype: jnp.dtype = jnp.float32, random_b: bool = False, layout: str | None = None):
    if cfg.mode == Mode.BACKBONE:
      raise ValueError("mode 'backbone' has no adapters; pass adapters=None")
    if cfg.first_layer >= model_cfg.layers:
      raise UserError(f"first_layer={cfg.first_layer} leaves no adapted layer: the model has"
                      f" {model_cfg.layers} layers (0 .. {model_cfg.layers - 1})")
    self.cfg = cfg
    self.model_cfg = model_cfg
    rngs = nnx.Rngs(params=seed)
    self.pool = ExpertPool(model_cfg, cfg, rngs=rngs, dtype=dtype, random_b=random_b, layout=layout)
    if cfg.mode == Mode.PREGATED:
      self.router = PreGateRouter(model_cfg, cfg, rngs=rngs, dtype=dtype)
    elif cfg.mode == Mode.LAYERWISE:
      self.router = LayerwiseRouter(model_cfg, cfg, rngs=rngs, dtype=dtype)
    else:
      self.router = None

  def with_layout(self, layout: str) -> "MixtureOfLoRA":
    """The same adapters with the pool in another layout ("stacked" or "list")."""
    if self.pool.layout == layout:
      return self
    return self._copy_into(self.cfg, layout)

  def _copy_into(self, cfg: AdapterConfig, layout: str) -> "MixtureOfLoRA":
    """These adapters' weights in a new MixtureOfLoRA of config `cfg` (this one's, or it less
    the shared expert) and `layout`; arrays are shared, not copied, where the layout is kept."""
    out = nnx.eval_shape(lambda: MixtureOfLoRA(self.model_cfg, cfg, layout=layout))
    for m in cfg.modules:
      for prefix in ("", "S") if cfg.shared_rank else ("",):
        if layout == self.pool.layout:
          a = getattr(self.pool, f"{prefix}A_{m}").get_value()
          b = getattr(self.pool, f"{prefix}B_{m}").get_value()
        else:
          a, b = self.pool.stacked(m, prefix)
          if layout == "list":
            a, b = per_layer(a), per_layer(b)
        getattr(out.pool, f"{prefix}A_{m}").set_value(a)
        getattr(out.pool, f"{prefix}B_{m}").set_value(b)
      if cfg.tied_shared:
        getattr(out.pool, f"beta_{m}").set_value(getattr(self.pool, f"beta_{m}").get_value())
    if self.router is not None:
      nnx.update(out.router, nnx.state(self.router))
    return out


def merge_lora(weights: dict[str, jax.Array], adapters: MixtureOfLoRA) -> dict[str, jax.Array]:
  """Folds a plain LoRA (mode "lora") into stacked weights: W[l] + (alpha/r) A[l] B[l].

  Args:
    weights: module name -> stacked [L, in, out] weight.
  Returns:
    the same mapping with every adapted module merged (others untouched).
  """
  if adapters.cfg.mode != Mode.LORA:
    raise ValueError("only a plain LoRA can be merged once; expert mixtures switch per token")
  out = dict(weights)
  for m in adapters.cfg.modules:
    a, b = adapters.pool.stacked(m)
    out[m] = _add_low_rank(weights[m], a[:, :, 0], b[:, 0], adapters.cfg)
  return out


def _add_low_rank(w: jax.Array, a: jax.Array, b: jax.Array, cfg: AdapterConfig) -> jax.Array:
  """w [L, in, out] + (alpha / r) a [L, in, r] @ b [L, r, out] in f32, on the layers that carry
  experts (from cfg.first_layer on), cast back to w's dtype."""
  delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
  adapted = (jnp.arange(delta.shape[0]) >= cfg.first_layer).astype(jnp.float32)[:, None, None]
  return (w.astype(jnp.float32) + cfg.scale * adapted * delta).astype(w.dtype)


def tied_as_lora(tied: MixtureOfLoRA) -> MixtureOfLoRA:
  """The plain LoRA of rank E*r whose factors are a tied pool's experts side by side (same
  scale alpha/r): what the tied pool computes with every beta at 0, and so what its training
  starts from. A [L, in, E, r] -> [L, in, 1, E*r]; B [L, E, r, out] -> [L, 1, E*r, out]."""
  cfg = tied.cfg
  if not cfg.tied_shared:
    raise UserError(f"tied_as_lora needs a tied pool (AdapterConfig.tied_shared); this one is"
                    f" mode {cfg.mode!r} without it")
  rank = cfg.num_experts * cfg.rank
  lora = MixtureOfLoRA(tied.model_cfg, cfg.replace(mode="lora", num_experts=1, rank=rank,
                                                   top_k=1, alpha=cfg.scale * rank,
                                                   tied_shared=False), layout="stacked")
  for m in cfg.modules:
    a, b = tied.pool.stacked(m)
    getattr(lora.pool, f"A_{m}").set_value(a.reshape(a.shape[0], a.shape[1], 1, rank))
    getattr(lora.pool, f"B_{m}").set_value(b.reshape(b.shape[0], 1, rank, b.shape[-1]))
  return lora


def fold_shared(model: LlamaModel, adapters: MixtureOfLoRA) -> tuple[LlamaModel, MixtureOfLoRA]:
  """Merges the shared expert into the backbone: W[l] + (alpha/r) SA[l] SB[l] per adapted module.

  Every token uses the shared expert with weight 1, so it is part of the model rather than of
  the per-token choice: folded once, it costs nothing at decode on any path. With
  `tied_shared` the shared expert is the whole pool (W[l] + (alpha/r) A[l] B[l] over all E*r
  ranks) and the routed experts keep B scaled by their layer's beta.
  Returns (a new model with those weights, the same adapters without the shared expert);
  adapters without one are returned unchanged with the model.
  """
  cfg = adapters.cfg
  if not cfg.has_shared:
    return model, adapters
  weights = model.stacked_weights()
  for m in cfg.modules:
    if cfg.tied_shared:
      a, b = adapters.pool.stacked(m)
      shared = a.reshape(*a.shape[:2], -1), b.reshape(b.shape[0], -1, b.shape[-1])
    else:
      shared = adapters.pool.stacked(m, "S")
    weights[m] = _add_low_rank(weights[m], *shared, cfg)
  folded = LlamaModel(model.cfg, weights=weights, dtype=model.dtype, layout=model.layout)
  routed = adapters._copy_into(cfg.replace(shared_rank=0, tied_shared=False), adapters.pool.layout)
  for m in cfg.modules if cfg.tied_shared else ():
    beta = getattr(adapters.pool, f"beta_{m}").get_value()
    var = getattr(routed.pool, f"B_{m}")
    value = var.get_value()
    if isinstance(value, tuple):  # "list" layout
      var.set_value(tuple((bl * beta[l]).astype(bl.dtype) for l, bl in enumerate(value)))
    else:
      var.set_value((value * beta[:, None, None, None]).astype(value.dtype))
  return folded, routed


def merged_model(model: LlamaModel, adapters: MixtureOfLoRA) -> LlamaModel:
  """A new model whose weights hold a plain LoRA folded in (same layout and dtype)."""
  weights = model.stacked_weights()
  weights.update(merge_lora(weights, adapters))
  return LlamaModel(model.cfg, weights=weights, dtype=model.dtype, layout=model.layout)
