"""SGMV on the Triton lowering of Pallas: segmented shrink and expand over expert-sorted rows.

The op (see `pallas_kernels.sgmv`): the prompt's (token, choice) pairs grouped by expert
(`reference.segment_table`), every segment padded to whole row tiles so that each tile belongs
to one expert.

- `segmented_shrink` (one launch per group of modules that read the same input: q/k/v,
  gate/up): `h[g, row] = scale · gate(row) · x[token(row)] @ A_g[l][:, expert(row)]`, optionally
  as partial sums over S slices of the input dimension (more programs per tile).
- `segmented_expand` (one launch per module): `y_rows[row] = h[g, row] @ B[l, expert(row)]`;
  tiles past the last segment are skipped, and their rows are never read.
- `segmented_delta` puts them together: gather the tokens' rows, shrink, expand, and sum each
  token's k rows back (`reference.combine`): `[T, N]` f32, to be added to the base matmul
  `x @ W[l]`, which stays in XLA (a compute-bound GEMM at prefill).

Pools keep the library's layouts, A `[L, K, E, r]`, B `[L, E, r, N]`, and the layer is a
runtime scalar: no slice of a pool is materialised. Ranks are padded to a power of two >= 16
(Triton's smallest dot) by masking, and so are all other edges.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import dot_block, with_output_buffer
from pallas_kernels.sgmv.reference import SegmentTable, combine, gather_rows


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (powers of two) and Triton launch settings.

  block_m: rows per tile (every segment is padded to a multiple of it); block_k: the shrink's
  reduction step; block_n: output columns per expand program; shrink_splits: how many programs
  share one tile's input dimension (a power of two; partial sums in f32, added by the expand):
  the shrink has one program per tile otherwise, few for a GPU of 132 SMs.
  """

  block_m: int = 64
  block_k: int = 128
  block_n: int = 128
  num_warps: int = 4
  num_stages: int = 3
  shrink_splits: int = 1

  @classmethod
  def get_default(cls, num_pairs: int, num_experts: int) -> "Tiles":
    """Tiles whose row count fits the mean segment: a power of two in [16, 64] (16 is Triton's
    smallest dot). Every segment is padded to whole tiles, and every padded row is gathered,
    shrunk, expanded and written: with 64 experts and 512 prompt tokens (1024 pairs, 16 per
    expert on average) 64-row tiles make 5120 rows, 16-row tiles about 2000. Measured on the
    H200 (docs/benchmarks/h200/sgmv/block-m16, block-m64): 5-12% less time (q 3.23 vs
    3.69 ms, down 6.23 vs 6.53 ms over 32 layers), far less than the rows saved: the kernels are
    not bound by the padded rows' bytes."""
    mean = max(1, num_pairs // max(1, min(num_experts, num_pairs)))
    return cls(block_m=min(64, max(16, pl.next_power_of_2(mean))))


def _shrink_kernel(layer_ref, gate_layer_ref, tile_expert_ref, x_ref, gate_ref, *refs,
                   groups: int, rank: int, block_m: int, block_k: int, block_r: int,
                   k_per_split: int, scale: float):
  a_refs, h_ref = refs[:groups], refs[groups]
  gi, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k_total = x_ref.shape[1]
  k0 = s * k_per_split  # a multiple of block_k: the splits' steps never overlap
  expert = tile_expert_ref[i]
  out = h_ref.at[gi, s, pl.ds(i * block_m, block_m), pl.ds(0, block_r)]
  r_mask = jnp.arange(block_r) < rank

  @pl.when(expert < 0)
  def _():
    plgpu.store(out, jnp.zeros((block_m, block_r), h_ref.dtype))

  for g in range(groups):
    @pl.when((expert >= 0) & (gi == g))
    def _(a_ref=a_refs[g]):
      layer = layer_ref[0]

      def body(t, acc):
        kb = k0 + t * block_k
        k_mask = kb + jnp.arange(block_k) < k_total
        # Rows are never masked: the table's row count is a whole number of tiles.
        x = plgpu.load(x_ref.at[pl.ds(i * block_m, block_m), pl.ds(kb, block_k)],
                       mask=k_mask[None, :], other=0.0)
        a = plgpu.load(a_ref.at[layer, pl.ds(kb, block_k), expert, pl.ds(0, block_r)],
                       mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        return acc + plgpu.dot(x, a.astype(x.dtype)).astype(jnp.float32)

      acc = jax.lax.fori_loop(0, k_per_split // block_k, body,
                              jnp.zeros((block_m, block_r), jnp.float32))
      gate = plgpu.load(gate_ref.at[gate_layer_ref[0], pl.ds(i * block_m, block_m)])
      plgpu.store(out, (acc * (gate * scale)[:, None]).astype(h_ref.dtype))


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret"))
def segmented_shrink(x_rows: jax.Array, a_pools: Sequence[jax.Array], layer: jax.Array | int,
                     table: SegmentTable, *, scale: float = 1.0,
                     tiles: Tiles = Tiles(), interpret: bool = False) -> jax.Array:
  """Gated shrink of every padded row by its segment's expert, for G modules in one launch.

  Args:
    x_rows: [P, K] rows from `gather_rows` (P = num_tiles · block_m).
    a_pools: G pools A [L, K, E, r] (same shape).
    layer: which layer (runtime scalar).
    table: from `segment_table` with `tiles.block_m`.
    scale: the LoRA scale alpha / r, folded in.
  Returns:
    h [G, S, P, r'] (S = tiles.shrink_splits partial sums over slices of K; r' = rank padded to
    a power of two >= 16), in x's dtype when S = 1, else f32; rows of tiles past the last
    segment are zero.
  """
  a_pools = tuple(a_pools)
  p, k = x_rows.shape
  num_layers, k_a, _, rank = a_pools[0].shape
  for n, a in enumerate(a_pools):
    if a.shape != a_pools[0].shape:
      raise ValueError(f"pool {n} has shape {a.shape}; a group shares {a_pools[0].shape}")
  if k_a != k:
    raise ValueError(f"x_rows has K={k} but the pools have K={k_a}")
  if table.block_m != tiles.block_m or p != table.row_token.shape[0]:
    raise ValueError(f"x_rows has {p} rows and the table block_m={table.block_m}; expected"
                     f" {table.row_token.shape[0]} rows made by gather_rows with block_m="
                     f"{tiles.block_m}")
  if table.row_gate.shape[0] not in (1, num_layers):
    raise ValueError(f"row_gate has {table.row_gate.shape[0]} layers; expected 1 or {num_layers}")
  splits = tiles.shrink_splits
  if splits < 1 or splits & (splits - 1):
    raise ValueError(f"shrink_splits={splits} must be a power of two (1, 2, 4, ...)")
  groups, block_r = len(a_pools), dot_block(rank)
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  gate_layer = layer if table.row_gate.shape[0] > 1 else jnp.zeros((1,), jnp.int32)
  # Slices that start past K (possible when K is short) load zeros and write zeros.
  k_per_split = pl.cdiv(pl.cdiv(k, splits), tiles.block_k) * tiles.block_k
  kernel = functools.partial(_shrink_kernel, groups=groups, rank=rank, block_m=tiles.block_m,
                             block_k=tiles.block_k, block_r=block_r, k_per_split=k_per_split,
                             scale=scale)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((groups, splits, p, block_r),
                                     x_rows.dtype if splits == 1 else jnp.float32),
      grid=(groups, table.tile_expert.shape[0], splits),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="segmented_shrink",
  )(layer, gate_layer, table.tile_expert, x_rows, table.row_gate, *a_pools)


def _expand_kernel(layer_ref, tile_expert_ref, h_ref, b_ref, *out_refs, group: int, rank: int,
                   splits: int, block_m: int, block_n: int, block_r: int):
  o_ref = out_refs[-1]
  n_total = o_ref.shape[1]
  i, j = pl.program_id(0), pl.program_id(1)
  expert = tile_expert_ref[i]

  # Tiles past the last segment hold no pair: skipping their store saves up to min(E, R) tiles
  # of output bytes, and `combine` never reads those rows.
  @pl.when(expert >= 0)
  def _():
    cols = j * block_n + jnp.arange(block_n)
    col_mask = cols < n_total
    r_mask = jnp.arange(block_r) < rank
    h = plgpu.load(h_ref.at[jnp.int32(group), pl.ds(0, splits), pl.ds(i * block_m, block_m),
                            pl.ds(0, block_r)]).astype(jnp.float32)
    h = jnp.sum(h, axis=0) if splits > 1 else h.reshape(block_m, block_r)
    b = plgpu.load(b_ref.at[layer_ref[0], expert, pl.ds(0, block_r), pl.ds(j * block_n, block_n)],
                   mask=r_mask[:, None] & col_mask[None, :], other=0.0)
    y = plgpu.dot(h.astype(b.dtype), b).astype(jnp.float32)
    plgpu.store(o_ref.at[pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)],
                y.astype(o_ref.dtype), mask=col_mask[None, :])


@functools.partial(jax.jit, static_argnames=("group", "tiles", "interpret"))
def segmented_expand(h: jax.Array, b: jax.Array, layer: jax.Array | int, table: SegmentTable,
                     *, group: int = 0, out: jax.Array | None = None,
                     tiles: Tiles = Tiles(), interpret: bool = False) -> jax.Array:
  """y_rows = h[group] @ B[layer, expert(row)] for every row of a segment, one launch.

  Args:
    h: [G, S, P, r'] from `segmented_shrink` (S partial sums, added here); `group` picks this
      module's part.
    b: [L, E, r, N] the module's expansion factors.
    layer: which layer (runtime scalar).
    table: the same SegmentTable.
    out: optional [P, N] buffer written in place (tests poison it with NaN).
  Returns:
    y_rows [P, N] in h's dtype when S = 1, else in b's; rows of tiles past the last segment are
    left unwritten.
  """
  num_layers, _, rank, n = b.shape
  block_r = dot_block(rank)
  p = table.row_token.shape[0]
  if h.ndim != 4 or h.shape[2:] != (p, block_r) or not 0 <= group < h.shape[0]:
    raise ValueError(f"h has shape {h.shape}; expected [G > {group}, S, {p}, {block_r}] from"
                     " segmented_shrink with the same table and rank")
  splits = h.shape[1]
  if splits & (splits - 1):
    raise ValueError(f"h has S={splits} partial sums; a power of two is needed")
  if table.block_m != tiles.block_m:
    raise ValueError(f"the table has block_m={table.block_m}, the tiles {tiles.block_m}")
  out_dtype = h.dtype if splits == 1 else b.dtype
  kernel = functools.partial(_expand_kernel, group=group, rank=rank, splits=splits,
                             block_m=tiles.block_m, block_n=tiles.block_n, block_r=block_r)
  operands, aliases = with_output_buffer(
      (jnp.asarray(layer, jnp.int32).reshape(1), table.tile_expert, h, b), out, (p, n),
      out_dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((p, n), out_dtype),
      grid=(table.tile_expert.shape[0], pl.cdiv(n, tiles.block_n)),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      input_output_aliases=aliases,
      interpret=interpret,
      name="segmented_expand",
  )(*operands)


def segmented_delta(x: jax.Array, a_pools: Sequence[jax.Array], b_pools: Sequence[jax.Array],
                    layer: jax.Array | int, table: SegmentTable, *, scale: float = 1.0,
                    tiles: Tiles = Tiles(), interpret: bool = False
                    ) -> list[jax.Array]:
  """scale · Σ_j gate_j (x @ A[l, :, e_j]) @ B[l, e_j] for G modules sharing the input x.

  Args:
    x: [T, K] tokens; a_pools / b_pools: G pools A [L, K, E, r], B [L, E, r, N_g].
    layer: which layer; table: `segment_table` of the tokens' choices with `tiles.block_m`.
  Returns:
    one [T, N_g] f32 delta per module.
  """
  h = segmented_shrink(gather_rows(x, table), a_pools, layer, table, scale=scale, tiles=tiles,
                       interpret=interpret)
  return [combine(segmented_expand(h, b, layer, table, group=g, tiles=tiles,
                                   interpret=interpret), table)
          for g, b in enumerate(b_pools)]


