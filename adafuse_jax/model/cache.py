"""A fixed-size key/value cache: one buffer per layer, written in place at a running slot.

Batches of ragged prompts are left-padded: every row writes the same slot each step, row b's
first `pad[b]` slots are padding that no query reads, and its RoPE position is
`slot - pad[b]`. One slot counter for the whole batch keeps each write a single
`dynamic_update_slice`, which XLA performs in place on the donated buffer.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from adafuse_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
  """Per-layer key/value buffers and the bookkeeping that locates tokens in them.

  Attributes:
    k, v: L arrays of [B, S, Hkv, hd].
    pad: [B] int32, the first slot of row b that holds a real token.
    length: [] int32, slots written so far (the next write goes to slot `length`).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pad: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype,
             pad: jax.Array | None = None) -> "KVCache":
    shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.layers))  # noqa: E731
    if pad is None:
      pad = jnp.zeros((batch,), jnp.int32)
    return cls(k=zeros(), v=zeros(), pad=jnp.asarray(pad, jnp.int32),
               length=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def batch(self) -> int:
    return self.k[0].shape[0]

  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for a in self.k + self.v)
