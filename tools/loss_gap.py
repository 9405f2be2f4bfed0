"""Training losses of runs on the same batches (same --seed) against a reference run's, step by
step: the mean and the largest excess per block of steps, in nats.

    python tools/loss_gap.py --reference docs/training/gpu-1000-seeds/s5/metrics/lora.jsonl \
        docs/training/gpu-1000-seeds/s5/metrics/pregated-tied.jsonl \
        docs/training/cpu-tied-s5/pregated-tied.jsonl [--block 20] [--out FILE]

Compares the steps that every log has (a run cut short is compared as far as it got).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from compare_training_rows import report  # noqa: E402


def losses(path: str) -> np.ndarray:
  try:
    return np.array([json.loads(line)["ce"] for line in pathlib.Path(path).read_text().splitlines()])
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise SystemExit(f"{path}: not a metrics.jsonl of `python -m train` ({type(e).__name__}: {e})")


def table(reference: str, logs: list[str], block: int = 20) -> str:
  ref = losses(reference)
  runs = {p: losses(p) for p in logs}
  steps = min([len(ref)] + [len(v) for v in runs.values()])
  starts = range(0, steps, block)
  lines = [f"Made by `python tools/loss_gap.py {shlex.join(sys.argv[1:])}`; training loss minus"
           f" `{reference}`'s on the same step (mean / largest, nats).", "",
           "| run | " + " | ".join(f"steps {s + 1}-{min(s + block, steps)}" for s in starts) + " |",
           "|---|" + "---|" * len(starts)]
  for path, run in runs.items():
    d = run[:steps] - ref[:steps]
    lines.append(f"| {path} | " + " | ".join(f"{d[s:s + block].mean():+.3f} / {d[s:s + block].max():+.3f}"
                                             for s in starts) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reference", required=True, help="the reference run's metrics.jsonl")
  p.add_argument("logs", nargs="+", help="metrics.jsonl of runs with the same --seed")
  p.add_argument("--block", type=int, default=20)
  p.add_argument("--out")
  args = p.parse_args(argv)
  return report(table(args.reference, args.logs, args.block), args.out)


if __name__ == "__main__":
  main()
