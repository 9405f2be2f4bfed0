"""The fused adapter switch (`pallas_kernels.sgmm.triton`) written for Pallas' Mosaic GPU backend.

Same contract as `triton.switch_weights` in its rebuild form: for every segment m (one module's
stacked weight) and layer l, in one launch,

    W_m[l] = base_m[l] + Σ_j coefs[l, j] · A_m[l, :, e_j, :] @ B_m[l, e_j, :, :]

into the donated weights' memory. Why a second version: since
JAX 0.11 the Triton lowering of Pallas is deprecated and Mosaic GPU (Hopper and newer) is the
supported backend, with another kernel style: explicit TMA copies between global and shared
memory, and warpgroup matmuls (`wgmma`) that read their operands from swizzled shared memory.

Design. The chosen experts are gathered once per switch by XLA into contiguous operands,
`A_sel [L, in, K·r]` and `B_sel [L, K·r, out]` with the coefficients folded into B_sel (a few MB:
about 1% of the bytes the switch moves). Then every program of a flat 1-D grid owns one
`tile_m x tile_n` tile of one layer of one segment (a static table of program-id ranges, as in
the Triton kernel): it copies the A_sel row block, the B_sel column block and the base tile
into shared memory with TMA (out-of-bounds rows and columns read as zeros, and the store is
clipped, so shapes need not be multiples of the tiles), starts the accumulator from the base
tile, adds `A_sel @ B_sel` with one `wgmma`, and writes the tile back with TMA. Each program
moves one tile; many resident programs per SM overlap their copies.

In place without aliasing. `plgpu.kernel` (JAX 0.11 removed Mosaic GPU from `pl.pallas_call`)
takes no input/output aliases, but the rebuild never reads the current weights: in the jitted,
donating caller XLA assigns each output to the donated weights' buffer (the HLO check of
`tools/sgmm_bench.py --mosaic` counts weight-sized copies). The incremental form, which reads W,
stays with the Triton kernel.

Limits of this version: bf16 or f16 weights with a multiple of 64 columns (TMA copies whole
128-byte groups into swizzled tiles; rows are free), K·r a multiple of 16 up to 64 (one
swizzled operand row), no in-kernel `changed` flag (the wrapper skips the launch with
`lax.cond`); `unsupported` says which limit a call breaks. GPU only: the
Pallas interpreter does not run Mosaic GPU kernels, so CPU tests lower it for CUDA (which
type-checks the kernel) and GPU tests compare it with the reference of `sgmm.reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sgmm.reference import check_operands


MAX_EXPERT_COLUMNS = 64


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The output tile of one program: tile_m x tile_n, multiples of 64."""

  tile_m: int = 64
  tile_n: int = 256

  @classmethod
  def get_default(cls) -> "Tiles":
    """The fastest tiles of `tools/sgmm_bench.py --mosaic` on the H100."""
    return cls()


def _swizzled(shape: tuple[int, int], dtype, swizzle: int | None = None) -> plgpu.SMEM:
  """A shared-memory operand of `wgmma` in the layout it reads: 8-row tiles of one swizzle width
  (the widest the rows allow, unless given: both operands of a `wgmma` need the same)."""
  if swizzle is None:
    swizzle = plgpu.find_swizzle(shape[1] * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                              plgpu.SwizzleTransform(swizzle)))


def _kernel(*refs, shapes, starts, tile_m: int, tile_n: int):
  """refs: per segment (a_sel, b_sel, base) in global memory, per segment the output, then the
  scratch (a_smem, b_smem, w_smem, barrier)."""
  num_seg = len(shapes)
  ins, outs = refs[: 3 * num_seg], refs[3 * num_seg: 4 * num_seg]
  a_smem, b_smem, w_smem, barrier = refs[4 * num_seg:]
  pid = jax.lax.axis_index("tiles")
  for s, (_, d_in, d_out) in enumerate(shapes):
    a_ref, b_ref, src_ref = ins[3 * s: 3 * s + 3]
    o_ref = outs[s]
    row_tiles, col_tiles = pl.cdiv(d_in, tile_m), pl.cdiv(d_out, tile_n)

    @pl.when((pid >= starts[s]) & (pid < starts[s + 1]))
    def _(a_ref=a_ref, b_ref=b_ref, src_ref=src_ref, o_ref=o_ref, start=starts[s],
          row_tiles=row_tiles, col_tiles=col_tiles):
      local = pid - start
      layer = local // (row_tiles * col_tiles)
      rem = local % (row_tiles * col_tiles)
      rows = pl.ds((rem // col_tiles) * tile_m, tile_m)
      cols = pl.ds((rem % col_tiles) * tile_n, tile_n)
      plgpu.copy_gmem_to_smem(a_ref.at[layer, rows, :], a_smem, barrier)
      plgpu.copy_gmem_to_smem(b_ref.at[layer, :, cols], b_smem, barrier)
      plgpu.copy_gmem_to_smem(src_ref.at[layer, rows, cols], w_smem, barrier)
      plgpu.barrier_wait(barrier)

      def accumulate(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        plgpu.wgmma_wait(0)

      base = plgpu.load(w_smem.at[...], (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
      acc = pl.run_state(accumulate)(plgpu.ACC.init(base))
      w_smem[...] = acc.astype(w_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(w_smem, o_ref.at[layer, rows, cols])
      plgpu.wait_smem_to_gmem(0)


def unsupported(weights: Sequence[jax.Array], expert_columns: int) -> str | None:
  """Why this kernel cannot switch these weights (None if it can): the limits of the module
  docstring, checked before tracing so that callers can fall back to the Triton kernel."""
  dtype = weights[0].dtype
  if dtype not in (jnp.bfloat16, jnp.float16) or any(w.dtype != dtype for w in weights):
    return (f"the Mosaic GPU switch takes bf16 or f16 weights of one dtype, got"
            f" {sorted({str(w.dtype) for w in weights})}")
  if expert_columns % 16 or expert_columns > MAX_EXPERT_COLUMNS:
    return (f"K·r = {expert_columns} expert columns; this version takes a multiple of 16 up to"
            f" {MAX_EXPERT_COLUMNS}")
  group = 128 // dtype.itemsize
  for w in weights:  # TMA into swizzled tiles: whole 128-byte column groups
    if w.shape[-1] % group:
      return (f"weight {w.shape}: {w.shape[-1]} columns are not a multiple of {group} (TMA copies"
              " whole 128-byte groups into the swizzled tiles)")
  return None


def gather_experts(a_pool: jax.Array, b_pool: jax.Array, experts: jax.Array, coefs: jax.Array,
                   dtype) -> tuple[jax.Array, jax.Array]:
  """The chosen experts as contiguous operands: A_sel [L, in, K·r], B_sel [L, K·r, out] with
  coefs [L, K] folded into B_sel (in `dtype`)."""
  num_layers, d_in = a_pool.shape[:2]
  a = jnp.take(a_pool, experts, axis=2).reshape(num_layers, d_in, -1)
  b = jnp.take(b_pool, experts, axis=1).astype(jnp.float32) * coefs[:, :, None, None]
  return a.astype(dtype), b.reshape(num_layers, -1, b_pool.shape[-1]).astype(dtype)


@functools.partial(jax.jit, static_argnames=("tiles",), donate_argnums=(0,))
def switch_weights_mosaic(weights: Sequence[jax.Array], a_pools: Sequence[jax.Array],
                          b_pools: Sequence[jax.Array], experts: jax.Array, coefs: jax.Array,
                          changed: jax.Array | bool = True,
                          base: Sequence[jax.Array] | None = None, *,
                          tiles: Tiles = Tiles()) -> tuple[jax.Array, ...]:
  """`triton.switch_weights` (rebuild form) on Mosaic GPU; see the module docstring.

  Args:
    weights: per segment, the stacked weight `[L, in_m, out_m]` (donated; not read).
    a_pools, b_pools: per segment, A `[L, in_m, E, r]` and B `[L, E, r, out_m]`.
    experts: `[K]` int32 expert ids; coefs: `[L, K]` f32 coefficients (gate x alpha / r).
    changed: when false the launch is skipped and the weights come back as they were.
    base: per segment, the pristine weight to rebuild from (required).
    tiles: the output tile of one program (`Tiles`).
  Returns:
    the new weights, one per segment.
  """
  weights, a_pools, b_pools = tuple(weights), tuple(a_pools), tuple(b_pools)
  experts = jnp.asarray(experts, jnp.int32)
  coefs = jnp.asarray(coefs, jnp.float32)
  if base is None:
    raise ValueError("the Mosaic GPU switch rebuilds from a pristine base (pass base=); the"
                     " incremental update is sgmm.switch_weights")
  base = tuple(base)
  check_operands(weights, a_pools, b_pools, base, experts, coefs)
  cols = experts.shape[0] * a_pools[0].shape[-1]
  reason = unsupported(weights, cols)
  if reason is not None:
    raise ValueError(f"{reason}; use backend 'triton'")
  dtype = weights[0].dtype
  tile_m, tile_n = tiles.tile_m, tiles.tile_n
  if tile_m % 64 or tile_n % 64:
    raise ValueError(f"tiles {tile_m}x{tile_n}: both must be multiples of 64")
  # A_sel's rows are K·r wide: its swizzle, which B_sel's tiles must share.
  swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
  shapes = tuple(w.shape for w in weights)
  counts = [s[0] * pl.cdiv(s[1], tile_m) * pl.cdiv(s[2], tile_n) for s in shapes]
  starts = tuple(itertools.accumulate(counts, initial=0))

  def launch(ws):
    del ws  # rebuilt from base, never read: XLA gives the outputs the donated weights' buffers
    operands = []
    for i in range(len(shapes)):
      operands += gather_experts(a_pools[i], b_pools[i], experts, coefs, dtype)
      operands.append(base[i])
    kernel = functools.partial(_kernel, shapes=shapes, starts=starts, tile_m=tile_m,
                               tile_n=tile_n)
    return tuple(plgpu.kernel(
        kernel,
        out_type=tuple(jax.ShapeDtypeStruct(s, dtype) for s in shapes),
        scratch_types=[_swizzled((tile_m, cols), dtype, swizzle),
                       _swizzled((cols, tile_n), dtype, swizzle),
                       _swizzled((tile_m, tile_n), dtype), plgpu.Barrier(num_arrivals=3)],
        grid=(starts[-1],),
        grid_names=("tiles",),
    )(*operands))

  return jax.lax.cond(jnp.asarray(changed), launch, lambda ws: ws, weights)
