"""The SwiGLU down projection's f32 truth, and XLA's formulation of it as the library ran it.

    gate, up = gu[:, :I] (+ Δgate), gu[:, I:2I] (+ Δup)
    Δ_m      = (h[:, m] ⊙ gates[:, m]) @ B_m          (the pre-gated experts' expansion; optional)
    out      = (silu(gate) · up) @ W                   [N, C]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LowRank(NamedTuple):
  """The gate and up projections' expert delta, applied before the activation.

  h: [N, 2, R] the gate and up modules' shrink (x @ A of every expert, side by side);
  gates: [N, 1 or 2, R] f32, each shrink column's gate (the expert's gate times the pool's
    scale, 0 for an expert not chosen; one row shared by both modules, or one each);
  b_t: [2, I, R] the modules' B, transposed (row i of module m: output i's R weights).
  """

  h: jax.Array
  gates: jax.Array
  b_t: jax.Array


def swiglu_down_reference(gu: jax.Array, w: jax.Array, inter: int,
                          low_rank: LowRank | None = None) -> jax.Array:
  """gu [N, >= 2I] (gate's I columns, then up's), w [I, C] -> [N, C] f32, all in f32."""
  hi = jax.lax.Precision.HIGHEST
  halves = [gu[:, i * inter:(i + 1) * inter].astype(jnp.float32) for i in range(2)]
  if low_rank is not None:
    h, gates, b_t = low_rank
    gates = jnp.broadcast_to(gates, h.shape)
    delta = jnp.einsum("nmr,mir->nmi", h.astype(jnp.float32) * gates, b_t.astype(jnp.float32),
                       precision=hi)
    halves = [x + delta[:, i] for i, x in enumerate(halves)]
  gate, up = halves
  return jnp.matmul(jax.nn.silu(gate) * up, w.astype(jnp.float32), precision=hi)


def xla_swiglu_down(gu: jax.Array, w: jax.Array, inter: int,
                    low_rank: LowRank | None = None) -> jax.Array:
  """The library's formulation, rounded where it rounds: the expansion's gated shrink and each
  projection in gu's dtype, the activation in it, the matmul accumulated in f32 ->
  [N, C] f32."""
  dtype = gu.dtype
  halves = [gu[:, i * inter:(i + 1) * inter] for i in range(2)]
  if low_rank is not None:
    h, gates, b_t = low_rank
    hg = (h.astype(jnp.float32) * gates).astype(b_t.dtype)
    delta = jnp.einsum("nmr,mir->nmi", hg, b_t, preferred_element_type=jnp.float32)
    halves = [(x.astype(jnp.float32) + delta[:, i]).astype(dtype) for i, x in enumerate(halves)]
  gate, up = halves
  act = (jax.nn.silu(gate) * up).astype(w.dtype)
  return jnp.matmul(act, w, preferred_element_type=jnp.float32)
