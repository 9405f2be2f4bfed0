"""The robustness table: every class of bad input of `tests/fuzz_inputs.py`, N seeded cases
each, and what happened (success with finite output, named error, traceback, silent
corruption).

    python tools/fuzz_table.py --cases 60 --out docs/robustness.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.fuzz_inputs import CLASSES, OUTCOMES  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", type=int, default=60, help="cases per class")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="docs/robustness.md")
  args = p.parse_args()
  rows, total = [], collections.Counter()
  for name, run in CLASSES.items():
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
      counts = run(args.cases, args.seed, pathlib.Path(tmp))
    total.update(counts)
    rows.append(f"| {name} | {sum(counts.values())} | "
                + " | ".join(str(counts[o]) for o in OUTCOMES)
                + f" | {time.perf_counter() - t0:.0f} |")
    print(rows[-1], flush=True)
  import jax

  head = [
      "# Robustness: bad input, fuzzed",
      "",
      "Written by `python tools/fuzz_table.py --cases "
      f"{args.cases} --seed {args.seed}` on {datetime.date.today()} (JAX {jax.__version__},"
      f" {jax.devices()[0].platform}); the harness is `tests/fuzz_inputs.py`, and"
      " `tests/test_fuzz.py` runs 8 cases of each class in the test suite.",
      "",
      "Outcomes: **ok** it loaded or ran and every number it produced is finite (a damaged pool"
      " or checkpoint that loads must give exactly the saved one's output); **named** a named"
      " error (from Python a `UserError` kind; from the command line exit 2 with one `error:`"
      " line and no traceback); **traceback** any other exception; **corrupt** non-finite"
      " output, a damaged pool or checkpoint that loaded as something else, or an input file"
      " changed. Damaged model weights that stay finite are a success: GGUF and safetensors"
      " carry no checksum; pools the project writes carry a SHA-256 digest that a load checks.",
      "",
      "| class of bad input | cases | " + " | ".join(OUTCOMES) + " | seconds |",
      "|---|---:|" + "---:|" * len(OUTCOMES) + "---:|",
  ]
  foot = ["", f"Total: {sum(total.values())} cases, {total['traceback']} tracebacks,"
              f" {total['corrupt']} silent corruptions."]
  pathlib.Path(args.out).write_text("\n".join(head + rows + foot) + "\n")
  print(foot[-1])


if __name__ == "__main__":
  main()
