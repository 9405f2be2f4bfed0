"""The segmented (SGMV) prefill kernels and their Triton peer against the f32 reference.

Interpret mode on the CPU, compiled on a GPU. Shapes are not multiples of the tiles, inputs are
fresh random draws, and the expand's output buffer starts as NaN.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sgmv
from pallas_kernels.sgmv import jax_triton as triton_peer
from pallas_kernels.sgmv.reference import (combine, gather_rows, max_tiles, ragged_dot_delta,
                                           segment_table, segmented_reference)
from pallas_kernels.sgmv.triton import Tiles as SegmentTiles
from pallas_kernels.sgmv.triton import segmented_delta, segmented_expand, segmented_shrink
from tests.expert_problems import expert_problem

INTERPRET = jax.default_backend() != "gpu"
SMALL = SegmentTiles(block_m=16, block_k=32, block_n=32)
# dtype -> max error relative to max |reference|.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _problem(*args, **kwargs):
  """As `expert_problem`, without the base weight (the segmented kernels compute deltas)."""
  x, _, a, b, experts, gates = expert_problem(*args, **kwargs)
  return x, a, b, experts, gates


def _rel_err(got, want):
  return float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())


def _check(x, a, b, experts, gates, num_experts, dtype, tiles=SMALL, scale=0.5):
  layer = a[0].shape[0] - 1
  table = segment_table(experts, gates, num_experts, tiles.block_m)
  h = segmented_shrink(gather_rows(x, table), a, layer, table, scale=scale, tiles=tiles,
                       interpret=INTERPRET)
  p = table.row_token.shape[0]
  for g in range(len(a)):
    rows_dtype = h.dtype if h.shape[1] == 1 else b[g].dtype
    rows = segmented_expand(h, b[g], layer, table, group=g, tiles=tiles, interpret=INTERPRET,
                            out=jnp.full((p, b[g].shape[-1]), jnp.nan, rows_dtype))
    used = np.asarray(table.pair_row).reshape(-1)
    assert not bool(jnp.isnan(rows[used]).any()), "a row some token reads was never written"
    got = combine(rows, table)
    want = segmented_reference(x, a[g], b[g], layer, experts, gates, scale)
    chex.assert_shape(got, want.shape)
    assert _rel_err(got, want) < TOL[dtype], (g, _rel_err(got, want))
    ragged = ragged_dot_delta(x, a[g], b[g], layer, experts, gates, scale)
    assert _rel_err(ragged, want) < TOL[dtype], ("ragged_dot", _rel_err(ragged, want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t, k_dim, n, num_experts, rank, top_k, layers, groups", [
    (1, 100, 70, 8, 16, 2, 3, 3),      # batch 1: two segments of one row each
    (37, 100, 70, 5, 12, 2, 2, 2),     # ragged everything, rank 12 (padded to 16)
    (64, 96, 40, 64, 16, 4, 2, 1),     # batch 64, 64 experts, top-4: many short segments
    (130, 70, 33, 8, 64, 2, 1, 1),     # a prompt longer than the tiles, rank 64
    (29, 64, 50, 1, 8, 1, 2, 2),       # a single expert (plain LoRA): one segment
])
def test_matches_reference_on_ragged_shapes(dtype, t, k_dim, n, num_experts, rank, top_k,
                                            layers, groups):
  prob = _problem(t * 5 + k_dim, t, k_dim, n, num_experts, rank, top_k, layers, dtype, groups)
  _check(*prob, num_experts, dtype)


def test_every_token_on_one_expert_leaves_the_other_segments_empty():
  t, num_experts = 45, 8
  experts = np.tile([[6, 1]], (t, 1))
  prob = _problem(2, t, 80, 45, num_experts, 16, 2, 2, jnp.float32, experts=experts)
  table = segment_table(prob[3], prob[4], num_experts, SMALL.block_m)
  sizes = np.asarray(table.group_sizes)
  assert sizes[1] == sizes[6] == t and sizes.sum() == 2 * t
  assert set(np.asarray(table.tile_expert)) == {1, 6, -1}
  _check(*prob, num_experts, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("splits", [2, 4])
def test_shrink_split_over_the_input_dimension(dtype, splits):
  """Partial sums over slices of K (more shrink programs per tile), the last slices ragged or
  past K altogether (K = 100 in 32-wide steps over 4 slices: 32, 32, 32, 4)."""
  import dataclasses

  tiles = dataclasses.replace(SMALL, shrink_splits=splits)
  prob = _problem(11, 37, 100, 70, 5, 12, 2, 2, dtype, groups=2, per_layer=True)
  _check(*prob, 5, dtype, tiles=tiles)
  table = segment_table(prob[3], prob[4], 5, tiles.block_m)
  h = segmented_shrink(gather_rows(prob[0], table), prob[1], 0, table, tiles=tiles,
                       interpret=INTERPRET)
  assert h.shape[1] == splits and h.dtype == jnp.float32
  with pytest.raises(ValueError, match="power of two"):
    segmented_shrink(gather_rows(prob[0], table), prob[1], 0, table, interpret=INTERPRET,
                     tiles=dataclasses.replace(SMALL, shrink_splits=3))


def test_per_layer_gates_are_read_at_the_layer():
  prob = _problem(3, 20, 130, 70, 8, 16, 2, 3, jnp.float32, groups=2, per_layer=True)
  _check(*prob, 8, jnp.float32)


def test_segment_table_groups_pairs_by_expert():
  rng = np.random.default_rng(7)
  t, k, num_experts, block_m = 53, 2, 6, 16
  experts = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(t)])
  gates = rng.uniform(0.1, 1, size=(t, k)).astype(np.float32)
  table = jax.jit(segment_table, static_argnums=(2, 3))(jnp.asarray(experts), jnp.asarray(gates),
                                                        num_experts, block_m)
  tile_expert = np.asarray(table.tile_expert)
  row_token, pair_row = np.asarray(table.row_token), np.asarray(table.pair_row)
  assert tile_expert.shape == (max_tiles(t * k, num_experts, block_m),)
  # Every pair sits in a tile of its own expert, at a row that names its token and gate.
  for i in range(t):
    for j in range(k):
      row = pair_row[i, j]
      assert tile_expert[row // block_m] == experts[i, j]
      assert row_token[row] == i
      assert np.asarray(table.row_gate)[0, row] == gates[i, j]
  # Padding rows name no token and carry no gate; tiles past the segments are marked -1.
  padding = np.setdiff1d(np.arange(row_token.size), pair_row.reshape(-1))
  assert (row_token[padding] == t).all() and (np.asarray(table.row_gate)[0, padding] == 0).all()
  used = tile_expert >= 0
  assert (np.diff(tile_expert[used]) >= 0).all() and not used[np.argmin(used):].any()
  np.testing.assert_array_equal(np.asarray(table.group_sizes),
                                np.bincount(experts.reshape(-1), minlength=num_experts))
  again = segment_table(jnp.asarray(experts), jnp.asarray(gates), num_experts, block_m)
  for u, v in zip(table, again):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_gathered_rows_of_padding_are_zero():
  x = jnp.arange(12.0).reshape(3, 4) + 1
  table = segment_table(jnp.array([[0], [2], [0]], jnp.int32), jnp.ones((3, 1)), 3, 16)
  rows = gather_rows(x, table)
  padding = np.asarray(table.row_token) == 3
  assert (np.asarray(rows)[padding] == 0).all()
  np.testing.assert_array_equal(np.asarray(rows)[np.asarray(table.pair_row)[:, 0]], np.asarray(x))


def test_mismatched_inputs_are_named():
  x, a, b, experts, gates = _problem(1, 9, 40, 30, 4, 8, 2, 2, jnp.float32)
  table = segment_table(experts, gates, 4, SMALL.block_m)
  with pytest.raises(ValueError, match="K=40"):
    segmented_shrink(gather_rows(x, table)[:, :39], a, 0, table, tiles=SMALL, interpret=True)
  with pytest.raises(ValueError, match="block_m"):
    segmented_shrink(gather_rows(x, table), a, 0, table, interpret=True)  # default block_m 64
  h = segmented_shrink(gather_rows(x, table), a, 0, table, tiles=SMALL, interpret=True)
  with pytest.raises(ValueError, match="h has shape"):
    segmented_expand(h, b[0], 0, table, group=1, tiles=SMALL, interpret=True)


def test_segmented_delta_for_a_group_equals_each_module_alone():
  x, a, b, experts, gates = _problem(5, 40, 60, 50, 8, 16, 2, 2, jnp.float32, groups=3)
  table = segment_table(experts, gates, 8, SMALL.block_m)
  deltas = segmented_delta(x, a, b, 1, table, scale=2.0, tiles=SMALL, interpret=INTERPRET)
  for g in range(3):
    want = segmented_reference(x, a[g], b[g], 1, experts, gates, 2.0)
    assert _rel_err(deltas[g], want) < TOL[jnp.float32]


def test_triton_peer_refuses_clearly_where_it_cannot_run():
  ok, why = triton_peer.available()
  if ok:
    pytest.skip("the Triton peer can run here (its GPU test covers it)")
  assert "jax-triton" in why or "GPU" in why
  x, a, b, experts, gates = _problem(1, 9, 40, 30, 4, 8, 2, 2, jnp.float32)
  table = segment_table(experts, gates, 4, SMALL.block_m)
  with pytest.raises(RuntimeError, match="jax-triton|GPU"):
    triton_peer.triton_delta(x, a[0], b[0], 0, table, tiles=SMALL)
  # The entry point names the backend that cannot run and why; auto takes the Pallas kernel.
  with pytest.raises(ValueError, match="backend 'jax-triton' cannot run this call"):
    sgmv.delta(x, a, b, 0, table, tiles=SMALL, backend="jax-triton")


def test_entry_point_equals_the_kernel_and_the_reference():
  x, a, b, experts, gates = _problem(2, 21, 40, 30, 4, 8, 2, 2, jnp.float32)
  table = segment_table(experts, gates, 4, SMALL.block_m)
  got = sgmv.delta(x, a, b, 1, table, scale=0.5, tiles=SMALL)
  for g in range(len(a)):
    assert _rel_err(got[g], segmented_reference(x, a[g], b[g], 1, experts, gates, 0.5)) < 1e-5


@pytest.mark.skipif(not triton_peer.available()[0], reason="needs a GPU and jax-triton")
@pytest.mark.parametrize("dtype", [jnp.bfloat16])
@pytest.mark.parametrize("t, k_dim, n, num_experts, rank", [
    (1, 100, 70, 8, 16), (37, 100, 70, 5, 12), (130, 4096, 4100, 8, 16), (64, 96, 40, 64, 64)])
def test_triton_peer_matches_reference(dtype, t, k_dim, n, num_experts, rank):
  x, a, b, experts, gates = _problem(t + n, t, k_dim, n, num_experts, rank, 2, 2, dtype)
  for tiles in (SMALL, SegmentTiles()):
    table = segment_table(experts, gates, num_experts, tiles.block_m)
    got = jax.jit(lambda x, a, b, tab: triton_peer.triton_delta(x, a, b, 1, tab, scale=0.5,
                                                                tiles=tiles))(x, a[0], b[0], table)
    want = segmented_reference(x, a[0], b[0], 1, experts, gates, 0.5)
    assert _rel_err(got, want) < TOL[dtype]
    pallas = segmented_delta(x, a, b, 1, table, scale=0.5, tiles=tiles)[0]
    assert _rel_err(got, pallas) < TOL[dtype]


def test_segmented_bench_smoke_run_writes_its_report(tmp_path):
  """tools/segmented_bench.py (SGMV beside XLA) on a tiny case (interpreter): every variant that can run here is
  checked against the reference and timed, and the report is valid JSON with a table."""
  import json
  import sys

  sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
  import segmented_bench

  assert segmented_bench.main(["--preset", "smollm2-135m", "--layers", "1", "--tokens", "70",
                               "--configs", "4x8", "--modules", "q", "--steps", "1",
                               "--warmup", "0", "--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / "segmented.json").read_text())
  variants = {r["variant"] for r in report["rows"]}
  assert {"base", "xla-dense", "xla-dense-bias", "pallas", "ragged_dot"} <= variants
  assert all(r["rel_err"] < 5e-2 for r in report["rows"] if r["rel_err"] is not None)
  assert "| 4x8 | q | 70 | 64 / 1 |" in (tmp_path / "segmented.md").read_text()
  assert (tmp_path / "segmented.png").stat().st_size > 0
  with pytest.raises(SystemExit):
    segmented_bench.main(["--configs", "2x8", "--top-k", "3"])  # top-k larger than the pool


@pytest.mark.parametrize("pairs, experts, block_m", [
    (1024, 8, 64),    # 512 tokens, top-2, 8 experts: 128 pairs a segment
    (1024, 64, 16),   # 64 experts: 16 a segment; 64-row tiles would be 75% padding
    (4096, 64, 64),   # 2048 tokens
    (40, 64, 16),     # fewer pairs than experts
    (100, 4, 32),      # 25 a segment
])
def test_tiles_fit_the_mean_segment(pairs, experts, block_m):
  assert SegmentTiles.get_default(pairs, experts).block_m == block_m
