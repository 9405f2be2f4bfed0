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
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < cfg.top_p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
