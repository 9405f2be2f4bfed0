"""The SwiGLU down projection (pallas_kernels/swiglu_down) against its f32 reference and the
library's XLA formulation.

Interpret mode on the CPU, compiled on a GPU. Widths are not multiples of the tiles, inputs are
fresh random draws, and the partial sums start as NaN (every chunk must write every column).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.swiglu_down as sd
from pallas_kernels.swiglu_down import LowRank, swiglu_down_reference, xla_swiglu_down
from pallas_kernels.swiglu_down.triton import Tiles, plan, swiglu_down_partials

INTERPRET = jax.default_backend() != "gpu"
# Max error over the largest output: f32 sums in another order; bf16 rounds the activation.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, dtype, n, inter, cols, rank, gate_rows, layers=None):
  """gu [N, 2I + 2R + 3] (base outputs, gate's and up's shrink, 3 more columns), w [I, C], the
  low-rank delta (None for rank 0); w and B with a leading layer axis when `layers`."""
  ks = jax.random.split(jax.random.key(seed), 5)
  lead = () if layers is None else (layers,)
  gu = (jax.random.normal(ks[0], (n, 2 * inter + 2 * rank + 3)) * 2.0).astype(dtype)
  w = (jax.random.normal(ks[1], (*lead, inter, cols)) / np.sqrt(inter)).astype(dtype)
  if not rank:
    return gu, w, None
  # Gates as a pre-gated step leaves them: most experts' columns 0, the chosen ones scaled.
  gates = jax.random.uniform(ks[3], (n, gate_rows, rank)) * (
      jax.random.uniform(ks[4], (n, gate_rows, rank)) < 0.4)
  b_t = (jax.random.normal(ks[2], (*lead, 2, inter, rank)) / 4).astype(dtype)
  return gu, w, LowRank(gates, b_t)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, inter, cols, rank, gate_rows, layer, tiles", [
    (1, 300, 203, 24, 1, None, Tiles(block_k=64, block_n=64, parts=2)),  # ragged K, C and rank
    (3, 200, 130, 0, 1, 2, Tiles(block_k=32, block_n=32, parts=3)),      # no experts, stacked
    (2, 96, 77, 16, 2, 1, Tiles(block_k=128, block_n=64, parts=1)),      # gates per module
])
def test_matches_reference_on_ragged_shapes(dtype, n, inter, cols, rank, gate_rows, layer,
                                            tiles):
  gu, w, low = _inputs(n * inter + cols, dtype, n, inter, cols, rank, gate_rows,
                       None if layer is None else 3)
  chunks, _ = plan(inter, cols, tiles)
  poisoned = jnp.full((chunks, n, cols), jnp.nan, jnp.float32)
  parts = swiglu_down_partials(gu, w, inter, low, layer=layer, tiles=tiles, interpret=INTERPRET,
                               out=poisoned)
  assert parts.shape == (chunks, n, cols) and parts.dtype == jnp.float32
  assert not bool(jnp.isnan(parts).any()), "a chunk left a column unwritten"
  got = parts.sum(0)
  want = swiglu_down_reference(gu, w, inter, low, layer=layer)
  scale = float(jnp.abs(want).max())
  err = float(jnp.abs(got - want).max()) / scale
  assert err < TOL[dtype], err
  # The library's own formulation, which the kernel replaces in the step, is as close.
  err_xla = float(jnp.abs(xla_swiglu_down(gu, w, inter, low, layer=layer) - want).max()) / scale
  assert err_xla < TOL[dtype], err_xla
  if layer is not None:  # the layer read is the one asked for, not another
    other = swiglu_down_reference(gu, w, inter, low, layer=layer - 1)
    assert float(jnp.abs(got - other).max()) / scale > 10 * TOL[dtype]


def test_expert_delta_changes_the_result():
  """The prologue's expansion is applied: with B zeroed the product is the plain SwiGLU's."""
  gu, w, low = _inputs(7, jnp.float32, 2, 72, 40, 16, 1)
  tiles = Tiles(block_k=32, block_n=32)
  plain = sd.triton.swiglu_down(gu, w, 72, None, tiles=tiles, interpret=INTERPRET)
  zero_b = low._replace(b_t=jnp.zeros_like(low.b_t))
  np.testing.assert_allclose(
      np.asarray(sd.triton.swiglu_down(gu, w, 72, zero_b, tiles=tiles, interpret=INTERPRET)),
      np.asarray(plain), rtol=1e-6, atol=1e-6)
  with_delta = sd.triton.swiglu_down(gu, w, 72, low, tiles=tiles, interpret=INTERPRET)
  assert float(jnp.abs(with_delta - plain).max()) > 1e-2


def test_entry_point_picks_xla_off_the_gpu_and_names_bad_input():
  gu, w, low = _inputs(3, jnp.float32, 2, 40, 24, 8, 1)
  if jax.default_backend() != "gpu":
    np.testing.assert_allclose(np.asarray(sd.swiglu_down(gu, w, 40, low)),
                               np.asarray(xla_swiglu_down(gu, w, 40, low)))
    with pytest.raises(ValueError, match="'triton' cannot run this call: .*CUDA GPU"):
      sd.swiglu_down(gu, w, 40, low, backend="triton")
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    sd.swiglu_down(gu, w, 40, backend="cuda")
  with pytest.raises(ValueError, match=r"expected gu \[N, >= 2 \* I\] and w \[I, C\]"):
    swiglu_down_partials(gu[:, :70], w, 40, interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"\(or \[L, I, C\] with a layer\)"):
    swiglu_down_partials(gu, w, 40, layer=0, interpret=INTERPRET)
  with pytest.raises(ValueError, match=r"expected gates \[2, 1 or 2, R\]"):
    swiglu_down_partials(gu, w, 40, low._replace(gates=low.gates[:, :, :4]), interpret=INTERPRET)
  with pytest.raises(ValueError, match="2R shrink columns from column 90"):
    swiglu_down_partials(gu, w, 40, low, shrink_at=90, interpret=INTERPRET)


@pytest.mark.parametrize("rank", [0, 128])
def test_lowers_to_triton_for_cuda_on_any_machine(rank):
  """The Triton lowering (every op the kernel uses) is built on the CPU too: the 7B MLP's
  shapes, bf16, stacked over 32 layers, with and without the pre-gated experts' delta."""
  bf = jnp.bfloat16
  gu = jax.ShapeDtypeStruct((1, 2 * 11008 + 2 * rank), bf)
  w = jax.ShapeDtypeStruct((32, 11008, 4096 + rank), bf)
  low = None if not rank else LowRank(jax.ShapeDtypeStruct((1, 1, rank), jnp.float32),
                                      jax.ShapeDtypeStruct((32, 2, 11008, rank), bf))
  fn = jax.jit(lambda gu, w, low: swiglu_down_partials(gu, w, 11008, low, layer=5,
                                                       interpret=False))
  text = fn.trace(gu, w, low).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in text and "swiglu_down" in text


@pytest.mark.parametrize("mode, modules, per_layer", [
    ("pregated", "q,k,v,o,gate,up,down", False),  # all 7 modules: gate/up's delta and down's
    ("pregated", "gate,up", True),                # gates per layer, down unadapted
    ("lora", "down", False),                      # down alone: the prologue has no delta
    ("layerwise", "gate,up,down", False),         # one router per module: declines, XLA runs it
])
def test_packed_step_with_the_kernel_equals_xla_module_by_module(mode, modules, per_layer):
  """The packed path's MLP tail through the kernel (the Pallas interpreter on the CPU) gives the
  logits of XLA's kernels module by module, and of the backbone when the pool is empty."""
  from adafuse_jax.adapters.mixture import MixtureOfLoRA
  from adafuse_jax.config import AdapterConfig
  from adafuse_jax.model import KVCache, LlamaModel
  from adafuse_jax.paths import registry
  from adafuse_jax.paths.packed import PackedBackbone, PackedRuntime, pack
  from tests.conftest import tiny_config

  model = LlamaModel(tiny_config(), seed=5, layout="stacked")
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, per_layer_gates=per_layer,
                      modules=tuple(modules.split(",")))
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=2, random_b=True)
  packed = pack(model, adapters)
  calls = []

  def kernel(*args, **kwargs):
    calls.append(kwargs["layer"])
    return sd.triton.swiglu_down(*args, **kwargs, tiles=Tiles(block_k=32, block_n=32),
                                 interpret=INTERPRET)
  tokens = jnp.asarray([[5, 17], [1, 2]], jnp.int32)  # 4 rows: OWN_KERNELS_MAX_ROWS

  def logits(linear, tokens=tokens):
    cache = KVCache.create(model.cfg, 2, tokens.shape[1], model.dtype)
    return model(tokens, cache, all_logits=True, linear=linear)[0]

  thresholds = registry.get("packed").thresholds
  fused = PackedRuntime(adapters, thresholds, packed=packed, mlp=kernel)
  plain = PackedRuntime(adapters, thresholds, packed=packed)
  got, want = logits(fused), logits(plain)
  # Every layer's tail ran in the kernel, except where one router per module declines it.
  assert calls == ([] if mode == "layerwise" else list(range(model.cfg.layers)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)
  # The same routing decisions, in the same order (one for pre-gated, one per module and layer
  # for layer-wise, none for plain LoRA).
  assert len(fused.routes) == len(plain.routes)
  for a, b in zip(fused.routes, plain.routes):
    np.testing.assert_array_equal(np.asarray(a.experts), np.asarray(b.experts))
  # More rows than a decode of a few sequences: XLA's GEMMs (which read each weight once).
  calls.clear()
  logits(PackedRuntime(adapters, thresholds, packed=packed, mlp=kernel),
         jnp.asarray([[5, 17, 3], [1, 2, 3]], jnp.int32))
  assert calls == []
  backbone = pack(model)
  np.testing.assert_allclose(np.asarray(logits(PackedBackbone(backbone, mlp=kernel))),
                             np.asarray(logits(PackedBackbone(backbone))), atol=2e-4, rtol=2e-4)
