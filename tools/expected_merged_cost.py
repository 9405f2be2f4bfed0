"""Expected ms/token of pregated-merged decoding at the switch rate measured on real routing.

    python tools/expected_merged_cost.py

Reads the H100 merged benchmarks (docs/benchmarks/h100-merged/*/results.json: a step that
switches and one that does not) and the switch rate of the trained SmolLM2 router on held-out
text (docs/training/results.json), and writes docs/benchmarks/h100-merged/expected_cost.md:
expected = s x switched + (1 - s) x unchanged, against the backbone of the same run.
"""

from __future__ import annotations

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
  training = json.loads((ROOT / "training" / "results.json").read_text())
  rates = {m: r["routing"] for m, r in training["rows"].items() if r.get("routing")}
  lines = ["# Expected cost of pregated-merged decoding on real routing", "",
           "Made by `python tools/expected_merged_cost.py` from docs/training/results.json (switch"
           " rates of the trained routers, held-out text of 5 domains) and the H100 runs in"
           " docs/benchmarks/h100-merged/. *set*: the top-k set changes; *merge*: the set or the"
           " gates change, which is when the merged weights must be rebuilt.", "",
           "| 7B adapters | router | switch rate (merge) | switched ms | unchanged ms |"
           " expected ms/token | backbone ms | vs backbone |", "|---|---|---|---|---|---|---|---|"]
  for folder, label in (("bench_qv", "q,v"), ("bench_all7", "all 7 modules")):
    report = json.loads((ROOT / "benchmarks" / "h100-merged" / folder / "results.json").read_text())
    by_mode = {r["mode"]: r for r in report["results"]}
    merged, backbone = by_mode["pregated-merged"], by_mode["backbone"]
    for router, routing in rates.items():
      if router not in ("pregated", "pregated-plg"):
        continue
      s = routing["switch_rate_merge"]
      switched = merged["decode"]["median_ms"]
      unchanged = merged["decode_unchanged"]["median_ms"]
      expected = s * switched + (1 - s) * unchanged
      base = backbone["decode"]["median_ms"]
      lines.append(f"| {label} | {router} | {s:.3f} (set {routing['switch_rate_set']:.3f}) |"
                   f" {switched:.3f} | {unchanged:.3f} | {expected:.3f} | {base:.3f} |"
                   f" {100 * (expected / base - 1):+.1f}% |")
  out = ROOT / "benchmarks" / "h100-merged" / "expected_cost.md"
  out.write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
