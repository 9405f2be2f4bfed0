"""The seam every decode path plugs into.

A forward pass applies each linear module through a `LinearFn` `(name, layer, x, weights) -> y`
(`adafuse_jax.model.llama`). A decode path supplies two things:

- `AdapterRuntime`: the `LinearFn` of one forward pass with adapters. This base class holds what
  every path shares: *routing* (once at the first adapted module for "pregated" and reused by
  every layer; at every adapted module for "layerwise"; the single expert for "lora"), SERE
  re-routing of a batch's pre-gated choices, and the record of what was routed. A path's
  subclass implements `apply`: how the chosen experts meet the base matmul.
- `DecodePath`: the path itself, as the registry (`adafuse_jax.paths.registry`) lists it: what
  it cannot run (`blocker`), the derived weights it builds once per Generator (`prepare`), the
  runtime it hands a forward pass, and the backbone's `LinearFn` when there are no adapters.

`Thresholds` is the size policy the paths share (which formulation a token count or a pool size
takes); its numbers live in the registry.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.adapters.routing import context_mean, dense_gates, gates_for, top_k_gates
from adafuse_jax.adapters.sere import SereSettings, reroute
from adafuse_jax.config import AdapterConfig, input_group
from adafuse_jax.errors import UserError
from adafuse_jax.model.llama import LinearFn, LlamaModel, plain_linear
from adafuse_jax.vocab import Mode, PathName


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """When a path switches formulation with the problem's size (the numbers: `registry.THRESHOLDS`).

  decode_max_tokens: a step of at most this many tokens is a decode step (matrix-vector kernels,
    gathers); longer ones are prompts (GEMMs).
  gather_max_share: the XLA path gathers the chosen experts when a step's N·k choices touch at
    most this share of the pool, else it runs all E densely.
  segmented_min_share: prompts take the segmented kernels (SGMV) rather than two dense GEMMs once
    the pool's E·r columns exceed this share of the module's input width.
  fused_base_max_width, fused_base_max_rows: the gathered path's decode kernels fold the base
    matmul into the expansion (one Pallas launch per module) while the pool's E·r columns are at
    most the width and the step has at most the rows; wider pools and larger batches run XLA's
    GEMM for the base beside an expansion-only kernel.
  """

  decode_max_tokens: int
  gather_max_share: float
  segmented_min_share: float
  fused_base_max_width: int = 512
  fused_base_max_rows: int = 1

  def is_decode(self, num_tokens: int) -> bool:
    return num_tokens <= self.decode_max_tokens

  def use_gather(self, num_tokens: int, top_k: int, num_experts: int) -> bool:
    return num_tokens * top_k <= self.gather_max_share * num_experts

  def use_segmented(self, d_in: int, num_experts: int, rank: int) -> bool:
    return num_experts * rank > self.segmented_min_share * d_in

  def fuses_base(self, num_experts: int, rank: int, rows: int) -> bool:
    return (num_experts * rank <= self.fused_base_max_width
            and rows <= self.fused_base_max_rows)


@dataclasses.dataclass
class Route:
  """One routing decision. experts, gates: [N, k] (gates [N, L, k] with per-layer gates)."""

  experts: jax.Array
  gates: jax.Array
  logits: jax.Array | None


def cached_on_input(store: dict, key, x: jax.Array, compute):
  """`compute()` once per key for the same input `x` within one trace: the modules of an input
  group share work, and a different input (another call of the model) recomputes."""
  hit = store.get(key)
  if hit is None or hit[0] is not x:
    store[key] = hit = (x, compute())
  return hit[1]


class AdapterRuntime:
  """`LinearFn` for one forward pass: y = x @ w + (alpha / r) Σ_k g_k (x A_k) B_k.

  Subclasses implement `apply`; the base routes and leaves unadapted modules to `base`.

  Attributes after the call:
    routes: every routing decision made, in order (one for "pregated", one per adapted module
      and layer for "layerwise", none for "lora"); for aux losses and statistics.
  """

  def __init__(self, adapters: MixtureOfLoRA, thresholds: Thresholds,
               sere: SereSettings | None = None):
    if sere is not None and adapters.cfg.mode != Mode.PREGATED:
      raise UserError("SERE re-routes pre-gated choices; it needs mode 'pregated'")
    self.adapters = adapters
    self.cfg: AdapterConfig = adapters.cfg
    self.thresholds = thresholds
    self.sere = sere
    self.routes: list[Route] = []
    self._batch_shape: tuple[int, ...] | None = None
    self._dense = None

  def adapts(self, name: str, layer: int) -> bool:
    """Whether module `name` of `layer` carries experts."""
    return name in self.cfg.modules and layer >= self.cfg.first_layer

  @property
  def first_route(self) -> Route | None:
    return self.routes[0] if self.routes else None

  def group(self, name: str) -> tuple[str, ...]:
    """The adapted modules that read the same input as `name`: one launch can serve them."""
    return tuple(m for m in input_group(name) if m in self.cfg.modules)

  def __call__(self, name: str, layer: int, x: jax.Array, weights) -> jax.Array:
    if not self.adapts(name, layer):
      return self.base(name, layer, x, weights)
    xf = x.reshape(-1, x.shape[-1])
    self._batch_shape = x.shape[:-1]
    experts, gates, dense = self.route(name, layer, xf)
    y = self.apply(name, layer, xf, weights, experts, gates, dense)
    return y.reshape(*x.shape[:-1], -1)

  def base(self, name: str, layer: int, x: jax.Array, weights) -> jax.Array:
    """An unadapted module: the backbone's matmul."""
    return plain_linear(name, layer, x, weights)

  def apply(self, name: str, layer: int, xf: jax.Array, weights, experts: jax.Array,
            gates: jax.Array, dense: jax.Array | None) -> jax.Array:
    """xf [N, in] @ weights[layer] plus the chosen experts' delta -> [N, out] in xf's dtype.
    experts, gates [N, k] (this layer's gates); dense [N, E] or None. Every path implements it,
    except one that replaces `__call__` whole (`PackedRuntime`)."""
    raise NotImplementedError(f"{type(self).__name__} implements neither apply nor __call__")

  def router_logits(self, name: str, layer: int, xf: jax.Array) -> jax.Array:
    """Layer-wise router logits [N, E] (f32) of one module; a path may read another layout."""
    return self.adapters.router(name, layer, xf)

  def route(self, name: str, layer: int, xf: jax.Array
            ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Experts [N, k], gates [N, k] and dense gates [N, E] (or None) for this module and layer."""
    mode = self.cfg.mode
    num_experts = self.cfg.num_experts
    if mode == Mode.LORA:
      n = xf.shape[0]
      experts, gates = jnp.zeros((n, 1), jnp.int32), jnp.ones((n, 1), jnp.float32)
      return experts, gates, gates
    if mode == Mode.LAYERWISE:
      logits = self.router_logits(name, layer, xf)
      experts, gates = top_k_gates(logits, self.cfg.top_k)
      self.routes.append(Route(experts, gates, logits))
      return experts, gates, None
    # pregated: decide at the first adapted module, reuse everywhere after, dense gates included.
    if not self.routes:
      context = None
      if self.cfg.route_context:
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

  def _sere(self, experts: jax.Array) -> jax.Array:
    """Re-routes per batch step: the rows of one position are decoded together (a decode step
    of B sequences; for a prompt, position t of every row)."""
    shape = self._batch_shape if len(self._batch_shape) == 2 else (experts.shape[0], 1)
    e = experts.reshape(*shape, -1)  # [B, T, k]
    sim = jnp.asarray(self.sere.similarity, jnp.float32)
    e = jax.vmap(lambda et: reroute(et, sim, self.sere.primary_k, self.sere.rho),
                 in_axes=1, out_axes=1)(e)
    return e.reshape(experts.shape)


class DecodePath(abc.ABC):
  """One way of applying experts, as the registry lists it. Subclasses set `name`, implement
  `runtime` and override what differs; the defaults are those of a path that reads the model's
  own weights."""

  name: PathName
  summary: str = ""
  merges: bool = False  # decode steps switch experts into the weights (`adafuse_jax.paths.merged`)

  def __init__(self, thresholds: Thresholds):
    self.thresholds = thresholds

  def blocker(self, adapter_cfg: AdapterConfig | None, layout: str) -> str | None:
    """Why this path cannot run these adapters (None: backbone) in this weight layout, with
    the fix; None when it can. By default: every path but "xla" applies routed experts alone
    to one token's own hidden state."""
    if adapter_cfg is None:
      return None
    if adapter_cfg.route_context:
      return ("route_context routes on the running context, which only path 'xla''s"
              " full-sequence forward computes")
    if adapter_cfg.has_shared:
      return ("it applies routed experts only; merge the shared expert into the backbone first:"
              " fold_shared(model, adapters) (Generator does it)")
    return None

  def note(self, layout: str) -> str | None:
    """A remark for the user about how this path runs in this weight layout, or None."""
    return None

  def prepare(self, model: LlamaModel, adapters: MixtureOfLoRA | None, *,
              release: bool = False) -> Any:
    """Derived weights the compiled steps read (a pytree, or None), built once per Generator.
    `release` (where supported) frees the model's and the pool's weights as it goes."""
    return None

  def experts_read(self, num_experts: int, distinct: float | None) -> float | None:
    """How many experts' factors one decode step of this path reads, given the pool's size and
    the step's measured distinct experts (None: not measured); None where it depends on more
    than these (then a floor counts the most a step can use)."""
    return None

  def extra_bytes(self, model: LlamaModel, adapters: MixtureOfLoRA) -> int:
    """Device bytes `prepare` adds to the model and the pool."""
    return 0

  @abc.abstractmethod
  def runtime(self, adapters: MixtureOfLoRA, derived: Any = None, *,
              sere: SereSettings | None = None, backend: str = "auto",
              mesh: "jax.sharding.Mesh | None" = None) -> AdapterRuntime:
    """The `LinearFn` of one forward pass of these adapters, reading `derived` (`prepare`).
    `mesh`: the tensor-parallel mesh the arrays lie on (`adafuse_jax.parallel`), for paths
    whose Pallas kernels run per shard; XLA's own matmuls are partitioned without it."""

  def backbone(self, derived: Any = None, *, backend: str = "auto",
               mesh: "jax.sharding.Mesh | None" = None) -> LinearFn:
    """The `LinearFn` of a pass without adapters (`backend`, `mesh`: as `runtime`'s)."""
    del backend, mesh
    return plain_linear

  def reads_own_weights(self) -> bool:
    """Whether the compiled steps read the model's linear weights (False: a derived copy)."""
    return True
