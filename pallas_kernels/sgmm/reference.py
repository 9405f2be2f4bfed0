"""SGMM in plain jnp: operand checks shared by every backend, the XLA switch, and the f32 truth."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def check_operands(weights, a_pools, b_pools, base, experts, coefs):
  n = len(weights)
  if not (len(a_pools) == len(b_pools) == n) or (base is not None and len(base) != n):
    raise ValueError(f"one A, B{' and base' if base is not None else ''} per weight: got"
                     f" {n} weights, {len(a_pools)} A, {len(b_pools)} B"
                     + (f", {len(base)} base" if base is not None else ""))
  if n == 0:
    raise ValueError("no weights to switch")
  if experts.ndim != 1:
    raise ValueError(f"experts must be [K] (the entries of one switch), got {experts.shape}")
  rank = a_pools[0].shape[-1]
  for i, (w, a, b) in enumerate(zip(weights, a_pools, b_pools)):
    if w.ndim != 3:
      raise ValueError(f"weight {i} must be stacked [L, in, out], got {w.shape}")
    num_layers, d_in, d_out = w.shape
    if a.shape[:2] != (num_layers, d_in) or a.ndim != 4:
      raise ValueError(f"A {i} has shape {a.shape}, expected [{num_layers}, {d_in}, E, r]")
    if b.shape != (num_layers, a.shape[2], a.shape[3], d_out):
      raise ValueError(f"B {i} has shape {b.shape}, expected {(num_layers, *a.shape[2:], d_out)}")
    if a.shape[3] != rank:
      raise ValueError(f"every pool must have the same rank: A {i} has r={a.shape[3]}, A 0 {rank}")
    if base is not None and (base[i].shape != w.shape or base[i].dtype != w.dtype):
      raise ValueError(f"base {i} is {base[i].shape} {base[i].dtype}, weight {w.shape} {w.dtype}")
    if coefs.shape != (num_layers, experts.shape[0]):
      raise ValueError(f"coefs must be [L, K] = {(num_layers, experts.shape[0])}, got {coefs.shape}")


def switch_weights_xla(weights: Sequence[jax.Array], a_pools: Sequence[jax.Array],
                       b_pools: Sequence[jax.Array], experts: jax.Array, coefs: jax.Array,
                       changed: jax.Array | bool = True, base: Sequence[jax.Array] | None = None
                       ) -> tuple[jax.Array, ...]:
  """The same switch in plain XLA (backend "xla"; one fusion per segment).

  Skips all work with `lax.cond` when `changed` is false.
  """
  weights = tuple(weights)

  def apply(ws):
    out = []
    for i, w in enumerate(ws):
      a = jnp.take(a_pools[i], experts, axis=2)  # [L, in, K, r]
      b = jnp.take(b_pools[i], experts, axis=1)  # [L, K, r, out]
      a = a.astype(jnp.float32) * coefs[:, None, :, None]
      delta = jnp.einsum("likr,lkro->lio", a, b.astype(jnp.float32))
      src = w if base is None else base[i]
      out.append((src.astype(jnp.float32) + delta).astype(w.dtype))
    return tuple(out)

  return jax.lax.cond(jnp.asarray(changed), apply, lambda ws: ws, weights)


def switch_weights_reference(weights, a_pools, b_pools, experts, coefs, changed=True, base=None):
  """Plain jnp in f32, one segment at a time: the definition the kernel is tested against."""
  if not bool(changed):
    return tuple(weights)
  out = []
  for i, w in enumerate(weights):
    src = (w if base is None else base[i]).astype(jnp.float32)
    a = a_pools[i].astype(jnp.float32)
    b = b_pools[i].astype(jnp.float32)
    for j in range(experts.shape[0]):
      e = int(experts[j])
      src = src + coefs[:, j, None, None] * jnp.einsum("lir,lro->lio", a[:, :, e], b[:, e])
    out.append(src.astype(w.dtype))
  return tuple(out)
