"""The serving engine's host time per decode step, driven in-process (no HTTP) under a closed
loop of streaming requests, with a model small enough that the host's work per token shows.

    python tools/engine_host_probe.py [--model tests/fixtures/hf-llama3] [--rounds 8]

Each round runs the same level twice on one engine, in alternating order: stream events
delivered once per engine iteration (the engine's `_Outbox`, one wake-up per event loop) and
one wake-up per event (each event flushed at once, as the engine did before), and reports the
engine thread's host milliseconds per decode step (`EngineStats.host_s`) and output tokens/s.
On a 2-core CPU the model's own compute shares the cores with both threads: the host time is
the figure to read, throughput is noisy.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from adafuse_jax.adapters.io import load_pool
from adafuse_jax.bench import load
from adafuse_jax.bench.measure import environment, ratio_interval
from adafuse_jax.generation import Generator
from adafuse_jax.serving import Engine
from adafuse_jax.weights import load_model


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="tests/fixtures/hf-llama3")
  p.add_argument("--concurrency", type=int, default=32)
  p.add_argument("--requests", type=int, default=128)
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--rounds", type=int, default=8)
  args = p.parse_args()
  loaded = load_model(args.model, progress=False)
  cfg = loaded.model.cfg
  gen = Generator(loaded.model, adapters=load_pool("random:0", cfg), path="packed")
  c = args.concurrency
  engine = Engine(gen, loaded.tokenizer, max_batch=c, max_seq_len=32 + args.max_tokens, chunk=32,
                  batch_buckets=[c])
  engine.steps.warm_up(lambda m: None)
  engine.start()
  prompts = load.workload(loaded.tokenizer, args.requests, cfg.vocab_size, (8, 32), seed=c)
  load.engine_level(engine, prompts[:8], 8, 8, 120)  # the first requests' one-off costs
  outbox = engine._outbox
  batched = outbox.add

  def per_event(stream, out):
    batched(stream, out)
    outbox.flush()

  ways = {"per iteration": batched, "per event": per_event}
  rounds = {way: [] for way in ways}
  for r in range(args.rounds):
    for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
      outbox.add = ways[way]
      before = load.engine_counts(engine.stats)
      level = load.engine_level(engine, prompts, args.max_tokens, c, 600)
      after = load.engine_counts(engine.stats)
      steps = after["decode_steps"] - before["decode_steps"]
      rounds[way].append({"host_ms_per_step": 1e3 * (after["host_s"] - before["host_s"]) / steps,
                          "tokens_per_s": level["tokens_per_s"]})
  outbox.add = batched
  engine.stop()
  host = {w: [x["host_ms_per_step"] for x in v] for w, v in rounds.items()}
  print(json.dumps({
      "environment": environment(), "model": args.model, "concurrency": c,
      "rounds": args.rounds,
      "host_ms_per_step": {w: float(np.median(v)) for w, v in host.items()},
      "tokens_per_s": {w: float(np.median([x["tokens_per_s"] for x in v]))
                       for w, v in rounds.items()},
      "host_per_iteration_over_per_event": ratio_interval(host["per iteration"],
                                                          host["per event"]),
      "raw": rounds}, indent=1))


if __name__ == "__main__":
  main()
