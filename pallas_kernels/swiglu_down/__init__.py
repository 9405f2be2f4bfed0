"""The SwiGLU down projection of a Llama MLP, its activation computed in the matmul's prologue:

    out = silu(gate) · up @ W,   gate, up = gu[:, :I] (+ Δgate), gu[:, I:2I] (+ Δup)

where gu is the fused gate/up matmul's output and Δ the pre-gated experts' expansion
`(h ⊙ gates) @ B` (optional, `LowRank`; h, the modules' shrink, read from gu's own columns).
Stacked weights ([L, ...]) are read in place at a `layer`. At batch-1 decode XLA runs this as three kernels with
experts (the expansion, the multiply, the GEMM) and two without.

Entry point: `swiglu_down(gu, w, inter, low_rank, backend=)`. Backends, in `auto`'s order:
"triton" (`triton.py`: one launch, split over the down matrix's rows; GPU; tests run it in the
Pallas interpreter on the CPU), "xla" (`reference.xla_swiglu_down`: the library's formulation).
The f32 truth is `reference.swiglu_down_reference`. Whether the decode step uses it is the
packed path's choice (`paths.packed`), measured in `tools/swiglu_down_probe.py`.
"""

from __future__ import annotations

import jax

from pallas_kernels.common import gpu_only, pick_backend
from pallas_kernels.swiglu_down import triton
from pallas_kernels.swiglu_down.reference import (LowRank, swiglu_down_reference,
                                                  xla_swiglu_down)
from pallas_kernels.swiglu_down.triton import Tiles

__all__ = ["LowRank", "Tiles", "swiglu_down", "swiglu_down_reference", "xla_swiglu_down"]

_BACKENDS = {"triton": lambda: gpu_only("the Triton lowering"), "xla": lambda: None}


def swiglu_down(gu: jax.Array, w: jax.Array, inter: int, low_rank: LowRank | None = None, *,
                shrink_at: int | None = None, layer: int | None = None, tiles: Tiles = Tiles(),
                backend: str = "auto") -> jax.Array:
  """gu [N, >= 2I], w [I, C] (or [L, I, C] at `layer`) -> [N, C] f32 (see
  `triton.swiglu_down_partials`)."""
  if pick_backend("swiglu_down", backend, _BACKENDS) == "xla":
    return xla_swiglu_down(gu, w, inter, low_rank, shrink_at=shrink_at, layer=layer)
  return triton.swiglu_down(gu, w, inter, low_rank, shrink_at=shrink_at, layer=layer,
                            tiles=tiles)
