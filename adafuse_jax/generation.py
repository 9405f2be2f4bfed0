"""Prefill and decode: compiled once per shape, stepped from Python, KV cache donated.

On the CPU, stepping the decode from Python with the argmax inside jit beat a `lax.scan` over
tokens (23 vs 38 ms/token for SmolLM2-135M on 2 cores), and on the GPU the per-step dispatch
hides under the step's own time. So one jitted step per token: embedding -> layers -> logits -> sample.

Prompts are left-padded to a power-of-two bucket (fewer recompiles); see `KVCache` for how
padding, slots and RoPE positions relate.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adafuse_jax import parallel
from adafuse_jax.adapters.mixture import MixtureOfLoRA, fold_shared
from adafuse_jax.adapters.sere import SereSettings
from adafuse_jax.config import LINEAR_NAMES
from adafuse_jax.errors import UserError, device_memory_errors
from adafuse_jax.model.cache import KVCache
from adafuse_jax.model.layers import attention_fn, resolve_attention
from adafuse_jax.model.llama import LinearFn, LlamaModel
from adafuse_jax.paths import merged as merged_path
from adafuse_jax.paths import registry
from adafuse_jax.sampling import SamplingConfig, sample
from adafuse_jax.stepper import HAND_OUTS, DecodeState, Decoder, step_key
from adafuse_jax.vocab import PathName

MIN_BUCKET = 16
CACHE_ROUND = 128
GENERATE_MEMORY_ADVICE = ("generate for fewer or shorter prompts at once or a smaller"
                          " max_new_tokens")


def prompt_bucket(length: int) -> int:
  """The padded prompt length: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass
class GenerationResult:
  """What `generate` returns.

  Attributes:
    tokens: per row, the generated ids (stop token excluded).
    prompt_tokens: per row, the prompt length.
    stop_reasons: per row, "eos" or "length".
    prefill_ms: prefill of the whole batch, first token sampled, excluding compilation.
    decode_ms_per_token: median wall time between two generated tokens (whole batch), in the
      pipelined loop (step t+1 is dispatched before token t is read on the host).
    compile_s: time spent compiling prefill and step.
    routes: per generated position, (experts [B, k], gates [B, k]) that produced it (with a
      router; the first entry is the prompt's last token).
  """

  tokens: list[list[int]]
  prompt_tokens: list[int]
  stop_reasons: list[str]
  prefill_ms: float
  decode_ms_per_token: float
  decode_steps: int
  compile_s: float
  routes: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)

  @property
  def tokens_per_s(self) -> float:
    if not self.decode_ms_per_token:
      return 0.0
    return 1000.0 * len(self.tokens) / self.decode_ms_per_token


@dataclasses.dataclass(frozen=True)
class MergedStep:
  """The compiled halves of a merged decode step: route + switch, then the backbone pass."""

  switch: Callable
  forward: Callable

  def as_text(self) -> str:
    return self.switch.as_text() + "\n" + self.forward.as_text()


class Generator:
  """Compiles and runs prefill / decode steps of one model, with or without dynamic adapters.

  Args:
    model: the decoder; its parameters are split out once and passed to the compiled steps.
    adapters: an expert pool + routers, or None (the backbone).
    path: how the experts are applied (`adafuse_jax.vocab.PathName`, listed by
      `adafuse_jax.paths.registry`): "packed" (the default: every expert's A appended to the
      backbone's matrices), "xla" (plain XLA matmuls beside the backbone's), "gathered" (Pallas
      BGMV/SGMV kernels that read only the step's experts) or "merged" (a plain LoRA merged
      once; a pre-gated pool's experts switched into the weights every decode step by one SGMM
      launch, prompts and disagreeing batch rows running unmerged). For "auto" use
      `adafuse_jax.choose_path`, which returns the fastest path's Generator.
    backend: the kernel backend of the path's Pallas ops ("auto", "triton", "mosaic", "xla";
      see `pallas_kernels`).
    sere: SERE re-routing settings for pre-gated batches, or None.
    release_weights: with "packed", delete the model's linear weights and the pool's experts
      while packing: one copy of them in device memory at any time; `model` and `adapters`
      cannot run afterwards.
    attention: how decode steps run attention (`adafuse_jax.model.layers.ATTENTION`): "auto"
      (the default: "pallas-append" on one GPU, else "xla"), "xla" (XLA's fusions), "windowed"
      (XLA's fusions over the cache's written part), "pallas" (the Pallas decode-attention
      kernel for one token per row; prompts keep XLA's) or "pallas-append" (that kernel also
      rotating the token and writing it into the cache).
  """

  def __init__(self, model: LlamaModel, *, adapters: MixtureOfLoRA | None = None,
               path: str | PathName = registry.DEFAULT_PATH, backend: str = "auto",
               sere: SereSettings | None = None, release_weights: bool = False,
               mesh: "jax.sharding.Mesh | None" = None, attention: str = "auto"):
    if adapters is not None and adapters.cfg.route_context:
      raise UserError("these adapters route on the running context (route_context), which"
                      " decoding does not carry from step to step yet; evaluate them with"
                      " `python -m adafuse_jax.train` (full sequences), or train without"
                      " --route-context")
    if adapters is not None and adapters.cfg.has_shared:
      # Every token uses the shared expert: merged once here, it costs nothing per step.
      model, adapters = fold_shared(model, adapters)
    self.path = registry.check(path, adapters.cfg if adapters is not None else None,
                               layout=model.layout)
    if release_weights and self.path.reads_own_weights():
      raise UserError(f"release_weights frees the weights a packed copy replaces; path"
                      f" {self.path.name.value!r} reads the model's own weights")
    if self.path.merges:
      if sere is not None:
        raise UserError("SERE re-routes the rows of unmerged batch steps; merged decoding switches"
                        " the batch's one shared choice: drop one of sere / path 'merged'")
      model, adapters = self.path.fold_once(model, adapters)
    self.backend = backend
    self.sere = sere
    devices = mesh.size if mesh is not None else 1
    self.attention = resolve_attention(attention, devices=devices)
    self.attend_fn = attention_fn(self.attention)
    if self.attention != "xla" and devices > 1:
      raise UserError(f"attention {attention!r} runs a Pallas kernel, which the tensor-parallel"
                      " step cannot split yet; decode on several devices with attention 'xla'")
    # Decode steps switch experts into the weights (a pre-gated pool on path "merged").
    self.merges_per_token = self.path.merges and adapters is not None
    self.cfg = model.cfg
    self.dtype = model.dtype
    # What the compiled steps read besides the parameters: a packed copy of the weights, the
    # row layout, or the merged weights (`switch_state`), built once here.
    derived = self.path.prepare(model, adapters, release=release_weights)
    self.switch_state = derived if self.merges_per_token else None
    self.derived = None if self.merges_per_token else derived
    self.graphdef, self.params = nnx.split(model)
    self.adapters_graphdef, self.adapter_params = (nnx.split(adapters) if adapters is not None
                                                   else (None, None))
    if not self.path.reads_own_weights():
      # The steps read the derived copy only: hold no second reference to the model's matrices
      # nor to the pool's experts (dropping the model then frees them; a 7B in bf16 needs one
      # copy, not two, and a pool of 64 rank-64 experts is as large as the model).
      for name in LINEAR_NAMES:
        self.params[name] = self.params[name].replace(value=jnp.zeros((0,), model.dtype))
      if adapters is not None:  # the experts' A and B live in the packing too
        pool = self.adapter_params["pool"]
        for m in adapters.cfg.modules:
          for f in (f"A_{m}", f"B_{m}"):
            pool[f] = pool[f].replace(value=jnp.zeros((0,), model.dtype))
    self.mesh = mesh
    if mesh is not None and mesh.size > 1:
      self._shard(mesh)
    self._compiled: dict[tuple, Callable] = {}
    self._routing_shapes: dict[int, object] = {}

  def _shard(self, mesh) -> None:
    """Places parameters, adapters and the derived copy on a tensor-parallel mesh
    (`adafuse_jax.parallel`): each compiled step is then one SPMD program."""
    if parallel.data_size(mesh) > 1:
      raise UserError("decoding runs tensor-parallel only: give a mesh without a data-parallel"
                      " axis (make_mesh(N) rather than make_mesh(N, data=D))")
    parallel.check_divisible(self.cfg, mesh.size)
    self.params = parallel.shard_params(self.params, mesh)
    if self.adapter_params is not None:
      self.adapter_params = parallel.shard_adapter_params(self.adapter_params, mesh)
    if self.derived is not None:
      self.derived = parallel.shard_last_axis(self.derived, mesh)
    if self.switch_state is not None:
      self.switch_state = parallel.shard_switch_state(self.switch_state, mesh)

  @property
  def sharded(self) -> bool:
    return self.mesh is not None and self.mesh.size > 1

  @property
  def path_name(self) -> PathName:
    return self.path.name

  def _forward(self, params, adapter_params, derived, tokens, cache, key,
               sampling: SamplingConfig):
    logits, cache, routing = self.apply(params, adapter_params, derived, tokens, cache)
    nxt = sample(logits, key, sampling)
    if self.sharded:
      cache, (nxt, logits, routing) = parallel.pin_step(cache, (nxt, logits, routing), self.mesh)
    return nxt, logits, cache, routing

  def apply(self, params, adapter_params, derived, tokens: jax.Array, cache,
            last: jax.Array | None = None):
    """The traced forward pass of the path (inside jit): tokens [B, T] at the cache's next slots.

    Returns (logits [B, V], cache, routing): routing is (experts [B, k], gates) of the last
    position (or of `last` [B], see `LlamaModel.__call__`), None without a router.
    """
    model = nnx.merge(self.graphdef, params)
    runtime = None
    linear: LinearFn = self.path.backbone(derived, backend=self.backend, mesh=self.mesh)
    if adapter_params is not None:
      adapters = nnx.merge(self.adapters_graphdef, adapter_params)
      runtime = self.path.runtime(adapters, derived, sere=self.sere, backend=self.backend,
                                  mesh=self.mesh)
      linear = runtime
    logits, cache = model(tokens, cache, linear=linear, last=last, attend_fn=self.attend_fn)
    routing = None
    if runtime is not None and runtime.first_route is not None:
      b, t = tokens.shape
      route = runtime.first_route
      at = jnp.full((b,), t - 1, jnp.int32) if last is None else last
      rows = jnp.arange(b)
      experts = route.experts.reshape(b, t, -1)[rows, at]
      gates = route.gates.reshape(b, t, *route.gates.shape[1:])[rows, at]
      routing = (experts, gates)
    return logits, cache, routing

  def _switch(self, params, adapter_params, state, tokens):
    """Routes the new tokens [B, 1] and rebuilds the merged weights when the batch agrees (state
    donated, updated in place). Returns (state, routing, agree)."""
    model = nnx.merge(self.graphdef, params)
    adapters = nnx.merge(self.adapters_graphdef, adapter_params)
    experts, gates, _ = merged_path.route_tokens(model, adapters, tokens)
    agree = merged_path.batch_agrees(experts, gates) if tokens.shape[0] > 1 else jnp.bool_(True)
    state = merged_path.switch(state, model, adapters, experts[0], gates[0], self.backend, agree,
                               mesh=self.mesh)
    return state, (experts, gates), agree

  def _merged_forward(self, params, adapter_params, merged_weights, agree, tokens, cache, key,
                      sampling: SamplingConfig):
    """A backbone pass whose adapted modules read the merged weights (passed in, not donated);
    for a batch that disagreed, the unmerged pass on the model's own W0 instead."""
    model = nnx.merge(self.graphdef, params)

    def merged(cache):
      return model(tokens, cache, linear=merged_path.merged_linear(merged_weights),
                   attend_fn=self.attend_fn)

    def unmerged(cache):
      adapters = nnx.merge(self.adapters_graphdef, adapter_params)
      return model(tokens, cache, linear=self.path.runtime(adapters, backend=self.backend,
                                                           mesh=self.mesh),
                   attend_fn=self.attend_fn)

    if tokens.shape[0] == 1:  # one sequence always agrees with itself
      logits, cache = merged(cache)
    else:
      logits, cache = jax.lax.cond(agree, merged, unmerged, cache)
    return sample(logits, key, sampling), logits, cache

  def compiled(self, batch: int, length: int, cache_len: int, sampling: SamplingConfig) -> Callable:
    """AOT-compiled `(params, adapter_params, derived, tokens [B, length], cache, key)` ->
    `(next [B], logits [B, V], cache, routing)`; routing is (experts [B, k], gates [B, k]) of the
    last position, or None without a router."""
    sig = (batch, length, cache_len, sampling)
    if sig not in self._compiled:
      cache = jax.eval_shape(lambda: KVCache.create(self.cfg, batch, cache_len, self.dtype))
      tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
      if self.sharded:
        cache = parallel.cache_shapes(cache, self.mesh)
        tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype,
                                      sharding=parallel.replicated(self.mesh))
      key = jax.eval_shape(lambda: jax.random.key(0))
      if self.merges(length):
        # Two compiled functions, dispatched back to back: XLA:GPU materialises a slice of a
        # weight that was produced in the same program (a memcpy per layer and module, +1.3 ms
        # per token for q,v on the 7B, H100), while
        # slices of a parameter feed the matmuls in place, as in the backbone.
        switch = jax.jit(self._switch, donate_argnums=(2,)).lower(
            self.params, self.adapter_params, self.switch_state, tokens).compile()
        agree = jax.ShapeDtypeStruct((), jnp.bool_)
        forward = jax.jit(self._merged_forward, static_argnums=(7,), donate_argnums=(5,)).lower(
            self.params, self.adapter_params, self.switch_state.weights, agree, tokens, cache, key,
            sampling).compile()
        self._compiled[sig] = MergedStep(switch, forward)
      else:
        fn = jax.jit(self._forward, static_argnums=(6,), donate_argnums=(4,))
        self._compiled[sig] = fn.lower(self.params, self.adapter_params, self.derived, tokens,
                                       cache, key, sampling).compile()
    return self._compiled[sig]

  def keeps_state(self) -> bool:
    """Whether decode steps run in `compiled_decode`'s form, their state donated and written
    back in place (`adafuse_jax.stepper`); a merging or tensor-parallel generator keeps the
    plain form of `compiled`."""
    return not self.merges_per_token and not self.sharded

  def _decode(self, params, adapter_params, derived, state: DecodeState,
              sampling: SamplingConfig, hand_out: str):
    nxt, _, cache, routing = self._forward(params, adapter_params, derived, state.tokens,
                                           state.cache, step_key(state.key, state.step), sampling)
    kept = routing if hand_out == "program" else None
    new = DecodeState(tokens=nxt[:, None].astype(jnp.int32), cache=cache, key=state.key,
                      step=state.step + 1, routing=kept)
    return new if hand_out == "program" else (new, nxt, routing)

  def compiled_decode(self, batch: int, cache_len: int, sampling: SamplingConfig,
                      hand_out: str = "program") -> Callable:
    """AOT-compiled `(params, adapter_params, derived, state: DecodeState) -> DecodeState`, one
    decode step whose state is donated and aliased to its output (every buffer keeps its
    address from call to call; see `adafuse_jax.stepper`). Only where `keeps_state()`.

    `hand_out` (`stepper.HAND_OUTS`): "program", the state holds the step's routing too and the
    host reads tokens and routing through a second program; "outputs", the step also returns
    its tokens [B] and routing as fresh arrays, `(state, tokens, routing)`."""
    if hand_out not in HAND_OUTS:
      raise ValueError(f"hand_out {hand_out!r}: one of {', '.join(HAND_OUTS)}")
    sig = ("decode", batch, cache_len, sampling, hand_out)
    if sig not in self._compiled:
      cache = jax.eval_shape(lambda: KVCache.create(self.cfg, batch, cache_len, self.dtype))
      tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
      key = jax.eval_shape(lambda: jax.random.key(0))
      routing = self.routing_shapes(batch) if hand_out == "program" else None
      state = DecodeState(tokens=tokens, cache=cache, key=key,
                          step=jax.ShapeDtypeStruct((), jnp.int32), routing=routing)
      # keep_unused: the last step's routing is not read, only overwritten; pruned, its
      # buffers could not take the new routing in place.
      fn = jax.jit(self._decode, static_argnums=(4, 5), donate_argnums=(3,), keep_unused=True)
      self._compiled[sig] = fn.lower(self.params, self.adapter_params, self.derived, state,
                                     sampling, hand_out).compile()
    return self._compiled[sig]

  def routing_shapes(self, batch: int):
    """The shapes of a decode step's routing: (experts [B, k], gates), or None without a router
    (traced once per batch size: the compiled step and each `Decoder` ask)."""
    if batch not in self._routing_shapes:
      cache = jax.eval_shape(lambda: KVCache.create(self.cfg, batch, CACHE_ROUND, self.dtype))
      tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
      self._routing_shapes[batch] = jax.eval_shape(
          lambda c: self.apply(self.params, self.adapter_params, self.derived, tokens, c)[2],
          cache)
    return self._routing_shapes[batch]

  def decode_step(self, batch: int, cache_len: int, sampling: SamplingConfig,
                  hand_out: str = "program") -> Callable:
    """The compiled decode step a `Decoder` of this generator runs: `compiled_decode`'s where
    `keeps_state()`, else `compiled`'s one-token step."""
    if self.keeps_state():
      return self.compiled_decode(batch, cache_len, sampling, hand_out)
    return self.compiled(batch, 1, cache_len, sampling)

  def merges(self, length: int) -> bool:
    """Whether steps of this many tokens run merged (decode steps of a merging generator)."""
    return self.merges_per_token and length == 1

  def run(self, fn: Callable, tokens: jax.Array, cache: KVCache, key: jax.Array):
    """Calls a compiled step (from `compiled`), carrying the merged weights when it merges.

    Returns (next [B], logits [B, V], cache, routing)."""
    if self.sharded:
      tokens = jax.device_put(tokens, parallel.replicated(self.mesh))
      key = jax.device_put(key, parallel.replicated(self.mesh))
    if isinstance(fn, MergedStep):
      self.switch_state, routing, agree = fn.switch(self.params, self.adapter_params,
                                                    self.switch_state, tokens)
      nxt, logits, cache = fn.forward(self.params, self.adapter_params, self.switch_state.weights,
                                      agree, tokens, cache, key)
      return nxt, logits, cache, routing
    return fn(self.params, self.adapter_params, self.derived, tokens, cache, key)

  def new_cache(self, batch: int, cache_len: int, pad: Sequence[int] | None = None) -> KVCache:
    cache = KVCache.create(self.cfg, batch, cache_len, self.dtype,
                           pad=None if pad is None else jnp.asarray(pad, jnp.int32))
    if self.sharded:
      cache = parallel.shard_cache(cache, self.mesh)
    return cache

  def forward(self, tokens: jax.Array, cache: KVCache, key: jax.Array,
              sampling: SamplingConfig = SamplingConfig()):
    """Runs tokens [B, T] through the model at the cache's next slots (the cache is donated).

    Returns (next [B], logits [B, V], cache, routing), as `compiled`.
    """
    fn = self.compiled(tokens.shape[0], tokens.shape[1], cache.max_len, sampling)
    return self.run(fn, tokens, cache, key)


def decode_shape(prompt_lengths: Sequence[int], max_new_tokens: int, max_context: int
                 ) -> tuple[int, int, int]:
  """(padded prompt length, new tokens that fit the context, KV-cache length) of a generation."""
  longest = max(prompt_lengths)
  max_new_tokens = min(max_new_tokens, max_context - longest)
  length = min(prompt_bucket(longest), max_context)
  return length, max_new_tokens, round_up(length + max_new_tokens, CACHE_ROUND)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, list[int]]:
  """Left-pads prompts to [B, length]; returns the array and the per-row pad counts."""
  rows, pads = [], []
  for p in prompts:
    pads.append(length - len(p))
    rows.append([pad_id] * (length - len(p)) + list(p))
  return np.asarray(rows, np.int32), pads


def check_prompts(prompts: Sequence[Sequence[int]], max_context: int) -> None:
  if not prompts:
    raise UserError("no prompt given; pass at least one prompt")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise UserError(f"prompt {i} is empty; give some text to continue")
    if len(p) >= max_context:
      raise UserError(f"prompt {i} has {len(p)} tokens but the model's context is {max_context};"
                      " shorten the prompt")


def generate(gen: Generator, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_ids: frozenset[int] = frozenset(), pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
  """Generates up to `max_new_tokens` per prompt.

  Args:
    gen: the compiled-step holder.
    prompts: token ids per sequence (ragged lengths allowed).
    max_new_tokens: the most tokens generated per sequence (reduced to fit the context).
    sampling: greedy or temperature/top-p.
    seed: the sampling seed.
    stop_ids: ids that end a sequence (EOS); the stop id is not returned.
    pad_id: id used for left padding (never attended to).
    on_token: called as (row, token_id) as soon as a token is known, for streaming.
  Raises:
    UserError: no prompt, an empty prompt or one beyond the context, max_new_tokens < 1.
    DeviceMemoryError: the device cannot hold this batch's cache and steps.
  """
  with device_memory_errors(GENERATE_MEMORY_ADVICE):
    return _generate(gen, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                     stop_ids=stop_ids, pad_id=pad_id, on_token=on_token)


def _generate(gen: Generator, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
              sampling: SamplingConfig, seed: int, stop_ids: frozenset[int], pad_id: int,
              on_token: Callable[[int, int], None] | None) -> GenerationResult:
  cfg = gen.cfg
  check_prompts(prompts, cfg.max_context)
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1")
  length, max_new_tokens, cache_len = decode_shape([len(p) for p in prompts], max_new_tokens,
                                                   cfg.max_context)
  batch = len(prompts)
  tokens, pads = left_pad(prompts, length, pad_id)

  t0 = time.perf_counter()
  prefill_fn = gen.compiled(batch, length, cache_len, sampling)
  gen.decode_step(batch, cache_len, sampling)
  compile_s = time.perf_counter() - t0

  base_key = jax.random.key(seed)
  cache = gen.new_cache(batch, cache_len, pads)
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  nxt, _, cache, routing = gen.run(prefill_fn, jnp.asarray(tokens), cache,
                                   step_key(base_key, 0))
  jax.block_until_ready(nxt)
  routes: list[tuple[np.ndarray, np.ndarray]] = []
  prefill_ms = (time.perf_counter() - t0) * 1e3
  decoder = Decoder(gen, nxt, cache, base_key, sampling, routing=routing)

  out: list[list[int]] = [[] for _ in prompts]
  reasons = ["length"] * batch
  done = np.zeros(batch, bool)
  step_times: list[float] = []
  t_last = None
  for step in range(max_new_tokens):
    current, current_routing = nxt, routing
    if step < max_new_tokens - 1:
      # Dispatch the next step before reading this token on the host: the step consumes the
      # token on the device, so the host enqueues step t+1 while the device still runs step t
      # (launch overhead hidden behind GPU work). A row that stops here costs one spare step.
      nxt, routing = decoder.step()
    nxt_host = np.asarray(current)
    now = time.perf_counter()
    if t_last is not None:
      step_times.append(now - t_last)
    t_last = now
    if current_routing is not None:
      routes.append((np.asarray(current_routing[0]), np.asarray(current_routing[1])))
    for row, tok in enumerate(nxt_host.tolist()):
      if done[row]:
        continue
      if tok in stop_ids:
        done[row], reasons[row] = True, "eos"
        continue
      out[row].append(tok)
      if on_token is not None:
        on_token(row, tok)
    if done.all():
      break
  decode_ms = float(np.median(step_times) * 1e3) if step_times else 0.0
  return GenerationResult(tokens=out, prompt_tokens=[len(p) for p in prompts], stop_reasons=reasons,
                          prefill_ms=prefill_ms, decode_ms_per_token=decode_ms,
                          decode_steps=len(step_times), compile_s=compile_s, routes=routes)
