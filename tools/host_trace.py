"""Where the host's time goes in synced decode steps: the library's `Decoder` stepped one step
at a time (dispatch, then wait) under `jax.profiler.trace`, the host threads' events summed by
thread and name.

    python tools/host_trace.py --mode pregated-packed --out DIR [--hand-out outputs]
    python tools/host_trace.py --preset smollm2-135m --mode pregated-packed --rank 8 \
        --adapt-modules q,k,v,o --out DIR                                  (CPU, float32)

Why: on the H200 the pre-gated 7B step, followed by anything dispatched right after it (the
`Decoder`'s read program), held the host ~3.4 ms per call against ~0.7 ms for the backbone's
(`docs/benchmarks/h200/decoder/`). The table says which host events carry that time. Writes
`host_<mode>_<hand_out>.md` (and the trace) under DIR, prints the table.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench import measure as B
from adafuse_jax.config import PRESETS, AdapterConfig
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.stepper import HAND_OUTS, Decoder
from adafuse_jax.vocab import parse_variant
from kernel_breakdown import read_trace


def host_events(trace_dir: pathlib.Path) -> dict[tuple[str, str], list[float]]:
  """µs of every complete event on a host thread of the newest trace under `trace_dir`, by
  (thread name, event name)."""
  events, device = read_trace(trace_dir)
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  agg: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e or e.get("pid") in device:
      continue
    thread = threads.get((e["pid"], e["tid"]), str(e["tid"]))
    agg[(thread[:40], e["name"][:70])].append(float(e["dur"]))
  return agg


def host_table(agg: dict[tuple[str, str], list[float]], steps: int, tag: str,
               wall_ms: float) -> str:
  """The 30 host events with the most time per step: thread, name, count and µs per step."""
  lines = [f"{tag}: {wall_ms:.3f} ms per synced step (median, traced)",
           "| thread | event | per step | µs/step |", "|---|---|---|---|"]
  for (thread, name), durs in sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:30]:
    lines.append(f"| {thread} | {name} | {len(durs) / steps:.1f} | {sum(durs) / steps:.0f} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="llama2-7b")
  p.add_argument("--mode", default="pregated-packed")
  p.add_argument("--hand-out", choices=HAND_OUTS, default="program")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--adapt-modules", default="q,k,v,o,gate,up,down")
  p.add_argument("--out", required=True)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  model = LlamaModel(PRESETS[args.preset], dtype=dtype)
  variant, _ = parse_variant(args.mode)
  acfg = AdapterConfig(num_experts=args.experts, rank=args.rank, top_k=args.top_k,
                       modules=tuple(args.adapt_modules.split(",")))
  adapters = (B.build_adapters(model.cfg, variant.mode, acfg, dtype, 0)
              if variant.mode is not None else None)
  gen = B.variant_generator(model, variant, adapters)
  cache = gen.new_cache(1, args.cache_len)
  cache = cache.replace(length=jnp.asarray(args.cache_len // 2, jnp.int32))
  decoder = Decoder(gen, jnp.ones((1,), jnp.int32), cache, jax.random.key(0), SamplingConfig(),
                    hand_out=args.hand_out)
  for _ in range(3):  # compile, record the command buffers, warm
    jax.block_until_ready(decoder.step()[0])
  walls = []
  with jax.profiler.trace(str(out / "trace"), create_perfetto_trace=True):
    for _ in range(args.steps):
      t = time.perf_counter()
      jax.block_until_ready(decoder.step()[0])
      walls.append((time.perf_counter() - t) * 1e3)
  tag = f"{args.mode}, hand_out {args.hand_out}"
  text = host_table(host_events(out / "trace"), args.steps, tag, float(np.median(walls)))
  print(text)
  stem = f"{args.mode}_{args.hand_out}".replace("+", "_")
  (out / f"host_{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
  main()
