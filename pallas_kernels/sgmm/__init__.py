"""SGMM: the fused switch. With pre-gating a token's experts are known before its forward pass,
so they can be switched into the weights: one segmented gather matmul over every adapted module
and layer,

    W_m[l] = base_m[l] + Σ_j coefs[l, j] · A_m[l][:, e_j] @ B_m[l][e_j]

in place, into the donated weights' memory (LoRA-Switch's SGMM).

Entry point: `switch_weights(..., backend=...)`. Backends, in `auto`'s order: "mosaic"
(`mosaic.py`, Mosaic GPU on Hopper, rebuild form, bf16/f16 with the limits its `unsupported`
names), "triton" (`triton.py`, any CUDA GPU; also the incremental form; the Pallas interpreter
on the CPU when asked for by name), "xla" (`reference.switch_weights_xla`: on the CPU, `auto`
runs it, the interpreter being for tests). The f32 truth is `reference.switch_weights_reference`.
"""

from __future__ import annotations

from typing import Sequence

import jax

from pallas_kernels.common import gpu_only, interpret, pick_backend
from pallas_kernels.sgmm import mosaic, triton
from pallas_kernels.sgmm.reference import switch_weights_reference, switch_weights_xla
from pallas_kernels.sgmm.triton import Tiles

__all__ = ["Tiles", "backend_for", "switch_weights", "switch_weights_reference",
           "switch_weights_xla"]


def _why_not_mosaic(weights: Sequence[jax.Array], expert_columns: int, has_base: bool
                    ) -> str | None:
  reason = gpu_only("Mosaic GPU")
  if reason is None:
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if capability is not None and float(capability) < 9.0:
      reason = f"Mosaic GPU needs a Hopper GPU or newer (compute capability {capability})"
  if reason is None and not has_base:
    reason = "the Mosaic GPU switch rebuilds from a pristine base (pass base=)"
  return reason or mosaic.unsupported(weights, expert_columns)


def backend_for(weights: Sequence[jax.Array], expert_columns: int, *, has_base: bool = True,
                backend: str = "auto") -> str:
  """The backend `switch_weights` runs for these weights ([L, in, out] each) and K·r expert
  columns: `backend` itself when it can run here, else `auto`'s first that can."""
  on_gpu = gpu_only("the Triton lowering") is None
  checks = {"mosaic": lambda: _why_not_mosaic(weights, expert_columns, has_base),
            # On the CPU the Triton kernel runs in the Pallas interpreter: by name only (tests).
            "triton": (lambda: None) if on_gpu or backend == "triton" else
                      (lambda: "on the CPU XLA is faster than the Pallas interpreter"),
            "xla": lambda: None}
  return pick_backend("sgmm.switch_weights", backend, checks)


def switch_weights(weights: Sequence[jax.Array], a_pools: Sequence[jax.Array],
                   b_pools: Sequence[jax.Array], experts: jax.Array, coefs: jax.Array,
                   changed: jax.Array | bool = True, base: Sequence[jax.Array] | None = None, *,
                   backend: str = "auto") -> tuple[jax.Array, ...]:
  """`W_m[l] = base_m[l] + Σ_j coefs[l, j] A_m[l, :, experts[j]] @ B_m[l, experts[j]]` per segment.

  Args:
    weights: per segment, the stacked weight [L, in_m, out_m] (donated).
    a_pools, b_pools: per segment, A [L, in_m, E, r] and B [L, E, r, out_m].
    experts: [K] int32; coefs: [L, K] f32 (gate x alpha / r).
    changed: when false nothing is touched.
    base: per segment the pristine weight to rebuild from; None adds in place (Triton only).
    backend: "auto", "mosaic", "triton" or "xla".
  Returns:
    the new weights, one per segment.
  """
  chosen = backend_for(weights, experts.shape[0] * a_pools[0].shape[-1],
                       has_base=base is not None, backend=backend)
  if chosen == "mosaic":
    return mosaic.switch_weights_mosaic(weights, a_pools, b_pools, experts, coefs, changed, base)
  if chosen == "triton":
    return triton.switch_weights(weights, a_pools, b_pools, experts, coefs, changed, base,
                                 interpret=interpret())
  return switch_weights_xla(weights, a_pools, b_pools, experts, coefs, changed, base)
