"""Chat transcripts for training data: a pool trained on raw text forgets the instruct model's
turn structure (the shipped pool answered "2 + 2 = 4" and went on with "\\n\\nuser\\nWhat is
..." where the backbone writes `<|im_end|>`). Mixing in the backbone's own chats keeps it.

`self_distilled_chats` asks the frozen backbone questions built from the domains' training
documents (what does this code do, what is this computing term, what does this word mean, what
does this quote say, this math problem) and keeps its greedy replies that end their turn;
`write_chat_mix` writes them, with the domains' own training text, as one JSONL file for
`python -m adafuse_jax.train fit --data` (domain "chat" beside the five built-in ones).
Held-out documents are never used: the held-out perplexities stay comparable.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator

import numpy as np

from adafuse_jax.train.data import load_streams


def documents(stream: np.ndarray, separator: int) -> Iterator[np.ndarray]:
  """The token documents of a domain stream (each ended by `separator`, the EOS id)."""
  ends = np.flatnonzero(stream == separator)
  start = 0
  for end in ends:
    if end > start:
      yield stream[start:end]
    start = end + 1


def _question(domain: str, text: str) -> str | None:
  text = text.strip()
  if not text:
    return None
  first = text.splitlines()[0].strip()
  if domain == "code":
    return f"What does this Python code do?\n\n{text[:400]}"
  if domain == "computing":  # FOLDOC: "term: <topic> definition"
    term = first.split(":")[0].strip()
    ok = 0 < len(term) < 40 and ":" in first and not set(term) & set("{}<>")
    return f"What is {term} in computing?" if ok else None
  if domain == "definitions":  # WordNet: "word, synonym (noun): gloss"
    word = first.split("(")[0].split(",")[0].strip()
    return f"What does the word \"{word}\" mean?" if 0 < len(word) < 40 else None
  if domain == "quotes":
    return f"What does this quote mean?\n\n{text[:300]}"
  if domain == "math":
    question = first.removeprefix("Question:").strip()
    return question or None
  return None


def domain_documents(cache: pathlib.Path, split: str, separator: int
                     ) -> dict[str, list[np.ndarray]]:
  """domain -> its token documents of `split` ("train", or "heldout" for questions no training
  chat was made from)."""
  return {domain: list(documents(stream, separator))
          for domain, stream in load_streams(cache, split).items()}


def chat_questions(docs: dict[str, list[np.ndarray]], tok, per_domain: int, seed: int = 0
                   ) -> list[tuple[str, str]]:
  """[(domain, question)]: `per_domain` questions from each domain's documents."""
  rng = np.random.default_rng(seed)
  out = []
  for domain, domain_docs in docs.items():
    picked = []
    for i in rng.permutation(len(domain_docs)):
      q = _question(domain, tok.decode(domain_docs[i].tolist()))
      if q is not None:
        picked.append((domain, q))
      if len(picked) == per_domain:
        break
    out += picked
  return out


def self_distilled_chats(model, tok, questions: list[tuple[str, str]], max_new_tokens: int = 96,
                         batch: int = 16, progress: bool = True) -> list[dict]:
  """The backbone's greedy replies to `questions` as whole conversations in its chat template:
  [{"domain", "question", "reply", "text"}], only the replies that ended their turn."""
  from tqdm import tqdm

  from adafuse_jax.generation import Generator, generate

  gen = Generator(model)
  out = []
  for i in tqdm(range(0, len(questions), batch), desc="chats", disable=not progress):
    part = questions[i:i + batch]
    ids = [tok.encode_chat([{"role": "user", "content": q}]) for _, q in part]
    res = generate(gen, ids, max_new_tokens=max_new_tokens, stop_ids=tok.eos_ids,
                   pad_id=min(tok.eos_ids))
    for (domain, q), tokens, reason in zip(part, res.tokens, res.stop_reasons):
      reply = tok.decode(tokens).strip()
      if reason != "eos" or not reply:
        continue
      text = tok.apply_chat_template([{"role": "user", "content": q},
                                      {"role": "assistant", "content": reply}],
                                     add_generation_prompt=False)
      out.append({"domain": domain, "question": q, "reply": reply, "text": text})
  return out


def write_chat_mix(out: pathlib.Path, docs: dict[str, list[np.ndarray]], chats: list[dict], tok,
                   docs_per_domain: int, seed: int = 0) -> dict[str, int]:
  """JSONL for `fit --data`: `docs_per_domain` training documents of each built-in domain (their
  own text) and every chat as domain "chat". Returns lines written per domain."""
  rng = np.random.default_rng(seed)
  counts = {}
  with open(out, "w", encoding="utf-8") as f:
    for domain, domain_docs in docs.items():
      picked = rng.permutation(len(domain_docs))[:docs_per_domain]
      for i in picked:
        f.write(json.dumps({"domain": domain, "text": tok.decode(domain_docs[i].tolist())}) + "\n")
      counts[domain] = len(picked)
    for c in chats:
      f.write(json.dumps({"domain": "chat", "text": c["text"]}) + "\n")
    counts["chat"] = len(chats)
  return counts
