"""Quality cost of SERE re-routing on a trained pool, per domain, swept over rho and S.

    python tools/sere_quality.py [--adapters default|POOL_DIR] [--out docs/sere]
                                 [--rhos 1,0.5,0.2,0] [--primaries 1]

Calibrates the expert similarity (linear CKA of the experts' outputs, `adafuse_jax.adapters.sere`) on
training text of every domain, stores it with the pool (`sere_similarity.npy`), then measures
held-out perplexity per domain with batch-level re-routing for each (S, rho): the `--windows`
held-out windows of a domain are decoded as one batch, so the tokens at one position form one
batch step; S is how many of each token's choices are primary (kept), rho the similarity a
secondary choice needs to be re-routed to a primary one (1 = off). Also reports the distinct
experts per step (what a gathered step reads) and plots them against the perplexity cost
(`quality.png`): the speed side of the trade, by bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from adafuse_jax.adapters.io import DEFAULT_POOL, read_adapter_config, resolve_adapters
from adafuse_jax.adapters.sere import SereSettings
from adafuse_jax.bench.measure import environment
from adafuse_jax.model.cache import KVCache
from adafuse_jax.paths import registry
from adafuse_jax.adapters.sere import calibrate, save_similarity
from adafuse_jax.weights import load_model
from adafuse_jax.train import data
from adafuse_jax.train.loop import eval_windows


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--adapters", default="default", help="'default' (the shipped pool) or a pool folder")
  p.add_argument("--out", default="docs/sere")
  p.add_argument("--rhos", default="1,0.5,0.2,0")
  p.add_argument("--primaries", default="1", help="S values, each at most the pool's top-k")
  p.add_argument("--windows", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--replot", action="store_true",
                 help="only draw quality.png again from the quality.json in --out")
  args = p.parse_args()
  if args.replot:
    report = json.loads((pathlib.Path(args.out) / "quality.json").read_text())
    rows = report["rows"]
    for r in rows:  # reports before the S sweep held S = 1 only
      r.setdefault("primary_k", report.get("primary_k", 1))
    a = report.get("adapter", {})
    plot(rows, next((r for r in rows if r["rho"] >= 1.0), rows[0]),
         pathlib.Path(args.out) / "quality.png",
         f"{report['pool']}: E={a.get('num_experts')}, r={a.get('rank')}, top-{a.get('top_k')},"
         f" batch {report['batch']}")
    return
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  loaded = load_model(progress=False)
  model = loaded.model
  folder = DEFAULT_POOL if args.adapters == "default" else pathlib.Path(args.adapters)
  cfg, _ = read_adapter_config(folder)
  pool = resolve_adapters(args.adapters, cfg, model.cfg)
  primaries = [int(x) for x in args.primaries.split(",")]
  if any(not 1 <= s <= cfg.top_k for s in primaries):
    p.error(f"--primaries {args.primaries}: each S must be in [1, top-k = {cfg.top_k}]")
  cache_dir = data.default_cache()
  data.prepare(cache_dir, progress=False)
  train_streams = data.load_streams(cache_dir, "train")
  heldout = data.load_streams(cache_dir, "heldout")
  calib = np.concatenate([eval_windows(s, 2, 128)[:, :-1] for s in train_streams.values()])
  similarity = calibrate(model, pool, jnp.asarray(calib), registry.runtime(pool))
  save_similarity(folder, similarity)
  sim = jnp.asarray(similarity.mean(0))

  rows = []
  for primary, rho in ((s, float(x)) for s in primaries for x in args.rhos.split(",")):
    sere = SereSettings(sim, primary, rho)

    @nnx.jit
    def evaluate(model, adapters, windows):
      tokens, targets = windows[:, :-1], windows[:, 1:]
      runtime = registry.runtime(adapters, sere=sere)
      cache = KVCache.create(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
      logits, _ = model(tokens, cache, linear=runtime, all_logits=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      experts = runtime.first_route.experts.reshape(tokens.shape[0], tokens.shape[1], -1)
      hits = jax.nn.one_hot(experts, cfg.num_experts).sum(axis=(0, 2)) > 0  # [T, E]
      return ce, hits.sum(-1).mean()

    row = {"primary_k": primary, "rho": rho, "ppl": {}, "distinct_per_step": {}}
    for domain, stream in heldout.items():
      ce, distinct = evaluate(model, pool, jnp.asarray(eval_windows(stream, args.windows,
                                                                    args.seq_len)))
      row["ppl"][domain] = math.exp(float(ce))
      row["distinct_per_step"][domain] = float(distinct)
    row["mean_ppl"] = float(np.mean(list(row["ppl"].values())))
    row["mean_distinct"] = float(np.mean(list(row["distinct_per_step"].values())))
    rows.append(row)
    print(json.dumps(row), flush=True)
  report = {"environment": environment(), "pool": str(folder.name), "adapter": cfg.to_dict(),
            "batch": args.windows, "seq_len": args.seq_len, "rows": rows,
            "similarity_mean_offdiag": float((sim.sum() - jnp.trace(sim)) /
                                             (sim.shape[0] * (sim.shape[0] - 1)))}
  (out / "quality.json").write_text(json.dumps(report, indent=2))
  domains = list(rows[0]["ppl"])
  # The reference of every row: no re-routing (rho = 1 if it was swept, else the first row).
  base = next((r for r in rows if r["rho"] >= 1.0), rows[0])
  kind = ("tied: the pool is its own shared expert" if cfg.tied_shared
          else f"shared expert of rank {cfg.shared_rank}" if cfg.shared_rank else "routed only")
  command = " ".join(["python tools/sere_quality.py", *sys.argv[1:]])
  lines = [f"SERE on the trained pool `{folder.name}` (pregated, {kind}, E={cfg.num_experts},"
           f" r={cfg.rank}, top-{cfg.top_k}), batch steps of {args.windows} sequences;"
           f" {report['environment']['device']}, JAX {report['environment']['jax']},"
           f" {report['environment']['date']}. Command: `{command}`. Mean off-diagonal expert"
           f" similarity (CKA): {report['similarity_mean_offdiag']:.3f}.", "",
           "| S | rho | " + " | ".join(f"{d} ppl" for d in domains)
           + " | mean ppl | distinct experts / step | vs no re-routing |",
           "|---|---|" + "---|" * (len(domains) + 3)]
  for r in rows:
    lines.append(f"| {r['primary_k']} | {r['rho']:g} | "
                 + " | ".join(f"{r['ppl'][d]:.3f}" for d in domains)
                 + f" | {r['mean_ppl']:.3f} | {r['mean_distinct']:.2f} |"
                 f" {100 * (r['mean_distinct'] / base['mean_distinct'] - 1):+.0f}% experts,"
                 f" {100 * (r['mean_ppl'] / base['mean_ppl'] - 1):+.2f}% ppl |")
  (out / "quality.md").write_text("\n".join(lines) + "\n")
  plot(rows, base, out / "quality.png", f"{folder.name}: E={cfg.num_experts}, r={cfg.rank},"
       f" top-{cfg.top_k}, batch {args.windows}")
  print("\n".join(lines))


def plot(rows: list[dict], base: dict, path: pathlib.Path, title: str) -> None:
  """Distinct experts per step (what a gathered step reads) against the perplexity cost, one
  line per S, each point labelled with its rho."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  for line, primary in enumerate(dict.fromkeys(r["primary_k"] for r in rows)):
    mine = [r for r in rows if r["primary_k"] == primary]
    x = [r["mean_distinct"] for r in mine]
    y = [100 * (r["mean_ppl"] / base["mean_ppl"] - 1) for r in mine]
    ax.plot(x, y, "o-", label=f"S = {primary}")
    labels: dict[tuple[float, float], list[str]] = {}  # rhos whose points nearly meet share one
    for r, xi, yi in zip(mine, x, y):
      labels.setdefault((round(xi), round(yi)), []).append(f"{r['rho']:g}")
    right = (min(r["mean_distinct"] for r in rows) + max(r["mean_distinct"] for r in rows)) / 2
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


if __name__ == "__main__":
  main()
