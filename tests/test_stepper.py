"""The decode loop's stepper: state donated and written back in place, tokens handed out fresh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.config import AdapterConfig
from adafuse_jax.generation import Generator
from adafuse_jax.model import LlamaModel
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.stepper import Decoder, step_key
from tests.conftest import tiny_config

BATCH, CACHE, STEPS = 2, 32, 6


@pytest.fixture(scope="module")
def pregated_gen() -> Generator:
  model = LlamaModel(tiny_config(), seed=11)
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2, router_init_std=0.5,
                      modules=("q", "v", "down"))
  return Generator(model, adapters=MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True),
                   path="packed")


def start(gen: Generator, sampling: SamplingConfig):
  """A prefill of two rows: (its tokens [B], cache, routing)."""
  prompts = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32)
  cache = gen.new_cache(BATCH, CACHE)
  fn = gen.compiled(BATCH, prompts.shape[1], CACHE, sampling)
  nxt, _, cache, routing = gen.run(fn, prompts, cache, step_key(jax.random.key(7), 0))
  return nxt, cache, routing


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.3)],
                         ids=["greedy", "sampled"])
def test_stable_steps_equal_plain_steps(pregated_gen, sampling):
  """The donated, in-place step samples the tokens and routes the experts of the plain step
  fed its own output with the same keys."""
  gen = pregated_gen
  assert gen.keeps_state()
  nxt, cache, routing = start(gen, sampling)
  decoder = Decoder(gen, nxt, cache, jax.random.key(7), sampling, routing=routing)
  got = [decoder.step() for _ in range(STEPS)]

  nxt, cache, _ = start(gen, sampling)
  plain = gen.compiled(BATCH, 1, CACHE, sampling)
  for n, (tokens, (experts, gates)) in enumerate(got, start=1):
    nxt, _, cache, (want_experts, want_gates) = gen.run(plain, nxt[:, None], cache,
                                                        step_key(jax.random.key(7), n))
    np.testing.assert_array_equal(tokens, nxt)
    np.testing.assert_array_equal(experts, want_experts)
    np.testing.assert_allclose(gates, want_gates, rtol=1e-6)


def test_state_keeps_its_addresses_and_handed_out_tokens_stay_readable(pregated_gen):
  """After the first step every buffer of the state stays where it is (what spares XLA a new
  command buffer per step on a GPU), and the tokens handed out survive the later steps."""
  nxt, cache, routing = start(pregated_gen, SamplingConfig())
  decoder = Decoder(pregated_gen, nxt, cache, jax.random.key(7), SamplingConfig(),
                    routing=routing)
  # The caller's prefill token and routing were copied, not donated.
  np.asarray(nxt), np.asarray(routing[0])

  def addresses() -> list[int]:
    leaves = jax.tree.leaves(decoder.state)
    return [x.unsafe_buffer_pointer() for x in leaves
            if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]

  handed = [decoder.step()]
  first = addresses()
  for _ in range(STEPS - 1):
    handed.append(decoder.step())
    assert addresses() == first
  tokens = np.stack([np.asarray(t) for t, _ in handed])
  assert tokens.shape == (STEPS, BATCH)
  assert decoder.routing is handed[-1][1]


def test_merging_generator_keeps_the_plain_form():
  """A merging generator runs two programs per step: the plain form, a fixed token allowed."""
  model = LlamaModel(tiny_config(), seed=11)
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2, modules=("q", "v"))
  gen = Generator(model, adapters=MixtureOfLoRA(model.cfg, cfg, seed=3), path="merged")
  assert not gen.keeps_state()
  decoder = Decoder(gen, jnp.asarray([5], jnp.int32), gen.new_cache(1, CACHE),
                    jax.random.key(0), SamplingConfig())
  fixed = [np.asarray(decoder.step(feed_back=False)[0]) for _ in range(3)]
  assert all(np.array_equal(t, fixed[0]) for t in fixed)


def test_stable_decoder_refuses_a_fixed_token(pregated_gen):
  decoder = Decoder(pregated_gen, jnp.asarray([5, 6], jnp.int32),
                    pregated_gen.new_cache(BATCH, CACHE), jax.random.key(0), SamplingConfig())
  with pytest.raises(ValueError, match="always feeds its samples back"):
    decoder.step(feed_back=False)
