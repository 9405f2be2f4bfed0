"""SERE re-routing: fewer distinct experts per batch step, routing weights unchanged.

A batch's tokens pick their top-k experts independently, so a decode step of B sequences can touch
up to B·k experts, each costing its bytes. SERE (similarity-based expert re-routing) keeps each
token's top-S choices (the *primary* experts of the step are the union of them) and moves every
other (*secondary*) choice that is not primary to the most similar primary expert, when that
similarity is at least ρ; otherwise it stays. ρ = 1 turns it off; ρ = 0 moves every secondary
choice. The gates are not touched: a token whose secondary lands on its own primary expert simply
gives that expert both gates.

Similarity: linear CKA between the experts' outputs `X A_e B_e` on calibration activations, per
adapted module and layer, averaged over modules (`[L, E, E]`, in [0, 1], 1 on the diagonal). A
pre-gated decision is shared by every layer, so re-routing uses the mean over layers.
"""

from __future__ import annotations

import pathlib

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.model.cache import KVCache

SIMILARITY_FILE = "sere_similarity.npy"
# The measured quality sweep of a pool (`adafuse_jax.train.sere_sweep`), with the setting that
# `--sere-rho auto` uses.
QUALITY_FILE = "sere_quality.json"


@dataclasses.dataclass(frozen=True)
class SereSettings:
  """SERE re-routing of pre-gated choices: similarity [E, E], the number of primary choices per
  token S, and the threshold rho (1 = off)."""

  similarity: jax.Array
  primary_k: int = 1
  rho: float = 0.5


def linear_cka(y: jax.Array) -> jax.Array:
  """Pairwise linear CKA of E representations. y [E, N, D] -> [E, E] in [0, 1]."""
  y = y.astype(jnp.float32)
  y = y - y.mean(axis=1, keepdims=True)
  # ||Yi^T Yj||_F^2 via the N x N Gram matrices: <K_i, K_j> with K = Y Y^T.
  gram = jnp.einsum("end,emd->enm", y, y)
  dots = jnp.einsum("inm,jnm->ij", gram, gram)
  norms = jnp.sqrt(jnp.clip(jnp.diagonal(dots), 1e-30))
  return jnp.clip(dots / (norms[:, None] * norms[None, :]), 0.0, 1.0)


def expert_similarity(adapters, activations: dict[str, list[jax.Array]]) -> np.ndarray:
  """[L', E, E] mean over adapted modules of the CKA between experts' outputs, per adapted layer
  (L' = L - first_layer).

  activations: module -> per layer, the inputs [N, in] that module saw on calibration text.
  """
  pool = adapters.pool
  per_layer = []
  # Layers below first_layer carry no experts (their outputs would be zeros: no similarity).
  for layer in range(adapters.cfg.first_layer, len(next(iter(activations.values())))):
    mats = []
    for m, xs in activations.items():
      a, b = pool.factors(m, layer)  # [in, E, r], [E, r, out]
      y = jnp.einsum("ni,ier,ero->eno", xs[layer].astype(jnp.float32), a.astype(jnp.float32),
                     b.astype(jnp.float32))
      mats.append(linear_cka(y))
    per_layer.append(jnp.mean(jnp.stack(mats), axis=0))
  return np.asarray(jnp.stack(per_layer))


def calibrate(model, adapters, tokens: jax.Array, runtime) -> np.ndarray:
  """Runs calibration tokens [B, T] through the model with the adapters applied by `runtime` (a
  `LinearFn`, e.g. `adafuse_jax.paths.runtime(adapters)`) and returns the [L, E, E] similarity
  of `expert_similarity`."""
  seen: dict[str, list] = {m: [None] * model.cfg.layers for m in adapters.cfg.modules}

  def linear(name, layer, x, w):
    if name in seen:
      seen[name][layer] = x.reshape(-1, x.shape[-1])
    return runtime(name, layer, x, w)

  cache = KVCache.create(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
  model(tokens, cache, linear=linear, all_logits=True)
  return expert_similarity(adapters, seen)


def pregated_similarity(similarity: np.ndarray | jax.Array) -> jax.Array:
  """[L, E, E] per-layer similarities as calibrated -> [E, E]: a pre-gated choice serves every
  layer, so SERE re-routes it on the mean similarity over layers."""
  return jnp.asarray(similarity).mean(0)


def save_similarity(path: str | pathlib.Path, similarity: np.ndarray) -> None:
  np.save(pathlib.Path(path) / SIMILARITY_FILE, np.asarray(similarity, np.float32))


def load_similarity(path: str | pathlib.Path) -> np.ndarray | None:
  f = pathlib.Path(path) / SIMILARITY_FILE
  return np.load(f) if f.exists() else None


def load_recommendation(path: str | pathlib.Path) -> tuple[dict | None, float] | None:
  """(the setting {"primary_k", "rho", ...} the pool's quality sweep recommends, or None for
  off; the perplexity budget in percent it was chosen for), or None where the pool has no
  QUALITY_FILE."""
  f = pathlib.Path(path) / QUALITY_FILE
  if not f.is_file():
    return None
  import json

  report = json.loads(f.read_text())
  return report.get("recommended"), float(report.get("max_ppl_cost_pct", 0.5))


def reroute(experts: jax.Array, similarity: jax.Array, primary_k: int, rho: float) -> jax.Array:
  """SERE over one batch step. experts [B, k] int32, similarity [E, E] -> experts [B, k].

  Deterministic and jit-compatible (ties go to the lower expert id).
  """
  num_experts = similarity.shape[0]
  b, k = experts.shape
  if rho >= 1.0 or primary_k >= k:
    return experts
  primary = jnp.zeros((num_experts,), bool).at[experts[:, :primary_k].reshape(-1)].set(True)
  secondary = experts[:, primary_k:]  # [B, k - S]
  sims = jnp.where(primary[None, None, :], similarity[secondary], -1.0)  # [B, k-S, E]
  best = jnp.argmax(sims, axis=-1).astype(experts.dtype)
  best_sim = jnp.max(sims, axis=-1)
  move = ~primary[secondary] & (best_sim >= rho)
  return jnp.concatenate([experts[:, :primary_k], jnp.where(move, best, secondary)], axis=1)


def distinct_experts(experts: jax.Array, num_experts: int) -> jax.Array:
  """How many distinct experts a batch step touches. experts [B, k] -> scalar."""
  return jnp.zeros((num_experts,), bool).at[experts.reshape(-1)].set(True).sum()
