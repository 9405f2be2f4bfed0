"""Decode attention on the Triton lowering of Pallas: split over the cache (flash-decoding).

One query token per row attends to its cache of S slots. XLA writes this as a chain of small
fusions per layer (scores, max, exponent, sum, weighted sum over V; about seven kernels for a
Llama-2-7B layer at batch 1) and reads every slot of the cache, filled or not. Here:

- one launch per layer: a grid of (row, KV head, split); each program streams its split's blocks
  of K and V once, with an online softmax (running max m, normaliser l, weighted sum acc), and
  the query heads that share a KV head (grouped-query attention) ride in one tile, loaded masked
  into 16 rows so the two products run as Triton dots (no padded copy of q, no slice of the
  result: only the real rows and columns are stored);
- only the blocks before the last visible slot are read (`end`, a runtime scalar: the loop's
  length), so a cache filled to half costs half the bytes;
- the splits' partial results (m, l, acc) are combined by a few XLA element-wise ops after the
  kernel (`combine`); splits exist so that a batch-1 step spreads over enough SMs.

Layouts are the model's: q [B, Hq, hd], K and V [B, S, Hkv, hd] (the cache's own buffers, read in
place), the mask [B, S]. Edges (S, hd, groups not powers of two) are masked.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import dot_block, with_output_buffers

# A finite "minus infinity": masked scores and empty splits stay free of inf - inf = nan.
NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Tiles:
  """block_s: cache slots per step of a program's loop; target_programs: the splits grow until
  the grid has about this many programs (two waves of the H100's and H200's 132 SMs)."""

  block_s: int = 64
  target_programs: int = 264
  num_warps: int = 4
  num_stages: int = 2


def split_plan(batch: int, kv_heads: int, slots: int, tiles: Tiles) -> tuple[int, int]:
  """(splits, blocks per split) for a cache of `slots` slots."""
  blocks = pl.cdiv(slots, tiles.block_s)
  want = max(1, min(blocks, pl.cdiv(tiles.target_programs, batch * kv_heads)))
  per_split = pl.cdiv(blocks, want)
  return pl.cdiv(blocks, per_split), per_split


def _kernel(end_ref, q_ref, k_ref, v_ref, valid_ref, acc_ref, m_ref, l_ref, *, block_s: int,
            blocks_per_split: int, block_g: int, block_d: int, scale: float):
  b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  slots, head_dim = k_ref.shape[1], k_ref.shape[3]
  groups = q_ref.shape[2]
  d_mask = jnp.arange(block_d) < head_dim
  g_mask = jnp.arange(block_g) < groups
  # Rows and columns past the real ones load as zeros: their scores are 0 and never stored.
  q = plgpu.load(q_ref.at[b, h, pl.ds(0, block_g), pl.ds(0, block_d)],
                 mask=g_mask[:, None] & d_mask[None, :], other=0.0)
  first = sp * blocks_per_split
  # Blocks past the last visible slot are neither read nor computed: a runtime loop length.
  count = jnp.clip(pl.cdiv(end_ref[0], block_s) - first, 0, blocks_per_split)

  def body(i, carry):
    m, l, acc = carry
    start = (first + i) * block_s
    in_range = start + jnp.arange(block_s) < slots
    valid = plgpu.load(valid_ref.at[b, pl.ds(start, block_s)], mask=in_range, other=0) != 0
    # Invisible slots load as zeros: whatever they hold (another row's padding, stale
    # entries) never reaches a product, not even as 0 · nan.
    kv_mask = (valid & in_range)[:, None] & d_mask[None, :]
    k = plgpu.load(k_ref.at[b, pl.ds(start, block_s), h, pl.ds(0, block_d)], mask=kv_mask,
                   other=0.0)
    # Scaled in f32 after the product, as the model's attention does (not folded into a bf16 q).
    s = plgpu.dot(q, k, trans_b=True).astype(jnp.float32) * scale  # [G, block_s]
    s = jnp.where(valid[None, :], s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
    v = plgpu.load(v_ref.at[b, pl.ds(start, block_s), h, pl.ds(0, block_d)], mask=kv_mask,
                   other=0.0)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc

  init = (jnp.full((block_g,), NEG, jnp.float32), jnp.zeros((block_g,), jnp.float32),
          jnp.zeros((block_g, block_d), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, count, body, init)
  # Every program writes its three outputs, also a split with nothing to read (m = NEG, l = 0).
  plgpu.store(acc_ref.at[b, h, sp, pl.ds(0, block_g), pl.ds(0, block_d)], acc,
              mask=g_mask[:, None] & d_mask[None, :])
  plgpu.store(m_ref.at[b, h, sp, pl.ds(0, block_g)], m, mask=g_mask)
  plgpu.store(l_ref.at[b, h, sp, pl.ds(0, block_g)], l, mask=g_mask)


def combine(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """The splits' partial softmaxes as one: acc [..., splits, G, D], m and l [..., splits, G] ->
  [..., G, D] f32."""
  top = jnp.max(m, axis=-2, keepdims=True)
  w = jnp.exp(m - top)  # 0 for a split that read nothing
  den = jnp.sum(w * l, axis=-2)
  return jnp.sum(w[..., None] * acc, axis=-3) / jnp.maximum(den, 1e-30)[..., None]


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     tiles: Tiles = Tiles(), interpret: bool = False,
                     partials: tuple[jax.Array, jax.Array, jax.Array] | None = None
                     ) -> jax.Array:
  """One query token per row against its cache, in one kernel launch plus the splits' combine.

  Args:
    q: [B, Hq, hd] queries.
    k, v: [B, S, Hkv, hd] the cache's buffers (Hq a multiple of Hkv).
    mask: [B, S] bool, True where the row may read slot s (at least one per row).
    partials: optional preallocated (acc, m, l) buffers of the kernel's outputs, written in
      place (tests poison them with NaN to check every program writes its own).
  Returns:
    [B, Hq, hd] in q's dtype; scores, softmax and sums in f32.
  """
  b, hq, head_dim = q.shape
  _, slots, hkv, head_dim_k = k.shape
  if k.shape != v.shape or k.shape[0] != b or head_dim_k != head_dim:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q [B, Hq, hd] and k, v"
                     " [B, S, Hkv, hd] of one shape")
  if hq % hkv:
    raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
  if mask.shape != (b, slots):
    raise ValueError(f"mask has shape {mask.shape}, expected [{b}, {slots}]")
  groups = hq // hkv
  block_g, block_d = dot_block(groups), dot_block(head_dim)
  splits, per_split = split_plan(b, hkv, slots, tiles)
  qg = q.astype(k.dtype).reshape(b, hkv, groups, head_dim)  # the cache's dtype for the dots
  end = jnp.max(jnp.where(mask, jnp.arange(1, slots + 1), 0)).reshape(1).astype(jnp.int32)
  shapes = (jax.ShapeDtypeStruct((b, hkv, splits, groups, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, groups), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, splits, groups), jnp.float32))
  operands, aliases = with_output_buffers((end, qg, k, v, mask.astype(jnp.int32)), partials,
                                          shapes, "partials")
  kernel = functools.partial(_kernel, block_s=tiles.block_s, blocks_per_split=per_split,
                             block_g=block_g, block_d=block_d, scale=1.0 / math.sqrt(head_dim))
  if partials is not None:
    inner = kernel
    kernel = lambda *refs: inner(*refs[:5], *refs[-3:])  # noqa: E731  (aliased inputs unread)
  acc, m, l = pl.pallas_call(
      kernel,
      out_shape=shapes,
      grid=(b, hkv, splits),
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="decode_attention",
  )(*operands)
  return combine(acc, m, l).reshape(b, hq, head_dim).astype(q.dtype)
