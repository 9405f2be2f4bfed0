"""Do the decode paths generate the same text? Greedy tokens and teacher-forced logits (GPU, bf16).

    python tools/path_equality.py --out DIR [--tokens 200] [--dtype bfloat16] [--model GGUF]

The default model with its trained pre-gated pool (`--adapters default`) generates `--tokens`
greedy tokens on each path: `xla` (unmerged, plain matmuls), `packed`, `gathered` (Pallas
BGMV kernels) and `merged` (SGMM switch + backbone pass). Then every path is fed the `xla` path's
tokens (teacher forcing) and its logits are compared with `xla`'s at every position. Writes
`path_equality.json` and `path_equality.md` under --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.adapters.io import resolve_adapters
from adafuse_jax.bench.measure import environment
from adafuse_jax.config import AdapterConfig
from adafuse_jax.generation import CACHE_ROUND, Generator, generate, round_up
from adafuse_jax.weights import load_model

PATHS = ("xla", "packed", "gathered", "merged")
PROMPT = "The history of the printing press begins"


def teacher_forced_logits(gen: Generator, prompt: list[int], tokens: list[int]) -> np.ndarray:
  """Logits [len(tokens), V] (f32) of each position, feeding `tokens` after the prompt."""
  cache = gen.new_cache(1, round_up(len(prompt) + len(tokens) + 1, CACHE_ROUND))
  key = jax.random.key(0)
  _, logits, cache, _ = gen.forward(jnp.asarray([prompt], jnp.int32), cache, key)
  out = [np.asarray(logits[0], np.float32)]
  for t in tokens[:-1]:
    _, logits, cache, _ = gen.forward(jnp.asarray([[t]], jnp.int32), cache, key)
    out.append(np.asarray(logits[0], np.float32))
  return np.stack(out)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--tokens", type=int, default=200)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--model", default="default", help="the default model, or its GGUF file's path")
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  dtype = jnp.dtype(args.dtype)
  lm = load_model(args.model, dtype=dtype, progress=False)
  model, tok = lm.model, lm.tokenizer
  adapters = resolve_adapters("default", AdapterConfig(), model.cfg, dtype=dtype, seed=0)
  prompt = tok.encode(PROMPT)
  runs = {}
  for name in PATHS:
    gen = Generator(model, adapters=adapters, path=name)
    res = generate(gen, [prompt], max_new_tokens=args.tokens)
    runs[name] = {"gen": gen, "tokens": res.tokens[0]}
  ref = runs["xla"]["tokens"]
  ref_logits = teacher_forced_logits(runs["xla"]["gen"], prompt, ref)
  rows = []
  for name, run in runs.items():
    same = [a == b for a, b in zip(run["tokens"], ref)]
    first_diff = next((i for i, s in enumerate(same) if not s), None)
    logits = teacher_forced_logits(run["gen"], prompt, ref)
    diff = np.abs(logits - ref_logits)
    argmax_agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
    rows.append({"path": name, "tokens": len(run["tokens"]),
                 "identical_to_xla": run["tokens"] == ref, "first_divergence": first_diff,
                 "max_abs_logit_diff": float(diff.max()),
                 "mean_abs_logit_diff": float(diff.mean()),
                 "logit_scale": float(np.abs(ref_logits).max()),
                 "teacher_forced_argmax_agreement": argmax_agree})
  names = list(runs)
  pairwise = {a: {b: next((i for i, (x, y) in enumerate(zip(runs[a]["tokens"], runs[b]["tokens"]))
                           if x != y), None) for b in names} for a in names}
  from pallas_kernels import sgmm
  merged_weights = list(runs["merged"]["gen"].switch_state.weights.values())
  kernel = ("XLA (per-layer weights)" if isinstance(merged_weights[0], tuple)
            else sgmm.backend_for(merged_weights, adapters.cfg.top_k * adapters.cfg.rank))
  report = {"environment": environment(), "dtype": args.dtype, "prompt": PROMPT,
            "merged_switch_kernel": kernel, "first_divergence_pairwise": pairwise,
            "adapters": f"default (trained, pre-gated): {adapters.cfg.to_dict()}",
            "results": rows}
  (out / "path_equality.json").write_text(json.dumps(report, indent=1))
  lines = [f"{report['environment']['device']}, JAX {report['environment']['jax']},"
           f" {args.dtype}, default model + trained pool, prompt {PROMPT!r},"
           f" {args.tokens} greedy tokens per path; logits teacher-forced on the xla path's tokens;"
           f" `merged` switches with the {kernel} kernel.",
           "", "| path | same tokens as xla | first divergence | max abs logit diff |"
           " mean abs logit diff | argmax agreement (teacher-forced) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['path']} | {r['identical_to_xla']} | {r['first_divergence']} |"
                 f" {r['max_abs_logit_diff']:.3f} | {r['mean_abs_logit_diff']:.4f} |"
                 f" {100 * r['teacher_forced_argmax_agreement']:.1f}% |")
  lines += ["", "First position where two paths' greedy tokens differ (none = all equal):", "",
            "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for a in names:
    lines.append(f"| {a} | " + " | ".join(str(pairwise[a][b] if pairwise[a][b] is not None
                                              else "none") for b in names) + " |")
  text = "\n".join(lines)
  (out / "path_equality.md").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
