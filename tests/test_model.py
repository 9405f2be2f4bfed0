"""The decoder against independent references: numpy forward, full-sequence forward, perplexity."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from adafuse_jax.generation import Generator
from adafuse_jax.model import KVCache, LlamaModel
from adafuse_jax.weights import default_model_path
from tests import numpy_reference
from tests.conftest import tiny_config

# fp32, no BOS, first 2048 tokens of the GPL-3 text: the right RoPE pairing gives 19.7, the
# wrong pairings 600-700 (docs/correctness.md).
PPL_GPL3 = 19.7


def full_logits(model: LlamaModel, tokens: np.ndarray) -> jax.Array:
  """Logits [B, T, V] of a whole sequence in one (jitted) forward pass."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, tokens):
    m = nnx.merge(graphdef, params)
    cache = KVCache.create(m.cfg, tokens.shape[0], tokens.shape[1], m.dtype)
    return m(tokens, cache, all_logits=True)[0]

  return run(params, jnp.asarray(tokens))


def test_perplexity_on_gpl3_matches_reference(default_model, gpl3_text):
  tok, model = default_model.tokenizer, default_model.model
  ids = np.asarray(tok.encode(gpl3_text)[:2048])
  assert len(ids) == 2048

  logits = full_logits(model, ids[None])[0, :-1]
  lp = jax.nn.log_softmax(logits)
  ppl = float(jnp.exp(-jnp.take_along_axis(lp, jnp.asarray(ids[1:, None]), axis=-1).mean()))
  assert abs(ppl - PPL_GPL3) / PPL_GPL3 < 0.01, ppl


def test_matches_independent_numpy_forward_on_real_weights(default_model, gpl3_text):
  cfg, model = default_model.model.cfg, default_model.model
  tokens = np.asarray(default_model.tokenizer.encode(gpl3_text)[100:112])
  w = numpy_reference.read_gguf(default_model_path(), cfg.layers)
  ref = numpy_reference.forward(tokens, w, layers=cfg.layers, heads=cfg.heads,
                                kv_heads=cfg.kv_heads, eps=cfg.rms_eps, base=cfg.rope_base,
                                interleaved=True, tied=True)
  got = np.asarray(full_logits(model, tokens[None])[0])
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert rel < 1e-4, rel
  np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("layout", ["stacked", "list"])
def test_kv_cache_decode_matches_full_forward_per_position(layout):
  cfg = tiny_config()
  model = LlamaModel(cfg, seed=3, layout=layout)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)
  want = np.asarray(full_logits(model, tokens))
  # Prefill 5 tokens, then decode the rest one at a time through the compiled steps.
  gen = Generator(model)
  cache = gen.new_cache(2, 32)
  key = jax.random.key(0)
  _, logits, cache, _ = gen.forward(jnp.asarray(tokens[:, :5]), cache, key)
  got = [np.asarray(logits)]
  for t in range(5, 13):
    _, logits, cache, _ = gen.forward(jnp.asarray(tokens[:, t:t + 1]), cache, key)
    got.append(np.asarray(logits))
  chex.assert_trees_all_close(np.stack(got, axis=1), want[:, 4:], atol=1e-5, rtol=1e-5)


def test_real_model_cached_decode_matches_full_forward(default_model, gpl3_text):
  model = default_model.model
  tokens = np.asarray(default_model.tokenizer.encode(gpl3_text)[:10])[None]
  want = np.asarray(full_logits(model, tokens))[0]
  gen = Generator(model)
  cache = gen.new_cache(1, 128)
  key = jax.random.key(0)
  _, logits, cache, _ = gen.forward(jnp.asarray(tokens[:, :4]), cache, key)
  got = [np.asarray(logits)[0]]
  for t in range(4, 10):
    _, logits, cache, _ = gen.forward(jnp.asarray(tokens[:, t:t + 1]), cache, key)
    got.append(np.asarray(logits)[0])
  np.testing.assert_allclose(np.stack(got), want[3:], atol=2e-4, rtol=1e-4)


def test_left_padding_does_not_change_logits():
  cfg = tiny_config()
  model = LlamaModel(cfg, seed=1)
  tokens = np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 7)).astype(np.int32)
  want = np.asarray(full_logits(model, tokens))[0, -1]
  padded = np.concatenate([np.zeros((1, 5), np.int32), tokens], axis=1)
  gen = Generator(model)
  _, got, _, _ = gen.forward(jnp.asarray(padded), gen.new_cache(1, 16, pad=[5]), jax.random.key(0))
  np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-5, rtol=1e-5)


def test_layouts_agree_and_stacked_view():
  cfg = tiny_config()
  a, b = LlamaModel(cfg, seed=2, layout="stacked"), LlamaModel(cfg, seed=2, layout="list")
  tokens = np.arange(6, dtype=np.int32)[None]
  chex.assert_trees_all_close(full_logits(a, tokens), full_logits(b, tokens), atol=1e-6)
  chex.assert_trees_all_equal(a.linear_weight("down"), b.linear_weight("down"))
  chex.assert_shape(a.linear_weight("k"), (cfg.layers, cfg.hidden, cfg.kv_dim))
  converted = a.with_layout("list")
  assert converted.layout == "list" and isinstance(converted.q.get_value(), tuple)
  chex.assert_trees_all_equal(converted.stacked_weights(), a.stacked_weights())


def test_bf16_forward_is_finite_and_close_to_f32():
  cfg = tiny_config()
  f32 = LlamaModel(cfg, seed=4, dtype=jnp.float32)
  bf16 = LlamaModel(cfg, seed=4, dtype=jnp.bfloat16)
  tokens = np.arange(9, dtype=np.int32)[None]
  lo, hi = full_logits(bf16, tokens), full_logits(f32, tokens)
  chex.assert_tree_all_finite(lo)
  rel = float(jnp.linalg.norm(lo - hi) / jnp.linalg.norm(hi))
  assert rel < 3e-2, rel


def test_config_validation_errors():
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    tiny_config(heads=5)
  with pytest.raises(ValueError, match="must be positive"):
    tiny_config(layers=0)
  with pytest.raises(ValueError, match="unknown preset"):
    from adafuse_jax.config import preset
    preset("llama-9000")


@pytest.mark.parametrize("rows, n_in, n_out, split", [
    (1, 576, 640, True), (3, 576, 192, True), (1, 1536, 576, False),  # 3.5 MB: not small
    (16, 576, 640, False), (1, 575, 64, False)])  # a prompt's rows; an odd contraction
def test_cpu_matmul_splits_small_products_and_keeps_their_sum(rows, n_in, n_out, split):
  """`layers.matmul`: on the CPU a few rows against a weight under 2 MB go as two
  half-contractions batched in one dot (what the compiled program holds says which), the same
  product as x @ w in f32 (fresh random operands, against float64)."""
  from adafuse_jax.model import layers

  rng = np.random.default_rng(rows * n_in + n_out)
  x = jnp.asarray(rng.standard_normal((1, rows, n_in), np.float32))
  w = jnp.asarray(rng.standard_normal((n_in, n_out), np.float32))
  got = jax.jit(layers.matmul)(x, w)
  chex.assert_shape(got, (1, rows, n_out))
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.sqrt(n_in))
  hlo = jax.jit(layers.matmul).lower(x, w).as_text()
  on_cpu = jax.default_backend() == "cpu"
  assert ("batching_dims" in hlo) == (split and on_cpu)
