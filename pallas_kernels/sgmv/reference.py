"""SGMV in plain jnp: the segment table every backend works on, XLA's grouped GEMM, and the f32
truth tests compare to."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DEFAULT_BLOCK_M = 64


class SegmentTable(NamedTuple):
  """Where every (token, choice) pair sits once the pairs are grouped by expert.

  tile_expert: [num_tiles] int32, the expert of each row tile (-1: past the last segment).
  row_token: [num_tiles · block_m] int32, the token of each padded row (T for padding rows).
  row_gate: [Lg, num_tiles · block_m] f32, each row's gate (0 for padding; Lg = L with
    per-layer gates, else 1).
  pair_row: [T, k] int32, the padded row of each pair.
  group_sizes: [E] int32, pairs per expert (the unpadded segment lengths).
  """

  tile_expert: jax.Array
  row_token: jax.Array
  row_gate: jax.Array
  pair_row: jax.Array
  group_sizes: jax.Array

  @property
  def block_m(self) -> int:
    return self.row_token.shape[0] // self.tile_expert.shape[0]


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
  """Static tile count that any routing of `num_pairs` pairs fits: each non-empty segment wastes
  less than one tile, and at most min(E, R) segments are non-empty."""
  return pl.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


@functools.partial(jax.jit, static_argnames=("num_experts", "block_m"))
def segment_table(experts: jax.Array, gates: jax.Array, num_experts: int,
                  block_m: int = DEFAULT_BLOCK_M) -> SegmentTable:
  """Groups the pairs by expert, each segment padded to a multiple of `block_m` rows.

  Args:
    experts: [T, k] int32 choices of T tokens.
    gates: [T, k] or [T, L, k] (per-layer gates) weights of those choices.
    num_experts: E.
    block_m: rows per tile.
  Returns:
    the SegmentTable (deterministic: pairs of one expert keep token order).
  """
  t, k = experts.shape
  r = t * k
  num_tiles = max_tiles(r, num_experts, block_m)
  flat = experts.reshape(r).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  starts = jnp.cumsum(sizes) - sizes
  tiles_per = (sizes + block_m - 1) // block_m
  tile_end = jnp.cumsum(tiles_per)
  tile_start = tile_end - tiles_per
  rows_sorted = tile_start[sorted_e] * block_m + (jnp.arange(r, dtype=jnp.int32) - starts[sorted_e])
  pair_row = jnp.zeros((r,), jnp.int32).at[order].set(rows_sorted).reshape(t, k)
  padded = num_tiles * block_m
  row_token = jnp.full((padded,), t, jnp.int32).at[rows_sorted].set((order // k).astype(jnp.int32))
  g = gates.astype(jnp.float32)
  g = g.reshape(1, r) if g.ndim == 2 else jnp.moveaxis(g, 1, 0).reshape(g.shape[1], r)
  row_gate = jnp.zeros((g.shape[0], padded), jnp.float32).at[:, rows_sorted].set(g[:, order])
  tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
  owner = jnp.searchsorted(tile_end, tile_ids, side="right").astype(jnp.int32)
  tile_expert = jnp.where(tile_ids < tile_end[-1], owner, -1)
  return SegmentTable(tile_expert, row_token, row_gate, pair_row, sizes)


def gather_rows(x: jax.Array, table: SegmentTable) -> jax.Array:
  """x [T, K] -> [num_tiles · block_m, K]: each padded row's token (zeros for padding)."""
  return jnp.take(x, table.row_token, axis=0, mode="fill", fill_value=0)


def combine(y_rows: jax.Array, table: SegmentTable) -> jax.Array:
  """Each token's k rows summed: y_rows [P, N] -> [T, N] f32 (gates are already in the rows)."""
  return y_rows[table.pair_row].astype(jnp.float32).sum(axis=1)


def ragged_dot_delta(x: jax.Array, a: jax.Array, b: jax.Array, layer: jax.Array | int,
                     experts: jax.Array, gates: jax.Array, scale: float = 1.0) -> jax.Array:
  """The same delta on XLA's grouped GEMM: pairs sorted by expert, `jax.lax.ragged_dot` for the
  shrink and the expand, then each token's rows summed. x [T, K]; a [L, K, E, r];
  b [L, E, r, N]; experts [T, k]; gates [T, k] or [T, L, k]. Returns [T, N] f32."""
  t, k = experts.shape
  num_experts = a.shape[2]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
  g = gates[:, layer] if gates.ndim == 3 else gates
  rows = x[order // k]
  a_l = jnp.moveaxis(a[layer], 1, 0)  # [E, K, r]
  h = jax.lax.ragged_dot(rows, a_l.astype(x.dtype), sizes, preferred_element_type=jnp.float32)
  h = h * (g.reshape(-1)[order] * scale)[:, None]
  y = jax.lax.ragged_dot(h.astype(x.dtype), b[layer].astype(x.dtype), sizes,
                         preferred_element_type=jnp.float32)
  return jnp.zeros((t * k, y.shape[1]), jnp.float32).at[order].set(y).reshape(t, k, -1).sum(1)


def segmented_reference(x, a, b, layer, experts, gates, scale=1.0):
  """Plain jnp in f32, gather + einsum: scale Σ_j gates[:, j] (x @ A[l, :, e_j]) @ B[l, e_j].

  x [T, K]; a [L, K, E, r]; b [L, E, r, N]; experts [T, k]; gates [T, k] or [T, L, k].
  Returns [T, N] f32 (the delta alone, without the base matmul).
  """
  f32 = jnp.float32
  x, al, bl = x.astype(f32), a[layer].astype(f32), b[layer].astype(f32)
  g = gates[:, layer] if gates.ndim == 3 else gates
  y = jnp.zeros((x.shape[0], b.shape[-1]), f32)
  for j in range(experts.shape[1]):
    e = experts[:, j]
    h = jnp.einsum("tk,tkr->tr", x, jnp.moveaxis(al[:, e], 1, 0))
    y = y + scale * g[:, j, None].astype(f32) * jnp.einsum("tr,trn->tn", h, bl[e])
  return y
