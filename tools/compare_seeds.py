"""Settings trained with several seeds, each against a reference setting: means over seeds, with
intervals over seeds.

    python tools/compare_seeds.py \
        --reference 'lora=docs/training/gpu-1000/results.json:lora,docs/training/gpu-1000-seeds/s[2-5]/results.json:lora' \
        'pregated-tied=docs/training/gpu-1000-seeds/s[1-5]/results.json:pregated-tied' \
        [--out docs/training/gpu-1000-seeds.md] [--plot docs/training/gpu-1000-seeds.png] \
        [--excess-plot docs/training/gpu-1000-seeds-loss.png]

Each argument is LABEL=SPEC[,SPEC...], a SPEC being PATH:MODE as in
tools/compare_training_rows.py, whose PATH may be a glob. A setting's runs must differ in the
seeds only (`seed`: data order and initialisation; `init_seed`: initialisation alone) and
each in its own; settings may differ from the reference in the settings that
tools/compare_training_rows.py lets vary. The windows interval of a single pair of rows covers
which text was held out; this one covers the training seed (initialisation and data order),
which moves a domain's perplexity more (docs/training.md): a setting is called worse
(`*`) only where its interval lies above zero.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import pathlib
import shlex
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from compare_training_rows import VARIED, check_comparable, differing, load, report  # noqa: E402
from adafuse_jax.train.eval import format_gap, seed_gap  # noqa: E402
from adafuse_jax.train.loop import saved_setting  # noqa: E402

TASKS = ("math_em", "analogy_em")
SEEDS = ("seed", "init_seed")  # what may differ between the runs of one setting



def losses(path: str) -> np.ndarray:
  """The per-step training cross-entropy of a training log (metrics/MODE.jsonl)."""
  try:
    return np.array([json.loads(line)["ce"] for line in pathlib.Path(path).read_text().splitlines()])
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise SystemExit(f"{path}: not a metrics.jsonl of `python -m adafuse_jax.train`"
                     f" ({type(e).__name__}: {e})")

def load_group(arg: str) -> tuple[str, list[tuple[dict, dict, str]]]:
  """'LABEL=SPEC,SPEC' -> (label, [(config, row, spec)]) of runs differing in the seed only."""
  label, sep, specs = arg.partition("=")
  if not sep or not label or not specs:
    raise SystemExit(f"{arg!r}: want LABEL=PATH:MODE[,PATH:MODE...]")
  runs = []
  for spec in specs.split(","):
    path, _, mode = spec.rpartition(":")
    paths = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not paths:
      raise SystemExit(f"{spec!r}: no file matches {path!r}")
    runs += [load(f"{p}:{mode}") for p in paths]
  first = runs[0][0]
  for cfg, _, spec in runs[1:]:
    check_comparable(spec, cfg, first, allowed=SEEDS)
  seeds = [seed_label(cfg) for cfg, _, _ in runs]
  if len(set(seeds)) != len(seeds):
    raise SystemExit(f"{label}: seeds repeat ({seeds}); each run of a setting needs its own seed")
  if len(runs) < 2:
    raise SystemExit(f"{label}: one run; an interval over seeds needs at least two")
  return label, runs


def seed_label(cfg: dict) -> str:
  """"5", or "5/100" for data seed 5 with adapters initialised from seed 100."""
  init = saved_setting(cfg, "init_seed")
  return str(cfg["seed"]) if init is None or init == cfg["seed"] else f"{cfg['seed']}/{init}"


def values(runs, key: str, domain: str | None = None) -> np.ndarray:
  return np.array([row[key][domain] if domain else row[key] for _, row, _ in runs], np.float64)


def perplexities(runs, domain: str) -> np.ndarray:
  """Each run's perplexity on `domain`, or on the mean over domains for "mean" [S]."""
  return values(runs, "mean_ppl") if domain == "mean" else values(runs, "ppl", domain)


def geometric_mean(v: np.ndarray) -> float:
  return math.exp(np.log(v).mean())


def table(reference: str, others: list[str], plot: str | None = None,
          excess_plot: str | None = None) -> str:
  ref_label, ref_runs = load_group(reference)
  groups = [load_group(arg) for arg in others]
  for label, runs in groups:
    check_comparable(label, runs[0][0], ref_runs[0][0])
  domains = list(ref_runs[0][1]["ppl"])
  cfg = ref_runs[0][0]
  lines = [f"{cfg['steps']} steps of {cfg['batch']} x {cfg['seq_len']} tokens, every setting"
           f" trained with several seeds; made by `python tools/compare_seeds.py"
           f" {shlex.join(sys.argv[1:])}`.", "", *table_header(domains)]

  named = [(label + "".join(f" ({k} {saved_setting(runs[0][0], k)})" for k in differing(
      runs[0][0], ref_runs[0][0], [k for k in VARIED if k not in SEEDS])), runs)
      for label, runs in [(ref_label, ref_runs)] + groups]
  for name, runs in named:
    seeds = ",".join(seed_label(c) for c, _, _ in runs)
    if runs is ref_runs:
      cells = [f"{geometric_mean(perplexities(runs, d)):.3f}" for d in domains + ["mean"]]
      cells += [f"{100 * values(runs, task).mean():.1f}%" for task in TASKS]
      lines.append(f"| {name} (reference) | {seeds} | {' | '.join(cells)} | - |")
    else:
      lines.append(f"| {name} | {seeds} | {row_cells(runs, ref_runs, domains)} |")
  lines += ["", "Perplexity: geometric mean over the setting's seeds, each seed's perplexity taken"
            " over every held-out window. (change [lo, hi]): against the reference's, with a ~95%"
            " Welch t interval over seeds; exact match in points, the same way. `*`: worse beyond"
            " that interval."]
  lines += paired_table(named, domains)
  lines += excursions(named)
  if plot:
    _plot(named, domains, plot)
  if excess_plot:
    _excess_plot(named, excess_plot)
  return "\n".join(lines) + "\n"


def row_cells(runs, ref_runs, domains: list[str], paired: bool = False) -> str:
  """A setting's table cells against the reference: per domain, the mean and its change with
  the seed interval, the exact matches the same way, then where the setting is worse (`*`:
  beyond the interval). With `paired`, ref_runs[i] is the reference's run of runs[i]'s seed."""
  cells, worse = [], []
  for d in domains + ["mean"]:
    gap = seed_gap(perplexities(runs, d), perplexities(ref_runs, d), paired=paired)
    cells.append(f"{geometric_mean(perplexities(runs, d)):.3f} ({format_gap(*gap)})")
    if d != "mean" and gap[0] > 0:
      worse.append(d + ("*" if gap[1] > 0 else ""))
  for task in TASKS:
    gap = seed_gap(values(runs, task), values(ref_runs, task), log=False, paired=paired)
    cells.append(f"{100 * values(runs, task).mean():.1f}% ({format_gap(*gap, unit='')})")
    if gap[0] < 0:
      worse.append(task + ("*" if gap[2] < 0 else ""))
  return " | ".join(cells) + f" | {', '.join(worse) or 'none'} ({len(worse)} of {len(domains) + 2})"


def paired_table(settings, domains: list[str]) -> list[str]:
  """The settings whose every run has a reference run of the same seed label (data order, and
  initialisation seed where set apart), compared seed by seed: a paired t interval over the
  per-seed changes, which cancels what a seed moves in both runs alike."""
  (_, ref_runs), others = settings[0], settings[1:]
  by_seed = {seed_label(cfg): run for run in ref_runs for cfg in [run[0]]}
  lines, unpaired = [], []
  for name, runs in others:
    mates = [by_seed.get(seed_label(cfg)) for cfg, _, _ in runs]
    if None in mates:
      lone = [seed_label(cfg) for (cfg, _, _), mate in zip(runs, mates) if mate is None]
      unpaired.append(f"{name} (seeds {','.join(lone)} have no reference run)")
      continue
    seeds = ",".join(seed_label(c) for c, _, _ in runs)
    lines.append(f"| {name} | {seeds} | {row_cells(runs, mates, domains, paired=True)} |")
  if not lines:
    return []
  if unpaired:
    lines += ["", "Not paired: " + "; ".join(unpaired) + "."]
  return ["", "Paired by seed: each run against the reference's run of the same seed (the same"
          " batches in the same order; a tied pool and its LoRA also start from the same"
          " adapters); (change [lo, hi]) with a ~95% paired t interval over the seeds.", "",
          *table_header(domains)] + lines


def table_header(domains: list[str]) -> list[str]:
  return ["| setting | seeds | " + " | ".join(f"{d} ppl" for d in domains) +
          " | mean ppl | math EM | analogy EM | worse than the reference on |",
          "|---|---|" + "---|" * (len(domains) + 4)]


def training_log(spec: str) -> np.ndarray | None:
  """The per-step training cross-entropy of a PATH:MODE row (its folder's metrics/MODE.jsonl),
  or None where the run kept no log."""
  path, _, mode = spec.rpartition(":")
  log = pathlib.Path(path).parent / "metrics" / f"{mode}.jsonl"
  return losses(str(log)) if log.exists() else None


def excess_curves(settings, window: int = 25
                  ) -> list[tuple[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]]]:
  """[(setting, [(seed, loss [T], reference loss [T], excess [T - window + 1])])]: each run's
  `window`-step moving mean of the training loss minus that of the reference's run of the same
  data seed (the same batches in the same order, `train.loop.batch_at`), in nats; runs without
  such a reference run or without logs are left out."""
  (_, ref_runs), others = settings[0], settings[1:]
  # the reference's runs initialised from their data seed, one per data seed
  ref_logs = {cfg["seed"]: training_log(spec) for cfg, _, spec in ref_runs
              if saved_setting(cfg, "init_seed") in (None, cfg["seed"])}
  kernel = np.ones(window) / window
  curves = []
  for name, runs in others:
    got = []
    for cfg, _, spec in runs:
      ref, log = ref_logs.get(cfg["seed"]), training_log(spec)
      if ref is not None and log is not None and len(ref) == len(log):
        got.append((seed_label(cfg), log, ref,
                    np.convolve(log, kernel, "valid") - np.convolve(ref, kernel, "valid")))
    curves.append((name, got))
  return curves


def excursions(settings, window: int = 25) -> list[str]:
  """Each run's training loss against the reference's run of the same seed: the largest excess
  of the `window`-step moving mean, where it peaks, the largest excess of a single step (one
  batch), and the mean excess over the last 200 steps, in nats."""
  lines = ["| setting | seed | largest excess (nats) | at step | largest one-step excess |"
           " mean excess, last 200 steps |", "|---|---|---|---|---|---|"]
  for name, runs in excess_curves(settings, window):
    for seed, log, ref, excess in runs:
      lines.append(f"| {name} | {seed} | {excess.max():+.3f} |"
                   f" {int(excess.argmax()) + window} | {(log - ref).max():+.3f} (step"
                   f" {int((log - ref).argmax()) + 1}) | {excess[-200:].mean():+.4f} |")
  if len(lines) == 2:
    return []
  return ["", f"Training loss against `{settings[0][0]}` of the same seed (same batches),"
          f" {window}-step moving means:", ""] + lines


def _excess_plot(settings, path: str, window: int = 25) -> None:
  """One panel per setting: every seed's `window`-step moving training-loss excess over the
  reference's run of the same seed, against the step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = [(name, runs) for name, runs in excess_curves(settings, window) if runs]
  if not curves:
    raise SystemExit("--excess-plot: no setting has training logs beside the reference's of the"
                     " same seed")
  fig, axes = plt.subplots(len(curves), 1, figsize=(8, 2.2 * len(curves) + 0.6), sharex=True,
                           sharey=True, squeeze=False)
  for ax, (name, runs) in zip(axes[:, 0], curves):
    for seed, _, _, excess in runs:  # one colour per data seed across the panels
      ax.plot(np.arange(window, window + excess.size), excess, lw=0.9,
              color=f"C{int(seed.split('/')[0]) % 10}", label=f"seed {seed}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("excess (nats)")
  axes[0, 0].legend(fontsize=7, ncol=5, loc="upper right")
  axes[-1, 0].set_xlabel("step")
  fig.suptitle(f"training loss minus {settings[0][0]}'s of the same seed, {window}-step means",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot(settings, domains, path: str) -> None:
  """Every seed's perplexity change against the reference setting's (the first of `settings`,
  [(name, runs)]) geometric mean, per domain."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ref_label, ref_runs = settings[0]
  fig, ax = plt.subplots(figsize=(1.6 * (len(domains) + 1) + 2, 4))
  width = 0.8 / len(settings)
  for i, (label, runs) in enumerate(settings):
    for j, d in enumerate(domains + ["mean"]):
      ref = geometric_mean(perplexities(ref_runs, d))
      ppl = perplexities(runs, d)
      pts = 100 * (ppl / ref - 1)
      x = j - 0.4 + width * (i + 0.5)
      ax.scatter(np.full(pts.size, x), pts, s=14, color=f"C{i}", alpha=0.8,
                 label=label if j == 0 else None)
      ax.hlines(100 * (geometric_mean(ppl) / ref - 1), x - width / 2.5, x + width / 2.5,
                color=f"C{i}")
  ax.axhline(0, color="grey", lw=0.8)
  ax.set_xticks(range(len(domains) + 1), domains + ["mean"])
  ax.set_ylabel(f"perplexity vs {ref_label}'s mean (%)")
  ax.set_title("held-out perplexity per seed (dots) and per setting (bars)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reference", required=True, help="LABEL=PATH:MODE[,PATH:MODE...]")
  p.add_argument("groups", nargs="+", help="LABEL=PATH:MODE[,PATH:MODE...] of each setting")
  p.add_argument("--out")
  p.add_argument("--plot", help="PNG of every seed's perplexity change per domain")
  p.add_argument("--excess-plot", help="PNG of every run's training-loss excess over the"
                 " reference's run of the same seed, one panel per setting")
  args = p.parse_args(argv)
  return report(table(args.reference, args.groups, args.plot, args.excess_plot), args.out)


if __name__ == "__main__":
  main()
