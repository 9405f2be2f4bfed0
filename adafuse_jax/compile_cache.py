"""Compiled programs kept on disk, so a second start of the server or the CLI skips compiling.

A 7B decode step takes 10-55 s to compile on an H200, most of it XLA timing candidate GEMM
kernels (autotuning), and a server compiles one program per batch bucket and prompt chunk.
JAX's persistent compilation cache keeps each compiled program (keyed by the program, the
device and the JAX/XLA versions) and, inside the same directory, XLA's per-fusion autotuning
results (JAX's `jax_persistent_cache_enable_xla_caches` default), so a program that changed still
skips timing the GEMMs it shares with one compiled before. Measured on the H200
(`docs/benchmarks/h200/compile-cache/`): the server's batch-32 decode step compiles in 54 s into
an empty directory and loads in 2.1 s from a filled one.

This module only points that cache at a directory; it works on any backend.
"""

from __future__ import annotations

import os
import pathlib

from adafuse_jax.errors import UserError


def default_dir() -> pathlib.Path:
  """`$XDG_CACHE_HOME/adafuse-jax/xla`, else `~/.cache/adafuse-jax/xla`."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "adafuse-jax" / "xla"


def enable(directory: str | os.PathLike) -> pathlib.Path:
  """Keep compiled programs and XLA's GEMM autotuning results under `directory`.

  Returns the directory. Raises UserError when it cannot be created or written.
  """
  import jax

  root = pathlib.Path(directory).expanduser()
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe = root / ".writable"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--compile-cache {directory}: cannot write there ({e.strerror}); pass a"
                    " writable directory, or --compile-cache off") from None
  jax.config.update("jax_compilation_cache_dir", str(root))
  return root


def from_option(value: str) -> pathlib.Path | None:
  """The CLIs' `--compile-cache auto|off|DIR`; returns the directory in use, or None.

  auto: the default directory when the backend is a GPU, where compiles take tens of seconds
  (on the CPU they take a few and nothing is written); off: no cache; DIR: that directory on
  any backend. A cache directory set through JAX's own configuration is left as it is.
  """
  import jax

  if value == "off":
    return None
  if value == "auto":
    if jax.config.jax_compilation_cache_dir:
      return pathlib.Path(jax.config.jax_compilation_cache_dir)
    return None if jax.default_backend() == "cpu" else enable(default_dir())
  return enable(value)


HELP = ("keep compiled programs (and XLA's GEMM autotuning) on disk so the next start skips"
        " compiling: auto (on a GPU ~/.cache/adafuse-jax/xla; on the CPU off), off, or a"
        " directory")
