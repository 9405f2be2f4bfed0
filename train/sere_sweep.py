"""SERE's quality trade-off for one pool: held-out perplexity and distinct experts per batch step
over a sweep of (S, rho), and the setting `--sere-rho auto` then uses.

    python -m adafuse_jax.train sere-calibrate --adapters DIR --sweep [--max-ppl-cost 0.5]

The held-out windows of a domain are decoded as one batch, so the tokens at one position form
one batch step: S is how many of each token's choices are primary (kept), rho the similarity a
secondary choice needs to be re-routed to a primary one (1 = off). The distinct experts per step
are what a gathered step reads (the speed side of the trade, by bytes). The report is saved
beside the pool as `sere_quality.json` (with a table and a plot); its `recommended` entry is the
setting with the fewest distinct experts whose mean perplexity is within the budget of no
re-routing, or null where none reads fewer experts within it.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.adapters.sere import QUALITY_FILE, SereSettings, calibrate, pregated_similarity
from adafuse_jax.errors import UserError
from adafuse_jax.model.cache import KVCache
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.paths import registry
from adafuse_jax.train.loop import eval_windows

__all__ = ["QUALITY_FILE", "calibrate_on", "plan", "sweep", "report", "baseline", "recommend",
           "markdown", "plot", "write"]


def calibrate_on(model: LlamaModel, pool: MixtureOfLoRA, streams: dict[str, np.ndarray], *,
                 windows: int, seq_len: int) -> tuple[np.ndarray, int]:
  """(the pool's [L, E, E] expert similarity, `adafuse_jax.adapters.sere.calibrate`, on up to
  `windows` windows of `seq_len` tokens of every stream; how many windows that was)."""
  batch = np.concatenate([eval_windows(s, windows, seq_len)[:, :-1] for s in streams.values()])
  return calibrate(model, pool, jnp.asarray(batch), registry.runtime(pool)), len(batch)


def sweep(model: LlamaModel, pool: MixtureOfLoRA, similarity: jax.Array,
          heldout: dict[str, np.ndarray], primaries: list[int], rhos: list[float], *,
          windows: int = 16, seq_len: int = 256,
          report: Callable[[dict], None] | None = None) -> list[dict]:
  """One row per (S, rho): {"primary_k", "rho", "ppl": {domain: ...}, "distinct_per_step":
  {domain: ...}, "mean_ppl", "mean_distinct"}.

  Args:
    similarity: [E, E] the pool's expert similarity (mean over layers).
    heldout: domain -> token stream; `windows` windows of `seq_len` tokens each form a batch.
    report: called with each row as it is measured (progress).
  """
  cfg = pool.cfg

  @nnx.jit(static_argnames=("rho", "primary"))
  def evaluate(model, adapters, windows, rho, primary):
    tokens, targets = windows[:, :-1], windows[:, 1:]
    runtime = registry.runtime(adapters, sere=SereSettings(similarity, primary, rho))
    cache = KVCache.create(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
    logits, _ = model(tokens, cache, linear=runtime, all_logits=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    experts = runtime.first_route.experts.reshape(tokens.shape[0], tokens.shape[1], -1)
    hits = jax.nn.one_hot(experts, cfg.num_experts).sum(axis=(0, 2)) > 0  # [T, E]
    return ce, hits.sum(-1).mean()

  batches = {d: jnp.asarray(eval_windows(s, windows, seq_len)) for d, s in heldout.items()}
  rows = []
  for primary in primaries:
    for rho in rhos:
      row = {"primary_k": primary, "rho": float(rho), "ppl": {}, "distinct_per_step": {}}
      for domain, batch in batches.items():
        ce, distinct = evaluate(model, pool, batch, rho=float(rho), primary=primary)
        row["ppl"][domain] = math.exp(float(ce))
        row["distinct_per_step"][domain] = float(distinct)
      row["mean_ppl"] = float(np.mean(list(row["ppl"].values())))
      row["mean_distinct"] = float(np.mean(list(row["distinct_per_step"].values())))
      rows.append(row)
      if report is not None:
        report(row)
  return rows


def plan(rhos: str, primaries: str | None, top_k: int,
         max_ppl_cost: float) -> tuple[list[int], list[float]]:
  """(S values, rho values) of a sweep from their comma-separated spellings (S by default
  1 .. top-k - 1), every setting checked before any model loads (a named UserError)."""
  try:
    rho_values = [float(v) for v in rhos.split(",")]
    s_values = ([int(v) for v in primaries.split(",")] if primaries
                else list(range(1, top_k)))
  except ValueError:
    raise UserError(f"--rhos {rhos!r} and --primaries {primaries!r} must be comma-separated"
                    " numbers (e.g. --rhos 1,0.5,0 --primaries 1,2)") from None
  if not rho_values or any(not (math.isfinite(r) and 0.0 <= r <= 1.0) for r in rho_values):
    raise UserError(f"--rhos {rhos}: each rho must be in [0, 1]")
  if not s_values or any(not 1 <= p <= top_k for p in s_values):
    raise UserError(f"--primaries {primaries}: each S must be in [1, top-k = {top_k}]"
                    " (the pool's top-k)")
  if not (math.isfinite(max_ppl_cost) and max_ppl_cost >= 0):
    raise UserError(f"--max-ppl-cost {max_ppl_cost} must be a percentage >= 0")
  return s_values, rho_values


def report(model: LlamaModel, pool: MixtureOfLoRA, pool_name: str, similarity: np.ndarray,
           heldout: dict[str, np.ndarray], primaries: list[int], rhos: list[float], *,
           windows: int, seq_len: int, max_ppl_cost: float, progress: bool = True) -> dict:
  """The sweep (`sweep`) as the report saved beside a pool: its rows, the recommended setting
  (`recommend`), the environment and the command. similarity: [L, E, E] as calibrated."""
  from tqdm.auto import tqdm

  from adafuse_jax.bench.measure import environment

  sim = pregated_similarity(similarity)
  bar = tqdm(total=len(primaries) * len(rhos), desc="SERE sweep", unit="setting",
             disable=not progress)
  rows = sweep(model, pool, sim, heldout, primaries, rhos, windows=windows, seq_len=seq_len,
               report=lambda row: bar.update())
  bar.close()
  n = sim.shape[0]
  return {"environment": environment(), "pool": pool_name, "adapter": pool.cfg.to_dict(),
          "batch": windows, "seq_len": seq_len, "rows": rows,
          "similarity_mean_offdiag": float((sim.sum() - jnp.trace(sim)) / (n * (n - 1))),
          "max_ppl_cost_pct": max_ppl_cost, "recommended": recommend(rows, max_ppl_cost),
          "command": " ".join(["python -m adafuse_jax.train", *sys.argv[1:]])}


def baseline(rows: list[dict]) -> dict:
  """The row every other is compared with: no re-routing (rho = 1 if it was swept, else the
  first row)."""
  return next((r for r in rows if r["rho"] >= 1.0), rows[0])


def recommend(rows: list[dict], max_ppl_cost: float) -> dict | None:
  """{"primary_k", "rho", "mean_distinct", "ppl_cost_pct"} of the row with the fewest distinct
  experts per step whose mean perplexity is at most `max_ppl_cost` percent above the baseline's,
  or None when no row reads fewer experts than the baseline within that budget."""
  base = baseline(rows)
  best = None
  for r in rows:
    cost = 100 * (r["mean_ppl"] / base["mean_ppl"] - 1)
    if cost <= max_ppl_cost and r["mean_distinct"] < base["mean_distinct"] and (
        best is None or r["mean_distinct"] < best["mean_distinct"]):
      best = {"primary_k": r["primary_k"], "rho": r["rho"], "mean_distinct": r["mean_distinct"],
              "ppl_cost_pct": cost}
  return best


def markdown(report: dict) -> str:
  """The report's table, one line per (S, rho), each against the baseline."""
  rows, cfg = report["rows"], report["adapter"]
  domains = list(rows[0]["ppl"])
  base = baseline(rows)
  kind = ("tied: the pool is its own shared expert" if cfg.get("tied_shared")
          else f"shared expert of rank {cfg['shared_rank']}" if cfg.get("shared_rank")
          else "routed only")
  env = report["environment"]
  lines = [f"SERE on the trained pool `{report['pool']}` (pregated, {kind}, E={cfg['num_experts']},"
           f" r={cfg['rank']}, top-{cfg['top_k']}), batch steps of {report['batch']} sequences;"
           f" {env['device']}, JAX {env['jax']}, {env['date']}. Command: `{report['command']}`."
           f" Mean off-diagonal expert similarity (CKA):"
           f" {report['similarity_mean_offdiag']:.3f}.", "",
           "| S | rho | " + " | ".join(f"{d} ppl" for d in domains)
           + " | mean ppl | distinct experts / step | vs no re-routing |",
           "|---|---|" + "---|" * (len(domains) + 3)]
  for r in rows:
    lines.append(f"| {r['primary_k']} | {r['rho']:g} | "
                 + " | ".join(f"{r['ppl'][d]:.3f}" for d in domains)
                 + f" | {r['mean_ppl']:.3f} | {r['mean_distinct']:.2f} |"
                 f" {100 * (r['mean_distinct'] / base['mean_distinct'] - 1):+.0f}% experts,"
                 f" {100 * (r['mean_ppl'] / base['mean_ppl'] - 1):+.2f}% ppl |")
  rec = report.get("recommended")
  budget = report.get("max_ppl_cost_pct")
  if budget is not None:
    lines += ["", f"`--sere-rho auto` (within +{budget:g}% mean perplexity): "
              + (f"S = {rec['primary_k']}, rho = {rec['rho']:g} ({rec['mean_distinct']:.2f}"
                 f" distinct experts per step, {rec['ppl_cost_pct']:+.2f}% perplexity)."
                 if rec else "off (no setting reads fewer experts within the budget).")]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
  """Distinct experts per step (what a gathered step reads) against the perplexity cost, one
  line per S, each point labelled with its rho."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  base = baseline(rows)
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  right = (min(r["mean_distinct"] for r in rows) + max(r["mean_distinct"] for r in rows)) / 2
  for line, primary in enumerate(dict.fromkeys(r["primary_k"] for r in rows)):
    mine = [r for r in rows if r["primary_k"] == primary]
    x = [r["mean_distinct"] for r in mine]
    y = [100 * (r["mean_ppl"] / base["mean_ppl"] - 1) for r in mine]
    ax.plot(x, y, "o-", label=f"S = {primary}")
    labels: dict[tuple[float, float], list[str]] = {}  # rhos whose points nearly meet share one
    for r, xi, yi in zip(mine, x, y):
      labels.setdefault((round(xi), round(yi)), []).append(f"{r['rho']:g}")
    for (xi, yi), rhos in labels.items():
      # each S's labels on their own row; those in the right half of the plot to the left of
      # their point, so that they stay inside it
      left = xi > right
      ax.annotate("rho " + ", ".join(rhos), (xi, yi), textcoords="offset points",
                  xytext=(-4 if left else 4, 5 - 12 * line), ha="right" if left else "left",
                  fontsize=7)
  ax.axhline(0.5, color="#C44E52", ls="--", lw=1, label="+0.5% perplexity")
  ax.set_xlabel("distinct experts per batch step (bytes a gathered step reads)")
  ax.set_ylabel("mean perplexity vs no re-routing (%)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(report: dict, folder: pathlib.Path, stem: str = "sere_quality",
          figures: bool = True) -> None:
  """STEM.json in `folder`, and with `figures` STEM.md (the table) and STEM.png (the plot)."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{stem}.json").write_text(json.dumps(report, indent=2))
  if not figures:
    return
  (folder / f"{stem}.md").write_text(markdown(report))
  cfg = report["adapter"]
  plot(report["rows"], folder / f"{stem}.png",
       f"{report['pool']}: E={cfg['num_experts']}, r={cfg['rank']}, top-{cfg['top_k']},"
       f" batch {report['batch']}")
