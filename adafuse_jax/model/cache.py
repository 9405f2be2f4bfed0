"""Fixed-size key/value caches: one buffer per layer, written in place.

Two bookkeepings, one interface (`positions`, `visible`, `write`, `advanced`) that the decoder
calls, so the model does not care which it holds:

- `KVCache` (static batches, `generate`): ragged prompts are left-padded, every row writes
  the same slot each step, row b's first `pad[b]` slots are padding that no query reads, and
  its RoPE position is `slot - pad[b]`. One slot counter for the whole batch keeps each write
  a single `dynamic_update_slice`, which XLA performs in place on the donated buffer.
- `SlotCache` (continuous batching, the serving engine): each row is a slot that holds one
  request at a time, with its own length; a row's slot s holds its token at position s, so
  requests of different ages share a step. Writes are one scatter per layer (in place).
- `PackedPrompts` (the serving engine's prefill): whole prompts of several requests packed end
  to end into one sequence without padding between them; each token attends to the tokens of
  its own prompt only, and its key/value is scattered into its request's row of a `SlotCache`.
- `DecodeWithPrompts` (the serving engine's mixed step): one decode token for each of the first
  rows of a `SlotCache` followed by packed whole prompts, in one sequence: the linear layers read
  their weights once for both, attention splits them.

The decoder calls `attend` per layer (write the new keys and values, attend to what the view may
read); `_Buffers.attend` composes `write`, `readable` and `visible`'s mask; `PackedPrompts`
attends to the pass's own keys without reading them back, and a view that is two views in one
(`DecodeWithPrompts`) splits the sequence between them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from adafuse_jax.config import ModelConfig
from adafuse_jax.model.layers import AttentionFn, QkvDelta, appending, attention, rotate

Rope = tuple[jax.Array, jax.Array]  # (cos, sin) [B, T, hd/2]: `layers.rope_tables`


def _zeros(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> tuple[jax.Array, ...]:
  """One zeroed [batch, max_len, Hkv, hd] buffer per layer."""
  shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
  return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.layers))


class _Buffers:
  """What both caches read off their per-layer buffers `k`, `v` ([B, S, Hkv, hd] each)."""

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  @property
  def batch(self) -> int:
    return self.k[0].shape[0]

  def nbytes(self) -> int:
    return sum(a.size * a.dtype.itemsize for a in self.k + self.v)

  def appends(self, t: int, attend_fn: AttentionFn) -> bool:
    """Whether `attend` of t tokens per row runs `attend_fn`'s appending kernel (rotary
    embedding, cache write and attention in one), which can also add q, k and v's delta."""
    return appending(attend_fn) is not None and self.write_slots(t) is not None

  def write_slots(self, t: int) -> jax.Array | None:
    """[B] int32, the slot each row's one new token goes to, for a kernel that writes it
    itself; None where this view does not write that way (several tokens per row)."""
    return None

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, k_buf: jax.Array, v_buf: jax.Array,
             mask, attend_fn: AttentionFn = attention, rope: Rope | None = None,
             delta: QkvDelta | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer: rotates q [B, T, Hq, hd] and the new k [B, T, Hkv, hd] by `rope`, writes k and
    v into its buffers [B, S, Hkv, hd] and attends q to what this view reads under `mask` (from
    `visible`), with `attend_fn` (`model.layers.ATTENTION`). A decode step whose `attend_fn`
    has an appending form (`layers.appending`) runs all of it in that one kernel; only such a
    step takes `delta` (q, k and v's expert delta, which that kernel adds: `appends`).

    Returns (attention output [B, T, Hq, hd], k buffer, v buffer)."""
    fused, slots = appending(attend_fn), self.write_slots(q.shape[1])
    if fused is not None and slots is not None and rope is not None:
      return fused(q, k, v, k_buf, v_buf, slots, mask, *rope, delta)
    if delta is not None:
      raise ValueError("a q/k/v delta is added only by an appending kernel's decode step"
                       " (ask `appends` first)")
    if rope is not None:
      q, k = rotate(q, *rope), rotate(k, *rope)
    k_buf, v_buf = self.write(k_buf, k), self.write(v_buf, v)
    return attend_fn(q, self.readable(k_buf), self.readable(v_buf), mask), k_buf, v_buf


@flax.struct.dataclass
class KVCache(_Buffers):
  """Per-layer key/value buffers and the bookkeeping that locates tokens in them.

  Attributes:
    k, v: L arrays of [B, S, Hkv, hd].
    pad: [B] int32, the first slot of row b that holds a real token.
    length: [] int32, slots written so far (the next write goes to slot `length`).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pad: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype,
             pad: jax.Array | None = None) -> "KVCache":
    if pad is None:
      pad = jnp.zeros((batch,), jnp.int32)
    return cls(k=_zeros(cfg, batch, max_len, dtype), v=_zeros(cfg, batch, max_len, dtype),
               pad=jnp.asarray(pad, jnp.int32), length=jnp.zeros((), jnp.int32))

  def positions(self, t: int) -> jax.Array:
    """RoPE positions [B, T] of the next t tokens."""
    slots = self.length + jnp.arange(t, dtype=jnp.int32)
    return slots[None, :] - self.pad[:, None]

  def visible(self, t: int) -> jax.Array:
    """[B, T, S] bool: whether the next t tokens' queries may read each slot."""
    slots = self.length + jnp.arange(t, dtype=jnp.int32)
    kv = jnp.arange(self.max_len, dtype=jnp.int32)
    return (kv[None, None, :] <= slots[None, :, None]) & (kv[None, None, :] >= self.pad[:, None, None])

  def write_slots(self, t: int) -> jax.Array | None:
    return jnp.broadcast_to(self.length, (self.batch,)) if t == 1 else None

  def write(self, buf: jax.Array, new: jax.Array) -> jax.Array:
    """Stores new [B, T, Hkv, hd] at the next slots of one layer's buffer [B, S, Hkv, hd]."""
    return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, self.length, 0, 0))

  def advanced(self, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], t: int) -> "KVCache":
    """The cache after t tokens were written into buffers k, v."""
    return self.replace(k=k, v=v, length=self.length + t)

  def readable(self, buf: jax.Array) -> jax.Array:
    """The part of a layer's buffer that attention reads (all of it)."""
    return buf


@flax.struct.dataclass
class SlotCache(_Buffers):
  """Per-layer key/value buffers whose rows are independent sequences (continuous batching).

  Attributes:
    k, v: L arrays of [B, S, Hkv, hd]; row b holds its token at position p in slot p.
    lengths: [B] int32, tokens held per row (row b's next token goes to slot `lengths[b]`).
    span: static; attention reads slots [0, span) (None: all).

  A write of t tokens goes to slots `lengths[b] .. lengths[b] + t - 1` of every row; the caller
  keeps that inside S (the serving engine's prefill chunks start at multiples of the chunk size
  and S is a multiple of it) and sets `lengths` for rows that did not really advance.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array
  # Attention reads slots [0, span) only (a static bound the caller guarantees covers every
  # row's length): a step on short sequences in a long cache does not read the empty slots.
  span: int | None = flax.struct.field(pytree_node=False, default=None)
  # A step over rows [0, rows_used) only (None: all): the buffers stay whole, reads slice them and
  # writes scatter into them, so a small batch bucket copies nothing.
  rows_used: int | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> "SlotCache":
    return cls(k=_zeros(cfg, batch, max_len, dtype), v=_zeros(cfg, batch, max_len, dtype),
               lengths=jnp.zeros((batch,), jnp.int32))

  def _lengths(self) -> jax.Array:
    return self.lengths if self.rows_used is None else self.lengths[:self.rows_used]

  def positions(self, t: int) -> jax.Array:
    return self._lengths()[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

  def visible(self, t: int) -> jax.Array:
    kv = jnp.arange(self.span or self.max_len, dtype=jnp.int32)
    return kv[None, None, :] <= self.positions(t)[:, :, None]

  def readable(self, buf: jax.Array) -> jax.Array:
    return buf[:self.rows_used, :self.span]

  def write_slots(self, t: int) -> jax.Array | None:
    return self._lengths() if t == 1 else None

  def write(self, buf: jax.Array, new: jax.Array) -> jax.Array:
    n, t = new.shape[:2]
    if t == 1:  # a decode step: one scatter (a slot past the end is dropped, never clamped)
      return buf.at[jnp.arange(n), self._lengths()].set(new[:, 0].astype(buf.dtype))
    put = lambda row, rows_new, start: jax.lax.dynamic_update_slice(  # noqa: E731
        row, rows_new, (start, 0, 0))
    return jax.vmap(put)(buf, new.astype(buf.dtype), self.lengths)

  def advanced(self, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], t: int) -> "SlotCache":
    return self.replace(k=k, v=v, lengths=self.lengths + t)

  def take_rows(self, rows: jax.Array) -> "SlotCache":
    """Rows `rows` [R] as a cache of batch R (a copy inside jit); an index past the last row
    (padding) reads zeros."""
    take = lambda a: a.at[rows].get(mode="fill", fill_value=0)  # noqa: E731
    return SlotCache(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)),
                     lengths=take(self.lengths))

  def put_rows(self, rows: jax.Array, part: "SlotCache") -> "SlotCache":
    """This cache with rows `rows` [R] replaced by `part`'s R rows; an index past the last row
    (padding) is dropped. Indices must be distinct."""
    put = lambda a, b: a.at[rows].set(b, mode="drop")  # noqa: E731
    return SlotCache(k=tuple(map(put, self.k, part.k)), v=tuple(map(put, self.v, part.v)),
                     lengths=put(self.lengths, part.lengths))


@flax.struct.dataclass
class PackedPrompts(_Buffers):
  """A `SlotCache` seen by one packed prefill pass: tokens [1, T] are whole prompts laid end to
  end, token i belonging to cache row `rows[i]` at position `pos[i]` (a padding token names a
  row past the last, which writes nothing).

  Attention reads the pass's own keys and values as computed (in the buffers' dtype, the values
  a read of the rows just written would return) under a block-diagonal causal mask, so no
  prompt sees another and no padding is computed between prompts; the buffers are only written
  (each prompt starts its row afresh). Reading them back instead put a gather inside each
  attention matmul.

  Attributes:
    k, v: the slot cache's L buffers [B, S, Hkv, hd].
    lengths: [B] int32, the slot cache's lengths.
    rows, pos: [T] int32 per token.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array
  rows: jax.Array
  pos: jax.Array

  @classmethod
  def over(cls, cache: SlotCache, rows: jax.Array, pos: jax.Array) -> "PackedPrompts":
    return cls(k=cache.k, v=cache.v, lengths=cache.lengths, rows=rows, pos=pos)

  def positions(self, t: int) -> jax.Array:
    return self.pos[None, :]

  def visible(self, t: int) -> jax.Array:
    same = self.rows[:, None] == self.rows[None, :]
    return (same & (self.pos[None, :] <= self.pos[:, None]))[None]

  def write(self, buf: jax.Array, new: jax.Array) -> jax.Array:
    return buf.at[self.rows, self.pos].set(new[0].astype(buf.dtype), mode="drop")

  def attend(self, q, k, v, k_buf, v_buf, mask, attend_fn: AttentionFn = attention,
             rope: Rope | None = None):
    if rope is not None:
      q, k = rotate(q, *rope), rotate(k, *rope)
    k_buf, v_buf = self.write(k_buf, k), self.write(v_buf, v)
    return attend_fn(q, *self.own(k, v, k_buf), mask), k_buf, v_buf

  @staticmethod
  def own(k: jax.Array, v: jax.Array, buf: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pass's own keys and values [1, T, Hkv, hd] as the buffers hold them (their dtype).
    A padding token's differ from the zeros a read would give, but only padding sees them."""
    return k.astype(buf.dtype), v.astype(buf.dtype)

  def advanced(self, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], t: int) -> SlotCache:
    """The slot cache after the pass: each prompt's row holds exactly its prompt."""
    lengths = self.lengths.at[self.rows].set(0, mode="drop")
    return SlotCache(k=k, v=v, lengths=lengths.at[self.rows].max(self.pos + 1, mode="drop"))


@flax.struct.dataclass
class DecodeWithPrompts:
  """A decode step and a packed prefill in one pass over a `SlotCache`: tokens [1, b + T] are
  the next token of each of rows [0, b) (`decode`, a `SlotCache` with `rows_used` = b and its
  attention span) followed by whole prompts end to end (`prompts`, a `PackedPrompts` view).

  The linear layers see one sequence, so the weights are read once for both; attention splits
  it: the decode tokens read their rows' slots, the prompt tokens their own prompt. The prompts
  are written after the decode tokens, so a prompt may take a row inside [0, b) that is not
  decoding. Lengths are left for the caller to set (`advanced` returns the slot cache as
  written, lengths unchanged).
  """

  decode: SlotCache
  prompts: PackedPrompts

  @property
  def k(self) -> tuple[jax.Array, ...]:
    return self.decode.k

  @property
  def v(self) -> tuple[jax.Array, ...]:
    return self.decode.v

  @property
  def rows(self) -> int:
    return self.decode.rows_used

  def positions(self, t: int) -> jax.Array:
    b = self.rows
    return jnp.concatenate([self.decode.positions(1).reshape(1, b),
                            self.prompts.positions(t - b)], axis=1)

  def visible(self, t: int):
    return self.decode.visible(1), self.prompts.visible(t - self.rows)

  def attend(self, q, k, v, k_buf, v_buf, mask, attend_fn: AttentionFn = attention,
             rope: Rope | None = None):
    if rope is not None:
      q, k = rotate(q, *rope), rotate(k, *rope)
    b = self.rows
    as_rows = lambda x: x[0, :b][:, None]  # noqa: E731  [1, b, ...] -> [b, 1, ...]
    # Every write before any read: a read between two writes of one buffer makes XLA copy the
    # whole buffer (per layer, K and V) to keep the read's version. The prompts write rows that
    # do not decode, so the decode rows read the same values either way.
    for view, new_k, new_v in ((self.decode, as_rows(k), as_rows(v)),
                               (self.prompts, k[:, b:], v[:, b:])):
      k_buf, v_buf = view.write(k_buf, new_k), view.write(v_buf, new_v)
    out_d = attend_fn(as_rows(q), self.decode.readable(k_buf), self.decode.readable(v_buf),
                      mask[0])
    out_p = attend_fn(q[:, b:], *self.prompts.own(k[:, b:], v[:, b:], k_buf), mask[1])
    # Without the barrier XLA on the GPU fused the decode rows' attention-times-values into
    # the concatenation, an element-wise loop that ran 273 µs a layer against ~15 µs as its
    # own reduction (the H200 profile in docs/benchmarks/h200/serve-steps/kernels.md).
    out_d, out_p = jax.lax.optimization_barrier((out_d, out_p))
    return jnp.concatenate([out_d[:, 0][None], out_p], axis=1), k_buf, v_buf

  def advanced(self, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], t: int) -> SlotCache:
    return SlotCache(k=k, v=v, lengths=self.decode.lengths)
