"""Per-kernel time of decode steps, from a JAX profiler trace (GPU).

    python tools/kernel_breakdown.py --preset llama2-7b --mode backbone --out DIR
        [--batch 32 --experts 64 --rank 64 --top-k 4]     (mode `...+sere`: SERE, rho 0)
    python tools/kernel_breakdown.py --preset smollm2-135m --adapters default \
        --mode pregated-packed --out DIR                   (CPU: the real model and pool, fp32)

Runs warm decode steps under `jax.profiler.trace`, reads the Perfetto trace it writes, and prints
the kernels grouped by name: count per step, total µs per step, share of the step. On the CPU
the "kernels" are XLA:CPU's thunks: the trace's events named after an instruction of the step's
compiled program; a second table groups its matmuls by output shape (which layer each is).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re

import jax
import jax.numpy as jnp

from adafuse_jax.bench import measure as B
from adafuse_jax.config import PRESETS, AdapterConfig
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.adapters.io import load_pool
from adafuse_jax.vocab import Mode, parse_variant


def read_trace(trace_dir: pathlib.Path) -> tuple[list[dict], set[int]]:
  """The events of the newest Perfetto trace under `trace_dir` (written by
  `jax.profiler.trace`), and the ids of its device processes (GPU streams)."""
  trace_file = sorted(glob.glob(str(trace_dir / "**" / "*.json.gz"), recursive=True))[-1]
  events = json.load(gzip.open(trace_file))
  events = events["traceEvents"] if isinstance(events, dict) else events
  pids = {e["pid"]: e["args"]["name"] for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  return events, {pid for pid, name in pids.items()
                  if "gpu" in name.lower() or "/device" in name.lower()}


def kernel_durations(trace_dir: pathlib.Path, names: set[str] | None = None
                     ) -> dict[str, list[float]]:
  """µs of every GPU kernel in the newest trace under `trace_dir` (written by
  `jax.profiler.trace`), by kernel name (a trailing `_N` dropped); empty on the CPU unless
  `names`, the instruction names of the program that ran: then every event so named, on any
  thread (XLA:CPU's thunks), by name with its `.N` dropped."""
  # GPU kernels live on the device's stream threads; keep complete events with a duration.
  events, gpu_pids = read_trace(trace_dir)
  agg: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    if names is not None:
      if e["name"] in names:
        agg[re.sub(r"\.\d+$", "", e["name"])[:60]].append(float(e["dur"]))
    elif e.get("pid") in gpu_pids:
      name = re.sub(r"_\d+$", "", e["name"].split("(")[0])[:60]
      agg[name].append(float(e["dur"]))
  return agg


def instruction_names(hlo_text: str) -> set[str]:
  """The names of the instructions of a compiled program's ENTRY computation."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  return set(re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = ", entry, flags=re.M))


def kernel_table(trace_dir: pathlib.Path, steps: int, tag: str,
                 names: set[str] | None = None) -> str:
  """The GPU kernels of the newest trace under `trace_dir` (written by `jax.profiler.trace`
  around `steps` steps), grouped by name: count per step, µs per step, share (top 25); with
  `names` (CPU) the thunks of those instructions."""
  agg = kernel_durations(trace_dir, names)
  total = sum(sum(v) for v in agg.values()) / steps
  if not total:
    return f"mode {tag}: no GPU kernels in the trace (a CPU run)"
  lines = [f"mode {tag}: {sum(len(v) for v in agg.values()) / steps:.0f} kernel events/step,"
           f" {total:.0f} µs busy/step", "| kernel | per step | µs/step | share |", "|---|---|---|---|"]
  for name, durs in sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:25]:
    lines.append(f"| {name} | {len(durs) / steps:.0f} | {sum(durs) / steps:.0f} |"
                 f" {100 * sum(durs) / steps / total:.1f}% |")
  return "\n".join(lines)


def dot_table(trace_dir: pathlib.Path, hlo_text: str, steps: int, tag: str) -> str:
  """CPU: the step's matmul thunks grouped by their output shape and contraction (which linear
  layer or expansion each is): count per step, µs per step and per call."""
  shapes = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?(\S+) = (\S+) dot\([^)]*\)(.*)", line)
    if m:
      shapes[m.group(1)] = f"{m.group(2).split('{')[0]}{m.group(3)}".strip(" ,")
  events, _ = read_trace(trace_dir)
  agg = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("name") in shapes:
      agg[shapes[e["name"]]].append(float(e["dur"]))
  lines = [f"mode {tag}: matmuls by output shape",
           "| output, contraction | per step | µs/step | µs each |", "|---|---|---|---|"]
  for shape, durs in sorted(agg.items(), key=lambda kv: -sum(kv[1])):
    lines.append(f"| `{shape}` | {len(durs) / steps:.0f} | {sum(durs) / steps:.0f} |"
                 f" {sum(durs) / len(durs):.1f} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="llama2-7b")
  p.add_argument("--mode", default="backbone")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--tokens", type=int, default=1,
                 help="tokens per step: 1 = decode; more = a prefill of that many tokens")
  p.add_argument("--adapt-modules", default="q,k,v,o,gate,up,down")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--experts", type=int, default=AdapterConfig.num_experts)
  p.add_argument("--rank", type=int, default=AdapterConfig.rank)
  p.add_argument("--top-k", type=int, default=AdapterConfig.top_k)
  p.add_argument("--adapters", default="random",
                 help="random (of the shape above) or a saved pool ('default': the shipped one)")
  p.add_argument("--out", required=True)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if cpu else jnp.bfloat16
  if args.preset == "smollm2-135m":  # the real embedded model
    from adafuse_jax.weights import load_model  # its GGUF reader needs `gguf`: only here
    model = load_model("default", dtype=dtype, progress=False).model
  else:
    model = LlamaModel(PRESETS[args.preset], dtype=dtype)
  acfg = AdapterConfig(modules=tuple(args.adapt_modules.split(",")), num_experts=args.experts,
                       rank=args.rank, top_k=args.top_k)
  variant, _ = parse_variant(args.mode)
  if args.adapters == "random" or variant.mode == Mode.BACKBONE:
    adapters = B.build_adapters(model.cfg, variant.mode, acfg, dtype, 0)
  else:
    adapters = load_pool(args.adapters, model.cfg, dtype=dtype)
  gen = B.variant_generator(model, variant, adapters)
  cache_len = max(args.cache_len, args.tokens)
  step = gen.compiled(args.batch, args.tokens, cache_len, SamplingConfig())
  # Distinct token ids per row, so that the rows route to different experts.
  tok = (jnp.arange(args.batch * args.tokens, dtype=jnp.int32).reshape(args.batch, args.tokens)
         * 7919 + 1) % model.cfg.vocab_size
  key = jax.random.key(0)

  def run_steps(n: int, cache):
    for _ in range(n):
      if args.tokens > 1:  # a prefill fills the cache from slot 0 every time
        cache = cache.replace(length=jnp.zeros((), jnp.int32))
      nxt, _, cache, _ = gen.run(step, tok, cache, key)
      jax.block_until_ready(nxt)
    return cache

  # The cache is made before the trace: its zero-fill is not a decode step's work.
  cache = run_steps(3, gen.new_cache(args.batch, cache_len))
  jax.block_until_ready(cache)
  with jax.profiler.trace(str(out / "trace"), create_perfetto_trace=True):
    run_steps(args.steps, cache)
  tag = args.mode if args.tokens == 1 else f"{args.mode}_prefill{args.tokens}"
  # File names without "+" (the device tool does not send such names back).
  stem = tag.replace("+", "_")
  hlo = step.as_text()
  (out / f"hlo_{stem}.txt").write_text(hlo)
  text = kernel_table(out / "trace", args.steps, tag, instruction_names(hlo) if cpu else None)
  if cpu:
    text += "\n\n" + dot_table(out / "trace", hlo, args.steps, tag)
  print(text)
  (out / f"kernels_{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
  main()
