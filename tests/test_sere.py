"""SERE re-routing: off at rho = 1, total at rho = 0, deterministic, jit-compatible; similarity."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.adapters.sere import SereSettings
from adafuse_jax.config import AdapterConfig
from adafuse_jax.generation import Generator, generate
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.adapters.sere import calibrate, distinct_experts, linear_cka, reroute
from adafuse_jax.paths import registry
from tests.conftest import tiny_config


def _random_case(seed, batch=16, num_experts=64, k=4):
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(batch)])
  y = jnp.asarray(rng.normal(size=(num_experts, 32, 8)), jnp.float32)
  return jnp.asarray(experts, jnp.int32), linear_cka(y)


def test_similarity_is_a_cka_matrix():
  _, sim = _random_case(0, num_experts=6)
  np.testing.assert_allclose(np.diag(sim), 1.0, rtol=1e-5)
  np.testing.assert_allclose(sim, sim.T, rtol=1e-5, atol=1e-6)
  assert float(sim.min()) >= 0.0 and float(sim.max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("primary_k", [1, 2])
def test_rho_one_changes_nothing_and_rho_zero_moves_every_secondary(primary_k):
  experts, sim = _random_case(1)
  assert (reroute(experts, sim, primary_k, 1.0) == experts).all()
  moved = reroute(experts, sim, primary_k, 0.0)
  primary = set(np.asarray(experts[:, :primary_k]).ravel().tolist())
  assert (moved[:, :primary_k] == experts[:, :primary_k]).all()
  assert set(np.asarray(moved[:, primary_k:]).ravel().tolist()) <= primary
  assert int(distinct_experts(moved, 64)) <= int(distinct_experts(experts, 64))


def test_reroute_is_deterministic_and_jittable():
  experts, sim = _random_case(2)
  f = jax.jit(reroute, static_argnums=(2, 3))
  a, b = f(experts, sim, 1, 0.3), f(experts, sim, 1, 0.3)
  assert (a == b).all() and (a == reroute(experts, sim, 1, 0.3)).all()


def _calibrated(**adapter_kw):
  """A tiny model, a random pre-gated pool (4 experts) and its similarity on fixed tokens."""
  cfg = tiny_config()
  model = LlamaModel(cfg, seed=0)
  adapters = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4,
                                              **adapter_kw), seed=1, random_b=True)
  sim = calibrate(model, adapters, jnp.asarray(np.arange(48).reshape(3, 16) % cfg.vocab_size),
                  registry.runtime(adapters))
  return cfg, model, adapters, sim


def test_runtime_with_rho_one_equals_plain_pregated_and_calibration_runs():
  cfg, model, adapters, sim = _calibrated(router_init_std=1.0)
  assert sim.shape == (cfg.layers, 4, 4)
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
  plain = generate(Generator(model, adapters=adapters), prompts, max_new_tokens=5)
  off = generate(Generator(model, adapters=adapters,
                           sere=SereSettings(jnp.asarray(sim.mean(0)), 1, 1.0)), prompts,
                 max_new_tokens=5)
  assert off.tokens == plain.tokens
  on = generate(Generator(model, adapters=adapters,
                          sere=SereSettings(jnp.asarray(sim.mean(0)), 1, 0.0)), prompts,
                max_new_tokens=5)
  for experts, _ in on.routes:  # every secondary choice is some row's primary
    assert set(experts[:, 1].tolist()) <= set(experts[:, 0].tolist())


def test_calibration_covers_only_the_layers_that_carry_experts():
  cfg, _, _, sim = _calibrated(first_layer=1)
  assert sim.shape == (cfg.layers - 1, 4, 4) and np.isfinite(sim).all()


def _row(primary, rho, ppl, distinct):
  return {"primary_k": primary, "rho": rho, "mean_ppl": ppl, "mean_distinct": distinct}


def test_the_recommended_setting_reads_fewest_experts_within_the_perplexity_budget():
  from adafuse_jax.train.sere_sweep import recommend

  rows = [_row(1, 1.0, 10.0, 30.0), _row(1, 0.5, 10.04, 29.0), _row(1, 0.2, 10.2, 20.0),
          _row(2, 0.5, 10.01, 29.5), _row(2, 0.0, 10.049, 25.0)]
  best = recommend(rows, 0.5)
  assert (best["primary_k"], best["rho"], best["mean_distinct"]) == (2, 0.0, 25.0)
  assert best["ppl_cost_pct"] == pytest.approx(0.49)
  assert recommend(rows, 2.5)["rho"] == 0.2           # a larger budget buys more
  assert recommend(rows, 0.0) is None                  # nothing saves experts for free
  assert recommend([_row(1, 1.0, 10.0, 8.0), _row(1, 0.0, 9.9, 8.0)], 0.5) is None  # no saving


def test_sere_calibrate_saves_the_similarity_that_decode_then_reads(tmp_path, capsys):
  """`train sere-calibrate` on a copy of the shipped pool, calibrated on the user's own text:
  the [L, E, E] file lands beside the pool and `decode --sere-rho` runs with it; `--sweep` saves
  the quality sweep whose recommendation `--sere-rho auto` takes (before it, a named error); bad
  sweep values and the shipped pool itself are refused by name."""
  import json
  import shutil

  from adafuse_jax import decode
  from adafuse_jax.adapters.io import DEFAULT_POOL
  from adafuse_jax.adapters.sere import QUALITY_FILE, SIMILARITY_FILE
  from adafuse_jax.train import cli

  pool = tmp_path / "pool"
  shutil.copytree(DEFAULT_POOL, pool)
  (pool / SIMILARITY_FILE).unlink()
  (pool / QUALITY_FILE).unlink(missing_ok=True)
  text = (pathlib.Path(__file__).parent / "data" / "GPL-3.txt").read_text()
  (tmp_path / "mine.jsonl").write_text(json.dumps({"text": text}) + "\n")
  assert decode.main(["--adapters", str(pool), "--sere-rho", "auto", "--prompt", "Hi"]) == 2
  assert f"has no {QUALITY_FILE} to pick --sere-rho auto from" in capsys.readouterr().err
  mine = ["--adapters", str(pool), "--data", str(tmp_path / "mine.jsonl"), "--windows", "2",
          "--seq-len", "64", "--quiet"]
  assert cli.main(["sere-calibrate", *mine, "--sweep", "--rhos", "1,2"]) == 2
  assert "each rho must be in [0, 1]" in capsys.readouterr().err
  assert cli.main(["sere-calibrate", *mine, "--sweep", "--primaries", "3"]) == 2
  assert "each S must be in [1, top-k = 2]" in capsys.readouterr().err
  assert cli.main(["sere-calibrate", *mine, "--sweep", "--rhos", "1,0", "--sweep-windows", "2",
                   "--sweep-seq-len", "32"]) == 0
  report = json.loads(capsys.readouterr().out)
  saved = json.loads((pool / QUALITY_FILE).read_text())
  assert [(r["primary_k"], r["rho"]) for r in saved["rows"]] == [(1, 1.0), (1, 0.0)]
  assert all(np.isfinite(r["mean_ppl"]) and 1 <= r["mean_distinct"] <= 4 for r in saved["rows"])
  assert saved["recommended"] == report["sweep"]["recommended"]
  assert (pool / "sere_quality.md").is_file() and (pool / "sere_quality.png").is_file()
  assert decode.main(["--adapters", str(pool), "--sere-rho", "auto", "--max-new-tokens", "2",
                      "--json", "--prompt", "Hello"]) == 0
  best, streams = saved["recommended"], capsys.readouterr()
  assert json.loads(streams.out).get("sere") == (
      None if best is None else {"rho": best["rho"], "primary": best["primary_k"]})
  similarity = np.load(pool / SIMILARITY_FILE)
  assert similarity.shape == (30, 8, 8) == tuple(report["shape"])
  assert np.isfinite(similarity).all()
  np.testing.assert_allclose(np.diagonal(similarity, axis1=1, axis2=2), 1.0, atol=1e-4)
  assert decode.main(["--adapters", str(pool), "--sere-rho", "0", "--max-new-tokens", "3",
                      "--json", "--prompt", "Hello"]) == 0
  assert json.loads(capsys.readouterr().out)["sere"]["rho"] == 0.0
  assert cli.main(["sere-calibrate", "--adapters", str(DEFAULT_POOL)]) == 2
  assert "already carries its similarity" in capsys.readouterr().err
