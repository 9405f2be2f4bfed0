"""Path "auto": choose the fastest decode path for one configuration by measuring the candidates.

Which way of applying pre-gated experts is fastest depends on the hardware, the adapted
modules, the rank, the batch and how often the routing changes: merging moves every adapted
weight twice per switch (cheap for q/v only, twice a decode step for all 7 modules), the fused
kernels add a shrink per module group and run outside XLA's command buffers, packed weights read
every expert's A and B, plain XLA adds launches. A cost model would have to know
all of that; `choose_path` measures instead. Each candidate is compiled and timed for a few
pipelined decode steps (as `generate` runs them); a merged candidate is timed switching on every
step and switching on none, and its expected cost is `s · switched + (1 - s) · unchanged` for the
switch rate s (measured on the prompt with the real router, see `prompt_switch_rate`, or 1.0 when
unknown: the safe side). A batch of several sequences merges only at steps where all its rows
agree on their experts; its merged candidate is measured agreeing and disagreeing and weighted
by the agreement measured on the prompts (`prompt_agreement_rate`), and left out where the rows
never agree. The winner's compiled Generator is returned, so nothing is compiled twice.

The registry (`adafuse_jax.paths.registry`) says which candidates can run and how their
timings combine into an expected cost; this module measures them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.errors import UserError
from adafuse_jax.generation import Generator
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.paths import merged as merged_path
from adafuse_jax.paths import registry
from adafuse_jax.paths.registry import Candidate
from adafuse_jax.stepper import decode_stepper
from adafuse_jax.timing import time_pipelined
from adafuse_jax.vocab import Mode


@dataclasses.dataclass
class PathChoice:
  """The chosen decode path and the measurements behind it.

  expected_ms: per candidate, the expected decode ms/token (pipelined); for merged candidates
  also `switched_ms` / `unchanged_ms` in `details`.
  """

  candidate: Candidate
  expected_ms: dict[str, float]
  details: dict[str, dict[str, float]]
  switch_rate: float | None
  reason: str

  def to_dict(self) -> dict:
    return {"path": self.candidate.name, "decode_path": self.candidate.path.value,
            "backend": self.candidate.backend, "expected_ms": self.expected_ms,
            "details": self.details, "switch_rate": self.switch_rate, "reason": self.reason}


def prompt_switch_rate(model: LlamaModel, adapters: MixtureOfLoRA,
                       prompt: Sequence[int]) -> float | None:
  """Share of consecutive prompt tokens whose pre-gated experts or gates differ (the rate at
  which a merged decode of similar text would switch), from the real router. None for fewer
  than 2 tokens or a mode without a pre-gate."""
  if adapters.cfg.mode != Mode.PREGATED or len(prompt) < 2:
    return None
  route = jax.vmap(lambda t: merged_path.route_token(model, adapters, t.reshape(1, 1))[:2])
  experts, gates = route(jnp.asarray(prompt, jnp.int32))
  experts, gates = np.asarray(experts), np.asarray(gates, np.float32)
  changed = (experts[1:] != experts[:-1]).reshape(len(prompt) - 1, -1).any(axis=1)
  changed |= (gates[1:] != gates[:-1]).reshape(len(prompt) - 1, -1).any(axis=1)
  return float(changed.mean())


def prompt_agreement_rate(model: LlamaModel, adapters: MixtureOfLoRA,
                          prompts: Sequence[Sequence[int]]) -> float | None:
  """Share of aligned prompt positions (counted from each prompt's end) at which every row's
  token chose the same pre-gated experts with the same gates: how often a merged batch of these
  sequences would agree and stay merged. None for one prompt or a mode without a pre-gate."""
  if adapters.cfg.mode != Mode.PREGATED or len(prompts) < 2:
    return None
  n = min(len(p) for p in prompts)
  tokens = jnp.asarray([list(p)[len(p) - n:] for p in prompts], jnp.int32)  # [B, n]
  route = jax.vmap(lambda t: merged_path.route_tokens(model, adapters, t[:, None])[:2],
                   in_axes=1)
  experts, gates = route(tokens)  # [n, B, k], [n, B, ...]
  agree = jax.vmap(merged_path.batch_agrees)(experts, gates)
  return float(np.asarray(agree).mean())


def free_device_bytes() -> int | None:
  """Free memory of the default device, or None where the backend does not say (the CPU)."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _time_step(gen: Generator, batch: int, cache_len: int, steps: int, feed_back: bool,
               seed: int, same_token: bool = False) -> float:
  one_step, _ = decode_stepper(gen, batch, cache_len, seed, same_token=same_token)
  return time_pipelined(lambda: one_step(feed_back), warmup=2, steps=steps, repeats=3).median_ms


def _measure(gen: Generator, cand: Candidate, batch: int, cache_len: int, steps: int,
             seed: int) -> dict[str, float]:
  """The timings `registry.expected_ms` combines: `step` for an unmerged path; for a merged
  one a step that switches and one that does not (rows fed the same token stay identical: the
  batch agrees at every step), and at batch > 1 a step whose rows disagree."""
  if not cand.merges:
    return {"step": _time_step(gen, batch, cache_len, steps, True, seed)}
  out = {"switched": _time_step(gen, batch, cache_len, steps, True, seed, same_token=True),
         "unchanged": _time_step(gen, batch, cache_len, steps, False, seed, same_token=True)}
  if batch > 1:  # steps whose rows disagree run unmerged inside the merged program
    out["disagreed"] = _time_step(gen, batch, cache_len, steps, True, seed)
  return out


def choose_path(model: LlamaModel, adapters: MixtureOfLoRA, *, batch: int = 1,
                cache_len: int = 256, switch_rate: float | None = None,
                agree_rate: float | None = None, steps: int = 8, sere=None, seed: int = 0,
                log: Callable[[str], None] | None = None,
                mesh: "jax.sharding.Mesh | None" = None,
                attention: str = "auto") -> tuple[PathChoice, Generator]:
  """Measures every candidate path and returns (choice, the winner's Generator).

  Args:
    model, adapters: the configuration.
    batch, cache_len: the decode shape to measure (the shape that will be generated).
    switch_rate: expected share of merged steps that switch; None = 1.0 (unknown).
    agree_rate: batch > 1: expected share of steps at which every row chooses the same experts
      (`prompt_agreement_rate`); None or 0: no merged candidate for a batch.
    steps: pipelined decode steps per timing (3 repeats, median).
    sere: SERE settings, or None. With SERE the merged candidate is left out (a merged step
      switches one shared choice into the weights, which SERE cannot re-route) and every other
      candidate is measured re-routing, so that a path reading only the step's experts is
      credited with what SERE saves it.
    log: optional callable(str) for progress lines.
    mesh: a tensor-parallel mesh (`adafuse_jax.parallel.make_mesh`): every candidate is built
      and measured split across it, its extra memory counted per device.
    attention: the decode steps' attention (`Generator`'s), the same for every candidate.
  """
  if steps * 3 + 2 >= cache_len:
    raise UserError(f"cache_len={cache_len} is too short to time {steps} steps x 3")
  expected, details, gens = {}, {}, {}
  rate = 1.0 if switch_rate is None else float(switch_rate)
  cands = registry.candidates(adapters.cfg, layout=model.layout, batch=batch,
                              agree_rate=agree_rate)
  skipped = {}
  if sere is not None:
    skipped.update({c.name: "SERE re-routes unmerged steps only" for c in cands if c.merges})
    cands = [c for c in cands if not c.merges]
  for cand in cands:
    free = free_device_bytes()
    need = registry.PATHS[cand.path].extra_bytes(model, adapters) // (mesh.size if mesh else 1)
    if free is not None and need > 0.9 * free:  # a 7B with 64 rank-64 experts packs to 33 GB
      skipped[cand.name] = (f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; JAX takes"
                            " 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says more")
      if log:
        log(f"auto: skipping {cand.name}: {skipped[cand.name]}")
      continue
    if log:
      log(f"auto: measuring {cand.name} ...")
    gen = Generator(model, adapters=adapters, path=cand.path, backend=cand.backend,
                    sere=sere, mesh=mesh, attention=attention)
    measured = _measure(gen, cand, batch, cache_len, steps, seed)
    expected[cand.name] = registry.expected_ms(measured, switch_rate=rate, batch=batch,
                                               agree_rate=agree_rate)
    if cand.merges:
      details[cand.name] = {f"{k}_ms": v for k, v in measured.items()}
      if batch > 1:
        details[cand.name]["agree_rate"] = float(agree_rate)
    # Keep only the fastest so far: a packed copy or merged weights are model-sized.
    if min(expected, key=expected.get) == cand.name:
      gens = {cand.name: gen}
    del gen
  if not expected:
    raise UserError("auto: no decode path fits in device memory ("
                    + "; ".join(f"{n} {r}" for n, r in skipped.items()) + ")")
  best = min(expected, key=expected.get)
  others = ", ".join(f"{n} {t:.2f}" for n, t in sorted(expected.items(), key=lambda kv: kv[1])
                     if n != best)
  why = (f"{best}: {expected[best]:.2f} ms/token measured (pipelined, batch {batch})"
         + (f" vs {others}" if others else ", the only candidate"))
  if any(c.merges and c.name in expected for c in cands):
    why += (f"; merged cost at switch rate {rate:.2f}"
            + (" (unknown: assumed every token switches)" if switch_rate is None else ""))
    if batch > 1:
      why += f" and batch agreement {agree_rate:.2f}"
  elif batch > 1 and merged_path.merge_blocker(adapters.cfg) is None:
    why += ("; no merged candidate: "
            + ("the batch's agreement is unknown" if agree_rate is None else
               f"the rows agreed on their experts at {agree_rate:.0%} of the prompts' positions"))
  if skipped:
    why += "; not measured: " + ", ".join(f"{n} ({r})" for n, r in skipped.items())
    details.update({n: {"skipped": r} for n, r in skipped.items()})
  cand = next(c for c in cands if c.name == best)
  return PathChoice(cand, expected, details, switch_rate, why), gens[best]
