"""RMSNorm: y = x / sqrt(mean(x²) + eps) · w over the features of each row (the norm before
each of a Llama block's two matmul groups).

Entry point: `rms_norm(x, weight, eps, backend=)`. Backends, in `auto`'s order: "triton"
(`triton.py`: one launch, one program per row; GPU; tests run it in the Pallas interpreter on
the CPU), "xla" (`model.layers.rms_norm`'s formulation, which XLA runs as a reduction and a
multiply). The f32 truth is `reference.rms_norm_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import gpu_only, pick_backend
from pallas_kernels.rms_norm import triton
from pallas_kernels.rms_norm.reference import rms_norm_reference
from pallas_kernels.rms_norm.triton import Tiles

__all__ = ["Tiles", "rms_norm", "rms_norm_reference", "xla_rms_norm"]

_BACKENDS = {"triton": lambda: gpu_only("the Triton lowering"), "xla": lambda: None}


def xla_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """The model's formulation: x [N, D], weight [D] -> [N, D] in x's dtype, computed in f32."""
  return rms_norm_reference(x, weight, eps).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, tiles: Tiles = Tiles(),
             backend: str = "auto") -> jax.Array:
  """x [N, D], weight [D] -> [N, D] in x's dtype (see `triton.rms_norm`)."""
  if pick_backend("rms_norm", backend, _BACKENDS) == "xla":
    return xla_rms_norm(x, weight, eps)
  return triton.rms_norm(x, weight, eps, tiles=tiles)
