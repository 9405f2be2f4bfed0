"""Decode attention (pallas_kernels/decode_attention) against its f32 reference.

Interpret mode on the CPU, compiled on a GPU. Shapes are not multiples of the tiles (slots,
head_dim, query heads per KV head), inputs are fresh random draws, the kernel's partial outputs
start as NaN, and every cache slot a row may not read holds NaN (it must not reach the result).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention as da
from pallas_kernels.decode_attention.reference import (decode_attention_append_reference,
                                                     decode_attention_reference)
from pallas_kernels.decode_attention.triton import (Tiles, decode_attention,
                                                  decode_attention_append, split_plan)
from adafuse_jax.model.layers import (attention, head_order_attention, token_order_attention,
                                      window_widths, windowed_attention)

INTERPRET = jax.default_backend() != "gpu"
SMALL = Tiles(block_s=16, target_programs=24)
# dtype -> max error relative to max |reference|.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _problem(seed: int, batch: int, slots: int, kv_heads: int, groups: int, head_dim: int,
             dtype, pads, ends):
  """Random q, k, v and a mask of rows [pad, end) (left padding, rows of their own lengths);
  the slots a row may not read hold NaN."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (batch, kv_heads * groups, head_dim), dtype)
  k = jax.random.normal(kk, (batch, slots, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, slots, kv_heads, head_dim), dtype)
  pads, ends = np.asarray(pads), np.asarray(ends)
  s = np.arange(slots)[None]
  mask = jnp.asarray((s >= pads[:, None]) & (s < ends[:, None]))
  unseen = ~mask[:, :, None, None]
  return q, jnp.where(unseen, jnp.nan, k), jnp.where(unseen, jnp.nan, v), mask


def _poisoned_partials(q, k, tiles):
  b, hq, hd = q.shape
  hkv = k.shape[2]
  splits, _ = split_plan(b, hkv, k.shape[1], tiles)
  g, d = hq // hkv, hd
  return (jnp.full((b, hkv, splits, g, d), jnp.nan, jnp.float32),
          jnp.full((b, hkv, splits, g), jnp.nan, jnp.float32),
          jnp.full((b, hkv, splits, g), jnp.nan, jnp.float32))


def _check(q, k, v, mask, dtype, tiles=SMALL):
  got = decode_attention(q, k, v, mask, tiles=tiles, interpret=INTERPRET,
                         partials=_poisoned_partials(q, k, tiles))
  want = decode_attention_reference(q, jnp.nan_to_num(k), jnp.nan_to_num(v), mask)
  assert got.dtype == q.dtype and got.shape == q.shape
  assert not bool(jnp.isnan(got).any()), "NaN: a partial never written or a NaN slot read"
  err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
  assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch, slots, kv_heads, groups, head_dim, pads, ends", [
    (1, 37, 2, 1, 24, [0], [37]),                 # batch 1, Llama-like groups of one, ragged
    (3, 50, 2, 4, 32, [0, 5, 11], [50, 33, 20]),  # Mistral-like groups of 4, left padding
    (2, 70, 1, 3, 16, [0, 0], [9, 41]),           # cache filled to 41 of 70: later blocks skipped
    (5, 16, 4, 2, 64, [0, 1, 2, 3, 15], [16] * 5),  # one block exactly, a row of one slot
])
def test_matches_reference_on_ragged_shapes(dtype, batch, slots, kv_heads, groups, head_dim,
                                            pads, ends):
  prob = _problem(batch * slots + groups, batch, slots, kv_heads, groups, head_dim, dtype,
                  pads, ends)
  _check(*prob, dtype)


def test_splits_cover_the_cache_and_spread_a_small_batch():
  for batch, heads, slots in [(1, 32, 512), (32, 8, 512), (1, 2, 37), (3, 1, 1000)]:
    splits, per = split_plan(batch, heads, slots, Tiles())
    blocks = -(-slots // Tiles().block_s)
    assert splits * per >= blocks > (splits - 1) * per  # every block in exactly one split
  assert split_plan(1, 32, 512, Tiles())[0] == 8  # batch 1 of a 7B: 256 programs, not 32
  assert split_plan(32, 32, 512, Tiles())[0] == 1


def test_model_attention_equals_the_kernel_for_one_token():
  """The model's `attention` (what the kernel would replace) and the kernel agree."""
  q, k, v, mask = _problem(7, 2, 45, 2, 2, 32, jnp.float32, [0, 3], [45, 30])
  k, v = jnp.nan_to_num(k), jnp.nan_to_num(v)
  want = attention(q[:, None], k, v, mask[:, None])[:, 0]
  got = decode_attention(q, k, v, mask, tiles=SMALL, interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", [attention, token_order_attention, head_order_attention],
                         ids=["backend's", "token-order", "head-order"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_model_attention_matches_the_reference_token_by_token(dtype, form):
  """The model's `attention` over several query tokens (a prompt: each token its own causal
  mask, rows left-padded) equals the f32 reference run one token at a time, in both forms
  (the CPU's and the GPU's)."""
  batch, tokens, slots, kv_heads, groups, head_dim = 2, 5, 37, 3, 3, 24
  keys = jax.random.split(jax.random.key(11), 3)
  q = jax.random.normal(keys[0], (batch, tokens, kv_heads * groups, head_dim)).astype(dtype)
  k, v = (jax.random.normal(kk, (batch, slots, kv_heads, head_dim)).astype(dtype)
          for kk in keys[1:])
  pads, ends = np.array([0, 4]), np.array([slots, slots - 2])
  slot = np.arange(slots)
  last = ends[:, None] - tokens + np.arange(tokens)  # token t reads up to slot last[b, t]
  mask = jnp.asarray((slot >= pads[:, None, None]) & (slot <= last[..., None]))
  got = jax.jit(form)(q, k, v, mask)
  assert got.shape == q.shape and got.dtype == dtype
  want = jnp.stack([decode_attention_reference(q[:, t], k, v, mask[:, t])
                    for t in range(tokens)], axis=1)
  err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
  assert err <= TOL[dtype] * float(jnp.max(jnp.abs(want))), err


def test_window_widths_are_eighths_of_at_least_64_slots():
  assert window_widths(512) == (64, 128, 192, 256, 320, 384, 448, 512)
  assert window_widths(150) == (64, 128, 150)
  assert window_widths(1000) == (125, 250, 375, 500, 625, 750, 875, 1000)
  assert window_widths(40) == (40,)


@pytest.mark.parametrize("slots, tokens, pads, ends", [
    (150, 1, [0, 7], [40, 10]),   # every row inside the first window (64 of 150)
    (150, 1, [0, 3], [70, 149]),  # the longest row decides: the whole buffer
    (300, 3, [2], [130]),         # three queries (a prompt's tail), a window in the middle
    (40, 1, [0], [40]),           # at most 64 slots: one window, plain attention
])
def test_windowed_attention_reads_only_the_written_part(slots, tokens, pads, ends):
  """`windowed_attention` equals `attention`, and never reads past its window: every slot
  after the window the mask needs holds NaN, which would reach the result if it were read."""
  kq, kk, kv = jax.random.split(jax.random.key(slots + tokens), 3)
  batch, kv_heads, groups, head_dim = len(pads), 2, 3, 16
  q = jax.random.normal(kq, (batch, tokens, kv_heads * groups, head_dim))
  k = jax.random.normal(kk, (batch, slots, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, slots, kv_heads, head_dim))
  s = np.arange(slots)
  mask = jnp.asarray(np.broadcast_to(((s >= np.asarray(pads)[:, None])
                                      & (s < np.asarray(ends)[:, None]))[:, None],
                                     (batch, tokens, slots)))
  want = attention(q, k, v, mask)
  width = min(w for w in window_widths(slots) if w >= max(ends))
  outside = (s >= width)[None, :, None, None]
  got = jax.jit(windowed_attention)(q, jnp.where(outside, jnp.nan, k),
                                    jnp.where(outside, jnp.nan, v), mask)
  assert not bool(jnp.isnan(got).any()), "a slot past the window was read"
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_entry_point_picks_xla_off_the_gpu_and_names_bad_input():
  q, k, v, mask = _problem(3, 2, 20, 1, 2, 16, jnp.float32, [0, 0], [20, 20])
  if jax.default_backend() != "gpu":
    out = da.decode_attention(q, k, v, mask)  # auto: the XLA formulation here
    np.testing.assert_allclose(np.asarray(out), np.asarray(decode_attention_reference(
        q, k, v, mask)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'triton' cannot run this call: .*CUDA GPU"):
      da.decode_attention(q, k, v, mask, backend="triton")
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    da.decode_attention(q, k, v, mask, backend="cuda")
  with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
    decode_attention(q[:, :1], jnp.concatenate([k, k], 2), jnp.concatenate([v, v], 2), mask,
                     interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"mask has shape \(2, 19\)"):
    decode_attention(q, k, v, mask[:, 1:], interpret=INTERPRET)


@pytest.mark.parametrize("heads, kv_heads", [(32, 32), (32, 8)])
def test_lowers_to_triton_for_cuda_on_any_machine(heads, kv_heads):
  """The kernel's Triton lowering (every op it uses) is built on the CPU too: a 7B layer's
  shapes, Llama's groups of one and Mistral's of four, bf16."""
  q = jax.ShapeDtypeStruct((2, heads, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, kv_heads, 128), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((2, 512), jnp.bool_)
  fn = jax.jit(lambda q, k, v, m: decode_attention(q, k, v, m, interpret=False))
  text = fn.trace(q, kv, kv, mask).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text and "decode_attention" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch, rows, slots, width, kv_heads, groups, head_dim, pads, writes", [
    (1, 1, 37, 37, 2, 1, 24, [0], [20]),                # batch 1, groups of one, hd/2 = 12
    (3, 4, 50, 50, 2, 4, 32, [0, 5, 11], [49, 33, 20]),  # Mistral-like groups, an extra row
    (2, 2, 70, 48, 1, 3, 16, [0, 0], [9, 41]),          # reads only the first 48 slots
    (2, 2, 16, 16, 4, 2, 64, [0, 3], [0, 16]),          # first slot; a slot past the buffer
])
def test_append_rotates_writes_and_attends(dtype, batch, rows, slots, width, kv_heads, groups,
                                           head_dim, pads, writes):
  """The appending kernel against its f32 reference: the new key and value land in their slot
  (and nowhere else), the output matches, and no slot a row may not read, nor the slot being
  written (stale NaN there), reaches the result."""
  ks = jax.random.split(jax.random.key(batch * slots + groups), 7)
  hq = kv_heads * groups
  q = jax.random.normal(ks[0], (batch, hq, head_dim), dtype)
  k_new = jax.random.normal(ks[1], (batch, kv_heads, head_dim), dtype)
  v_new = jax.random.normal(ks[2], (batch, kv_heads, head_dim), dtype)
  k_buf = jax.random.normal(ks[3], (rows, slots, kv_heads, head_dim), dtype)
  v_buf = jax.random.normal(ks[4], (rows, slots, kv_heads, head_dim), dtype)
  angles = jax.random.uniform(ks[5], (batch, head_dim // 2), jnp.float32, 0, 6.3)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  slot = jnp.asarray(writes, jnp.int32)
  s = np.arange(width)[None]
  mask = jnp.asarray((s >= np.asarray(pads)[:, None]) & (s <= np.asarray(writes)[:, None]))
  readable = np.zeros((rows, slots), bool)
  readable[:batch, :width] = np.asarray(mask)
  stale = ~readable | (np.arange(slots)[None] == np.pad(np.asarray(writes), (0, rows - batch),
                                                        constant_values=-1)[:, None])
  poison = jnp.asarray(stale)[:, :, None, None]
  k_buf, v_buf = jnp.where(poison, jnp.nan, k_buf), jnp.where(poison, jnp.nan, v_buf)
  qkv = jnp.concatenate([x.reshape(batch, -1) for x in (q, k_new, v_new)], axis=1)
  want, _, _ = decode_attention_append_reference(qkv, jnp.nan_to_num(k_buf),
                                                 jnp.nan_to_num(v_buf), slot, mask, cos, sin)
  _, want_k, want_v = decode_attention_append_reference(qkv, k_buf, v_buf, slot, mask, cos, sin)
  splits, _ = split_plan(batch, kv_heads, width, SMALL)
  partials = (jnp.full((batch, kv_heads, splits, groups, head_dim), jnp.nan, jnp.float32),
              jnp.full((batch, kv_heads, splits, groups), jnp.nan, jnp.float32),
              jnp.full((batch, kv_heads, splits, groups), jnp.nan, jnp.float32))
  got, got_k, got_v = decode_attention_append(qkv, k_buf, v_buf, slot, mask, cos, sin,
                                              tiles=SMALL, interpret=INTERPRET, partials=partials)
  assert got.dtype == q.dtype and got.shape == q.shape
  assert not bool(jnp.isnan(got).any()), "NaN: a partial never written or a stale slot read"
  err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
  assert err < TOL[dtype], err
  # The buffers: the new slot as the reference writes it (rounding of the rotation aside), every
  # other slot untouched (NaN compares equal to NaN here).
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for g, w in ((got_k, want_k), (got_v, want_v)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=tol, rtol=tol, equal_nan=True)


def test_append_entry_point_picks_xla_off_the_gpu():
  """The entry point's XLA formulation (what "auto" runs off the GPU) writes the same buffers
  and attends as the reference does."""
  ks = jax.random.split(jax.random.key(9), 4)
  qkv = jax.random.normal(ks[0], (2, 8 * 16))  # 4 query heads, 2 KV heads of 16
  k_buf = jax.random.normal(ks[1], (2, 20, 2, 16))
  v_buf = jax.random.normal(ks[2], (2, 20, 2, 16))
  angles = jax.random.uniform(ks[3], (2, 8), jnp.float32, 0, 6.3)
  slot = jnp.asarray([5, 19], jnp.int32)
  mask = jnp.arange(20)[None, :] <= slot[:, None]
  want = decode_attention_append_reference(qkv, k_buf, v_buf, slot, mask, jnp.cos(angles),
                                           jnp.sin(angles))
  backend = "xla" if jax.default_backend() != "gpu" else "auto"
  got = da.decode_attention_append(qkv, k_buf, v_buf, slot, mask, jnp.cos(angles),
                                   jnp.sin(angles), backend=backend)
  err = float(jnp.abs(got[0] - want[0]).max() / jnp.abs(want[0]).max())
  assert err < TOL[jnp.float32], err
  for g, w in zip(got[1:], want[1:]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-6)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="'triton' cannot run this call: .*CUDA GPU"):
      da.decode_attention_append(qkv, k_buf, v_buf, slot, mask, angles, angles,
                                 backend="triton")


def test_append_names_bad_shapes():
  qkv = jnp.zeros((2, 8 * 16))  # 4 query heads, 2 KV heads of 16
  buf = jnp.zeros((2, 20, 2, 16))
  slot, mask, cs = jnp.zeros((2,), jnp.int32), jnp.ones((2, 20), bool), jnp.zeros((2, 8))
  with pytest.raises(ValueError, match=r"expected qkv \[B, \(Hq \+ 2 Hkv\) \* hd\]"):
    decode_attention_append(qkv[:, :-8], buf, buf, slot, mask, cs, cs, interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"mask \(2, 21\)"):
    decode_attention_append(qkv, buf, buf, slot, jnp.ones((2, 21), bool), cs, cs,
                            interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"cos \(2, 7\)"):
    decode_attention_append(qkv, buf, buf, slot, mask, cs[:, 1:], cs, interpret=INTERPRET)


@pytest.mark.parametrize("heads, kv_heads", [(32, 32), (32, 8)])
def test_append_lowers_to_triton_for_cuda_on_any_machine(heads, kv_heads):
  qkv = jax.ShapeDtypeStruct((2, (heads + 2 * kv_heads) * 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, kv_heads, 128), jnp.bfloat16)
  slot = jax.ShapeDtypeStruct((2,), jnp.int32)
  mask = jax.ShapeDtypeStruct((2, 512), jnp.bool_)
  cs = jax.ShapeDtypeStruct((2, 64), jnp.float32)
  fn = jax.jit(lambda *a: decode_attention_append(*a, interpret=False))
  text = fn.trace(qkv, kv, kv, slot, mask, cs, cs).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "triton" in text and "decode_attention_append" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch, slots, heads, head_dim, rank, layer, writes, block_r", [
    (1, 40, 3, 16, 24, None, [17], 128),   # one trip, its columns past R masked
    (1, 40, 3, 16, 40, None, [17], 16),    # a loop of 3 trips, the last one partial
    (2, 24, 2, 32, 8, 1, [0, 23], 128),     # stacked B read at a layer; first and last slot
])
def test_append_adds_the_qkv_expert_delta(dtype, batch, slots, heads, head_dim, rank, layer,
                                          writes, block_r):
  """With `low_rank` the kernel adds each projection's expert delta (read from the shrink
  columns after the heads) before it rotates, writes and attends: against the f32 reference,
  the new key and value as the reference writes them, and a delta that matters."""
  from pallas_kernels.decode_attention.triton import QkvLowRank

  ks = jax.random.split(jax.random.key(slots * rank), 6)
  proj = 3 * heads * head_dim
  qkv = jax.random.normal(ks[0], (batch, proj + 3 * rank), dtype)
  k_buf = jax.random.normal(ks[1], (batch, slots, heads, head_dim), dtype)
  v_buf = jax.random.normal(ks[2], (batch, slots, heads, head_dim), dtype)
  angles = jax.random.uniform(ks[3], (batch, head_dim // 2), jnp.float32, 0, 6.3)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  gates = jax.random.uniform(ks[4], (batch, rank)) * (jax.random.uniform(ks[5], (batch, rank))
                                                      < 0.5)
  lead = () if layer is None else (3,)
  b_t = (jax.random.normal(ks[5], (*lead, proj, rank)) / 3).astype(dtype)
  low = QkvLowRank(gates, b_t)
  slot = jnp.asarray(writes, jnp.int32)
  mask = jnp.arange(slots)[None, :] <= slot[:, None]
  want, want_k, want_v = decode_attention_append_reference(qkv, k_buf, v_buf, slot, mask, cos,
                                                           sin, low, layer)
  plain, _, _ = decode_attention_append_reference(qkv[:, :proj], k_buf, v_buf, slot, mask, cos,
                                                  sin)
  splits, _ = split_plan(batch, heads, slots, SMALL)
  partials = (jnp.full((batch, heads, splits, 1, head_dim), jnp.nan, jnp.float32),
              jnp.full((batch, heads, splits, 1), jnp.nan, jnp.float32),
              jnp.full((batch, heads, splits, 1), jnp.nan, jnp.float32))
  tiles = dataclasses.replace(SMALL, delta_block_r=block_r)
  got, got_k, got_v = decode_attention_append(qkv, k_buf, v_buf, slot, mask, cos, sin, low,
                                              layer=layer, tiles=tiles, interpret=INTERPRET,
                                              partials=partials)
  assert not bool(jnp.isnan(got).any()), "NaN: a partial never written"
  scale = float(jnp.abs(want).max())
  err = float(jnp.abs(got.astype(jnp.float32) - want).max()) / scale
  assert err < TOL[dtype] * 2, err
  assert float(jnp.abs(plain - want).max()) / scale > 5 * TOL[dtype], "the delta is too small"
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for g, w in ((got_k, want_k), (got_v, want_v)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=tol, rtol=tol)
  # The entry point's XLA formulation (the library's rounding) agrees too.
  xla = da.decode_attention_append(qkv, k_buf, v_buf, slot, mask, cos, sin, low, layer=layer,
                                   backend="xla")
  assert float(jnp.abs(xla[0].astype(jnp.float32) - want).max()) / scale < TOL[dtype] * 2


def test_append_with_delta_names_grouped_heads_and_bad_shapes():
  from pallas_kernels.decode_attention.triton import QkvLowRank

  qkv = jnp.zeros((2, 8 * 16 + 3 * 4))  # 4 query heads, 2 KV heads of 16; rank 4
  buf = jnp.zeros((2, 20, 2, 16))
  slot, mask, cs = jnp.zeros((2,), jnp.int32), jnp.ones((2, 20), bool), jnp.zeros((2, 8))
  low = QkvLowRank(jnp.zeros((2, 4)), jnp.zeros((128, 4)))
  with pytest.raises(ValueError, match="expected as many query as KV heads"):
    decode_attention_append(qkv, buf, buf, slot, mask, cs, cs, low, interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"expected \[96, R\] \(q, k and v of as many"):
    da.decode_attention_append(qkv, buf, buf, slot, mask, cs, cs, low, backend="xla")
  with pytest.raises(ValueError, match="delta_block_r 24: expected a power of two"):
    decode_attention_append(qkv[:, :6 * 16 + 12], jnp.zeros((2, 20, 2, 16)),
                            jnp.zeros((2, 20, 2, 16)), slot, mask, cs, cs,
                            QkvLowRank(jnp.zeros((2, 4)), jnp.zeros((96, 4))),
                            tiles=Tiles(delta_block_r=24), interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"gates \[2, R\] and b_t \[96, R\]"):
    decode_attention_append(jnp.zeros((2, 96 + 12)), jnp.zeros((2, 20, 2, 16)),
                            jnp.zeros((2, 20, 2, 16)), slot, mask, cs, cs,
                            QkvLowRank(jnp.zeros((2, 4)), jnp.zeros((95, 4))),
                            interpret=INTERPRET)


@pytest.mark.parametrize("stacked", [False, True])
def test_append_with_delta_lowers_to_triton_for_cuda_on_any_machine(stacked):
  from pallas_kernels.decode_attention.triton import QkvLowRank

  qkv = jax.ShapeDtypeStruct((1, 3 * 32 * 128 + 3 * 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 512, 32, 128), jnp.bfloat16)
  slot = jax.ShapeDtypeStruct((1,), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 512), jnp.bool_)
  cs = jax.ShapeDtypeStruct((1, 64), jnp.float32)
  low = QkvLowRank(jax.ShapeDtypeStruct((1, 128), jnp.float32),
                   jax.ShapeDtypeStruct((32,) * stacked + (3 * 32 * 128, 128), jnp.bfloat16))
  fn = jax.jit(lambda *a: decode_attention_append(*a, layer=4 if stacked else None,
                                                  interpret=False))
  text = fn.trace(qkv, kv, kv, slot, mask, cs, cs, low).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "triton" in text and "decode_attention_append" in text


@pytest.mark.parametrize("mode, per_layer", [("pregated", False), ("pregated", True),
                                             ("lora", False), ("layerwise", False)])
def test_packed_decode_with_the_delta_in_the_kernel_equals_xla(mode, per_layer):
  """The packed path leaving q, k and v's expert delta to the appending kernel gives the decode
  steps' logits and cache of the path adding it in XLA (both through the kernel, the Pallas
  interpreter on the CPU); layer-wise routing declines (one router per module)."""
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig
  from adafuse_jax.model import KVCache, LlamaModel
  from adafuse_jax.model.layers import ATTENTION
  from adafuse_jax.paths import registry
  from adafuse_jax.paths.packed import PackedRuntime, pack
  from tests.conftest import tiny_config

  model = LlamaModel(tiny_config(kv_heads=6), seed=4, layout="stacked")  # no grouped heads
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, per_layer_gates=per_layer)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True)
  packed = pack(model, adapters)
  thresholds = registry.get("packed").thresholds
  attend = ATTENTION["pallas-append"]

  def decode(in_kernel):
    cache = KVCache.create(model.cfg, 2, 6, model.dtype)
    runtime = None
    out = []
    for token in ([[5], [9]], [[17], [2]]):  # two decode steps
      runtime = PackedRuntime(adapters, thresholds, packed=packed, qkv_in_attention=in_kernel)
      parts = []
      original = runtime.qkv_parts

      def wrapped(layer, x, original=original, parts=parts):
        handed = original(layer, x)
        parts.append(handed is not None)
        return handed

      runtime.qkv_parts = wrapped
      logits, cache = model(jnp.asarray(token, jnp.int32), cache, linear=runtime,
                            attend_fn=attend)
      out.append((logits, parts))
    return out, cache

  (got, got_cache), (want, want_cache) = decode(True), decode(False)
  for (g, handed), (w, declined) in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)
    # Asked at every layer of a decode step; the kernel took the delta unless routing per module.
    assert handed == [mode != "layerwise"] * model.cfg.layers
    assert declined == [False] * model.cfg.layers
  for g, w in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
