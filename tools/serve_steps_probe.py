"""What each of the serving engine's compiled programs costs on the device: the decode step, the
mixed step (decode rows plus whole prompts), packed prefill passes of several sizes and a row
prefill pass, built exactly as `python -m adafuse_jax.bench.load` builds its engine (so a
compile cache that run filled is reused), timed in interleaved rounds, then each profiled.

    python tools/serve_steps_probe.py --out DIR [--compile-cache DIR] [--packed 128,256,512]

Prints JSON lines (one per program: median ms per call over the rounds, and the per-round
figures) and writes DIR/kernels.md: the GPU kernels of each program, from a profiler trace.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax import compile_cache
from adafuse_jax.adapters.io import load_pool
from adafuse_jax.generation import Generator
from adafuse_jax.serving.steps import SlotSteps
from adafuse_jax.weights import load_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kernel_breakdown import kernel_table  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="llama2-7b")
  p.add_argument("--adapters", default="random:0")
  p.add_argument("--path", default="packed")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--max-len", type=int, default=256)
  p.add_argument("--chunk", type=int, default=128)
  p.add_argument("--packed", default="512", help="packed pass sizes to time")
  p.add_argument("--mixed", type=int, default=128, help="the mixed step's prompt tokens")
  p.add_argument("--prompt-tokens", type=int, default=64, help="tokens of each probe prompt")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=10, help="calls per program per round")
  p.add_argument("--compile-cache", default="off")
  p.add_argument("--out", required=True)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  compile_cache.from_option(args.compile_cache)
  loaded = load_model(args.model, dtype=jnp.bfloat16, progress=False)
  cfg = loaded.model.cfg
  gen = Generator(loaded.model, adapters=load_pool(args.adapters, cfg, dtype=jnp.bfloat16),
                  path=args.path)
  packed = sorted(int(x) for x in args.packed.split(","))
  b = args.batch
  # The load bench's engine: one batch bucket, one row-pass shape, the packed and mixed sizes.
  steps = SlotSteps(gen, max_batch=b, max_len=args.max_len, chunk=args.chunk, batch_buckets=[b],
                    prefill_rows=[1], prefill_lengths=[args.chunk], packed_tokens=packed,
                    mixed_tokens=[args.mixed])
  t0 = time.perf_counter()
  steps.warm_up(lambda m: print(f"# {m}", file=sys.stderr, flush=True))
  print(f"# compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

  rng = np.random.default_rng(0)
  n_prompts = max(1, args.mixed // args.prompt_tokens)
  prompt = lambda: rng.integers(3, cfg.vocab_size, args.prompt_tokens).tolist()  # noqa: E731
  free_rows = list(range(b - n_prompts, b))  # rows the prompts take (not decoding)
  prompts = [(row, prompt()) for row in free_rows]
  zeros = lambda dt: np.zeros(b, dt)  # noqa: E731
  active = np.ones(b, bool)
  active[free_rows] = False
  greedy = (zeros(np.float32), np.ones(b, np.float32), zeros(np.int32), zeros(np.uint32))
  per_prompt = ([0.0] * n_prompts, [1.0] * n_prompts, [0] * n_prompts, [0] * n_prompts)
  longest = args.max_len // 2 + 10
  state = {"cache": steps.new_cache(), "nxt": steps.new_tokens()}

  def run(fn) -> None:
    out_ = fn(state["cache"], state["nxt"])
    state["cache"], state["nxt"] = out_[0], out_[1]

  programs = {
      f"decode b={b}": lambda c, n: steps.decode(c, n, active, *greedy, longest),
      f"mixed b={b} + {n_prompts}x{args.prompt_tokens} prompt tokens": lambda c, n:
          steps.decode_with_prompts(c, n, active, *greedy, longest, prompts, *per_prompt),
      f"row pass 1x{args.chunk}": lambda c, n: steps.prefill(
          c, n, [(free_rows[0], prompts[0][1], 0)], *([x[0]] for x in per_prompt)),
  }
  for size in packed:
    fitting = [pr for i, pr in enumerate(prompts) if (i + 1) * args.prompt_tokens <= size]
    programs[f"packed pass {size} ({len(fitting)}x{args.prompt_tokens} tokens)"] = (
        lambda c, n, fitting=fitting, size=size: steps.packed_prefill(
            c, n, fitting, *([x[0]] * len(fitting) for x in per_prompt), size=size))

  def timed(fn, calls: int) -> float:
    jax.block_until_ready(state["nxt"])
    t = time.perf_counter()
    for _ in range(calls):
      run(fn)
    jax.block_until_ready(state["nxt"])
    return (time.perf_counter() - t) / calls * 1e3

  for fn in programs.values():  # warm: the first call of each loads or compiles nothing new
    timed(fn, 2)
  per = {name: [] for name in programs}
  for _ in range(args.rounds):
    for name, fn in programs.items():
      per[name].append(timed(fn, args.calls))
  for name, ms in per.items():
    print(json.dumps({"program": name, "ms": float(np.median(ms)), "rounds_ms": ms,
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}),
          flush=True)
  tables = []
  for i, (name, fn) in enumerate(programs.items()):
    with jax.profiler.trace(str(out / f"trace{i}"), create_perfetto_trace=True):
      timed(fn, 5)
    tables.append(kernel_table(out / f"trace{i}", 5, name))
  (out / "kernels.md").write_text("\n\n".join(tables) + "\n")
  print("\n\n".join(tables))


if __name__ == "__main__":
  main()
