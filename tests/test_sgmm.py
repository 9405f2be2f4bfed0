"""The SGMM switch kernel (interpret mode on the CPU, compiled on a GPU) against its reference,
its bf16 drift over thousands of switches, and the merged decode it serves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sgmm
from pallas_kernels.sgmm.reference import switch_weights_reference, switch_weights_xla
from pallas_kernels.sgmm.triton import Tiles, switch_weights

INTERPRET = jax.default_backend() != "gpu"
SMALL = Tiles(block_m=16, block_n=16, row_steps=2)
# Per dtype: max |error| relative to the largest |W|.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _segments(seed, layers, shapes, num_experts, rank, dtype):
  rng = np.random.default_rng(seed)
  f = lambda scale, *s: jnp.asarray(rng.normal(size=s) * scale, dtype)  # noqa: E731
  w = [f(1.0, layers, i, o) for i, o in shapes]
  a = [f(i ** -0.5, layers, i, num_experts, rank) for i, o in shapes]
  b = [f(1.0, layers, num_experts, rank, o) for i, o in shapes]
  return w, a, b


def _route(seed, layers, num_experts, k):
  rng = np.random.default_rng(seed)
  experts = jnp.asarray(rng.choice(num_experts, size=k, replace=False), jnp.int32)
  coefs = jnp.asarray(rng.uniform(0.1, 1.0, size=(layers, k)), jnp.float32)
  return experts, coefs


def _assert_close(got, want, dtype):
  for g, w in zip(got, want):
    assert not bool(jnp.isnan(g).any()), "an output element was never written"
    scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
    assert err <= TOL[dtype] * scale, f"max error {err} vs scale {scale}"


# GQA-like segment tables: q-like square, k/v-like narrower out, a down-like taller in; none a
# multiple of the 16 x 16 tiles (or of the 32-row strips).
GQA_SHAPES = [(40, 40), (40, 24), (40, 24), (72, 40)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_experts, k, rank", [(1, 1, 4), (4, 2, 16), (8, 2, 64), (8, 1, 16),
                                                  (4, 2, 4)])
def test_rebuild_matches_reference_with_poisoned_output(dtype, num_experts, k, rank):
  layers = 2
  w0, a, b = _segments(num_experts * 100 + rank, layers, GQA_SHAPES, num_experts, rank, dtype)
  experts, coefs = _route(rank + k, layers, num_experts, k)
  poisoned = [jnp.full_like(w, jnp.nan) for w in w0]
  got = switch_weights(poisoned, a, b, experts, coefs, True, w0, tiles=SMALL, interpret=INTERPRET)
  want = switch_weights_reference(w0, a, b, experts, coefs, True, w0)
  _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_incremental_old_to_new_matches_reference(dtype):
  layers, num_experts, rank = 3, 8, 16
  w0, a, b = _segments(1, layers, GQA_SHAPES, num_experts, rank, dtype)
  old, c_old = _route(2, layers, num_experts, 2)
  new, c_new = _route(3, layers, num_experts, 2)
  current = switch_weights_reference(w0, a, b, old, c_old, True, w0)
  experts = jnp.concatenate([old, new])
  coefs = jnp.concatenate([-c_old, c_new], axis=1)
  got = switch_weights(current, a, b, experts, coefs, True, None, tiles=SMALL, interpret=INTERPRET)
  want = switch_weights_reference(w0, a, b, new, c_new, True, w0)
  # Removing the old experts in bf16 leaves their rounding behind: two roundings, not one.
  _assert_close(got, want, dtype)


def test_old_equal_new_incremental_is_identity_and_unchanged_flag_does_nothing():
  layers, num_experts, rank = 2, 4, 16
  w0, a, b = _segments(4, layers, GQA_SHAPES, num_experts, rank, jnp.float32)
  e, c = _route(5, layers, num_experts, 2)
  current = switch_weights_reference(w0, a, b, e, c, True, w0)
  same = switch_weights([x.copy() for x in current], a, b, jnp.concatenate([e, e]),
                        jnp.concatenate([-c, c], axis=1), True, None, tiles=SMALL,
                        interpret=INTERPRET)
  _assert_close(same, current, jnp.float32)
  # changed=False: the kernel must not write at all, so poisoned weights stay poisoned.
  poisoned = [jnp.full_like(w, jnp.nan) for w in w0]
  untouched = switch_weights(poisoned, a, b, e, c, False, w0, tiles=SMALL, interpret=INTERPRET)
  assert all(bool(jnp.isnan(u).all()) for u in untouched)


def test_xla_implementation_matches_reference():
  layers = 2
  w0, a, b = _segments(6, layers, GQA_SHAPES, 8, 16, jnp.bfloat16)
  e, c = _route(7, layers, 8, 2)
  got = jax.jit(switch_weights_xla)([x.copy() for x in w0], a, b, e, c, True, w0)
  _assert_close(got, switch_weights_reference(w0, a, b, e, c, True, w0), jnp.bfloat16)
  kept = jax.jit(switch_weights_xla)(w0, a, b, e, c, False, w0)
  assert all(bool((k == w).all()) for k, w in zip(kept, w0))


@pytest.mark.parametrize("bad, match", [
    (dict(coefs_shape=(3, 2)), "coefs must be"),
    (dict(a_rank=8), "same rank"),
    (dict(experts_2d=True), "experts must be"),
])
def test_bad_shapes_are_named(bad, match):
  layers = 2
  w0, a, b = _segments(8, layers, [(40, 40), (40, 24)], 4, 16, jnp.float32)
  e, c = _route(9, layers, 4, 2)
  if "coefs_shape" in bad:
    c = jnp.ones(bad["coefs_shape"], jnp.float32)
  if "a_rank" in bad:
    a[1] = jnp.ones((layers, 40, 4, bad["a_rank"]), jnp.float32)
    b[1] = jnp.ones((layers, 4, bad["a_rank"], 24), jnp.float32)
  if "experts_2d" in bad:
    e = e[None]
  with pytest.raises(ValueError, match=match):
    switch_weights(w0, a, b, e, c, True, None, tiles=SMALL, interpret=True)


def test_rebuild_does_not_drift_over_10000_switches_while_incremental_does():
  """10,000 random switches in bf16: rebuilding from W0 stays at one rounding of
  W0 + ΔW_current; the in-place incremental update accumulates rounding error."""
  layers, num_experts, rank, k, steps = 2, 8, 16, 2, 10_000
  w0, a, b = _segments(10, layers, [(64, 48)], num_experts, rank, jnp.bfloat16)
  keys = jax.random.split(jax.random.key(0), steps)

  def route(key):
    experts = jax.random.choice(key, num_experts, (k,), replace=False).astype(jnp.int32)
    coefs = jax.random.uniform(jax.random.fold_in(key, 1), (layers, k), minval=0.1, maxval=1.0)
    return experts, coefs

  def run(rebuild):
    def body(carry, key):
      w, old_e, old_c = carry
      e, c = route(key)
      if rebuild:
        (w,) = switch_weights_xla((w,), a, b, e, c, True, w0)
      else:
        (w,) = switch_weights_xla((w,), a, b, jnp.concatenate([old_e, e]),
                                  jnp.concatenate([-old_c, c], axis=1), True, None)
      return (w, e, c), None

    e0, c0 = route(jax.random.key(1))
    (start,) = switch_weights_reference(w0, a, b, e0, c0, True, w0)
    (w, e, c), _ = jax.lax.scan(body, (start, e0, c0), keys)
    exact = w0[0].astype(jnp.float32) + sum(
        c[:, j, None, None] * jnp.einsum("lir,lro->lio", a[0][:, :, e[j]].astype(jnp.float32),
                                          b[0][:, e[j]].astype(jnp.float32)) for j in range(k))
    return (float(jnp.max(jnp.abs(w.astype(jnp.float32) - exact))),
            float(jnp.max(jnp.abs(exact))))

  rebuild_err, largest = run(True)
  incremental_err, _ = run(False)
  # One rounding of the merged weight: at most half a bf16 ulp, and a bf16 ulp of x is at most
  # |x| * 2^-7 (8 significant bits). The bound docs/correctness.md states: |err| <= 2^-8 max|W|.
  assert rebuild_err <= largest * 2.0 ** -8 * 1.01, (rebuild_err, largest)
  assert incremental_err > 4 * rebuild_err, (incremental_err, rebuild_err)


# --- merged decoding ("pregated-merged") -------------------------------------------------------

from adafuse_jax.adapters.mixture import MixtureOfLoRA  # noqa: E402
from adafuse_jax.config import AdapterConfig  # noqa: E402
from adafuse_jax.errors import UserError  # noqa: E402
from adafuse_jax.generation import Generator, generate  # noqa: E402
from adafuse_jax.model.llama import LlamaModel  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def _step_logits(gen, tokens, steps):
  """Prefill, then `steps` greedy decode steps; returns the decode logits [steps, V]."""
  cache = gen.new_cache(1, 64)
  key = jax.random.key(0)
  nxt, _, cache, _ = gen.forward(jnp.asarray([tokens], jnp.int32), cache, key)
  out = []
  for _ in range(steps):
    nxt, logits, cache, _ = gen.forward(nxt[:, None], cache, key)
    out.append(logits[0])
  return jnp.stack(out)


@pytest.mark.parametrize("backend, layout, per_layer", [
    ("xla", "list", False), ("xla", "stacked", True), ("triton", "stacked", False)])
def test_merged_decode_logits_equal_unmerged_on_tiny_model(backend, layout, per_layer):
  cfg = tiny_config()
  model = LlamaModel(cfg, seed=3, layout=layout)
  acfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2, per_layer_gates=per_layer,
                       router_init_std=1.0)
  adapters = MixtureOfLoRA(cfg, acfg, seed=4, random_b=True, layout=layout)
  prompt = [5, 17, 42, 8, 3]
  unmerged = _step_logits(Generator(model, adapters=adapters, path="xla"), prompt, 6)
  merged_gen = Generator(model, adapters=adapters, path="merged", backend=backend)
  merged = _step_logits(merged_gen, prompt, 6)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), rtol=1e-4, atol=1e-4)
  assert 1 <= int(merged_gen.switch_state.switches) <= 6


def test_merged_greedy_200_tokens_equal_unmerged_on_default_model(default_model):
  """The real SmolLM2 with a random pre-gated pool on q and v: same 200 greedy tokens, and the
  logits of the merged and unmerged passes agree."""
  model, tok = default_model.model, default_model.tokenizer
  acfg = AdapterConfig(mode="pregated", modules=("q", "v"), num_experts=8, rank=8, top_k=2,
                       router_init_std=0.5)
  adapters = MixtureOfLoRA(model.cfg, acfg, seed=11, random_b=True)
  prompt = tok.encode("The history of the printing press begins")
  runs = {}
  for merge in (False, True):
    gen = Generator(model, adapters=adapters, path="merged" if merge else "xla", backend="xla")
    runs[merge] = generate(gen, [prompt], max_new_tokens=200)
  assert len(runs[False].tokens[0]) == 200
  assert runs[True].tokens == runs[False].tokens
  experts_u = np.stack([r[0] for r in runs[False].routes])
  experts_m = np.stack([np.sort(r[0], axis=-1) for r in runs[True].routes])
  # The prompt's last token is routed by the (unmerged) prefill in both runs; after it, the
  # merged step routes each token itself and must pick the same set.
  assert (np.sort(experts_u[1:], axis=-1) == experts_m[1:]).all()


def test_merging_rejects_what_it_cannot_serve():
  cfg = tiny_config()
  model = LlamaModel(cfg, seed=0)
  pregated = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4), seed=0)
  lw = MixtureOfLoRA(cfg, AdapterConfig(mode="layerwise", num_experts=4), seed=0)
  with pytest.raises(UserError, match="pre-gated"):
    Generator(model, adapters=lw, path="merged")
  mlp_only = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", modules=("gate", "up"),
                                              num_experts=4), seed=0)
  with pytest.raises(UserError, match="q, k or v"):
    Generator(model, adapters=mlp_only, path="merged")
  with pytest.raises(UserError, match="SERE"):
    Generator(model, adapters=pregated, path="merged", sere=object())


@pytest.mark.parametrize("router", ["zero", "random"])
def test_merged_batch_equals_each_sequence_alone(router):
  """A merged batch switches only when every row chose the same experts and gates (a zero
  router: always, though the prompts differ); otherwise the step runs unmerged on W0 (a random
  router). Either way each row's greedy tokens are those of generating it alone, unmerged."""
  cfg = tiny_config()
  model = LlamaModel(cfg, seed=0, layout="stacked")
  adapters = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4,
                                              router_init_std=0.5), seed=3, random_b=True)
  if router == "zero":
    adapters.router.w.set_value(jnp.zeros_like(adapters.router.w[...]))
  prompts = [[5, 17, 3, 88], [42, 9], [61, 7, 1]]
  gen = Generator(model, adapters=adapters, path="merged", backend="xla")
  batched = generate(gen, prompts, max_new_tokens=6)
  for row, prompt in enumerate(prompts):
    alone = generate(Generator(model, adapters=adapters, path="xla"), [prompt], max_new_tokens=6)
    assert batched.tokens[row] == alone.tokens[0], (row, router)
  steps = 6 - 1  # the first token comes from the (unmerged) prefill
  unmerged, switches = int(gen.switch_state.unmerged), int(gen.switch_state.switches)
  if router == "zero":
    assert unmerged == 0 and switches == 1  # one switch, then the same choice every step
  else:
    assert unmerged > 0 and switches + unmerged <= steps


def test_merged_decoding_of_a_pool_with_a_shared_expert():
  """The shared expert is folded into W0 before switching: merged == unmerged tokens."""
  cfg = tiny_config()
  model = LlamaModel(cfg, seed=0, layout="stacked")
  adapters = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4,
                                              shared_rank=3, router_init_std=0.5),
                           seed=5, random_b=True)
  prompt = [[5, 17, 3, 88, 42]]
  merged = generate(Generator(model, adapters=adapters, path="merged", backend="xla"), prompt,
                    max_new_tokens=8)
  unmerged = generate(Generator(model, adapters=adapters, path="xla"), prompt, max_new_tokens=8)
  assert merged.tokens == unmerged.tokens
