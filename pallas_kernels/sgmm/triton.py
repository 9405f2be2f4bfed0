"""SGMM on the Triton lowering of Pallas: one launch rebuilds every adapted weight of every layer.

With pre-gating, a token's experts (and gates) are known before its forward pass, so they can be
merged into the backbone weights and the forward pass is a plain backbone pass. This module is
the merge: a segmented gather matmul (SGMM) that, for every adapted module m and layer l, writes

    W_m[l] = base_m[l] + Σ_j c[l, j] · A_m[l, :, e_j, :] @ B_m[l, e_j, :, :]

gathering the chosen experts e_j straight from the pools (no copy of them), in **one**
`pallas_call` for all modules and layers.

Two ways to use it (the caller chooses by what it passes as `base`):
- **rebuild** (the default of `adafuse_jax.paths.merged`): base = the pristine backbone W0, the
  entries are the new token's experts with coefficients (alpha / r) · g. Moves exactly the bytes
  of an in-place update (read W0, write W), and the merged weights are always W0 + ΔW_current
  rounded once: no drift, whatever the number of switches. Costs a second copy of the adapted
  weights in memory.
- **incremental** (`base=None`): W += Σ over [old experts with -c_old, new experts with +c_new],
  reading and writing W in place. Needs no second copy, but bf16 rounding accumulates with every
  switch (tests/test_sgmm.py measures both); use it only where memory forbids the rebuild.

Segments of different shapes. q/k/v/o/gate/up/down (and GQA's narrower k/v) differ in shape, so
the launch is a flat 1-D grid over the tiles of every segment (segment = one module's
`[L, in, out]` weight): module m owns the program ids `[start_m, start_m + L·tiles_m)`, which is a
static table, so each program picks its module with static `pl.when` branches and then decodes
(layer, row tile, column tile) from its local id. All segments share one tile shape; edges that
are not multiples of the tile are masked.

In place. The weights `W_m` are passed as inputs aliased to the outputs
(`input_output_aliases`); donated by the jitted decode step, no copy of them is made (checked
on the compiled HLO in tests/test_sgmm.py and tools/sgmm_bench.py).

No work when nothing changed: `changed` is a runtime flag; when it is false every program
returns at once without touching memory (a ~µs launch), and aliasing keeps the weights as they
were.

Inner loop. Each program owns a column strip of `block_n` columns and `row_steps` row tiles of
`block_m`: it loads the chosen experts' B slice `[k·r, block_n]` once and reuses it for every
row tile, so the expert bytes stay a few percent of the weight bytes moved.

Layouts follow the pools (`adafuse_jax.adapters.pool`): A `[L, in, E, r]`, B `[L, E, r, out]`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import dot_block
from pallas_kernels.sgmm.reference import check_operands


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile shape of the switch kernel and Triton launch settings (powers of two >= 16)."""

  block_m: int = 64
  block_n: int = 128
  row_steps: int = 4
  num_warps: int = 4
  num_stages: int = 2

  @classmethod
  def get_default(cls) -> "Tiles":
    """The fastest tiles of the H100 sweep (`tools/sgmm_bench.py`) for the 7B shapes."""
    return cls()


def _segment_tiles(shape: tuple[int, int, int], tiles: Tiles) -> tuple[int, int]:
  """(row strips, column tiles) per layer of one [L, in, out] segment."""
  _, d_in, d_out = shape
  return pl.cdiv(d_in, tiles.block_m * tiles.row_steps), pl.cdiv(d_out, tiles.block_n)


def _switch_kernel(experts_ref, coefs_ref, changed_ref, *refs, shapes, has_base, num_entries,
                   rank, block_r, tiles: Tiles, starts):
  """refs: per segment (base?, a, b, w_in) then per segment the output w (aliased to w_in)."""
  num_seg = len(shapes)
  per = 4 if has_base else 3
  ins, outs = refs[: per * num_seg], refs[per * num_seg:]
  pid = pl.program_id(0)
  changed = changed_ref[0] != 0
  bm, bn = tiles.block_m, tiles.block_n

  for s, (num_layers, d_in, d_out) in enumerate(shapes):
    seg = ins[per * s: per * (s + 1)]
    base_ref = seg[0] if has_base else seg[-1]
    a_ref, b_ref = seg[-3], seg[-2]
    o_ref = outs[s]
    strips, col_tiles = _segment_tiles(shapes[s], tiles)
    start, stop = starts[s], starts[s + 1]

    @pl.when(changed & (pid >= start) & (pid < stop))
    def _(base_ref=base_ref, a_ref=a_ref, b_ref=b_ref, o_ref=o_ref, start=start, d_in=d_in,
          d_out=d_out, strips=strips, col_tiles=col_tiles):
      local = pid - start
      layer = local // (strips * col_tiles)
      rem = local % (strips * col_tiles)
      strip, j = rem // col_tiles, rem % col_tiles
      cols = j * bn + jnp.arange(bn)
      col_mask = cols < d_out
      r_mask = jnp.arange(block_r) < rank
      # The chosen experts' B slices, loaded once per program and scaled by their coefficients.
      b_tiles = []
      for e in range(num_entries):
        expert = experts_ref[e]
        coef = coefs_ref[layer * num_entries + e]
        b = plgpu.load(b_ref.at[layer, expert, pl.ds(0, block_r), pl.ds(j * bn, bn)],
                       mask=r_mask[:, None] & col_mask[None, :], other=0.0)
        b_tiles.append((expert, (b.astype(jnp.float32) * coef).astype(b_ref.dtype)))

      def row_tile(t, carry):
        row0 = (strip * tiles.row_steps + t) * bm
        rows = row0 + jnp.arange(bm)
        mask = (rows < d_in)[:, None] & col_mask[None, :]
        acc = plgpu.load(base_ref.at[layer, pl.ds(row0, bm), pl.ds(j * bn, bn)], mask=mask,
                         other=0.0).astype(jnp.float32)
        for expert, b in b_tiles:
          a = plgpu.load(a_ref.at[layer, pl.ds(row0, bm), expert, pl.ds(0, block_r)],
                         mask=(rows < d_in)[:, None] & r_mask[None, :], other=0.0)
          acc += plgpu.dot(a.astype(b.dtype), b).astype(jnp.float32)
        plgpu.store(o_ref.at[layer, pl.ds(row0, bm), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype),
                    mask=mask)
        return carry

      jax.lax.fori_loop(0, tiles.row_steps, row_tile, 0)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"), donate_argnums=(0,))
def switch_weights(weights: Sequence[jax.Array], a_pools: Sequence[jax.Array],
                   b_pools: Sequence[jax.Array], experts: jax.Array, coefs: jax.Array,
                   changed: jax.Array | bool = True, base: Sequence[jax.Array] | None = None, *,
                   tiles: Tiles = Tiles(), interpret: bool = False
                   ) -> tuple[jax.Array, ...]:
  """Writes `W_m[l] = base_m[l] + Σ_j coefs[l, j] A_m[l, :, experts[j]] @ B_m[l, experts[j]]` for
  every segment m, in one launch, in place.

  Args:
    weights: per segment, the stacked weight `[L, in_m, out_m]` (donated; aliased to the output).
    a_pools: per segment, A `[L, in_m, E, r]`.
    b_pools: per segment, B `[L, E, r, out_m]`.
    experts: `[K]` int32 expert ids (rebuild: the k new ones; incremental: old then new).
    coefs: `[L, K]` f32 coefficients (gate times alpha / r; negative for removed experts).
    changed: when false, nothing is read or written and the weights come back as they were.
    base: per segment, the pristine `[L, in_m, out_m]` to rebuild from; None updates in place
      incrementally (`W += ...`, rounding accumulates: see the module docstring).
    tiles: the tile shape.
    interpret: run in the Pallas interpreter (CPU tests).
  Returns:
    the new weights, one per segment, same shapes and dtypes.
  """
  weights, a_pools, b_pools = tuple(weights), tuple(a_pools), tuple(b_pools)
  base = None if base is None else tuple(base)
  experts = jnp.asarray(experts, jnp.int32)
  coefs = jnp.asarray(coefs, jnp.float32)
  check_operands(weights, a_pools, b_pools, base, experts, coefs)
  shapes = tuple(w.shape for w in weights)
  rank = a_pools[0].shape[-1]
  block_r = dot_block(rank)
  counts = [s[0] * _segment_tiles(s, tiles)[0] * _segment_tiles(s, tiles)[1] for s in shapes]
  starts = tuple(itertools.accumulate(counts, initial=0))
  kernel = functools.partial(_switch_kernel, shapes=shapes, has_base=base is not None,
                             num_entries=experts.shape[0], rank=rank, block_r=block_r,
                             tiles=tiles, starts=starts)
  operands: list[jax.Array] = []
  aliases = {}
  for i, w in enumerate(weights):
    if base is not None:
      operands.append(base[i])
    operands += [a_pools[i], b_pools[i]]
    aliases[3 + len(operands)] = i
    operands.append(w)
  changed = jnp.asarray(changed).astype(jnp.int32).reshape(1)
  return tuple(pl.pallas_call(
      kernel,
      out_shape=tuple(jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights),
      grid=(starts[-1],),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      input_output_aliases=aliases,
      interpret=interpret,
      name="sgmm_switch",
  )(experts, coefs.reshape(-1), changed, *operands))
