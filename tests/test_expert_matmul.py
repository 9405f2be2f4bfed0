"""The fused expert matmul kernel in interpret mode against its f32 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.expert_matmul import Tiles, fused_expert_matmul, fused_expert_matmul_reference

# dtype -> (atol, rtol) of the relative-norm and max-error checks.
TOL = {jnp.float32: (1e-4, 1e-5), jnp.bfloat16: (2e-2, 5e-3)}
SMALL_TILES = Tiles(block_m=16, block_n=32, block_k=64)
# The same tests compile the kernel for real on a GPU and interpret it elsewhere.
INTERPRET = jax.default_backend() != "gpu"


def _inputs(seed, m, k, n, r, layers, dtype):
  rng = np.random.default_rng(seed)
  f = lambda scale, *s: jnp.asarray(rng.normal(size=s) * scale, dtype)  # noqa: E731
  h = jnp.asarray(rng.normal(size=(m, r)), jnp.float32)
  g = jnp.asarray(rng.uniform(size=(m, r)) * (rng.uniform(size=(m, r)) > 0.5), jnp.float32)
  return f(1.0, m, k), f(k ** -0.5, layers, k, n), h, g, f(r ** -0.5, layers, r, n)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m, k, n, r, layers", [
    (1, 100, 70, 32, 3),     # batch-1 decode, nothing a multiple of the tiles
    (5, 300, 130, 8, 2),     # ragged everything, R smaller than the 16-wide dot
    (17, 64, 64, 128, 1),    # M over one row tile, E*r = 8 x 16
    (64, 96, 33, 4, 2),      # batch 64, rank 4, one expert
])
def test_matches_reference_on_ragged_shapes_with_poisoned_output(dtype, m, k, n, r, layers):
  x, w, h, g, b = _inputs(m + k, m, k, n, r, layers, dtype)
  layer = layers - 1
  poisoned = jnp.full((m, n), jnp.nan, dtype)
  got = fused_expert_matmul(x, w, layer, h, g, b, out=poisoned, tiles=SMALL_TILES, interpret=INTERPRET)
  want = fused_expert_matmul_reference(x, w, layer, h, g, b)
  assert not bool(jnp.isnan(got).any()), "an output element was never written"
  atol, rtol = TOL[dtype]
  got32 = got.astype(jnp.float32)
  rel = float(jnp.linalg.norm(got32 - want) / jnp.linalg.norm(want))
  assert rel < max(rtol, 1e-6) * 10, rel
  np.testing.assert_allclose(np.asarray(got32), np.asarray(want), atol=atol * 10, rtol=rtol * 10)


def test_layer_is_a_runtime_value_and_default_tiles_work():
  x, w, h, g, b = _inputs(0, 1, 128, 96, 16, 4, jnp.float32)
  fn = jax.jit(lambda layer: fused_expert_matmul(x, w, layer, h, g, b, interpret=INTERPRET))
  for layer in range(4):
    np.testing.assert_allclose(np.asarray(fn(jnp.int32(layer))),
                               np.asarray(fused_expert_matmul_reference(x, w, layer, h, g, b)),
                               atol=1e-4, rtol=1e-5)


def test_shape_errors_name_the_mismatch():
  x, w, h, g, b = _inputs(0, 2, 32, 16, 8, 2, jnp.float32)
  with pytest.raises(ValueError, match="K="):
    fused_expert_matmul(x[:, :31], w, 0, h, g, b, interpret=INTERPRET)
  with pytest.raises(ValueError, match="b has shape"):
    fused_expert_matmul(x, w, 0, h, g, b[:, :4], interpret=INTERPRET)
  with pytest.raises(ValueError, match="one gate per shrink column"):
    fused_expert_matmul(x, w, 0, h, g[:, :3], b, interpret=INTERPRET)
  with pytest.raises(ValueError, match="dtypes must match"):
    fused_expert_matmul(x.astype(jnp.bfloat16), w, 0, h, g, b, interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"out must be \(2, 16\) float32, got \(2, 15\)"):
    fused_expert_matmul(x, w, 0, h, g, b, out=jnp.zeros((2, 15)), interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"out must be \(2, 16\) float32, got \(2, 16\) bfloat16"):
    fused_expert_matmul(x, w, 0, h, g, b, out=jnp.zeros((2, 16), jnp.bfloat16),
                        interpret=INTERPRET)
