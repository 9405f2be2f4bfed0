"""Generation: sampling, batching with ragged prompts, stop conditions, input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adafuse_jax.errors import DeviceMemoryError, UserError
from adafuse_jax.generation import Generator, generate, prompt_bucket
from adafuse_jax.model import LlamaModel
from adafuse_jax.sampling import SamplingConfig, sample
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_gen():
  return Generator(LlamaModel(tiny_config(), seed=11))


def test_batched_ragged_greedy_equals_one_at_a_time(tiny_gen):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 97, n).tolist() for n in (3, 9, 5)]
  together = generate(tiny_gen, prompts, max_new_tokens=12).tokens
  alone = [generate(tiny_gen, [p], max_new_tokens=12).tokens[0] for p in prompts]
  assert together == alone


def test_stop_token_ends_only_its_row(tiny_gen):
  prompts = [[5, 6, 7], [8, 9]]
  free = generate(tiny_gen, prompts, max_new_tokens=10).tokens
  stop = free[0][3]
  res = generate(tiny_gen, prompts, max_new_tokens=10, stop_ids=frozenset({stop}))
  assert res.tokens[0] == free[0][:free[0].index(stop)]
  assert res.stop_reasons[0] == "eos"
  assert len(res.tokens[1]) == 10 or stop in free[1]


def test_sampling_is_seeded_and_temperature_changes_output(tiny_gen):
  cfg = SamplingConfig(temperature=1.5, top_p=0.95)
  a = generate(tiny_gen, [[4, 5, 6]], max_new_tokens=16, sampling=cfg, seed=1).tokens
  b = generate(tiny_gen, [[4, 5, 6]], max_new_tokens=16, sampling=cfg, seed=1).tokens
  c = generate(tiny_gen, [[4, 5, 6]], max_new_tokens=16, sampling=cfg, seed=2).tokens
  assert a == b and a != c


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = jax.vmap(lambda k: sample(logits, k, SamplingConfig(temperature=1.0, top_p=0.7)))(
      jax.random.split(jax.random.key(0), 512))
  assert set(np.unique(draws).tolist()) == {0, 1}
  greedy = sample(logits, jax.random.key(0), SamplingConfig())
  assert greedy.tolist() == [0]


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")),
                                 dict(temperature=float("inf")), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_p=float("nan"))])
def test_bad_sampling_settings_are_rejected(bad):
  with pytest.raises(UserError):
    SamplingConfig(**bad)


def test_bad_prompts_are_rejected(tiny_gen):
  with pytest.raises(UserError, match="empty"):
    generate(tiny_gen, [[]], max_new_tokens=4)
  with pytest.raises(UserError, match="context is 128"):
    generate(tiny_gen, [list(range(3, 90)) * 2], max_new_tokens=4)
  with pytest.raises(UserError, match="max_new_tokens"):
    generate(tiny_gen, [[3]], max_new_tokens=0)


def test_a_batch_the_device_cannot_hold_raises_device_memory_error():
  """A real failed allocation (a thousand rows of a million-token cache): a DeviceMemoryError
  that names what to ask for less of, raised from XLA's own error."""
  gen = Generator(LlamaModel(tiny_config(max_context=1 << 20), seed=11))
  with pytest.raises(DeviceMemoryError) as error:
    generate(gen, [[1]] * 1000, max_new_tokens=(1 << 20) - 64)
  message = str(error.value)
  assert message.startswith("the device ran out of memory (") and "max_new_tokens" in message
  assert isinstance(error.value.__cause__, jax.errors.JaxRuntimeError)


def test_max_new_tokens_is_capped_by_the_context(tiny_gen):
  res = generate(tiny_gen, [list(range(3, 93))], max_new_tokens=100)
  assert len(res.tokens[0]) == 128 - 90


def test_prompt_buckets():
  assert [prompt_bucket(n) for n in (1, 16, 17, 100, 2048)] == [16, 16, 32, 128, 2048]


@pytest.mark.parametrize("mode, modules, layout", [
    ("pregated", ("q", "k", "v", "o", "gate", "up", "down"), "list"),
    ("layerwise", ("q", "k", "v", "o", "gate", "up", "down"), "list"),
    ("pregated", ("q", "v"), "stacked")])  # o and down pack alone: the packing is their array
def test_packed_generator_equals_xla_and_holds_one_copy(mode, modules, layout):
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig

  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, router_init_std=0.5,
                      modules=modules)

  def fresh():
    model = LlamaModel(tiny_config(), seed=11).with_layout(layout)
    return model, MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True, layout=layout)

  model, adapters = fresh()
  prompts = [[5, 6, 7, 8], [9, 10]]
  want = generate(Generator(model, adapters=adapters, path="xla"), prompts,
                  max_new_tokens=8).tokens
  packed = Generator(model, adapters=adapters, path="packed")
  assert generate(packed, prompts, max_new_tokens=8).tokens == want
  # The packing is the only copy the steps read: the model's matrices and the experts are gone.
  held = [v for v in jax.tree.leaves(packed.adapter_params["pool"])] + [
      packed.params[n][...] for n in ("q", "down")]
  assert all(np.size(a) == 0 for a in held)
  # release_weights frees the sources while packing; the result is the same.
  model, adapters = fresh()
  released = Generator(model, adapters=adapters, path="packed", release_weights=True)
  assert generate(released, prompts, max_new_tokens=8).tokens == want
  sources = jax.tree.leaves((model.q.get_value(), adapters.pool.A_q.get_value(),
                             adapters.pool.B_q.get_value()))
  assert sources and all(a.is_deleted() for a in sources)
  with pytest.raises(ValueError, match="release_weights frees.*path 'xla' reads the model's own"):
    Generator(LlamaModel(tiny_config(), seed=11), path="xla", release_weights=True)


@pytest.mark.parametrize("mode", ["pregated", "layerwise"])
def test_row_layout_generator_equals_stored_layout(mode, monkeypatch):
  """With the GPU's decode copies (`adafuse_jax.paths.xla.build_rows`) forced on, greedy tokens
  are those of the stored layout."""
  from adafuse_jax.paths import xla
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig

  model = LlamaModel(tiny_config(), seed=11)
  cfg = AdapterConfig(mode=mode, num_experts=16, rank=4, top_k=2, router_init_std=0.5)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True)
  prompts = [[5, 6, 7, 8], [9, 10]]
  monkeypatch.setattr(xla, "ROW_LAYOUT_BACKENDS", ())
  plain = Generator(model, adapters=adapters, path="xla")
  assert plain.derived is None
  want = generate(plain, prompts, max_new_tokens=8).tokens
  monkeypatch.setattr(xla, "ROW_LAYOUT_BACKENDS", (jax.default_backend(),))
  rows = Generator(model, adapters=adapters, path="xla")
  assert rows.derived is not None and "A_q" in rows.derived
  assert generate(rows, prompts, max_new_tokens=8).tokens == want
  if mode == "pregated":  # merged steps switch from the pool's own A
    assert Generator(model, adapters=adapters, path="merged", backend="xla").derived is None


def test_windowed_attention_generator_writes_the_same_tokens(tiny_gen):
  """Decode steps that attend over the cache's written part only (`windowed_attention`, here a
  128-slot cache whose steps cross from the 64-slot window to the whole) write the same greedy
  tokens as XLA's attention over the whole cache, ragged prompts included."""
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
  model = LlamaModel(tiny_config(), seed=11)
  windowed = Generator(model, attention="windowed")
  assert windowed.attention == "windowed"
  got = generate(windowed, prompts, max_new_tokens=70)
  assert got.tokens == generate(Generator(model, attention="xla"), prompts,
                                max_new_tokens=70).tokens
  assert max(len(t) for t in got.tokens) > 64 - 16  # the steps left the first window


def test_pallas_attention_generator_writes_the_same_tokens(tiny_gen):
  """Decode steps on the Pallas decode-attention kernel (the Pallas interpreter here), the one
  after XLA's rotary and cache write ("pallas") and the one that rotates and writes the token
  itself ("pallas-append"), write the same greedy tokens as XLA's attention, ragged
  prompts (left padding) and a pre-gated pool on path packed included; an unknown attention is a
  named error."""
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig

  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
  model = LlamaModel(tiny_config(), seed=11)
  for name in ("pallas", "pallas-append"):
    kernel = Generator(model, attention=name)
    assert kernel.attention == name
    assert (generate(kernel, prompts, max_new_tokens=6).tokens
            == generate(tiny_gen, prompts, max_new_tokens=6).tokens)
  adapters = MixtureOfLoRA(model.cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4,
                                                    router_init_std=0.5), seed=3, random_b=True)
  want = generate(Generator(model, adapters=adapters, path="packed"), prompts,
                  max_new_tokens=6).tokens
  got = generate(Generator(model, adapters=adapters, path="packed", attention="pallas"),
                 prompts, max_new_tokens=6).tokens
  assert got == want
  with pytest.raises(UserError, match="unknown attention 'flash'; choose one of auto, xla,"
                     " windowed, pallas, pallas-append"):
    Generator(model, attention="flash")
  # "auto" takes the kernel on one GPU only: the interpreter on the CPU would be slow.
  assert tiny_gen.attention == ("pallas-append" if jax.default_backend() == "gpu" else "xla")
