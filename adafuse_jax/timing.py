"""Timing helpers shared by `auto` and the bench: synced and pipelined timings.

Synced: one call, then wait for it (latency). Pipelined: calls dispatched back to back with one
sync at the end, as `generate` runs decode steps (the host enqueues a step while the device runs
the previous one: throughput).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np


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
