"""Dynamic adapters: expert pools, pre-gating, layer-wise routing, LoRA, aux loss, gradients."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adafuse_jax.adapters.mixture import MixtureOfLoRA, merged_model
from adafuse_jax.config import AdapterConfig
from adafuse_jax.errors import UserError
from adafuse_jax.adapters.pool import AdapterParam
from adafuse_jax.paths import registry
from adafuse_jax.paths.xla import expert_delta, expert_delta_reference
from adafuse_jax.model import KVCache, LlamaModel
from adafuse_jax.adapters.routing import load_balancing_loss, router_stats, top_k_gates
from tests.conftest import tiny_config

TOKENS = np.array([[5, 17, 3, 88, 42, 9, 61, 7], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)


def logits_with(model: LlamaModel, adapters: MixtureOfLoRA | None, tokens=TOKENS):
  cache = KVCache.create(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
  runtime = registry.runtime(adapters) if adapters is not None else None
  kwargs = {"linear": runtime} if runtime is not None else {}
  logits, _ = model(jnp.asarray(tokens), cache, all_logits=True, **kwargs)
  return logits, runtime


@pytest.fixture(scope="module")
def model():
  return LlamaModel(tiny_config(), seed=5, layout="stacked")


@pytest.mark.parametrize("mode, per_layer", [("lora", False), ("layerwise", False),
                                             ("pregated", False), ("pregated", True)])
def test_zero_b_pool_leaves_logits_equal_to_backbone(model, mode, per_layer):
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, per_layer_gates=per_layer)
  base, _ = logits_with(model, None)
  got, _ = logits_with(model, MixtureOfLoRA(model.cfg, cfg, seed=1))
  chex.assert_trees_all_close(got, base, atol=1e-6)


def test_random_pool_changes_logits(model):
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4)
  base, _ = logits_with(model, None)
  got, _ = logits_with(model, MixtureOfLoRA(model.cfg, cfg, seed=1, random_b=True))
  assert float(jnp.abs(got - base).max()) > 1e-2


def test_pregated_with_one_expert_equals_lora(model):
  pre = MixtureOfLoRA(model.cfg, AdapterConfig(mode="pregated", num_experts=1, top_k=1, rank=4),
                      seed=2, random_b=True)
  lora = MixtureOfLoRA(model.cfg, AdapterConfig(mode="lora", rank=4), seed=3)
  nnx.update(lora.pool, nnx.state(pre.pool))
  a, _ = logits_with(model, pre)
  b, _ = logits_with(model, lora)
  chex.assert_trees_all_close(a, b, atol=1e-6)


def test_layerwise_with_pregate_router_everywhere_equals_pregated():
  # One layer whose q, k, v all read the same normed hidden state: layer-wise routers that all
  # equal the pre-gate router must pick the same experts and gates.
  model = LlamaModel(tiny_config(layers=1), seed=6, layout="stacked")
  modules = ("q", "k", "v")
  pre = MixtureOfLoRA(model.cfg, AdapterConfig(mode="pregated", modules=modules, num_experts=5,
                                               rank=3, router_init_std=1.0), seed=4, random_b=True)
  lw = MixtureOfLoRA(model.cfg, AdapterConfig(mode="layerwise", modules=modules, num_experts=5,
                                              rank=3), seed=9)
  nnx.update(lw.pool, nnx.state(pre.pool))
  for m in modules:
    getattr(lw.router, f"w_{m}").set_value(pre.router.w[...][None])
  a, rt_pre = logits_with(model, pre)
  b, rt_lw = logits_with(model, lw)
  chex.assert_trees_all_close(a, b, atol=1e-6)
  assert len(rt_pre.routes) == 1 and len(rt_lw.routes) == 3
  for r in rt_lw.routes:
    chex.assert_trees_all_equal(r.experts, rt_pre.routes[0].experts)


def test_top_k_picks_and_gate_sums():
  logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 3.0, -2.0]])
  experts, gates = top_k_gates(logits, 2)
  assert experts.tolist() == [[1, 3], [0, 1]]
  chex.assert_trees_all_close(gates.sum(-1), jnp.ones(2), atol=1e-6)
  want = jax.nn.softmax(jnp.asarray([3.0, 2.0]))
  chex.assert_trees_all_close(gates[0], want, atol=1e-6)


def test_per_layer_gates_differ_by_layer_but_share_experts(model):
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, per_layer_gates=True,
                      router_init_std=1.0)
  _, rt = logits_with(model, MixtureOfLoRA(model.cfg, cfg, seed=1, random_b=True))
  route = rt.routes[0]
  chex.assert_shape(route.gates, (TOKENS.size, model.cfg.layers, 2))
  chex.assert_trees_all_close(route.gates.sum(-1), jnp.ones((TOKENS.size, model.cfg.layers)),
                              atol=1e-6)
  assert float(jnp.abs(route.gates[:, 0] - route.gates[:, 1]).max()) > 1e-3


@pytest.mark.parametrize("formulation", ["gather", "dense", "gather-rows"])
@pytest.mark.parametrize("n, e", [(1, 6), (3, 6), (40, 6), (1, 64), (3, 64)])
def test_expert_delta_formulations_match_reference(n, e, formulation):
  rng = np.random.default_rng(n)
  d_in, r, d_out, k = 12, 4, 10, 2
  x = jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(d_in, e, r)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(e, r, d_out)), jnp.float32)
  experts = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(n)]), jnp.int32)
  gates = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, k)), jnp.float32))
  a_t = jnp.transpose(a, (1, 2, 0)) if formulation == "gather-rows" else None
  got = expert_delta(x, a, b, experts, gates, a_t=a_t, gather=formulation != "dense")
  want = expert_delta_reference(x, a, b, experts, gates)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


def test_gradients_reach_routers_and_experts_not_the_backbone(model):
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, router_init_std=0.5)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=1, random_b=True)

  def loss_fn(adapters, model):
    logits, rt = logits_with(model, adapters)
    aux = load_balancing_loss(rt.routes[0].logits, rt.routes[0].experts)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]) + 0.01 * aux

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam))(adapters, model)
  flat = dict(nnx.to_flat_state(grads))
  names = {".".join(map(str, k)) for k in flat}
  assert any(n.startswith("router.w") for n in names)
  assert any(n.startswith("pool.A_q") for n in names) and any(n.startswith("pool.B_down") for n in names)
  for k, v in flat.items():
    assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(v)) > 0, k
  # The backbone is frozen: an optimizer over AdapterParam leaves its weights untouched.
  import optax
  before = model.linear_weight("q")
  opt = nnx.Optimizer(adapters, optax.sgd(0.1), wrt=AdapterParam)
  opt.update(adapters, grads)
  chex.assert_trees_all_equal(model.linear_weight("q"), before)


def test_aux_loss_matches_hand_computation():
  logits = jnp.asarray([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 0.0, 1.0]])
  experts = jnp.asarray([[0], [1], [2], [0]])
  p = np.exp(np.asarray(logits))
  p /= p.sum(-1, keepdims=True)
  f = np.array([2, 1, 1]) / 4
  want = 3 * np.sum(f * p.mean(0))
  np.testing.assert_allclose(float(load_balancing_loss(logits, experts)), want, rtol=1e-6)
  stats = router_stats(logits, experts)
  np.testing.assert_allclose(np.asarray(stats["load"]), f, rtol=1e-6)
  assert 0 < float(stats["entropy"]) < np.log(3)


def test_merge_lora_equals_unmerged(model):
  lora = MixtureOfLoRA(model.cfg, AdapterConfig(mode="lora", rank=4), seed=3, random_b=True)
  unmerged, _ = logits_with(model, lora)
  merged, _ = logits_with(merged_model(model, lora), None)
  # f32 of the largest logit: W + AB rounds otherwise than x@W + (x@A)@B, and how far the two
  # drift depends on the compiler's summation order (1.0e-4 at XLA:CPU's default LLVM level,
  # 1.3e-4 at -O0, the test suite's; logits up to 3.1).
  scale = float(jnp.abs(unmerged).max())
  chex.assert_trees_all_close(merged, unmerged, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=9, num_experts=8), "larger than num_experts"),
    (dict(rank=0), "rank=0"),
    (dict(modules=("q", "attn")), "unknown adapted module"),
    (dict(mode="moe"), "unknown mode"),
    (dict(mode="layerwise", per_layer_gates=True), "'pregated' only"),
])
def test_bad_adapter_configs_are_rejected(kwargs, message):
  with pytest.raises(UserError, match=message):
    AdapterConfig(**kwargs)


def test_modules_are_kept_in_model_order():
  assert AdapterConfig(modules=("down", "q", "v")).modules == ("q", "v", "down")


@pytest.mark.parametrize("length", [8, 45], ids=["decode-sized", "prompt"])
@pytest.mark.parametrize("mode, per_layer_gates", [("lora", False), ("pregated", False),
                                                    ("pregated", True), ("layerwise", False)])
def test_pallas_path_equals_xla_path(model, mode, per_layer_gates, length):
  """2 x 8 tokens run the gathered kernels (BGMV); 2 x 45, more than a decode step's tokens, the
  prompt path (SGMV where the pool is wide, here q/k/v/o/gate/up; dense GEMMs for down)."""
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, router_init_std=0.5,
                      per_layer_gates=per_layer_gates)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=8, random_b=True)
  tokens = (jnp.asarray(TOKENS) if length == 8 else
            jnp.asarray(np.random.default_rng(4).integers(0, model.cfg.vocab_size, (2, length))))
  assert registry.THRESHOLDS.is_decode(tokens.size) == (length == 8)
  cache = lambda: KVCache.create(model.cfg, 2, length + 3, model.dtype)  # noqa: E731
  want, _ = model(tokens, cache(), all_logits=True, linear=registry.runtime(adapters))
  got, _ = model(tokens, cache(), all_logits=True, linear=registry.runtime(adapters, "gathered"))
  # Each module agrees to ~1e-7 relative (f32 sums in another order); over a 90-token prompt this
  # random model's activations grow to ~300 (the `down` outputs), which amplifies that to ~1e-3
  # of the logits' scale (routes identical: checked by hand for seeds 8 and 9).
  tol = 1e-4 if length == 8 else 2e-3 * float(jnp.abs(want).max())
  chex.assert_trees_all_close(got, want, atol=tol, rtol=1e-4 if length == 8 else 1e-3)


@pytest.mark.parametrize("mode, per_layer_gates", [("pregated", False), ("pregated", True),
                                                    ("layerwise", False)])
def test_gathered_decode_with_xla_base_equals_xla_path(model, mode, per_layer_gates,
                                                       monkeypatch):
  """A pool wider than `Thresholds.fused_base_max_width` (forced here; a batch above
  `fused_base_max_rows` too) decodes with XLA's base GEMM beside the expansion-only kernel: the
  same logits as path xla."""
  import dataclasses

  from pallas_kernels import bgmv

  from adafuse_jax.paths.gathered import GatheredRuntime

  calls = []
  expand = bgmv.expand
  monkeypatch.setattr(bgmv, "expand", lambda *a, **k: calls.append(1) or expand(*a, **k))

  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, router_init_std=0.5,
                      per_layer_gates=per_layer_gates)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=8, random_b=True)
  wide = dataclasses.replace(registry.THRESHOLDS, fused_base_max_width=0)
  assert not wide.fuses_base(4, 4, 1) and registry.THRESHOLDS.fuses_base(4, 4, 1)
  assert not registry.THRESHOLDS.fuses_base(4, 4, 2)  # two rows take XLA's base too
  tokens = jnp.asarray(TOKENS)
  cache = lambda: KVCache.create(model.cfg, 2, 11, model.dtype)  # noqa: E731
  want, _ = model(tokens, cache(), all_logits=True, linear=registry.runtime(adapters))
  got, _ = model(tokens, cache(), all_logits=True, linear=GatheredRuntime(adapters, wide))
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  assert len(calls) == model.cfg.layers * len(cfg.modules)  # every adapted module took it


@pytest.mark.parametrize("mode", ["pregated", "layerwise"])
def test_gathered_one_row_step_folds_the_base_into_the_expansion(model, mode, monkeypatch):
  """A one-row decode step of a narrow pool (`Thresholds.fuses_base`) runs the base matmul inside
  the Pallas expansion (`bgmv.expand_matmul`), every adapted module, with path xla's logits."""
  from pallas_kernels import bgmv

  calls = []
  expand_matmul = bgmv.expand_matmul
  monkeypatch.setattr(bgmv, "expand_matmul",
                      lambda *a, **k: calls.append(1) or expand_matmul(*a, **k))
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, router_init_std=0.5)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=9, random_b=True)
  assert registry.THRESHOLDS.fuses_base(4, 4, 1)
  tokens = jnp.asarray(TOKENS[:1, :1])
  cache = lambda: KVCache.create(model.cfg, 1, 4, model.dtype)  # noqa: E731
  want, _ = model(tokens, cache(), all_logits=True, linear=registry.runtime(adapters))
  got, _ = model(tokens, cache(), all_logits=True, linear=registry.runtime(adapters, "gathered"))
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  assert len(calls) == model.cfg.layers * len(cfg.modules)


@pytest.mark.parametrize("layout", ["stacked", "list"])
@pytest.mark.parametrize("mode, per_layer_gates, modules", [
    ("lora", False, ("q", "v")), ("pregated", False, ("q", "k", "v", "o", "gate", "up", "down")),
    ("pregated", True, ("k", "up", "down")), ("layerwise", False, ("q", "k", "v", "o", "gate",
                                                                   "up", "down"))])
def test_packed_path_equals_xla_path(model, layout, mode, per_layer_gates, modules):
  from adafuse_jax.paths.packed import pack

  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, router_init_std=0.5,
                      per_layer_gates=per_layer_gates, modules=modules)
  m = model.with_layout(layout)
  adapters = MixtureOfLoRA(m.cfg, cfg, seed=8, random_b=True, layout=layout)
  cache = lambda: KVCache.create(m.cfg, 2, 8, m.dtype)  # noqa: E731
  want_rt = registry.runtime(adapters)
  want, _ = m(jnp.asarray(TOKENS), cache(), all_logits=True, linear=want_rt)
  got_rt = registry.runtime(adapters, "packed", derived=pack(m, adapters))
  got, _ = m(jnp.asarray(TOKENS), cache(), all_logits=True, linear=got_rt)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
  assert len(got_rt.routes) == len(want_rt.routes)
  for a, b in zip(got_rt.routes, want_rt.routes):
    np.testing.assert_array_equal(a.experts, b.experts)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shared", [False, True])
def test_packed_expand_is_the_gated_sum_over_experts(dtype, tol, shared):
  """`expand` on B stored transposed [M, out, E·r] equals Σ_e gate_e · (h_e @ B_e) per module,
  with the gates shared by every module (pre-gated) or per module (layer-wise)."""
  from adafuse_jax.paths.packed import expand, expert_columns

  n, m, e, r, out, scale = 3, 2, 4, 3, 5, 0.5
  keys = jax.random.split(jax.random.key(int(shared)), 3)
  h = jax.random.normal(keys[0], (n, m, e * r), jnp.float32)
  b = jax.random.normal(keys[1], (m, e, r, out), jnp.float32)  # B per module and expert
  dense = jax.nn.relu(jax.random.normal(keys[2], (n, 1 if shared else m, e)))  # some zeros
  b_t = jnp.swapaxes(b.reshape(m, e * r, out), -1, -2).astype(dtype)
  got = expand(h.astype(dtype), expert_columns(dense, r, scale), b_t, dtype)
  hn, bn = np.asarray(h.astype(dtype), np.float64), np.asarray(b.astype(dtype), np.float64)
  gn = np.broadcast_to(np.asarray(dense, np.float64), (n, m, e)) * scale
  want = np.einsum("nme,nmer,mero->nmo", gn, hn.reshape(n, m, e, r), bn)
  assert got.dtype == jnp.float32 and got.shape == (n, m, out)
  np.testing.assert_allclose(np.asarray(got), want, atol=tol * np.abs(want).max(), rtol=tol)


def test_packed_backbone_equals_backbone(model):
  from adafuse_jax.paths.packed import PackedBackbone, pack

  want, _ = logits_with(model, None)
  cache = KVCache.create(model.cfg, 2, 8, model.dtype)
  got, _ = model(jnp.asarray(TOKENS), cache, all_logits=True, linear=PackedBackbone(pack(model)))
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_runtime_needs_packed_weights(model):
  adapters = MixtureOfLoRA(model.cfg, AdapterConfig(mode="lora", rank=4), seed=1)
  with pytest.raises(ValueError, match="packed weights"):
    registry.runtime(adapters, "packed")


def test_unknown_path_is_rejected_and_old_spellings_name_the_new_one(model):
  adapters = MixtureOfLoRA(model.cfg, AdapterConfig(mode="lora", rank=4), seed=1)
  with pytest.raises(UserError, match="unknown path 'cuda'.*xla, packed, gathered, merged"):
    registry.runtime(adapters, "cuda")
  with pytest.raises(UserError, match="'pallas' is now spelled 'gathered'"):
    registry.runtime(adapters, "pallas")


def test_checkpoint_round_trip_and_mismatch_errors(tmp_path, model):
  from adafuse_jax.adapters.io import load_adapters, resolve_adapters, save_adapters
  from adafuse_jax.errors import ModelFileError

  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, per_layer_gates=True)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True)
  save_adapters(tmp_path / "ck", adapters)
  loaded = load_adapters(tmp_path / "ck", model.cfg)
  assert loaded.cfg == cfg
  chex.assert_trees_all_close(logits_with(model, loaded)[0], logits_with(model, adapters)[0])
  with pytest.raises(UserError, match="hidden: checkpoint 48 vs model 64"):
    load_adapters(tmp_path / "ck", model.cfg.replace(hidden=64))
  with pytest.raises(UserError, match="trained for mode 'pregated'"):
    resolve_adapters(str(tmp_path / "ck"), cfg.replace(mode="layerwise", per_layer_gates=False),
                     model.cfg)
  with pytest.raises(UserError, match="needs adapters"):
    resolve_adapters(None, cfg, model.cfg)
  # A damaged checkpoint is rejected with a clear error, from the file digests saved with it,
  # before orbax reads it.
  for f in (tmp_path / "ck" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b"garbage")
  with pytest.raises(ModelFileError, match="under state/ differ from the digests"):
    load_adapters(tmp_path / "ck", model.cfg)
  with pytest.raises(ModelFileError, match="not an adapter checkpoint"):
    load_adapters(tmp_path, model.cfg)


def test_pool_layouts_agree(model):
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, router_init_std=0.5)
  stacked = MixtureOfLoRA(model.cfg, cfg, seed=5, random_b=True, layout="stacked")
  listed = stacked.with_layout("list")
  assert isinstance(listed.pool.A_q.get_value(), tuple)
  chex.assert_trees_all_close(logits_with(model, listed)[0], logits_with(model, stacked)[0],
                              atol=1e-6)


# --- shared expert: one dense LoRA beside the routed experts, folded into the backbone ---

@pytest.mark.parametrize("layout", ["stacked", "list"])
@pytest.mark.parametrize("mode", ["pregated", "layerwise"])
def test_shared_expert_adds_a_plain_lora_and_folds_into_the_backbone(model, layout, mode):
  from adafuse_jax.adapters.mixture import fold_shared

  m = model.with_layout(layout)
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, router_init_std=0.5,
                      shared_rank=3)
  adapters = MixtureOfLoRA(m.cfg, cfg, seed=8, random_b=True, layout=layout)
  # The routed part alone, and the shared expert alone as a rank-3 LoRA of the same scale.
  routed_cfg = cfg.replace(shared_rank=0)
  routed = MixtureOfLoRA(m.cfg, routed_cfg, seed=0, layout=layout)
  for mod in cfg.modules:
    for f in (f"A_{mod}", f"B_{mod}"):
      getattr(routed.pool, f).set_value(getattr(adapters.pool, f).get_value())
  nnx.update(routed.router, nnx.state(adapters.router))
  lora = MixtureOfLoRA(m.cfg, AdapterConfig(mode="lora", rank=3, alpha=cfg.alpha * 3 / 4),
                       seed=0, layout="stacked")
  for mod in cfg.modules:
    sa, sb = adapters.pool.stacked(mod, "S")
    getattr(lora.pool, f"A_{mod}").set_value(sa[:, :, None])
    getattr(lora.pool, f"B_{mod}").set_value(sb[:, None])
  assert lora.cfg.scale == cfg.scale
  with_lora = merged_model(m.with_layout("stacked"), lora).with_layout(layout)

  got, rt = logits_with(m, adapters)
  want, _ = logits_with(with_lora, routed)
  # Folding the LoRA into W rounds differently; the random layer-wise routers amplify that
  # (up to 2e-4 on some XLA:CPU machines, under 1e-4 on others).
  chex.assert_trees_all_close(got, want, atol=5e-4, rtol=1e-3)
  assert float(jnp.abs(got - logits_with(m, routed)[0]).max()) > 1e-2  # the shared part counts

  folded_model, folded = fold_shared(m, adapters)
  assert folded.cfg.shared_rank == 0 and not hasattr(folded.pool, f"SA_{cfg.modules[0]}")
  assert folded_model.layout == layout
  again, _ = logits_with(folded_model, folded)
  chex.assert_trees_all_close(again, got, atol=5e-4, rtol=1e-3)


def test_shared_expert_must_be_folded_before_kernels_and_is_folded_by_generator(model):
  from adafuse_jax.generation import Generator, generate

  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, shared_rank=2,
                      router_init_std=0.5)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=8, random_b=True)
  with pytest.raises(ValueError, match="fold_shared"):
    registry.runtime(adapters, "gathered")
  want, _ = logits_with(model, adapters)
  gen = Generator(model, adapters=adapters, path="packed")
  prompt = [int(t) for t in TOKENS[0]]
  got = generate(gen, [prompt], max_new_tokens=3)
  assert got.tokens[0][0] == int(jnp.argmax(want[0, -1]))


def test_shared_rank_rejected_where_it_means_nothing():
  with pytest.raises(UserError, match="shared_rank"):
    AdapterConfig(mode="lora", shared_rank=4)
  with pytest.raises(UserError, match="shared_rank"):
    AdapterConfig(mode="pregated", shared_rank=-1)


def test_shared_expert_checkpoint_round_trip(tmp_path, model):
  from adafuse_jax.adapters.io import load_adapters, save_adapters

  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, shared_rank=3, router_init_std=0.5)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True)
  loaded = load_adapters(save_adapters(tmp_path / "shared", adapters), model.cfg)
  assert loaded.cfg == cfg
  chex.assert_trees_all_equal(nnx.state(loaded.with_layout("stacked")),
                              nnx.state(adapters.with_layout("stacked")))


# --- tied shared expert: the pool at gate 1 plus its top-k at beta * g ---

def _tied(model, mode="pregated", layout="stacked", beta_seed=5):
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2, router_init_std=0.5,
                      tied_shared=True)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=8, random_b=True, layout=layout)
  for i, mod in enumerate(cfg.modules):
    beta = jax.random.uniform(jax.random.key(beta_seed + i), (model.cfg.layers,), minval=0.5,
                              maxval=1.5)
    getattr(adapters.pool, f"beta_{mod}").set_value(beta)
  return adapters


def _at_beta_zero_and_its_lora(model, mode="pregated"):
  """(a tied pool with every beta 0, the plain LoRA of rank E*r made of its experts' factors)."""
  from adafuse_jax.adapters.mixture import tied_as_lora

  adapters = _tied(model, mode)
  for mod in adapters.cfg.modules:
    getattr(adapters.pool, f"beta_{mod}").set_value(jnp.zeros((model.cfg.layers,)))
  return adapters, tied_as_lora(adapters)


def test_tied_pool_at_beta_zero_is_the_lora_of_all_its_experts(model):
  """With beta = 0 the routed part vanishes: the model is the plain LoRA of rank E*r whose
  factors are the experts' side by side (what training starts from)."""
  adapters, lora = _at_beta_zero_and_its_lora(model)
  got, _ = logits_with(model, adapters)
  want, _ = logits_with(model, lora)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["pregated", "layerwise"])
@pytest.mark.parametrize("tokens", [8, 96])  # decode-sized, and a prompt past FUSED_MAX_TOKENS
def test_tied_pool_at_beta_zero_trains_bit_for_bit_as_its_lora_in_bf16(mode, tokens):
  """The tied pool's shared term runs through the LoRA's own path, so at beta = 0 its bf16 loss
  and its gradients for A and B are the LoRA's exactly, not merely close (a tied run and a LoRA
  run then differ only by what the routed term does)."""
  from adafuse_jax.train.loop import forward_loss

  bf16 = LlamaModel(tiny_config(), seed=0, dtype=jnp.bfloat16)
  adapters, lora = _at_beta_zero_and_its_lora(bf16, mode)
  windows = jax.random.randint(jax.random.key(1), (2, tokens // 2 + 1), 0, bf16.cfg.vocab_size)

  def loss_and_grads(ad):
    return nnx.value_and_grad(lambda a: forward_loss(bf16, a, windows)[1]["ce"],
                              argnums=nnx.DiffState(0, AdapterParam))(ad)

  (tied_loss, tied_grads), (lora_loss, lora_grads) = loss_and_grads(adapters), loss_and_grads(lora)
  assert tied_loss == lora_loss
  for mod in adapters.cfg.modules:
    for factor in "AB":
      got = getattr(tied_grads.pool, f"{factor}_{mod}").get_value()
      want = getattr(lora_grads.pool, f"{factor}_{mod}").get_value()
      np.testing.assert_array_equal(np.asarray(got).reshape(np.shape(want)), np.asarray(want))
      assert np.abs(np.asarray(want)).max() > 0


@pytest.mark.parametrize("layout", ["stacked", "list"])
@pytest.mark.parametrize("mode", ["pregated", "layerwise"])
def test_tied_pool_folds_into_backbone_and_an_ordinary_pool(model, layout, mode):
  """fold_shared: the backbone takes the dense pool, the routed experts keep B * beta; the
  result is an ordinary pool (no betas) with the same logits and routes."""
  from adafuse_jax.adapters.mixture import fold_shared

  m = model.with_layout(layout)
  adapters = _tied(m, mode, layout)
  got, rt = logits_with(m, adapters)
  for mod in adapters.cfg.modules:  # the routed part counts
    getattr(adapters.pool, f"beta_{mod}").set_value(jnp.zeros((m.cfg.layers,)))
  assert float(jnp.abs(got - logits_with(m, adapters)[0]).max()) > 1e-2
  adapters = _tied(m, mode, layout)
  folded_model, folded = fold_shared(m, adapters)
  assert not folded.cfg.has_shared and not hasattr(folded.pool, f"beta_{folded.cfg.modules[0]}")
  again, rt2 = logits_with(folded_model, folded)
  chex.assert_trees_all_close(again, got, atol=5e-4, rtol=1e-3)
  chex.assert_trees_all_equal(rt2.routes[0].experts, rt.routes[0].experts)


def test_tied_pool_decodes_through_generator_and_round_trips(tmp_path, model):
  from adafuse_jax.adapters.io import load_adapters, save_adapters
  from adafuse_jax.generation import Generator, generate

  adapters = _tied(model)
  with pytest.raises(ValueError, match="fold_shared"):
    registry.runtime(adapters, "gathered")
  want, _ = logits_with(model, adapters)
  prompt = [int(t) for t in TOKENS[0]]
  for path in ("xla", "packed"):
    got = generate(Generator(model, adapters=adapters, path=path), [prompt],
                   max_new_tokens=2)
    assert got.tokens[0][0] == int(jnp.argmax(want[0, -1]))
  loaded = load_adapters(save_adapters(tmp_path / "tied", adapters), model.cfg)
  assert loaded.cfg == adapters.cfg
  chex.assert_trees_all_equal(nnx.state(loaded.with_layout("stacked")),
                              nnx.state(adapters.with_layout("stacked")))


def test_tied_shared_rejected_where_it_means_nothing():
  with pytest.raises(UserError, match="tied_shared"):
    AdapterConfig(mode="lora", tied_shared=True)
  with pytest.raises(UserError, match="shared_rank=2"):
    AdapterConfig(mode="pregated", tied_shared=True, shared_rank=2)


def test_tied_as_lora_refuses_an_untied_pool(model):
  from adafuse_jax.adapters.mixture import tied_as_lora

  with pytest.raises(UserError, match="needs a tied pool"):
    tied_as_lora(MixtureOfLoRA(model.cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4),
                               seed=0))


@pytest.mark.parametrize("mode", ["pregated", "layerwise", "lora"])
def test_first_layer_leaves_lower_layers_alone_and_routes_on_context(model, mode):
  """Experts from layer 1 on: equal to a pool whose layer-0 experts are zero; the pre-gate
  router reads layer 1's input (so the same token routes differently in another context); the
  packed path and the folded shared expert agree; merging is refused with the reason."""
  from adafuse_jax.adapters.mixture import fold_shared
  from adafuse_jax.paths.packed import pack
  from adafuse_jax.paths.merged import merge_blocker

  shared = 2 if mode != "lora" else 0
  cfg = AdapterConfig(mode=mode, num_experts=4, rank=4, router_init_std=0.5, first_layer=1,
                      shared_rank=shared)
  adapters = MixtureOfLoRA(model.cfg, cfg, seed=8, random_b=True, layout="stacked")
  zeroed = MixtureOfLoRA(model.cfg, cfg.replace(first_layer=0), seed=8, random_b=True,
                         layout="stacked")
  for mod in cfg.modules:
    for f in (f"B_{mod}",) + ((f"SB_{mod}",) if shared else ()):
      getattr(zeroed.pool, f).set_value(getattr(zeroed.pool, f).get_value().at[0].set(0))
  got, rt = logits_with(model, adapters)
  if mode != "pregated":  # pre-gating also moves its decision point: compared below
    want, _ = logits_with(model, zeroed)
    chex.assert_trees_all_close(got, want, atol=1e-5)
  if mode == "pregated":
    assert merge_blocker(cfg) is not None and "first_layer" in merge_blocker(cfg)
    # Token 3 at positions 2 and 10: same embedding, different context at layer 1.
    tokens = np.array([[5, 17, 3, 88, 42, 9, 61, 7, 1, 2, 3]], np.int32)
    _, rt = logits_with(model, adapters, tokens)
    logits = rt.routes[0].logits.reshape(11, -1)
    assert float(jnp.abs(logits[2] - logits[10]).max()) > 1e-4
  folded_model, folded = fold_shared(model, adapters)
  if mode != "lora":
    again, _ = logits_with(folded_model, folded)
    chex.assert_trees_all_close(again, got, atol=1e-4, rtol=1e-4)
  packed_rt = registry.runtime(folded, "packed", derived=pack(folded_model, folded))
  cache = KVCache.create(model.cfg, 2, 8, model.dtype)
  packed, _ = folded_model(jnp.asarray(TOKENS), cache, all_logits=True, linear=packed_rt)
  chex.assert_trees_all_close(packed, got, atol=1e-4, rtol=1e-4)


def test_first_layer_beyond_the_model_is_named(model):
  with pytest.raises(UserError, match="first_layer=9"):
    MixtureOfLoRA(model.cfg, AdapterConfig(mode="pregated", first_layer=9), seed=0)


@pytest.mark.parametrize("layout", ["stacked", "list"])
@pytest.mark.parametrize("mode, per_layer_gates", [("pregated", False), ("pregated", True),
                                                    ("layerwise", False)])
def test_row_layout_equals_stored_layout(model, layout, mode, per_layer_gates):
  """The GPU decode copies (A^T, R^T) give the stored layout's outputs and routes: a decode step
  of 2 sequences on 16 experts takes the gather path that reads them."""
  from adafuse_jax.paths.xla import build_rows

  cfg = AdapterConfig(mode=mode, num_experts=16, rank=4, top_k=2, router_init_std=0.5,
                      per_layer_gates=per_layer_gates)
  m = model.with_layout(layout)
  adapters = MixtureOfLoRA(m.cfg, cfg, seed=8, random_b=True, layout=layout)
  tokens = jnp.asarray(TOKENS[:, :1])
  assert registry.THRESHOLDS.use_gather(tokens.size, cfg.top_k, cfg.num_experts)
  rows = build_rows(adapters)
  assert rows["A_q"][0].shape == (16, 4, m.cfg.hidden)
  assert ("R_q" in rows) == (mode == "layerwise")
  cache = lambda: KVCache.create(m.cfg, 2, 4, m.dtype)  # noqa: E731
  want_rt, got_rt = registry.runtime(adapters), registry.runtime(adapters, derived=rows)
  want, _ = m(tokens, cache(), linear=want_rt)
  got, _ = m(tokens, cache(), linear=got_rt)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert len(got_rt.routes) == len(want_rt.routes)
  for a, b in zip(got_rt.routes, want_rt.routes):
    np.testing.assert_array_equal(a.experts, b.experts)
  # Other paths ignore the copies; the GPU alone builds them.
  assert registry.runtime(adapters, "gathered", derived=rows).rows is None
  assert registry.get("xla").wants_rows(cfg) == (jax.default_backend() == "gpu")


# --- route_context: the pre-gate router also reads a running mean of earlier inputs ---

def test_context_mean_matches_a_loop():
  from adafuse_jax.adapters.routing import context_mean

  x = jax.random.normal(jax.random.key(0), (2, 5, 3))
  got = np.asarray(context_mean(x, 0.5))
  xs = np.asarray(x, np.float64)
  for t in range(5):
    if t == 0:
      np.testing.assert_array_equal(got[:, 0], 0.0)
      continue
    w = np.array([0.5 ** (t - 1 - s) for s in range(t)])
    np.testing.assert_allclose(got[:, t], np.einsum("s,bsd->bd", w / w.sum(), xs[:, :t]),
                               rtol=1e-5, atol=1e-6)


def test_route_context_starts_as_the_plain_router_and_then_reads_the_context(model):
  """w_ctx starts at zero: same logits and routes as the plain pre-gate router. Once it is not
  zero, the same token routes differently after different tokens; decoding refuses it."""
  from adafuse_jax.generation import Generator

  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2, router_init_std=0.5)
  plain = MixtureOfLoRA(model.cfg, cfg, seed=8, random_b=True)
  ctx = MixtureOfLoRA(model.cfg, cfg.replace(route_context=0.9), seed=8, random_b=True)
  want, rt_want = logits_with(model, plain)
  got, rt_got = logits_with(model, ctx)
  chex.assert_trees_all_close(got, want, atol=1e-6)
  chex.assert_trees_all_equal(rt_got.routes[0].experts, rt_want.routes[0].experts)

  ctx.router.w_ctx.set_value(jax.random.normal(jax.random.key(1), ctx.router.w_ctx.shape) * 2.0)
  last = TOKENS[0, -1]
  a = jnp.asarray([[5, 6, 7, last]], jnp.int32)
  b = jnp.asarray([[90, 91, 92, last]], jnp.int32)
  routes = [logits_with(model, ctx, tokens)[1].routes[0].logits[-1] for tokens in (a, b)]
  assert float(jnp.abs(routes[0] - routes[1]).max()) > 1e-3
  routes = [logits_with(model, plain, tokens)[1].routes[0].logits[-1] for tokens in (a, b)]
  chex.assert_trees_all_close(routes[0], routes[1], atol=1e-6)  # the plain router: token alone
  with pytest.raises(UserError, match="route_context"):
    Generator(model, adapters=ctx)
  with pytest.raises(ValueError, match="route_context"):
    registry.runtime(ctx, "packed")
  with pytest.raises(UserError, match="route_context"):
    AdapterConfig(mode="layerwise", route_context=0.5)
  with pytest.raises(UserError, match="route_context"):
    AdapterConfig(mode="pregated", route_context=1.0)


def test_an_overwritten_pool_file_is_a_named_error_not_a_silent_load(tmp_path, default_model,
                                                                      capsys):
  """4 KB of random bytes in the middle of the shipped pool's largest data file: the load (and
  the CLI) refuse it by name, whether orbax notices or only the digest does."""
  import shutil

  from adafuse_jax import decode
  from adafuse_jax.adapters.io import DEFAULT_POOL, load_adapters
  from adafuse_jax.errors import ModelFileError

  pool = tmp_path / "pool"
  shutil.copytree(DEFAULT_POOL, pool)
  largest = max((p for p in (pool / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = np.random.default_rng(0).bytes(4096)
  largest.write_bytes(bytes(data))
  with pytest.raises(ModelFileError, match="damaged|cannot restore"):
    load_adapters(pool, default_model.model.cfg)
  assert decode.main(["--adapters", str(pool), "--quiet", "Hello"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and str(pool) in err[0]
  # The untouched copy still loads and verifies.
  load_adapters(DEFAULT_POOL, default_model.model.cfg)
