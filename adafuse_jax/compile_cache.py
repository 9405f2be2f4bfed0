"""Compiled programs kept on disk, so a second start of the server or the CLI skips compiling.

A 7B decode step takes 10-55 s to compile on an H200, most of it XLA timing candidate GEMM
kernels (autotuning); a server compiles one program per batch bucket and prompt chunk. Two caches
keep that work across processes:

- JAX's persistent compilation cache (`<dir>/jax`): a program compiled before is loaded, not
  compiled (keyed by the program, the device and the JAX/XLA versions);
- XLA's per-fusion autotune cache (`<dir>/autotune`): a GEMM fusion timed before is not timed
  again, even inside a program that changed.

Both are JAX's and XLA's own mechanisms; this module only points them at one directory. The
autotune cache is an XLA flag, read when the backend starts: `enable` must run before the first
computation (the CLIs call it right after parsing their options).
"""

from __future__ import annotations

import os
import pathlib

from adafuse_jax.errors import UserError

AUTOTUNE_FLAG = "--xla_gpu_per_fusion_autotune_cache_dir"


def default_dir() -> pathlib.Path:
  """`$XDG_CACHE_HOME/adafuse-jax/xla`, else `~/.cache/adafuse-jax/xla`."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "adafuse-jax" / "xla"


def _name_autotune_dir(directory: pathlib.Path) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if AUTOTUNE_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {AUTOTUNE_FLAG}={directory}".strip()


def enable(directory: str | os.PathLike) -> pathlib.Path:
  """Keep compiled programs and XLA's GEMM autotuning under `directory`.

  Returns the directory. Raises UserError when it cannot be created or written. An autotune
  cache directory already named in XLA_FLAGS is left as the user set it.
  """
  root = pathlib.Path(directory).expanduser()
  try:
    for sub in ("jax", "autotune"):
      (root / sub).mkdir(parents=True, exist_ok=True)
    probe = root / ".writable"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--compile-cache {directory}: cannot write there ({e.strerror}); pass a"
                    " writable directory, or --compile-cache off") from None
  _name_autotune_dir(root / "autotune")
  import jax

  jax.config.update("jax_compilation_cache_dir", str(root / "jax"))
  return root


def from_option(value: str) -> pathlib.Path | None:
  """The CLIs' `--compile-cache auto|off|DIR`.

  auto: the default directory for programs compiled on a GPU, where compiles take tens of
  seconds (on the CPU they take a few and the cache is left off); off: no cache; DIR: that
  directory on any backend.
  """
  if value == "off":
    return None
  if value == "auto":
    # The flag must be in place before the backend starts, and asking which backend starts it.
    _name_autotune_dir(default_dir() / "autotune")
    import jax

    return None if jax.default_backend() == "cpu" else enable(default_dir())
  return enable(value)


HELP = ("keep compiled programs and XLA's GEMM autotuning on disk so the next start skips"
        " compiling: auto (a GPU: ~/.cache/adafuse-jax/xla; the CPU: off), off, or a directory")
