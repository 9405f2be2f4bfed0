"""How should the packed path's expansion be written for XLA:GPU?

    python tools/expand_probe.py --batches 1,32 --rounds 5      # GPU; JSON lines on stdout

The pre-gated packed step costs more than the backbone's packed step beyond the bytes its
experts add: small kernels that each read a little slowly. This probe compiles the same
`pregated-packed` step with the expansion (`paths.packed.expand`) and the add of its delta
(`PackedRuntime.__call__`) written several ways, times them interleaved in rounds beside the
backbone's packed step (ratios paired by round: median [95% interval]), and counts each
program's kernels per step from a profiler trace (the whole table goes to stderr). Variants are
monkeypatched in for the probe only; what wins goes into the library ("library" is today's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench import measure as B
from adafuse_jax.config import PRESETS, AdapterConfig, input_group
from adafuse_jax.generation import Generator
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.paths import packed as P
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.vocab import Mode, PathName

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from kernel_breakdown import kernel_table  # noqa: E402

_LIBRARY_EXPAND = P.expand
_LIBRARY_CALL = P.PackedRuntime.__call__


def expand_untransposed(h, gates, b_flat, dtype):
  """B as [M, E·r, out] (the layout before B was stored transposed): a column reduction for one
  token on XLA:GPU; f32 out of the dot."""
  hg = (h.astype(jnp.float32) * gates).astype(dtype)
  return jnp.einsum("nmk,mko->nmo", hg, b_flat, preferred_element_type=jnp.float32)


def expand_untransposed_bf16out(h, gates, b_flat, dtype):
  """The expansion as it was first written: B as [M, E·r, out], the dot's result in the weights'
  dtype, upcast after."""
  hg = (h.astype(jnp.float32) * gates).astype(dtype)
  return jnp.einsum("nmk,mko->nmo", hg, b_flat).astype(jnp.float32)


def expand_rowsum(h, gates, b_t, dtype):
  """B transposed; one token: an explicit multiply and sum over the contiguous E·r axis."""
  if h.shape[0] != 1:
    return _LIBRARY_EXPAND(h, gates, b_t, dtype)
  hg = h.astype(jnp.float32) * gates  # [1, M, E·r]
  return jnp.sum(hg[:, :, None, :] * b_t.astype(jnp.float32)[None], axis=-1)


def expand_bf16_gates(h, gates, b_t, dtype):
  """The library's expansion with the gating multiply in the weights' dtype (no convert before
  the dot: at batch 32 the f32 gating was a separate convert kernel per expansion)."""
  return jnp.einsum("nmk,mok->nmo", h * gates.astype(dtype), b_t,
                    preferred_element_type=jnp.float32)


def call_bf16_add(self, name, layer, x, weights):
  """The delta rounded to the activations' dtype and added there (no f32 copy of the base)."""
  del weights
  y = self._groups.base(name, layer, x)
  if self.adapts(name, layer):
    group = input_group(name)
    deltas = P.cached_on_input(self._deltas, (layer, group), x,
                               lambda: self._group_deltas(group, layer, x))
    y = y + deltas[name].astype(y.dtype)
  return y.reshape(*x.shape[:-1], -1)


# name -> (expand, PackedRuntime.__call__, B stored untransposed [M, E·r, out]). The first run
# also measured a multiply-and-sum on the untransposed B, dropped from this list
# (docs/benchmarks/h200/expand/README.md).
VARIANTS = {
    "library": (_LIBRARY_EXPAND, _LIBRARY_CALL, False),
    "untransposed": (expand_untransposed, _LIBRARY_CALL, True),
    "untransposed-bf16out": (expand_untransposed_bf16out, _LIBRARY_CALL, True),
    "rowsum": (expand_rowsum, _LIBRARY_CALL, False),
    "library+bf16add": (_LIBRARY_EXPAND, call_bf16_add, False),
    "bf16-gates": (expand_bf16_gates, _LIBRARY_CALL, False),
}


def compile_step(gen: Generator, derived, batch: int, cache_len: int, variant) -> object:
  P.expand, P.PackedRuntime.__call__ = variant[:2]
  try:
    cache = gen.new_cache(batch, cache_len)
    tokens = jnp.ones((batch, 1), jnp.int32)
    fn = jax.jit(gen._forward, static_argnums=(6,), donate_argnums=(4,))
    return fn.lower(gen.params, gen.adapter_params, derived, tokens, cache,
                    jax.random.key(0), SamplingConfig()).compile()
  finally:
    P.expand, P.PackedRuntime.__call__ = _LIBRARY_EXPAND, _LIBRARY_CALL


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="llama2-7b")
  p.add_argument("--batches", default="1,32")
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="comma-separated names from VARIANTS")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--trace-dir", default="/tmp/expand-probe-traces",
                 help="where the profiler traces go (kernel counts are read back from them)")
  args = p.parse_args()
  traces = pathlib.Path(args.trace_dir)
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  model = LlamaModel(PRESETS[args.preset], dtype=dtype)
  acfg = AdapterConfig(num_experts=args.experts, rank=args.rank,
                       modules=("q", "k", "v", "o", "gate", "up", "down"))
  adapters = B.build_adapters(model.cfg, Mode.PREGATED, acfg, dtype, 0)
  gens = {"backbone-packed": Generator(model, path=PathName.PACKED),
          "pregated": Generator(model, adapters=adapters, path=PathName.PACKED)}
  names = [v for v in args.variants.split(",") if v]
  derived = {False: gens["pregated"].derived, None: gens["backbone-packed"].derived}
  if any(VARIANTS[n][2] for n in names):
    d = gens["pregated"].derived  # the same packed matrices, B untransposed (a copy of B only)
    derived[True] = dataclasses.replace(
        d, b=jax.tree.map(lambda b: jnp.swapaxes(b, -1, -2).copy(), d.b))
  env = {"preset": args.preset, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  for batch in (int(b) for b in args.batches.split(",")):
    programs = {}
    t = time.perf_counter()
    programs["backbone-packed"] = (gens["backbone-packed"], derived[None], compile_step(
        gens["backbone-packed"], derived[None], batch, args.cache_len, VARIANTS["library"]))
    for name in names:
      d = derived[VARIANTS[name][2]]
      programs[name] = (gens["pregated"], d, compile_step(gens["pregated"], d, batch,
                                                           args.cache_len, VARIANTS[name]))
    print(json.dumps({"batch": batch, "compile_s": round(time.perf_counter() - t, 1)}), flush=True)
    key = jax.random.key(0)
    tokens = jnp.ones((batch, 1), jnp.int32)
    caches = {n: g.new_cache(batch, args.cache_len) for n, (g, _, _) in programs.items()}

    def run(name: str, steps: int) -> None:
      gen, d, fn = programs[name]
      caches[name] = caches[name].replace(length=jnp.asarray(args.cache_len // 2, jnp.int32))
      nxt = None
      for _ in range(steps):
        nxt, _, caches[name], _ = fn(gen.params, gen.adapter_params, d, tokens,
                                     caches[name], key)
      jax.block_until_ready(nxt)

    kernels = {}
    for name in programs:
      run(name, 3)
      if not on_cpu:
        trace = traces / f"b{batch}-{len(kernels)}"
        with jax.profiler.trace(str(trace)):
          run(name, 4)
        table = kernel_table(trace, 4, f"{name} (batch {batch})")
        print(table, file=sys.stderr, flush=True)  # the whole table, for the log
        kernels[name] = table.splitlines()[0]
    times: dict[str, list[float]] = {n: [] for n in programs}
    for _ in range(args.rounds):
      for name in programs:
        t = time.perf_counter()
        run(name, args.steps)
        times[name].append((time.perf_counter() - t) / args.steps * 1e3)
    for name in programs:
      row = {"batch": batch, "program": name, "pipelined_ms": round(float(np.median(times[name])), 3),
             "vs_backbone_packed": {k: round(v, 4) for k, v in B.ratio_interval(
                 times[name], times["backbone-packed"]).items()},
             "kernels": kernels.get(name, ""), **env}
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
