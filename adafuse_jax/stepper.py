"""Decode steps of one batch, dispatched one after another with their state at fixed addresses.

Why: XLA runs a GPU step as a recorded command buffer (a CUDA graph) and records it again
whenever an allocation its commands use has moved since the last call. A step that returns its
token, key and cache as fresh arrays moves them every call. Measured on the H200 (7B preset,
batch 1, `tools/step_probe.py`, `docs/benchmarks/h200/decoder/`): the host's call took 1.02 ms
that way and 0.72 ms with every input donated and written back in place, one step then a wait
4.95 ms against 4.58; one fresh output, even a [B] token, takes the whole gain back.

So a `Decoder` keeps the step's whole state (`DecodeState`) donated and aliased from call to
call, and hands the host each step's token (and routing) through a second, tiny program that
copies them out (its outputs are fresh; the big step's are not). Merging generators (two
programs per step) and tensor-parallel ones keep the plain form, same tokens.

A step with a router is different: it holds the host for the whole step (~3.4 ms on the 7B)
and anything dispatched right after it waits, the second program too. So a routed step hands
its tokens and routing out as its own fresh outputs (`hand_out="outputs"`): on the H200 (7B,
batch 1, `docs/benchmarks/h200/decoder/`, 2026-12-05) the pre-gated step took 5.60 ms synced
that way against 7.80 through the second program (pipelined 4.32 against 4.31), while the
backbone's step keeps the second program (4.59 ms synced against 5.03 as outputs). `hand_out="auto"`
(the default) chooses so: "outputs" when the generator routes, else "program".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.model.cache import KVCache
from adafuse_jax.sampling import SamplingConfig

Routing = tuple[jax.Array, jax.Array] | None


class Stepping(Protocol):
  """What a `Decoder` asks of the generator whose steps it runs (`generation.Generator`, which
  imports this module: the loop sits below the generator and names only this)."""

  cfg: Any
  params: Any
  adapter_params: Any
  derived: Any

  def keeps_state(self) -> bool: ...

  def decode_step(self, batch: int, cache_len: int, sampling: SamplingConfig,
                  hand_out: str = "program") -> Callable: ...

  def routing_shapes(self, batch: int) -> Any: ...

  def run(self, fn: Callable, tokens: jax.Array, cache: KVCache, key: jax.Array) -> tuple: ...

  def new_cache(self, batch: int, cache_len: int) -> KVCache: ...
# How an in-place step hands its tokens and routing to the host: a second, tiny program that
# copies them out of the state ("program"), or the step's own fresh outputs ("outputs");
# a `Decoder` also takes "auto" (`resolve_hand_out`).
HAND_OUTS = ("program", "outputs")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """What a decode step reads and writes back in place.

  Attributes:
    tokens: [B, 1] int32, the last sampled token of each row (the step's input).
    cache: the rows' KV cache.
    key: the generation's base PRNG key; step n samples with `fold_in(key, n)`.
    step: [] int32, the number of the next step (the prefill was step 0).
    routing: (experts [B, k], gates) of the last token, or None without a router.
  """

  tokens: jax.Array
  cache: KVCache
  key: jax.Array
  step: jax.Array
  routing: tuple[jax.Array, jax.Array] | None


def step_key(key: jax.Array, step: jax.Array) -> jax.Array:
  """The sampling key of decode step `step` (the same in both forms of the loop)."""
  return jax.random.fold_in(key, step)


def resolve_hand_out(gen: Stepping, batch: int, hand_out: str) -> str:
  """The `HAND_OUTS` form `hand_out` means for `gen`'s steps of `batch` rows: "auto" is
  "outputs" for an in-place generator that routes (its step holds the host, see the module's
  docstring), else "program" (a plain-form generator hands nothing out either way, so its
  routing is not traced). A ValueError names the choices for an unknown name."""
  if hand_out == "auto":
    routes = gen.keeps_state() and gen.routing_shapes(batch) is not None
    return "outputs" if routes else "program"
  if hand_out not in HAND_OUTS:
    raise ValueError(f"hand_out {hand_out!r}: one of auto, {', '.join(HAND_OUTS)}")
  return hand_out


def _read(state: DecodeState) -> tuple[jax.Array, Routing]:
  return state.tokens[:, 0], state.routing


_read_out = jax.jit(_read)


class Decoder:
  """Decode steps of one batch, each dispatched without waiting for the last.

  Args:
    gen: the generator whose steps run (a `generation.Generator`; `Stepping`).
    tokens: [B] int32, the tokens the first step reads (the prefill's samples).
    cache: the rows' KV cache, donated to the steps (tokens, key and routing are copied).
    key: the base PRNG key; step n samples with `step_key(key, n)`.
    sampling: the `SamplingConfig` the steps were compiled for.
    routing: the prefill's (experts [B, k], gates), or None (without a router, or before any
      step has routed).
    first_step: the number of the first step (1: the prefill sampled with step 0's key).
    hand_out: how an in-place step hands out its tokens and routing (`HAND_OUTS`, or "auto":
      `resolve_hand_out`).
  """

  def __init__(self, gen: Stepping, tokens: jax.Array, cache: KVCache, key: jax.Array,
               sampling: SamplingConfig, *, routing: Routing = None, first_step: int = 1,
               hand_out: str = "auto"):
    hand_out = resolve_hand_out(gen, tokens.shape[0], hand_out)
    self.gen = gen
    self.routing: Routing = None  # the last step's, as `step` returned it
    self.in_place = gen.keeps_state()
    self.hand_out = hand_out
    self._fn: Callable = gen.decode_step(tokens.shape[0], cache.max_len, sampling, hand_out)
    # The plain form's step number, counted on the host (on the device it would cost one
    # more dispatch per step); the in-place form carries its own in the state.
    self._step = first_step
    if self.in_place and hand_out == "outputs":  # the state holds no routing
      routing = None
    elif routing is None and self.in_place:  # the step overwrites it in place: any values do
      routing = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             gen.routing_shapes(tokens.shape[0]))
    # The steps donate their state: copies of what the caller may still read (the cache is
    # the caller's to give).
    self.state = DecodeState(tokens=jnp.asarray(tokens, jnp.int32)[:, None], cache=cache,
                             key=jnp.copy(key), step=jnp.asarray(first_step, jnp.int32),
                             routing=jax.tree.map(jnp.copy, routing))

  @property
  def cache(self) -> KVCache:
    return self.state.cache

  @cache.setter
  def cache(self, cache: KVCache) -> None:
    self.state = dataclasses.replace(self.state, cache=cache)

  def step(self, feed_back: bool = True) -> tuple[jax.Array, Routing]:
    """Dispatches one step; returns its tokens [B] and routing as fresh arrays (readable on
    the host while later steps run). `feed_back=False` (plain form only) keeps the input
    token: nothing the step samples reaches the next one."""
    if self.in_place:
      if not feed_back:
        raise ValueError("an in-place Decoder always feeds its samples back")
      out = self._fn(self.gen.params, self.gen.adapter_params, self.gen.derived, self.state)
      if self.hand_out == "outputs":
        self.state, nxt, self.routing = out
      else:
        self.state = out
        nxt, self.routing = _read_out(self.state)
      return nxt, self.routing
    s = self.state
    nxt, _, cache, self.routing = self.gen.run(self._fn, s.tokens, s.cache,
                                               step_key(s.key, self._step))
    self._step += 1
    self.state = dataclasses.replace(
        s, tokens=nxt[:, None] if feed_back else s.tokens, cache=cache, routing=self.routing)
    return nxt, self.routing


def decode_stepper(gen: Stepping, batch: int, cache_len: int, seed: int, start: int = 0,
                   same_token: bool = False) -> tuple[Callable[..., jax.Array], Decoder]:
  """`one_step(feed_back=True)` runs one decode step of `gen` (a `Decoder`, as `generate` runs
  them) on a fresh cache whose first `start` slots count as filled, from a random token (the
  same one in every row with `same_token`: the rows then stay identical, so a merged batch
  agrees at every step), feeding the sampled tokens back unless told not to (a merging
  generator only); returns it with the Decoder (its `cache` can be reset; its `routing` is the
  last step's (experts, gates), or None without a router)."""
  rng = np.random.default_rng(seed)
  first = rng.integers(0, gen.cfg.vocab_size, (1 if same_token else batch,))
  cache = gen.new_cache(batch, cache_len)
  cache = cache.replace(length=jnp.asarray(start, jnp.int32))
  decoder = Decoder(gen, jnp.asarray(np.broadcast_to(first, (batch,)), jnp.int32), cache,
                    jax.random.key(seed), SamplingConfig())

  def one_step(feed_back: bool = True) -> jax.Array:
    return decoder.step(feed_back)[0]

  return one_step, decoder
