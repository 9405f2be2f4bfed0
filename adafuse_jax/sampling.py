"""Token sampling: greedy, temperature and nucleus (top-p), inside jit."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from adafuse_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is picked. temperature 0 means greedy (argmax).

  Hashable, so it can be a static argument of a jitted function.
  """

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self) -> None:
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise UserError(f"temperature={self.temperature} must be a finite number >= 0 (0 means"
                      " greedy)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Picks one token per row. logits: [B, V] f32 -> [B] int32."""
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / cfg.temperature
  if cfg.top_p < 1.0:
    logits = _keep_top(logits, jnp.float32(cfg.top_p))
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _keep_top(scaled: jax.Array, top_p: jax.Array, top_k: jax.Array | None = None) -> jax.Array:
  """scaled [B, V] with the tokens outside each row's nucleus (the smallest prefix of the sorted
  distribution whose mass reaches top_p; the first token is always kept) and, with top_k [B],
  outside its k most likely (0 = no limit) set to -inf. top_p: [] or [B]."""
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = mass_before < jnp.reshape(top_p, (-1, 1))
  if top_k is not None:
    rank = jnp.arange(scaled.shape[-1], dtype=jnp.int32)[None, :]
    kept &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
  """One PRNG key per row from its request's seed and the position being sampled ([B] each):
  a request's draws do not depend on which other requests share its batch."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
                top_k: jax.Array) -> jax.Array:
  """Picks one token per row with each row's own settings (continuous batching).

  Args:
    logits: [B, V] f32.
    keys: [B] PRNG keys (`row_keys`).
    temperature: [B] f32; 0 means greedy for that row.
    top_p: [B] f32 in (0, 1]; the nucleus mass.
    top_k: [B] int32; keep the k most likely tokens, 0 for all.
  Returns:
    [B] int32.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def drawn() -> jax.Array:
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    masked = _keep_top(scaled, top_p, top_k)
    tokens = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, tokens, greedy)

  # An all-greedy batch (the common serving case) skips the vocabulary sort.
  return jax.lax.cond(jnp.any(temperature > 0), drawn, lambda: greedy)
