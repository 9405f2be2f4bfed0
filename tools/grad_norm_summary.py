"""How large the routing gradients are beside the experts' in training logs (`grad_norm` of
metrics.jsonl, before clipping): do they take a share of the clipped global norm?

    python tools/grad_norm_summary.py docs/training/cpu-grad-norms/pregated-tied.jsonl [...] \
        [--out docs/training/cpu-grad-norms/README.md]
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


def summary(logs: list[str], clip: float = 1.0) -> str:
  lines = [f"Made by `python tools/grad_norm_summary.py {shlex.join(sys.argv[1:])}`.", "",
           "| log | steps | experts' norm (median) | routing norm (median / max) |"
           " routing / experts (max) | steps clipped (global norm > clip) |",
           "|---|---|---|---|---|---|"]
  for path in logs:
    records = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
    norms = np.array([[r["grad_norm"]["experts"], r["grad_norm"]["routing"]] for r in records
                      if "grad_norm" in r])
    if not len(norms):
      raise SystemExit(f"{path}: no grad_norm in its records (a log from before it was logged)")
    total = np.hypot(norms[:, 0], norms[:, 1])
    lines.append(f"| {path} | {len(norms)} | {np.median(norms[:, 0]):.3f} |"
                 f" {np.median(norms[:, 1]):.4f} / {norms[:, 1].max():.4f} |"
                 f" {(norms[:, 1] / norms[:, 0]).max():.2%} | {int((total > clip).sum())} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("logs", nargs="+", help="metrics.jsonl files of `python -m train`")
  p.add_argument("--clip", type=float, default=1.0, help="the runs' --clip (default 1.0)")
  p.add_argument("--out")
  args = p.parse_args(argv)
  return report(summary(args.logs, args.clip), args.out)


if __name__ == "__main__":
  main()
