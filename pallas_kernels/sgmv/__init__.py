"""SGMV: the segmented prompt matmul. A prompt's (token, expert) pairs grouped by expert, each
segment one small dense problem (Punica's and vLLM's name for the segmented gather
matrix-vector product; the row layout of a grouped GEMM):

    delta[t] = scale Σ_j g_tj (x_t @ A[l][:, e_tj]) @ B[l][e_tj]        x [T, K]

Entry point: `delta(x, a_pools, b_pools, layer, table, backend=...)`, one delta per module of a
group sharing x, with `segment_table` built once per routing decision. Backends, in `auto`'s
order: "triton" (`triton.py`; the Pallas interpreter on the CPU), "jax-triton" (`jax_triton.py`:
the same kernels in Triton's own language, a peer for benchmarks; GPU and the `[gpu]` extra).
`reference.py` holds the table, the f32 truth (`segmented_reference`) and XLA's grouped GEMM
(`ragged_dot_delta`) for side-by-side benchmarks.
"""

from __future__ import annotations

from typing import Sequence

import jax

from pallas_kernels.common import interpret, pick_backend
from pallas_kernels.sgmv import jax_triton, triton
from pallas_kernels.sgmv.reference import (SegmentTable, ragged_dot_delta, segment_table,
                                           segmented_reference)
from pallas_kernels.sgmv.triton import Tiles

__all__ = ["SegmentTable", "Tiles", "delta", "ragged_dot_delta", "segment_table",
           "segmented_reference"]


def _why_not_jax_triton() -> str | None:
  ok, why = jax_triton.available()
  return None if ok else why


_BACKENDS = {"triton": lambda: None, "jax-triton": _why_not_jax_triton}


def delta(x: jax.Array, a_pools: Sequence[jax.Array], b_pools: Sequence[jax.Array],
          layer: jax.Array | int, table: SegmentTable, *, scale: float = 1.0,
          tiles: Tiles = Tiles(), backend: str = "auto") -> list[jax.Array]:
  """scale · Σ_j gate_j (x @ A[l, :, e_j]) @ B[l, e_j] for G modules sharing the input x.

  Args:
    x: [T, K] tokens; a_pools / b_pools: G pools A [L, K, E, r], B [L, E, r, N_g].
    layer: which layer; table: `segment_table` of the tokens' choices with `tiles.block_m`.
    backend: "auto" (the Pallas kernel), "triton" or "jax-triton".
  Returns:
    one [T, N_g] f32 delta per module.
  """
  chosen = pick_backend("sgmv.delta", backend, _BACKENDS)
  if chosen == "jax-triton":
    return [jax_triton.triton_delta(x, a, b, layer, table, scale=scale, tiles=tiles)
            for a, b in zip(a_pools, b_pools)]
  return triton.segmented_delta(x, a_pools, b_pools, layer, table, scale=scale, tiles=tiles,
                                interpret=interpret())
