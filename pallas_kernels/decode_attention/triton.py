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

`decode_attention_append` is the same attention with the step's work before it folded in: it
takes the token's q, k and v before the rotary embedding (one row of heads, as the fused q/k/v
matmul leaves them), rotates q and k, writes k and v into the cache in place (split 0 of each
row and KV head) and attends, the new token added from registers rather than read back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

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
  the grid has about this many programs (two waves of the H100's and H200's 132 SMs);
  delta_block_r (`decode_attention_append` with `QkvLowRank`): B's columns per trip of the
  delta, a power of two of at least 16 (a pool of R <= delta_block_r runs no loop: 11.4 µs a 7B
  call at 128 against 14.7 at 32 and 4.4 without the delta on an H100,
  docs/benchmarks/h100/append-delta/)."""

  block_s: int = 64
  target_programs: int = 264
  num_warps: int = 4
  num_stages: int = 2
  delta_block_r: int = 128


def split_plan(batch: int, kv_heads: int, slots: int, tiles: Tiles) -> tuple[int, int]:
  """(splits, blocks per split) for a cache of `slots` slots."""
  blocks = pl.cdiv(slots, tiles.block_s)
  want = max(1, min(blocks, pl.cdiv(tiles.target_programs, batch * kv_heads)))
  per_split = pl.cdiv(blocks, want)
  return pl.cdiv(blocks, per_split), per_split


def _split_softmax(q, k_ref, v_ref, valid_ref, b, h, first, count, *, block_s: int,
                   block_d: int, scale: float, skip=None):
  """One program's online softmax over its split: `count` blocks of `block_s` slots from block
  `first` of row b, KV head h, for the query tile q [block_g, block_d] (the cache's dtype).
  Slots the row may not read (`valid_ref` [B, W]), past W, or equal to `skip` (a runtime slot,
  when given) are neither read nor counted. Returns (m [block_g], l [block_g],
  acc [block_g, block_d]), f32: the running max, normaliser and weighted sum of values."""
  slots, head_dim = valid_ref.shape[1], k_ref.shape[3]
  d_mask = jnp.arange(block_d) < head_dim
  block_g = q.shape[0]

  def body(i, carry):
    m, l, acc = carry
    start = (first + i) * block_s
    idx = start + jnp.arange(block_s)
    in_range = idx < slots
    valid = plgpu.load(valid_ref.at[b, pl.ds(start, block_s)], mask=in_range, other=0) != 0
    valid = valid & in_range if skip is None else valid & in_range & (idx != skip)
    # Invisible slots load as zeros: whatever they hold (another row's padding, stale
    # entries) never reaches a product, not even as 0 · nan.
    kv_mask = valid[:, None] & d_mask[None, :]
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
  return jax.lax.fori_loop(0, count, body, init)


def _store_partials(acc_ref, m_ref, l_ref, b, h, sp, m, l, acc, g_mask, d_mask):
  """Every program writes its three outputs, also a split with nothing to read (m = NEG,
  l = 0)."""
  plgpu.store(acc_ref.at[b, h, sp, pl.ds(0, acc.shape[0]), pl.ds(0, acc.shape[1])], acc,
              mask=g_mask[:, None] & d_mask[None, :])
  plgpu.store(m_ref.at[b, h, sp, pl.ds(0, m.shape[0])], m, mask=g_mask)
  plgpu.store(l_ref.at[b, h, sp, pl.ds(0, l.shape[0])], l, mask=g_mask)


def _kernel(end_ref, q_ref, k_ref, v_ref, valid_ref, acc_ref, m_ref, l_ref, *, block_s: int,
            blocks_per_split: int, block_g: int, block_d: int, scale: float):
  b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  head_dim = k_ref.shape[3]
  groups = q_ref.shape[2]
  d_mask = jnp.arange(block_d) < head_dim
  g_mask = jnp.arange(block_g) < groups
  # Rows and columns past the real ones load as zeros: their scores are 0 and never stored.
  q = plgpu.load(q_ref.at[b, h, pl.ds(0, block_g), pl.ds(0, block_d)],
                 mask=g_mask[:, None] & d_mask[None, :], other=0.0)
  first = sp * blocks_per_split
  # Blocks past the last visible slot are neither read nor computed: a runtime loop length.
  count = jnp.clip(pl.cdiv(end_ref[0], block_s) - first, 0, blocks_per_split)
  m, l, acc = _split_softmax(q, k_ref, v_ref, valid_ref, b, h, first, count, block_s=block_s,
                             block_d=block_d, scale=scale)
  _store_partials(acc_ref, m_ref, l_ref, b, h, sp, m, l, acc, g_mask, d_mask)


def combine(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """The splits' partial softmaxes as one: acc [..., splits, G, D], m and l [..., splits, G] ->
  [..., G, D] f32."""
  top = jnp.max(m, axis=-2, keepdims=True)
  w = jnp.exp(m - top)  # 0 for a split that read nothing
  den = jnp.sum(w * l, axis=-2)
  return jnp.sum(w[..., None] * acc, axis=-3) / jnp.maximum(den, 1e-30)[..., None]


def _partial_shapes(b: int, hkv: int, splits: int, groups: int, head_dim: int) -> tuple:
  """The kernels' partial outputs (acc, m, l): f32 [B, Hkv, splits, G, hd], [..., G], [..., G]."""
  return (jax.ShapeDtypeStruct((b, hkv, splits, groups, head_dim), jnp.float32),
          jax.ShapeDtypeStruct((b, hkv, splits, groups), jnp.float32),
          jax.ShapeDtypeStruct((b, hkv, splits, groups), jnp.float32))


def _visible_end(mask: jax.Array) -> jax.Array:
  """[1] int32: one past the last slot any row may read (the kernels' loop bound)."""
  slots = mask.shape[1]
  return jnp.max(jnp.where(mask, jnp.arange(1, slots + 1), 0)).reshape(1).astype(jnp.int32)


def _launch(kernel, shapes, operands, aliases, grid, tiles: Tiles, interpret: bool, name: str):
  """One launch of a decode-attention kernel over grid (row, KV head, split)."""
  return pl.pallas_call(
      kernel,
      out_shape=shapes,
      grid=grid,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name=name,
  )(*operands)


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
  shapes = _partial_shapes(b, hkv, splits, groups, head_dim)
  operands, aliases = with_output_buffers((_visible_end(mask), qg, k, v, mask.astype(jnp.int32)),
                                          partials, shapes, "partials")
  kernel = functools.partial(_kernel, block_s=tiles.block_s, blocks_per_split=per_split,
                             block_g=block_g, block_d=block_d, scale=1.0 / math.sqrt(head_dim))
  if partials is not None:
    inner = kernel
    kernel = lambda *refs: inner(*refs[:5], *refs[-3:])  # noqa: E731  (aliased inputs unread)
  acc, m, l = _launch(kernel, shapes, operands, aliases, (b, hkv, splits), tiles, interpret,
                      "decode_attention")
  return combine(acc, m, l).reshape(b, hq, head_dim).astype(q.dtype)


# Rotate, append and attend: the decode step's rotary embedding and cache write in the kernel.


def _rotated(heads_ref, b, rows, cols, partner, sign, cos, sin, mask):
  """Rows `rows` of heads_ref[b] ([heads, hd]) under the rotary embedding (`rotate_half`
  layout, pairs (i, i + hd/2)), in f32: x · cos + sign · x[partner] · sin, the partner columns
  read by a second (gather) load so the result is one full-width tile."""
  x = plgpu.load(heads_ref.at[b, rows, cols], mask=mask, other=0.0).astype(jnp.float32)
  xp = plgpu.load(heads_ref.at[b, rows, partner], mask=mask, other=0.0).astype(jnp.float32)
  return x * cos + sign * xp * sin


@dataclasses.dataclass(frozen=True)
class _LowRankPlan:
  """Static facts of the q/k/v expert delta inside the appending kernel (see `QkvLowRank`)."""

  rank: int
  shrink_at: int
  layer: int | None
  block_r: int  # B's columns per trip of the delta's loop (`Tiles.delta_block_r`)


def _vector_tile_dot(v: jax.Array, tile: jax.Array) -> jax.Array:
  """Σ_r tile[i, r] · v[r] for every row i: v [R] and tile [K, R] (powers of two of at least 16)
  -> [K] f32, as one tensor-core dot, v the first row of a 16-row operand (Triton's smallest
  dot), where an element-wise product summed over R holds the whole [K, R] product in
  registers. An f32 tile keeps f32 products (tests)."""
  lhs = jnp.where((jnp.arange(16) == 0)[:, None], v[None, :], 0).astype(tile.dtype)
  prod = plgpu.dot(lhs, tile, trans_b=True, allow_tf32=tile.dtype != jnp.float32)
  return jnp.sum(prod.astype(jnp.float32), axis=0)


def _expert_deltas(heads_ref, g_ref, bt_ref, b, rows: tuple, mask, module: int,
                   plan: _LowRankPlan) -> tuple:
  """Module `module`'s expert delta at several index vectors of qkv's columns, f32, one per
  entry of `rows`: Σ_r B^T[row, r] · (shrink_module[r] · gate[r]), the gated shrink rounded to
  B's dtype as the library's expansion rounds it (`paths.packed.expand`).

  Each B tile ([len(row), block_r], one 2-D load) meets the gated shrink in a tensor-core dot
  (`_vector_tile_dot`); with R <= block_r (the default pool: 8 experts of rank 16) there
  is no loop, so the loads of q's, its rotary partners', k's and v's tiles are not serialised
  behind each other."""
  at = () if plan.layer is None else (jnp.int32(plan.layer),)

  def trip(r0, accs):
    r = r0 + jnp.arange(plan.block_r)
    r_mask = r < plan.rank
    h = plgpu.load(heads_ref.at[b, plan.shrink_at + module * plan.rank + r], mask=r_mask,
                   other=0.0)
    g = plgpu.load(g_ref.at[b, r], mask=r_mask, other=0.0)
    hg = (h.astype(jnp.float32) * g).astype(bt_ref.dtype)
    out = []
    for acc, idx in zip(accs, rows):
      w = plgpu.load(bt_ref.at[*at, idx[:, None], r[None, :]],
                     mask=mask[:, None] & r_mask[None, :], other=0.0)
      out.append(acc + _vector_tile_dot(hg, w))
    return tuple(out)

  init = tuple(jnp.zeros(idx.shape, jnp.float32) for idx in rows)
  trips = pl.cdiv(plan.rank, plan.block_r)
  if trips == 1:
    return trip(0, init)
  return jax.lax.fori_loop(0, trips, lambda c, accs: trip(c * plan.block_r, accs), init)


def _projections(heads_ref, g_ref, bt_ref, b, head, cols: tuple, mask, module: int,
                 head_dim: int, plan: _LowRankPlan) -> tuple:
  """One head row of the token's projection with its expert delta at each column vector of
  `cols` (the head's columns, their rotary partners), f32, rounded to the projection's dtype
  as the library's expansion leaves it."""
  rows = tuple(head * head_dim + c for c in cols)
  deltas = _expert_deltas(heads_ref, g_ref, bt_ref, b, rows, mask, module, plan)
  out = []
  for idx, delta in zip(rows, deltas):
    x = plgpu.load(heads_ref.at[b, idx], mask=mask, other=0.0).astype(jnp.float32)
    out.append((x + delta).astype(heads_ref.dtype).astype(jnp.float32))
  return tuple(out)


def _append_kernel(end_ref, slot_ref, heads_ref, cos_ref, sin_ref, k_ref, v_ref, valid_ref,
                   *refs, groups: int, block_s: int, blocks_per_split: int, block_g: int,
                   block_d: int, scale: float, low_rank: _LowRankPlan | None = None):
  if low_rank is not None:
    g_ref, bt_ref, acc_ref, m_ref, l_ref, k_out_ref, v_out_ref = refs
  else:
    acc_ref, m_ref, l_ref, k_out_ref, v_out_ref = refs
  b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  # The token's projections arrive as one row of heads, heads_ref [B, Hq + 2 Hkv, hd]: q's Hq
  # (KV head h's queries are rows h·G ... h·G + G - 1), then k's Hkv, then v's Hkv.
  slots, head_dim = valid_ref.shape[1], k_ref.shape[3]
  buf_slots, kv_heads = k_ref.shape[1], k_ref.shape[2]
  q_heads = kv_heads * groups
  half = head_dim // 2
  cols = jnp.arange(block_d)
  d_mask = cols < head_dim
  g_mask = jnp.arange(block_g) < groups
  dtype = k_ref.dtype
  # Column j's rotary partner and sign: -x[j + hd/2] below the middle, +x[j - hd/2] above.
  partner = jnp.where(cols < half, cols + half, cols - half) % head_dim
  sign = jnp.where(cols < half, -1.0, 1.0)
  freq = cols % half
  cos = plgpu.load(cos_ref.at[b, freq], mask=d_mask, other=0.0)
  sin = plgpu.load(sin_ref.at[b, freq], mask=d_mask, other=0.0)
  slot = slot_ref[b]
  if low_rank is None:
    # The query heads of KV head h, rotated in f32 and rounded to the cache's dtype, as the
    # model's rotary and the plain kernel's cast do.
    rows = h * groups + jnp.arange(block_g)
    q = _rotated(heads_ref, b, rows[:, None], cols[None, :], partner[None, :], sign, cos, sin,
                 g_mask[:, None] & d_mask[None, :]).astype(dtype)
    # The new key, rotated and rounded as the cache will hold it, and the new value.
    k_new = _rotated(heads_ref, b, q_heads + h, cols, partner, sign, cos, sin,
                     d_mask).astype(dtype)
    v_new = plgpu.load(heads_ref.at[b, q_heads + kv_heads + h, pl.ds(0, block_d)], mask=d_mask,
                       other=0.0).astype(dtype)
  else:
    # One query head per KV head (no grouping: the entry point checks), its projection and the
    # partner columns' each with the expert delta; only split 0 needs the new key and value,
    # the other splits' loads of them are masked off (no memory read).
    def rotated(head, mask, module):
      x, xp = _projections(heads_ref, g_ref, bt_ref, b, head, (cols, partner), mask, module,
                           head_dim, low_rank)
      return x * cos + sign * xp * sin

    q_row = rotated(h, d_mask, 0).astype(dtype)
    q = jnp.where((jnp.arange(block_g) == 0)[:, None], q_row[None, :], 0.0).astype(dtype)
    first_split = d_mask & (sp == 0)
    k_new = rotated(q_heads + h, first_split, 1).astype(dtype)
    v_new, = _projections(heads_ref, g_ref, bt_ref, b, q_heads + kv_heads + h, (cols,),
                          first_split, 2, head_dim, low_rank)
    v_new = v_new.astype(dtype)
  # Split 0 writes the new slot (a slot past the buffer is dropped); no program reads that slot
  # back from memory (the loop masks it out, split 0 adds the new token from registers), so the
  # write races with no read.
  writes = (sp == 0) & (slot < buf_slots)
  at = jnp.minimum(slot, buf_slots - 1)
  plgpu.store(k_out_ref.at[b, at, h, pl.ds(0, block_d)], k_new, mask=d_mask & writes)
  plgpu.store(v_out_ref.at[b, at, h, pl.ds(0, block_d)], v_new, mask=d_mask & writes)

  first = sp * blocks_per_split
  count = jnp.clip(pl.cdiv(end_ref[0], block_s) - first, 0, blocks_per_split)
  m, l, acc = _split_softmax(q, k_ref, v_ref, valid_ref, b, h, first, count, block_s=block_s,
                             block_d=block_d, scale=scale, skip=slot)
  # The new token, where the row may read its slot: in split 0's partial softmax.
  seen = plgpu.load(valid_ref.at[b, jnp.minimum(slot, slots - 1)]) != 0
  adds = (sp == 0) & (slot < slots) & seen
  s_new = jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1) * scale
  m_new = jnp.maximum(m, s_new)
  alpha, p_new = jnp.exp(m - m_new), jnp.exp(s_new - m_new)
  m = jnp.where(adds, m_new, m)
  l = jnp.where(adds, l * alpha + p_new, l)
  acc = jnp.where(adds, acc * alpha[:, None]
                  + p_new[:, None] * v_new.astype(jnp.float32)[None, :], acc)
  _store_partials(acc_ref, m_ref, l_ref, b, h, sp, m, l, acc, g_mask, d_mask)


class QkvLowRank(NamedTuple):
  """The q, k and v projections' expert delta, added inside the appending kernel (pre-gated
  experts or plain LoRA: one gate row for the three modules; no grouped-query heads).

  Their shrink (x @ A of every expert, R columns per module: q's, k's, v's) is read from qkv's
  own columns right after the base outputs, where the packed path's fused matmul leaves it.
  gates: [B, R] f32, each shrink column's gate (times the pool's scale; 0 for experts not
    chosen);
  b_t: [(Hq + 2 Hkv) · hd, R] B transposed, row j the weights of qkv's column j, or
    [L, (Hq + 2 Hkv) · hd, R] read at the call's `layer`.
  """

  gates: jax.Array
  b_t: jax.Array


@functools.partial(jax.jit, static_argnames=("layer", "tiles", "interpret"))
def decode_attention_append(qkv: jax.Array, k_buf: jax.Array, v_buf: jax.Array, slot: jax.Array,
                            mask: jax.Array, cos: jax.Array, sin: jax.Array,
                            low_rank: QkvLowRank | None = None, *, layer: int | None = None,
                            tiles: Tiles = Tiles(), interpret: bool = False,
                            partials: tuple[jax.Array, jax.Array, jax.Array] | None = None
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decode token per row: rotates its query and key, writes its key and value into the
  cache and attends to the cache, in one kernel launch plus the splits' combine (where the model
  otherwise runs the rotary embedding, two cache writes and the attention as five kernels).

  Args:
    qkv: [B, (Hq + 2 Hkv) * hd] the token's query, key and value projections side by side (the
      fused q/k/v matmul's output: taking it whole spares XLA a copy per slice), q and k before
      the rotary embedding; with `low_rank`, [B, (Hq + 2 Hkv) * hd + 3R]: the three modules'
      shrink after them.
    k_buf, v_buf: [Bc, S, Hkv, hd] the cache's buffers (Bc >= B; rows past B are not touched),
      written in place (aliased to the outputs: in place when the caller's step donates them).
    slot: [B] int32, the slot of row b that takes the new key and value (one past the buffer:
      dropped).
    mask: [B, W] bool, W <= S: True where the row may read slot s once the new token is written
      (slots past W are not read).
    cos, sin: [B, hd / 2] f32, the rotary tables at each row's position (`rotate_half` layout,
      any attention factor included).
    low_rank: the projections' expert delta (`QkvLowRank`), added before the rotary embedding;
      Hq must equal Hkv.
    layer: the layer of a stacked `low_rank.b_t`, read in place (None: b_t is one layer's).
    partials: optional preallocated (acc, m, l) buffers of the kernel's partial outputs.
  Returns:
    (out [B, Hq, hd] in qkv's dtype, k_buf, v_buf with the new slot written).
  """
  bc, buf_slots, hkv, head_dim = k_buf.shape
  b, width = qkv.shape
  rank = 0 if low_rank is None else low_rank.b_t.shape[-1]
  proj = width - 3 * rank
  heads = proj // head_dim if head_dim else 0
  hq = heads - 2 * hkv
  if (k_buf.shape != v_buf.shape or bc < b or proj != heads * head_dim or hq < hkv
      or hq % hkv):
    raise ValueError(f"qkv {qkv.shape}, k_buf {k_buf.shape}, v_buf {v_buf.shape}: expected qkv"
                     " [B, (Hq + 2 Hkv) * hd] (+ 3R shrink columns with low_rank), Hq a multiple"
                     " of Hkv, and buffers [Bc >= B, S, Hkv, hd] of one shape")
  if head_dim % 2:
    raise ValueError(f"head_dim {head_dim} must be even (the rotary embedding pairs halves)")
  if mask.shape[0] != b or mask.shape[1] > buf_slots or slot.shape != (b,):
    raise ValueError(f"mask {mask.shape} and slot {slot.shape}: expected [{b}, W <= {buf_slots}]"
                     f" and [{b}]")
  if cos.shape != (b, head_dim // 2) or sin.shape != cos.shape:
    raise ValueError(f"cos {cos.shape}, sin {sin.shape}: expected [{b}, {head_dim // 2}]")
  groups = hq // hkv
  plan = None
  if low_rank is not None:
    gates, b_t = low_rank
    stacked = layer is not None
    if (groups != 1 or gates.shape != (b, rank) or b_t.ndim != 2 + stacked
        or b_t.shape[-2] != proj):
      raise ValueError(f"low_rank gates {gates.shape}, b_t {b_t.shape} with qkv {qkv.shape},"
                       f" {hq} query and {hkv} KV heads: expected as many query as KV heads,"
                       f" gates [{b}, R] and b_t [{proj}, R] (or [L, {proj}, R] with a layer)")
    if tiles.delta_block_r < 16 or tiles.delta_block_r & (tiles.delta_block_r - 1):
      raise ValueError(f"Tiles.delta_block_r {tiles.delta_block_r}: expected a power of two of"
                       " at least 16 (the delta's dot)")
    plan = _LowRankPlan(rank=rank, shrink_at=proj, layer=layer,
                        block_r=min(tiles.delta_block_r, dot_block(rank)))
  splits, per_split = split_plan(b, hkv, mask.shape[1], tiles)
  shapes = (*_partial_shapes(b, hkv, splits, groups, head_dim),
            jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype),
            jax.ShapeDtypeStruct(v_buf.shape, v_buf.dtype))
  # With the delta the kernel reads qkv flat (its shrink columns sit past the heads).
  heads_view = qkv if plan is not None else qkv.reshape(b, heads, head_dim)
  operands = (_visible_end(mask), slot.astype(jnp.int32), heads_view,
              cos.astype(jnp.float32), sin.astype(jnp.float32), k_buf, v_buf,
              mask.astype(jnp.int32))
  if plan is not None:
    operands += (low_rank.gates.astype(jnp.float32), low_rank.b_t)
  inputs = len(operands)
  aliases = {5: 3, 6: 4}
  kernel = functools.partial(_append_kernel, groups=groups, block_s=tiles.block_s,
                             blocks_per_split=per_split, block_g=dot_block(groups),
                             block_d=dot_block(head_dim), scale=1.0 / math.sqrt(head_dim),
                             low_rank=plan)
  if partials is not None:
    _, aliases = with_output_buffers(operands, partials, shapes[:3], "partials")
    aliases = {**aliases, 5: 3, 6: 4}
    operands = operands + tuple(partials)
    inner = kernel
    kernel = lambda *refs: inner(*refs[:inputs], *refs[-5:])  # noqa: E731  (aliased inputs unread)
  acc, m, l, k_buf, v_buf = _launch(kernel, shapes, operands, aliases, (b, hkv, splits), tiles,
                                    interpret, "decode_attention_append")
  return combine(acc, m, l).reshape(b, hq, head_dim).astype(qkv.dtype), k_buf, v_buf
