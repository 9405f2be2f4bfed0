"""Path "packed": the backbone's weights, every expert's A and the layer-wise routers of
the modules that read the same input, concatenated into one matrix per layer.

Why: at batch-1 decode an adapted module's extra work is tiny (E·r = 128 columns beside 4096),
but as separate XLA ops it costs launches and, worse, XLA:GPU turns a matrix-vector product with
few output columns (a router `x @ [in, E]`, a shrink `x @ [in, E·r]`) into a column reduction
that reads its operand slowly (12.5 of the
layer-wise step's 19 ms on the H100). Appended to the backbone's matrix they ride in the GEMV that streams the weights anyway:

  group (q, k, v), per layer:  x @ [W_q | W_k | W_v | A_q | A_k | A_v | R_q | R_k | R_v]
                                    base outputs      all experts' shrink   router logits

then per adapted module the gates select the experts (dense over E, zeros elsewhere) and one
small matmul expands: y = base + (alpha/r) · (h ⊙ gates) @ B_flat, B_flat = B[l] as [E·r, out],
stored transposed ([out, E·r]) so that for one token the contraction runs along each row's
contiguous E·r elements: XLA:GPU then emits a row reduction, where [E·r, out] gave a column
reduction that read B slowly (the pre-gated step 1.131x the backbone's packed step against
1.082x transposed, H200 batch 1, `tools/expand_probe.py`; docs/benchmarks/h200/expand/).
Reading every expert's A and B costs E·r·(in+out) bytes per module (~5% of the weights at E=8,
r=16 on the 7B shape), paid to run with no gather and no router launch at all. The same packing
serves the backbone (q/k/v and gate/up as one matmul each) and prompts, where the extra columns
are ~3% more FLOPs.

The packing is a copy of the adapted groups' weights, made once per Generator (the model's
own matrices are then not read by the compiled steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import swiglu_down as swiglu_down_op

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.adapters.routing import dense_gates, top_k_gates
from adafuse_jax.config import INPUT_GROUPS, ModelConfig, input_group
from adafuse_jax.errors import UserError
from adafuse_jax.model.layers import matmul
from adafuse_jax.model.llama import LlamaModel, per_layer
from adafuse_jax.paths.base import AdapterRuntime, DecodePath, Route, cached_on_input
from adafuse_jax.vocab import Mode, PathName


@dataclasses.dataclass(frozen=True)
class Segment:
  """Columns [start, start + width) of a group's packed output."""

  start: int
  width: int


@dataclasses.dataclass(frozen=True)
class PackLayout:
  """Where each module's base output, shrink and router logits sit in its group's columns.

  base, shrink, router: module name -> Segment.
  expand_batches: per group, the adapted modules whose expansions run as one batched matmul
    (same output width: q/k/v of a model without GQA, gate/up always).
  """

  base: dict
  shrink: dict
  router: dict
  expand_batches: dict


def pack_layout(model_cfg: ModelConfig, adapter_modules: tuple[str, ...], expert_cols: int,
                router_cols: int) -> PackLayout:
  """Column layout: per group, base outputs, then E·r shrink columns per adapted module, then
  router_cols router logits per adapted module (0 for a pre-gated or plain LoRA pool)."""
  shapes = model_cfg.linear_shapes()
  base, shrink, router, batches = {}, {}, {}, {}
  for group in INPUT_GROUPS:
    by_width: dict[int, list[str]] = {}
    for m in group:
      if m in adapter_modules:
        by_width.setdefault(shapes[m][1], []).append(m)
    batches[group] = tuple(tuple(ms) for ms in by_width.values())
    col = 0
    for m in group:
      base[m] = Segment(col, shapes[m][1])
      col += shapes[m][1]
    for m in group:
      if m in adapter_modules:
        shrink[m] = Segment(col, expert_cols)
        col += expert_cols
    for m in group:
      if m in adapter_modules and router_cols:
        router[m] = Segment(col, router_cols)
        col += router_cols
  return PackLayout(base, shrink, router, batches)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class PackedWeights:
  """Per group, the packed matrices; per adapted module, B flattened.

  w: group tuple -> [L, in, columns] (or a tuple of L [in, columns] in the "list" layout).
  b: expand batch (tuple of modules) -> [L, M, out, E·r] (or a tuple of L [M, out, E·r]): B
    transposed, see the module's docstring.
  layout: the PackLayout (static).
  """

  w: dict
  b: dict
  layout: PackLayout

  def tree_flatten(self):
    wk, bk = tuple(self.w), tuple(self.b)
    return ([self.w[k] for k in wk], [self.b[k] for k in bk]), (wk, bk, self.layout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    wk, bk, layout = aux
    return cls(dict(zip(wk, children[0])), dict(zip(bk, children[1])), layout)


def pack(model, adapters=None, *, release: bool = False) -> PackedWeights:
  """Packs a model's linear weights (and an adapter pool's A, B and layer-wise routers).

  Args:
    model: a LlamaModel (any layout; the packing follows it).
    adapters: a MixtureOfLoRA or None (the backbone alone, q/k/v and gate/up fused).
    release: delete the model's linear weights and the pool's experts as soon as they are
      packed (their device memory is freed; `model` and `adapters` can no longer run). The
      peak is then the packing plus one group, not the packing plus the model plus the pool:
      what lets a 7B with 64 rank-64 experts per module (a pool as large as the model) pack on
      an 80 GB GPU.
  """
  cfg = model.cfg
  modules = adapters.cfg.modules if adapters is not None else ()
  layerwise = adapters is not None and adapters.cfg.mode == Mode.LAYERWISE
  e = adapters.cfg.num_experts if adapters is not None else 0
  r = adapters.cfg.rank if adapters is not None else 0
  layout = pack_layout(cfg, modules, e * r, e if layerwise else 0)
  dtype = model.dtype
  pools = {m: adapters.pool.stacked(m) for m in modules}  # (A [L, in, E, r], B [L, E, r, out])
  w, b = {}, {}
  for group in INPUT_GROUPS:
    parts = [model.linear_weight(m) for m in group]  # [L, in, out]
    for m in group:
      if m in modules:
        a = pools[m][0]
        parts.append(a.reshape(*a.shape[:2], e * r))
    for m in group:
      if m in layout.router:
        parts.append(getattr(adapters.router, f"w_{m}").get_value())  # [L, in, E]
    w[group] = _concat(parts, dtype, model.layout)
    del parts
    if release:  # a group of one unadapted module packs to the very same array: keep it
      for m in group:
        _delete(getattr(model, m).get_value(), keep=w[group])
        if m in modules:
          _delete(getattr(adapters.pool, f"A_{m}").get_value(), pools[m][0], keep=w[group])
  for batches in layout.expand_batches.values():
    for batch in batches:
      bs = [pools[m][1] for m in batch]
      bb = jnp.stack([jnp.swapaxes(x.reshape(x.shape[0], e * r, x.shape[-1]), -1, -2)
                      for x in bs], axis=1).astype(dtype)
      b[batch] = per_layer(bb) if model.layout == "list" else bb
      del bs
      if release:
        for m in batch:
          _delete(getattr(adapters.pool, f"B_{m}").get_value(), pools[m][1])
  return PackedWeights(w, b, layout)


def _delete(*values, keep=()) -> None:
  """Frees the device buffers of arrays (or tuples of them) at once, not when collected, except
  the arrays in `keep`."""
  kept = {id(x) for x in jax.tree.leaves(keep)}
  for leaf in jax.tree.leaves(values):
    if isinstance(leaf, jax.Array) and id(leaf) not in kept and not leaf.is_deleted():
      leaf.delete()


def _concat(parts, dtype, layout: str):
  out = jnp.concatenate([p.astype(dtype) for p in parts], axis=-1)
  return per_layer(out) if layout == "list" else out


class GroupCache:
  """One packed matmul per (layer, group) of a forward pass: the first module of a group
  computes it, the others read it back (keyed on the input's identity, so a different input
  recomputes)."""

  def __init__(self, packed: PackedWeights):
    self.packed = packed
    self._out: dict = {}

  def __call__(self, name: str, layer: int, x: jax.Array) -> jax.Array:
    """Packed output [N, columns] in x's dtype for x [..., in]."""
    group = input_group(name)
    # In the weights' dtype, as the backbone's `x @ W`: asking XLA:GPU for an f32 result of
    # bf16 operands converts the whole weight to f32 first (measured 4x the backbone's step);
    # consumers upcast their slices (an f32 copy of the whole output costs a pass in prefill).
    return cached_on_input(self._out, (layer, group), x,
                           lambda: matmul(x.reshape(-1, x.shape[-1]), self.packed.w[group][layer]))

  def base(self, name: str, layer: int, x: jax.Array) -> jax.Array:
    """The backbone's output of module `name`: [N, out] in x's dtype."""
    seg = self.packed.layout.base[name]
    return self(name, layer, x)[:, seg.start:seg.start + seg.width]

  def block(self, kind: str, names: tuple[str, ...], layer: int, x: jax.Array) -> jax.Array:
    """The `kind` ("shrink" or "router") columns of several modules of one group, [N, M, width]:
    one slice when they sit side by side (they do for a whole group or an expand batch of a
    Llama block), else stacked."""
    segs = [getattr(self.packed.layout, kind)[m] for m in names]
    out = self(names[0], layer, x)
    width = segs[0].width
    if all(s.start == segs[0].start + i * width and s.width == width for i, s in enumerate(segs)):
      block = out[:, segs[0].start:segs[0].start + len(segs) * width]
      return block.reshape(out.shape[0], len(segs), width)
    return jnp.stack([out[:, s.start:s.start + s.width] for s in segs], axis=1)


MlpKernel = Callable[..., jax.Array]  # (gu, w, inter, low_rank, layer=) -> [N, C] f32
# Rows up to which the packed step's own kernels take the MLP's tail and q/k/v's delta: both
# grids run a program per row, each reading its weights again (from L2 at best), where XLA's
# GEMMs read them once for every row; they are decode kernels for a few sequences.
OWN_KERNELS_MAX_ROWS = 4


def few_rows(x: jax.Array) -> bool:
  """Whether x [..., in] has few enough rows for the packed step's own kernels."""
  return math.prod(x.shape[:-1]) <= OWN_KERNELS_MAX_ROWS


def mlp_kernel(backend: str, mesh=None) -> MlpKernel | None:
  """The kernel a packed step runs its MLP's tail with (SwiGLU, the gate and up experts' delta,
  down: `pallas_kernels.swiglu_down`), or None for XLA's kernels module by module. Backend
  "triton" asks for it; "auto" keeps XLA's, which ran the 7B step faster on the H200
  (docs/benchmarks/h200/own-kernels/). Not on a tensor-parallel mesh (the kernel would need
  each shard's own call)."""
  if backend == "triton" and mesh is None:
    return functools.partial(swiglu_down_op.swiglu_down, backend="triton")
  return None


class MlpTail:
  """The MLP's tail of a packed step in one kernel: the fused gate/up matmul's output (base
  outputs, then the modules' shrink), its experts' delta and SwiGLU in the prologue of the down
  matmul ([W_down | A_down]), then down's own expansion. `LlamaModel` calls it through
  `mlp_down`."""

  def __init__(self, groups: GroupCache, inter: int, kernel: MlpKernel):
    self.groups = groups
    self.inter = inter
    self.kernel = kernel

  @classmethod
  def of(cls, groups: GroupCache, kernel: MlpKernel | None) -> "MlpTail | None":
    """The tail on these packed groups with `kernel`, or None without one."""
    return None if kernel is None else cls(groups, groups.packed.layout.base["gate"].width, kernel)

  def __call__(self, layer: int, x: jax.Array, gate_up: swiglu_down_op.LowRank | None = None,
               down_delta=None) -> jax.Array:
    """x [..., D] normed -> down's output [..., D] in x's dtype. gate_up: the gate and up
    modules' delta (their B stacked over layers as the packed weights are); down_delta(h
    [N, 1, E·r]) -> [N, D] f32: down's, from its shrink."""
    packed = self.groups.packed
    gu = self.groups("gate", layer, x)  # [N, 2I (+ shrink)]
    w = packed.w[("down",)]
    # Stacked weights go whole with their layer, which the kernel reads in place: a slice
    # handed to a custom call is a copy of it (a 90 MB one for the 7B down matrix).
    stacked = not isinstance(w, tuple)
    y = self.kernel(gu, w if stacked else w[layer], self.inter, gate_up,
                    layer=layer if stacked else None)  # [N, D (+ E·r)] f32
    seg = packed.layout.base["down"]
    out = y[:, seg.start:seg.start + seg.width]
    if down_delta is not None:
      s = packed.layout.shrink["down"]
      out = out + down_delta(y[:, None, s.start:s.start + s.width].astype(x.dtype))
    return out.astype(x.dtype).reshape(*x.shape[:-1], -1)


class PackedBackbone:
  """`LinearFn` of the backbone on packed weights (q/k/v and gate/up one matmul each)."""

  def __init__(self, packed: PackedWeights, mlp: MlpKernel | None = None):
    self.groups = GroupCache(packed)
    self._tail = MlpTail.of(self.groups, mlp)

  def __call__(self, name: str, layer: int, x: jax.Array, weights) -> jax.Array:
    del weights  # the packed copy is read instead
    return self.groups.base(name, layer, x).reshape(*x.shape[:-1], -1)

  def mlp_down(self, layer: int, x: jax.Array) -> jax.Array | None:
    """SwiGLU and down in one kernel (`MlpTail`) where the path fuses them, else None."""
    if self._tail is None or not few_rows(x):
      return None
    return self._tail(layer, x)


def expand(h: jax.Array, gates: jax.Array, b_t: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Σ_e gate[:, m, e] · h_e @ B_m,e for M modules at once: one batched matmul.

  h: [N, M, E·r] shrink of every expert; gates: [N, M, E·r] f32, each expert's gate (times the
  pool's scale, 0 for unchosen experts) repeated over its r columns, or [N, 1, E·r] when every
  module shares them (pre-gated); b_t: [M, out, E·r], B transposed.
  Returns [N, M, out] f32.
  """
  # The gated shrink in the weights' dtype (an f32 operand would have XLA:GPU convert all of B
  # to f32 first, see GroupCache), accumulated and returned in f32 by the dot itself.
  hg = (h.astype(jnp.float32) * gates).astype(dtype)
  return jnp.einsum("nmk,mok->nmo", hg, b_t, preferred_element_type=jnp.float32)


def expert_columns(dense: jax.Array, rank: int, scale: float) -> jax.Array:
  """[..., E] gates -> [..., E·r] f32: each expert's gate times `scale` over its r columns."""
  return jnp.repeat(dense.astype(jnp.float32) * scale, rank, axis=-1)


class PackedRuntime(AdapterRuntime):
  """Reads the packed weights instead of the model's: one matmul per input group gives the base
  outputs, every expert's shrink and the layer-wise routers' logits; then one batched expansion
  per group of modules of equal width. Any number of tokens."""

  def __init__(self, adapters: MixtureOfLoRA, thresholds, sere=None, *, packed: PackedWeights,
               mlp: MlpKernel | None = None, qkv_in_attention: bool = False):
    if packed is None:
      raise UserError("path 'packed' needs the packed weights (adafuse_jax.paths.packed."
                      "pack(model, adapters)); Generator(path='packed') makes them")
    super().__init__(adapters, thresholds, sere)
    self._groups = GroupCache(packed)
    self._deltas: dict = {}  # (layer, group) -> (input, {module: delta})
    self._tail = MlpTail.of(self._groups, mlp)
    self._qkv_in_attention = qkv_in_attention

  def qkv_parts(self, layer: int, x: jax.Array):
    """q, k, v [B, T, H, hd] before their expert delta, and the delta (`layers.QkvDelta`) for
    the appending attention kernel to add (`LlamaModel` asks only where one runs): with one
    decision for every module, q, k and v all adapted and as many query as KV heads (their B
    then one [L, 3·out, E·r] array, a view of the packed one); None otherwise."""
    qkv = ("q", "k", "v")
    packed = self._groups.packed
    if (not self._qkv_in_attention or self.cfg.mode == Mode.LAYERWISE
        or not all(self.adapts(m, layer) for m in qkv) or qkv not in packed.b
        or not few_rows(x)):
      return None
    from pallas_kernels.decode_attention import QkvLowRank

    from adafuse_jax.model.layers import QkvDelta
    xf = x.reshape(-1, x.shape[-1])
    self._batch_shape = x.shape[:-1]
    shared = self.route("q", layer, xf)[2]  # [N, E]
    gates = expert_columns(shared, self.cfg.rank, self.cfg.scale)  # [N, E·r]
    b = packed.b[qkv]  # [L, 3, out, E·r] or L of [3, out, E·r]
    if isinstance(b, tuple):
      b_t, at = b[layer].reshape(-1, b[layer].shape[-1]), None
    else:
      b_t, at = b.reshape(b.shape[0], -1, b.shape[-1]), layer
    head_dim = self.adapters.model_cfg.head_dim
    outs = [self._groups.base(m, layer, x).reshape(*x.shape[:-1], -1, head_dim) for m in qkv]
    return (*outs, QkvDelta(self._groups("q", layer, x), QkvLowRank(gates, b_t), at))

  def mlp_down(self, layer: int, x: jax.Array) -> jax.Array | None:
    """The MLP's tail in one kernel (`MlpTail`) with one decision for every module (pre-gated,
    plain LoRA) and gate and up adapted alike; None otherwise (module by module)."""
    mlp = tuple(m for m in ("gate", "up", "down") if self.adapts(m, layer))
    if (self._tail is None or self.cfg.mode == Mode.LAYERWISE
        or ("gate" in mlp) != ("up" in mlp) or not few_rows(x)):
      return None
    if not mlp:
      return self._tail(layer, x)
    xf = x.reshape(-1, x.shape[-1])
    self._batch_shape = x.shape[:-1]
    shared = self.route(mlp[0], layer, xf)[2]  # [N, E]
    gates = expert_columns(shared, self.cfg.rank, self.cfg.scale)[:, None]  # [N, 1, E·r]
    packed = self._groups.packed
    gate_up = None
    if "gate" in mlp:
      # The shrink columns are read from the gate/up output in place, right after the bases.
      assert packed.layout.shrink["gate"].start == 2 * self._tail.inter
      b = packed.b[("gate", "up")]
      gate_up = swiglu_down_op.LowRank(gates, b if not isinstance(b, tuple) else b[layer])
    down_delta = None
    if "down" in mlp:
      b_down = packed.b[("down",)][layer]
      down_delta = lambda h: expand(h, gates, b_down, x.dtype)[:, 0]  # noqa: E731
    return self._tail(layer, x, gate_up, down_delta)

  def __call__(self, name: str, layer: int, x: jax.Array, weights) -> jax.Array:
    del weights  # the packed copy is read instead
    y = self._groups.base(name, layer, x)
    if self.adapts(name, layer):
      group = input_group(name)
      deltas = cached_on_input(self._deltas, (layer, group), x,
                               lambda: self._group_deltas(group, layer, x))
      y = y.astype(jnp.float32) + deltas[name]
    return y.reshape(*x.shape[:-1], -1).astype(x.dtype)

  def _group_deltas(self, group: tuple[str, ...], layer: int, x: jax.Array) -> dict:
    """Every adapted module of the group at once: {module: delta [N, out] f32}. Layer-wise
    routers of the group share one top-k (their logits sit side by side); expansions of equal
    width run as one batched matmul."""
    xf = x.reshape(-1, x.shape[-1])
    self._batch_shape = x.shape[:-1]
    packed, num_experts = self._groups.packed, self.cfg.num_experts
    modules = tuple(m for m in group if m in self.cfg.modules)
    dense = {}
    if self.cfg.mode == Mode.LAYERWISE:
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
      out = expand(h, expert_columns(d, self.cfg.rank, self.cfg.scale), packed.b[batch][layer],
                   x.dtype)
      deltas.update({m: out[:, i] for i, m in enumerate(batch)})
    return deltas


class PackedPath(DecodePath):
  name = PathName.PACKED
  summary = ("every expert's A and the layer-wise routers appended to the backbone's matrices:"
             " one matmul per input group, one small expansion per module")

  def experts_read(self, num_experts, distinct):
    return num_experts  # every expert's A and B are columns of the step's matmuls

  def prepare(self, model, adapters, *, release=False):
    return pack(model, adapters, release=release)

  def extra_bytes(self, model: LlamaModel, adapters: MixtureOfLoRA) -> int:
    item = jnp.dtype(model.dtype).itemsize
    cfg, layers = adapters.cfg, model.cfg.layers
    cols = cfg.num_experts * cfg.rank
    return model.cfg.linear_bytes(item) + layers * item * cols * sum(
        i + o for m, (i, o) in model.cfg.linear_shapes().items() if m in cfg.modules)

  def runtime(self, adapters, derived=None, *, sere=None, backend="auto", mesh=None):
    return PackedRuntime(adapters, self.thresholds, sere, packed=derived,
                         mlp=mlp_kernel(backend, mesh),
                         qkv_in_attention=backend == "triton" and mesh is None)

  def backbone(self, derived=None, *, backend="auto", mesh=None):
    return PackedBackbone(derived, mlp=mlp_kernel(backend, mesh))

  def reads_own_weights(self) -> bool:
    return False
