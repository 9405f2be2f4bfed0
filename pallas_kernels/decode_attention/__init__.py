"""Decode attention: one query token per row against its KV cache, grouped-query (the last
layer of a decode step's attention: scores, softmax, weighted sum of values).

    out[b, h] = softmax_s(q[b, h] · K[b, s, h // G] / sqrt(hd) | mask[b, s]) @ V[b, s, h // G]

Entry points: `decode_attention(q, k, v, mask, backend=)`, and
`decode_attention_append(qkv, k_buf, v_buf, slot, mask, cos, sin, low_rank, backend=)`, which
also rotates the token's q and k and writes k and v into the cache, and with `low_rank`
(`QkvLowRank`) first adds the pre-gated experts' delta to q, k and v from their shrink.
Backends, in `auto`'s order: "triton" (`triton.py`: one launch per layer, split over the cache,
reading only the blocks before the last visible slot; GPU; tests run it in the Pallas interpreter on
the CPU), "xla" (the model's own formulation, what XLA fuses by itself). The f32 truths are
`reference.decode_attention_reference` and `reference.decode_attention_append_reference`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import gpu_only, pick_backend
from pallas_kernels.decode_attention import triton
from pallas_kernels.decode_attention.reference import (decode_attention_append_reference,
                                                     decode_attention_reference, rotate_and_write,
                                                     with_qkv_delta)
from pallas_kernels.decode_attention.triton import QkvLowRank, Tiles

__all__ = ["QkvLowRank", "Tiles", "decode_attention", "decode_attention_append",
           "decode_attention_append_reference", "decode_attention_reference", "with_qkv_delta",
           "xla_attention"]

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


def decode_attention_append(qkv: jax.Array, k_buf: jax.Array, v_buf: jax.Array, slot: jax.Array,
                            mask: jax.Array, cos: jax.Array, sin: jax.Array,
                            low_rank: QkvLowRank | None = None, *, layer: int | None = None,
                            tiles: Tiles = Tiles(), backend: str = "auto"
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """qkv [B, (Hq + 2 Hkv) * hd] (q and k before the rotary embedding; with `low_rank`, the
  modules' 3R shrink columns after them), the cache's buffers k_buf, v_buf [Bc, S, Hkv, hd],
  slot [B], mask [B, W], cos, sin [B, hd/2] -> (out [B, Hq, hd] in qkv's dtype, k_buf, v_buf
  with each row's new key and value at its slot; see `triton.decode_attention_append`)."""
  if pick_backend("decode_attention_append", backend, _BACKENDS) == "triton":
    return triton.decode_attention_append(qkv, k_buf, v_buf, slot, mask, cos, sin, low_rank,
                                          layer=layer, tiles=tiles)
  if low_rank is not None:
    hkv, hd = k_buf.shape[2], k_buf.shape[3]
    if low_rank.b_t.shape[-2] != 3 * hkv * hd:
      raise ValueError(f"low_rank b_t {low_rank.b_t.shape}: expected [{3 * hkv * hd}, R] (q, k"
                       " and v of as many query as KV heads)")
    qkv = with_qkv_delta(qkv, low_rank, layer, rounded=True)
  q, k_buf, v_buf = rotate_and_write(qkv, k_buf, v_buf, slot, cos, sin)
  b, w = mask.shape
  return (xla_attention(q.astype(qkv.dtype), k_buf[:b, :w], v_buf[:b, :w], mask), k_buf,
          v_buf)
