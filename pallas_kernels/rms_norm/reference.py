"""RMSNorm's f32 truth: y = x / sqrt(mean(x²) + eps) · w over the last axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """x [N, D], weight [D] -> [N, D] f32, computed in f32."""
  x32 = x.astype(jnp.float32)
  scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return x32 * scale * weight.astype(jnp.float32)
