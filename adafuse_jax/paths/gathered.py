"""Path "gathered": Pallas kernels that read only the experts a step uses.

Decode steps (at most `Thresholds.decode_max_tokens` tokens) run BGMV (`pallas_kernels.bgmv`):
one gated shrink launch per group of modules that share an input, reading only the step's active
experts, then the base matmul with the expansion folded in, one launch per module; for a wide pool
or a batch of many rows (`Thresholds.fuses_base`) XLA's GEMM runs the base and an expansion-only
kernel adds the active experts' B beside it (there a Pallas base GEMM reads the weights slower
than XLA's). Prompts run
the base GEMM in XLA beside SGMV (`pallas_kernels.sgmv`: token-expert pairs grouped by expert)
when the pool is wide (`Thresholds.use_segmented`), else beside two dense GEMMs, as path "xla"
does. The kernels need stacked weights (the GPU layout); on the CPU they run in the Pallas
interpreter, which is how CI tests them. A pre-gated step builds its kernels' tables once and
shares them with every layer. On a tensor-parallel mesh each kernel runs per shard
(`adafuse_jax.parallel.on_shards`): a column-split module on its slice of the weight's and B's
columns, a row-split one on its slice of the input, ending in one `psum`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import bgmv, sgmv

from adafuse_jax import parallel
from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.model.layers import matmul
from adafuse_jax.paths.base import DecodePath, Thresholds, cached_on_input
from adafuse_jax.paths.xla import XlaRuntime
from adafuse_jax.vocab import Mode, PathName


class GatheredRuntime(XlaRuntime):
  """BGMV for decode steps, SGMV for prompts on wide pools, XLA otherwise."""

  def __init__(self, adapters: MixtureOfLoRA, thresholds: Thresholds, sere=None, *,
               backend: str = "auto", mesh: jax.sharding.Mesh | None = None):
    super().__init__(adapters, thresholds, sere)
    self.backend = backend
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
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
    tables, group = self._table("bgmv", bgmv.active_experts, name, experts, gates)
    pool = self.adapters.pool
    a_pools = [pool.stacked(m)[0] for m in group]
    b = pool.stacked(name)[1]
    fused = self.thresholds.fuses_base(self.cfg.num_experts, self.cfg.rank, xf.shape[0])

    def shrink(x, tables, *a_pools):
      return bgmv.shrink(x, list(a_pools), layer, *tables, scale=self.cfg.scale,
                         backend=self.backend)

    def expand(x, w, h, b, tables):
      ids, count, _ = tables
      if fused:
        return bgmv.expand_matmul(x, w, layer, h, b, ids, count, group=group.index(name),
                                  backend=self.backend)
      # A wide pool: XLA's GEMM for the base (in the weights' dtype: an f32 product would
      # convert the whole weight first), the expansion of the active experts beside it.
      delta = bgmv.expand(h, b, layer, ids, count, group=group.index(name), rows=x.shape[0],
                          backend=self.backend)
      return (matmul(x, w[layer]).astype(jnp.float32) + delta).astype(x.dtype)

    if self.mesh is None:
      h = cached_on_input(self._shrinks, (layer, group), xf,
                          lambda: shrink(xf, tables, *a_pools))
      return expand(xf, weights, h, b, tables)
    split = parallel.module_split(name)
    if split.partial:  # a row-split module is alone in its group: shrink, expand, one psum
      return parallel.on_shards(
          lambda x, w, b, tables, a: jax.lax.psum(
              expand(x, w, shrink(x, tables, a), b, tables), parallel.AXIS),
          self.mesh, (split.x, split.w, split.b, P(), split.a), split.y,
      )(xf, weights, b, tables, a_pools[0])
    h = cached_on_input(self._shrinks, (layer, group), xf, lambda: parallel.on_shards(
        shrink, self.mesh, (P(), P(), *[split.a] * len(a_pools)), P())(xf, tables, *a_pools))
    return parallel.on_shards(expand, self.mesh, (split.x, split.w, P(), split.b, P()),
                              split.y)(xf, weights, h, b, tables)

  def _sgmv(self, name, layer, xf, weights, experts, gates):
    tiles = sgmv.Tiles.get_default(experts.size, self.cfg.num_experts)
    build = lambda e, g, n: sgmv.segment_table(e, g, n, block_m=tiles.block_m)  # noqa: E731
    table, group = self._table("sgmv", build, name, experts, gates)
    pools = [self.adapters.pool.stacked(m) for m in group]

    def deltas(x, table, a_pools, b_pools):
      return sgmv.delta(x, a_pools, b_pools, layer, table, scale=self.cfg.scale, tiles=tiles,
                        backend=self.backend)

    if self.mesh is not None:
      split = parallel.module_split(name)
      per_shard = (lambda *args: [jax.lax.psum(d, parallel.AXIS) for d in deltas(*args)]
                   ) if split.partial else deltas
      run = parallel.on_shards(per_shard, self.mesh,
                               (split.x, P(), [split.a] * len(pools), [split.b] * len(pools)),
                               [split.y] * len(pools))
    else:
      run = deltas
    out = cached_on_input(self._shrinks, ("sgmv", layer, group), xf, lambda: dict(zip(
        group, run(xf, table, [a for a, _ in pools], [b for _, b in pools]))))
    # The GEMM keeps the weights' dtype: asking XLA for an f32 product converts the whole
    # weight first.
    y = matmul(xf, weights[layer]).astype(jnp.float32) + out[name]
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
             " read, the expansion fused into the base matmul (beside XLA's for wide pools;"
             " GPU; interpreted on the CPU)")

  def note(self, layout: str) -> str | None:
    if layout != "stacked":
      return ("on the CPU the weights are held per layer, so the experts take the XLA"
              " formulation; the gathered kernels apply on a GPU")
    return None

  def experts_read(self, num_experts, distinct):
    return distinct  # the kernels' loops run over the step's active set only

  def runtime(self, adapters, derived=None, *, sere=None, backend="auto", mesh=None):
    return GatheredRuntime(adapters, self.thresholds, sere, backend=backend, mesh=mesh)
