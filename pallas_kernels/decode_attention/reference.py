"""Decode attention's f32 truth: one query token per row against its cache, grouped-query.

    out[b, h] = softmax_s(q[b, h] · K[b, s, h // G] / sqrt(hd), masked) @ V[b, s, h // G]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                               mask: jax.Array) -> jax.Array:
  """q [B, Hq, hd]; k, v [B, S, Hkv, hd]; mask [B, S] bool (True: the row may read slot s; at
  least one per row) -> [B, Hq, hd] f32, computed in f32."""
  b, hq, hd = q.shape
  hkv = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, hd)
  scores = jnp.einsum("bkgd,bskd->bkgs", qg, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) / math.sqrt(hd)
  scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgs,bskd->bkgd", probs, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, hq, hd)
