"""Bytes a decode step must move: the numerator of every floor (bytes ÷ the device's real
memory bandwidth) that the bench reports and `auto` can price paths by.

At batch-1 decode a step reads every linear weight once, the head, one embedding row per token,
the KV cache and the experts it uses; FLOPs are negligible beside them.
"""

from __future__ import annotations

import jax.numpy as jnp

from adafuse_jax.config import AdapterConfig, ModelConfig


def expert_bytes(cfg: ModelConfig, dtype, rank: int, modules: tuple[str, ...]) -> int:
  """Bytes of one expert of rank `rank` (A and B of every adapted module, every layer)."""
  shapes = cfg.linear_shapes()
  return cfg.layers * rank * sum(i + o for m, (i, o) in shapes.items()
                                 if m in modules) * jnp.dtype(dtype).itemsize


def decode_bytes(cfg: ModelConfig, dtype, cache_len: int, batch: int,
                 adapter: AdapterConfig | None, experts: float | None = None) -> int:
  """Bytes one decode step must read: linear weights, head, one embedding row per token, the
  KV cache, and the experts: `experts` of them where given (what one path reads: all E for
  one that computes the whole pool, the step's distinct experts for one that gathers), else
  the most a step can use (k per token, at most E)."""
  item = jnp.dtype(dtype).itemsize
  total = cfg.linear_bytes(item) + cfg.hidden * cfg.vocab_size * item
  total += 2 * cfg.layers * batch * cache_len * cfg.kv_dim * item
  if adapter is not None and adapter.mode != "backbone":
    used = min(adapter.num_experts, adapter.top_k * batch) if experts is None else experts
    total += int(used * expert_bytes(cfg, dtype, adapter.rank, adapter.modules))
  return total


def switch_bytes(cfg: ModelConfig, dtype, adapter: AdapterConfig) -> int:
  """Bytes one merged switch moves: read W0 and write W for every adapted weight (+ the
  experts' factors, read once)."""
  item = jnp.dtype(dtype).itemsize
  shapes = cfg.linear_shapes()
  weights = sum(i * o for m, (i, o) in shapes.items() if m in adapter.modules)
  return (cfg.layers * 2 * weights * item
          + adapter.top_k * expert_bytes(cfg, dtype, adapter.rank, adapter.modules))
