"""Quality cost of SERE re-routing on a trained pool, per domain, swept over rho and S.

    python tools/sere_quality.py [--adapters default|POOL_DIR] [--out docs/sere]
                                 [--rhos 1,0.5,0.2,0] [--primaries 1]

Calibrates the expert similarity (linear CKA of the experts' outputs, `adafuse_jax.adapters.sere`) on
training text of every domain and stores it with the pool (`sere_similarity.npy`) where the pool
has none (or with --recalibrate), then measures
held-out perplexity per domain with batch-level re-routing for each (S, rho): the `--windows`
held-out windows of a domain are decoded as one batch, so the tokens at one position form one
batch step; S is how many of each token's choices are primary (kept), rho the similarity a
secondary choice needs to be re-routed to a primary one (1 = off). Also reports the distinct
experts per step (what a gathered step reads) and plots them against the perplexity cost
(`quality.png`): the speed side of the trade, by bytes. The library does the sweep
(`adafuse_jax.train.sere_sweep`, what `python -m adafuse_jax.train sere-calibrate --sweep` runs
for a saved pool); this tool also sweeps the shipped pool, writes the report into --out as
quality.{json,md,png}, and saves `sere_quality.json` beside the pool (what `--sere-rho auto`
reads).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from adafuse_jax.adapters.io import DEFAULT_POOL, read_adapter_config, resolve_adapters
from adafuse_jax.adapters.sere import load_similarity, save_similarity
from adafuse_jax.errors import UserError
from adafuse_jax.train import data, sere_sweep
from adafuse_jax.weights import load_model


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--adapters", default="default", help="'default' (the shipped pool) or a pool folder")
  p.add_argument("--out", default="docs/sere")
  p.add_argument("--rhos", default="1,0.5,0.2,0")
  p.add_argument("--primaries", default="1", help="S values, each at most the pool's top-k")
  p.add_argument("--windows", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--max-ppl-cost", type=float, default=0.5,
                 help="the mean perplexity (percent) the recommended setting may add")
  p.add_argument("--recalibrate", action="store_true",
                 help="compute the similarity again even where the pool already has one")
  p.add_argument("--replot", action="store_true",
                 help="only draw quality.md and quality.png again from the quality.json in --out")
  args = p.parse_args()
  out = pathlib.Path(args.out)
  if args.replot:
    report = json.loads((out / "quality.json").read_text())
    for r in report["rows"]:  # reports before the S sweep held S = 1 only
      r.setdefault("primary_k", report.get("primary_k", 1))
    argv = report["environment"].get("command", "").split()[1:]
    report.setdefault("command", " ".join(["python tools/sere_quality.py", *argv]))
    report.setdefault("max_ppl_cost_pct", args.max_ppl_cost)
    report.setdefault("recommended", sere_sweep.recommend(report["rows"],
                                                          report["max_ppl_cost_pct"]))
    sere_sweep.write(report, out, stem="quality")
    return
  loaded = load_model(progress=False)
  model = loaded.model
  folder = DEFAULT_POOL if args.adapters == "default" else pathlib.Path(args.adapters)
  cfg, _ = read_adapter_config(folder)
  pool = resolve_adapters(args.adapters, cfg, model.cfg)
  try:
    primaries, rhos = sere_sweep.plan(args.rhos, args.primaries, cfg.top_k, args.max_ppl_cost)
  except UserError as e:
    p.error(str(e))
  cache_dir = data.default_cache()
  data.prepare(cache_dir, progress=False)
  train_streams = data.load_streams(cache_dir, "train")
  heldout = data.load_streams(cache_dir, "heldout")
  similarity = None if args.recalibrate else load_similarity(folder)
  if similarity is None:
    similarity, _ = sere_sweep.calibrate_on(model, pool, train_streams, windows=2, seq_len=128)
    save_similarity(folder, similarity)
  report = sere_sweep.report(model, pool, folder.name, similarity, heldout, primaries, rhos,
                             windows=args.windows, seq_len=args.seq_len,
                             max_ppl_cost=args.max_ppl_cost)
  report["command"] = " ".join(["python tools/sere_quality.py", *sys.argv[1:]])
  sere_sweep.write(report, out, stem="quality")
  sere_sweep.write(report, folder, figures=False)  # what --sere-rho auto reads
  print(sere_sweep.markdown(report))


if __name__ == "__main__":
  main()
