"""BGMV: the decode gather. Each row of a decode step applies its own top-k experts, reading only
the experts the step uses (Punica's and vLLM's name for the batched gather matrix-vector product).

    y = x @ W[l] + scale Σ_j g_j (x @ A[l][:, e_j]) @ B[l][e_j]        x [M <= 64, K]

Entry points (each takes `backend=`): `shrink` (the gated shrink of the active experts of a group
of modules sharing x, one launch), `expand_matmul` (the base matmul with the expansion fused
in, one launch per module) and `expand` (the expansion alone, for a base matmul run elsewhere);
`active_experts` builds the step's active set all read.
Backends, in `auto`'s order: "triton" (`triton.py`; the Pallas interpreter on the CPU).
The f32 truth is `reference.gathered_reference`.
"""

from __future__ import annotations

from typing import Sequence

import jax

from pallas_kernels.bgmv import triton
from pallas_kernels.bgmv.reference import active_experts, gathered_reference
from pallas_kernels.bgmv.triton import Tiles
from pallas_kernels.common import interpret, pick_backend

__all__ = ["Tiles", "active_experts", "expand", "expand_matmul", "gathered_reference", "shrink"]

_BACKENDS = {"triton": lambda: None}


def shrink(x: jax.Array, a_pools: Sequence[jax.Array], layer: jax.Array | int, ids: jax.Array,
           count: jax.Array, gmat: jax.Array, *, scale: float = 1.0, tiles: Tiles = Tiles(),
           backend: str = "auto") -> jax.Array:
  """Gated shrink of the active experts: see `triton.gathered_shrink` for shapes.

  x [M, K]; a_pools: G pools [L, K, E, r]; ids [U], count [1], gmat [Lg, M, U] from
  `active_experts` -> h [G, S, M', U·r'] (partial sums over S slices of K).
  """
  pick_backend("bgmv.shrink", backend, _BACKENDS)
  return triton.gathered_shrink(x, a_pools, layer, ids, count, gmat, scale=scale, tiles=tiles,
                                interpret=interpret())


def expand_matmul(x: jax.Array, w: jax.Array, layer: jax.Array | int, h: jax.Array,
                  b: jax.Array, ids: jax.Array, count: jax.Array, *, group: int = 0,
                  out: jax.Array | None = None, tiles: Tiles | None = None,
                  backend: str = "auto") -> jax.Array:
  """y = x @ w[layer] + Σ_{u < count} h[group, :, :, u] @ b[layer, ids[u]]: x [M, K],
  w [L, K, N], b [L, E, r, N], h from `shrink` -> [M, N] in x's dtype."""
  pick_backend("bgmv.expand_matmul", backend, _BACKENDS)
  return triton.gathered_expand_matmul(x, w, layer, h, b, ids, count, group=group, out=out,
                                       tiles=tiles, interpret=interpret())


def expand(h: jax.Array, b: jax.Array, layer: jax.Array | int, ids: jax.Array, count: jax.Array,
           *, group: int = 0, rows: int, tiles: Tiles | None = None,
           backend: str = "auto") -> jax.Array:
  """Σ_{u < count} h[group, :, :, u] @ b[layer, ids[u]] alone: b [L, E, r, N], h from `shrink`
  (`rows` of it are real) -> [rows, N] f32, to add to a base matmul's output."""
  pick_backend("bgmv.expand", backend, _BACKENDS)
  return triton.gathered_expand(h, b, layer, ids, count, group=group, rows=rows,
                                tiles=tiles or triton.EXPAND_TILES, interpret=interpret())
