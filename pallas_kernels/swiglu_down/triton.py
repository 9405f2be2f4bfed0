"""The SwiGLU down projection on the Triton lowering of Pallas, the activation (and the gate and
up projections' expert delta) computed in the matmul's prologue.

At batch-1 decode XLA runs a Llama MLP's tail as separate kernels: with pre-gated experts the
gate/up expansion (a reduction over E·r per output, ~5.6 MB of B for the 7B shape), SwiGLU's
multiply, then the down GEMM. Here it is one launch. The grid is (K chunk, column part, row):
each program owns `block_k` of the I inputs of the down matrix, computes their activations
once (gate and up from the fused gate/up matmul's output, plus each one's expansion
`(h ⊙ gates) @ B^T` over the chunk's rows of B), then streams its chunk's rows of W over its
part of the columns, writing one f32 partial sum per chunk; the entry point adds the chunks'
partials (XLA fuses that sum into whatever reads the result).

The chunks split the reduction so that a one-row GEMV spreads over the SMs, and each chunk's
activations are computed by `parts` programs only (the B rows they read are the chunk's own:
no program reads another chunk's B).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import with_output_buffer
from pallas_kernels.swiglu_down.reference import LowRank


@dataclasses.dataclass(frozen=True)
class Tiles:
  """block_k: inputs (rows of W) per chunk; block_n: columns per step of a program's loop;
  parts: programs per chunk, each over 1/parts of the columns."""

  block_k: int = 128
  block_n: int = 64
  parts: int = 4
  num_warps: int = 4
  num_stages: int = 3


def _kernel(*refs, inter: int, rank: int, shrink_at: int, block_k: int, block_n: int,
            steps: int, block_r: int, low_rank: bool, shared_gates: bool, layer: int | None):
  if low_rank:
    gu_ref, g_ref, bt_ref, w_ref, o_ref = refs
  else:
    gu_ref, w_ref, o_ref = refs
  s, p, row = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  # Stacked weights are read in place at their layer (a slice handed to a kernel is a copy);
  # indices are traced values: the loads take no Python int beside the program ids.
  at = () if layer is None else (jnp.int32(layer),)
  cols_total = w_ref.shape[-1]
  k0 = s * block_k
  k_mask = k0 + jnp.arange(block_k) < inter
  halves = []
  for module in range(2):  # gate, then up
    x = plgpu.load(gu_ref.at[row, pl.ds(module * inter + k0, block_k)], mask=k_mask, other=0.0)
    if low_rank:
      r_mask = jnp.arange(block_r) < rank
      # A traced start: the tile may run past gu's last column (masked), which a static start
      # may not.
      h = plgpu.load(gu_ref.at[row, pl.ds(jnp.int32(shrink_at + module * rank), block_r)],
                     mask=r_mask, other=0.0)
      g = plgpu.load(g_ref.at[row, jnp.int32(0 if shared_gates else module), pl.ds(0, block_r)],
                     mask=r_mask, other=0.0)
      # The gated shrink rounded to B's dtype, the products summed in f32: as the library's
      # expansion (`paths.packed.expand`) does.
      hg = (h.astype(jnp.float32) * g).astype(bt_ref.dtype).astype(jnp.float32)
      b = plgpu.load(bt_ref.at[*at, jnp.int32(module), pl.ds(k0, block_k), pl.ds(0, block_r)],
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
      delta = jnp.sum(b.astype(jnp.float32) * hg[None, :], axis=1)
      x = (x.astype(jnp.float32) + delta).astype(gu_ref.dtype)
    halves.append(x.astype(jnp.float32))
  gate, up = halves
  # Rows past I load as zeros: silu(0) · 0 = 0, and their W rows load as zeros too.
  act = (gate / (1.0 + jnp.exp(-gate)) * up).astype(w_ref.dtype).astype(jnp.float32)

  def body(t, carry):
    col0 = (p * steps + t) * block_n
    c_mask = col0 + jnp.arange(block_n) < cols_total
    w = plgpu.load(w_ref.at[*at, pl.ds(k0, block_k), pl.ds(col0, block_n)],
                   mask=k_mask[:, None] & c_mask[None, :], other=0.0)
    y = jnp.sum(act[:, None] * w.astype(jnp.float32), axis=0)
    plgpu.store(o_ref.at[s, row, pl.ds(col0, block_n)], y, mask=c_mask)
    return carry

  jax.lax.fori_loop(0, steps, body, 0)


def plan(inter: int, cols: int, tiles: Tiles) -> tuple[int, int]:
  """(chunks, column steps per program) of a call."""
  steps = pl.cdiv(pl.cdiv(cols, tiles.block_n), tiles.parts)
  return pl.cdiv(inter, tiles.block_k), steps


@functools.partial(jax.jit, static_argnames=("inter", "shrink_at", "layer", "tiles",
                                             "interpret"))
def swiglu_down_partials(gu: jax.Array, w: jax.Array, inter: int,
                         low_rank: LowRank | None = None, *, shrink_at: int | None = None,
                         layer: int | None = None, tiles: Tiles = Tiles(),
                         interpret: bool = False, out: jax.Array | None = None) -> jax.Array:
  """Each chunk's partial sum of `silu(gate) · up @ W`.

  Args:
    gu: [N, G >= 2I] the fused gate/up matmul's output (gate's I columns, then up's; with
      `low_rank`, the modules' shrink too, R columns each from `shrink_at`).
    w: [I, C] the down matrix (any columns appended to it, such as its experts' A, ride along),
      or [L, I, C] read at `layer`.
    inter: I, the MLP's hidden width.
    low_rank: the gate and up modules' expert delta (`reference.LowRank`; its B stacked over
      layers as w is), or None.
    shrink_at: the first shrink column of gu (default 2I, where the packed layout puts it).
    layer: the layer of stacked w and B, read in place; None for per-layer arrays.
    out: optional preallocated [chunks, N, C] f32 output, written in place (tests poison it).
  Returns:
    [chunks, N, C] f32; their sum over the first axis is the product.
  """
  n, width = gu.shape
  stacked = layer is not None
  if w.ndim != 2 + stacked or w.shape[-2] != inter or width < 2 * inter:
    raise ValueError(f"gu {gu.shape}, w {w.shape}, inter {inter}, layer {layer}: expected gu"
                     " [N, >= 2 * I] and w [I, C] (or [L, I, C] with a layer)")
  cols = w.shape[-1]
  shrink_at = 2 * inter if shrink_at is None else shrink_at
  operands: tuple = (gu,)
  rank, shared = 0, True
  if low_rank is not None:
    gates, b_t = low_rank
    rank = b_t.shape[-1]
    if (b_t.ndim != 3 + stacked or b_t.shape[-3:] != (2, inter, rank) or gates.ndim != 3
        or gates.shape[0] != n or gates.shape[1] not in (1, 2) or gates.shape[2] != rank
        or shrink_at + 2 * rank > width):
      raise ValueError(f"low_rank gates {gates.shape}, b_t {b_t.shape}, gu {gu.shape}: expected"
                       f" gates [{n}, 1 or 2, R], b_t [2, {inter}, R] (or [L, ...] with a layer)"
                       f" and gu holding 2R shrink columns from column {shrink_at}")
    shared = gates.shape[1] == 1
    operands += (gates.astype(jnp.float32), b_t)
  chunks, steps = plan(inter, cols, tiles)
  shape = (chunks, n, cols)
  operands, aliases = with_output_buffer(operands + (w,), out, shape, jnp.float32)
  kernel = functools.partial(_kernel, inter=inter, rank=rank, shrink_at=shrink_at,
                             block_k=tiles.block_k, block_n=tiles.block_n, steps=steps,
                             block_r=max(16, pl.next_power_of_2(max(rank, 1))),
                             low_rank=low_rank is not None, shared_gates=shared, layer=layer)
  if out is not None:
    inner = kernel
    kernel = lambda *refs: inner(*refs[:-2], refs[-1])  # noqa: E731  (the aliased input unread)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
      grid=(chunks, tiles.parts, n),
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="swiglu_down",
  )(*operands)


def swiglu_down(gu: jax.Array, w: jax.Array, inter: int, low_rank: LowRank | None = None, *,
                shrink_at: int | None = None, layer: int | None = None, tiles: Tiles = Tiles(),
                interpret: bool = False) -> jax.Array:
  """`silu(gate) · up @ W` with gate and up (and their expert delta) from `gu`: [N, C] f32
  (see `swiglu_down_partials`)."""
  return swiglu_down_partials(gu, w, inter, low_rank, shrink_at=shrink_at, layer=layer,
                              tiles=tiles, interpret=interpret).sum(0)
