"""The dynamic adapter as a whole: expert pool + routers, and how a forward pass applies them.

`MixtureOfLoRA` holds the weights. `AdapterRuntime` is the `LinearFn` handed to the decoder for
one forward pass: it routes (once, for "pregated"; at every adapted module, for "layerwise") and
adds the chosen experts' deltas to the backbone's matmul, unmerged. It lives for one trace only;
what it routed is read back from it after the model call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from adafuse_jax.config import AdapterConfig, ModelConfig
from adafuse_jax.errors import UserError
from adafuse_jax.model.llama import LlamaModel, input_group, per_layer
from adafuse_jax.packed import cached_on_input
from adafuse_jax.experts import (ExpertPool, dense_bias_output, dense_gates, expert_delta,
                                 use_fused_kernel, use_gather, use_segmented)
from adafuse_jax.routing import LayerwiseRouter, PreGateRouter, gates_for, top_k_gates


class MixtureOfLoRA(nnx.Module):
  """Expert pool + the router(s) that the adapter mode needs.

  Attributes:
    cfg: the AdapterConfig.
    pool: ExpertPool.
    router: PreGateRouter ("pregated"), LayerwiseRouter ("layerwise"), or None ("lora").
  """

  def __init__(self, model_cfg: ModelConfig, cfg: AdapterConfig, *, seed: int = 0,
               dtype: jnp.dtype = jnp.float32, random_b: bool = False, layout: str | None = None):
    if cfg.mode == "backbone":
      raise ValueError("mode 'backbone' has no adapters; pass adapters=None")
    if cfg.first_layer >= model_cfg.layers:
      raise UserError(f"first_layer={cfg.first_layer} leaves no adapted layer: the model has"
                      f" {model_cfg.layers} layers (0 .. {model_cfg.layers - 1})")
    self.cfg = cfg
    self.model_cfg = model_cfg
    rngs = nnx.Rngs(params=seed)
    self.pool = ExpertPool(model_cfg, cfg, rngs=rngs, dtype=dtype, random_b=random_b, layout=layout)
    if cfg.mode == "pregated":
      self.router = PreGateRouter(model_cfg, cfg, rngs=rngs, dtype=dtype)
    elif cfg.mode == "layerwise":
      self.router = LayerwiseRouter(model_cfg, cfg, rngs=rngs, dtype=dtype)
    else:
      self.router = None

  def with_layout(self, layout: str) -> "MixtureOfLoRA":
    """The same adapters with the pool in another layout ("stacked" or "list")."""
    if self.pool.layout == layout:
      return self
    return self._copy_into(self.cfg, layout)

  def _copy_into(self, cfg: AdapterConfig, layout: str) -> "MixtureOfLoRA":
    """These adapters' weights in a new MixtureOfLoRA of config `cfg` (this one's, or it less
    the shared expert) and `layout`; arrays are shared, not copied, where the layout is kept."""
    out = nnx.eval_shape(lambda: MixtureOfLoRA(self.model_cfg, cfg, layout=layout))
    for m in cfg.modules:
      for prefix in ("", "S") if cfg.shared_rank else ("",):
        if layout == self.pool.layout:
          a = getattr(self.pool, f"{prefix}A_{m}").get_value()
          b = getattr(self.pool, f"{prefix}B_{m}").get_value()
        else:
          a, b = self.pool.stacked(m, prefix)
          if layout == "list":
            a, b = per_layer(a), per_layer(b)
        getattr(out.pool, f"{prefix}A_{m}").set_value(a)
        getattr(out.pool, f"{prefix}B_{m}").set_value(b)
      if cfg.tied_shared:
        getattr(out.pool, f"beta_{m}").set_value(getattr(self.pool, f"beta_{m}").get_value())
    if self.router is not None:
      nnx.update(out.router, nnx.state(self.router))
    return out

  def runtime(self, implementation: str = "xla", sere: "SereSettings | None" = None,
              packed=None, rows: dict | None = None) -> "AdapterRuntime":
    return AdapterRuntime(self, implementation, sere, packed, rows)


@dataclasses.dataclass
class Route:
  """One routing decision. experts, gates: [N, k] (gates [N, L, k] with per-layer gates)."""

  experts: jax.Array
  gates: jax.Array
  logits: jax.Array | None


@dataclasses.dataclass(frozen=True)
class SereSettings:
  """SERE re-routing of pre-gated choices (`adafuse_jax.sere`): similarity [E, E], the number
  of primary choices per token S, and the threshold rho (1 = off)."""

  similarity: jax.Array
  primary_k: int = 1
  rho: float = 0.5


# "pallas" runs decode steps on the gathered kernels (pallas_kernels/sgmv.py: only the step's
# active experts are read, one shrink per group of modules sharing an input); "pallas-dense" on
# the earlier dense kernel (pallas_kernels/expert_matmul.py: every expert's columns, one XLA
# shrink per module), kept so that benchmarks compare the two in one run. "packed" appends every
# expert's A and the layer-wise routers to the backbone's matrices (adafuse_jax/packed.py).
IMPLEMENTATIONS = ("xla", "pallas", "pallas-dense", "packed")
# The fused kernel is a matrix-vector design (narrow column tiles, 16-32 rows); for prompts XLA's
# matmuls win (H100, 7B, prefill of 512 tokens: 64.1 ms fused vs 32.3 ms XLA,
# docs/benchmarks/h100), so larger token counts take the XLA path.
FUSED_MAX_TOKENS = 64


class AdapterRuntime:
  """`LinearFn` for one forward pass: y = x @ w + (alpha / r) Σ_k g_k (x A_k) B_k.

  implementation: "xla" applies the experts with plain matmuls beside the base one (given
  `rows`, `adafuse_jax.row_layout`'s A^T and R^T, its gathered shrink and layer-wise routers
  read those: row reductions on the GPU); "pallas"
  runs decode steps on the gathered kernels (`pallas_kernels.sgmv`): one shrink launch per
  group of modules that share an input, reading only the step's active experts, then the base
  matmul with the expansion folded in, one launch per module; prompts longer than
  FUSED_MAX_TOKENS run the base GEMM in XLA beside the segmented kernels
  (`pallas_kernels.segmented`: token-expert pairs grouped by expert) when the pool is wide
  (`experts.use_segmented`), else beside two dense GEMMs, as "xla" does. "pallas" needs stacked
  weights (the GPU layout) and runs in the Pallas interpreter on the CPU. "packed" reads the
  `packed` weights (`adafuse_jax.packed.pack(model, adapters)`) instead of the model's: one
  matmul per input group gives the base outputs, every expert's shrink and the layer-wise
  routers' logits, then one batched expansion per group; any number of tokens.

  Attributes after the call:
    routes: every routing decision made, in order (one for "pregated", one per adapted module
      and layer for "layerwise", none for "lora"); for aux losses and statistics.
  """

  def __init__(self, adapters: MixtureOfLoRA, implementation: str = "xla",
               sere: SereSettings | None = None, packed=None, rows: dict | None = None):
    if sere is not None and adapters.cfg.mode != "pregated":
      raise ValueError("SERE re-routes pre-gated choices; it needs mode 'pregated'")
    self.sere = sere
    self._batch_shape = None
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation={implementation!r} must be one of {IMPLEMENTATIONS}")
    if adapters.cfg.route_context and implementation != "xla":
      raise ValueError("route_context routes on the running context, which only the 'xla'"
                       " implementation's full-sequence forward computes")
    if adapters.cfg.has_shared and implementation != "xla":
      raise ValueError(f"implementation {implementation!r} applies routed experts only; merge the"
                       " shared expert into the backbone first: fold_shared(model, adapters)"
                       " (Generator does it)")
    self.adapters = adapters
    self.cfg = adapters.cfg
    self.implementation = implementation
    self.routes: list[Route] = []
    self._active = None  # pre-gated: (ids, count, gate matrix) of the step, for the kernels
    self._table = None  # pre-gated prompts: the segment table of the segmented kernels
    self._shrinks: dict = {}  # (layer, group) -> (input, shrink) of the gathered kernels
    self._groups = None  # "packed": one matmul per (layer, input group), see adafuse_jax.packed
    # "xla" decode steps on the GPU: A^T and the routers' R^T (adafuse_jax.row_layout), or None.
    self.rows = rows if implementation == "xla" else None
    if implementation == "packed":
      from adafuse_jax.packed import GroupCache
      if packed is None:
        raise ValueError("implementation 'packed' needs the packed weights (adafuse_jax.packed."
                         "pack(model, adapters)); Generator(implementation='packed') makes them")
      self._groups = GroupCache(packed)
    self._deltas: dict = {}  # "packed": (layer, group) -> (input, {module: delta})

  def adapts(self, name: str, layer: int) -> bool:
    """Whether module `name` of `layer` carries experts."""
    return name in self.cfg.modules and layer >= self.cfg.first_layer

  @property
  def first_route(self) -> Route | None:
    return self.routes[0] if self.routes else None

  def __call__(self, name: str, layer: int, x: jax.Array, weights) -> jax.Array:
    if self._groups is not None:
      return self._packed(name, layer, x)
    if not self.adapts(name, layer):
      return x @ weights[layer]
    xf = x.reshape(-1, x.shape[-1])
    self._batch_shape = x.shape[:-1]
    experts, gates, dense = self.route(name, layer, xf)
    if (self.implementation != "xla" and not isinstance(weights, tuple)
        and xf.shape[0] <= FUSED_MAX_TOKENS):
      if self.implementation == "pallas":
        return self._gathered(name, layer, x, xf, weights, experts, gates)
      if use_fused_kernel(*experts.shape, self.cfg.num_experts):
        return self._fused(name, layer, x, xf, weights, experts, gates, dense)
    a, b = self.adapters.pool.factors(name, layer)
    a_t = self.rows[f"A_{name}"][layer] if self.rows is not None else None
    if self.cfg.has_shared:
      y = self._shared_and_routed(name, layer, xf, weights[layer], a, b, experts, gates, dense,
                                  a_t)
      return y.reshape(*x.shape[:-1], -1)
    if (xf.shape[0] > FUSED_MAX_TOKENS and self.implementation == "pallas"
        and not isinstance(weights, tuple) and use_segmented(*a.shape)):
      return self._segmented(name, layer, x, xf, weights, experts, gates)
    y = self._unmerged(xf, weights[layer], a, b, experts, gates, dense, a_t)
    return y.reshape(*x.shape[:-1], -1)

  def _unmerged(self, xf: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
                experts: jax.Array, gates: jax.Array, dense: jax.Array | None,
                a_t: jax.Array | None = None) -> jax.Array:
    """xf @ w + (alpha/r) Σ_k g_k (xf A_k) B_k in plain XLA, in xf's dtype: prompts that touch
    much of the pool as one GEMM with the expansion beside it (`dense_bias_output`), else the
    base matmul plus `expert_delta`. xf [N, in]; a [in, E, r]; b [E, r, out] -> [N, out]."""
    num_experts = a.shape[1]
    if xf.shape[0] > FUSED_MAX_TOKENS and not use_gather(*experts.shape, num_experts):
      if dense is None:
        dense = dense_gates(experts, gates, num_experts)
      return dense_bias_output(xf, w, a, b, dense, self.cfg.scale)
    y = xf @ w
    delta = expert_delta(xf, a, b, experts, gates, dense, a_t=a_t)
    return y + (delta * self.cfg.scale).astype(y.dtype)

  def _shared_and_routed(self, name: str, layer: int, xf: jax.Array, w: jax.Array, a: jax.Array,
                         b: jax.Array, experts, gates, dense, a_t) -> jax.Array:
    """The shared expert (its own SA, SB; with `tied_shared` the whole pool, a LoRA of rank
    E*r) through the plain LoRA's own path, `_unmerged` with one expert at gate 1, then the
    routed experts (times beta when tied) added in f32. A tied pool with beta = 0 therefore
    computes exactly what the LoRA of rank E*r computes, bit for bit in bf16 too, gradients
    included: with the shared term in another formulation (its expansion in f32), the bf16
    gradients of the same function left the LoRA's by 8% (tools/tied_numerics_probe.py).
    xf [N, in] -> [N, out] in xf's dtype."""
    if self.cfg.tied_shared:
      sa, sb = a.reshape(a.shape[0], 1, -1), b.reshape(1, -1, b.shape[-1])  # [in,1,E*r], [1,E*r,out]
    else:
      sa, sb = self.adapters.pool.factors(name, layer, "S")
      sa, sb = sa[:, None, :], sb[None]
    n = xf.shape[0]
    one = jnp.ones((n, 1), jnp.float32)
    shared = self._unmerged(xf, w, sa, sb, jnp.zeros((n, 1), jnp.int32), one, one)
    routed = expert_delta(xf, a, b, experts, gates, dense, a_t=a_t).astype(jnp.float32)
    if self.cfg.tied_shared:  # the routed experts again at beta * g
      routed = routed * getattr(self.adapters.pool, f"beta_{name}")[layer]
    return (shared.astype(jnp.float32) + routed * self.cfg.scale).astype(xf.dtype)

  def _packed(self, name: str, layer: int, x: jax.Array) -> jax.Array:
    """Base output, every expert's shrink and (layer-wise) the router's logits from the one
    packed matmul of x's input group; then the gated expansion as one small matmul."""
    y = self._groups.base(name, layer, x)
    if self.adapts(name, layer):
      group = input_group(name)
      deltas = cached_on_input(self._deltas, (layer, group), x,
                               lambda: self._packed_deltas(group, layer, x))
      y = y.astype(jnp.float32) + deltas[name]
    return y.reshape(*x.shape[:-1], -1).astype(x.dtype)

  def _packed_deltas(self, group: tuple[str, ...], layer: int, x: jax.Array) -> dict:
    """Every adapted module of the group at once: {module: delta [N, out] f32}. Layer-wise
    routers of the group share one top-k (their logits sit side by side); expansions of equal
    width run as one batched matmul."""
    from adafuse_jax.packed import expand

    xf = x.reshape(-1, x.shape[-1])
    self._batch_shape = x.shape[:-1]
    packed, num_experts = self._groups.packed, self.cfg.num_experts
    modules = tuple(m for m in group if m in self.cfg.modules)
    dense = {}
    if self.cfg.mode == "layerwise":
      logits = self._groups.block("router", modules, layer, x)  # [N, M, E]
      experts, gates = top_k_gates(logits, self.cfg.top_k)
      for i, m in enumerate(modules):
        self.routes.append(Route(experts[:, i], gates[:, i], logits[:, i]))
      all_dense = dense_gates(experts, gates, num_experts)  # [N, M, E]
      dense = {m: all_dense[:, i] for i, m in enumerate(modules)}
    else:  # pre-gated (one decision for every module) or plain LoRA
      shared = self.route(modules[0], layer, xf)[2]  # [N, E]
    deltas = {}
    for batch in packed.layout.expand_batches[group]:
      h = self._groups.block("shrink", batch, layer, x)  # [N, M, E*r]
      d = jnp.stack([dense[m] for m in batch], 1) if dense else shared[:, None]
      out = expand(h, d, packed.b[batch][layer], self.cfg.scale, x.dtype)
      deltas.update({m: out[:, i] for i, m in enumerate(batch)})
    return deltas

  def _gathered(self, name, layer, x, xf, weights, experts, gates):
    """Shrink of the active experts (one launch per group of modules sharing `x`), then the
    base matmul and the expansion in one launch (pallas_kernels/sgmv.py)."""
    from pallas_kernels.sgmv import active_experts, gathered_expand_matmul, gathered_shrink

    interpret = jax.default_backend() == "cpu"
    (ids, count, gmat), group = self._choices("_active", active_experts, name, experts, gates)
    h = cached_on_input(self._shrinks, (layer, group), x, lambda: gathered_shrink(
        xf, [self.adapters.pool.stacked(m)[0] for m in group], layer, ids, count, gmat,
        scale=self.cfg.scale, interpret=interpret))
    b_all = self.adapters.pool.stacked(name)[1]
    y = gathered_expand_matmul(xf, weights, layer, h, b_all, ids, count,
                               group=group.index(name), interpret=interpret)
    return y.reshape(*x.shape[:-1], -1)

  def _segmented(self, name, layer, x, xf, weights, experts, gates):
    """Prompts: the base GEMM in XLA plus the segmented kernels' delta (pallas_kernels/
    segmented.py: token-expert pairs grouped by expert, one shrink launch per group of modules
    sharing `x`, one expand launch per module)."""
    from pallas_kernels.segmented import SegmentTiles, segment_table, segmented_delta

    interpret = jax.default_backend() == "cpu"
    tiles = SegmentTiles.for_problem(experts.size, self.cfg.num_experts)
    table, group = self._choices("_table", functools.partial(segment_table,
                                                             block_m=tiles.block_m),
                                 name, experts, gates)
    pools = [self.adapters.pool.stacked(m) for m in group]
    deltas = cached_on_input(self._shrinks, ("segmented", layer, group), x, lambda: dict(zip(
        group, segmented_delta(xf, [a for a, _ in pools], [b for _, b in pools], layer, table,
                               scale=self.cfg.scale, tiles=tiles, interpret=interpret))))
    # The GEMM keeps the weights' dtype: asking XLA for an f32 product converts the whole
    # weight first (docs/benchmarks/h100-packed/README.md).
    y = (xf @ weights[layer]).astype(jnp.float32) + deltas[name]
    return y.astype(x.dtype).reshape(*x.shape[:-1], -1)

  def _choices(self, attr: str, build, name: str, experts, gates):
    """(`build(experts, gates, E)`, the modules it serves): a kernel's table of this module's
    choices. Pre-gated: built once per forward from the full gates ([N, k] or per layer
    [N, L, k]), kept in `attr`, and shared by the input group; layer-wise modules route on their
    own and plain LoRA has the single expert, so theirs serve the module alone."""
    if self.cfg.mode == "pregated":
      if getattr(self, attr) is None:
        route = self.routes[0]
        setattr(self, attr, build(route.experts, route.gates, self.cfg.num_experts))
      return getattr(self, attr), self._group(name)
    return build(experts, gates, self.cfg.num_experts), (name,)

  def _group(self, name: str) -> tuple[str, ...]:
    """The adapted modules that read the same input as `name`: one shrink launch serves them."""
    return tuple(m for m in input_group(name) if m in self.cfg.modules)

  def _fused(self, name, layer, x, xf, weights, experts, gates, dense):
    from pallas_kernels.expert_matmul import fused_expert_matmul

    if dense is None:
      dense = dense_gates(experts, gates, self.cfg.num_experts)
    pool = self.adapters.pool
    a_all, b_all = pool.stacked(name)  # [L, in, E, r], [L, E, r, out]
    num_layers, d_in, num_experts, r = a_all.shape
    h = jnp.dot(xf, a_all[layer].reshape(d_in, num_experts * r), preferred_element_type=jnp.float32)
    # Per-column gates; identical for every module of a pre-gated step, so XLA computes them once.
    g = jnp.repeat(dense.astype(jnp.float32), r, axis=-1) * self.cfg.scale
    y = fused_expert_matmul(xf, weights, layer, h, g, b_all.reshape(num_layers, num_experts * r, -1),
                            interpret=jax.default_backend() == "cpu")
    return y.reshape(*x.shape[:-1], -1)

  def _sere(self, experts: jax.Array) -> jax.Array:
    """Re-routes per batch step: the rows of one position are decoded together (a decode step
    of B sequences; for a prompt, position t of every row)."""
    from adafuse_jax.sere import reroute

    shape = self._batch_shape if len(self._batch_shape) == 2 else (experts.shape[0], 1)
    e = experts.reshape(*shape, -1)  # [B, T, k]
    sim = jnp.asarray(self.sere.similarity, jnp.float32)
    e = jax.vmap(lambda et: reroute(et, sim, self.sere.primary_k, self.sere.rho),
                 in_axes=1, out_axes=1)(e)
    return e.reshape(experts.shape)

  def route(self, name: str, layer: int, xf: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Experts [N, k], gates [N, k] and dense gates [N, E] (or None) for this module and layer."""
    mode = self.cfg.mode
    num_experts = self.cfg.num_experts
    if mode == "lora":
      n = xf.shape[0]
      experts, gates = jnp.zeros((n, 1), jnp.int32), jnp.ones((n, 1), jnp.float32)
      return experts, gates, gates
    if mode == "layerwise":
      if self.rows is not None:
        from adafuse_jax.row_layout import router_logits
        logits = router_logits(self.rows, name, layer, xf)
      else:
        logits = self.adapters.router(name, layer, xf)
      experts, gates = top_k_gates(logits, self.cfg.top_k)
      self.routes.append(Route(experts, gates, logits))
      return experts, gates, None
    # pregated: decide at the first adapted module, reuse everywhere after, dense gates included.
    if not self.routes:
      context = None
      if self.cfg.route_context:
        from adafuse_jax.routing import context_mean
        x3 = xf.reshape(*self._batch_shape, -1) if len(self._batch_shape) == 2 else xf[None]
        context = context_mean(x3, self.cfg.route_context).reshape(xf.shape).astype(xf.dtype)
      logits, layer_logits = self.adapters.router(xf, context)
      experts, gates = top_k_gates(logits, self.cfg.top_k)
      if layer_logits is not None:
        gates = gates_for(layer_logits, experts[:, None, :])  # [N, L, k]
      if self.sere is not None:  # after the gates: re-routing leaves the routing weights alone
        experts = self._sere(experts)
      if layer_logits is not None:
        self._dense = dense_gates(experts[:, None, :], gates, num_experts)  # [N, L, E]
      else:
        self._dense = dense_gates(experts, gates, num_experts)
      self.routes.append(Route(experts, gates, logits))
    route = self.routes[0]
    if route.gates.ndim == 3:
      return route.experts, route.gates[:, layer], self._dense[:, layer]
    return route.experts, route.gates, self._dense


def merge_lora(weights: dict[str, jax.Array], adapters: MixtureOfLoRA) -> dict[str, jax.Array]:
  """Folds a plain LoRA (mode "lora") into stacked weights: W[l] + (alpha/r) A[l] B[l].

  Args:
    weights: module name -> stacked [L, in, out] weight.
  Returns:
    the same mapping with every adapted module merged (others untouched).
  """
  if adapters.cfg.mode != "lora":
    raise ValueError("only a plain LoRA can be merged once; expert mixtures switch per token")
  out = dict(weights)
  for m in adapters.cfg.modules:
    a, b = adapters.pool.stacked(m)
    out[m] = _add_low_rank(weights[m], a[:, :, 0], b[:, 0], adapters.cfg)
  return out


def _add_low_rank(w: jax.Array, a: jax.Array, b: jax.Array, cfg: AdapterConfig) -> jax.Array:
  """w [L, in, out] + (alpha / r) a [L, in, r] @ b [L, r, out] in f32, on the layers that carry
  experts (from cfg.first_layer on), cast back to w's dtype."""
  delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
  adapted = (jnp.arange(delta.shape[0]) >= cfg.first_layer).astype(jnp.float32)[:, None, None]
  return (w.astype(jnp.float32) + cfg.scale * adapted * delta).astype(w.dtype)


def tied_as_lora(tied: MixtureOfLoRA) -> MixtureOfLoRA:
  """The plain LoRA of rank E*r whose factors are a tied pool's experts side by side (same
  scale alpha/r): what the tied pool computes with every beta at 0, and so what its training
  starts from. A [L, in, E, r] -> [L, in, 1, E*r]; B [L, E, r, out] -> [L, 1, E*r, out]."""
  cfg = tied.cfg
  if not cfg.tied_shared:
    raise UserError(f"tied_as_lora needs a tied pool (AdapterConfig.tied_shared); this one is"
                    f" mode {cfg.mode!r} without it")
  rank = cfg.num_experts * cfg.rank
  lora = MixtureOfLoRA(tied.model_cfg, cfg.replace(mode="lora", num_experts=1, rank=rank,
                                                   top_k=1, alpha=cfg.scale * rank,
                                                   tied_shared=False), layout="stacked")
  for m in cfg.modules:
    a, b = tied.pool.stacked(m)
    getattr(lora.pool, f"A_{m}").set_value(a.reshape(a.shape[0], a.shape[1], 1, rank))
    getattr(lora.pool, f"B_{m}").set_value(b.reshape(b.shape[0], 1, rank, b.shape[-1]))
  return lora


def fold_shared(model: LlamaModel, adapters: MixtureOfLoRA) -> tuple[LlamaModel, MixtureOfLoRA]:
  """Merges the shared expert into the backbone: W[l] + (alpha/r) SA[l] SB[l] per adapted module.

  Every token uses the shared expert with weight 1, so it is part of the model rather than of
  the per-token choice: folded once, it costs nothing at decode on any path. With
  `tied_shared` the shared expert is the whole pool (W[l] + (alpha/r) A[l] B[l] over all E*r
  ranks) and the routed experts keep B scaled by their layer's beta.
  Returns (a new model with those weights, the same adapters without the shared expert);
  adapters without one are returned unchanged with the model.
  """
  cfg = adapters.cfg
  if not cfg.has_shared:
    return model, adapters
  weights = model.stacked_weights()
  for m in cfg.modules:
    if cfg.tied_shared:
      a, b = adapters.pool.stacked(m)
      shared = a.reshape(*a.shape[:2], -1), b.reshape(b.shape[0], -1, b.shape[-1])
    else:
      shared = adapters.pool.stacked(m, "S")
    weights[m] = _add_low_rank(weights[m], *shared, cfg)
  folded = LlamaModel(model.cfg, weights=weights, dtype=model.dtype, layout=model.layout)
  routed = adapters._copy_into(cfg.replace(shared_rank=0, tied_shared=False), adapters.pool.layout)
  for m in cfg.modules if cfg.tied_shared else ():
    beta = getattr(adapters.pool, f"beta_{m}").get_value()
    var = getattr(routed.pool, f"B_{m}")
    value = var.get_value()
    if isinstance(value, tuple):  # "list" layout
      var.set_value(tuple((bl * beta[l]).astype(bl.dtype) for l, bl in enumerate(value)))
    else:
      var.set_value((value * beta[:, None, None, None]).astype(value.dtype))
  return folded, routed


def merged_model(model: LlamaModel, adapters: MixtureOfLoRA) -> LlamaModel:
  """A new model whose weights hold a plain LoRA folded in (same layout and dtype)."""
  weights = model.stacked_weights()
  weights.update(merge_lora(weights, adapters))
  return LlamaModel(model.cfg, weights=weights, dtype=model.dtype, layout=model.layout)
