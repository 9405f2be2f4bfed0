"""The serving engine's two compiled functions over a `SlotCache`: one prefill pass of prompt
chunks into several rows at once, and a decode step over the first rows of the batch.

Both reuse a `Generator`'s path (packed, xla, gathered, a merged LoRA): the parameters it split
out, the derived copy it built, its adapter runtime, and its tensor-parallel mesh if it has one
(the slot cache then split by KV heads, the per-row inputs and outputs replicated). Each is
compiled once per shape: a prefill pass per (rows bucket, chunk-length bucket), a decode step
per (batch bucket, attention span), so a stream of requests of any lengths never triggers a
compilation after warm-up.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax import parallel
from adafuse_jax.errors import UserError
from adafuse_jax.generation import Generator
from adafuse_jax.model.cache import DecodeWithPrompts, PackedPrompts, SlotCache
from adafuse_jax.sampling import row_keys, sample_rows


# Why a routed pool cannot be served on path "merged" (refused here and, before the model loads,
# by `python -m adafuse_jax.serve`).
MERGED_REFUSAL = ("path 'merged' switches one expert choice per batch, while a served batch's"
                  " rows each keep their own experts: serve this pool with --path packed or"
                  " gathered (merged serves plain LoRAs)")


def power_buckets(largest: int, smallest: int = 1, factor: int = 2) -> tuple[int, ...]:
  """smallest, factor*smallest, ... up to and including `largest`."""
  out, b = [], smallest
  while b < largest:
    out.append(b)
    b *= factor
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


def _sampling_rows(size: int, temperature, top_p, top_k, seeds) -> tuple[np.ndarray, ...]:
  """Per-row sampling settings padded to `size` entries (padding: greedy, seed 0)."""
  out = []
  for values, fill, dtype in ((temperature, 0, np.float32), (top_p, 1, np.float32),
                              (top_k, 0, np.int32), (seeds, 0, np.uint32)):
    row = np.full((size,), fill, dtype)
    row[:len(values)] = values
    out.append(row)
  return tuple(out)


class SlotSteps:
  """Compiled prefill-chunk and decode-step functions of one generator over a slot cache.

  Args:
    gen: the generator whose path and parameters the steps use. A pool that switches experts
      into the weights every token (path "merged" with a pre-gated pool) is refused: a served
      batch's rows pick different experts.
    max_batch: rows of the slot cache.
    max_len: slots per row (a multiple of `chunk`).
    chunk: the longest prompt chunk a row prefills in one pass.
    batch_buckets: the batch sizes a decode step is compiled for (default: powers of two up to
      max_batch); a step runs the smallest that holds the highest row in use.
    prefill_rows: the numbers of rows one prefill pass is compiled for (default: powers of four
      up to max_batch, and max_batch): prompts admitted together share one pass, and so one
      read of the weights.
    prefill_lengths: the chunk lengths a prefill pass is compiled for (default: powers of two
      from 16 up to `chunk`; `chunk` is always one, longer ones are cut to it); fewer lengths
      mean fewer programs and more padding.
    packed_tokens: the token counts a packed prefill pass is compiled for (default: powers of
      two from 64 up to 4 x `chunk`): whole prompts of up to `chunk` tokens laid end to end, up
      to `max_batch` prompts per pass, padded only at the end (`packed_prefill`). Empty: no
      packed passes.
    mixed_tokens: the prompt-token counts a mixed step is compiled for, per batch bucket and
      attention span (`decode_with_prompts`: a decode step that also prefills whole prompts
      packed end to end, so the prompts ride in the step's weight read). Default none:
      on the H200 the mixed steps made the server slower, not faster (0.847x of it without
      them at 32 streams: a mixed step still costs about twice a decode step; docs/serving.md);
      on the CPU prefill is compute-bound and a prompt padded to the mixed size costs more
      compute than the weight read it saves.
  """

  def __init__(self, gen: Generator, *, max_batch: int, max_len: int, chunk: int,
               batch_buckets: Sequence[int] | None = None,
               prefill_rows: Sequence[int] | None = None,
               prefill_lengths: Sequence[int] | None = None,
               packed_tokens: Sequence[int] | None = None,
               mixed_tokens: Sequence[int] | None = None):
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
    self.prefill_rows = tuple(sorted(set(prefill_rows or power_buckets(max_batch, factor=4))))
    if self.prefill_rows[0] < 1 or self.prefill_rows[-1] > max_batch:
      raise UserError(f"prefill rows {list(self.prefill_rows)} must lie in [1, max_batch="
                      f"{max_batch}]")
    # The chunk is always a length (a long prompt's pieces are that long); longer ones are cut.
    lengths = sorted({min(n, chunk) for n in prefill_lengths or
                      power_buckets(chunk, smallest=min(16, chunk))} | {chunk})
    if lengths[0] < 1:
      raise UserError(f"prefill lengths {lengths} must be positive")
    self.chunk_buckets = tuple(lengths)
    # Powers of two: a pass pads at most to twice its tokens, where prefill is compute-bound
    # (a CPU; long bursts on a GPU) padding costs as much as real tokens.
    packed = (power_buckets(4 * chunk, smallest=min(64, chunk)) if packed_tokens is None
              else packed_tokens)
    if packed and max(packed) < chunk:
      raise UserError(f"packed prefill sizes {list(packed)}: the largest must hold a whole"
                      f" chunk ({chunk} tokens)")
    self.packed_buckets = tuple(sorted(set(packed)))
    mixed = tuple(mixed_tokens or ())
    if mixed and max(mixed) < chunk:
      raise UserError(f"mixed step sizes {list(mixed)}: the largest must hold a whole chunk"
                      f" ({chunk} tokens)")
    self.mixed_buckets = tuple(sorted(set(mixed)))
    self.span_buckets = span_buckets(max_len)
    self._prefills: dict[tuple[int, int], Callable] = {}  # by (rows, length)
    self._packed: dict[int, Callable] = {}  # by tokens
    self._decodes: dict[tuple[int, int], Callable] = {}  # by (batch, span)
    self._mixed: dict[tuple[int, int, int], Callable] = {}  # by (batch, span, prompt tokens)

  def new_cache(self) -> SlotCache:
    cache = SlotCache.create(self.gen.cfg, self.max_batch, self.max_len, self.gen.dtype)
    return parallel.shard_cache(cache, self.gen.mesh) if self.gen.sharded else cache

  def new_tokens(self) -> jax.Array:
    """The [max_batch] int32 buffer of each row's next input token."""
    return self._replicated(jnp.zeros((self.max_batch,), jnp.int32))

  def _replicated(self, x):
    """Small inputs (tokens, per-row settings) as the compiled steps expect them."""
    return jax.device_put(x, parallel.replicated(self.gen.mesh)) if self.gen.sharded else x

  def _abstract(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.replicated(self.gen.mesh)
                                if self.gen.sharded else None)

  def _abstract_cache(self):
    cache = jax.eval_shape(lambda: SlotCache.create(self.gen.cfg, self.max_batch, self.max_len,
                                                    self.gen.dtype))
    return parallel.cache_shapes(cache, self.gen.mesh) if self.gen.sharded else cache

  def _pin(self, cache, small):
    """Inside jit, on a mesh: the cache keeps its layout from step to step, the rest replicated."""
    if not self.gen.sharded:
      return cache, small
    return parallel.pin_step(cache, small, self.gen.mesh)

  # -- traced bodies ------------------------------------------------------------------------

  def _prefill(self, params, adapter_params, derived, cache: SlotCache, nxt, rows, tokens, starts,
               counts, temperature, top_p, top_k, seeds):
    """tokens [R, C] (row i's first counts[i] real) at positions starts[i].. of cache rows
    rows[i]; a padding entry names row max_batch, which reads zeros and writes nothing."""
    part = cache.take_rows(rows).replace(lengths=starts)
    logits, part, routing = self.gen.apply(params, adapter_params, derived, tokens, part,
                                           last=counts - 1)
    ends = starts + counts
    part = part.replace(lengths=ends)
    new = sample_rows(logits, row_keys(seeds, ends), temperature, top_p, top_k)
    cache, (nxt, new, routing) = self._pin(cache.put_rows(rows, part),
                                           (nxt.at[rows].set(new, mode="drop"), new, routing))
    return cache, nxt, new, routing

  def _packed_prefill(self, params, adapter_params, derived, cache: SlotCache, nxt, tokens,
                      token_rows, token_pos, rows, last, temperature, top_p, top_k, seeds):
    """tokens [1, T]: whole prompts end to end, token i of cache row token_rows[i] at position
    token_pos[i]; prompt j (rows[j]; a padding entry names row max_batch) ends at index last[j]
    of the pass. Each prompt's row is rewritten from slot 0."""
    view = PackedPrompts.over(cache, token_rows, token_pos)
    logits, cache, routing = self.gen.apply(params, adapter_params, derived, tokens, view,
                                            last=last[None])
    ends = token_pos[last] + 1
    new = sample_rows(logits[0], row_keys(seeds, ends), temperature, top_p, top_k)
    cache, (nxt, new, routing) = self._pin(cache, (nxt.at[rows].set(new, mode="drop"), new,
                                                   routing))
    return cache, nxt, new, routing

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
    cache, (nxt, new, routing) = self._pin(cache, (nxt.at[:b].set(new), new, routing))
    return cache, nxt, new, routing

  def _decode_with_prompts(self, params, adapter_params, derived, cache: SlotCache, nxt, active,
                           temperature, top_p, top_k, seeds, tokens, token_rows, token_pos, rows,
                           last, p_temperature, p_top_p, p_top_k, p_seeds, span: int):
    """`_decode` over rows [0, b) and `_packed_prefill` of tokens [1, T] in one pass: the
    sequence is the b decode tokens, then the prompts. A prompt's row may lie inside [0, b)
    (a row that is not decoding): the prompt is written after the decode token, and its row's
    length and next token are set after the decode rows'."""
    b = active.shape[0]
    before = cache.lengths[:b]
    view = DecodeWithPrompts(decode=cache.replace(span=span, rows_used=b),
                             prompts=PackedPrompts.over(cache, token_rows, token_pos))
    at = jnp.concatenate([jnp.arange(b, dtype=jnp.int32), b + last])
    logits, cache, routing = self.gen.apply(params, adapter_params, derived,
                                            jnp.concatenate([nxt[None, :b], tokens], axis=1),
                                            view, last=at[None])
    lengths = cache.lengths.at[:b].set(jnp.where(active, before + 1, before))
    ends = token_pos[last] + 1
    lengths = lengths.at[rows].set(0, mode="drop").at[rows].max(ends, mode="drop")
    cache = cache.replace(lengths=lengths)
    keys = jnp.concatenate([row_keys(seeds, before + 1), row_keys(p_seeds, ends)])
    cat = lambda a, c: jnp.concatenate([a, c])  # noqa: E731
    new = sample_rows(logits[0], keys, cat(temperature, p_temperature), cat(top_p, p_top_p),
                      cat(top_k, p_top_k))
    nxt = nxt.at[:b].set(new[:b]).at[rows].set(new[b:], mode="drop")
    if routing is not None:
      routing = tuple(r[0, :b] for r in routing)
    cache, (nxt, new, routing) = self._pin(cache, (nxt, new, routing))
    return cache, nxt, new, routing

  # -- compiled ------------------------------------------------------------------------------

  def _lower_prefill(self, shape: tuple[int, int]):
    rows, length = shape
    gen = self.gen
    cache = self._abstract_cache()
    nxt = self._abstract((self.max_batch,), jnp.int32)
    per_row = lambda dt: self._abstract((rows,), dt)  # noqa: E731
    tokens = self._abstract((rows, length), jnp.int32)
    return jax.jit(self._prefill, donate_argnums=(3, 4)).lower(
        gen.params, gen.adapter_params, gen.derived, cache, nxt, per_row(jnp.int32), tokens,
        per_row(jnp.int32), per_row(jnp.int32), per_row(jnp.float32), per_row(jnp.float32),
        per_row(jnp.int32), per_row(jnp.uint32))

  def _lower_packed(self, tokens: int):
    gen = self.gen
    per_token = lambda: self._abstract((tokens,), jnp.int32)  # noqa: E731
    per_prompt = lambda dt: self._abstract((self.max_batch,), dt)  # noqa: E731
    return jax.jit(self._packed_prefill, donate_argnums=(3, 4)).lower(
        gen.params, gen.adapter_params, gen.derived, self._abstract_cache(),
        self._abstract((self.max_batch,), jnp.int32), self._abstract((1, tokens), jnp.int32),
        per_token(), per_token(), per_prompt(jnp.int32), per_prompt(jnp.int32),
        per_prompt(jnp.float32), per_prompt(jnp.float32), per_prompt(jnp.int32),
        per_prompt(jnp.uint32))

  def _lower_decode(self, shape: tuple[int, int]):
    batch, span = shape
    gen = self.gen
    cache = self._abstract_cache()
    nxt = self._abstract((self.max_batch,), jnp.int32)
    row = lambda dt: self._abstract((batch,), dt)  # noqa: E731
    return jax.jit(self._decode, donate_argnums=(3, 4), static_argnums=(10,)).lower(
        gen.params, gen.adapter_params, gen.derived, cache, nxt, row(jnp.bool_),
        row(jnp.float32), row(jnp.float32), row(jnp.int32), row(jnp.uint32), span)

  def _lower_mixed(self, shape: tuple[int, int, int]):
    batch, span, tokens = shape
    gen = self.gen
    row = lambda dt: self._abstract((batch,), dt)  # noqa: E731
    per_token = lambda: self._abstract((tokens,), jnp.int32)  # noqa: E731
    per_prompt = lambda dt: self._abstract((self.max_batch,), dt)  # noqa: E731
    return jax.jit(self._decode_with_prompts, donate_argnums=(3, 4), static_argnums=(19,)).lower(
        gen.params, gen.adapter_params, gen.derived, self._abstract_cache(),
        self._abstract((self.max_batch,), jnp.int32), row(jnp.bool_), row(jnp.float32),
        row(jnp.float32), row(jnp.int32), row(jnp.uint32),
        self._abstract((1, tokens), jnp.int32), per_token(), per_token(),
        per_prompt(jnp.int32), per_prompt(jnp.int32), per_prompt(jnp.float32),
        per_prompt(jnp.float32), per_prompt(jnp.int32), per_prompt(jnp.uint32), span)

  def prefill_fn(self, rows: int, length: int) -> Callable:
    """The compiled prefill pass of `rows` rows x `length` tokens (compiled on first use)."""
    if (rows, length) not in self._prefills:
      self._prefills[rows, length] = self._lower_prefill((rows, length)).compile()
    return self._prefills[rows, length]

  def packed_fn(self, tokens: int) -> Callable:
    """The compiled packed prefill pass of `tokens` tokens (compiled on first use)."""
    if tokens not in self._packed:
      self._packed[tokens] = self._lower_packed(tokens).compile()
    return self._packed[tokens]

  def decode_fn(self, batch: int, span: int | None = None) -> Callable:
    """The compiled decode step of `batch` rows whose attention reads `span` slots (default:
    all), compiled on first use."""
    key = (batch, span or self.max_len)
    if key not in self._decodes:
      self._decodes[key] = self._lower_decode(key).compile()
    return self._decodes[key]

  def mixed_fn(self, batch: int, span: int, tokens: int) -> Callable:
    """The compiled mixed step (compiled on first use)."""
    key = (batch, span, tokens)
    if key not in self._mixed:
      self._mixed[key] = self._lower_mixed(key).compile()
    return self._mixed[key]

  def warm_up(self, log: Callable[[str], None] | None = None, threads: int | None = None) -> None:
    """Compiles every decode bucket and prompt-chunk length now rather than on first use.

    The programs compile in parallel threads (XLA releases the interpreter while it compiles);
    on the H200 that did not shorten nine 7B programs (280 s one after another, 350 s in
    threads): the GEMM autotuner's measurements share the one GPU.
    """
    import concurrent.futures

    jobs = [(self._decodes, (b, span), self._lower_decode) for b in self.batch_buckets
            for span in self.span_buckets if (b, span) not in self._decodes]
    jobs += [(self._prefills, (r, c), self._lower_prefill) for r in self.prefill_rows
             for c in self.chunk_buckets if (r, c) not in self._prefills]
    jobs += [(self._packed, n, self._lower_packed) for n in self.packed_buckets
             if n not in self._packed]
    jobs += [(self._mixed, (b, span, n), self._lower_mixed) for b in self.batch_buckets
             for span in self.span_buckets for n in self.mixed_buckets
             if (b, span, n) not in self._mixed]
    workers = threads or min(len(jobs), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done = list(pool.map(lambda job: job[2](job[1]).compile(), jobs))
    for (table, key, _), fn in zip(jobs, done):
      table[key] = fn
    if log:
      log(f"compiled decode steps for batches {list(self.batch_buckets)} x attention spans"
          f" {list(self.span_buckets)}, prefill passes of rows {list(self.prefill_rows)} x"
          f" lengths {list(self.chunk_buckets)}, packed prefill passes of"
          f" {list(self.packed_buckets)} tokens, mixed steps with {list(self.mixed_buckets)}"
          " prompt tokens")

  def row_pass_shape(self, lengths: Sequence[int]) -> tuple[int, int]:
    """(rows, length) of the compiled row pass that holds pieces of these token lengths."""
    return (bucket_for(len(lengths), self.prefill_rows),
            bucket_for(max(lengths), self.chunk_buckets))

  def packed_size(self, lengths: Sequence[int], mixed: bool = False) -> int:
    """The compiled size of the packed pass (`mixed`: of the mixed step's prompt part) that
    holds whole prompts of these token lengths."""
    return bucket_for(sum(lengths), self.mixed_buckets if mixed else self.packed_buckets)

  def prefill(self, cache: SlotCache, nxt: jax.Array, pieces: Sequence[tuple[int, Sequence[int], int]],
              temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, seeds: np.ndarray):
    """One pass writing prompt chunks into several rows: pieces[i] = (row, chunk, start), with
    start the chunk's first position (0 resets the row) and distinct rows; the sampling
    settings are per piece.

    Returns (cache, nxt, tokens, routing): tokens[i] is the token sampled after piece i
    (meaningful after a prompt's last chunk), already placed in nxt[row]; entries past
    len(pieces) are padding.
    """
    rows, length = self.row_pass_shape([len(c) for _, c, _ in pieces])
    index = np.full((rows,), self.max_batch, np.int32)  # padding: past the last row
    tokens = np.zeros((rows, length), np.int32)
    starts = np.zeros((rows,), np.int32)
    counts = np.ones((rows,), np.int32)
    for i, (row, chunk, start) in enumerate(pieces):
      index[i], starts[i], counts[i] = row, start, len(chunk)
      tokens[i, :len(chunk)] = chunk

    fn = self.prefill_fn(rows, length)
    inputs = self._replicated((index, tokens, starts, counts,
                               *_sampling_rows(rows, temperature, top_p, top_k, seeds)))
    return fn(self.gen.params, self.gen.adapter_params, self.gen.derived, cache, nxt, *inputs)

  def packed_prefill(self, cache: SlotCache, nxt: jax.Array,
                     prompts: Sequence[tuple[int, Sequence[int]]], temperature: np.ndarray,
                     top_p: np.ndarray, top_k: np.ndarray, seeds: np.ndarray,
                     size: int | None = None):
    """One pass prefilling whole prompts: prompts[j] = (row, ids), distinct rows, at most
    `max_batch` prompts of at most `chunk` tokens whose total fits the largest packed size.
    `size`: the packed size to run (default the smallest that holds the prompts; a larger one
    pads more, as when timing each size).

    Returns (cache, nxt, tokens, routing) as `prefill`: tokens[j] is the token sampled after
    prompt j, already placed in nxt[row]."""
    need = sum(len(ids) for _, ids in prompts)
    if size is not None and (size not in self.packed_buckets or size < need):
      raise UserError(f"packed size {size} is not a compiled size holding {need} tokens"
                      f" (compiled: {list(self.packed_buckets)})")
    size = size or self.packed_size([len(ids) for _, ids in prompts])
    fn = self.packed_fn(size)
    inputs = self._replicated((*self._pack(prompts, size),
                               *_sampling_rows(self.max_batch, temperature, top_p, top_k, seeds)))
    return fn(self.gen.params, self.gen.adapter_params, self.gen.derived, cache, nxt, *inputs)

  def _pack(self, prompts: Sequence[tuple[int, Sequence[int]]], size: int):
    """Whole prompts end to end in `size` tokens: (tokens [1, size], token_rows, token_pos
    [size], rows [max_batch], last [max_batch]); padding names row max_batch."""
    tokens = np.zeros((1, size), np.int32)
    token_rows = np.full((size,), self.max_batch, np.int32)  # padding: past the last row
    token_pos = np.zeros((size,), np.int32)
    rows = np.full((self.max_batch,), self.max_batch, np.int32)
    last = np.zeros((self.max_batch,), np.int32)
    at = 0
    for j, (row, ids) in enumerate(prompts):
      tokens[0, at:at + len(ids)] = ids
      token_rows[at:at + len(ids)] = row
      token_pos[at:at + len(ids)] = np.arange(len(ids))
      rows[j], last[j] = row, at + len(ids) - 1
      at += len(ids)
    return tokens, token_rows, token_pos, rows, last

  def decode(self, cache: SlotCache, nxt: jax.Array, active: np.ndarray, temperature: np.ndarray,
             top_p: np.ndarray, top_k: np.ndarray, seeds: np.ndarray, longest: int):
    """One decode step of rows [0, len(active)) (a batch bucket); `longest` is the highest
    slot an active row writes (its attention reads up to the span bucket above it).

    Returns (cache, nxt, new [b], routing)."""
    fn = self.decode_fn(len(active), bucket_for(longest + 1, self.span_buckets))
    inputs = self._replicated((active, temperature, top_p, top_k, seeds))
    return fn(self.gen.params, self.gen.adapter_params, self.gen.derived, cache, nxt, *inputs)

  def decode_with_prompts(self, cache: SlotCache, nxt: jax.Array, active: np.ndarray,
                          temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray,
                          seeds: np.ndarray, longest: int,
                          prompts: Sequence[tuple[int, Sequence[int]]], p_temperature,
                          p_top_p, p_top_k, p_seeds):
    """`decode` of rows [0, len(active)) and the whole prompts `prompts` (as `packed_prefill`:
    (row, ids), distinct rows that are not decoding, at most the largest mixed size in total)
    in one pass.

    Returns (cache, nxt, new [b + max_batch], routing of the decode rows): new[i] for i < b is
    decode row i's token, new[b + j] the token sampled after prompt j."""
    b = len(active)
    size = self.packed_size([len(ids) for _, ids in prompts], mixed=True)
    fn = self.mixed_fn(b, bucket_for(longest + 1, self.span_buckets), size)
    inputs = self._replicated((active, temperature, top_p, top_k, seeds,
                               *self._pack(prompts, size),
                               *_sampling_rows(self.max_batch, p_temperature, p_top_p, p_top_k,
                                               p_seeds)))
    return fn(self.gen.params, self.gen.adapter_params, self.gen.derived, cache, nxt, *inputs)
