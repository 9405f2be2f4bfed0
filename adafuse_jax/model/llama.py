"""The Llama-family decoder as a Flax NNX module with stacked per-layer weights.

The forward pass walks the layers in a Python-unrolled loop reading `W[l]` (`lax.scan` over
layers costs 2.6x at batch-1 decode on the GPU: docs/architecture.md, "Measured design facts"). Each linear weight is held in one of two
layouts, chosen per backend because each is the fast one on its own device:

- "stacked": one `[L, in, out]` array per module. Fastest on the GPU (7B linear layers: 5.6-5.8
  ms vs 6.3 ms for per-layer arrays; docs/architecture.md), and what the fused-switch kernel updates.
- "list": a tuple of L `[in, out]` arrays. On the XLA CPU backend a slice of a stacked weight is
  copied before the dot (measured: 51 ms vs 4.6 ms for 30 SmolLM2-sized matmuls).

`W[l]` reads the same in both, so the forward pass does not care.

Adapters enter through one seam: every linear module is applied by a `LinearFn`
`(name, layer, x, weights) -> y`, where `weights` is the module's whole weight (stacked or a
tuple) so that a kernel can read layer `layer` in place. The backbone's is `x @ weights[layer]`;
an adapter runtime adds expert deltas (unmerged), calls the fused kernel, or leaves it alone
when the experts were merged into the weights. A `LinearFn` may also offer the MLP's tail whole:
a method `mlp_down(layer, x) -> y or None` (x the normed input of gate/up [..., D], y down's
output [..., D]) lets a path run gate/up, SwiGLU and down as fewer kernels; and
`qkv_parts(layer, x) -> (q, k, v, delta) or None`, asked only where the cache view runs an
appending attention kernel, hands q, k and v ([B, T, H, hd]) before their expert delta with the
delta (`layers.QkvDelta`) for that kernel to add. None declines.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adafuse_jax.config import LINEAR_NAMES, ModelConfig
from adafuse_jax.model.cache import KVCache, SlotCache
from adafuse_jax.model.layers import (AttentionFn, attention, matmul, rms_norm, rope_inv_freq,
                                     rope_tables, swiglu)

LinearFn = Callable[[str, int, jax.Array, jax.Array], jax.Array]
LAYOUTS = ("stacked", "list")


def default_layout() -> str:
  return "list" if jax.default_backend() == "cpu" else "stacked"


def per_layer(arr) -> tuple[jax.Array, ...]:
  """[L, ...] -> L arrays [...] (the "list" layout), through the host: eager slicing `arr[l]`
  compiles one XLA program per index (3.3 s of a CLI run on 2 CPU cores, under cProfile)."""
  if isinstance(arr, jax.core.Tracer):  # abstract (eval_shape) or traced: nothing to copy
    return tuple(arr[l] for l in range(arr.shape[0]))
  # Waited for first: an allocation that failed then raises XLA's out-of-memory error here,
  # where read through the buffer protocol it aborted the process (XLA:CPU, jax 0.10.2).
  host = np.asarray(jax.block_until_ready(arr))
  return tuple(jnp.asarray(host[l]) for l in range(host.shape[0]))


def plain_linear(name: str, layer: int, x: jax.Array, weights) -> jax.Array:
  """The backbone's linear: x [..., in] @ weights[layer] [in, out]."""
  del name
  return matmul(x, weights[layer])


class LlamaModel(nnx.Module):
  """Llama / Mistral / SmolLM2 decoder.

  Parameters (all `nnx.Param`):
    embed: [V, D]; q, k, v, o, gate, up, down: [L, in, out] (or L x [in, out], see the module
    docstring); attn_norm, ffn_norm: [L, D];
    final_norm: [D]; lm_head: [D, V] unless the config ties it to `embed`.
  """

  def __init__(self, cfg: ModelConfig, *, weights: Mapping[str, np.ndarray | jax.Array] | None = None,
               dtype: jnp.dtype = jnp.float32, seed: int = 0, layout: str | None = None):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.layout = layout or default_layout()
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout={self.layout!r} must be one of {LAYOUTS}")
    shapes = self.param_shapes(cfg)
    if weights is None:
      weights = _random_weights(cfg, shapes, self.dtype, seed)
    missing = sorted(set(shapes) - set(weights))
    if missing:
      raise ValueError(f"weights are missing {missing}")
    for name, shape in shapes.items():
      arr = jnp.asarray(weights[name], self.dtype)
      if arr.shape != shape:
        raise ValueError(f"weight {name!r} has shape {arr.shape}, the config needs {shape}")
      if self.layout == "list" and name in LINEAR_NAMES:
        arr = per_layer(arr)
      setattr(self, name, nnx.Param(arr))
    self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(cfg)))

  @staticmethod
  def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, cfg.hidden)}
    for name, (i, o) in cfg.linear_shapes().items():
      shapes[name] = (cfg.layers, i, o)
    shapes["attn_norm"] = (cfg.layers, cfg.hidden)
    shapes["ffn_norm"] = (cfg.layers, cfg.hidden)
    shapes["final_norm"] = (cfg.hidden,)
    if not cfg.tie_embeddings:
      shapes["lm_head"] = (cfg.hidden, cfg.vocab_size)
    return shapes

  def linear_weight(self, name: str) -> jax.Array:
    """The stacked [L, in, out] weight of one linear module, whatever the layout."""
    value = getattr(self, name).get_value()
    return jnp.stack(value) if isinstance(value, tuple) else value

  def stacked_weights(self) -> dict[str, jax.Array]:
    """Every parameter by name, linear weights stacked [L, in, out] whatever the layout."""
    return {n: (self.linear_weight(n) if n in LINEAR_NAMES else getattr(self, n).get_value())
            for n in self.param_shapes(self.cfg)}

  def with_layout(self, layout: str) -> "LlamaModel":
    """The same model with its linear weights held in another layout."""
    if layout == self.layout:
      return self
    return LlamaModel(self.cfg, weights=self.stacked_weights(), dtype=self.dtype, layout=layout)

  def _mlp_tail(self, linear: LinearFn, layer: int, x: jax.Array) -> jax.Array:
    """down(silu(gate(x)) · up(x)) [..., D] for the normed x [..., D]: the path's own
    `mlp_down` when it offers one for this call, else module by module."""
    fused = getattr(linear, "mlp_down", None)
    y = fused(layer, x) if fused is not None else None
    if y is not None:
      return y
    act = swiglu(linear("gate", layer, x, self.gate.get_value()),
                 linear("up", layer, x, self.up.get_value()))
    return linear("down", layer, act, self.down.get_value())

  def __call__(self, tokens: jax.Array, cache: KVCache | SlotCache, *,
               linear: LinearFn = plain_linear, all_logits: bool = False,
               last: jax.Array | None = None, attend_fn: AttentionFn = attention
               ) -> tuple[jax.Array, KVCache | SlotCache]:
    """Runs T new tokens per row through the decoder, writing them into the cache.

    `cache` may also be a `PackedPrompts` view (several whole prompts in one row) or a
    `DecodeWithPrompts` view (decode tokens and whole prompts in one row), which return the
    `SlotCache` they wrote into.

    Args:
      tokens: [B, T] int32, written at the cache's next T slots of each row.
      cache: the KV cache (`KVCache`: a left-padded static batch; `SlotCache`: rows of their
        own lengths).
      linear: how each linear module is applied (the adapter seam).
      all_logits: return logits for every position ([B, T, V]) rather than the last ([B, V]).
      last: [B] int32, the position of each row whose logits to return ([B, V]; right-padded
        prompt chunks), instead of the last; or [B, R]: R positions per row ([B, R, V]; the
        prompts of a packed pass).
      attend_fn: how each layer's attention runs (`layers.ATTENTION`: XLA's fusions by default).
    Returns:
      (logits in f32, updated cache).
    """
    cfg = self.cfg
    b, t = tokens.shape
    positions = cache.positions(t)  # [B, T]
    mask = cache.visible(t)  # [B, T, S]
    rope_scale = cfg.rope_scaling.attention_factor if cfg.rope_scaling else 1.0
    rope = rope_tables(positions, self.inv_freq[...], rope_scale)  # once for every layer

    h = jnp.take(self.embed[...], tokens, axis=0)  # [B, T, D]
    new_k, new_v = list(cache.k), list(cache.v)
    for l in range(cfg.layers):
      x = rms_norm(h, self.attn_norm[l], cfg.rms_eps)
      # A path may leave q, k and v's expert delta to an appending attention kernel.
      parts = getattr(linear, "qkv_parts", None)
      appends = getattr(cache, "appends", None)
      parts = parts(l, x) if parts is not None and appends and appends(t, attend_fn) else None
      if parts is not None:
        q, k, v, delta = parts
        att, new_k[l], new_v[l] = cache.attend(q, k, v, new_k[l], new_v[l], mask, attend_fn,
                                               rope, delta=delta)
      else:
        q = linear("q", l, x, self.q.get_value()).reshape(b, t, cfg.heads, cfg.head_dim)
        k = linear("k", l, x, self.k.get_value()).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        v = linear("v", l, x, self.v.get_value()).reshape(b, t, cfg.kv_heads, cfg.head_dim)
        att, new_k[l], new_v[l] = cache.attend(q, k, v, new_k[l], new_v[l], mask, attend_fn,
                                               rope)
      att = att.reshape(b, t, cfg.q_dim)
      h = h + linear("o", l, att, self.o.get_value())
      x = rms_norm(h, self.ffn_norm[l], cfg.rms_eps)
      h = h + self._mlp_tail(linear, l, x)

    if last is not None:
      h = h[jnp.arange(b), last]
    elif not all_logits:
      h = h[:, -1]
    h = rms_norm(h, self.final_norm[...], cfg.rms_eps)
    if cfg.tie_embeddings:
      logits = jnp.einsum("...d,vd->...v", h, self.embed[...], preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("...d,dv->...v", h, self.lm_head[...], preferred_element_type=jnp.float32)
    return logits, cache.advanced(tuple(new_k), tuple(new_v), t)


def _random_weights(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], dtype: jnp.dtype,
                    seed: int) -> dict[str, jax.Array]:
  """Seeded random weights, generated on the device in the target dtype (for benchmarks)."""
  key = jax.random.key(seed)
  out: dict[str, jax.Array] = {}
  for i, (name, shape) in enumerate(sorted(shapes.items())):
    if "norm" in name:
      out[name] = jnp.ones(shape, dtype)
      continue
    fan_in = shape[-2] if len(shape) >= 2 and name != "embed" else shape[-1]
    out[name] = _normal(jax.random.fold_in(key, i), shape, dtype, 1.0 / np.sqrt(fan_in))
  return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, scale: float) -> jax.Array:
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)
