"""BGMV: the gathered shrink / expand kernels (pallas_kernels/bgmv) against their f32 reference.

Interpret mode on the CPU, compiled on a GPU. Shapes are not multiples of the tiles, inputs are
fresh random draws, and every output buffer starts as NaN.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bgmv
from pallas_kernels.bgmv.reference import active_experts, gathered_reference
from pallas_kernels.bgmv.triton import (SHARED_MEMORY_BUDGET, Tiles, gathered_expand_matmul,
                                        gathered_shrink, shrink_splits)
from pallas_kernels.common import dot_block
from tests.expert_problems import expert_problem

INTERPRET = jax.default_backend() != "gpu"
SMALL = Tiles(block_n=32, block_k=64, shrink_k=128, min_programs=16)
# dtype -> max error relative to max |reference|.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


_problem = expert_problem


def _check_all(x, w, a, b, experts, gates, num_experts, dtype, tiles=SMALL, scale=0.5):
  m, n = x.shape[0], w.shape[-1]
  layer = w.shape[0] - 1
  ids, count, gmat = active_experts(experts, gates, num_experts)
  h = gathered_shrink(x, a, layer, ids, count, gmat, scale=scale, tiles=tiles, interpret=INTERPRET)
  for g in range(len(a)):
    got = gathered_expand_matmul(x, w, layer, h, b[g], ids, count, group=g, tiles=tiles,
                                 out=jnp.full((m, n), jnp.nan, dtype), interpret=INTERPRET)
    want = gathered_reference(x, w, layer, a[g], b[g], experts, gates, scale)
    assert not bool(jnp.isnan(got).any()), "an output element was never written"
    err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
    assert err < TOL[dtype], (g, err)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m, k, n, num_experts, rank, top_k, layers, groups", [
    (1, 100, 70, 8, 16, 2, 3, 3),      # batch-1 decode, q/k/v-like group, ragged everything
    (5, 300, 130, 4, 4, 1, 2, 2),      # rank 4 (padded to the 16-wide dot), top-1
    (17, 64, 33, 8, 64, 2, 1, 1),      # rows over 16, rank 64
    (64, 96, 40, 64, 16, 4, 2, 1),     # batch 64, 64 experts, top-4: many active slots
    (3, 200, 50, 1, 8, 1, 2, 2),       # a single expert (plain LoRA)
])
def test_matches_reference_on_ragged_shapes(dtype, m, k, n, num_experts, rank, top_k, layers,
                                            groups):
  prob = _problem(m * 7 + k, m, k, n, num_experts, rank, top_k, layers, dtype, groups)
  _check_all(*prob, num_experts, dtype)


def test_per_layer_gates_are_read_at_the_layer():
  prob = _problem(3, 4, 130, 70, 8, 16, 2, 3, jnp.float32, groups=2, per_layer=True)
  _check_all(*prob, 8, jnp.float32)


def test_every_token_on_one_expert_and_empty_slots():
  m, num_experts = 9, 8
  experts = np.tile([[5, 2]], (m, 1))  # 2 active experts in U = min(8, 18) = 8 slots
  prob = _problem(4, m, 90, 45, num_experts, 16, 2, 2, jnp.float32, experts=experts)
  ids, count, _ = active_experts(prob[4], prob[5], num_experts)
  assert int(count[0]) == 2 and ids.shape == (8,) and list(np.asarray(ids[:2])) == [2, 5]
  _check_all(*prob, num_experts, jnp.float32)


def test_default_tiles_and_runtime_layer_under_jit():
  x, w, a, b, experts, gates = _problem(5, 2, 700, 300, 8, 16, 2, 3, jnp.float32, groups=2)
  ids, count, gmat = active_experts(experts, gates, 8)

  @jax.jit
  def step(layer):
    h = gathered_shrink(x, a, layer, ids, count, gmat, scale=2.0, interpret=INTERPRET)
    return gathered_expand_matmul(x, w, layer, h, b[1], ids, count, group=1, interpret=INTERPRET)

  for layer in range(3):
    want = gathered_reference(x, w, layer, a[1], b[1], experts, gates, 2.0)
    chex.assert_trees_all_close(step(jnp.int32(layer)), want, atol=1e-4, rtol=1e-4)


def test_active_experts_gate_matrix():
  experts = jnp.asarray([[3, 1], [1, 0]], jnp.int32)
  gates = jnp.asarray([[0.7, 0.3], [0.6, 0.4]], jnp.float32)
  ids, count, gmat = active_experts(experts, gates, num_experts=6)
  assert int(count[0]) == 3 and list(np.asarray(ids[:3])) == [0, 1, 3]
  np.testing.assert_allclose(np.asarray(gmat[0, :, :3]), [[0.0, 0.3, 0.7], [0.4, 0.6, 0.0]])
  assert float(jnp.abs(gmat[0, :, 3:]).max()) == 0.0


def test_shrink_splits_are_powers_of_two_and_spread_small_steps():
  tiles = Tiles()
  assert shrink_splits(4096, 3, 2, tiles) == 8     # batch 1, q/k/v: 48 programs
  assert shrink_splits(4096, 2, 64, tiles) == 1    # 2 x 64 active experts fill the GPU alone
  for d_in in (100, 4096, 11008):
    s = shrink_splits(d_in, 1, 1, tiles)
    assert s & (s - 1) == 0


def test_bad_shapes_name_the_mismatch():
  x, w, a, b, experts, gates = _problem(6, 2, 64, 32, 4, 8, 2, 2, jnp.float32)
  ids, count, gmat = active_experts(experts, gates, 4)
  with pytest.raises(ValueError, match="K="):
    gathered_shrink(x[:, :63], a, 0, ids, count, gmat, interpret=INTERPRET)
  with pytest.raises(ValueError, match="gmat"):
    gathered_shrink(x, a, 0, ids, count, gmat[:, :1], interpret=INTERPRET)
  with pytest.raises(ValueError, match="decode steps"):
    big = jnp.zeros((65, 64), jnp.float32)
    gathered_shrink(big, a, 0, ids, count, jnp.zeros((1, 65, ids.shape[0])), interpret=INTERPRET)
  h = gathered_shrink(x, a, 0, ids, count, gmat, interpret=INTERPRET)
  with pytest.raises(ValueError, match="b has shape"):
    gathered_expand_matmul(x, w, 0, h, b[0][:, :, :, :31], ids, count, interpret=INTERPRET)
  with pytest.raises(ValueError, match="dtypes must match"):
    gathered_expand_matmul(x, w.astype(jnp.bfloat16), 0, h, b[0], ids, count, interpret=INTERPRET)


@pytest.mark.parametrize("rows", [1, 16, 32, 64])
@pytest.mark.parametrize("d_in, d_out", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_default_tiles_fit_shared_memory(rows, d_in, d_out):
  # Batch 64 with the batch-32 tiles of down asked the H100 for 256 KiB and did not compile.

  for itemsize in (2, 4):
    t = Tiles.get_default(rows, d_in, d_out, itemsize)
    assert t.num_stages * t.block_k * (dot_block(rows) + t.block_n) * itemsize <= SHARED_MEMORY_BUDGET
    assert t.num_stages >= 2 and t.block_k >= 32


def test_entry_points_equal_the_kernels():
  """`bgmv.shrink` / `bgmv.expand_matmul` pick the Triton lowering (interpreted on the CPU) and
  give the reference; an unknown backend is named."""
  x, w, a, b, experts, gates = expert_problem(5, 3, 50, 40, 6, 8, 2, 2, jnp.float32)
  ids, count, gmat = active_experts(experts, gates, 6)
  h = bgmv.shrink(x, a, 1, ids, count, gmat, scale=0.5, tiles=SMALL)
  got = bgmv.expand_matmul(x, w, 1, h, b[0], ids, count, group=0, tiles=SMALL)
  want = gathered_reference(x, w, 1, a[0], b[0], experts, gates, 0.5)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="unknown backend 'mosaic'"):
    bgmv.shrink(x, a, 1, ids, count, gmat, backend="mosaic")


@pytest.mark.parametrize("slot_loop, slot_unroll", [
    ("load", 1), ("registers", 1), ("static", 1),
    ("registers", 2), ("registers", 3), ("static", 2), ("load", 2)])  # 3: a ragged last trip
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m, k, n, num_experts, rank, top_k, layers, groups", [
    (1, 100, 70, 8, 16, 2, 3, 2),     # batch 1, ragged columns
    (17, 64, 130, 64, 64, 4, 2, 1),   # 64 rank-64 experts, top-4: many active slots, P parts
    (32, 96, 45, 16, 8, 2, 1, 3),     # rank 8 (padded to 16), a group of three
    (2, 300, 70, 8, 16, 2, 2, 1),     # K split in two: h holds two f32 partial sums
])
def test_expand_alone_beside_a_base_matmul_matches_reference(dtype, m, k, n, num_experts, rank,
                                                             top_k, layers, groups,
                                                             slot_loop, slot_unroll):
  """`gathered_expand` (the expansion without the base matmul) plus x @ W equals the reference,
  in every form of its slot loop and with several slots per trip (the static loop and the last
  trip of an unrolled one mask the slots past `count`); its partial
  sums start as NaN, so every (strip, part) program must write its own."""
  from pallas_kernels.bgmv.triton import expert_splits, gathered_expand

  x, w, a, b, experts, gates = _problem(m * 3 + n, m, k, n, num_experts, rank, top_k, layers,
                                        dtype, groups)
  layer = layers - 1
  tiles = Tiles(block_n=32, min_programs=12, slot_loop=slot_loop, slot_unroll=slot_unroll)
  ids, count, gmat = active_experts(experts, gates, num_experts)
  h = gathered_shrink(x, a, layer, ids, count, gmat, scale=0.5, tiles=SMALL, interpret=INTERPRET)
  parts = expert_splits(n, ids.shape[0], tiles)
  assert parts > 1 or ids.shape[0] == 1 or -(-n // 32) >= 12
  for g in range(groups):
    poison = jnp.full((parts, h.shape[2], n), jnp.nan, jnp.float32)
    delta = gathered_expand(h, b[g], layer, ids, count, group=g, rows=m, partials=poison,
                            tiles=tiles, interpret=INTERPRET)
    assert delta.shape == (m, n) and delta.dtype == jnp.float32
    assert not bool(jnp.isnan(delta).any()), "a partial sum was never written"
    got = (x @ w[layer]).astype(jnp.float32) + delta
    want = gathered_reference(x, w, layer, a[g], b[g], experts, gates, 0.5)
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert err < TOL[dtype], (g, err)


def test_expand_alone_names_bad_shapes():
  from pallas_kernels.bgmv.triton import gathered_expand

  x, w, a, b, experts, gates = _problem(1, 4, 64, 40, 8, 16, 2, 1, jnp.float32, 1)
  ids, count, gmat = active_experts(experts, gates, 8)
  h = gathered_shrink(x, a, 0, ids, count, gmat, tiles=SMALL, interpret=INTERPRET)
  with pytest.raises(ValueError, match="rows=40 must be in"):
    gathered_expand(h, b[0], 0, ids, count, rows=40, interpret=INTERPRET)
  with pytest.raises(ValueError, match="from gathered_shrink with the same rank"):
    gathered_expand(h, b[0], 0, ids[:2], count, rows=4, interpret=INTERPRET)
  with pytest.raises(ValueError, match="partials must be"):
    gathered_expand(h, b[0], 0, ids, count, rows=4, partials=jnp.zeros((1, 1, 40)),
                    interpret=INTERPRET)
  with pytest.raises(ValueError, match="slot_loop='dynamic'; expected one of"):
    Tiles(slot_loop="dynamic")
  with pytest.raises(ValueError, match="slot_unroll=0; expected 1 to 8"):
    Tiles(slot_unroll=0)


def test_kernels_lower_to_triton_for_cuda_on_any_machine():
  """The Triton lowering of the shrink, the fused expand and the expansion alone (every form of
  its slot loop, and two slots per trip) is built on the CPU too (every op they use): the 7B q/k/v shape at batch 32,
  64 rank-64 experts."""
  from pallas_kernels.bgmv.triton import gathered_expand

  m, k, n, layers, num_experts, rank, slots = 32, 4096, 4096, 2, 64, 64, 64
  bf16 = jnp.bfloat16
  x = jax.ShapeDtypeStruct((m, k), bf16)
  w = jax.ShapeDtypeStruct((layers, k, n), bf16)
  a = jax.ShapeDtypeStruct((layers, k, num_experts, rank), bf16)
  b = jax.ShapeDtypeStruct((layers, num_experts, rank, n), bf16)
  ids = jax.ShapeDtypeStruct((slots,), jnp.int32)
  count = jax.ShapeDtypeStruct((1,), jnp.int32)
  gmat = jax.ShapeDtypeStruct((1, m, slots), jnp.float32)

  def step(x, w, a, b, ids, count, gmat):
    h = gathered_shrink(x, [a], 1, ids, count, gmat)
    return (gathered_expand_matmul(x, w, 1, h, b, ids, count),
            gathered_expand(h, b, 1, ids, count, rows=m),
            *[gathered_expand(h, b, 1, ids, count, rows=m,
                              tiles=Tiles(slot_loop=loop, slot_unroll=unroll))
              for loop, unroll in (("load", 1), ("static", 1), ("registers", 2))])

  text = jax.jit(step).trace(x, w, a, b, ids, count, gmat).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 6  # one Triton custom call per kernel (four expands)
  for name in ("gathered_shrink", "gathered_expand_matmul", "gathered_expand"):
    assert f"func.func private @{name}(" in text
