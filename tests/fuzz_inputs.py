"""A bounded fuzz harness over what users hand the project: damaged model files (GGUF, an HF
folder's safetensors and config.json), damaged adapter pools and training checkpoints, random
command lines, random prompts.

Each case ends in one of four outcomes:
- "ok": it loaded or ran, and every number it produced is finite;
- "named": a named error (`UserError` and its kinds from Python; exit 2 with one `error:` line and
  no traceback from the command line);
- "traceback": any other exception, or a command line that crashed;
- "corrupt": it loaded or ran but produced non-finite numbers (a model file: its weights may
  legitimately change, formats without a checksum), or a damaged pool or checkpoint restored to
  something other than what was saved, or an input file changed.

The test suite runs a few cases of each class (`tests/test_fuzz.py`); `tools/fuzz_table.py`
runs more and writes the table in `docs/robustness.md`. Seeded: the same seed gives the same
cases.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pathlib
import random
import shutil
import string
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.errors import UserError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
OUTCOMES = ("ok", "named", "traceback", "corrupt")


def mutate(data: bytes, rng: random.Random) -> bytes:
  """A truncation (one case in four) or 1-3 bit flips at random offsets."""
  if rng.random() < 0.25:
    return data[:rng.randrange(len(data))]
  out = bytearray(data)
  for _ in range(rng.randint(1, 3)):
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
  return bytes(out)


def _finite(*arrays) -> bool:
  return all(np.isfinite(np.asarray(a, np.float64)).all() for a in arrays)


def _classify(run: Callable[[], bool]) -> str:
  try:
    return "ok" if run() else "corrupt"
  except UserError:
    return "named"
  except Exception:  # noqa: BLE001 - the harness reports any other failure by kind
    if os.environ.get("FUZZ_DEBUG"):
      traceback.print_exc()
    return "traceback"


def _forward_finite(loaded) -> bool:
  from adafuse_jax.model import KVCache

  cache = KVCache.create(loaded.model.cfg, 1, 8, loaded.model.dtype)
  logits, _ = loaded.model(jnp.asarray([[1, 2, 3]], jnp.int32), cache)
  return _finite(logits)


# -- damaged files ---------------------------------------------------------------------------

def model_files(kind: str, cases: int, seed: int, work: pathlib.Path) -> collections.Counter:
  """kind "gguf" (the BPE GGUF fixture), "safetensors" or "config" (the HF fixture folder):
  the file damaged, then loaded and run."""
  from adafuse_jax.weights import load_model

  source = {"gguf": FIXTURES / "bpe.gguf", "safetensors": FIXTURES / "hf-default",
            "config": FIXTURES / "hf-default"}[kind]
  rng = random.Random(seed)
  counts = collections.Counter()
  for case in range(cases):
    target = work / f"{kind}-{case}"
    if source.is_dir():
      shutil.copytree(source, target)
      name = "model.safetensors" if kind == "safetensors" else "config.json"
      victim = target / name
      victim.write_bytes(_damage_config(victim.read_bytes(), rng) if kind == "config"
                         else mutate(victim.read_bytes(), rng))
      path = target
    else:
      path = target.with_suffix(".gguf")
      path.write_bytes(mutate(source.read_bytes(), rng))
    before = _snapshot(path)
    outcome = _classify(lambda: _forward_finite(load_model(str(path), progress=False)))
    if _snapshot(path) != before:
      outcome = "corrupt"
    counts[outcome] += 1
    shutil.rmtree(target, ignore_errors=True)
    path.unlink(missing_ok=True) if path.is_file() else None
  return counts


def _damage_config(data: bytes, rng: random.Random) -> bytes:
  """A config.json with one key dropped, or set to a value of another type or sign, or its
  bytes damaged."""
  try:
    config = json.loads(data)
  except ValueError:
    return mutate(data, rng)
  key = rng.choice(sorted(config))
  choice = rng.randrange(4)
  if choice == 0:
    del config[key]
  elif choice == 1:
    config[key] = rng.choice([0, -1, 1e30, "x", None, [], {}, True, 3.5])
  elif choice == 2:
    return mutate(data, rng)
  else:
    config[key] = rng.choice([0, -4, 10**9])
  return json.dumps(config).encode()


def _snapshot(path: pathlib.Path) -> dict:
  """Every file's bytes under `path`: a load must not change its input."""
  files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
  return {str(p): p.read_bytes() for p in files}


def pool_files(cases: int, seed: int, work: pathlib.Path) -> collections.Counter:
  """An adapter pool saved by `save_adapters`, one of its files damaged, loaded and applied."""
  from adafuse_jax.adapters.io import load_adapters, save_adapters
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig
  from adafuse_jax.generation import Generator
  from adafuse_jax.model import LlamaModel
  from tests.conftest import tiny_config

  cfg = tiny_config()
  model = LlamaModel(cfg, seed=1)
  good = save_adapters(work / "pool", MixtureOfLoRA(
      cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2), seed=2,
      random_b=True))
  files = sorted(p.relative_to(good) for p in good.rglob("*") if p.is_file())

  def logits_of(path) -> np.ndarray:
    gen = Generator(model, adapters=load_adapters(path, cfg), path="xla")
    _, logits, _, _ = gen.forward(np.asarray([[1, 2, 3]], np.int32), gen.new_cache(1, 8),
                                  jax.random.key(0))
    return np.asarray(logits)

  want = logits_of(good)  # a pool that loads must be the pool that was saved
  return _damaged_copies(good, files, cases, seed, work,
                         lambda target: np.array_equal(logits_of(target), want))


def _damaged_copies(good: pathlib.Path, files: list, cases: int, seed: int, work: pathlib.Path,
                    same: Callable[[pathlib.Path], bool]) -> collections.Counter:
  """`cases` copies of the folder `good`, each with one of `files` damaged; `same(copy)` loads
  the copy and says whether it gives the original's output. A copy the load changed is
  "corrupt"."""
  rng = random.Random(seed)
  counts = collections.Counter()
  for case in range(cases):
    target = work / f"{good.name}-{case}"
    shutil.copytree(good, target)
    victim = target / rng.choice(files)
    victim.write_bytes(mutate(victim.read_bytes(), rng))
    before = _snapshot(target)
    outcome = _classify(lambda: same(target))
    counts["corrupt" if _snapshot(target) != before else outcome] += 1
    shutil.rmtree(target)
  return counts


def checkpoint_files(cases: int, seed: int, work: pathlib.Path) -> collections.Counter:
  """A training run's latest orbax checkpoint, one of its files damaged, restored and
  evaluated."""
  from adafuse_jax.model import LlamaModel
  from adafuse_jax.train.loop import TrainConfig, Trainer
  from tests.conftest import tiny_config

  cfg = tiny_config()
  data = np.random.default_rng(0)
  streams = {"a": data.integers(0, cfg.vocab_size, 2000).astype(np.int32)}
  heldout = {"a": data.integers(0, cfg.vocab_size, 300).astype(np.int32)}
  tc = TrainConfig(num_experts=4, rank=4, steps=2, batch=2, seq_len=16, warmup=1, eval_every=2,
                   eval_windows=2, checkpoint_every=2)
  model = LlamaModel(cfg, seed=1)
  Trainer(model, tc, streams, heldout, work / "run").fit(progress=False)
  good = work / "run"
  files = sorted(p.relative_to(good) for p in (good / "ckpt").rglob("*")
                 if p.is_file() and p.stat().st_size)

  def restored(path) -> dict:
    trainer = Trainer(model, tc, streams, heldout, path)
    trainer.restore()
    return trainer.evaluate()

  want = restored(good)  # a checkpoint that restores must be the one that was saved
  return _damaged_copies(good, files, cases, seed, work,
                         lambda target: restored(target) == want)


# -- the command line and prompts ------------------------------------------------------------

# Options of `python -m adafuse_jax.decode` with values good and bad; a case draws a few.
DECODE_OPTIONS = {
    "--max-new-tokens": ["2", "0", "-1", "nan", "1e9", "3.5", "", "100000000"],
    "--temperature": ["0", "0.7", "-1", "nan", "inf", "x"],
    "--top-p": ["0.9", "0", "1.5", "nan"],
    "--top-k": ["0", "5", "-3", "1e3"],
    "--seed": ["0", "-1", "x", str(2**70)],
    "--path": ["packed", "xla", "gathered", "merged", "auto", "nope"],
    "--mode": ["backbone", "lora", "pregated", "layerwise", "nope"],
    "--experts": ["2", "0", "-2", "x"],
    "--rank": ["2", "0", "-4"],
    "--dtype": ["float32", "bfloat16", "int8"],
    "--devices": ["1", "0", "64"],
    "--sere-rho": ["0", "0.5", "2", "-1", "nan"],
    "--prompts-file": ["/nonexistent/file", "/dev/null", "/"],
    "--workdir": ["/nonexistent/root/dir"],
    "--adapters": ["default", "random:0", "/nonexistent/pool", "random:x"],
    "--chat": [None],
    "--json": [None],
}


def random_argv(rng: random.Random) -> list[str]:
  """A decode command line on the tiny BPE GGUF: a prompt (sometimes odd) and 0-4 options."""
  argv = ["--model", str(FIXTURES / "bpe.gguf"), "--max-new-tokens", "2", "--json",
          "--prompt", random_prompt(rng)]
  for flag in rng.sample(sorted(DECODE_OPTIONS), rng.randint(0, 4)):
    value = rng.choice(DECODE_OPTIONS[flag])
    argv += [flag] if value is None else [flag, value]
  if rng.random() < 0.1:
    argv.append(rng.choice(["--no-such-flag", "-x", "--", "--max-new"]))
  return argv


def random_prompt(rng: random.Random) -> str:
  """Text of many kinds: empty, ASCII, other scripts, emoji, control characters, lone
  surrogates (invalid UTF-8 from argv or a file), very long."""
  kind = rng.randrange(7)
  if kind == 0:
    return ""
  if kind == 1:
    return "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 40)))
  if kind == 2:
    return "".join(chr(rng.choice([rng.randint(0x400, 0x4FF), rng.randint(0x4E00, 0x9FFF),
                                   rng.randint(0x1F300, 0x1F6FF)])) for _ in range(12))
  if kind == 3:
    return "".join(chr(rng.randint(0, 31)) for _ in range(8))
  if kind == 4:
    return "ok " + chr(rng.randint(0xDC80, 0xDCFF))  # a byte that was not UTF-8, escaped
  if kind == 5:
    return "word " * rng.randint(200, 2000)  # longer than the tiny model's context
  return rng.choice(["Hello", "def f(x):", "2 + 2 =", "\n\n", " "])


def run_decode(argv: list[str]) -> str:
  """`decode.main(argv)` in this process: "ok" for exit 0 with finite figures, "named" for exit
  2 whose stderr holds one `error:` line and no traceback, else "traceback" (or "corrupt")."""
  from adafuse_jax import decode

  out, err = io.StringIO(), io.StringIO()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = decode.main(argv)
  except SystemExit as e:  # argparse
    code = e.code
  except Exception:  # noqa: BLE001
    return "traceback"
  errors = [line for line in err.getvalue().splitlines() if "error:" in line]
  if code == 0:
    result = json.loads(out.getvalue())
    return "ok" if np.isfinite(result["decode_ms_per_token"]) else "corrupt"
  if code == 2 and len(errors) == 1 and "Traceback" not in err.getvalue():
    return "named"
  return "traceback"


def command_lines(cases: int, seed: int) -> collections.Counter:
  """Random decode command lines (`random_argv`), run in this process."""
  rng = random.Random(seed)
  return collections.Counter(run_decode(random_argv(rng)) for _ in range(cases))


def prompts(cases: int, seed: int) -> collections.Counter:
  """Random prompts (`random_prompt`) through the decode command line on the tiny GGUF."""
  rng = random.Random(seed)
  return collections.Counter(
      run_decode(["--model", str(FIXTURES / "bpe.gguf"), "--max-new-tokens", "2", "--json",
                  "--prompt", random_prompt(rng)]) for _ in range(cases))


CLASSES: dict[str, Callable[[int, int, pathlib.Path], collections.Counter]] = {
    "GGUF file, truncated or bit-flipped": lambda n, s, w: model_files("gguf", n, s, w),
    "HF safetensors, truncated or bit-flipped": lambda n, s, w: model_files("safetensors", n, s, w),
    "HF config.json, keys dropped or retyped": lambda n, s, w: model_files("config", n, s, w),
    "adapter pool file, truncated or bit-flipped": pool_files,
    "training checkpoint file, truncated or bit-flipped": checkpoint_files,
    "decode command line, random options and values": lambda n, s, w: command_lines(n, s),
    "prompt text, random scripts, controls, bad bytes, long": lambda n, s, w: prompts(n, s),
}
