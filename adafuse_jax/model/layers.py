"""Stateless building blocks of a Llama block: RMSNorm, RoPE, grouped-query attention, SwiGLU.

They are plain functions of arrays so that the decoder can call them on slices of stacked
per-layer weights inside a Python-unrolled layer loop (`lax.scan` over layers costs 2.6x at
batch-1 decode on the GPU: docs/architecture.md, "Measured design facts").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.config import ModelConfig
from adafuse_jax.errors import UserError
from adafuse_jax.vocab import ATTENTIONS


# XLA:CPU reads a small weight with one core in a product of a few rows: the default model's
# 1.3-1.5 MB weights at 28 GB/s, its 2.7-7.1 MB ones at 48-53 GB/s with both cores
# (`tools/cpu_gemv_sizes.py`, docs/benchmarks/cpu/step-profile/). The same product as two
# half-contractions in one batched dot, then added, takes both cores (576 x 640: 52 -> 30 µs).
# A module attribute, read at trace time, so a probe can turn it off (0).
CPU_SPLIT_BELOW_BYTES = 2 << 20
CPU_SPLIT_MAX_ROWS = 8


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out] -> [..., out] in x's dtype. On the CPU, a few rows against a
  weight under `CPU_SPLIT_BELOW_BYTES` go as two half-contractions batched in one dot (the same
  sum, accumulated in f32); anywhere else, `x @ w`."""
  rows = math.prod(x.shape[:-1])
  n_in = w.shape[0]
  if (jax.default_backend() != "cpu" or w.ndim != 2 or rows > CPU_SPLIT_MAX_ROWS or n_in % 2
      or w.size * w.dtype.itemsize >= CPU_SPLIT_BELOW_BYTES):
    return x @ w
  halves = jax.lax.dot_general(
      x.reshape(rows, 2, n_in // 2), w.reshape(2, n_in // 2, w.shape[1]),
      (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)  # [2, rows, out]
  return (halves[0] + halves[1]).astype(x.dtype).reshape(*x.shape[:-1], w.shape[1])


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm over the last axis, computed in f32. x: [..., D], weight: [D]."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] of the rotary embedding, with the config's scaling
  (the formulas of transformers' `modeling_rope_utils`, computed in f64)."""
  half = cfg.head_dim // 2
  dims = np.arange(half, dtype=np.float64) * 2 / cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_base ** dims)
  s = cfg.rope_scaling
  if s is None or s.kind == "dynamic":  # dynamic NTK is the plain rope inside the context
    return inv_freq.astype(np.float32)
  if s.kind == "linear":
    return (inv_freq / s.factor).astype(np.float32)
  if s.kind == "llama3":
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = np.where(wavelen > low_wavelen, inv_freq / s.factor,
                   np.where(wavelen < high_wavelen, inv_freq, blended))
    return out.astype(np.float32)
  if s.kind == "yarn":
    # Dimensions rotating more than beta_fast times in the original context keep their
    # frequency, those under beta_slow are interpolated by `factor`, a linear ramp between.
    def correction_dim(rotations: float) -> float:
      return (cfg.head_dim * math.log(s.original_max_position / (rotations * 2 * math.pi))
              / (2 * math.log(cfg.rope_base)))
    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, cfg.head_dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(half, dtype=np.float64) - low) / (high - low), 0, 1)
    return (inv_freq / s.factor * ramp + inv_freq * (1 - ramp)).astype(np.float32)
  raise ValueError(f"unsupported rope scaling kind {s.kind!r}")


def rope_tables(positions: jax.Array, inv_freq: jax.Array, scale: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [B, T, hd/2] f32: the rotary tables at positions [B, T] (`scale`, yarn's
  attention factor, multiplies both). A step computes them once for all its layers."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  return cos, sin


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, T, H, hd] by the tables cos, sin [B, T, hd/2] (`rope_tables`) in the
  `rotate_half` (Hugging Face) layout: pairs (i, i + hd/2). GGUF files store Q/K rows permuted
  for interleaved pairs; the GGUF loader undoes that permutation so one rotary serves every
  format. Computed in f32, returned in x's dtype."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention of queries against a (cached) key/value buffer, written the way
  this backend runs fastest (`token_order_attention` on the CPU, `head_order_attention` on
  a GPU; the same products).

  Args:
    q: [B, T, Hq, hd] queries.
    k, v: [B, S, Hkv, hd] keys and values (S slots of the cache).
    mask: [B, T, S] bool, True where query t may read slot s.
  Returns:
    [B, T, Hq, hd] in q's dtype; scores and softmax run in f32.
  """
  if jax.default_backend() == "cpu":
    return token_order_attention(q, k, v, mask)
  return head_order_attention(q, k, v, mask)


def token_order_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array) -> jax.Array:
  """`attention` (same arguments) as two dot_generals batched over (row, KV head), their
  results in dot_general's own order [B, Hkv, T, G, ...]. Asked for [B, Hkv, G, T, S] (the
  head order), XLA:CPU also transposes each layer's query and probabilities into copies of their
  own: the default model's 30 layers of attention took 1.30x [1.22, 1.41] this form's time at
  128 slots (docs/benchmarks/cpu/attention-dot-general/). On the H200 it is no faster in a
  decode step and slower in a one-row prompt pass (`head_order_attention`)."""
  b, t, hq, hd = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, hq // hkv, hd)
  scores = jax.lax.dot_general(q, k, (((4,), (3,)), ((0, 2), (0, 2))),
                               preferred_element_type=jnp.float32)  # [B, Hkv, T, G, S]
  probs = _masked_softmax(scores, mask[:, None, :, None, :], hd, v.dtype)
  out = jax.lax.dot_general(probs, v, (((4,), (1,)), ((0, 1), (0, 2))),
                            preferred_element_type=jnp.float32)  # [B, Hkv, T, G, hd]
  return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, hq, hd).astype(q.dtype)


def head_order_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         mask: jax.Array) -> jax.Array:
  """`attention` (same arguments) as einsums whose results put the query heads before the
  tokens, [B, Hkv, G, T, S]: the library's only form before 2026-12-04 and the GPU's. On the
  H200 a 512-token prompt pass of the 7B preset took 0.951x [0.923, 0.965] the token order's
  time at one row, 0.999x [0.992, 1.006] at eight (docs/benchmarks/h200/xla-attention-forms/)."""
  b, t, hq, hd = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, hq // hkv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  probs = _masked_softmax(scores, mask[:, None, None, :, :], hd, v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, hd).astype(q.dtype)


def _masked_softmax(scores: jax.Array, visible: jax.Array, head_dim: int,
                    dtype: jnp.dtype) -> jax.Array:
  """Both forms' probabilities: f32 scores [..., S] scaled by 1/sqrt(head_dim), slots where
  `visible` (broadcast to the scores) is False left out, softmax over S, cast to `dtype`."""
  scores = scores * (1.0 / math.sqrt(head_dim))
  scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`attention`, with one query token per row run by the Pallas decode-attention kernel
  (`pallas_kernels.decode_attention`: one launch per layer, split over the cache, only the
  blocks before the last visible slot read; the Pallas interpreter on the CPU). Several tokens
  per row (prompts) run `attention`. Same shapes and dtypes as `attention`."""
  if q.shape[1] != 1:
    return attention(q, k, v, mask)
  from pallas_kernels.common import interpret
  from pallas_kernels.decode_attention import triton as decode_kernel
  out = decode_kernel.decode_attention(q[:, 0], k, v, mask[:, 0], interpret=interpret())
  return out[:, None]


@dataclasses.dataclass(frozen=True)
class QkvDelta:
  """q, k and v handed to the attention before their expert delta, for a kernel that adds it.

  qkv: [B, (Hq + 2 Hkv) · hd + 3R] the fused q/k/v matmul's whole output (base projections,
    then q's, k's and v's shrink);
  low_rank: `pallas_kernels.decode_attention.QkvLowRank` (gates, B transposed);
  layer: the layer of a stacked B, or None.
  """

  qkv: jax.Array
  low_rank: Any
  layer: int | None


def appending_kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_buf: jax.Array,
                               v_buf: jax.Array, slot: jax.Array, mask: jax.Array,
                               cos: jax.Array, sin: jax.Array, delta: QkvDelta | None = None
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decode token per row through the Pallas kernel that also rotates it and writes it
  into the cache (`decode_attention.triton.decode_attention_append`).

  Args:
    q: [B, 1, Hq, hd], k, v: [B, 1, Hkv, hd], q and k before the rotary embedding.
    k_buf, v_buf: [Bc, S, Hkv, hd] a layer's buffers (Bc >= B), written in place.
    slot: [B] int32, where each row's new key and value go (past S: dropped).
    mask: [B, 1, W] bool, the slots (W <= S) the token may read once written.
    cos, sin: [B, 1, hd/2] (`rope_tables`).
    delta: q, k and v's expert delta, added by the kernel (q, k, v are then the base
      projections, which it reads from `delta.qkv`), or None.
  Returns:
    (attention output [B, 1, Hq, hd], k_buf, v_buf).
  """
  from pallas_kernels.common import interpret
  from pallas_kernels.decode_attention import triton as decode_kernel
  b = q.shape[0]
  if delta is not None:
    out, k_buf, v_buf = decode_kernel.decode_attention_append(
        delta.qkv, k_buf, v_buf, slot, mask[:, 0], cos[:, 0], sin[:, 0], delta.low_rank,
        layer=delta.layer, interpret=interpret())
    return out.reshape(q.shape), k_buf, v_buf
  # Side by side again: where q, k and v are slices of one fused matmul's output XLA folds this
  # back into that output (a slice passed to the kernel on its own is a copy).
  qkv = jnp.concatenate([x.reshape(b, -1) for x in (q, k, v)], axis=1)
  out, k_buf, v_buf = decode_kernel.decode_attention_append(
      qkv, k_buf, v_buf, slot, mask[:, 0], cos[:, 0], sin[:, 0], interpret=interpret())
  return out.reshape(q.shape), k_buf, v_buf


def fused_kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
                           ) -> jax.Array:
  """`kernel_attention`; where a cache view can hand it the write slots, a decode step instead
  runs `appending_kernel_attention` (rotary embedding, cache write and attention in one kernel:
  the view looks up `appending`)."""
  return kernel_attention(q, k, v, mask)


fused_kernel_attention.appending = appending_kernel_attention


def appending(attend_fn: "AttentionFn"):
  """The rotate-write-attend form of an attention function (`appending_kernel_attention`'s
  signature), or None when it has none."""
  return getattr(attend_fn, "appending", None)


WINDOW_MIN_SLOTS = 64  # narrower windows save less than the branch costs
WINDOWS = 8  # window widths per buffer: a step reads at most 1/8 of the buffer it need not


def window_widths(slots: int) -> tuple[int, ...]:
  """The widths `windowed_attention` picks from for a buffer of `slots`: multiples of
  max(64, slots / 8) up to `slots` (just `slots` for a buffer of at most 64)."""
  step = max(WINDOW_MIN_SLOTS, -(-slots // WINDOWS))
  return tuple(range(step, slots, step)) + (slots,)


def windowed_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`attention` over the first W slots of the buffers only, W the narrowest of `window_widths`
  that holds every slot the mask lets a query read (one `lax.switch` between the widths, each a
  static slice): a step early in a long buffer reads only its written part. Same shapes, dtypes
  and result as `attention`; a mask that shows no slot at all takes the narrowest window."""
  widths = window_widths(k.shape[1])
  if len(widths) == 1:
    return attention(q, k, v, mask)
  slots = jnp.arange(k.shape[1], dtype=jnp.int32)
  needed = jnp.max(jnp.where(jnp.any(mask, axis=(0, 1)), slots + 1, 0))
  branch = jnp.searchsorted(jnp.asarray(widths, jnp.int32), needed)
  return jax.lax.switch(branch, [
      lambda q, k, v, mask, w=w: attention(q, k[:, :w], v[:, :w], mask[..., :w])
      for w in widths], q, k, v, mask)


# How a decode step's attention runs: "xla" (`attention`: two products and a softmax, fused
# by XLA), "windowed" (`windowed_attention`: the same over the buffers' written part), "pallas"
# (the Pallas kernel reading the cache that XLA's fusions rotated and wrote: `kernel_attention`) or
# "pallas-append" (the Pallas kernel that also rotates the token and writes it into the cache:
# `fused_kernel_attention`). "auto" (`resolve_attention`) takes "pallas-append" on one GPU: on
# the H200 the plain kernel made the 7B step 0.90x (batch 1) and 0.79x (batch 32) of XLA's,
# Mistral's batch 32 0.53x (docs/benchmarks.md, "The decode-attention kernel"), and the
# appending one 0.977x of the plain one's at batch 1, even at batch 32 (docs/benchmarks.md,
# "Rotary and cache write in the kernel").
ATTENTION = {"xla": attention, "windowed": windowed_attention, "pallas": kernel_attention,
             "pallas-append": fused_kernel_attention}
ATTENTION_CHOICES = ("auto", *ATTENTION)
assert tuple(ATTENTION) == ATTENTIONS, "the attention names of vocab.ATTENTIONS"


def resolve_attention(name: str, *, devices: int = 1) -> str:
  """The attention a name means here: "auto" is "pallas-append" on one GPU, else "xla" (the CPU runs
  the kernels only in the Pallas interpreter; a tensor-parallel step cannot split them yet).
  A UserError names the choices for an unknown name."""
  if name not in ATTENTION_CHOICES:
    raise UserError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
  if name != "auto":
    return name
  return "pallas-append" if jax.default_backend() == "gpu" and devices == 1 else "xla"


def attention_fn(name: str) -> AttentionFn:
  """The attention function of a name in `ATTENTION` ("auto": `resolve_attention`'s choice)."""
  return ATTENTION[resolve_attention(name)]


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, the SwiGLU activation."""
  return jax.nn.silu(gate) * up
