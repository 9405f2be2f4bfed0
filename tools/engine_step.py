"""The serving engine's decode step against `generate`'s, one request at a time (CPU or GPU).

    python tools/engine_step.py [--contexts 160,2048] [--tokens 64]

Prints ms/token of one request streamed by an `Engine` (max batch 8, so the step runs the
batch-1 bucket of a larger cache) for each --max-seq-len, and of `generate` on the same prompt:
what a served request pays over the static decoder.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from adafuse_jax.adapters.io import load_pool
from adafuse_jax.generation import Generator, generate
from adafuse_jax.serving import Engine, SamplingParams
from adafuse_jax.weights import load_model


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--contexts", default="160,2048")
  p.add_argument("--tokens", type=int, default=64)
  args = p.parse_args()
  loaded = load_model(progress=False)
  tok = loaded.tokenizer
  gen = Generator(loaded.model, adapters=load_pool("default", loaded.model.cfg))
  ids = tok.encode("The history of the printing press begins")
  for context in (int(c) for c in args.contexts.split(",")):
    with Engine(gen, tok, max_batch=8, max_seq_len=context, chunk=64,
                batch_buckets=(1, 8)) as engine:
      engine.generate(ids, SamplingParams(max_tokens=4, ignore_eos=True))  # compile
      times = [time.perf_counter() for _ in engine.submit(
          ids, SamplingParams(max_tokens=args.tokens, ignore_eos=True))]
    print(f"engine, context {context}: {1e3 * np.median(np.diff(times)):.1f} ms/token")
  res = generate(gen, [ids], max_new_tokens=args.tokens)
  print(f"generate: {res.decode_ms_per_token:.1f} ms/token")


if __name__ == "__main__":
  main()
