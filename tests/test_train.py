"""Training: the loss goes down, resume is bit-identical, bad checkpoints are named."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from adafuse_jax.errors import UserError
from adafuse_jax.model.llama import LlamaModel
from tests.conftest import DATA, tiny_config
from adafuse_jax.train.loop import CheckpointError, TrainConfig, Trainer


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
                                  "pregated-shared", "pregated-ctx", "pregated-tied",
                                  "pregated-tied+ctx", "pregated-tied+clip"])
def test_a_few_steps_lower_the_loss(model, streams, tmp_path, mode):
  cfg = _cfg(mode.split("+")[0], steps=12, batch=8,
             route_context=0.9 if mode.endswith("+ctx") else 0.0, clip_apart=mode.endswith("+clip"))
  trainer = Trainer(model, cfg, *streams, tmp_path)
  first = trainer.evaluate()
  trainer.fit(progress=False)
  last = trainer.evaluate()
  assert np.mean(list(last.values())) < np.mean(list(first.values()))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == 12
  norms = np.array([[r["grad_norm"]["experts"], r["grad_norm"]["routing"]] for r in records])
  assert (norms[:, 0] > 0).all()
  assert (norms[:, 1] == 0).all() if mode == "lora" else (norms[:, 1] > 0).any()


def test_grad_norms_split_the_global_norm():
  """grad_norms puts router weights and tied betas in "routing", every other leaf in "experts";
  together they make optax's global norm."""
  import jax
  import optax

  from adafuse_jax.train.loop import grad_norms

  rng = np.random.default_rng(0)
  grads = {"pool": {"A_q": rng.normal(size=(3, 4)), "B_q": rng.normal(size=(4, 2)),
                    "beta_q": rng.normal(size=(3,))},
           "router": {"w": rng.normal(size=(5, 4))}}
  grads = jax.tree.map(lambda a: np.asarray(a, np.float32), grads)
  norms = grad_norms(grads)
  np.testing.assert_allclose(norms["routing"], np.sqrt(
      (grads["pool"]["beta_q"] ** 2).sum() + (grads["router"]["w"] ** 2).sum()), rtol=1e-6)
  np.testing.assert_allclose(np.hypot(norms["experts"], norms["routing"]),
                             optax.global_norm(grads), rtol=1e-6)


def test_resume_after_kill_gives_bit_identical_losses(model, streams, tmp_path):
  full = Trainer(model, _cfg(), *streams, tmp_path / "full").fit(progress=False)
  killed = Trainer(model, _cfg(), *streams, tmp_path / "run")
  killed.fit(until=4, progress=False)  # checkpoints at steps 2 and 4, then the process "dies"
  del killed
  resumed = Trainer(model, _cfg(), *streams, tmp_path / "run")
  assert resumed.restore() == 4
  rest = resumed.fit(progress=False)
  assert rest == full[4:]  # exact float equality: same data, same state, same program


def test_corrupt_checkpoint_is_named_and_earlier_one_still_restores(model, streams, tmp_path,
                                                                     capfd):
  """Named from the digests written at save, before orbax reads a byte: no half-done restore
  leaves background threads to print "Event loop is closed" after the error."""
  Trainer(model, _cfg(), *streams, tmp_path).fit(until=4, progress=False)
  latest = tmp_path / "ckpt" / "4"
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "meta" not in f.parts:
      f.write_bytes(b"\x00garbage" * 4)
  fresh = Trainer(model, _cfg(), *streams, tmp_path)
  capfd.readouterr()
  with pytest.raises(CheckpointError, match="step 4 .* is corrupt: .* differ from those saved"):
    fresh.restore()
  assert fresh.restore(step=2) == 2
  assert "Event loop is closed" not in capfd.readouterr().err


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
  for field, value in (("lr", -1.0), ("lr", float("nan")), ("weight_decay", -0.1),
                       ("aux_coef", float("inf")), ("rank", 0)):
    with pytest.raises(UserError, match=field):
      TrainConfig(**{field: value})


def test_teacher_forced_exact_match_equals_greedy_generation(default_model):
  """The evaluation's exact match (one teacher-forced pass) says 'hit' exactly when greedy
  generation produces the gold continuation."""
  from adafuse_jax.generation import Generator, generate
  from adafuse_jax.train.eval import item_hits

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
  from adafuse_jax.train import data

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

  from adafuse_jax.errors import UserError
  from adafuse_jax.train.cli import _seed_rows

  config = TrainConfig(steps=300).to_json()
  earlier = tmp_path / "earlier"
  (earlier / "metrics").mkdir(parents=True)
  (earlier / "metrics" / "lora.jsonl").write_text('{"step": 1, "ce": 2.0}\n')
  row = {"mode": "lora", "mean_ppl": 12.0}
  (earlier / "results.json").write_text(json.dumps(
      {"config": config, "math_items": 200, "analogy_items": 300, "rows": {"lora": row}}))
  work = tmp_path / "work"
  (work / "rows").mkdir(parents=True)
  _seed_rows(earlier / "results.json", config, 200, 300, 16, ["lora", "pregated-ctx"], work)
  assert json.loads((work / "rows" / "lora.json").read_text()) == row
  assert (work / "lora" / "metrics.jsonl").exists()
  assert not (work / "rows" / "pregated-ctx.json").exists()
  with pytest.raises(UserError, match="steps: 300 there vs 400 now"):
    _seed_rows(earlier / "results.json", TrainConfig(steps=400).to_json(), 200, 300, 16, ["lora"],
               work)
  with pytest.raises(UserError, match="held-out windows: 16 there vs 0 now"):
    _seed_rows(earlier / "results.json", config, 200, 300, 0, ["lora"], work)
  with pytest.raises(UserError, match="not a results.json"):
    _seed_rows(tmp_path / "missing.json", config, 200, 300, 16, ["lora"], work)
  with pytest.raises(UserError, match="has no pregated-ctx row"):  # named, so it must be there
    _seed_rows(earlier / "results.json", config, 200, 300, 16, ["pregated-ctx"], work, named=True)


def test_rows_from_names_which_rows_each_source_gives():
  from adafuse_jax.train.cli import _rows_sources

  modes = ["backbone", "lora", "pregated-tied"]
  got = _rows_sources(["old/results.json", "new:dir/results.json:pregated-tied"], modes)
  assert got == [(pathlib.Path("old/results.json"), ["backbone", "lora"], False),
                 (pathlib.Path("new:dir/results.json"), ["pregated-tied"], True)]
  assert _rows_sources(["a/b:c/results.json"], modes) == [  # a colon in the path names nothing
      (pathlib.Path("a/b:c/results.json"), modes, False)]
  with pytest.raises(UserError, match="lora is named by both"):
    _rows_sources(["a/results.json:lora", "b/results.json:lora"], modes)
  with pytest.raises(UserError, match="layerwise after the colon"):
    _rows_sources(["a/results.json:layerwise"], modes)
  with pytest.raises(UserError, match="no mode after the colon"):
    _rows_sources(["a/results.json:"], modes)


def test_used_params_leave_out_layers_without_experts():
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig
  from adafuse_jax.train.eval import used_params

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
    compare.table(f"{pilot}:lora", [f"{root / 'docs' / 'training' / 'gpu-1000' / 'results.json'}:lora"])
  with pytest.raises(SystemExit, match="with row 'nope'"):
    compare.table(f"{pilot}:nope", [f"{pilot}:lora"])


def test_window_losses_cover_the_held_out_set_and_match_the_mean_loss(model, streams, tmp_path):
  """windows=None scores every non-overlapping window; each window's loss is the one the
  training loop's mean loss averages; perplexity is exp of their mean."""
  import jax.numpy as jnp

  from adafuse_jax.train.eval import perplexities, window_losses
  from adafuse_jax.train.loop import eval_windows, forward_loss

  trainer = Trainer(model, _cfg(steps=2), *streams, tmp_path)
  trainer.fit(progress=False)
  heldout = streams[1]
  seq = 32
  every = window_losses(model, trainer.adapters, heldout, None, seq_len=seq, batch=3)
  for domain, stream in heldout.items():
    windows = eval_windows(stream, (len(stream) - 1) // (seq + 1), seq)
    assert every[domain].shape == (len(windows),)  # 12 windows: the batch of 3 pads nothing...
    assert len(windows) * (seq + 1) > len(stream) - (seq + 1)  # ...and they cover the stream
    mean = float(forward_loss(model, trainer.adapters, jnp.asarray(windows))[1]["ce"])
    np.testing.assert_allclose(every[domain].mean(), mean, rtol=1e-5)
  five = window_losses(model, trainer.adapters, heldout, 5, seq_len=seq, batch=3)  # pads 1
  assert all(v.shape == (5,) for v in five.values())
  ppl = perplexities(model, trainer.adapters, heldout, 5, seq_len=seq)
  for d in heldout:
    np.testing.assert_allclose(ppl[d], np.exp(five[d].mean()), rtol=1e-6)


def test_paired_gap():
  from adafuse_jax.train.eval import paired_gap

  rng = np.random.default_rng(0)
  ref = rng.uniform(1.0, 3.0, 200)
  gap, lo, hi = paired_gap(ref, ref)
  assert gap == lo == hi == 0.0
  gap, lo, hi = paired_gap(ref + 0.01, ref)  # a constant shift: exact ratio, no spread
  np.testing.assert_allclose([gap, lo, hi], np.expm1(0.01), rtol=1e-9)
  noisy = ref + 0.01 + rng.normal(0, 0.05, 200)
  gap, lo, hi = paired_gap(noisy, ref)
  assert lo < gap < hi and lo < np.expm1(0.01) < hi
  np.testing.assert_allclose(gap, np.exp(noisy.mean()) / np.exp(ref.mean()) - 1, rtol=1e-9)
  with pytest.raises(ValueError, match="do not pair"):
    paired_gap(ref[:10], ref)


def test_paired_hits_gap():
  from adafuse_jax.train.eval import paired_hits_gap

  assert paired_hits_gap("0110", "0110") == (0.0, 0.0, 0.0)
  gap, lo, hi = paired_hits_gap("1" * 10 + "0" * 90, "0" * 100)  # ten more hits of 100
  assert gap == pytest.approx(0.1) and 0 < lo < 0.1 < hi
  with pytest.raises(ValueError, match="do not pair"):
    paired_hits_gap("01", "011")


def test_goal_lines_and_compare_tool_report_paired_intervals(tmp_path):
  """Rows with per-window losses get a paired interval against lora, in the table's goal lines
  and in tools/compare_training_rows.py; a gap inside the interval is not called higher."""
  import pathlib
  import sys

  from adafuse_jax.train.cli import goal_lines
  root = pathlib.Path(__file__).parents[1]
  sys.path.insert(0, str(root / "tools"))
  import compare_training_rows as compare

  rng = np.random.default_rng(1)
  base = {"a": rng.uniform(1, 3, 100), "b": rng.uniform(1, 3, 100)}

  def row(mode, shift_a, shift_b):
    ce = {"a": base["a"] + shift_a + rng.normal(0, 0.02, 100), "b": base["b"] + shift_b}
    ppl = {d: float(np.exp(v.mean())) for d, v in ce.items()}
    return {"mode": mode, "ppl": ppl, "mean_ppl": float(np.mean(list(ppl.values()))), "math_em": 0.1, "analogy_em": 0.2,
            "window_ce": {d: v.tolist() for d, v in ce.items()},
            "math_hits": "0110", "analogy_hits": "1000"}

  rows = {"lora": row("lora", 0, 0), "pregated": row("pregated", 0.001, 0.05)}
  text = "\n".join(goal_lines(rows, ["a", "b"]))
  assert "higher beyond the interval on b" in text and "on a" not in text.split("beyond")[-1]
  assert "math +0.0 pts [+0.0, +0.0]" in text
  # A pre-gated row is set against plain layer-wise routing and against its own layer-wise twin
  # (the same pool routed at every layer), never against another pool's twin.
  twins = dict(rows, **{m: row(m, 0, 0) for m in ("layerwise", "layerwise-tied", "pregated-tied")})
  lines = {line.split("`")[1]: line for line in goal_lines(twins, ["a", "b"]) if "`" in line}
  assert "% vs layerwise;" in lines["pregated"] and "layerwise-tied" not in lines["pregated"]
  assert "% vs layerwise;" in lines["pregated-tied"] and "% vs layerwise-tied" in lines["pregated-tied"]
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"config": TrainConfig().to_json(), "math_items": 1,
                              "analogy_items": 1, "heldout_windows": 0, "rows": rows}))
  table = compare.table(f"{path}:lora", [f"{path}:pregated"])
  assert "b*" in table and "a*" not in table and "[lo, hi]" in table


def test_table_command_re_renders_results_md(tmp_path, capsys):
  import pathlib

  from adafuse_jax.train.cli import main
  committed = pathlib.Path(__file__).parents[1] / "docs" / "training" / "gpu-1000"
  (tmp_path / "results.json").write_text((committed / "results.json").read_text())
  assert main(["table", str(tmp_path / "results.json")]) == 0
  assert (tmp_path / "results.md").read_text() == (committed / "results.md").read_text()
  assert main(["table", str(tmp_path / "missing.json")]) == 2
  assert "not a readable results.json" in capsys.readouterr().err
  assert main(["all", "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w"),
               "--heldout-windows", "-1"]) == 2
  assert "--heldout-windows=-1 must be 0 (all) or positive" in capsys.readouterr().err
  assert main(["all", "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "w"),
               "--jobs", "0"]) == 2
  assert "--jobs=0 must be at least 1" in capsys.readouterr().err


def test_router_lr_scale_slows_only_routers_and_betas(model, streams, tmp_path):
  """router_lr_scale=0.1 moves router weights and betas far less than 1.0 over the same steps,
  and every expert factor about as far."""
  import jax
  from flax import nnx

  from adafuse_jax.train.loop import is_routing_leaf

  def one_step(scale, where):
    trainer = Trainer(model, _cfg("pregated-tied", steps=4, router_lr_scale=scale, warmup=1),
                      *streams, where)
    before = jax.tree.map(np.array, nnx.state(trainer.adapters))  # a copy, not live Variables
    # step 1 runs at lr 0 (warm-up), step 2 moves B off zero, step 3 gives betas gradients
    trainer.fit(until=3, progress=False)
    return jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                        nnx.state(trainer.adapters), before)

  full, slow = one_step(1.0, tmp_path / "a"), one_step(0.1, tmp_path / "b")
  checked = set()
  for (path, f), (_, s) in zip(jax.tree_util.tree_leaves_with_path(full),
                               jax.tree_util.tree_leaves_with_path(slow)):
    routing = is_routing_leaf(path)
    checked.add(routing)
    if routing:
      assert 0 < f and s < 0.5 * f, path
    else:
      np.testing.assert_allclose(s, f, rtol=0.2, err_msg=str(path))
  assert checked == {True, False}
  with pytest.raises(UserError, match="router_lr_scale"):
    _cfg(router_lr_scale=0.0)


def test_seed_gap():
  from adafuse_jax.train.eval import seed_gap

  ref = [10.0, 10.2, 9.9, 10.1]
  gap, lo, hi = seed_gap(ref, ref)  # no change, an interval as wide as the seeds' spread
  assert gap == 0.0 and lo < 0 < hi and np.log1p(lo) == pytest.approx(-np.log1p(hi))
  gap, lo, hi = seed_gap([1.01 * v for v in ref], ref)  # the same spread, 1% higher
  assert gap == pytest.approx(0.01) and lo < 0.01 < hi
  gap, lo, hi = seed_gap([11.0, 11.0], [10.0, 10.0])  # no spread at all: the exact ratio
  assert gap == lo == hi == pytest.approx(0.1)
  gap, lo, hi = seed_gap([0.40, 0.42, 0.41], [0.28, 0.29, 0.27], log=False)  # points, not ratios
  assert gap == pytest.approx(0.13) and 0 < lo < 0.13 < hi
  with pytest.raises(ValueError, match="at least 2 seeds"):
    seed_gap([10.0], ref)
  # paired by seed: the seeds' common spread cancels; the interval is the per-seed differences'
  gap, lo, hi = seed_gap([1.01 * v for v in ref], ref, paired=True)
  assert (gap, lo, hi) == pytest.approx((0.01, 0.01, 0.01), abs=1e-9)
  wobble = [1.01 * v * (1 + e) for v, e in zip(ref, [1e-3, -1e-3, 2e-3, -2e-3])]
  gap, lo, hi = seed_gap(wobble, ref, paired=True)
  unpaired = seed_gap(wobble, ref)
  assert lo < gap < hi and hi - lo < (unpaired[2] - unpaired[1]) / 5
  from scipy import stats
  d = np.log(wobble) - np.log(ref)  # against a textbook paired t interval
  half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
  assert np.log1p(lo) == pytest.approx(d.mean() - half) and np.log1p(hi) == pytest.approx(d.mean() + half)
  with pytest.raises(ValueError, match="one reference run per run"):
    seed_gap(ref[:3], ref, paired=True)


def test_compare_seeds_tool(tmp_path):
  """tools/compare_seeds.py on the committed GPU runs: a setting against itself is worse
  nowhere; globs expand; repeated seeds, single runs and other data budgets are refused."""
  import pathlib
  import sys
  root = pathlib.Path(__file__).parents[1]
  sys.path.insert(0, str(root / "tools"))
  import compare_seeds

  t = root / "docs" / "training"
  lora = f"lora={t}/gpu-1000/results.json:lora,{t}/gpu-1000-seeds/s[2-3]/results.json:lora"
  text = compare_seeds.table(lora, [lora.replace("lora=", "again=", 1)],
                             plot=str(tmp_path / "seeds.png"),
                             excess_plot=str(tmp_path / "excess.png"))
  assert (tmp_path / "excess.png").stat().st_size > 0
  rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
  assert rows[0].startswith("| lora (reference) | 0,2,3 |")
  assert rows[1].startswith("| again | 0,2,3 |") and rows[1].endswith("| none (0 of 7) |")
  assert "| again | 0 | +0.000 | 25 | +0.000 (step 1) | +0.0000 |" in text  # the same training logs, seed by seed
  assert "| 3.047 (+0.0% [-0.2, +0.2]) |" in rows[1] and (tmp_path / "seeds.png").stat().st_size > 0
  # paired by seed, every run against itself: no change and no interval at all
  paired = text.split("Paired by seed")[1].split("Training loss")[0]
  assert "| again | 0,2,3 | 3.047 (+0.0% [+0.0, +0.0]) |" in paired
  named = [("lora", compare_seeds.load_group(lora)[1]),
           ("again", compare_seeds.load_group(lora.replace("lora=", "again=", 1))[1])]
  (_, curves), = compare_seeds.excess_curves(named)  # every run against itself: zero throughout
  assert [seed for seed, *_ in curves] == ["0", "2", "3"]
  assert all(excess.size == 1000 - 25 + 1 and not excess.any() for *_, excess in curves)
  # a setting with a seed the reference lacks has no paired row
  other = f"other={t}/gpu-1000/results.json:lora,{t}/gpu-1000-seeds/s[4-5]/results.json:lora"
  assert "Paired by seed" not in compare_seeds.table(lora, [other])
  both = compare_seeds.table(lora, [lora.replace("lora=", "again=", 1), other])
  assert "Not paired: other (seeds 4,5 have no reference run)." in both
  with pytest.raises(SystemExit, match="seeds repeat"):
    compare_seeds.load_group(f"x={t}/gpu-1000/results.json:lora,{t}/gpu-1000/results.json:lora")
  with pytest.raises(SystemExit, match="at least two"):
    compare_seeds.load_group(f"x={t}/gpu-1000/results.json:lora")
  with pytest.raises(SystemExit, match="no file matches"):
    compare_seeds.load_group(f"x={t}/nowhere*/results.json:lora")
  with pytest.raises(SystemExit, match="not comparable"):
    compare_seeds.load_group(f"x={t}/gpu-1000/results.json:lora,{t}/cpu-pilot-seed1/results.json:lora")


def test_init_seed_changes_the_initialisation_not_the_batches(model, streams, tmp_path):
  """B starts at zero, so the first step's loss is the backbone's on that step's batch: equal
  for two inits on the same data seed, different for another data seed."""
  import jax
  from flax import nnx

  def first(name, **kw):
    trainer = Trainer(model, _cfg("lora", **kw), *streams, tmp_path / name)
    state = jax.tree.map(np.array, nnx.state(trainer.adapters))
    return trainer.fit(until=1, progress=False)[0], state

  loss, init = first("a", seed=0)
  loss_other_init, other_init = first("b", seed=0, init_seed=1)
  loss_other_data, init_of_seed_1 = first("c", seed=1)
  assert loss_other_init == loss and loss_other_data != loss
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, other_init, init_of_seed_1)))
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, other_init, init)))


def test_clip_by_group_norm_clips_each_group_on_its_own():
  import jax

  from adafuse_jax.train.loop import clip_by_group_norm, grad_norms

  rng = np.random.default_rng(0)
  grads = {"pool": {"A_q": rng.normal(size=(30, 4)) * 0.01, "beta_q": rng.normal(size=(3,)) * 50},
           "router": {"w": rng.normal(size=(5, 4))}}
  grads = jax.tree.map(lambda a: np.asarray(a, np.float32), grads)
  clip = clip_by_group_norm(1.0)
  out, _ = clip.update(grads, clip.init(grads))
  norms = grad_norms(out)
  np.testing.assert_allclose(norms["routing"], 1.0, rtol=1e-5)  # clipped, direction kept
  np.testing.assert_allclose(out["router"]["w"] / grads["router"]["w"],
                             out["pool"]["beta_q"][0] / grads["pool"]["beta_q"][0], rtol=1e-5)
  np.testing.assert_array_equal(out["pool"]["A_q"], grads["pool"]["A_q"])  # small: untouched


def test_rows_record_how_far_training_moved_the_routing():
  """`all` keeps max / mean |x| of the trained routers and tied betas in each row, and the table
  prints them: how much a tied pool's routed term is used."""
  import jax.numpy as jnp

  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig
  from adafuse_jax.train.cli import markdown, routing_summary

  cfg = tiny_config(layers=2)
  tied = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4, rank=2,
                                          tied_shared=True), seed=0)
  tied.pool.beta_q.set_value(jnp.array([0.5, -0.1]))
  summary = routing_summary(tied)
  assert set(summary) == {"beta", "router"}
  assert summary["beta"]["max_abs"] == pytest.approx(0.5)
  betas = len(tied.cfg.modules) * cfg.layers  # every other beta still 0
  assert summary["beta"]["mean_abs"] == pytest.approx(0.6 / betas)
  assert 0 < summary["router"]["mean_abs"] < summary["router"]["max_abs"]
  assert routing_summary(MixtureOfLoRA(cfg, AdapterConfig(mode="lora", rank=2), seed=0)) == {}
  row = {"mode": "pregated-tied", "trainable_params": 1, "ppl": {"a": 2.0}, "mean_ppl": 2.0,
         "math_em": 0.0, "analogy_em": 0.0, "routing": {}, "routing_params": summary}
  report = {"environment": {"date": "d", "command": "train/__main__.py all", "device": "cpu",
                            "jax": "x"}, "config": TrainConfig().to_json(), "math_items": 1,
            "analogy_items": 1, "heldout_windows": 0, "rows": {"pregated-tied": row}}
  assert "`pregated-tied` beta 0.500 / " in markdown(report)


def test_job_argv_respells_the_same_settings_for_one_mode():
  from adafuse_jax.train.cli import _config, _job_argv, build_parser
  args = build_parser().parse_args(
      ["--cache", "/c", "all", "--out", "o", "--workdir", "w", "--modes", "lora,pregated",
       "--jobs", "3", "--shared-fr", "0.875", "--clip-apart", "--init-seed", "7", "--export", "E",
       "--export-mode", "pregated", "--rows-from", "x.json", "--steps", "12"])
  for mode, exported in (("pregated", "E"), ("lora", None)):
    child = build_parser().parse_args(_job_argv(args, mode, pathlib.Path("/j") / mode))
    assert _config(child, mode) == _config(args, mode)
    assert (child.modes, child.out, child.export, child.jobs, child.rows_from, child.quiet,
            child.cache, child.workdir) == (mode, f"/j/{mode}", exported, 1, [], True, "/c", "w")


def _job(code: str) -> list[str]:
  import sys
  return [sys.executable, "-c", code]


def test_run_jobs_keeps_to_the_limit_and_names_a_failure(tmp_path):
  from adafuse_jax.train.jobs import run_jobs
  # Each job counts the jobs running beside it through marker files.
  count = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); m = d / sys.argv[2];"
           " m.touch(); print(len(list(d.glob('*.run')))); time.sleep(1.0); m.unlink()")
  (tmp_path / "m").mkdir()
  jobs = [(f"j{i}", _job(count) + [str(tmp_path / "m"), f"j{i}.run"]) for i in range(4)]
  seconds = run_jobs(jobs, 2, tmp_path / "logs", progress=False)
  assert sorted(seconds) == ["j0", "j1", "j2", "j3"]
  seen = [int((tmp_path / "logs" / f"j{i}.log").read_text()) for i in range(4)]
  assert max(seen) == 2, seen
  bad = [("bad", _job("import sys; print('boom'); sys.exit(3)")), ("ok", _job("pass")),
         ("later", _job("pass"))]
  with pytest.raises(UserError, match=r"job bad failed(.|\n)*boom(.|\n)*not started: ok, later"):
    run_jobs(bad, 1, tmp_path / "logs2", progress=False)
  with pytest.raises(UserError, match="--jobs=0 must be at least 1"):
    run_jobs(bad, 0, tmp_path / "logs3", progress=False)


def test_run_jobs_stops_its_jobs_when_terminated(tmp_path):
  import os
  import signal
  import threading

  from adafuse_jax.train.jobs import run_jobs
  pid_file = tmp_path / "pid"
  # `timeout` signals the caller and then its whole process group: the job passes its SIGTERM
  # on to the caller while the caller is stopping it, which must not cut the stopping short.
  sleeper = _job("import os, signal, time\n"
                 "def passed_on(*_):\n"
                 "  os.kill(os.getppid(), signal.SIGTERM); time.sleep(0.5); os._exit(0)\n"
                 "signal.signal(signal.SIGTERM, passed_on)\n"
                 f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")

  def terminate_when_started():
    for _ in range(200):
      if pid_file.exists() and pid_file.read_text():
        break
      threading.Event().wait(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=terminate_when_started, daemon=True).start()
  with pytest.raises(KeyboardInterrupt):
    run_jobs([("sleeper", sleeper)], 1, tmp_path / "logs", progress=False)
  with pytest.raises(ProcessLookupError):  # stopped and reaped, not left behind or a zombie
    os.kill(int(pid_file.read_text()), 0)
  assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


def test_training_runs_as_part_of_the_package_and_from_a_checkout():
  """`python -m adafuse_jax.train` is the command; from a checkout, the earlier `python -m train`
  runs the same one; the installed distribution adds no top-level `train` module."""
  import importlib.util
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).parents[1]
  for module, cwd in (("adafuse_jax.train", "/"), ("train", root)):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=cwd, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert "python -m adafuse_jax.train" in out.stdout
  spec = importlib.util.find_spec("adafuse_jax.train")
  assert spec is not None and pathlib.Path(spec.origin).parent == root / "train"
  outside = subprocess.run([sys.executable, "-c", "import train"], capture_output=True, text=True,
                           timeout=60, cwd="/", env={**os.environ, "PYTHONPATH": ""})
  assert outside.returncode != 0 and "No module named 'train'" in outside.stderr


@pytest.mark.parametrize("args, words", [
    (("fit", "--mode", "pregated", "--workdir", "pyproject.toml"), "--workdir 'pyproject.toml' is a file"),
    (("--cache", "README.md", "data"), "--cache 'README.md' is a file"),
    (("fit", "--mode", "pregated", "--workdir", "/proc/no-such/run"), "cannot be created"),
])
def test_output_folders_are_checked_before_any_work(args, words):
  import subprocess
  import sys

  out = subprocess.run([sys.executable, "-m", "adafuse_jax.train", *args], capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [line for line in out.stderr.strip().splitlines()
                                             if line.startswith("error: ")]
  assert words in out.stderr
