"""The segmented shrink / expand of `pallas_kernels/sgmv/triton.py`, written in Triton's own language.

A peer, not a replacement: the same algorithm, the same segment table, tiles and launch
settings, called through `jax_triton.triton_call` instead of `pl.pallas_call`, so that a
benchmark run side by side (`tools/segmented_bench.py`) tells whether writing the kernel in
Pallas costs anything. One module per launch (the Pallas shrink also serves a group of modules
that share an input; the benchmark compares single modules).

Needs a CUDA GPU and the `[gpu]` extra (`pip install "adafuse-jax[gpu]"`: jax-triton and
triton); `available()` says whether this process can run it, and every entry point raises a
clear error otherwise. The f32 reference is `reference.segmented_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import dot_block
from pallas_kernels.sgmv.reference import SegmentTable, combine, gather_rows
from pallas_kernels.sgmv.triton import Tiles

try:  # optional: the [gpu] extra
  import jax_triton as jt
  import triton
  import triton.language as tl
except ImportError as err:  # noqa: F841 - kept for the message
  jt = triton = tl = None
  _IMPORT_ERROR = f"{type(err).__name__}: {err}"
else:
  _IMPORT_ERROR = ""


def available() -> tuple[bool, str]:
  """(whether the Triton peer can run here, why not)."""
  if jt is None:
    return False, (f"jax-triton is not installed ({_IMPORT_ERROR}); install the GPU extra:"
                   ' pip install "adafuse-jax[gpu]"')
  if jax.default_backend() != "gpu":
    return False, f"the Triton peer needs a CUDA GPU; JAX's backend is {jax.default_backend()!r}"
  return True, ""


def _require() -> None:
  ok, why = available()
  if not ok:
    raise RuntimeError(why)


if triton is not None:

  @triton.jit
  def _shrink_kernel(layer_ptr, gate_layer_ptr, tile_expert_ptr, x_ptr, gate_ptr, a_ptr, h_ptr,
                     K: tl.constexpr, P: tl.constexpr, E: tl.constexpr, RANK: tl.constexpr,
                     SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    # x [P, K]; a [L, K, E, RANK]; gate [Lg, P] f32; h [P, BLOCK_R]
    i = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + i)
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    h_ptrs = h_ptr + rows[:, None] * BLOCK_R + rr[None, :]
    if expert < 0:
      tl.store(h_ptrs, tl.zeros((BLOCK_M, BLOCK_R), dtype=h_ptr.dtype.element_ty))
    else:
      layer = tl.load(layer_ptr).to(tl.int64)
      r_mask = rr < RANK
      a_base = a_ptr + layer * (K * E * RANK) + expert * RANK
      acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
      for kb in range(0, tl.cdiv(K, BLOCK_K)):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :], mask=k_mask[None, :],
                    other=0.0)
        a = tl.load(a_base + ks[:, None] * (E * RANK) + rr[None, :],
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.dot(x, a.to(x.dtype))
      gate_layer = tl.load(gate_layer_ptr)
      gate = tl.load(gate_ptr + gate_layer * P + rows)
      acc = acc * (gate * SCALE)[:, None]
      tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty))

  @triton.jit
  def _expand_kernel(layer_ptr, tile_expert_ptr, h_ptr, b_ptr, y_ptr, N: tl.constexpr,
                     E: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # h [P, BLOCK_R]; b [L, E, RANK, N]; y [P, N]
    i = tl.program_id(0)
    j = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + i)
    if expert >= 0:
      layer = tl.load(layer_ptr).to(tl.int64)
      rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
      rr = tl.arange(0, BLOCK_R)
      cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
      col_mask = cols < N
      h = tl.load(h_ptr + rows[:, None] * BLOCK_R + rr[None, :])
      b_base = b_ptr + (layer * E + expert) * (RANK * N)
      b = tl.load(b_base + rr[:, None] * N + cols[None, :],
                  mask=(rr < RANK)[:, None] & col_mask[None, :], other=0.0)
      y = tl.dot(h.to(b.dtype), b)
      tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
               y.to(y_ptr.dtype.element_ty), mask=col_mask[None, :])


def triton_shrink(x_rows: jax.Array, a: jax.Array, layer: jax.Array | int, table: SegmentTable,
                  *, scale: float = 1.0, tiles: Tiles = Tiles()) -> jax.Array:
  """As `triton.segmented_shrink` for one pool A [L, K, E, r]: h [P, r'] in x's dtype."""
  _require()
  if tiles.shrink_splits != 1:
    raise ValueError("the Triton peer keeps one shrink program per tile: shrink_splits must be 1")
  p, k = x_rows.shape
  _, k_a, num_experts, rank = a.shape
  if k_a != k or table.block_m != tiles.block_m or p != table.row_token.shape[0]:
    raise ValueError(f"x_rows {x_rows.shape}, pool {a.shape}, table block_m={table.block_m}"
                     f" and tiles block_m={tiles.block_m} do not fit together")
  block_r = dot_block(rank)
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  gate_layer = layer if table.row_gate.shape[0] > 1 else jnp.zeros((1,), jnp.int32)
  return jt.triton_call(
      layer, gate_layer, table.tile_expert, x_rows, table.row_gate, a,
      kernel=_shrink_kernel,
      out_shape=jax.ShapeDtypeStruct((p, block_r), x_rows.dtype),
      grid=(table.tile_expert.shape[0],),
      num_warps=tiles.num_warps, num_stages=tiles.num_stages,
      K=k, P=p, E=num_experts, RANK=rank, SCALE=float(scale), BLOCK_M=tiles.block_m,
      BLOCK_K=tiles.block_k, BLOCK_R=block_r)


def triton_expand(h: jax.Array, b: jax.Array, layer: jax.Array | int, table: SegmentTable, *,
                  tiles: Tiles = Tiles()) -> jax.Array:
  """As `triton.segmented_expand` for one module: y_rows [P, N] in h's dtype."""
  _require()
  _, num_experts, rank, n = b.shape
  p = table.row_token.shape[0]
  if h.shape != (p, dot_block(rank)):
    raise ValueError(f"h has shape {h.shape}; expected {(p, dot_block(rank))} from triton_shrink")
  return jt.triton_call(
      jnp.asarray(layer, jnp.int32).reshape(1), table.tile_expert, h, b,
      kernel=_expand_kernel,
      out_shape=jax.ShapeDtypeStruct((p, n), h.dtype),
      grid=(table.tile_expert.shape[0], -(-n // tiles.block_n)),
      num_warps=tiles.num_warps, num_stages=tiles.num_stages,
      N=n, E=num_experts, RANK=rank, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
      BLOCK_R=dot_block(rank))


def triton_delta(x: jax.Array, a: jax.Array, b: jax.Array, layer: jax.Array | int,
                 table: SegmentTable, *, scale: float = 1.0,
                 tiles: Tiles = Tiles()) -> jax.Array:
  """As `triton.segmented_delta` for one module: [T, N] f32."""
  h = triton_shrink(gather_rows(x, table), a, layer, table, scale=scale, tiles=tiles)
  return combine(triton_expand(h, b, layer, table, tiles=tiles), table)
