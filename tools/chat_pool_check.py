"""Does a pool keep the chat format, and what does it cost on the domains? The backbone and
pools side by side: held-out perplexity per built-in domain (the same windows for every row,
gaps paired by window against the first pool), and how often a greedy chat reply ends its turn
with EOS, on questions made from held-out documents (no training chat came from them).

    python tools/chat_pool_check.py --pools default,/tmp/chat-pool --out docs/training/chat-tuned

Writes OUT/check.md and OUT/check.json; CPU is fine (the default model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import jax
import numpy as np

from adafuse_jax.adapters.io import load_pool
from adafuse_jax.generation import Generator, generate
from adafuse_jax.train import chat, data, eval as ev
from adafuse_jax.weights import load_model


def turn_ends(model, pool, tok, questions, max_new_tokens: int) -> dict:
  """Share of greedy chat replies that end with EOS within `max_new_tokens`, and that write a
  next turn as plain text ("\\nuser\\n"), the shipped pool's habit."""
  gen = Generator(model, adapters=pool)
  ids = [tok.encode_chat([{"role": "user", "content": q}]) for _, q in questions]
  ended, leaked = [], []
  for i in range(0, len(ids), 16):
    res = generate(gen, ids[i:i + 16], max_new_tokens=max_new_tokens, stop_ids=tok.eos_ids,
                   pad_id=min(tok.eos_ids))
    ended += [r == "eos" for r in res.stop_reasons]
    leaked += ["\nuser\n" in tok.decode(t) for t in res.tokens]
  return {"ended": float(np.mean(ended)), "leaked_next_turn": float(np.mean(leaked)),
          "questions": len(ids)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pools", required=True, help="comma-separated --adapters specs; the first is"
                 " the reference of the paired gaps")
  p.add_argument("--out", required=True)
  p.add_argument("--windows", type=int, default=16, help="held-out windows per domain")
  p.add_argument("--questions", type=int, default=8, help="held-out chat questions per domain")
  p.add_argument("--max-new-tokens", type=int, default=64)
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  loaded = load_model(progress=False)
  model, tok = loaded.model, loaded.tokenizer
  cache = data.default_cache()
  data.prepare(cache, progress=False)
  heldout = data.load_streams(cache, "heldout")
  questions = chat.chat_questions(chat.domain_documents(cache, "heldout", min(tok.eos_ids)), tok,
                                  args.questions, seed=1)
  questions.append(("canonical", "What is 2 + 2?"))
  rows = {}
  for spec in ["backbone", *args.pools.split(",")]:
    pool = None if spec == "backbone" else load_pool(spec, model.cfg, dtype=model.dtype)
    losses = ev.window_losses(model, pool, heldout, args.windows)
    rows[spec] = {"losses": losses, "ppl": ev.perplexity(losses),
                  "chat": turn_ends(model, pool, tok, questions, args.max_new_tokens)}
    print(spec, json.dumps({"ppl": rows[spec]["ppl"], "chat": rows[spec]["chat"]}), flush=True)
  ref = args.pools.split(",")[0]
  domains = list(heldout)
  lines = [f"Made by `python tools/chat_pool_check.py --pools {args.pools} --out {args.out}`"
           f" on {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
           f" ({jax.default_backend()}, JAX {jax.__version__}); {args.windows} held-out windows of"
           f" 256 tokens per domain; {len(questions) - 1} chat questions from held-out documents"
           f" plus \"What is 2 + 2?\", greedy, at most {args.max_new_tokens} new tokens.", "",
           "| | " + " | ".join(domains) + " | mean vs " + ref + " | chat turns ended | next turn"
           " written as text |", "|---" * (len(domains) + 4) + "|"]
  report = {}
  for spec, r in rows.items():
    if spec == ref or spec == "backbone":
      gap = "-"
    else:
      both = np.concatenate([r["losses"][d] for d in domains])
      base = np.concatenate([rows[ref]["losses"][d] for d in domains])
      g, lo, hi = ev.paired_gap(both, base)
      gap = ev.format_gap(g, lo, hi)
    lines.append(f"| {spec} | " + " | ".join(f"{r['ppl'][d]:.2f}" for d in domains)
                 + f" | {gap} | {100 * r['chat']['ended']:.0f}% |"
                 f" {100 * r['chat']['leaked_next_turn']:.0f}% |")
    report[spec] = {"ppl": r["ppl"], "chat": r["chat"], "mean_gap_vs_ref": gap}
  text = "\n".join(lines) + "\n"
  (out / "check.md").write_text(text)
  (out / "check.json").write_text(json.dumps(report, indent=2))
  print(text)


if __name__ == "__main__":
  main()
