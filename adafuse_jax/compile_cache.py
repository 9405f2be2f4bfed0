"""Compiled programs kept on disk, so a second start of the server or the CLI skips compiling.

A 7B decode step takes 10-55 s to compile on an H200, most of it XLA timing candidate GEMM
kernels (autotuning), and a server compiles one program per batch bucket and prompt chunk.
JAX's persistent compilation cache keeps each compiled program (keyed by the program, the
device and the JAX/XLA versions) and, inside the same directory, XLA's per-fusion autotuning
results (JAX's `jax_persistent_cache_enable_xla_caches` default), so a program that changed still
skips timing the GEMMs it shares with one compiled before. Measured on the H200
(`docs/benchmarks/h200/compile-cache/`): the server's batch-32 decode step compiles in 54 s into
an empty directory and loads in 2.1 s from a filled one.

This module only points that cache at a directory; it works on any backend, and `auto` uses it
on every one.
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

  auto: the default directory on any backend, or none when it cannot be written there (a
  read-only home is no reason to stop); off: no cache; DIR: that directory (an error when it
  cannot be written). A cache directory set through JAX's own configuration is left as it is.
  On the CPU it pays too: the default model's decode CLI answered in 29.4-35.9 s without a
  cache, 31.3-32.4 s into an empty one and 18.7-19.1 s from the filled one, its programs
  compiling in 10.2-11.6 s and loading in 3.9-4.4 (2 cores, two rounds of
  `bash tools/cli_start_probe.sh`, `docs/benchmarks/cpu/compile-cache/`).
  """
  import jax

  if value == "off":
    return None
  if value == "auto":
    if jax.config.jax_compilation_cache_dir:
      return pathlib.Path(jax.config.jax_compilation_cache_dir)
    try:
      return enable(default_dir())
    except UserError:
      return None
  return enable(value)


HELP = ("keep compiled programs (and XLA's GEMM autotuning) on disk so the next start skips"
        " compiling: auto (~/.cache/adafuse-jax/xla, or $XDG_CACHE_HOME/adafuse-jax/xla), off,"
        " or a directory")
