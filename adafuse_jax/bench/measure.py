"""Measurement library behind `python -m adafuse_jax.bench`.

Method: everything is compiled ahead of time (compile time reported apart), warm-up steps are
discarded, every timed step ends with a device synchronisation, and the median with the
10th/90th percentiles is reported. Inputs are seeded random weights (never zeros). The floor of
a decode step is the bytes it must read divided by the device-to-device copy bandwidth measured
in the same run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.adapters.sere import SereSettings, calibrate, pregated_similarity
from adafuse_jax.config import AdapterConfig, ModelConfig
from adafuse_jax.generation import Generator
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.paths import registry
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.stepper import decode_stepper
from adafuse_jax.timing import Timing, time_calls, time_pipelined
from adafuse_jax.vocab import Mode, PathName, Variant

# The bench's default rows, in display order, built from the vocabulary: every mode on every
# path that can run it, the gathered and packed paths with SERE, the merged switch on XLA beside
# its kernel, and `auto`.
_V = Variant
DEFAULT_VARIANTS: tuple[Variant, ...] = (
    _V(Mode.BACKBONE), _V(Mode.BACKBONE, PathName.PACKED),
    _V(Mode.LORA, PathName.MERGED), _V(Mode.LORA), _V(Mode.LORA, PathName.GATHERED),
    _V(Mode.LORA, PathName.PACKED),
    _V(Mode.PREGATED), _V(Mode.PREGATED, PathName.GATHERED), _V(Mode.PREGATED, PathName.PACKED),
    _V(Mode.PREGATED, PathName.GATHERED, sere=True), _V(Mode.PREGATED, PathName.PACKED, sere=True),
    _V(Mode.PREGATED, PathName.MERGED), _V(Mode.PREGATED, PathName.MERGED, backend="xla"),
    _V(Mode.PREGATED, PathName.AUTO),
    _V(Mode.LAYERWISE), _V(Mode.LAYERWISE, PathName.GATHERED), _V(Mode.LAYERWISE, PathName.PACKED),
)


def copy_bandwidth(nbytes: int = 2 << 30, dtype=jnp.bfloat16, steps: int = 20) -> float:
  """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (on the CPU:
  the read bandwidth of a GEMV, see `_cpu_read_bandwidth`).

  The best of an element-wise pass (`a + 1`) over buffers of nbytes/2, nbytes and 2*nbytes:
  the floor must not be flattered by one slow size.
  """
  if jax.default_backend() == "cpu":
    return _cpu_read_bandwidth(nbytes, steps)
  best = 0.0
  for size in (nbytes // 2, nbytes, 2 * nbytes):
    t = _time_elementwise_pass(size // jnp.dtype(dtype).itemsize, dtype, steps)
    best = max(best, 2 * size / (t.median_ms / 1e3))
  return best


def _time_elementwise_pass(n: int, dtype, steps: int) -> Timing:
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(dtype)
  fn = jax.jit(lambda a: a + jnp.asarray(1, dtype))  # one read + one write per element
  return time_calls(lambda: fn(x), warmup=3, steps=steps)


def _cpu_read_bandwidth(nbytes: int, steps: int) -> float:
  """CPU: bytes/s read by a multi-threaded matrix-vector product over an f32 matrix of nbytes.

  XLA:CPU runs an element-wise pass on one thread, which would understate the memory system;
  a GEMV is what a decode step does and reads each byte once.
  """
  cols = 4096
  rows = max(1, nbytes // (4 * cols))
  w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (1, rows), jnp.float32)
  fn = jax.jit(lambda x, w: x @ w)
  t = time_calls(lambda: fn(x, w), warmup=3, steps=steps)
  return rows * cols * 4 / (t.median_ms / 1e3)


def count_kernels(compiled) -> int:
  """Kernels launched by a compiled step: fusions, custom calls and library calls in ENTRY."""
  text = compiled.as_text()  # a merged step holds two modules: count both ENTRY blocks
  pattern = r"=\s*\S+\s+(fusion|custom-call|dot|convolution|copy|all-reduce|sort|scatter|gather)\("
  total = 0
  for part in text.split("ENTRY")[1:]:
    total += len(re.findall(pattern, part[:part.find("\n}")]))
  return total


def build_adapters(model_cfg: ModelConfig, mode: Mode, base: AdapterConfig, dtype,
                   seed: int) -> MixtureOfLoRA | None:
  """A seeded random pool (non-zero B) of `base`'s shape in `mode`, or None for the backbone."""
  if mode == Mode.BACKBONE:
    return None
  return MixtureOfLoRA(model_cfg, base.replace(mode=mode), seed=seed, dtype=dtype, random_b=True)


def calibrated_sere(model: LlamaModel, adapters: MixtureOfLoRA, *, primary_k: int, rho: float,
                    seed: int, tokens: int = 64):
  """SERE settings whose expert similarity is calibrated (linear CKA, `adafuse_jax.adapters.sere`) on
  random token ids through this model: for benchmarks of seeded random presets, where no
  calibration text is meaningful. Real pools ship a similarity calibrated on text."""
  ids = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (1, tokens))
  similarity = calibrate(model, adapters, jnp.asarray(ids, jnp.int32),
                         registry.runtime(adapters))
  return SereSettings(similarity=pregated_similarity(similarity), primary_k=primary_k, rho=rho)


def variant_generator(model: LlamaModel, variant: Variant, adapters: MixtureOfLoRA | None, *,
                      seed: int = 0) -> Generator:
  """The `Generator` of one bench row (`MODE[-PATH][@BACKEND][+sere][+NAME-attention]`), as the
  probes in `tools/` build it: the row's path, backend and attention, and for a `+sere` row SERE
  at primary 1, rho 0 (`calibrated_sere`)."""
  sere = (calibrated_sere(model, adapters, primary_k=1, rho=0.0, seed=seed)
          if variant.sere else None)
  return Generator(model, adapters=adapters, path=variant.path, backend=variant.backend,
                   sere=sere, attention=variant.attention)


def bench_mode(model: LlamaModel, adapters: MixtureOfLoRA | None, *, batch: int, cache_len: int,
               warmup: int, steps: int, prefill_lengths: tuple[int, ...], seed: int,
               path: PathName = PathName.XLA, backend: str = "auto", sere=None,
               release_weights: bool = False, keep: bool = False, mesh=None,
               attention: str = "auto") -> dict:
  """Decode step and prefill timings of one model (+ adapters) configuration.

  Decode steps are timed synced (one step, then wait: latency) and pipelined (steps dispatched
  back to back, as `generate` runs them: throughput).
  On a path that switches per token ("merged"), the decode is timed twice: feeding back the sampled tokens (random weights pick
  a new token, hence new experts and gates, nearly every step: every step switches) and feeding
  one fixed token (nothing changes: no step switches), so that a measured switch rate s gives
  the expected cost s * switched + (1 - s) * unchanged. At batch > 1 the rows disagree (each
  step runs unmerged on the pristine weights, `unmerged_share`), so two more timings keep every
  row identical: the batch agrees and switches (`decode_agreed`), or agrees on a fixed token
  and switches nothing (`decode_agreed_unchanged`).
  `release_weights` (packed only) consumes `model` and `adapters`: see `Generator`.
  `keep`: the result's "round" entry is a function that times one more round of this row
  (pipelined and synced ms/step), keeping its Generator alive: rows interleaved over rounds.
  `mesh`: a tensor-parallel mesh the step runs on (`adafuse_jax.parallel`).
  `attention`: how decode steps run attention (`Generator`'s `attention`).
  """
  gen = Generator(model, adapters=adapters, path=path, backend=backend, sere=sere,
                  release_weights=release_weights, mesh=mesh, attention=attention)
  merge = gen.merges_per_token
  sampling = SamplingConfig()
  t0 = time.perf_counter()
  step = gen.decode_step(batch, cache_len, sampling)
  compile_s = time.perf_counter() - t0
  rng = np.random.default_rng(seed)
  # Start half-way into the cache, as after a prompt: attention reads a realistic prefix.
  one_step, decoder = decode_stepper(gen, batch, cache_len, seed, start=cache_len // 2)
  key = jax.random.key(seed)

  def merged_counts() -> np.ndarray:
    """[2]: steps so far that switched the merged weights, and that ran unmerged."""
    return np.array([int(gen.switch_state.switches), int(gen.switch_state.unmerged)])

  before = merged_counts() if merge else None
  decode = time_calls(one_step, warmup=warmup, steps=steps)
  result = {"decode": dataclasses.asdict(decode), "compile_s": compile_s,
            "attention": gen.attention, "kernels_per_step": count_kernels(step),
            "merges_per_token": merge}
  if merge:
    result["switched_share"], result["unmerged_share"] = (
        (merged_counts() - before) / (warmup + steps)).tolist()
  if merge and batch > 1:
    # Rows that stay identical agree at every step: the merged pass with a switch per step
    # (random weights change the experts nearly every step), the batch's best case.
    agreed_step, _ = decode_stepper(gen, batch, cache_len, seed + 1, start=cache_len // 2,
                                    same_token=True)
    before = merged_counts()
    agreed = time_calls(agreed_step, warmup=warmup, steps=steps)
    result["decode_agreed"] = dataclasses.asdict(agreed)
    result["agreed_switched_share"], result["agreed_unmerged_share"] = (
        (merged_counts() - before) / (warmup + steps)).tolist()
    # ... and the same identical rows fed one fixed token: a merged pass that switches nothing,
    # the batch's "unchanged" step (disagreeing rows would time an unmerged step instead).
    before = merged_counts()
    still = time_calls(lambda: agreed_step(feed_back=False), warmup=warmup, steps=steps)
    result["decode_agreed_unchanged"] = dataclasses.asdict(still)
    result["agreed_unchanged_switches"] = int(merged_counts()[0] - before[0])
  if adapters is not None and adapters.cfg.mode == Mode.PREGATED and not merge:
    # Distinct experts the batch's tokens touch per step (what SERE cuts), over a few steps.
    counts = []
    for _ in range(8):
      one_step()
      counts.append(len(np.unique(np.asarray(decoder.routing[0]))))
    result["distinct_experts"] = float(np.mean(counts))
  decoder.cache = decoder.cache.replace(length=jnp.asarray(cache_len // 2, jnp.int32))
  result["decode_pipelined"] = dataclasses.asdict(
      time_pipelined(one_step, warmup=1, steps=min(steps, cache_len // 8), repeats=4))
  if merge and batch == 1:
    # (At batch > 1, random rows disagree and a fixed token would time one more unmerged step:
    # the merged table reads `decode_agreed_unchanged` there.)
    before = merged_counts()
    decoder.cache = decoder.cache.replace(length=jnp.asarray(cache_len // 2, jnp.int32))
    unchanged = time_calls(lambda: one_step(feed_back=False), warmup=warmup, steps=steps)
    result["decode_unchanged"] = dataclasses.asdict(unchanged)
    # The first of these steps may switch (to the fixed token's experts); the rest must not.
    result["unchanged_switches"] = int(merged_counts()[0] - before[0])
  prefill = {}
  for length in prefill_lengths:
    fn = gen.compiled(batch, length, length, sampling)
    tokens = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (batch, length)), jnp.int32)
    caches = [gen.new_cache(batch, length) for _ in range(2 + min(steps, 10))]
    it = iter(caches)
    t = time_calls(lambda: gen.run(fn, tokens, next(it), key)[0],
                   warmup=2, steps=len(caches) - 2)
    prefill[str(length)] = dataclasses.asdict(t)
  result["prefill"] = prefill
  if keep:
    round_steps = min(steps, cache_len // 8)

    def one_round() -> tuple[float, float]:
      """(pipelined, synced) median ms/step of one round, from half-way into the cache."""
      decoder.cache = decoder.cache.replace(length=jnp.asarray(cache_len // 2, jnp.int32))
      pipelined = time_pipelined(one_step, warmup=1, steps=round_steps, repeats=1).median_ms
      decoder.cache = decoder.cache.replace(length=jnp.asarray(cache_len // 2, jnp.int32))
      synced = time_calls(one_step, warmup=1, steps=round_steps).median_ms
      return pipelined, synced

    result["round"] = one_round
  return result


# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then the normal's).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ratio_interval(ms: list[float], base_ms: list[float]) -> dict[str, float]:
  """A row's ratio to the backbone over interleaved rounds, paired by round: the median ratio
  and a 95% t-interval of the mean log ratio (exponentiated). One round: no interval."""
  ratios = np.asarray(ms) / np.asarray(base_ms)
  out = {"median": float(np.median(ratios)), "rounds": len(ratios)}
  if len(ratios) > 1:
    logs = np.log(ratios)
    df = len(logs) - 1
    half = (_T975[df - 1] if df <= len(_T975) else 1.960) * logs.std(ddof=1) / np.sqrt(len(logs))
    out.update(low=float(np.exp(logs.mean() - half)), high=float(np.exp(logs.mean() + half)))
  return out


def environment() -> dict:
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
          "python": platform.python_version(), "command": " ".join(sys.argv),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def peak_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")
