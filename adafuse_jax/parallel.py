"""Tensor parallelism over a 1-D device mesh (axis "tp"), in the Megatron pattern, through JAX's
SPMD partitioner: the arrays carry `NamedSharding`s and the compiled step is one SPMD program
whose collectives XLA inserts.

- q, k, v, gate, up are split by output columns and o, down by input rows, so each attention
  and MLP half ends in one all-reduce; the KV cache is split by KV heads (a device keeps the
  heads its q/k/v columns produce); the head is split by vocabulary; norms, embeddings and the
  rotary table are replicated.
- Experts follow their module's weight so the adapter delta needs no collective of its own:
  for a column-split module A is replicated and B split by output, for a row-split one A is
  split by input (as x is) and B replicated. Routers are replicated: every device routes the
  same tokens to the same experts.
- Arrays a path derives from these (the packed copy) are split along their last axis where it
  divides, else replicated; the partitioner keeps every layout exact, the choice only moves
  where the collectives fall.
- Pallas kernels (the gathered path's BGMV/SGMV, the merged path's SGMM switch) are opaque to
  the partitioner: they run per shard inside `shard_map` (`on_shards`) with the layouts of
  `ModuleSplit`, each device on its own slice of the weights and experts; a row-split module's
  partial outputs are summed with one `psum`, as XLA does for the plain matmul.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adafuse_jax.config import ModelConfig
from adafuse_jax.errors import UserError

AXIS = "tp"
DATA_AXIS = "dp"  # training's batch split (data parallel), beside "tp"
COLUMN = ("q", "k", "v", "gate", "up")  # split by output columns
ROW = ("o", "down")  # split by input rows


def make_mesh(devices: int, model_cfg: ModelConfig | None = None, *, data: int = 1) -> Mesh:
  """A tensor-parallel mesh over the first `devices` devices: 1-D (axis "tp"), or with
  `data` > 1 a 2-D (data, tensor) mesh, axes ("dp", "tp"), of devices // data devices per
  tensor group (training: the batch split over "dp", the weights over "tp").

  Raises UserError when fewer devices exist, `data` does not divide `devices`, or the model's
  head, KV-head or FFN counts are not divisible by the tensor-parallel size (each device must
  hold whole heads and an equal FFN slice).
  """
  available = jax.devices()
  if devices < 1:
    raise UserError(f"--devices {devices} must be at least 1")
  if devices > len(available):
    raise UserError(f"--devices {devices} asks for more devices than exist ({len(available)}"
                    f" {available[0].platform} device(s)); on a CPU, simulate more with"
                    f" XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
  if data < 1 or devices % data:
    raise UserError(f"--data-parallel {data} must divide --devices {devices} (each data-parallel"
                    " group gets devices / data-parallel devices for tensor parallelism)")
  if model_cfg is not None:
    check_divisible(model_cfg, devices // data)
  if data == 1:
    return Mesh(np.asarray(available[:devices]), (AXIS,))
  return Mesh(np.asarray(available[:devices]).reshape(data, devices // data), (DATA_AXIS, AXIS))


def tensor_size(mesh: Mesh) -> int:
  """Devices along the tensor-parallel axis (1 without one)."""
  return dict(mesh.shape).get(AXIS, 1)


def data_size(mesh: Mesh) -> int:
  """Devices along the data-parallel axis (1 without one)."""
  return dict(mesh.shape).get(DATA_AXIS, 1)


@dataclasses.dataclass(frozen=True)
class ModuleSplit:
  """How one module's operands lie on the mesh, for kernels run per shard (stacked layouts).

  Attributes:
    x: the input [N, in]; w: the weight [L, in, out]; a: the experts' A [L, in, E, r];
    b: their B [L, E, r, out]; y: the output [N, out].
    partial: each device's output is a partial sum over its slice of `in` (a row-split module):
      `psum` it over the axis.
  """

  x: P
  w: P
  a: P
  b: P
  y: P
  partial: bool


def module_split(name: str) -> ModuleSplit:
  """The `ModuleSplit` of module `name` ("q", ..., "down") under the rules above."""
  if name in COLUMN:
    return ModuleSplit(x=P(), w=P(None, None, AXIS), a=P(), b=P(None, None, None, AXIS),
                       y=P(None, AXIS), partial=False)
  if name in ROW:
    return ModuleSplit(x=P(None, AXIS), w=P(None, AXIS, None), a=P(None, AXIS, None, None),
                       b=P(), y=P(), partial=True)
  raise ValueError(f"no tensor-parallel split for module {name!r}")


def on_shards(fn, mesh: Mesh, in_specs, out_specs):
  """`fn` run once per device on its shards (`jax.shard_map`), for Pallas kernels that the
  SPMD partitioner cannot split. Replication is not checked: the kernels are custom calls."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def check_divisible(cfg: ModelConfig, devices: int) -> None:
  bad = [f"{name} {value}" for name, value in (("attention heads", cfg.heads),
                                               ("KV heads", cfg.kv_heads),
                                               ("FFN width", cfg.ffn)) if value % devices]
  if bad:
    raise UserError(f"{devices} devices do not divide the model's {', '.join(bad)}: tensor"
                    " parallelism gives each device whole heads and an equal FFN slice; pick a"
                    " device count that divides them")


def _name(path) -> str:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return ".".join(str(k) for k in keys if k is not None)


def model_axis(name: str) -> int | None:
  """The split axis of a model parameter: columns (-1) of q, k, v, gate, up and the head; rows
  (-2) of o and down (stacked [L, in, out] or per layer [in, out]); None: replicated."""
  leaf = name.split(".")[0]
  if leaf in COLUMN or leaf == "lm_head":
    return -1
  return -2 if leaf in ROW else None


def adapter_axis(name: str) -> int | None:
  """The split axis of a pool array: A [.., in, E, r] of a row module by input (-3), its shared
  SA [.., in, rs] by input (-2); B [.., r, out] and SB of a column module by output (-1); the
  rest (the other A/B, betas, routers) replicated."""
  parts = name.split(".")
  if parts[0] != "pool" or len(parts) < 2:
    return None
  prefix, _, module = parts[1].partition("_")
  if module in ROW:
    return {"A": -3, "SA": -2}.get(prefix)
  if module in COLUMN:
    return -1 if prefix in ("B", "SB") else None
  return None


def _sharding(name: str, shape: tuple[int, ...], mesh: Mesh, axis_of) -> NamedSharding:
  """Split along `axis_of(name)` where that axis divides by the device count, else
  replicated."""
  axis = axis_of(name) if shape else None
  if axis is not None and (-axis > len(shape) or shape[axis] % tensor_size(mesh)):
    axis = None
  return NamedSharding(mesh, P() if axis is None else P(
      *[AXIS if i == axis % len(shape) else None for i in range(len(shape))]))


def _place(tree, mesh: Mesh, axis_of):
  """Every array of `tree` on the mesh, laid out by `_sharding`."""
  def put(path, leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    return jax.device_put(leaf, _sharding(_name(path), leaf.shape, mesh, axis_of))
  return jax.tree_util.tree_map_with_path(put, tree)


def shard_params(params, mesh: Mesh):
  """The model's parameters (an nnx State) placed on the mesh, Megatron-style."""
  return _place(params, mesh, model_axis)


def shard_adapter_params(params, mesh: Mesh):
  """A MixtureOfLoRA's parameters placed consistently with the weights they adapt."""
  return _place(params, mesh, adapter_axis)


def adapter_shardings(shapes, mesh: Mesh):
  """The layout `shard_adapter_params` gives, for a tree of ShapeDtypeStructs (a checkpoint
  restored straight onto the mesh, whatever device count saved it)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jax.ShapeDtypeStruct(
          leaf.shape, leaf.dtype, sharding=_sharding(_name(path), leaf.shape, mesh,
                                                     adapter_axis)), shapes)


def batch_split(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Training windows [B, T+1]: rows split over "dp" (replicated over "tp")."""
  return NamedSharding(mesh, P(DATA_AXIS if DATA_AXIS in mesh.axis_names else None,
                               *[None] * (ndim - 1)))


def shard_module(module, mesh: Mesh, axis_of) -> None:
  """An nnx Module's arrays placed on the mesh in place (`model_axis` for a model,
  `adapter_axis` for a pool: names as in its state)."""
  from flax import nnx
  nnx.update(module, _place(nnx.state(module), mesh, axis_of))


def shard_switch_state(state, mesh: Mesh):
  """A merged path's SwitchState: each merged weight split as the model's weight of its module;
  the experts and coefficients replicated."""
  weights = {m: jax.device_put(w, _sharding(m, w.shape, mesh, model_axis)) if isinstance(
      w, jax.Array) else tuple(jax.device_put(x, _sharding(m, x.shape, mesh, model_axis))
                               for x in w) for m, w in state.weights.items()}
  rest = jax.device_put((state.experts, state.coefs, state.switches, state.unmerged),
                        replicated(mesh))
  return dataclasses.replace(state, weights=weights, experts=rest[0], coefs=rest[1],
                             switches=rest[2], unmerged=rest[3])


def shard_last_axis(tree, mesh: Mesh):
  """Any other arrays (a path's derived copy): split along the last axis where it divides."""
  return _place(tree, mesh, lambda name: -1)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _cache_layout(ndim: int, mesh: Mesh) -> NamedSharding:
  """Key/value buffers [B, S, Hkv, hd] split by KV heads; the lengths replicated."""
  return NamedSharding(mesh, P(None, None, AXIS, None)) if ndim == 4 else replicated(mesh)


def shard_cache(cache, mesh: Mesh):
  """A KVCache / SlotCache placed in `_cache_layout`."""
  return jax.tree.map(lambda x: jax.device_put(x, _cache_layout(x.ndim, mesh)), cache)


def cache_shapes(cache_shape, mesh: Mesh):
  """ShapeDtypeStructs of a cache (from `jax.eval_shape`) in `_cache_layout`, for
  ahead-of-time compilation."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(
      s.shape, s.dtype, sharding=_cache_layout(len(s.shape), mesh)), cache_shape)


def constrain_cache(cache, mesh: Mesh):
  """Inside jit: pins a cache to `_cache_layout`, so that every compiled step returns the cache
  laid out as the next one expects it."""
  return jax.tree.map(
      lambda x: jax.lax.with_sharding_constraint(x, _cache_layout(x.ndim, mesh)), cache)


def pin_step(cache, small, mesh: Mesh):
  """Inside jit, the end of a compiled step: (the cache in `_cache_layout`, so the next step
  reads it as laid out; `small` outputs replicated)."""
  return constrain_cache(cache, mesh), constrain_replicated(small, mesh)


def constrain_replicated(tree, mesh: Mesh):
  """Inside jit: pins small outputs (next tokens, logits, routing) replicated."""
  rep = replicated(mesh)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rep), tree)
