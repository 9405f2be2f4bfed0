"""BGMV in plain jnp: the active set every backend works on, and the f32 truth tests compare to."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def active_experts(experts: jax.Array, gates: jax.Array, num_experts: int,
                   max_active: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The step's distinct experts and each row's gate on them.

  Args:
    experts: [N, k] int32 choices of the N rows.
    gates: [N, k] or [N, L, k] (per-layer gates) weights of those choices.
    num_experts: E.
    max_active: U, the static number of slots (default min(E, N·k)); it must be at least the
      number of distinct experts chosen, which the default always is.
  Returns:
    ids [U] int32 (active experts ascending, then unused ids as padding), count [1] int32 (how
    many slots are active), gate matrix [Lg, N, U] f32 (Lg = L with per-layer gates, else 1).
  """
  n, k = experts.shape
  u = max_active or min(num_experts, n * k)
  present = jnp.zeros((num_experts,), jnp.int32).at[experts.reshape(-1)].max(1)
  # Stable sort on "absent": active experts first, each group in ascending id.
  ids = jnp.argsort(1 - present, stable=True)[:u].astype(jnp.int32)
  count = jnp.minimum(present.sum(), u).astype(jnp.int32).reshape(1)
  hit = (experts[..., None] == ids).astype(jnp.float32)  # [N, k, U]
  if gates.ndim == 2:
    gmat = jnp.einsum("nk,nku->nu", gates.astype(jnp.float32), hit)[None]
  else:
    gmat = jnp.einsum("nlk,nku->lnu", gates.astype(jnp.float32), hit)
  return ids, count, gmat



def gathered_reference(x, w, layer, a, b, experts, gates, scale=1.0):
  """Plain jnp in f32: x @ w[layer] + scale Σ_j gates[:, j] (x @ A[l, :, e_j]) @ B[l, e_j].

  x [M, K]; w [L, K, N]; a [L, K, E, r]; b [L, E, r, N]; experts [M, k]; gates [M, k] or
  [M, L, k].
  """
  f32 = jnp.float32
  x, wl, al, bl = x.astype(f32), w[layer].astype(f32), a[layer].astype(f32), b[layer].astype(f32)
  g = gates[:, layer] if gates.ndim == 3 else gates
  y = x @ wl
  for j in range(experts.shape[1]):
    e = experts[:, j]
    h = jnp.einsum("mk,mkr->mr", x, jnp.moveaxis(al[:, e], 1, 0))
    y = y + scale * g[:, j, None].astype(f32) * jnp.einsum("mr,mrn->mn", h, bl[e])
  return y
