"""RMSNorm on the Triton lowering of Pallas: one program per row, the whole row in one tile.

XLA runs a decode step's RMSNorm as two kernels (the sum of squares, then the normalising
multiply and the cast: `input_reduce_fusion` and `loop_convert_fusion`, 64 of each in a 7B
step); here it is one launch: each program loads its row once (masked past D), reduces it in
registers and writes the normalised row in the input's dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import with_output_buffer


@dataclasses.dataclass(frozen=True)
class Tiles:
  """num_warps: warps per program (one row of up to a few thousand features each)."""

  num_warps: int = 4


def _kernel(x_ref, w_ref, o_ref, *, block_d: int, eps: float):
  row = pl.program_id(0)
  dim = x_ref.shape[1]
  mask = jnp.arange(block_d) < dim
  x = plgpu.load(x_ref.at[row, pl.ds(0, block_d)], mask=mask, other=0.0).astype(jnp.float32)
  w = plgpu.load(w_ref.at[pl.ds(0, block_d)], mask=mask, other=0.0).astype(jnp.float32)
  # Masked columns load as zeros: they add nothing to the sum, which is divided by D itself.
  scale = jax.lax.rsqrt(jnp.sum(x * x) / dim + eps)
  plgpu.store(o_ref.at[row, pl.ds(0, block_d)], (x * scale * w).astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "tiles", "interpret"))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, tiles: Tiles = Tiles(),
             interpret: bool = False, out: jax.Array | None = None) -> jax.Array:
  """x [N, D], weight [D] -> [N, D] in x's dtype, computed in f32 (as `model.layers.rms_norm`).

  `out`: an optional preallocated output, written in place (tests poison it)."""
  n, dim = x.shape
  if weight.shape != (dim,):
    raise ValueError(f"weight has shape {weight.shape}, expected [{dim}] for x {x.shape}")
  operands, aliases = with_output_buffer((x, weight), out, (n, dim), x.dtype)
  kernel = functools.partial(_kernel, block_d=pl.next_power_of_2(dim), eps=eps)
  if out is not None:
    inner = kernel
    kernel = lambda x_ref, w_ref, _, o_ref: inner(x_ref, w_ref, o_ref)  # noqa: E731
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((n, dim), x.dtype),
      grid=(n,),
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps),
      interpret=interpret,
      name="rms_norm",
  )(*operands)
