"""Quality cost of SERE re-routing on the trained SmolLM2 pool, per domain.

    python tools/sere_quality.py [--out docs/sere] [--rhos 1,0.5,0.2,0]

Calibrates the expert similarity (linear CKA of the experts' outputs, `adafuse_jax.adapters.sere`) on
training text of every domain, stores it with the pool (`sere_similarity.npy`), then measures
held-out perplexity per domain with batch-level re-routing for each rho: the 16 held-out windows
of a domain are decoded as one batch, so the tokens at one position form one batch step, and
S = 1 (each token's first choice is primary). Also reports the distinct experts per step.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

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
  p.add_argument("--out", default="docs/sere")
  p.add_argument("--rhos", default="1,0.5,0.2,0")
  p.add_argument("--windows", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=256)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  loaded = load_model(progress=False)
  model = loaded.model
  cfg, _ = read_adapter_config(DEFAULT_POOL)
  pool = resolve_adapters("default", cfg, model.cfg)
  cache_dir = data.default_cache()
  data.prepare(cache_dir, progress=False)
  train_streams = data.load_streams(cache_dir, "train")
  heldout = data.load_streams(cache_dir, "heldout")
  calib = np.concatenate([eval_windows(s, 2, 128)[:, :-1] for s in train_streams.values()])
  similarity = calibrate(model, pool, jnp.asarray(calib), registry.runtime(pool))
  save_similarity(DEFAULT_POOL, similarity)
  sim = jnp.asarray(similarity.mean(0))

  rows = []
  for rho in (float(x) for x in args.rhos.split(",")):
    sere = SereSettings(sim, 1, rho)

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

    row = {"rho": rho, "ppl": {}, "distinct_per_step": {}}
    for domain, stream in heldout.items():
      ce, distinct = evaluate(model, pool, jnp.asarray(eval_windows(stream, args.windows,
                                                                    args.seq_len)))
      row["ppl"][domain] = math.exp(float(ce))
      row["distinct_per_step"][domain] = float(distinct)
    row["mean_ppl"] = float(np.mean(list(row["ppl"].values())))
    row["mean_distinct"] = float(np.mean(list(row["distinct_per_step"].values())))
    rows.append(row)
    print(json.dumps(row), flush=True)
  report = {"environment": environment(), "pool": str(DEFAULT_POOL.name), "primary_k": 1,
            "batch": args.windows, "seq_len": args.seq_len, "rows": rows,
            "similarity_mean_offdiag": float((sim.sum() - jnp.trace(sim)) /
                                             (sim.shape[0] * (sim.shape[0] - 1)))}
  (out / "quality.json").write_text(json.dumps(report, indent=2))
  domains = list(rows[0]["ppl"])
  base = rows[0]
  kind = ("tied: the pool is its own shared expert" if cfg.tied_shared
          else f"shared expert of rank {cfg.shared_rank}" if cfg.shared_rank else "routed only")
  lines = [f"SERE on the trained SmolLM2 pool (pregated, {kind}, E={cfg.num_experts},"
           f" r={cfg.rank}, top-{cfg.top_k}),"
           f" S = 1, batch steps of {args.windows} sequences; {report['environment']['device']},"
           f" JAX {report['environment']['jax']}, {report['environment']['date']}. Command:"
           f" `python tools/sere_quality.py`. Mean off-diagonal expert similarity (CKA):"
           f" {report['similarity_mean_offdiag']:.3f}.", "",
           "| rho | " + " | ".join(f"{d} ppl" for d in domains)
           + " | mean ppl | distinct experts / step | vs rho=1 |",
           "|---|" + "---|" * (len(domains) + 3)]
  for r in rows:
    lines.append(f"| {r['rho']:g} | " + " | ".join(f"{r['ppl'][d]:.3f}" for d in domains)
                 + f" | {r['mean_ppl']:.3f} | {r['mean_distinct']:.2f} |"
                 f" {100 * (r['mean_distinct'] / base['mean_distinct'] - 1):+.0f}% experts,"
                 f" {100 * (r['mean_ppl'] / base['mean_ppl'] - 1):+.2f}% ppl |")
  (out / "quality.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
