"""Evaluation: per-domain held-out perplexity, exact match on gold answers, routing by domain.

Perplexity is kept per window and exact match per item, so that two rows scored on the same
windows and items compare pairwise with an interval (`paired_gap`, `paired_hits_gap`).

Exact match is scored by teacher forcing: greedy decoding of a prompt produces the gold answer
(followed by the end of the line) exactly when every gold token is the argmax given the prompt
and the gold tokens before it. One forward pass per batch of right-padded sequences gives that,
with no generation loop and one compiled shape for every model.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.paths import registry
from adafuse_jax.model.cache import KVCache
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.train.loop import eval_windows, window_ce

EVAL_LEN = 96


def used_params(adapters: MixtureOfLoRA) -> int:
  """Trainable parameters that take part in the forward pass: all of them, less the per-layer
  ones (experts, layer-wise routers) of the layers below `first_layer`, which carry no experts."""
  total = sum(x.size for x in jax.tree.leaves(nnx.state(adapters)))
  skip = adapters.cfg.first_layer
  if skip:
    layers = adapters.model_cfg.layers
    per_layer = [adapters.pool] + ([adapters.router] if adapters.cfg.mode == "layerwise" else [])
    total -= sum(x.size * skip // layers for m in per_layer for x in jax.tree.leaves(nnx.state(m)))
  return int(total)


def window_losses(model: LlamaModel, adapters: MixtureOfLoRA | None,
                  heldout: dict[str, np.ndarray], windows: int | None = 16, seq_len: int = 256,
                  batch: int = 8) -> dict[str, np.ndarray]:
  """Mean next-token cross-entropy (nats) of each held-out window, per domain: [W] f64 each.

  windows: evenly spaced windows per domain, or None for every non-overlapping window of the
  stream (the whole held-out set). The windows are the same for every model, so two models'
  losses pair up window by window (`paired_gap`).
  """
  out = {}
  for domain, stream in heldout.items():
    count = (len(stream) - 1) // (seq_len + 1) if windows is None else windows
    w = eval_windows(stream, count, seq_len)
    losses = [np.asarray(window_ce(model, adapters, jnp.asarray(b)), np.float64)[:n]
              for b, n in padded_batches(w, batch)]
    out[domain] = np.concatenate(losses)
  return out


def padded_batches(rows: np.ndarray, batch: int):
  """Yields (rows[i:i + batch] padded to `batch` rows with copies of row 0, its real row count):
  one compiled shape for every batch; callers drop the padding's results."""
  for i in range(0, len(rows), batch):
    b = rows[i:i + batch]
    n = len(b)
    yield (np.concatenate([b, np.repeat(rows[:1], batch - n, 0)]) if n < batch else b), n


def perplexity(window_losses_by_domain: dict[str, np.ndarray]) -> dict[str, float]:
  """Per domain, exp of the mean window loss (windows of equal length: the tokens' mean)."""
  return {d: math.exp(float(l.mean())) for d, l in window_losses_by_domain.items()}


def perplexities(model: LlamaModel, adapters: MixtureOfLoRA | None,
                 heldout: dict[str, np.ndarray], windows: int | None = 16, seq_len: int = 256
                 ) -> dict[str, float]:
  """Held-out perplexity per domain over `windows` evenly spaced windows (None: all of them)."""
  return perplexity(window_losses(model, adapters, heldout, windows, seq_len))


def _mean_interval(diff: np.ndarray, z: float) -> tuple[float, float, float]:
  """Mean of paired differences [N] and its normal interval (mean - h, mean + h)."""
  mean = float(diff.mean())
  half = z * float(diff.std(ddof=1)) / math.sqrt(len(diff)) if len(diff) > 1 else float("inf")
  return mean, mean - half, mean + half


def paired_gap(losses: np.ndarray, reference: np.ndarray, z: float = 1.96
               ) -> tuple[float, float, float]:
  """Perplexity ratio - 1 of `losses` against `reference` (per-window CE of two models on the
  same windows, [W] each) and its ~95% confidence interval (lo, hi).

  Both perplexities are exp(mean CE) over equal windows, so the ratio is exp(mean of the
  window differences); the interval is a normal one on that mean (the spread of the paired
  differences across windows). It measures which held-out text was drawn, not training noise.
  """
  losses, reference = np.asarray(losses, np.float64), np.asarray(reference, np.float64)
  if losses.shape != reference.shape:
    raise ValueError(f"window losses do not pair: {losses.shape} vs {reference.shape} (rows"
                     " evaluated on other held-out windows)")
  mean, lo, hi = _mean_interval(losses - reference, z)
  return math.expm1(mean), math.expm1(lo), math.expm1(hi)


def seed_gap(values, reference, log: bool = True, level: float = 0.95, paired: bool = False
             ) -> tuple[float, float, float]:
  """Change of a setting's mean over training seeds against a reference setting's, with a
  t interval over seeds (lo, hi): what a rerun with new seeds would move.

  Args:
    values, reference: one number per seed of each setting ([S1], [S2], S >= 2).
    log: compare geometric means and return a ratio - 1 (perplexities); else the plain
      difference of means (exact-match shares).
    paired: values[i] and reference[i] come from runs of the same seed (the same batches in
      the same order), S1 == S2: a paired t interval on the per-seed differences, which
      removes what the seed moves in both runs alike. Else unpaired, Welch's interval.
  """
  from scipy import stats

  a, b = np.asarray(values, np.float64), np.asarray(reference, np.float64)
  if a.size < 2 or b.size < 2:
    raise ValueError(f"a seed interval needs at least 2 seeds per setting, got {a.size} and {b.size}")
  if paired and a.shape != b.shape:
    raise ValueError(f"paired seeds need one reference run per run, got {a.size} and {b.size}")
  if log:
    a, b = np.log(a), np.log(b)
  diff = float(a.mean() - b.mean())
  if paired:
    var, df = (a - b).var(ddof=1) / a.size, a.size - 1
  else:  # Welch-Satterthwaite degrees of freedom
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    var = va + vb
    df = var ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)) if var else 1
  half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(var) if var else 0.0
  lo, hi = diff - half, diff + half
  if log:
    return math.expm1(diff), math.expm1(lo), math.expm1(hi)
  return diff, lo, hi


def format_gap(gap: float, lo: float, hi: float, unit: str = "%") -> str:
  """A paired change and its interval as printed in tables: "+0.7% [+0.6, +0.8]" (shares x100)."""
  return f"{100 * gap:+.1f}{unit} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def paired_hits_gap(hits: str, reference: str, z: float = 1.96) -> tuple[float, float, float]:
  """Exact-match difference (share, e.g. -0.01 = one point lower) of two rows scored on the
  same items, from their per-item hit strings ("0110..."), with a ~95% interval (lo, hi)."""
  if len(hits) != len(reference):
    raise ValueError(f"item hits do not pair: {len(hits)} vs {len(reference)} items")
  return _mean_interval(np.array([int(a) - int(b) for a, b in zip(hits, reference)], np.float64), z)


@nnx.jit
def _argmax_logits(model, adapters, tokens):
  cache = KVCache.create(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
  if adapters is None:
    logits, _ = model(tokens, cache, all_logits=True)
  else:
    logits, _ = model(tokens, cache, linear=registry.runtime(adapters), all_logits=True)
  return jnp.argmax(logits, -1)


def encode_items(tok, items: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
  """(prompt, gold continuation) pairs -> right-padded tokens [N, T] and a mask [N, T] of the
  positions whose argmax must equal the next token (the gold continuation); T is the longest
  item rounded up to a multiple of EVAL_LEN // 3."""
  pad = min(tok.eos_ids)
  encoded = []
  for prompt, gold in items:
    p = tok.encode(prompt)
    full = tok.encode(prompt + gold)
    if full[:len(p)] != p:  # the tokenizer merged across the boundary: score the gold alone
      full = p + tok.encode(gold)
    if len(full) == len(p):
      raise ValueError(f"empty gold continuation for {prompt[-40:]!r}")
    encoded.append((p, full))
  step = EVAL_LEN // 3
  length = -(-max(len(f) for _, f in encoded) // step) * step
  rows, masks = [], []
  for p, full in encoded:
    row = np.full(length, pad, np.int32)
    row[:len(full)] = full
    mask = np.zeros(length, bool)
    mask[len(p) - 1:len(full) - 1] = True  # logits at t predict token t + 1
    rows.append(row)
    masks.append(mask)
  return np.stack(rows), np.stack(masks)


def exact_match(model, adapters, tok, items: list[tuple[str, str]], batch: int = 32) -> float:
  """Share of items whose gold continuation greedy decoding would produce exactly."""
  return float(np.mean(item_hits(model, adapters, tok, items, batch)))


def item_hits(model, adapters, tok, items: list[tuple[str, str]], batch: int = 32) -> np.ndarray:
  """Per item: would greedy decoding produce the gold continuation exactly? [N] bool."""
  tokens, masks = encode_items(tok, items)
  hits = []
  for i, (t, n) in zip(range(0, len(tokens), batch), padded_batches(tokens, batch)):
    m = masks[i:i + batch]
    pred = np.asarray(_argmax_logits(model, adapters, jnp.asarray(t)))[:n]
    ok = (pred[:, :-1] == t[:n, 1:]) | ~m[:, :-1]
    hits.append(ok.all(axis=1))
  return np.concatenate(hits)


def math_items(cache: pathlib.Path, shots: int = 3) -> list[tuple[str, str]]:
  """The generator's interpolate problems as (few-shot prompt, " answer\\n")."""
  qa = [json.loads(l) for l in (cache / "math_qa.heldout.jsonl").read_text().splitlines()]
  prefix = "".join(f"Question: {p['q']}\nAnswer: {p['a']}\n" for p in qa[:shots])
  return [(f"{prefix}Question: {p['q']}\nAnswer:", f" {p['a']}\n") for p in qa[shots:]]


def analogy_items(cache: pathlib.Path, count: int = 300, seed: int = 0) -> list[tuple[str, str]]:
  """Mikolov analogies "a is to b as c is to" -> " d" with a fixed two-shot prefix."""
  lines = [l.split() for l in (cache / "questions-words.txt").read_text().splitlines()
           if l and not l.startswith(":")]
  rng = np.random.default_rng(seed)
  picks = [lines[i] for i in rng.choice(len(lines), count + 2, replace=False)]
  prefix = "".join(f"{a} is to {b} as {c} is to {d}.\n" for a, b, c, d in picks[:2])
  return [(f"{prefix}{a} is to {b} as {c} is to", f" {d}") for a, b, c, d in picks[2:]]


@nnx.jit
def _first_route(model, adapters, tokens):
  runtime = registry.runtime(adapters)
  cache = KVCache.create(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
  model(tokens, cache, linear=runtime, all_logits=True)
  return runtime.first_route.experts, runtime.first_route.gates


def routing_by_domain(model, adapters, heldout: dict[str, np.ndarray], windows: int = 8,
                      seq_len: int = 256) -> dict:
  """Expert load per domain ([D, E] shares of the top-k choices) and switch rates.

  switch rate (set): how often a token's top-k set differs from the previous token's.
  switch rate (merge): how often a merged decode must rebuild (set or gates differ).
  """
  if adapters is None or adapters.router is None:
    return {}
  num_experts = adapters.cfg.num_experts
  loads, set_changes, merge_changes, pairs = [], 0, 0, 0
  for domain, stream in heldout.items():
    w = jnp.asarray(eval_windows(stream, windows, seq_len)[:, :-1])
    experts, gates = _first_route(model, adapters, w)
    experts = np.asarray(experts).reshape(w.shape[0], w.shape[1], -1)
    gates = np.asarray(gates).reshape(w.shape[0], w.shape[1], -1)
    loads.append(np.bincount(experts.ravel(), minlength=num_experts) / experts.size)
    order = np.argsort(experts, axis=-1)
    e_sorted = np.take_along_axis(experts, order, -1)
    g_sorted = np.take_along_axis(gates[..., :experts.shape[-1]], order, -1) if gates.ndim == 3 else None
    set_diff = (e_sorted[:, 1:] != e_sorted[:, :-1]).any(-1)
    gate_diff = (np.abs(g_sorted[:, 1:] - g_sorted[:, :-1]) > 0).any(-1) if g_sorted is not None else set_diff
    set_changes += int(set_diff.sum())
    merge_changes += int((set_diff | gate_diff).sum())
    pairs += set_diff.size
  return {"domains": list(heldout), "load": np.stack(loads).tolist(),
          "switch_rate_set": set_changes / pairs, "switch_rate_merge": merge_changes / pairs}


def heatmap(routing: dict, path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  load = np.asarray(routing["load"])
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * load.shape[1], 1.0 + 0.6 * load.shape[0]))
  im = ax.imshow(load * 100, cmap="viridis", aspect="auto")
  ax.set_xticks(range(load.shape[1]), [f"e{i}" for i in range(load.shape[1])])
  ax.set_yticks(range(load.shape[0]), routing["domains"])
  ax.set_xlabel("expert")
  ax.set_ylabel("domain (held-out text)")
  for (i, j), v in np.ndenumerate(load * 100):
    ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 30 else "k", fontsize=8)
  fig.colorbar(im, ax=ax, label="share of top-k choices (%)")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
