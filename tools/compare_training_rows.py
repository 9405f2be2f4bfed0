"""Rows of several `python -m adafuse_jax.train all` runs side by side, each against one reference row.

    python tools/compare_training_rows.py --reference docs/training/cpu-pilot/results.json:lora \
        docs/training/cpu-pilot/results.json:pregated-shared \
        docs/training/cpu-pilot-shared75/results.json:pregated-shared \
        [--out FILE.md]

Runs that differ in one setting (say `--shared-fraction`) cannot share a results.json (its rows
must come from one configuration); this puts their rows in one table, labelled by the settings
in which their runs differ from the reference's, refusing rows whose other settings differ (data
budget, steps, eval items): those would not be comparable. Per domain: held-out perplexity and its
change against the reference row; exact match in points.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

from adafuse_jax.train.eval import format_gap, paired_gap, paired_hits_gap
from adafuse_jax.train.loop import saved_setting

# Settings that may differ between compared runs (they define what is being compared).
VARIED = ("shared_fraction", "top_k", "lr", "aux_coef", "seed", "router_lr_scale",
          "route_context", "init_seed", "clip_apart")
IGNORED = ("mode", "eval_every", "checkpoint_every", "keep")


def load(spec: str) -> tuple[dict, dict, str]:
  """'path:mode' -> (the run's config, that mode's row, the spec)."""
  path, _, mode = spec.rpartition(":")
  if not path:
    raise SystemExit(f"{spec!r}: want PATH:MODE, e.g. docs/training/gpu-1000-all/results.json:lora")
  try:
    report = json.loads(pathlib.Path(path).read_text())
    # eval items and held-out windows (16 before that setting existed) must match too
    return report["config"] | {"_items": (report.get("math_items"), report.get("analogy_items"),
                                          report.get("heldout_windows", 16))}, \
        report["rows"][mode], spec
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise SystemExit(f"{spec!r}: not a results.json of `python -m adafuse_jax.train all` with row {mode!r}"
                     f" ({type(e).__name__}: {e})") from None


def differing(cfg: dict, ref_cfg: dict, keys=None) -> list[str]:
  """The settings (all but IGNORED, sorted; or those of `keys`, in its order) in which two runs'
  configs differ."""
  keys = sorted(k for k in set(cfg) | set(ref_cfg) if k not in IGNORED) if keys is None else keys
  return [k for k in keys if saved_setting(cfg, k) != saved_setting(ref_cfg, k)]


def check_comparable(spec: str, cfg: dict, ref_cfg: dict, allowed=VARIED) -> None:
  """Refuses a run that differs from the reference in a setting outside `allowed`."""
  diff = [k for k in differing(cfg, ref_cfg) if k not in allowed]
  if diff:
    raise SystemExit(f"{spec!r} ran with other settings than the reference ({', '.join(diff)}):"
                     " not comparable")


def table(reference: str, others: list[str]) -> str:
  ref_cfg, ref_row, _ = load(reference)
  lines, rows = [], []
  for spec in others:
    cfg, row, _ = load(spec)
    check_comparable(spec, cfg, ref_cfg)
    shown = [k for k in differing(cfg, ref_cfg, VARIED) if k != "shared_fraction"]
    if row["mode"].endswith("-shared"):
      shown.insert(0, "shared_fraction")
    rows.append((row["mode"] + "".join(f", {k} {saved_setting(cfg, k)}" for k in shown),
                 row))
  domains = list(ref_row["ppl"])
  lines += [f"Against `{reference}` ({ref_cfg['steps']} steps of {ref_cfg['batch']} x"
            f" {ref_cfg['seq_len']} tokens); made by `python tools/compare_training_rows.py"
            f" {shlex.join(sys.argv[1:])}`.", "",
            "| row | " + " | ".join(f"{d} ppl" for d in domains) + " | mean ppl | math EM |"
            " analogy EM | worse than the reference on |",
            "|---|" + "---|" * (len(domains) + 4)]
  ref_cells = " | ".join(f"{ref_row['ppl'][d]:.3f}" for d in domains)
  lines.append(f"| {ref_row['mode']} (reference) | {ref_cells} | {ref_row['mean_ppl']:.3f} |"
               f" {100 * ref_row['math_em']:.1f}% | {100 * ref_row['analogy_em']:.1f}% | - |")
  paired = False
  for label, row in rows:
    worse = [d for d in domains if row["ppl"][d] > ref_row["ppl"][d]]
    if "window_ce" in row and "window_ce" in ref_row:  # the same windows: a paired interval
      paired = True
      gaps = {d: paired_gap(row["window_ce"][d], ref_row["window_ce"][d]) for d in domains}
      cells = " | ".join(f"{row['ppl'][d]:.3f} ({format_gap(*gap)})" for d, gap in gaps.items())
      worse = [d + ("*" if gaps[d][1] > 0 else "") for d in worse]
    else:
      cells = " | ".join(f"{row['ppl'][d]:.3f} ({100 * (row['ppl'][d] / ref_row['ppl'][d] - 1):+.1f}%)"
                         for d in domains)
    worse += [n for n in ("math_em", "analogy_em") if row[n] < ref_row[n]]
    em = {}
    for task in ("math", "analogy"):
      em[task] = f"{100 * row[f'{task}_em']:.1f}%"
      if f"{task}_hits" in row and f"{task}_hits" in ref_row:
        gap = paired_hits_gap(row[f"{task}_hits"], ref_row[f"{task}_hits"])
        em[task] += f" ({format_gap(*gap, unit='')})"
    lines.append(f"| {label} | {cells} | {row['mean_ppl']:.3f}"
                 f" ({100 * (row['mean_ppl'] / ref_row['mean_ppl'] - 1):+.1f}%) |"
                 f" {em['math']} | {em['analogy']} |"
                 f" {', '.join(worse) or 'none'} ({len(worse)} of {len(domains) + 2}) |")
  if paired:
    lines += ["", "[lo, hi]: ~95% interval of the perplexity change over the held-out windows (paired:"
              " both rows scored the same windows; it covers which text was held out, not the"
              " training seed). `*`: higher beyond that interval. Exact match: the change in points with"
              " its interval over the same items."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reference", required=True, help="PATH:MODE of the row to compare against")
  p.add_argument("rows", nargs="+", help="PATH:MODE of each row to compare")
  p.add_argument("--out")
  args = p.parse_args(argv)
  return report(table(args.reference, args.rows), args.out)


def report(text: str, out: str | None) -> str:
  """Prints a comparison and writes it to `out` (if given)."""
  print(text)
  if out:
    pathlib.Path(out).write_text(text)
  return text


if __name__ == "__main__":
  main()
