"""Decode attention: one query token per row against its KV cache, grouped-query (the last
layer of a decode step's attention: scores, softmax, weighted sum of values).

    out[b, h] = softmax_s(q[b, h] · K[b, s, h // G] / sqrt(hd) | mask[b, s]) @ V[b, s, h // G]

Entry point: `decode_attention(q, k, v, mask, backend=)`. Backends, in `auto`'s order:
"triton" (`triton.py`: one launch per layer, split over the cache, reading only the blocks
before the last visible slot; GPU; tests run it in the Pallas interpreter on the CPU), "xla"
(`xla_attention`: the model's own einsum formulation, what XLA fuses by itself). The f32 truth
is `reference.decode_attention_reference`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import gpu_only, pick_backend
from pallas_kernels.decode_attention import triton
from pallas_kernels.decode_attention.reference import decode_attention_reference
from pallas_kernels.decode_attention.triton import Tiles

__all__ = ["Tiles", "decode_attention", "decode_attention_reference", "xla_attention"]

_BACKENDS = {"triton": lambda: gpu_only("the Triton lowering"), "xla": lambda: None}


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """The model's formulation (grouped einsums, f32 scores and softmax) for one token:
  q [B, Hq, hd], k, v [B, S, Hkv, hd], mask [B, S] -> [B, Hq, hd] in q's dtype."""
  b, hq, hd = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, hkv, hq // hkv, hd)
  scores = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None, :], scores / math.sqrt(hd), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgs,bskd->bkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, hq, hd).astype(q.dtype)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     tiles: Tiles = Tiles(), backend: str = "auto") -> jax.Array:
  """q [B, Hq, hd], k, v [B, S, Hkv, hd] (the cache's buffers), mask [B, S] bool ->
  [B, Hq, hd] in q's dtype (see `triton.decode_attention`)."""
  if pick_backend("decode_attention", backend, _BACKENDS) == "xla":
    return xla_attention(q, k, v, mask)
  return triton.decode_attention(q, k, v, mask, tiles=tiles)
