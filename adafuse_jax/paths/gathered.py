"""Path "gathered": Pallas kernels that read only the experts a step uses.

Decode steps (at most `Thresholds.decode_max_tokens` tokens) run BGMV (`pallas_kernels.bgmv`):
one gated shrink launch per group of modules that share an input, reading only the step's active
experts, then the base matmul with the expansion folded in, one launch per module. Prompts run
the base GEMM in XLA beside SGMV (`pallas_kernels.sgmv`: token-expert pairs grouped by expert)
when the pool is wide (`Thresholds.use_segmented`), else beside two dense GEMMs, as path "xla"
does. The kernels need stacked weights (the GPU layout); on the CPU they run in the Pallas
interpreter, which is how CI tests them. A pre-gated step builds its kernels' tables once and
shares them with every layer.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import bgmv, sgmv

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.paths.base import DecodePath, Thresholds, cached_on_input
from adafuse_jax.paths.xla import XlaRuntime
from adafuse_jax.vocab import Mode, PathName


class GatheredRuntime(XlaRuntime):
  """BGMV for decode steps, SGMV for prompts on wide pools, XLA otherwise."""

  def __init__(self, adapters: MixtureOfLoRA, thresholds: Thresholds, sere=None, *,
               backend: str = "auto"):
    super().__init__(adapters, thresholds, sere)
    self.backend = backend
    self._tables: dict = {}  # pre-gated: one table per kernel, built once per forward
    self._shrinks: dict = {}  # (layer, group) -> (input, shrink) of the kernels

  def apply(self, name, layer, xf, weights, experts, gates, dense):
    if not isinstance(weights, tuple):  # the kernels read stacked weights in place
      if self.thresholds.is_decode(xf.shape[0]):
        return self._bgmv(name, layer, xf, weights, experts, gates)
      a_shape = self.adapters.pool.factors(name, layer)[0].shape
      if self.thresholds.use_segmented(*a_shape):
        return self._sgmv(name, layer, xf, weights, experts, gates)
    return super().apply(name, layer, xf, weights, experts, gates, dense)

  def _bgmv(self, name, layer, xf, weights, experts, gates):
    (ids, count, gmat), group = self._table("bgmv", bgmv.active_experts, name, experts, gates)
    pool = self.adapters.pool
    h = cached_on_input(self._shrinks, (layer, group), xf, lambda: bgmv.shrink(
        xf, [pool.stacked(m)[0] for m in group], layer, ids, count, gmat, scale=self.cfg.scale,
        backend=self.backend))
    return bgmv.expand_matmul(xf, weights, layer, h, pool.stacked(name)[1], ids, count,
                              group=group.index(name), backend=self.backend)

  def _sgmv(self, name, layer, xf, weights, experts, gates):
    tiles = sgmv.Tiles.get_default(experts.size, self.cfg.num_experts)
    build = lambda e, g, n: sgmv.segment_table(e, g, n, block_m=tiles.block_m)  # noqa: E731
    table, group = self._table("sgmv", build, name, experts, gates)
    pools = [self.adapters.pool.stacked(m) for m in group]
    deltas = cached_on_input(self._shrinks, ("sgmv", layer, group), xf, lambda: dict(zip(
        group, sgmv.delta(xf, [a for a, _ in pools], [b for _, b in pools], layer, table,
                          scale=self.cfg.scale, tiles=tiles, backend=self.backend))))
    # The GEMM keeps the weights' dtype: asking XLA for an f32 product converts the whole
    # weight first.
    y = (xf @ weights[layer]).astype(jnp.float32) + deltas[name]
    return y.astype(xf.dtype)

  def _table(self, kernel: str, build, name: str, experts, gates):
    """(`build(experts, gates, E)`, the modules it serves): a kernel's table of this module's
    choices. Pre-gated: built once per forward from the full gates ([N, k] or per layer
    [N, L, k]) and shared by the input group; layer-wise modules route on their own and plain
    LoRA has the single expert, so theirs serve the module alone."""
    if self.cfg.mode == Mode.PREGATED:
      if kernel not in self._tables:
        route = self.routes[0]
        self._tables[kernel] = build(route.experts, route.gates, self.cfg.num_experts)
      return self._tables[kernel], self.group(name)
    return build(experts, gates, self.cfg.num_experts), (name,)


class GatheredPath(DecodePath):
  name = PathName.GATHERED
  summary = ("Pallas BGMV for decode steps and SGMV for prompts: only the step's experts are"
             " read, the expansion fused into the base matmul (GPU; interpreted on the CPU)")

  def note(self, layout: str) -> str | None:
    if layout != "stacked":
      return ("on the CPU the weights are held per layer, so the experts take the XLA"
              " formulation; the gathered kernels apply on a GPU")
    return None

  def runtime(self, adapters, derived=None, *, sere=None, backend="auto"):
    return GatheredRuntime(adapters, self.thresholds, sere, backend=backend)
