"""What every kernel of this package shares: block sizes, preallocated outputs, the base tile, and
how an entry point picks its backend.

Backends (names used by every op's `backend=` argument):
- "triton": `pl.pallas_call` with the Triton lowering (any CUDA GPU; on the CPU the same kernel
  runs in the Pallas interpreter, which is how CI tests it);
- "mosaic": Pallas' Mosaic GPU backend (Hopper and newer, GPU only);
- "jax-triton": the same algorithm in Triton's own language through jax-triton (a peer for
  benchmarks, GPU and the `[gpu]` extra only);
- "xla": plain jnp, what XLA fuses on its own;
- "auto": the op's first backend, in its preference order, that supports the call here.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BACKENDS = ("auto", "triton", "mosaic", "jax-triton", "xla")


def interpret() -> bool:
  """Whether Pallas kernels must run in the interpreter: there is no GPU to lower them for."""
  return jax.default_backend() == "cpu"


def pick_backend(op: str, backend: str, why_not: Mapping[str, Callable[[], str | None]]) -> str:
  """The backend an entry point runs.

  Args:
    op: the op's name, for messages.
    backend: "auto" or one of `why_not`'s keys.
    why_not: the op's backends in preference order, each with a check that returns why it
      cannot run this call here (None when it can).
  Returns:
    `backend` itself when it can run, else (for "auto") the first that can.
  Raises:
    ValueError naming the reason when the backend asked for cannot run, or none can.
  """
  if backend != "auto":
    if backend not in why_not:
      raise ValueError(f"{op}: unknown backend {backend!r}; choose auto or one of"
                       f" {', '.join(why_not)}")
    reason = why_not[backend]()
    if reason is not None:
      raise ValueError(f"{op}: backend {backend!r} cannot run this call: {reason}")
    return backend
  reasons = {}
  for name, check in why_not.items():
    reasons[name] = check()
    if reasons[name] is None:
      return name
  raise ValueError(f"{op}: no backend can run this call ("
                   + "; ".join(f"{n}: {r}" for n, r in reasons.items()) + ")")


def gpu_only(name: str) -> str | None:
  """The reason a GPU-only backend cannot run here, or None on a GPU."""
  if jax.default_backend() != "gpu":
    return f"{name} needs a CUDA GPU; JAX's backend is {jax.default_backend()!r}"
  return None


def dot_block(n: int) -> int:
  """A block dimension covering n: a power of two, at least 16 (Triton's smallest dot)."""
  return max(16, pl.next_power_of_2(n))


def with_output_buffers(operands: tuple, outs: Sequence[jax.Array] | None,
                        shapes: Sequence[jax.ShapeDtypeStruct], name: str = "out"
                        ) -> tuple[tuple, dict[int, int]]:
  """(operands, input_output_aliases) of a pallas_call whose outputs (`shapes`) are written into
  the preallocated `outs` when they are given (appended as the last operands, each aliased to
  its output, so a caller can fill buffers of its own: tests poison them); checks that each
  fits, naming it `name` (`name[i]` among several)."""
  if outs is None:
    return operands, {}
  for i, (buf, want) in enumerate(zip(outs, shapes)):
    if buf.shape != tuple(want.shape) or buf.dtype != want.dtype:
      label = name if len(shapes) == 1 else f"{name}[{i}]"
      raise ValueError(f"{label} must be {tuple(want.shape)} {jnp.dtype(want.dtype)}, got"
                       f" {buf.shape} {buf.dtype}")
  return operands + tuple(outs), {len(operands) + i: i for i in range(len(outs))}


def with_output_buffer(operands: tuple, out: jax.Array | None, shape: tuple[int, ...],
                       dtype) -> tuple[tuple, dict[int, int]]:
  """`with_output_buffers` for a pallas_call with a single output of `shape`/`dtype`."""
  return with_output_buffers(operands, None if out is None else (out,),
                             (jax.ShapeDtypeStruct(tuple(shape), dtype),))


def base_tile(x_ref, w_ref, layer, row0, col0, row_mask, col_mask, *, block_m: int,
              block_n: int, block_k: int) -> jax.Array:
  """Inside a kernel: the f32 tile `x[row0:+block_m] @ w[layer][:, col0:+block_n]`, streaming the
  K dimension in `block_k` steps with masked loads (shared by the BGMV expand and other fused matmuls)."""
  k_total = x_ref.shape[1]

  def body(kb, acc):
    k_mask = kb * block_k + jnp.arange(block_k) < k_total
    x = plgpu.load(x_ref.at[pl.ds(row0, block_m), pl.ds(kb * block_k, block_k)],
                   mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    # One indexer per load (layer, rows, cols): the Triton lowering takes no chained views.
    w = plgpu.load(w_ref.at[layer, pl.ds(kb * block_k, block_k), pl.ds(col0, block_n)],
                   mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    return acc + plgpu.dot(x, w).astype(jnp.float32)

  return jax.lax.fori_loop(0, pl.cdiv(k_total, block_k), body,
                           jnp.zeros((block_m, block_n), jnp.float32))
