"""One picture of the decode paths across pool shapes, from stored bench results.

    python tools/pool_space_plot.py --out docs/benchmarks/h200/pool-space.png \
        docs/benchmarks/h200/e64r64-top4-b32 \
        docs/benchmarks/h200/e128r16-top2-b32 docs/benchmarks/h200/e8r64-top2-b32

Reads each folder's `results.json` (written by `python -m adafuse_jax.bench`), keys every
adapter row by its pool (experts x rank, top-k) and mode, a later folder's row replacing an
earlier one's (a re-run after a change), and draws two panels: each path's pipelined step over
the backbone of its own run (median and 95% interval of the ratio paired by round, as the bench
reports it) and the share of its own floor it reaches (the bytes that path reads over the run's
measured ceiling). Nothing is typed in: every bar is a field of a stored result.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np


def pool_rows(folders: list[str]) -> dict[str, dict[str, dict]]:
  """{pool label: {mode: row}} of the adapter rows, later folders first in precedence. Ratios
  and own floors are derived again from each report's stored timings
  (`adafuse_jax.bench.derive`, as `--table` does), so that reports written before the bench
  stored them count too; `+pallas-attention`, the default on one GPU since 2026-12-04, is
  dropped from the names."""
  from adafuse_jax.bench import derive

  pools: dict[str, dict[str, dict]] = {}
  for folder in folders:
    report = json.loads((pathlib.Path(folder) / "results.json").read_text())
    derive.add_ratios(report["results"])
    derive.add_path_floors(report)
    a = report["adapter"]
    label = f"{a['num_experts']} x r{a['rank']}, top-{a['top_k']}, batch {report['batch']}"
    for row in report["results"]:
      if row.get("pipelined_ratio_interval") and not row["mode"].startswith("backbone"):
        pools.setdefault(label, {})[row["mode"].replace("+pallas-attention", "")] = row
  return pools


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("folders", nargs="+", help="bench output folders (each with results.json)")
  p.add_argument("--out", required=True, help="the PNG to write")
  args = p.parse_args()
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pools = pool_rows(args.folders)
  modes = sorted({m for rows in pools.values() for m in rows})
  fig, (ax_ratio, ax_floor) = plt.subplots(1, 2, figsize=(12, 4.2))
  width = 0.8 / len(modes)
  x = np.arange(len(pools))
  for i, mode in enumerate(modes):
    med, low, high, share = [], [], [], []
    for rows in pools.values():
      row = rows.get(mode)
      iv = row["pipelined_ratio_interval"] if row else None
      med.append(iv["median"] if iv else np.nan)
      low.append(iv["median"] - iv.get("low", iv["median"]) if iv else 0)
      high.append(iv.get("high", iv["median"]) - iv["median"] if iv else 0)
      # The pipelined figure of the bench's own table (its row's first measurement).
      share.append(100 * row["path_floor_ms"] / row["decode_pipelined"]["median_ms"]
                   if row else np.nan)
    pos = x + (i - (len(modes) - 1) / 2) * width
    ax_ratio.bar(pos, med, width, yerr=[low, high], capsize=2, label=mode)
    ax_floor.bar(pos, share, width, label=mode)
  for ax in (ax_ratio, ax_floor):
    ax.set_xticks(x, list(pools), fontsize=8)
  ax_ratio.axhline(1.0, color="black", lw=0.8)
  ax_ratio.axhline(1.5, color="grey", lw=0.8, ls="--")
  ax_ratio.text(x[-1] + 0.45, 1.52, "goal: best path <= 1.5x", ha="right", fontsize=7,
               color="grey", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
  ax_ratio.set_ylabel("pipelined step / backbone's (95% interval)")
  ax_ratio.set_title("Cost over the fused-weight backbone of the same run")
  ax_floor.axhline(100 / 1.2, color="grey", lw=0.8, ls="--")
  ax_floor.text(x[0] - 0.45, 100 / 1.2 + 1, "goal: within 1.2x of its floor", fontsize=7,
                color="grey")
  ax_floor.set_ylim(0, 100)
  ax_floor.set_ylabel("% of the path's own floor")
  ax_floor.set_title("Bytes the path reads / ceiling, over its time")
  ax_ratio.legend(fontsize=8, loc="upper right")
  fig.tight_layout()
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  print(f"wrote {out}: {len(pools)} pools, {len(modes)} paths")


if __name__ == "__main__":
  main()
