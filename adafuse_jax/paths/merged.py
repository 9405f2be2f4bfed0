"""Path "merged": route the token, switch its experts into the weights, run the backbone.

A plain LoRA merges once (`adafuse_jax.adapters.mixture.merged_model`) and decodes as the
backbone. A pre-gated pool switches per decode step:

Per decode step, inside one jitted function:
1. the pre-gate router reads the token's hidden state at the first adapted module of layer 0
   (`rms_norm(embed(token), attn_norm[0])`, the input of q/k/v) and picks k experts + gates;
2. if the experts or gates differ from the previous step's, one SGMM launch
   (`pallas_kernels.sgmm`: Mosaic GPU on Hopper where it applies, else the Triton lowering; XLA
   on the CPU or when asked) rebuilds every adapted weight of every layer as
   `W = W0 + (alpha / r) Σ_j g_j A[e_j] B[e_j]` from the pristine base W0 (no drift; see the
   kernel's docstring); otherwise nothing is touched;
3. the forward pass is a plain backbone pass that reads the merged weights.

The merged weights are a separate state (donated step to step), so the model's own parameters
stay the pristine W0: prompts, where every token has its own experts, run unmerged on them.
A batch of B > 1 sequences merges only when the whole batch agrees (every row picked the same
experts with the same gates); a step whose rows disagree leaves the merged weights alone and runs
unmerged on W0 (`batch_agrees`, and the generator's `lax.cond`), so the weights are moved only
for a choice that serves every row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import sgmm

from adafuse_jax import parallel
from adafuse_jax.adapters.mixture import MixtureOfLoRA, merged_model
from adafuse_jax.adapters.routing import gates_for, top_k_gates
from adafuse_jax.config import LINEAR_NAMES, AdapterConfig
from adafuse_jax.errors import UserError
from adafuse_jax.model.layers import matmul, rms_norm
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.paths.base import DecodePath
from adafuse_jax.paths.gathered import GatheredRuntime
from adafuse_jax.paths.xla import XlaRuntime
from adafuse_jax.vocab import Mode, PathName

ATTENTION_INPUT_MODULES = ("q", "k", "v")


@dataclasses.dataclass
class SwitchState:
  """What a merged decode carries from step to step.

  Attributes:
    weights: adapted module -> merged weight (stacked [L, in, out], or per-layer tuple on the CPU).
    experts: [k] int32 experts merged now (sorted; -1 before the first switch).
    coefs: [L, k] f32 coefficients merged now (gate x alpha / r).
    switches: int32 count of steps that switched (for the switch rate).
    unmerged: int32 count of steps whose batch disagreed and ran unmerged (0 at batch 1).
  """

  weights: dict
  experts: jax.Array
  coefs: jax.Array
  switches: jax.Array
  unmerged: jax.Array


jax.tree_util.register_dataclass(
    SwitchState, data_fields=["weights", "experts", "coefs", "switches", "unmerged"],
    meta_fields=[])


def merge_blocker(adapter_cfg) -> str | None:
  """Why these adapters cannot be switched into the weights per token, or None if they can."""
  if adapter_cfg.mode != Mode.PREGATED:
    return (f"merged decoding switches pre-gated experts; mode {adapter_cfg.mode!r} routes"
            " at every layer and cannot merge (use mode pregated, or a plain LoRA: mode lora"
            " merges once)")
  if adapter_cfg.first_layer:
    return (f"these experts are routed at layer {adapter_cfg.first_layer} (first_layer), after"
            " layers that run before any switch could; decode them unmerged (packed, pallas)")
  first = next(m for m in LINEAR_NAMES if m in adapter_cfg.modules)  # the forward pass's order
  if first not in ATTENTION_INPUT_MODULES:
    return ("merged decoding routes on layer 0's attention input, so q, k or v must be"
            f" adapted; got modules {','.join(adapter_cfg.modules)}")
  return None


def check_mergeable(adapter_cfg) -> None:
  reason = merge_blocker(adapter_cfg)
  if reason is not None:
    raise UserError(reason)


def initial_state(model, adapters) -> SwitchState:
  """Merged weights = W0 (a copy), nothing merged yet: the first step switches."""
  cfg = adapters.cfg
  weights = {}
  for m in cfg.modules:
    value = getattr(model, m).get_value()
    weights[m] = tuple(w.copy() for w in value) if isinstance(value, tuple) else value.copy()
  return SwitchState(weights=weights, experts=jnp.full((cfg.top_k,), -1, jnp.int32),
                     coefs=jnp.zeros((model.cfg.layers, cfg.top_k), jnp.float32),
                     switches=jnp.zeros((), jnp.int32), unmerged=jnp.zeros((), jnp.int32))


def route_token(model, adapters, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pre-gate one token. tokens [1, 1] -> (experts [k] sorted, gates [k] or [L, k], logits [1, E])."""
  experts, gates, logits = route_tokens(model, adapters, tokens)
  return experts[0], gates[0], logits


def route_tokens(model, adapters, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pre-gate the last token of every row. tokens [B, T] -> (experts [B, k], each row sorted by
  expert id, gates [B, k] or [B, L, k] in that order, logits [B, E])."""
  cfg = adapters.cfg
  x = rms_norm(jnp.take(model.embed[...], tokens[:, -1], axis=0), model.attn_norm[0],
               model.cfg.rms_eps)  # [B, D]
  logits, layer_logits = adapters.router(x)
  experts, gates = top_k_gates(logits, cfg.top_k)
  # A canonical order (by expert id), so that the same set with the same gates is "unchanged".
  order = jnp.argsort(experts, axis=-1)
  experts = jnp.take_along_axis(experts, order, axis=-1)
  if layer_logits is not None:
    gates = gates_for(layer_logits, jnp.broadcast_to(experts[:, None, :], layer_logits.shape[:2]
                                                     + (cfg.top_k,)))
  else:
    gates = jnp.take_along_axis(gates, order, axis=-1)
  return experts, gates, logits


def batch_agrees(experts: jax.Array, gates: jax.Array) -> jax.Array:
  """Whether every row chose row 0's experts with row 0's gates (bool scalar).
  experts [B, k], gates [B, k] or [B, L, k], as `route_tokens` returns them."""
  same = jnp.all(experts == experts[:1])
  return same & jnp.all(gates == gates[:1])


def switch(state: SwitchState, model, adapters, experts: jax.Array, gates: jax.Array,
           backend: str = "auto", agree: jax.Array | bool = True,
           mesh: jax.sharding.Mesh | None = None) -> SwitchState:
  """Rebuilds the merged weights for the new experts [k] / gates [k] or [L, k] (no work when
  they are unchanged, or when `agree` is False: the batch disagreed and runs unmerged). On a
  tensor-parallel `mesh` the SGMM launch runs per shard: each device rebuilds its slice of
  every weight from its slices of W0, A and B, with no collective."""
  cfg = adapters.cfg
  num_layers = model.cfg.layers
  coefs = jnp.broadcast_to(gates if gates.ndim == 2 else gates[None], (num_layers, cfg.top_k))
  coefs = coefs.astype(jnp.float32) * cfg.scale
  changed = jnp.any(experts != state.experts) | jnp.any(coefs != state.coefs)
  agree = jnp.asarray(agree)
  changed = changed & agree
  experts = jnp.where(agree, experts, state.experts)
  coefs = jnp.where(agree, coefs, state.coefs)
  modules = cfg.modules
  base = tuple(getattr(model, m).get_value() for m in modules)
  current = tuple(state.weights[m] for m in modules)
  if isinstance(base[0], tuple):
    new = _switch_per_layer(current, base, adapters, modules, experts, coefs, changed)
  else:
    pools = [adapters.pool.stacked(m) for m in modules]
    a_pools, b_pools = [p[0] for p in pools], [p[1] for p in pools]

    def rebuild(current, a_pools, b_pools, experts, coefs, changed, base):
      return tuple(sgmm.switch_weights(current, a_pools, b_pools, experts, coefs, changed, base,
                                       backend=backend))

    if mesh is not None and mesh.size > 1:
      splits = [parallel.module_split(m) for m in modules]
      w = tuple(s.w for s in splits)
      rebuild = parallel.on_shards(rebuild, mesh, (w, [s.a for s in splits],
                                                   [s.b for s in splits], P(), P(), P(), w), w)
    new = rebuild(current, a_pools, b_pools, experts, coefs, changed, base)
  return SwitchState(weights=dict(zip(modules, new)), experts=experts, coefs=coefs,
                     switches=state.switches + changed.astype(jnp.int32),
                     unmerged=state.unmerged + (~agree).astype(jnp.int32))


def _switch_per_layer(current, base, adapters, modules, experts, coefs, changed):
  """The XLA switch on per-layer weights (the CPU layout): W[l] = W0[l] + Σ_j c A[l][:, e] B[l][e]."""

  def apply(_):
    out = []
    for m, w0 in zip(modules, base):
      layers = []
      for l, w in enumerate(w0):
        a, b = adapters.pool.factors(m, l)  # [in, E, r], [E, r, out]
        a_sel = jnp.take(a, experts, axis=1).astype(jnp.float32) * coefs[l][None, :, None]
        b_sel = jnp.take(b, experts, axis=0).astype(jnp.float32)
        delta = jnp.einsum("ikr,kro->io", a_sel, b_sel)
        layers.append((w.astype(jnp.float32) + delta).astype(w.dtype))
      out.append(tuple(layers))
    return tuple(out)

  return jax.lax.cond(changed, apply, lambda _: tuple(current), None)


def merged_linear(weights: dict):
  """The LinearFn of a merged pass: adapted modules read the merged weights, others the model's."""

  def linear(name: str, layer: int, x: jax.Array, w) -> jax.Array:
    return matmul(x, (weights[name] if name in weights else w)[layer])

  return linear


class MergedPath(DecodePath):
  name = PathName.MERGED
  summary = ("pre-gated: each token's experts switched into the weights by one SGMM launch, then"
             " a plain backbone pass; lora: merged once")
  merges = True

  def blocker(self, adapter_cfg: AdapterConfig | None, layout: str) -> str | None:
    if adapter_cfg is None:
      return "merged decoding needs adapters (a pre-gated expert pool, or a LoRA merged once)"
    return super().blocker(adapter_cfg, layout) or (
        None if adapter_cfg.mode == Mode.LORA else merge_blocker(adapter_cfg))

  def fold_once(self, model: LlamaModel, adapters: MixtureOfLoRA
                ) -> tuple[LlamaModel, MixtureOfLoRA | None]:
    """A plain LoRA merged into the weights once: (merged model, None); a pool that switches
    per token comes back unchanged."""
    if adapters.cfg.mode == Mode.LORA:
      return merged_model(model, adapters), None
    return model, adapters

  def prepare(self, model, adapters, *, release=False):
    return initial_state(model, adapters) if adapters is not None else None

  def extra_bytes(self, model: LlamaModel, adapters: MixtureOfLoRA) -> int:
    layers, item = model.cfg.layers, jnp.dtype(model.dtype).itemsize
    return layers * item * sum(i * o for m, (i, o) in model.cfg.linear_shapes().items()
                               if m in adapters.cfg.modules)

  def runtime(self, adapters, derived=None, *, sere=None, backend="auto", mesh=None):
    """The unmerged runtime of prompts and of batch steps whose rows disagree: the gathered
    kernels where the switch runs a Pallas kernel, else plain XLA."""
    if backend != "xla" and jax.default_backend() == "gpu":
      return GatheredRuntime(adapters, self.thresholds, sere, mesh=mesh)
    return XlaRuntime(adapters, self.thresholds, sere)
