"""Random expert-kernel problems shared by the kernel tests (fresh draws per seed, never zeros)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def expert_problem(seed, m, k, n, num_experts, rank, top_k, layers, dtype, groups=1,
                   per_layer=False, experts=None):
  """x [m, k]; w [L, k, n]; G pools a [L, k, E, r] and b [L, E, r, n]; distinct top-k experts per
  row [m, top_k] (unless given); gates [m, top_k], or [m, L, top_k] with per-layer gates."""
  rng = np.random.default_rng(seed)
  f = lambda scale, *s: jnp.asarray(rng.normal(size=s) * scale, dtype)  # noqa: E731
  x = f(1.0, m, k)
  w = f(k ** -0.5, layers, k, n)
  a = [f(k ** -0.5, layers, k, num_experts, rank) for _ in range(groups)]
  b = [f(rank ** -0.5, layers, num_experts, rank, n) for _ in range(groups)]
  if experts is None:
    experts = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(m)])
  experts = jnp.asarray(experts, jnp.int32)
  gates = jnp.asarray(rng.uniform(0.1, 1.0, size=(m, layers, top_k) if per_layer else (m, top_k)),
                      jnp.float32)
  return x, w, a, b, experts, gates
