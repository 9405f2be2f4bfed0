"""The decode loop's stepper: state donated and written back in place, tokens handed out fresh."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.config import AdapterConfig
from adafuse_jax.generation import Generator
from adafuse_jax.model import LlamaModel
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.stepper import HAND_OUTS, Decoder, resolve_hand_out, step_key
from tests.conftest import tiny_config

BATCH, CACHE, STEPS = 2, 32, 6


@pytest.fixture(scope="module")
def lora_gen() -> Generator:
  """A backbone with a plain LoRA on the packed path: no router, so the in-place form."""
  model = LlamaModel(tiny_config(), seed=11)
  cfg = AdapterConfig(mode="lora", num_experts=1, rank=4, top_k=1, modules=("q", "v", "down"))
  return Generator(model, adapters=MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True),
                   path="packed")


@pytest.fixture(scope="module")
def pregated_gen() -> Generator:
  """A pre-gated pool on the packed path: a router, so each step's routing is in the state."""
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
def test_in_place_steps_equal_plain_steps(lora_gen, sampling):
  """The donated, in-place step samples the tokens of the plain step fed its own output with
  the same keys."""
  gen = lora_gen
  assert gen.keeps_state()
  nxt, cache, _ = start(gen, sampling)
  decoder = Decoder(gen, nxt, cache, jax.random.key(7), sampling)
  got = [decoder.step() for _ in range(STEPS)]

  nxt, cache, _ = start(gen, sampling)
  plain = gen.compiled(BATCH, 1, CACHE, sampling)
  for n, (tokens, routing) in enumerate(got, start=1):
    nxt, _, cache, _ = gen.run(plain, nxt[:, None], cache, step_key(jax.random.key(7), n))
    np.testing.assert_array_equal(tokens, nxt)
    assert routing is None


@pytest.mark.parametrize("which", ["lora_gen", "pregated_gen"])
def test_state_keeps_its_addresses_and_handed_out_tokens_stay_readable(which, request):
  """After the first step every buffer of the state (the routing's too) stays where it is
  (what spares XLA a new command buffer per step on a GPU), and the tokens handed out survive
  the later steps."""
  gen = request.getfixturevalue(which)
  nxt, cache, routing = start(gen, SamplingConfig())
  key = jax.random.key(7)
  decoder = Decoder(gen, nxt, cache, key, SamplingConfig(), routing=routing)

  def addresses() -> list[int]:
    leaves = jax.tree.leaves(decoder.state)
    return [x.unsafe_buffer_pointer() for x in leaves
            if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]

  handed = [decoder.step()[0]]
  first = addresses()
  for _ in range(STEPS - 1):
    handed.append(decoder.step()[0])
    assert addresses() == first
  tokens = np.stack([np.asarray(t) for t in handed])
  assert tokens.shape == (STEPS, BATCH)
  # What the caller handed in was copied, not donated.
  assert not nxt.is_deleted() and not key.is_deleted()


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.3)],
                         ids=["greedy", "sampled"])
def test_routed_steps_in_place_equal_plain_steps_and_hand_out_their_routing(pregated_gen,
                                                                             sampling):
  """With a router, the routing of each step comes back beside its tokens (fresh arrays, so
  readable after later steps), as the plain step routes."""
  gen = pregated_gen
  assert gen.keeps_state()
  nxt, cache, routing = start(gen, sampling)
  decoder = Decoder(gen, nxt, cache, jax.random.key(7), sampling, routing=routing)
  np.asarray(routing[0])  # the caller's routing was copied, not donated
  got = [decoder.step() for _ in range(STEPS)]
  assert decoder.routing is got[-1][1]

  nxt, cache, _ = start(gen, sampling)
  plain = gen.compiled(BATCH, 1, CACHE, sampling)
  for n, (tokens, (experts, gates)) in enumerate(got, start=1):
    nxt, _, cache, (want_experts, want_gates) = gen.run(plain, nxt[:, None], cache,
                                                        step_key(jax.random.key(7), n))
    np.testing.assert_array_equal(tokens, nxt)
    np.testing.assert_array_equal(experts, want_experts)
    np.testing.assert_allclose(gates, want_gates, rtol=1e-6)


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


def test_in_place_decoder_refuses_a_fixed_token(lora_gen):
  decoder = Decoder(lora_gen, jnp.asarray([5, 6], jnp.int32), lora_gen.new_cache(BATCH, CACHE),
                    jax.random.key(0), SamplingConfig())
  with pytest.raises(ValueError, match="always feeds its samples back"):
    decoder.step(feed_back=False)


@pytest.mark.parametrize("which", ["lora_gen", "pregated_gen"])
def test_steps_handing_out_fresh_outputs_equal_the_read_program(which, request):
  """hand_out="outputs" (tokens and routing as the step's own fresh outputs) gives what the
  second program copies out, and keeps the state in place as well."""
  gen = request.getfixturevalue(which)
  got = {}
  for hand_out in HAND_OUTS:
    nxt, cache, routing = start(gen, SamplingConfig())
    decoder = Decoder(gen, nxt, cache, jax.random.key(7), SamplingConfig(), routing=routing,
                      hand_out=hand_out)
    got[hand_out] = [jax.tree.map(np.asarray, decoder.step()) for _ in range(STEPS)]
  for (a, ra), (b, rb) in zip(got["program"], got["outputs"]):
    np.testing.assert_array_equal(a, b)
    chex.assert_trees_all_close(ra, rb)
  with pytest.raises(ValueError, match="hand_out 'both': one of program, outputs"):
    gen.compiled_decode(BATCH, CACHE, SamplingConfig(), "both")


def test_auto_hand_out_is_outputs_for_a_routed_step_and_the_program_otherwise(lora_gen,
                                                                              pregated_gen):
  """A routed step holds the host until it ends, so its tokens come out as its own outputs;
  a step without a router keeps the second program (stepper's docstring has the H200 times)."""
  assert resolve_hand_out(pregated_gen, BATCH, "auto") == "outputs"
  assert resolve_hand_out(lora_gen, BATCH, "auto") == "program"
  assert resolve_hand_out(pregated_gen, BATCH, "program") == "program"
  nxt, cache, routing = start(pregated_gen, SamplingConfig())
  decoder = Decoder(pregated_gen, nxt, cache, jax.random.key(7), SamplingConfig(),
                    routing=routing)
  assert decoder.hand_out == "outputs" and decoder.state.routing is None
  with pytest.raises(ValueError, match="hand_out 'both': one of auto, program, outputs"):
    Decoder(lora_gen, nxt, lora_gen.new_cache(BATCH, CACHE), jax.random.key(7),
            SamplingConfig(), hand_out="both")
