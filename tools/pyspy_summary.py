"""Summarise a `py-spy record --format raw --threads` profile: samples per thread and the
functions with the most inclusive samples (a function counted once per stack).

    py-spy record -p PID -d 15 -r 200 --format raw --threads --nonblocking -o prof.raw
    python tools/pyspy_summary.py prof.raw [--top 30]

Used on the server under load (`python -m adafuse_jax.bench.load` on the CPU with a tiny
model, so that the host's work per token dominates): which thread holds the interpreter, and
where its time goes.
"""

from __future__ import annotations

import argparse
import collections
import re


def summarise(path: str, top: int) -> str:
  inclusive: collections.Counter = collections.Counter()
  threads: collections.Counter = collections.Counter()
  for line in open(path):
    stack, n = line.rsplit(" ", 1)
    frames = stack.split(";")
    threads[frames[0]] += int(n)
    for key in {re.sub(r":\d+\)$", ")", f) for f in frames[1:]}:
      inclusive[key] += int(n)
  lines = ["| thread | samples |", "|---|---:|"]
  lines += [f"| {t} | {n} |" for t, n in threads.most_common()]
  lines += ["", "| function (file) | inclusive samples |", "|---|---:|"]
  lines += [f"| {k[:120]} | {n} |" for k, n in inclusive.most_common(top)]
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("raw")
  p.add_argument("--top", type=int, default=30)
  args = p.parse_args()
  print(summarise(args.raw, args.top))


if __name__ == "__main__":
  main()
