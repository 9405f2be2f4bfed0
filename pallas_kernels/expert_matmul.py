"""Fused expert matmul for decode: y = x @ W[l] + (h ⊙ g) @ B[l], one kernel per linear module.

The dynamic adapter's per-token cost at batch-1 decode is not bandwidth (two rank-16 experts
add ~1% to the bytes read) but kernel launches: in plain XLA every adapted module adds a
shrink, an expansion and an add, and the H100 sits idle between them
(docs/benchmarks/h100/kernels_pregated.md). This kernel folds the expansion into the base
matrix-vector product: each program owns a tile of output columns, streams its slice of `W[l]`
once, and finishes with one more small dot against its slice of the experts' B, scaled by the
per-column gates g (each expert's gate repeated over its r columns, the LoRA scale folded in;
zero for experts a token did not choose). Only the shrink `h = x @ A` (K x E·r, ~1% of W)
stays outside, as one XLA matmul; with pre-gating g is computed once per step for all layers.

Layout: the weights stay stacked, `W: [L, K, N]`, `B: [L, R, N]` with R = E·r (a free reshape of
the pool's `[L, E, r, N]`), and the layer arrives as a runtime scalar: no slice of the stacked
weight is materialised, and one compiled kernel serves every layer of a module shape.

Shapes need not be multiples of the tiles: every load and store is masked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (powers of two) and Triton launch settings."""

  block_m: int = 16
  block_n: int = 64
  block_k: int = 256
  num_warps: int = 4
  num_stages: int = 3

  @classmethod
  def get_default(cls, m: int, n: int, k: int) -> "Tiles":
    del k
    # Batch-1 decode is a matrix-vector product: many narrow column tiles keep every SM busy.
    block_n = 32 if n <= 4096 else 64
    return cls(block_m=16 if m <= 16 else 32, block_n=block_n)


def _kernel(layer_ref,  # [1] int32
            x_ref,      # [M, K]
            w_ref,      # [L, K, N]
            h_ref,      # [M, R] f32 shrink x @ A
            g_ref,      # [M, R] f32 per-column gates
            b_ref,      # [L, R, N]
            *out_refs,  # ([M, N] aliased input,) [M, N] output
            block_m: int, block_n: int, block_k: int, block_r: int):
  o_ref = out_refs[-1]
  m_total = x_ref.shape[0]
  n_total = o_ref.shape[1]
  r_total = h_ref.shape[1]
  i, j = pl.program_id(0), pl.program_id(1)
  layer = layer_ref[0]
  rows = i * block_m + jnp.arange(block_m)
  cols = j * block_n + jnp.arange(block_n)
  row_mask, col_mask = rows < m_total, cols < n_total

  acc = base_tile(x_ref, w_ref, layer, i * block_m, j * block_n, row_mask, col_mask,
                  block_m=block_m, block_n=block_n, block_k=block_k)
  r_mask = jnp.arange(block_r) < r_total
  hr_mask = row_mask[:, None] & r_mask[None, :]
  h = plgpu.load(h_ref.at[pl.ds(i * block_m, block_m), pl.ds(0, block_r)], mask=hr_mask, other=0.0)
  g = plgpu.load(g_ref.at[pl.ds(i * block_m, block_m), pl.ds(0, block_r)], mask=hr_mask, other=0.0)
  h = h.astype(jnp.float32) * g.astype(jnp.float32)
  b = plgpu.load(b_ref.at[layer, pl.ds(0, block_r), pl.ds(j * block_n, block_n)],
                 mask=r_mask[:, None] & col_mask[None, :], other=0.0)
  acc = acc + plgpu.dot(h.astype(b.dtype), b).astype(jnp.float32)
  plgpu.store(o_ref.at[pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)],
              acc.astype(o_ref.dtype), mask=row_mask[:, None] & col_mask[None, :])


def dot_block(n: int) -> int:
  """A block dimension covering n: a power of two, at least 16 (Triton's smallest dot)."""
  return max(16, pl.next_power_of_2(n))


def with_output_buffer(operands: tuple, out: jax.Array | None, shape: tuple[int, ...],
                       dtype) -> tuple[tuple, dict[int, int]]:
  """(operands, input_output_aliases) of a pallas_call whose single output of `shape`/`dtype` is
  written into `out` when one is given (appended as the last operand and aliased to output 0,
  so a caller can fill one preallocated buffer); checks that `out` fits."""
  if out is None:
    return operands, {}
  if out.shape != tuple(shape) or out.dtype != dtype:
    raise ValueError(f"out must be {tuple(shape)} {jnp.dtype(dtype)}, got {out.shape} {out.dtype}")
  return operands + (out,), {len(operands): 0}


def base_tile(x_ref, w_ref, layer, row0, col0, row_mask, col_mask, *, block_m: int,
              block_n: int, block_k: int) -> jax.Array:
  """Inside a kernel: the f32 tile `x[row0:+block_m] @ w[layer][:, col0:+block_n]`, streaming the
  K dimension in `block_k` steps with masked loads (shared by the fused kernels)."""
  k_total = x_ref.shape[1]

  def body(kb, acc):
    k_mask = kb * block_k + jnp.arange(block_k) < k_total
    x = plgpu.load(x_ref.at[pl.ds(row0, block_m), pl.ds(kb * block_k, block_k)],
                   mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    # One indexer per load (layer, rows, cols): the Triton lowering takes no chained views.
    w = plgpu.load(w_ref.at[layer, pl.ds(kb * block_k, block_k), pl.ds(col0, block_n)],
                   mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    return acc + plgpu.dot(x, w).astype(jnp.float32)

  return jax.lax.fori_loop(0, pl.cdiv(k_total, block_k), body,
                           jnp.zeros((block_m, block_n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def fused_expert_matmul(x: jax.Array, w: jax.Array, layer: jax.Array | int, h: jax.Array,
                        g: jax.Array, b: jax.Array, *, out: jax.Array | None = None,
                        tiles: Tiles | None = None, interpret: bool = False) -> jax.Array:
  """y = x @ w[layer] + (h ⊙ g) @ b[layer].

  Args:
    x: [M, K] activations (M = tokens in the step; padded to tiles internally by masking).
    w: [L, K, N] stacked base weights.
    layer: which layer (a Python int or an int32 scalar; not a compile-time constant).
    h: [M, R] shrink activations `x @ A[layer]` (f32 is best), R = E·r (any R; padded to a
      power of two >= 16 by masking).
    g: [M, R] per-column gates (f32): expert e's gate over its r columns, times alpha / r.
    b: [L, R, N] stacked expansion factors.
    out: optional [M, N] buffer the result is written into (aliased; tests pass one filled
      with NaN to prove every element is written).
    tiles: tile sizes; `Tiles.get_default` when None.
    interpret: run the kernel in the Pallas interpreter (CPU tests).
  Returns:
    [M, N] in x's dtype, accumulated in f32.
  """
  m, k = x.shape
  num_layers, k_w, n = w.shape
  r = h.shape[1]
  if k_w != k:
    raise ValueError(f"x has K={k} but w has K={k_w}")
  if b.shape != (num_layers, r, n):
    raise ValueError(f"b has shape {b.shape}, expected {(num_layers, r, n)} from w and h")
  if h.shape[0] != m:
    raise ValueError(f"h has {h.shape[0]} rows, x has {m}")
  if g.shape != h.shape:
    raise ValueError(f"g has shape {g.shape}, h has {h.shape}: one gate per shrink column")
  if x.dtype != w.dtype:
    # Triton's dot takes one element type; a silent upcast would double the bytes read.
    raise ValueError(f"dtypes must match: x {x.dtype} vs w {w.dtype}; cast the activations to"
                     " the weights' dtype")
  tiles = tiles or Tiles.get_default(m, n, k)
  block_r = dot_block(r)
  kernel = functools.partial(_kernel, block_m=tiles.block_m, block_n=tiles.block_n,
                             block_k=tiles.block_k, block_r=block_r)
  layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
  operands, aliases = with_output_buffer((layer_arr, x, w, h, g, b), out, (m, n), x.dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(pl.cdiv(m, tiles.block_m), pl.cdiv(n, tiles.block_n)),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      input_output_aliases=aliases,
      interpret=interpret,
      name="fused_expert_matmul",
  )(*operands)


def fused_expert_matmul_reference(x, w, layer, h, g, b):
  """Plain jnp, upcast to f32: x @ w[layer] + (h ⊙ g) @ b[layer]."""
  f32 = jnp.float32
  return x.astype(f32) @ w[layer].astype(f32) + (h.astype(f32) * g.astype(f32)) @ b[layer].astype(f32)
