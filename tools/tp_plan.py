"""Counts for the multi-device plan (docs/parallel.md): per tensor-parallel degree, the bytes
each device holds and reads per decode step, and the collectives a step needs.

    python tools/tp_plan.py [--preset llama2-70b] [--experts 8] [--rank 16] [--batch 1]

Arithmetic from the model shapes only (no device): the weights split Megatron-style, the KV
cache by heads, A of column modules replicated (the pool's A is read whole by every device).
"""

from __future__ import annotations

import argparse

from adafuse_jax.config import LINEAR_NAMES, preset

COLUMN = ("q", "k", "v", "gate", "up")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="llama2-70b")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--context", type=int, default=4096)
  args = p.parse_args()
  cfg = preset(args.preset)
  item = 2  # bf16
  er = args.experts * args.rank
  shapes = cfg.linear_shapes()
  weights = cfg.linear_bytes(item)
  head = cfg.vocab_size * cfg.hidden * item
  kv = 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * item * args.context * args.batch
  print(f"{cfg.name}: {cfg.num_params() / 1e9:.1f} B parameters, {cfg.num_params() * item / 1e9:.1f}"
        f" GB in bf16; KV cache of batch {args.batch} x {args.context} tokens {kv / 1e9:.2f} GB;"
        f" pool E={args.experts} r={args.rank} on all seven modules")
  print()
  print("| devices | weights read per step per device GB | KV per device GB | pool per device GB |"
        " all-reduces per token | bytes per all-reduce (batch) |")
  print("|---:|---:|---:|---:|---:|---:|")
  for n in (1, 2, 4, 8):
    if cfg.heads % n or cfg.kv_heads % n or cfg.ffn % n:
      continue
    pool = 0
    for m in LINEAR_NAMES:
      i, o = shapes[m]
      a, b = i * er, er * o
      pool += (a + b / n) if m in COLUMN else (a / n + b)
    pool *= cfg.layers * item
    reduces = 0 if n == 1 else 2 * cfg.layers
    print(f"| {n} | {(weights + head) / n / 1e9:.1f} | {kv / n / 1e9:.2f} | {pool / 1e9:.3f} |"
          f" {reduces} | {args.batch * cfg.hidden * item / 1e3:.1f} KB |")


if __name__ == "__main__":
  main()
