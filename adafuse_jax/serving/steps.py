"""The serving engine's two compiled functions over a `SlotCache`: a prompt chunk into one row,
and a decode step over the first rows of the batch.

Both reuse a `Generator`'s path (packed, xla, gathered, a merged LoRA): the parameters it split
out, the derived copy it built, its adapter runtime. Each is compiled once per shape: a prefill
chunk per power-of-two chunk length, a decode step per batch bucket, so a stream of requests of
any lengths never triggers a compilation after warm-up.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.errors import UserError
from adafuse_jax.generation import Generator
from adafuse_jax.model.cache import SlotCache
from adafuse_jax.sampling import row_keys, sample_rows


# Why a routed pool cannot be served on path "merged" (refused here and, before the model loads,
# by `python -m adafuse_jax.serve`).
MERGED_REFUSAL = ("path 'merged' switches one expert choice per batch, while a served batch's"
                  " rows each keep their own experts: serve this pool with --path packed or"
                  " gathered (merged serves plain LoRAs)")


def power_buckets(largest: int, smallest: int = 1) -> tuple[int, ...]:
  """smallest, 2*smallest, ... up to and including `largest`."""
  out, b = [], smallest
  while b < largest:
    out.append(b)
    b *= 2
  return tuple(out) + (largest,)


def span_buckets(max_len: int) -> tuple[int, ...]:
  """How far a decode step's attention reads: 256, 1024, 4096, ... below max_len, then max_len
  (a factor of 4 apart: few compiled shapes, at most 4x the slots a step needs)."""
  out, b = [], 256
  while b < max_len:
    out.append(b)
    b *= 4
  return tuple(out) + (max_len,)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds n."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class SlotSteps:
  """Compiled prefill-chunk and decode-step functions of one generator over a slot cache.

  Args:
    gen: the generator whose path and parameters the steps use. A pool that switches experts
      into the weights every token (path "merged" with a pre-gated pool) is refused: a served
      batch's rows pick different experts.
    max_batch: rows of the slot cache.
    max_len: slots per row (a multiple of `chunk`).
    chunk: the longest prompt chunk prefilled at once.
    batch_buckets: the batch sizes a decode step is compiled for (default: powers of two up to
      max_batch); a step runs the smallest that holds the highest row in use.
  """

  def __init__(self, gen: Generator, *, max_batch: int, max_len: int, chunk: int,
               batch_buckets: Sequence[int] | None = None):
    if gen.merges_per_token:
      raise UserError(MERGED_REFUSAL)
    if max_len % chunk:
      raise ValueError(f"max_len={max_len} must be a multiple of chunk={chunk}")
    self.gen = gen
    self.max_batch, self.max_len, self.chunk = max_batch, max_len, chunk
    buckets = sorted(set(batch_buckets or power_buckets(max_batch)) | {max_batch})
    if buckets[0] < 1 or buckets[-1] > max_batch:
      raise UserError(f"batch buckets {buckets} must lie in [1, max_batch={max_batch}]")
    self.batch_buckets = tuple(buckets)
    self.chunk_buckets = power_buckets(chunk, smallest=min(16, chunk))
    self.span_buckets = span_buckets(max_len)
    self._prefills: dict[int, Callable] = {}
    self._decodes: dict[tuple[int, int], Callable] = {}  # by (batch, span)

  def new_cache(self) -> SlotCache:
    return SlotCache.create(self.gen.cfg, self.max_batch, self.max_len, self.gen.dtype)

  def new_tokens(self) -> jax.Array:
    """The [max_batch] int32 buffer of each row's next input token."""
    return jnp.zeros((self.max_batch,), jnp.int32)

  # -- traced bodies ------------------------------------------------------------------------

  def _prefill(self, params, adapter_params, derived, cache: SlotCache, nxt, row, tokens, start,
               count, temperature, top_p, top_k, seed):
    """tokens [1, C] (the first `count` real) at positions start.. of row `row`."""
    part = cache.rows(row, 1).replace(lengths=start[None])
    logits, part, routing = self.gen.apply(params, adapter_params, derived, tokens, part,
                                           last=(count - 1)[None])
    end = start + count
    part = part.replace(lengths=end[None])
    keys = row_keys(seed[None], end[None])
    token = sample_rows(logits, keys, temperature[None], top_p[None], top_k[None])[0]
    return cache.with_rows(row, part), nxt.at[row].set(token), token, routing

  def _decode(self, params, adapter_params, derived, cache: SlotCache, nxt, active, temperature,
              top_p, top_k, seeds, span: int):
    """One token for rows [0, b) (b = len(active)); inactive rows compute but do not advance.
    Attention reads slots [0, span): every active row's length is below it."""
    b = active.shape[0]
    before = cache.lengths[:b]
    logits, cache, routing = self.gen.apply(params, adapter_params, derived, nxt[:b, None],
                                            cache.replace(span=span, rows_used=b))
    cache = cache.replace(lengths=cache.lengths.at[:b].set(jnp.where(active, before + 1, before)),
                          span=None, rows_used=None)
    keys = row_keys(seeds, before + 1)
    new = sample_rows(logits, keys, temperature, top_p, top_k)
    return cache, nxt.at[:b].set(new), new, routing

  # -- compiled ------------------------------------------------------------------------------

  def _lower_prefill(self, length: int):
    gen = self.gen
    i32, f32 = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
    u32 = jax.ShapeDtypeStruct((), jnp.uint32)
    cache = jax.eval_shape(self.new_cache)
    nxt = jax.ShapeDtypeStruct((self.max_batch,), jnp.int32)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.jit(self._prefill, donate_argnums=(3, 4)).lower(
        gen.params, gen.adapter_params, gen.derived, cache, nxt, i32, tokens, i32, i32, f32, f32,
        i32, u32)

  def _lower_decode(self, shape: tuple[int, int]):
    batch, span = shape
    gen = self.gen
    cache = jax.eval_shape(self.new_cache)
    nxt = jax.ShapeDtypeStruct((self.max_batch,), jnp.int32)
    row = lambda dt: jax.ShapeDtypeStruct((batch,), dt)  # noqa: E731
    return jax.jit(self._decode, donate_argnums=(3, 4), static_argnums=(10,)).lower(
        gen.params, gen.adapter_params, gen.derived, cache, nxt, row(jnp.bool_),
        row(jnp.float32), row(jnp.float32), row(jnp.int32), row(jnp.uint32), span)

  def prefill_fn(self, length: int) -> Callable:
    """The compiled prompt chunk of `length` tokens (compiled on first use)."""
    if length not in self._prefills:
      self._prefills[length] = self._lower_prefill(length).compile()
    return self._prefills[length]

  def decode_fn(self, batch: int, span: int | None = None) -> Callable:
    """The compiled decode step of `batch` rows whose attention reads `span` slots (default:
    all), compiled on first use."""
    key = (batch, span or self.max_len)
    if key not in self._decodes:
      self._decodes[key] = self._lower_decode(key).compile()
    return self._decodes[key]

  def warm_up(self, log: Callable[[str], None] | None = None, threads: int | None = None) -> None:
    """Compiles every decode bucket and prompt-chunk length now rather than on first use.

    The programs compile in parallel threads (XLA releases the interpreter while it compiles);
    on the H200 that did not shorten nine 7B programs (280 s one after another, 350 s in
    threads): the GEMM autotuner's measurements share the one GPU.
    """
    import concurrent.futures

    jobs = [(self._decodes, (b, span), self._lower_decode) for b in self.batch_buckets
            for span in self.span_buckets if (b, span) not in self._decodes]
    jobs += [(self._prefills, c, self._lower_prefill) for c in self.chunk_buckets
             if c not in self._prefills]
    workers = threads or min(len(jobs), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done = list(pool.map(lambda job: job[2](job[1]).compile(), jobs))
    for (table, key, _), fn in zip(jobs, done):
      table[key] = fn
    if log:
      log(f"compiled decode steps for batches {list(self.batch_buckets)} x attention spans"
          f" {list(self.span_buckets)} and prompt chunks {list(self.chunk_buckets)}")

  def prefill(self, cache: SlotCache, nxt: jax.Array, row: int, chunk: Sequence[int], start: int,
              temperature: float, top_p: float, top_k: int, seed: int):
    """Writes one prompt chunk into `row` (start = its first position; 0 resets the row).

    Returns (cache, nxt, token, routing): token is the sampled next token (meaningful after
    the prompt's last chunk), already placed in nxt[row].
    """
    count = len(chunk)
    length = bucket_for(count, self.chunk_buckets)
    padded = np.zeros((1, length), np.int32)
    padded[0, :count] = chunk
    fn = self.prefill_fn(length)
    return fn(self.gen.params, self.gen.adapter_params, self.gen.derived, cache, nxt,
              np.int32(row), padded, np.int32(start), np.int32(count), np.float32(temperature),
              np.float32(top_p), np.int32(top_k), np.uint32(seed))

  def decode(self, cache: SlotCache, nxt: jax.Array, active: np.ndarray, temperature: np.ndarray,
             top_p: np.ndarray, top_k: np.ndarray, seeds: np.ndarray, longest: int):
    """One decode step of rows [0, len(active)) (a batch bucket); `longest` is the highest
    slot an active row writes (its attention reads up to the span bucket above it).

    Returns (cache, nxt, new [b], routing)."""
    fn = self.decode_fn(len(active), bucket_for(longest + 1, self.span_buckets))
    return fn(self.gen.params, self.gen.adapter_params, self.gen.derived, cache, nxt, active,
              temperature, top_p, top_k, seeds)
