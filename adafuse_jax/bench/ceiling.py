"""The memory ceiling every floor divides by, measured the way the fastest code moves bytes.

A decode step at batch 1 reads its weights once: its floor is bytes ÷ the rate at which the device
can *read* memory. An XLA element-wise pass (`a + 1`, what this bench used to divide by) does
not reach that rate on the H200, so floors computed from it flatter every step. Here several
programs move the same buffers and the fastest defines the ceiling:

- `pallas-read`: a Pallas kernel (Triton lowering) that streams row blocks and writes one f32
  column sum per block (the output is < 1% of the input's bytes), at a few tile shapes;
- `pallas-copy`: the same blocks copied (bytes read + written);
- `xla-sum`, `xla-add-one`: XLA's reduction and element-wise pass;
- `torch-copy`, `torch-gemv` (beside the JAX rows, when PyTorch with CUDA is importable): what a
  PyTorch user's code reaches on the same device, reported, not used as the ceiling.

Each is timed over several buffer sizes of a few GB (far past the L2), many launches dispatched
back to back, interleaved over rounds; a row's rate is its median round.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

COLS = 1024  # every buffer is viewed as [rows, COLS]


@dataclasses.dataclass(frozen=True)
class Rate:
  """One method's measured rate: bytes moved per second (read + written), median of rounds."""

  method: str
  nbytes: int
  seconds: float
  rounds: tuple[float, ...]

  @property
  def tb_s(self) -> float:
    return self.nbytes / self.seconds / 1e12


def _read_kernel(x_ref, o_ref):
  o_ref[...] = jnp.sum(x_ref[...].astype(jnp.float32), axis=0, keepdims=True)


def _copy_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...]


@functools.partial(jax.jit, static_argnames=("block_rows", "num_warps", "interpret"))
def pallas_read(x: jax.Array, *, block_rows: int = 64, num_warps: int = 4,
                interpret: bool = False) -> jax.Array:
  """Column sums of each [block_rows, COLS] block of x [R, COLS]: [R / block_rows, COLS] f32."""
  rows = x.shape[0]
  if rows % block_rows:
    raise ValueError(f"{rows=} must be a multiple of {block_rows=}")
  return pl.pallas_call(
      _read_kernel, out_shape=jax.ShapeDtypeStruct((rows // block_rows, COLS), jnp.float32),
      grid=(rows // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, COLS), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((1, COLS), lambda i: (i, 0)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=3),
      interpret=interpret, name="ceiling_read")(x)


@functools.partial(jax.jit, static_argnames=("block_rows", "num_warps", "interpret"))
def pallas_copy(x: jax.Array, *, block_rows: int = 64, num_warps: int = 4,
                interpret: bool = False) -> jax.Array:
  """A copy of x [R, COLS] block by block."""
  rows = x.shape[0]
  if rows % block_rows:
    raise ValueError(f"{rows=} must be a multiple of {block_rows=}")
  spec = pl.BlockSpec((block_rows, COLS), lambda i: (i, 0))
  return pl.pallas_call(
      _copy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(rows // block_rows,),
      in_specs=[spec], out_specs=spec,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=3),
      interpret=interpret, name="ceiling_copy")(x)


def _jax_methods(interpret: bool) -> dict:
  """method -> (function of x, bytes moved per byte of x)."""
  out = {}
  for block_rows, warps in ((32, 4), (64, 4), (128, 8)):
    out[f"pallas-read {block_rows}x{COLS} w{warps}"] = (functools.partial(
        pallas_read, block_rows=block_rows, num_warps=warps, interpret=interpret), 1.0)
  out["pallas-copy 64x1024 w4"] = (functools.partial(pallas_copy, interpret=interpret), 2.0)
  out["xla-sum"] = (jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), 1.0)
  out["xla-add-one"] = (jax.jit(lambda x: x + jnp.asarray(1, x.dtype)), 2.0)
  return out


def _torch_methods(nbytes: int):
  """PyTorch's copy and GEMV on the same device, or {} without torch + CUDA."""
  try:
    import torch
  except ImportError:
    return {}
  if not torch.cuda.is_available():
    return {}
  n = nbytes // 2
  src = torch.randn(n // COLS, COLS, device="cuda", dtype=torch.bfloat16)
  dst = torch.empty_like(src)
  vec = torch.randn(COLS, device="cuda", dtype=torch.bfloat16)

  def timed(fn, reps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
      fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps

  return {"torch-copy (reference)": (lambda reps: timed(lambda: dst.copy_(src), reps), 2 * nbytes),
          "torch-gemv (reference)": (lambda reps: timed(lambda: src @ vec, reps), nbytes)}


def measure(nbytes: int = 2 << 30, *, dtype=jnp.bfloat16, rounds: int = 3, reps: int = 10,
            log=None) -> dict[str, Rate]:
  """Every method's rate over a buffer of `nbytes` (and half of it), interleaved over rounds.

  Returns method -> Rate, best size per method. On the CPU the Pallas kernels run in the
  interpreter: call it with small sizes there (tests), the figures mean nothing."""
  interpret = jax.default_backend() == "cpu"
  methods = _jax_methods(interpret)
  sizes = sorted({nbytes // 2, nbytes})
  buffers = {}
  for size in sizes:
    rows = max(128, size // jnp.dtype(dtype).itemsize // COLS // 128 * 128)
    buffers[size] = jax.random.normal(jax.random.key(size % 997), (rows, COLS),
                                      jnp.float32).astype(dtype)
  samples: dict[tuple[str, int], list[float]] = {}
  for fn_name, (fn, _) in methods.items():  # compile and warm up outside the rounds
    for size, x in buffers.items():
      jax.block_until_ready(fn(x))
  for _ in range(rounds):
    for name, (fn, _) in methods.items():
      for size, x in buffers.items():
        jax.block_until_ready(fn(x))
        t0 = time.perf_counter()
        out = None
        for _ in range(reps):
          out = fn(x)
        jax.block_until_ready(out)
        samples.setdefault((name, size), []).append((time.perf_counter() - t0) / reps)
  rates = {}
  for (name, size), times in samples.items():
    x = buffers[size]
    moved = int(x.size * x.dtype.itemsize * methods[name][1])
    rate = Rate(name, moved, float(np.median(times)), tuple(times))
    if name not in rates or rate.tb_s > rates[name].tb_s:
      rates[name] = rate
  del buffers
  for name, (fn, moved) in _torch_methods(nbytes).items():
    fn(3)  # warm-up
    times = [fn(reps) for _ in range(rounds)]
    rates[name] = Rate(name, moved, float(np.median(times)), tuple(times))
  if log:
    for r in rates.values():
      log(f"ceiling: {r.method:<28} {r.tb_s:.3f} TB/s")
  return rates


def ceiling(rates: dict[str, Rate]) -> Rate:
  """The fastest JAX method: what code in this library could move (PyTorch rows excluded)."""
  return max((r for r in rates.values() if "(reference)" not in r.method), key=lambda r: r.tb_s)
