"""The SwiGLU down projection's f32 truth, and XLA's formulation of it as the library ran it.

    gate, up = gu[:, :I] (+ Δgate), gu[:, I:2I] (+ Δup)
    Δ_m      = (h_m ⊙ gates[:, m]) @ B_m              (the pre-gated experts' expansion; optional;
                                                       h_m, module m's shrink, read from gu)
    out      = (silu(gate) · up) @ W                   [N, C]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LowRank(NamedTuple):
  """The gate and up projections' expert delta, applied before the activation. Their shrink
  (x @ A of every expert, R columns per module: gate's, then up's) is read from gu itself, at
  column `shrink_at` (the packed layout puts it right after the base outputs: 2I).

  gates: [N, 1 or 2, R] f32, each shrink column's gate (the expert's gate times the pool's
    scale, 0 for an expert not chosen; one row shared by both modules, or one each);
  b_t: [2, I, R] the modules' B, transposed (row i of module m: output i's R weights), or
    [L, 2, I, R] with the call's `layer`.
  """

  gates: jax.Array
  b_t: jax.Array


def _layer(x: jax.Array, layer: int | None, ndim: int) -> jax.Array:
  """x itself, or its `layer` when x carries a leading layer axis."""
  return x[layer] if layer is not None and x.ndim == ndim + 1 else x


def _halves(gu, inter, low_rank, shrink_at, layer, *, f32: bool):
  halves = [gu[:, i * inter:(i + 1) * inter] for i in range(2)]
  if low_rank is None:
    return [x.astype(jnp.float32) for x in halves] if f32 else halves
  gates, b_t = low_rank
  b_t = _layer(b_t, layer, 3)
  rank = b_t.shape[-1]
  h = gu[:, shrink_at:shrink_at + 2 * rank].reshape(-1, 2, rank).astype(jnp.float32)
  if f32:
    delta = jnp.einsum("nmr,mir->nmi", h * gates, b_t.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return [x.astype(jnp.float32) + delta[:, i] for i, x in enumerate(halves)]
  hg = (h * gates).astype(b_t.dtype)
  delta = jnp.einsum("nmr,mir->nmi", hg, b_t, preferred_element_type=jnp.float32)
  return [(x.astype(jnp.float32) + delta[:, i]).astype(gu.dtype) for i, x in enumerate(halves)]


def swiglu_down_reference(gu: jax.Array, w: jax.Array, inter: int,
                          low_rank: LowRank | None = None, *, shrink_at: int | None = None,
                          layer: int | None = None) -> jax.Array:
  """gu [N, >= 2I] (gate's I columns, then up's, and the shrink where `low_rank` is given),
  w [I, C] (or [L, I, C] with `layer`) -> [N, C] f32, all in f32."""
  shrink_at = 2 * inter if shrink_at is None else shrink_at
  gate, up = _halves(gu, inter, low_rank, shrink_at, layer, f32=True)
  return jnp.matmul(jax.nn.silu(gate) * up, _layer(w, layer, 2).astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def xla_swiglu_down(gu: jax.Array, w: jax.Array, inter: int,
                    low_rank: LowRank | None = None, *, shrink_at: int | None = None,
                    layer: int | None = None) -> jax.Array:
  """The library's formulation, rounded where it rounds: the expansion's gated shrink and each
  projection in gu's dtype, the activation in it, the matmul accumulated in f32 ->
  [N, C] f32."""
  shrink_at = 2 * inter if shrink_at is None else shrink_at
  gate, up = _halves(gu, inter, low_rank, shrink_at, layer, f32=False)
  w = _layer(w, layer, 2)
  act = (jax.nn.silu(gate) * up).astype(w.dtype)
  return jnp.matmul(act, w, preferred_element_type=jnp.float32)
