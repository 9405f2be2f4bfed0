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


def rotate_half_reference(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """The rotary embedding in f32: x [B, H, hd], cos and sin [B, hd / 2], pairs (i, i + hd/2)."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  c, s = cos[:, None, :], sin[:, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rotate_and_write(qkv, k_buf, v_buf, slot, cos, sin):
  """What the appending kernel does before it attends: qkv [B, (Hq + 2 Hkv) * hd] split into
  q, k, v; q and k rotated (f32); the new key and value written at `slot` [B] of each row's
  buffers [Bc, S, Hkv, hd] (rounded to the buffers' dtype, as they hold them; a slot past S
  dropped). Returns (rotated q [B, Hq, hd] f32, k_buf, v_buf)."""
  b = qkv.shape[0]
  hkv, hd = k_buf.shape[2], k_buf.shape[3]
  heads = qkv.reshape(b, -1, hd)
  hq = heads.shape[1] - 2 * hkv
  q, k_new, v_new = heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]
  rows = jnp.arange(b)
  k_buf = k_buf.at[rows, slot].set(rotate_half_reference(k_new, cos, sin).astype(k_buf.dtype),
                                   mode="drop")
  v_buf = v_buf.at[rows, slot].set(v_new.astype(v_buf.dtype), mode="drop")
  return rotate_half_reference(q, cos, sin), k_buf, v_buf


def with_qkv_delta(qkv, low_rank, layer=None, *, rounded: bool):
  """qkv [B, P + 3R] (projections, then q's, k's and v's shrink) and a `QkvLowRank` (gates
  [B, R], b_t [P, R] or [L, P, R] at `layer`) -> the projections with their expert delta [B, P]:
  in f32 (`rounded=False`, the truth), or as the library computes it (the gated shrink in B's
  dtype, the products summed in f32, the sum rounded to qkv's dtype)."""
  gates, b_t = low_rank
  if layer is not None and b_t.ndim == 3:
    b_t = b_t[layer]
  proj, rank = b_t.shape
  h = qkv[:, proj:proj + 3 * rank].reshape(-1, 3, rank).astype(jnp.float32) * gates[:, None]
  bt = b_t.reshape(3, proj // 3, rank)
  if rounded:
    delta = jnp.einsum("nmr,mor->nmo", h.astype(b_t.dtype), bt,
                       preferred_element_type=jnp.float32)
    return (qkv[:, :proj].astype(jnp.float32) + delta.reshape(-1, proj)).astype(qkv.dtype)
  delta = jnp.einsum("nmr,mor->nmo", h, bt.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return qkv[:, :proj].astype(jnp.float32) + delta.reshape(-1, proj)


def decode_attention_append_reference(qkv, k_buf, v_buf, slot, mask, cos, sin, low_rank=None,
                                      layer=None):
  """The f32 truth of `decode_attention_append`: the expert delta (`with_qkv_delta`, where
  `low_rank` is given), `rotate_and_write`, then attention over the first W slots of each row
  under mask [B, W].

  Returns (out [B, Hq, hd] f32, k_buf, v_buf)."""
  if low_rank is not None:
    qkv = with_qkv_delta(qkv, low_rank, layer, rounded=False)
  q, k_buf, v_buf = rotate_and_write(qkv, k_buf, v_buf, slot, cos, sin)
  b, w = mask.shape
  return decode_attention_reference(q, k_buf[:b, :w], v_buf[:b, :w], mask), k_buf, v_buf
