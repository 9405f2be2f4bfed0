"""SERE re-routing: off at rho = 1, total at rho = 0, deterministic, jit-compatible; similarity."""

from __future__ import annotations

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
