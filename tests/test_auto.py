"""Path "auto": the registry's candidates, the prompt's switch rate, and the measured choice."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.auto import choose_path, prompt_agreement_rate, prompt_switch_rate
from adafuse_jax.config import AdapterConfig
from adafuse_jax.errors import UserError
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.paths import registry
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
  return LlamaModel(tiny_config(), seed=3, layout="stacked")


def candidates(model, adapters, batch, agree_rate=None):
  return registry.candidates(adapters.cfg, layout=model.layout, batch=batch, agree_rate=agree_rate)


def extra_bytes(cand, model, adapters):
  return registry.PATHS[cand.path].extra_bytes(model, adapters)


def _adapters(model, **kw):
  cfg = AdapterConfig(mode=kw.pop("mode", "pregated"), num_experts=kw.pop("num_experts", 4),
                      rank=4, top_k=2,
                      modules=kw.pop("modules", ("q", "v")), router_init_std=0.5, **kw)
  return MixtureOfLoRA(model.cfg, cfg, seed=1, random_b=True)


def test_candidates_follow_mode_batch_and_backend(model):
  names = lambda a, b: [c.name for c in candidates(model, a, b)]  # noqa: E731
  # CPU: no fused kernels; a batch wants different experts: no merging.
  assert names(_adapters(model), 1) == ["pregated-xla", "pregated-packed", "pregated-merged"]
  assert names(_adapters(model), 4) == ["pregated-xla", "pregated-packed"]
  # ... unless its rows are expected to agree at some steps.
  assert names(_adapters(model), 4)[:2] == [c.name for c in candidates(
      model, _adapters(model), 4, agree_rate=0.0)]
  assert candidates(model, _adapters(model), 4, agree_rate=0.5)[-1].name == "pregated-merged"
  assert names(_adapters(model, mode="layerwise"), 1) == ["layerwise-xla", "layerwise-packed"]
  # A shared expert (the shipped pool's tied one) is folded into the backbone by the Generator
  # each candidate runs in, so it blocks no path.
  assert names(_adapters(model, tied_shared=True), 1) == names(_adapters(model), 1)


def test_prompt_switch_rate(model):
  adapters = _adapters(model)
  assert prompt_switch_rate(model, adapters, [5, 5, 5, 5]) == 0.0  # same token, same route
  rate = prompt_switch_rate(model, adapters, list(range(1, 40)))
  assert 0.0 < rate <= 1.0
  assert prompt_switch_rate(model, adapters, [7]) is None
  assert prompt_switch_rate(model, _adapters(model, mode="layerwise"), [1, 2]) is None


def test_choice_is_the_fastest_measured_and_its_generator_runs(model):
  adapters = _adapters(model)
  choice, gen = choose_path(model, adapters, batch=1, cache_len=128, switch_rate=0.5, steps=4)
  assert set(choice.expected_ms) == {"pregated-xla", "pregated-packed", "pregated-merged"}
  assert choice.candidate.name == min(choice.expected_ms, key=choice.expected_ms.get)
  merged = choice.details["pregated-merged"]
  assert choice.expected_ms["pregated-merged"] == pytest.approx(
      0.5 * merged["switched_ms"] + 0.5 * merged["unchanged_ms"])
  assert gen.merges_per_token == choice.candidate.merges and "switch rate 0.50" in choice.reason
  nxt, _, _, _ = gen.forward(jnp.ones((1, 1), jnp.int32), gen.new_cache(1, 128),
                             __import__("jax").random.key(0))
  assert nxt.shape == (1,)


def test_too_short_cache_is_rejected(model):
  with pytest.raises(UserError, match="cache_len"):
    choose_path(model, _adapters(model), cache_len=16, steps=8)


def test_candidates_that_do_not_fit_are_skipped_and_named(model, monkeypatch):
  import adafuse_jax.auto as autopath

  adapters = _adapters(model)
  xla, packed, merged = candidates(model, adapters, 1)
  assert extra_bytes(xla, model, adapters) == 0
  assert extra_bytes(packed, model, adapters) > extra_bytes(merged, model, adapters) > 0
  # Room for the merged weights' second copy, not for the packed copy.
  room = (extra_bytes(merged, model, adapters) + extra_bytes(packed, model, adapters)) // 2
  monkeypatch.setattr(autopath, "free_device_bytes", lambda: room)
  choice, _ = choose_path(model, adapters, batch=1, cache_len=128, steps=4)
  assert set(choice.expected_ms) == {"pregated-xla", "pregated-merged"}
  assert "GiB free" in choice.details["pregated-packed"]["skipped"]
  assert "not measured: pregated-packed" in choice.reason
  monkeypatch.setattr(autopath, "free_device_bytes", lambda: 0)
  only_xla, _ = choose_path(model, adapters, batch=1, cache_len=128, steps=4)
  assert only_xla.candidate.name == "pregated-xla"


@pytest.mark.parametrize("mode", ["pregated", "layerwise"])
def test_row_layout_bytes_are_counted_where_it_is_built(model, mode, monkeypatch):
  import jax

  from adafuse_jax.paths import xla as xla_path

  adapters = _adapters(model, mode=mode, num_experts=8)  # 2 choices x 4 <= 8: steps gather
  xla = candidates(model, adapters, 1)[0]
  assert xla.path == "xla"
  monkeypatch.setattr(xla_path, "ROW_LAYOUT_BACKENDS", (jax.default_backend(),))
  built = sum(x.nbytes for x in jax.tree.leaves(xla_path.build_rows(adapters)))
  assert extra_bytes(xla, model, adapters) == xla_path.rows_nbytes(adapters) == built > 0


def test_prompt_agreement_rate(model):
  adapters = _adapters(model)
  assert prompt_agreement_rate(model, adapters, [[3, 4, 5], [9, 4, 5]]) == pytest.approx(2 / 3)
  assert prompt_agreement_rate(model, adapters, [[1, 2], [1, 2], [8, 1, 2]]) == 1.0
  assert prompt_agreement_rate(model, adapters, [[1, 2]]) is None


def test_batch_merged_candidate_weighs_agreeing_and_disagreeing_steps(model):
  adapters = _adapters(model)
  choice, gen = choose_path(model, adapters, batch=3, cache_len=128, switch_rate=1.0,
                            agree_rate=0.25, steps=4)
  merged = choice.details["pregated-merged"]
  assert choice.expected_ms["pregated-merged"] == pytest.approx(
      0.25 * merged["switched_ms"] + 0.75 * merged["disagreed_ms"])
  assert "batch agreement 0.25" in choice.reason
  none, _ = choose_path(model, adapters, batch=3, cache_len=128, agree_rate=0.0, steps=4)
  assert "pregated-merged" not in none.expected_ms and "agreed on their experts at 0%" in none.reason
