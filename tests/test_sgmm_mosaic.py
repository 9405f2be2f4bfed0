"""The Mosaic GPU switch (pallas_kernels/sgmm/mosaic.py) and how the SGMM entry point picks it.

The Pallas interpreter does not run Mosaic GPU kernels, so on the CPU the kernel is traced and
lowered for CUDA (which type-checks every layout, swizzle and copy); on a GPU it is run and
compared with the f32 reference of `pallas_kernels.sgmm.reference`, on shapes that are not multiples of
the tiles, with poisoned outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sgmm.mosaic import switch_weights_mosaic
from pallas_kernels.sgmm.reference import switch_weights_reference

ON_GPU = jax.default_backend() == "gpu"
SHAPES = [(2, 200, 320), (2, 136, 192)]  # rows: any; columns: multiples of 64, not of the tile


def operands(seed: int, num_experts: int, rank: int, k: int, dtype=jnp.bfloat16, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  ws = [jnp.asarray(rng.normal(size=s) * 0.05, dtype) for s in shapes]
  a = [jnp.asarray(rng.normal(size=(s[0], s[1], num_experts, rank)) * 0.1, dtype) for s in shapes]
  b = [jnp.asarray(rng.normal(size=(s[0], num_experts, rank, s[2])) * 0.1, dtype) for s in shapes]
  experts = jnp.asarray(rng.choice(num_experts, k, replace=False), jnp.int32)
  coefs = jnp.asarray(rng.uniform(0.2, 1.0, (shapes[0][0], k)), jnp.float32)
  return ws, a, b, experts, coefs


def _can_lower_mosaic_gpu() -> bool:
  """Whether this jaxlib lowers a trivial Mosaic GPU kernel for CUDA (a CPU-only install may
  not ship the Mosaic GPU dialects; then the kernel's own lowering cannot be checked here)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def body(x_ref, o_ref):
    o_ref[...] = x_ref[...]

  try:
    f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((128,), jnp.float32))
    jax.jit(f).trace(jnp.zeros((128,), jnp.float32)).lower(lowering_platforms=("cuda",))
  except Exception:  # noqa: BLE001 - any failure here means "this install cannot lower it"
    return False
  return True


def test_lowers_for_cuda():
  if not _can_lower_mosaic_gpu():
    pytest.skip("this jaxlib cannot lower Mosaic GPU kernels for CUDA")
  ws, a, b, experts, coefs = operands(0, 4, 16, 2)
  lowered = jax.jit(switch_weights_mosaic).trace(ws, a, b, experts, coefs, True, ws).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1  # one launch for both segments


@pytest.mark.parametrize("bad, match", [
    (dict(dtype=jnp.float32), "bf16 or f16"),
    (dict(rank=48), "expert columns"),
    (dict(columns=100), "columns are not a multiple"),
])
def test_unsupported_inputs_are_named(bad, match):
  shapes = [(2, 64, bad.get("columns", 128))]
  ws, a, b, experts, coefs = operands(1, 4, bad.get("rank", 16), 2, bad.get("dtype", jnp.bfloat16),
                                      shapes)
  with pytest.raises(ValueError, match=match):
    switch_weights_mosaic(ws, a, b, experts, coefs, True, ws)


def test_incremental_form_is_refused():
  ws, a, b, experts, coefs = operands(1, 4, 16, 2)
  with pytest.raises(ValueError, match="pristine base"):
    switch_weights_mosaic(ws, a, b, experts, coefs)


@pytest.mark.skipif(not ON_GPU, reason="runs Mosaic GPU kernels: needs an NVIDIA Hopper GPU")
@pytest.mark.parametrize("num_experts, rank, k", [(4, 16, 1), (8, 16, 2), (4, 32, 2), (1, 16, 1)])
def test_matches_reference_on_gpu(num_experts, rank, k):
  ws, a, b, experts, coefs = operands(2, num_experts, rank, k)
  base = [w.copy() for w in ws]
  want = switch_weights_reference(ws, a, b, experts, coefs, True, base)
  got = switch_weights_mosaic([jnp.full_like(w, jnp.nan) for w in ws], a, b, experts, coefs,
                              True, base)  # poisoned: every element must be written
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=2e-2, rtol=2e-2)  # bf16 outputs: ~3 significant digits
  unchanged = switch_weights_mosaic([w.copy() for w in ws], a, b, experts, coefs, False, base)
  for u, w in zip(unchanged, ws):
    np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(w, np.float32))


@pytest.mark.skipif(not ON_GPU, reason="runs Mosaic GPU kernels: needs an NVIDIA Hopper GPU")
def test_no_drift_after_many_switches_on_gpu():
  # Each switch rebuilds from the pristine base: after 500 random switches the weights are
  # bit-identical to one switch to the last experts and gates.
  ws, a, b, _, _ = operands(3, 8, 16, 2)
  base = [w.copy() for w in ws]
  rng = np.random.default_rng(4)
  current = [w.copy() for w in ws]
  for _ in range(500):
    experts = jnp.asarray(rng.choice(8, 2, replace=False), jnp.int32)
    coefs = jnp.asarray(rng.uniform(0.2, 1.0, (SHAPES[0][0], 2)), jnp.float32)
    current = switch_weights_mosaic(current, a, b, experts, coefs, True, base)
  once = switch_weights_mosaic([w.copy() for w in ws], a, b, experts, coefs, True, base)
  for c, o in zip(current, once):
    np.testing.assert_array_equal(np.asarray(c, np.float32), np.asarray(o, np.float32))


def test_switch_backend_choice(monkeypatch):
  """`sgmm.backend_for`: auto takes Mosaic GPU on Hopper where its limits allow, else the Triton
  lowering on a GPU, else XLA; a backend named that cannot run is an error naming why."""
  from types import SimpleNamespace

  from pallas_kernels import common, sgmm

  ws = [jnp.zeros((2, 64, 128), jnp.bfloat16)]
  assert sgmm.backend_for(ws, 32) == ("mosaic" if ON_GPU else "xla")
  assert sgmm.backend_for(ws, 32, backend="triton") == "triton"  # interpreted on the CPU
  device = SimpleNamespace(compute_capability="9.0")
  monkeypatch.setattr(common.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(sgmm.jax, "devices", lambda: [device])
  assert sgmm.backend_for(ws, 32) == "mosaic"
  assert sgmm.backend_for(ws, 32, has_base=False) == "triton"  # incremental: Triton only
  assert sgmm.backend_for([jnp.zeros((2, 64, 100), jnp.bfloat16)], 32) == "triton"
  assert sgmm.backend_for([w.astype(jnp.float32) for w in ws], 32) == "triton"
  assert sgmm.backend_for(ws, 128) == "triton"  # K·r past the Mosaic kernel's 64 columns
  device.compute_capability = "8.0"  # an A100: no Mosaic GPU
  assert sgmm.backend_for(ws, 32) == "triton"
  with pytest.raises(ValueError, match="backend 'mosaic' cannot run this call.*Hopper"):
    sgmm.backend_for(ws, 32, backend="mosaic")
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    sgmm.backend_for(ws, 32, backend="cuda")
