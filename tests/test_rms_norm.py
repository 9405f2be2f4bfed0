"""RMSNorm (pallas_kernels/rms_norm) against its f32 reference and the model's formulation.

Interpret mode on the CPU, compiled on a GPU. Feature counts are not powers of two (the tile
is), inputs are fresh random draws, and the output starts as NaN (every row must be written).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adafuse_jax.model.layers import rms_norm as model_rms_norm
from pallas_kernels import rms_norm as rn
from pallas_kernels.rms_norm.reference import rms_norm_reference
from pallas_kernels.rms_norm.triton import rms_norm

INTERPRET = jax.default_backend() != "gpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows, dim", [(1, 576), (3, 100), (32, 4096), (5, 17)])
def test_matches_reference_on_ragged_rows(dtype, rows, dim):
  kx, kw = jax.random.split(jax.random.key(rows * dim))
  x = (jax.random.normal(kx, (rows, dim)) * 3.0).astype(dtype)
  w = (1.0 + 0.2 * jax.random.normal(kw, (dim,))).astype(dtype)
  out = jnp.full((rows, dim), jnp.nan, dtype)
  got = rms_norm(x, w, 1e-5, interpret=INTERPRET, out=out)
  want = rms_norm_reference(x, w, 1e-5)
  assert got.dtype == dtype and got.shape == (rows, dim)
  assert not bool(jnp.isnan(got).any()), "a row never written"
  err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
  assert err < TOL[dtype], err
  # The model's own norm, which the kernel would replace, agrees to the dtype's rounding.
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(model_rms_norm(x, w, 1e-5), np.float32),
                             atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4)


def test_entry_point_picks_xla_off_the_gpu_and_names_bad_input():
  x, w = jnp.ones((2, 8)), jnp.ones((8,))
  if jax.default_backend() != "gpu":
    np.testing.assert_allclose(np.asarray(rn.rms_norm(x, w, 1e-6)), np.ones((2, 8)), rtol=1e-5)
    with pytest.raises(ValueError, match="'triton' cannot run this call: .*CUDA GPU"):
      rn.rms_norm(x, w, 1e-6, backend="triton")
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    rn.rms_norm(x, w, 1e-6, backend="cuda")
  with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \[8\]"):
    rms_norm(x, w[:7], 1e-6, interpret=INTERPRET)


def test_lowers_to_triton_for_cuda_on_any_machine():
  x = jax.ShapeDtypeStruct((32, 4096), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  fn = jax.jit(lambda x, w: rms_norm(x, w, 1e-5, interpret=False))
  text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text and "rms_norm" in text
