"""Timing helpers shared by `auto` and the bench: synced and pipelined timings, and a decode
stepper that feeds a compiled step its own output.

Synced: one call, then wait for it (latency). Pipelined: calls dispatched back to back with one
sync at the end, as `generate` runs decode steps (the host enqueues a step while the device runs
the previous one: throughput).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.stepper import Decoder


@dataclasses.dataclass
class Timing:
  median_ms: float
  p10_ms: float
  p90_ms: float
  n: int

  @classmethod
  def of(cls, seconds: list[float]) -> "Timing":
    ms = np.asarray(seconds) * 1e3
    return cls(float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90)),
               len(ms))


def time_calls(fn: Callable[[], object], *, warmup: int, steps: int) -> Timing:
  """Times `fn` (which must return device arrays) with a sync after every call."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return Timing.of(times)


def time_pipelined(fn: Callable[[], object], *, warmup: int, steps: int, repeats: int = 4
                   ) -> Timing:
  """Per-call time of `fn` dispatched `steps` times back to back with one sync at the end (the
  way `generate` runs decode steps: the host enqueues a step while the device runs the previous
  one). Median and spread over `repeats` such runs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  per_call = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / steps)
  return Timing.of(per_call)


def decode_stepper(gen, batch: int, cache_len: int, seed: int, start: int = 0,
                   same_token: bool = False) -> tuple[Callable[..., jax.Array], Decoder]:
  """`one_step(feed_back=True)` runs one decode step of `gen` (a `Decoder`, as `generate` runs
  them) on a fresh cache whose first `start` slots count as filled, from a random token (the
  same one in every row with `same_token`: the rows then stay identical, so a merged batch
  agrees at every step), feeding the sampled tokens back unless told not to (a merging
  generator only); returns it with the Decoder (its `cache` can be reset; its `routing` is the
  last step's (experts, gates), or None without a router)."""
  rng = np.random.default_rng(seed)
  first = rng.integers(0, gen.cfg.vocab_size, (1 if same_token else batch,))
  cache = gen.new_cache(batch, cache_len)
  cache = cache.replace(length=jnp.asarray(start, jnp.int32))
  decoder = Decoder(gen, jnp.asarray(np.broadcast_to(first, (batch,)), jnp.int32), cache,
                    jax.random.key(seed), SamplingConfig())

  def one_step(feed_back: bool = True) -> jax.Array:
    return decoder.step(feed_back)[0]

  return one_step, decoder
