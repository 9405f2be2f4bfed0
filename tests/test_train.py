"""Training: the loss goes down, resume is bit-identical, bad checkpoints are named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from adafuse_jax.errors import UserError
from adafuse_jax.model.llama import LlamaModel
from tests.conftest import DATA, tiny_config
from train.loop import CheckpointError, TrainConfig, Trainer


@pytest.fixture(scope="module")
def streams(default_model):
  """Two real-text 'domains' (halves of the GPL-3 licence), tokenized with the real tokenizer."""
  ids = np.asarray(default_model.tokenizer.encode((DATA / "GPL-3.txt").read_text()), np.uint16)
  half = len(ids) // 2
  train = {"a": ids[: half - 400], "b": ids[half: -400]}
  heldout = {"a": ids[half - 400: half], "b": ids[-400:]}
  return train, heldout


@pytest.fixture(scope="module")
def model():
  return LlamaModel(tiny_config(vocab_size=49152, max_context=256), seed=0)


def _cfg(mode="pregated", **kw):
  base = dict(mode=mode, modules=("q", "v", "up"), num_experts=4, rank=4, steps=6, batch=4,
              seq_len=32, lr=1e-2, warmup=1, eval_every=3, eval_windows=2, checkpoint_every=2, keep=5)
  base.update(kw)
  return TrainConfig(**base)


@pytest.mark.parametrize("mode", ["pregated", "layerwise", "lora", "pregated-plg",
                                  "pregated-shared", "pregated-ctx"])
def test_a_few_steps_lower_the_loss(model, streams, tmp_path, mode):
  cfg = _cfg(mode, steps=12, batch=8)
  trainer = Trainer(model, cfg, *streams, tmp_path)
  first = trainer.evaluate()
  trainer.fit(progress=False)
  last = trainer.evaluate()
  assert np.mean(list(last.values())) < np.mean(list(first.values()))
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 12


def test_resume_after_kill_gives_bit_identical_losses(model, streams, tmp_path):
  full = Trainer(model, _cfg(), *streams, tmp_path / "full").fit(progress=False)
  killed = Trainer(model, _cfg(), *streams, tmp_path / "run")
  killed.fit(until=4, progress=False)  # checkpoints at steps 2 and 4, then the process "dies"
  del killed
  resumed = Trainer(model, _cfg(), *streams, tmp_path / "run")
  assert resumed.restore() == 4
  rest = resumed.fit(progress=False)
  assert rest == full[4:]  # exact float equality: same data, same state, same program


def test_corrupt_checkpoint_is_named_and_earlier_one_still_restores(model, streams, tmp_path):
  Trainer(model, _cfg(), *streams, tmp_path).fit(until=4, progress=False)
  latest = tmp_path / "ckpt" / "4"
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
      f.write_bytes(b"\x00garbage" * 4)
  fresh = Trainer(model, _cfg(), *streams, tmp_path)
  with pytest.raises(CheckpointError, match="step 4"):
    fresh.restore()
  assert fresh.restore(step=2) == 2


def test_mismatched_config_is_named(model, streams, tmp_path):
  Trainer(model, _cfg(), *streams, tmp_path).fit(until=2, progress=False)
  other = Trainer(model, _cfg(rank=8), *streams, tmp_path)
  with pytest.raises(CheckpointError, match="rank=4"):
    other.restore()
  shutil.rmtree(tmp_path / "ckpt")
  with pytest.raises(CheckpointError, match="no checkpoint"):
    other.restore(step=3)


def test_bad_training_settings_are_rejected():
  from adafuse_jax.errors import UserError
  with pytest.raises(UserError, match="unknown training mode"):
    TrainConfig(mode="moe")
  with pytest.raises(UserError, match="batch=0"):
    TrainConfig(batch=0)


def test_teacher_forced_exact_match_equals_greedy_generation(default_model):
  """The evaluation's exact match (one teacher-forced pass) says 'hit' exactly when greedy
  generation produces the gold continuation."""
  from adafuse_jax.generate import Generator, generate
  from train.eval import item_hits

  model, tok = default_model.model, default_model.tokenizer
  shot = "Athens is to Greece as Baghdad is to Iraq.\n"
  items = [(f"{shot}{a} is to {b} as {c} is to", f" {d}") for a, b, c, d in [
      ("Berlin", "Germany", "Paris", "France"), ("Tokyo", "Japan", "Rome", "Italy"),
      ("man", "woman", "king", "queen"), ("big", "bigger", "small", "smaller"),
      ("Madrid", "Spain", "Oslo", "Norway"), ("cat", "kitten", "dog", "puppy")]]
  hits = item_hits(model, None, tok, items, batch=4)
  gen = Generator(model)
  for (prompt, gold), hit in zip(items, hits):
    gold_ids = tok.encode(prompt + gold)[len(tok.encode(prompt)):]
    out = generate(gen, [tok.encode(prompt)], max_new_tokens=len(gold_ids)).tokens[0]
    assert bool(hit) == (out == gold_ids), (prompt, gold, tok.decode(out))
  assert hits.any() and not hits.all()  # the check is not vacuous either way


@pytest.mark.xdist_group("data-cache")  # builds the math generator's venv in the shared cache
def test_math_generator_output_is_reproducible():
  """Preparing the data twice gives the same math problems (the generator's own venv is built
  on first use)."""
  from train import data

  cache = data.default_cache()
  first = data.math_problems(cache, "interpolate", per_module=3, seed=7)
  assert first and first == data.math_problems(cache, "interpolate", per_module=3, seed=7)


def test_shared_modes_keep_the_pools_budget():
  plain = TrainConfig(mode="pregated").adapter_config()
  shared = TrainConfig(mode="pregated-shared").adapter_config()
  assert shared.num_experts * shared.rank + shared.shared_rank == plain.num_experts * plain.rank
  assert shared.scale == plain.scale
  assert TrainConfig(mode="layerwise-shared").adapter_config().mode == "layerwise"
  for fraction, routed in ((0.75, 2), (0.875, 1)):  # more of the budget in the shared expert
    cfg = TrainConfig(mode="pregated-shared", shared_fraction=fraction).adapter_config()
    assert cfg.rank == routed
    assert cfg.num_experts * cfg.rank + cfg.shared_rank == plain.num_experts * plain.rank
  with pytest.raises(UserError, match="whole rank of at least 1"):
    TrainConfig(mode="pregated-shared", shared_fraction=0.9)
  TrainConfig(mode="layerwise", rank=3)  # the fraction means nothing without a shared expert
  assert TrainConfig(mode="pregated-ctx").adapter_config().first_layer == 1


def test_rows_from_keeps_rows_of_the_same_settings_only(tmp_path):
  import json

  from adafuse_jax.errors import UserError
  from train.__main__ import _seed_rows

  config = TrainConfig(steps=300).to_json()
  earlier = tmp_path / "earlier"
  (earlier / "metrics").mkdir(parents=True)
  (earlier / "metrics" / "lora.jsonl").write_text('{"step": 1, "ce": 2.0}\n')
  row = {"mode": "lora", "mean_ppl": 12.0}
  (earlier / "results.json").write_text(json.dumps(
      {"config": config, "math_items": 200, "analogy_items": 300, "rows": {"lora": row}}))
  work = tmp_path / "work"
  (work / "rows").mkdir(parents=True)
  _seed_rows(earlier / "results.json", config, 200, 300, ["lora", "pregated-ctx"], work)
  assert json.loads((work / "rows" / "lora.json").read_text()) == row
  assert (work / "lora" / "metrics.jsonl").exists()
  assert not (work / "rows" / "pregated-ctx.json").exists()
  with pytest.raises(UserError, match="steps: 300 there vs 400 now"):
    _seed_rows(earlier / "results.json", TrainConfig(steps=400).to_json(), 200, 300, ["lora"],
               work)
  with pytest.raises(UserError, match="not a results.json"):
    _seed_rows(tmp_path / "missing.json", config, 200, 300, ["lora"], work)


def test_used_params_leave_out_layers_without_experts():
  from adafuse_jax.adapters import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig
  from train.eval import used_params

  cfg = tiny_config(layers=4)
  full = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4), seed=0)
  late = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4, first_layer=1),
                       seed=0)
  router = full.router.w[...].size
  assert used_params(late) - router == (used_params(full) - router) * 3 // 4


def test_compare_training_rows_tool():
  """tools/compare_training_rows.py on the committed CPU-pilot results: a row against itself is
  worse nowhere; rows of runs with another data budget are refused."""
  import pathlib
  import sys
  root = pathlib.Path(__file__).parents[1]
  sys.path.insert(0, str(root / "tools"))
  import compare_training_rows as compare

  pilot = root / "docs" / "training" / "cpu-pilot" / "results.json"
  text = compare.table(f"{pilot}:lora", [f"{pilot}:lora", f"{pilot}:pregated-shared"])
  rows = [line for line in text.splitlines() if line.startswith("| ")][2:]
  assert rows[0].startswith("| lora |") and rows[0].endswith("none (0 of 7) |")
  assert rows[1].startswith("| pregated-shared, shared_fraction 0.5 |")
  with pytest.raises(SystemExit, match="not comparable"):
    compare.table(f"{pilot}:lora", [f"{root / 'docs' / 'training' / 'results.json'}:lora"])
  with pytest.raises(SystemExit, match="with row 'nope'"):
    compare.table(f"{pilot}:nope", [f"{pilot}:lora"])
