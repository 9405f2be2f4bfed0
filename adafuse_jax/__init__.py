"""adafuse-jax: dynamic LoRA experts for Llama-family models, as fast as the plain model.

The public API, in the order a program uses it:

    import adafuse_jax as af

    loaded = af.load_model()                                  # the embedded SmolLM2-135M
    pool = af.load_pool("default", loaded.model.cfg)          # the shipped pre-gated pool
    gen = af.Generator(loaded.model, adapters=pool)           # path "packed" by default
    ids = loaded.tokenizer.encode("The capital of France is")
    print(loaded.tokenizer.decode(af.generate(gen, [ids], max_new_tokens=20).tokens[0]))

Names are imported on first use, so `import adafuse_jax` stays cheap for the command lines.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# public name -> the module that defines it
_EXPORTS = {
    # models
    "load_model": "adafuse_jax.weights", "LoadedModel": "adafuse_jax.weights",
    "LlamaModel": "adafuse_jax.model.llama", "ModelConfig": "adafuse_jax.config",
    "PRESETS": "adafuse_jax.config", "preset": "adafuse_jax.config",
    # pools
    "AdapterConfig": "adafuse_jax.config", "MixtureOfLoRA": "adafuse_jax.adapters.mixture",
    "load_pool": "adafuse_jax.adapters.io", "load_adapters": "adafuse_jax.adapters.io",
    "save_adapters": "adafuse_jax.adapters.io", "SereSettings": "adafuse_jax.adapters.sere",
    "export_peft": "adafuse_jax.adapters.peft",
    # several devices
    "make_mesh": "adafuse_jax.parallel",
    # generation
    "Generator": "adafuse_jax.generation", "generate": "adafuse_jax.generation",
    "GenerationResult": "adafuse_jax.generation", "SamplingConfig": "adafuse_jax.sampling",
    # path choice and what a step costs
    "Mode": "adafuse_jax.vocab", "PathName": "adafuse_jax.vocab",
    "choose_path": "adafuse_jax.auto", "PathChoice": "adafuse_jax.auto",
    "decode_bytes": "adafuse_jax.costs", "switch_bytes": "adafuse_jax.costs",
    "expert_bytes": "adafuse_jax.costs",
    # errors
    "UserError": "adafuse_jax.errors", "ModelFileError": "adafuse_jax.errors",
    "DeviceMemoryError": "adafuse_jax.errors",
}

# public sub-packages: training (`python -m adafuse_jax.train`) and the Pallas kernels by op
_SUBPACKAGES = {"train": "adafuse_jax.train", "kernels": "pallas_kernels"}

__all__ = sorted(_EXPORTS) + sorted(_SUBPACKAGES) + ["__version__"]


def __getattr__(name: str):
  if name in _SUBPACKAGES:
    value = importlib.import_module(_SUBPACKAGES[name])
    globals()[name] = value
    return value
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'adafuse_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return __all__


if TYPE_CHECKING:  # what static tools see; at run time names load on first use
  from adafuse_jax.adapters.io import load_adapters, load_pool, save_adapters  # noqa: F401
  from adafuse_jax.adapters.mixture import MixtureOfLoRA  # noqa: F401
  from adafuse_jax.adapters.peft import export_peft  # noqa: F401
  from adafuse_jax.parallel import make_mesh  # noqa: F401
  from adafuse_jax.adapters.sere import SereSettings  # noqa: F401
  from adafuse_jax.auto import PathChoice, choose_path  # noqa: F401
  from adafuse_jax.config import PRESETS, AdapterConfig, ModelConfig, preset  # noqa: F401
  from adafuse_jax.costs import decode_bytes, expert_bytes, switch_bytes  # noqa: F401
  from adafuse_jax.errors import DeviceMemoryError, ModelFileError, UserError  # noqa: F401
  from adafuse_jax.generation import GenerationResult, Generator, generate  # noqa: F401
  from adafuse_jax.model.llama import LlamaModel  # noqa: F401
  from adafuse_jax.sampling import SamplingConfig  # noqa: F401
  from adafuse_jax.vocab import Mode, PathName  # noqa: F401
  from adafuse_jax.weights import LoadedModel, load_model  # noqa: F401
