"""BGMV on Pallas' Triton lowering: the gathered shrink; the expansion fused into the base or alone.

The op (see `pallas_kernels.bgmv`): a decode step of N tokens with top-k routing touches at most
`U = min(E, N·k)` distinct experts, and only those are read. Three kernels, with the step's
*active set* (`reference.active_experts`) as the segment table:

- `gathered_shrink` (one launch per group of modules that read the same input: q/k/v, gate/up):
  `h[g, s, :, u·r:(u+1)·r] = scale · G[:, u] ⊙ (x @ A_g[l][:, ids[u], :])` over the s-th slice of
  the input dimension. Programs of inactive slots (u ≥ count) write zeros and read nothing. When
  there are few active experts the input dimension is split over S programs (partial sums, added
  by the expand kernel), so that a batch-1 step still spreads over enough SMs.
- `gathered_expand_matmul` (one launch per module, replacing its base matmul):
  `y = x @ W[l] + Σ_{u < count} (Σ_s h[g, s, :, u]) @ B[l, ids[u]]`. Each program streams its
  column strip of `W[l]` once and then only the active experts' B tiles: a dynamic-length loop over
  `count`, so fewer distinct experts (SERE) means fewer bytes.
- `gathered_expand` (one launch per module, beside a base matmul run elsewhere): the same sum of
  the active experts' B tiles without the base, its slots split over P parts per column strip
  (f32 partials added after), for pools so wide that the base GEMM is better left to XLA.

Layouts are the pools': A `[L, in, E, r]`, B `[L, E, r, out]`, W stacked `[L, in, out]`, and the
layer is a runtime scalar: no slice or gather of the pools is ever materialised. Ranks that are
not powers of two are padded to one (>= 16, Triton's smallest dot) by masking; so are all other
edges.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import base_tile, dot_block, with_output_buffer, with_output_buffers


# Shared memory the streamed tiles may take per program: the H100 allows 227 KiB per block;
# the rest is left to the tiles loaded once (h, B) and to Triton's own scratch.
SHARED_MEMORY_BUDGET = 200 * 1024


SLOT_LOOPS = ("load", "registers", "static")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes (powers of two) and Triton launch settings.

  block_n: output columns per expand program; block_k: the reduction step of both kernels;
  shrink_k: input rows per shrink program (a multiple of block_k); min_programs: the shrink splits
  the input dimension until it has about this many programs; slot_loop (`gathered_expand`
  only), how a program walks its share of the slots: "load" a loop of runtime length over the
  active slots that loads each slot's id from memory before its B tile; "registers" (default)
  the same loop with the ids loaded once into registers (no load in it waits on another);
  "static" a loop of static length over every slot, the ids in registers and the slots past
  `count` masked. slot_unroll (`gathered_expand` only): slots a trip of that loop takes, their
  tiles all loaded before the first product, so that this many B tiles are in flight whatever
  Triton's pipelining of the loop does (the last trip's extra slots masked).
  """

  block_n: int = 64
  block_k: int = 256
  shrink_k: int = 512
  min_programs: int = 96
  num_warps: int = 4
  num_stages: int = 3
  # "registers": 5% off the whole 64 x rank-64 SERE step against "load", the static loop 31%
  # slower; 2 or 3 slots per trip 4% and 8% slower than 1 (tools/gathered_probe.py,
  # docs/benchmarks/h200/gathered-probe/).
  slot_loop: str = "registers"
  slot_unroll: int = 1

  def __post_init__(self):
    if self.slot_loop not in SLOT_LOOPS:
      raise ValueError(f"slot_loop={self.slot_loop!r}; expected one of {SLOT_LOOPS}")
    if not 1 <= self.slot_unroll <= 8:
      raise ValueError(f"slot_unroll={self.slot_unroll}; expected 1 to 8 slots per trip")

  @classmethod
  def get_default(cls, rows: int, d_in: int, d_out: int, itemsize: int = 2) -> "Tiles":
    """Defaults per decode shape: the fastest tiles of the H100 sweep
    (`python tools/bgmv_tile_sweep.py`, H100) for the Llama-2-7B module
    shapes at batch 1 (2 active experts) and batch 32 (8 active), by the nearest case, with
    the pipeline cut to fit shared memory (`fit_shared_memory`) for more rows."""
    tiles = cls._swept(rows, d_in, d_out)
    return tiles.fit_shared_memory(dot_block(rows), tiles.block_n, itemsize)

  def fit_shared_memory(self, block_m: int, cols: int, itemsize: int,
                        budget: int = SHARED_MEMORY_BUDGET) -> "Tiles":
    """Fewer pipeline stages (down to 2), then a shorter K step, until the streamed tiles of
    every stage, x [block_m, block_k] and the weight's [block_k, cols], fit `budget` bytes.
    Batch 64 with the batch-32 tiles asked for 256 KiB on the H100 (227 KiB available) and
    failed to compile."""
    tiles = self
    while tiles.num_stages * tiles.block_k * (block_m + cols) * itemsize > budget:
      if tiles.num_stages > 2:
        tiles = dataclasses.replace(tiles, num_stages=tiles.num_stages - 1)
      elif tiles.block_k > 32:
        tiles = dataclasses.replace(tiles, block_k=tiles.block_k // 2)
      else:
        break
    return tiles

  @classmethod
  def _swept(cls, rows: int, d_in: int, d_out: int) -> "Tiles":
    wide_out, wide_in = d_out > d_in, d_in > d_out
    if rows <= 16:
      if wide_out:    # gate/up
        return cls(block_n=64, block_k=128, num_warps=2, num_stages=3)
      if wide_in:     # down
        return cls(block_n=32, block_k=256, num_warps=2, num_stages=4)
      return cls(block_n=32, block_k=512, num_warps=2, num_stages=3)  # q/k/v/o
    if wide_out:
      return cls(block_n=32, block_k=128, num_warps=2, num_stages=3)
    if wide_in:
      return cls(block_n=64, block_k=256, num_warps=4, num_stages=4)
    return cls(block_n=32, block_k=256, num_warps=4, num_stages=4)


def shrink_splits(d_in: int, groups: int, slots: int, tiles: Tiles) -> int:
  """S, how many programs share one (module, slot)'s input dimension."""
  most = pl.cdiv(d_in, tiles.shrink_k)
  want = max(1, min(most, pl.cdiv(tiles.min_programs, groups * slots)))
  # A power of two, so that the expand kernel can load all partial sums as one block.
  return 1 << (want.bit_length() - 1)


def _shrink_kernel(layer_ref, gate_layer_ref, ids_ref, count_ref, x_ref, g_ref, *refs,
                   groups: int, rank: int, block_m: int, block_r: int, block_k: int,
                   k_per_split: int, scale: float):
  a_refs, h_ref = refs[:groups], refs[groups]
  gi, u, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m_total, k_total = x_ref.shape
  rows = jnp.arange(block_m)
  row_mask = rows < m_total
  r_mask = jnp.arange(block_r) < rank
  # h has exactly block_m rows and U·block_r columns: every store is a whole, unmasked tile
  # (rows past M hold zeros: their x rows load as zeros).
  out = h_ref.at[gi, s, pl.ds(0, block_m), pl.ds(u * block_r, block_r)]
  active = u < count_ref[0]

  @pl.when(jnp.logical_not(active))
  def _():
    plgpu.store(out, jnp.zeros((block_m, block_r), h_ref.dtype))

  for g in range(groups):
    @pl.when(active & (gi == g))
    def _(a_ref=a_refs[g]):
      layer, expert = layer_ref[0], ids_ref[u]
      k0 = s * k_per_split

      def body(t, acc):
        ks = k0 + t * block_k + jnp.arange(block_k)
        k_mask = ks < k_total  # k_per_split is a multiple of block_k: no overlap
        x = plgpu.load(x_ref.at[pl.ds(0, block_m), pl.ds(k0 + t * block_k, block_k)],
                       mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a = plgpu.load(a_ref.at[layer, pl.ds(k0 + t * block_k, block_k), expert,
                                pl.ds(0, block_r)],
                       mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        return acc + plgpu.dot(x, a.astype(x.dtype)).astype(jnp.float32)

      acc = jax.lax.fori_loop(0, k_per_split // block_k, body,
                              jnp.zeros((block_m, block_r), jnp.float32))
      gate = plgpu.load(g_ref.at[gate_layer_ref[0], pl.ds(0, block_m), u], mask=row_mask,
                        other=0.0)
      acc = acc * (gate.astype(jnp.float32) * scale)[:, None]
      plgpu.store(out, acc.astype(h_ref.dtype))


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret"))
def gathered_shrink(x: jax.Array, a_pools: Sequence[jax.Array], layer: jax.Array | int,
                    ids: jax.Array, count: jax.Array, gmat: jax.Array, *, scale: float = 1.0,
                    tiles: Tiles = Tiles(), interpret: bool = False) -> jax.Array:
  """Gated shrink of the active experts for modules that read the same input, in one launch.

  Args:
    x: [M, K] the modules' shared input (M <= 64: decode rows).
    a_pools: G pools A [L, K, E, r] (same K, E and r).
    layer: which layer (runtime scalar).
    ids, count, gmat: from `active_experts` (gmat [Lg, M, U]).
    scale: the LoRA scale alpha / r, folded in.
  Returns:
    h [G, S, M', U·r'] (M' = rows padded to >= 16, r' = rank padded to a power of two >= 16):
    partial sums over S slices of K; f32 when S > 1, else x's dtype.
  """
  a_pools = tuple(a_pools)
  m, k = x.shape
  num_layers, k_a, num_experts, rank = a_pools[0].shape
  u = ids.shape[0]
  for i, a in enumerate(a_pools):
    if a.shape != a_pools[0].shape:
      raise ValueError(f"pool {i} has shape {a.shape}; a group shares {a_pools[0].shape}")
  if k_a != k:
    raise ValueError(f"x has K={k} but the pools have K={k_a}")
  if gmat.shape[1:] != (m, u) or gmat.shape[0] not in (1, num_layers):
    raise ValueError(f"gmat has shape {gmat.shape}, expected [1 or {num_layers}, {m}, {u}]")
  if m > 64:
    raise ValueError(f"{m} rows: the gathered kernels are for decode steps (<= 64 rows)")
  groups = len(a_pools)
  block_m, block_r = dot_block(m), dot_block(rank)
  tiles = tiles.fit_shared_memory(block_m, block_r, x.dtype.itemsize)
  splits = shrink_splits(k, groups, u, tiles)
  # Programs whose slice starts past K (possible when S is rounded) load zeros and write zeros.
  k_per_split = pl.cdiv(pl.cdiv(k, splits), tiles.block_k) * tiles.block_k
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  gate_layer = layer if gmat.shape[0] > 1 else jnp.zeros((1,), jnp.int32)
  out_dtype = jnp.float32 if splits > 1 else x.dtype
  kernel = functools.partial(_shrink_kernel, groups=groups, rank=rank, block_m=block_m,
                             block_r=block_r, block_k=tiles.block_k, k_per_split=k_per_split,
                             scale=scale)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((groups, splits, block_m, u * block_r), out_dtype),
      grid=(groups, u, splits),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="gathered_shrink",
  )(layer, gate_layer, ids.astype(jnp.int32), count.astype(jnp.int32), x,
    gmat.astype(jnp.float32), *a_pools)


def _slot_tiles(h_ref, b_ref, layer, j, col_mask, u, expert, active=None, *, group: int,
                rank: int, splits: int, block_m: int, block_n: int, block_r: int
                ) -> tuple[jax.Array, jax.Array]:
  """Inside an expand kernel: slot u's h tile Σ_s h[group, s, :, u] [block_m, block_r] (in h's
  dtype when h holds one partial sum, else f32) and its expert's B tile over column strip j
  [block_r, block_n]; with `active` (a traced bool) both loads are masked by it, so an
  inactive slot reads nothing and gives zeros."""
  if splits == 1:
    # One partial sum: a 2-D load in h's dtype, straight into the dot. Loaded as a 3-D
    # [1, M', r'] tile, upcast and reshaped, the whole 64-expert SERE step took 1.17x as long
    # (12.04 against 10.30 ms, `h-3d` in tools/gathered_probe.py, H200).
    h = plgpu.load(h_ref.at[jnp.int32(group), jnp.int32(0), pl.ds(0, block_m),
                            pl.ds(u * block_r, block_r)],
                   mask=None if active is None else jnp.broadcast_to(active, (block_m, block_r)),
                   other=None if active is None else 0.0)
  else:
    # Several f32 partial sums: one 3-D load summed over S (each partial loaded as its own 2-D
    # tile took 10.3 against 8.8 µs per o-shaped module, two runs of tools/bgmv_large_sweep.py).
    h_mask = None if active is None else jnp.broadcast_to(active, (splits, block_m, block_r))
    h = jnp.sum(plgpu.load(h_ref.at[jnp.int32(group), pl.ds(0, splits), pl.ds(0, block_m),
                                    pl.ds(u * block_r, block_r)], mask=h_mask,
                           other=None if active is None else 0.0).astype(jnp.float32), axis=0)
  b_mask = (jnp.arange(block_r) < rank)[:, None] & col_mask[None, :]
  b = plgpu.load(b_ref.at[layer, expert, pl.ds(0, block_r), pl.ds(j * block_n, block_n)],
                 mask=b_mask if active is None else b_mask & active, other=0.0)
  return h, b


def _tile_product(h: jax.Array, b: jax.Array) -> jax.Array:
  return plgpu.dot(h.astype(b.dtype), b).astype(jnp.float32)


def _slot_product(*args, **kwargs) -> jax.Array:
  """Slot u's f32 product (Σ_s h[group, s, :, u]) @ B[layer, expert] over column strip j
  (arguments as `_slot_tiles`)."""
  return _tile_product(*_slot_tiles(*args, **kwargs))


def _expand_kernel(layer_ref, ids_ref, count_ref, x_ref, w_ref, h_ref, b_ref, *out_refs,
                   group: int, rank: int, splits: int, block_m: int, block_n: int,
                   block_k: int, block_r: int):
  o_ref = out_refs[-1]
  m_total = x_ref.shape[0]
  n_total = o_ref.shape[1]
  j = pl.program_id(0)
  layer = layer_ref[0]
  rows = jnp.arange(block_m)
  cols = j * block_n + jnp.arange(block_n)
  row_mask, col_mask = rows < m_total, cols < n_total

  acc = base_tile(x_ref, w_ref, layer, 0, j * block_n, row_mask, col_mask, block_m=block_m,
                  block_n=block_n, block_k=block_k)
  product = functools.partial(_slot_product, h_ref, b_ref, layer, j, col_mask, group=group,
                              rank=rank, splits=splits, block_m=block_m, block_n=block_n,
                              block_r=block_r)
  # A loop of runtime length: slots past `count` cost neither time nor bytes.
  acc = jax.lax.fori_loop(0, count_ref[0], lambda u, acc: acc + product(u, ids_ref[u]), acc)
  plgpu.store(o_ref.at[pl.ds(0, block_m), pl.ds(j * block_n, block_n)],
              acc.astype(o_ref.dtype), mask=row_mask[:, None] & col_mask[None, :])


@functools.partial(jax.jit, static_argnames=("group", "tiles", "interpret"))
def gathered_expand_matmul(x: jax.Array, w: jax.Array, layer: jax.Array | int, h: jax.Array,
                           b: jax.Array, ids: jax.Array, count: jax.Array, *, group: int = 0,
                           out: jax.Array | None = None, tiles: Tiles | None = None,
                           interpret: bool = False) -> jax.Array:
  """y = x @ w[layer] + Σ_{u < count} h[group, :, :, u] @ b[layer, ids[u]], one launch.

  Args:
    x: [M, K] activations (M <= 64).
    w: [L, K, N] stacked base weights.
    layer: which layer (runtime scalar).
    h: [G, S, M', U·r'] from `gathered_shrink`; `group` picks this module's part.
    b: [L, E, r, N] the module's expansion factors.
    ids, count: from `active_experts`.
    out: optional [M, N] buffer written in place (tests poison it with NaN).
    tiles: tile sizes; `Tiles.get_default` when None.
  Returns:
    [M, N] in x's dtype, accumulated in f32.
  """
  m, k = x.shape
  num_layers, k_w, n = w.shape
  _, num_experts, rank, n_b = b.shape
  block_m, block_r = dot_block(m), dot_block(rank)
  u = ids.shape[0]
  if k_w != k:
    raise ValueError(f"x has K={k} but w has K={k_w}")
  if b.shape[0] != num_layers or n_b != n:
    raise ValueError(f"b has shape {b.shape}, expected [{num_layers}, E, r, {n}] from w")
  if h.ndim != 4 or h.shape[2:] != (block_m, u * block_r) or not 0 <= group < h.shape[0]:
    raise ValueError(f"h has shape {h.shape}; expected [G > {group}, S, {block_m}, {u * block_r}]"
                     " from gathered_shrink with the same rows, rank and ids")
  if x.dtype != w.dtype:
    raise ValueError(f"dtypes must match: x {x.dtype} vs w {w.dtype}; cast the activations to"
                     " the weights' dtype")
  splits = h.shape[1]
  if splits & (splits - 1):
    raise ValueError(f"h has S={splits} partial sums; a power of two is needed (shrink_splits)")
  tiles = tiles or Tiles.get_default(m, k, n, x.dtype.itemsize)
  block_n = tiles.block_n
  kernel = functools.partial(_expand_kernel, group=group, rank=rank, splits=splits,
                             block_m=block_m, block_n=block_n, block_k=tiles.block_k,
                             block_r=block_r)
  layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
  operands, aliases = with_output_buffer(
      (layer_arr, ids.astype(jnp.int32), count.astype(jnp.int32), x, w, h, b), out, (m, n),
      x.dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(pl.cdiv(n, block_n),),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      input_output_aliases=aliases,
      interpret=interpret,
      name="gathered_expand_matmul",
  )(*operands)


# The expansion-only kernel's defaults: its programs stream only B tiles, so the grid is made
# about two waves of the H200's 132 SMs (a first guess, not yet swept on the device).
EXPAND_TILES = Tiles(block_n=64, min_programs=264, num_warps=4, num_stages=3)


def expert_splits(n: int, slots: int, tiles: Tiles) -> int:
  """P, how many programs share one column strip's experts in `gathered_expand`: enough that
  the grid has about `tiles.min_programs` programs, at most one per slot."""
  strips = pl.cdiv(n, tiles.block_n)
  return max(1, min(slots, pl.cdiv(tiles.min_programs, strips)))


def _expand_kernel_delta(layer_ref, ids_ref, count_ref, h_ref, b_ref, *out_refs, group: int,
                         rank: int, splits: int, parts: int, block_m: int, block_n: int,
                         block_r: int, slot_loop: str, unroll: int):
  o_ref = out_refs[-1]
  n_total = b_ref.shape[-1]
  j, p = pl.program_id(0), pl.program_id(1)
  layer = layer_ref[0]
  cols = j * block_n + jnp.arange(block_n)
  col_mask = cols < n_total
  tiles = functools.partial(_slot_tiles, h_ref, b_ref, layer, j, col_mask, group=group,
                            rank=rank, splits=splits, block_m=block_m, block_n=block_n,
                            block_r=block_r)
  acc = jnp.zeros((block_m, block_n), jnp.float32)
  count = count_ref[0]
  # This part's slots are p, p + P, p + 2P, ...; `mine` of them are active.
  mine = jnp.maximum(count - p + parts - 1, 0) // parts
  if slot_loop != "load":
    # The ids sit in registers and a slot's expert is picked out of them: no load in the loop
    # waits on another, so Triton can keep several B tiles in flight.
    slots = ids_ref.shape[0]
    lanes = jnp.arange(pl.next_power_of_2(slots))
    ids = plgpu.load(ids_ref.at[pl.ds(0, lanes.shape[0])], mask=lanes < slots, other=0)

  def expert_of(u):
    if slot_loop == "load":  # each slot's id loaded before its B tile
      return ids_ref[jnp.minimum(u, ids_ref.shape[0] - 1)]
    return jnp.sum(jnp.where(lanes == u, ids, 0))

  # "static": a loop of static length over every slot, those past `count` masked loads (which
  # read nothing); else a loop of runtime length over this part's active slots, whose last trip
  # masks the slots past them when a trip takes several.
  static = slot_loop == "static"
  masked = static or unroll > 1

  def body(t, acc):
    loaded = []
    for i in range(unroll):  # every tile of the trip loaded before the first product
      u = p + (t * unroll + i) * parts
      loaded.append(tiles(u, expert_of(u), (u < count) if masked else None))
    for h, b in loaded:
      acc = acc + _tile_product(h, b)
    return acc

  trips = pl.cdiv(pl.cdiv(ids_ref.shape[0], parts) if static else mine, unroll)
  acc = jax.lax.fori_loop(0, trips, body, acc)
  plgpu.store(o_ref.at[p, pl.ds(0, block_m), pl.ds(j * block_n, block_n)], acc,
              mask=col_mask[None, :])


@functools.partial(jax.jit, static_argnames=("group", "rows", "tiles", "interpret"))
def gathered_expand(h: jax.Array, b: jax.Array, layer: jax.Array | int, ids: jax.Array,
                    count: jax.Array, *, group: int = 0, rows: int,
                    partials: jax.Array | None = None, tiles: Tiles = EXPAND_TILES,
                    interpret: bool = False) -> jax.Array:
  """The expansion alone, Σ_{u < count} h[group, :, :, u] @ b[layer, ids[u]], for a base
  matmul that runs elsewhere (XLA's GEMM, which reads the weights faster than a Pallas one):
  one launch per module, reading only the active experts' B.

  Grid: (column strips of `tiles.block_n`, P parts of the active slots); a part sums slots
  p, p + P, ... into its own f32 partial, and the P partials are added after the kernel (one
  small XLA fusion, which also takes the add to the base output). `tiles.slot_loop` picks
  the form of a part's loop over its slots (see `Tiles`).

  Args:
    h: [G, S, M', U·r'] from `gathered_shrink`; `group` picks this module's part.
    b: [L, E, r, N] the module's expansion factors.
    layer: which layer (runtime scalar).
    ids, count: from `active_experts`.
    rows: M, the step's rows (M <= M').
    partials: optional [P, M', N] f32 buffer the kernel writes in place (tests poison it).
  Returns:
    [M, N] f32.
  """
  _, num_experts, rank, n = b.shape
  u = ids.shape[0]
  block_r = dot_block(rank)
  if h.ndim != 4 or h.shape[3] != u * block_r or not 0 <= group < h.shape[0]:
    raise ValueError(f"h has shape {h.shape}; expected [G > {group}, S, M', {u * block_r}]"
                     " from gathered_shrink with the same rank and ids")
  splits, block_m = h.shape[1], h.shape[2]
  if not 1 <= rows <= block_m:
    raise ValueError(f"rows={rows} must be in [1, {block_m}] (h's padded rows)")
  if splits & (splits - 1):
    raise ValueError(f"h has S={splits} partial sums; a power of two is needed (shrink_splits)")
  parts = expert_splits(n, u, tiles)
  kernel = functools.partial(_expand_kernel_delta, group=group, rank=rank, splits=splits,
                             parts=parts, block_m=block_m, block_n=tiles.block_n,
                             block_r=block_r, slot_loop=tiles.slot_loop,
                             unroll=tiles.slot_unroll)
  layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
  shape = jax.ShapeDtypeStruct((parts, block_m, n), jnp.float32)
  operands, aliases = with_output_buffers(
      (layer_arr, ids.astype(jnp.int32), count.astype(jnp.int32), h, b),
      None if partials is None else (partials,), (shape,), "partials")
  out = pl.pallas_call(
      kernel,
      out_shape=shape,
      grid=(pl.cdiv(n, tiles.block_n), parts),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      input_output_aliases=aliases,
      interpret=interpret,
      name="gathered_expand",
  )(*operands)
  return jnp.sum(out[:, :rows], axis=0)
