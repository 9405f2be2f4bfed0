"""Loading Llama-architecture GGUF files (any quantization `gguf` can dequantize)."""

from __future__ import annotations

import os
from typing import Protocol

import gguf
import numpy as np

from adafuse_jax.config import ModelConfig, RopeScaling
from adafuse_jax.errors import ModelFileError
from adafuse_jax.weights import tokenizer as tokenizer_lib

class Progress(Protocol):
  """The part of a tqdm bar the loaders use."""

  def reset(self, total: int | None = None) -> None: ...

  def update(self, n: int = 1) -> bool | None: ...


# GGUF per-block tensor name -> our linear module name.
_LINEAR_TENSORS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
                   "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: w [out, in] back to the `rotate_half` order.

  The converter maps HF rows with `reshape(H, 2, hd/2, in).swapaxes(1, 2)` so that ggml can
  rotate interleaved pairs; this is its inverse.
  """
  out, inp = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def open_reader(path: str) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise ModelFileError(f"model file {path!r} does not exist; pass --model with a .gguf file,"
                         " a Hugging Face folder, or 'default'")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises many kinds on a damaged file
    raise ModelFileError(
        f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or"
        " corrupt: download or copy it again") from None


def _field(fields: dict, key: str, default=None):
  if key in fields:
    return fields[key].contents()
  if default is None:
    raise ModelFileError(f"GGUF metadata lacks {key!r}; the file is not a complete Llama GGUF")
  return default


def config_from_fields(fields: dict, tensor_names: set[str], path: str) -> ModelConfig:
  arch = _field(fields, "general.architecture")
  if arch != "llama":
    raise ModelFileError(f"{path!r} holds a {arch!r} model; only Llama-architecture models"
                         " (Llama, Mistral, SmolLM2, ...) are supported")
  p = "llama."
  heads = int(_field(fields, p + "attention.head_count"))
  hidden = int(_field(fields, p + "embedding_length"))
  head_dim = int(_field(fields, p + "rope.dimension_count", hidden // heads))
  scaling = None
  if _field(fields, p + "rope.scaling.type", "none") == "linear":
    scaling = RopeScaling(kind="linear", factor=float(_field(fields, p + "rope.scaling.factor")))
  vocab = int(_field(fields, p + "vocab_size", len(fields["tokenizer.ggml.tokens"].data)))
  return ModelConfig(
      vocab_size=vocab, hidden=hidden, layers=int(_field(fields, p + "block_count")),
      heads=heads, kv_heads=int(_field(fields, p + "attention.head_count_kv", heads)),
      head_dim=head_dim, ffn=int(_field(fields, p + "feed_forward_length")),
      rope_base=float(_field(fields, p + "rope.freq_base", 10000.0)), rope_scaling=scaling,
      rms_eps=float(_field(fields, p + "attention.layer_norm_rms_epsilon")),
      max_context=int(_field(fields, p + "context_length")),
      tie_embeddings="output.weight" not in tensor_names,
      name=str(_field(fields, "general.name", os.path.basename(path))))


def load_gguf(path: str, progress: Progress | None = None
              ) -> tuple[ModelConfig, dict[str, np.ndarray], tokenizer_lib.Tokenizer]:
  """Reads config, f32 weights in our layout (linear weights stacked [L, in, out]) and tokenizer.

  Args:
    path: a .gguf file.
    progress: a tqdm-like bar, reset to the tensor count and advanced per tensor.
  """
  reader = open_reader(path)
  tensors = {t.name: t for t in reader.tensors}
  if progress is not None:
    progress.reset(total=len(tensors))
  cfg = config_from_fields(reader.fields, set(tensors), path)

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ModelFileError(f"{path!r} lacks tensor {name!r}; the file is incomplete")
    t = tensors[name]
    try:
      arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise ModelFileError(f"cannot read tensor {name!r} of {path!r} ({e}); the file may be"
                           " truncated: copy it again") from None
    if progress is not None:
      progress.update(1)
    return np.asarray(arr, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))

  weights: dict[str, np.ndarray] = {"embed": get("token_embd.weight"),
                                    "final_norm": get("output_norm.weight")}
  if not cfg.tie_embeddings:
    weights["lm_head"] = get("output.weight").T
  stacks: dict[str, list[np.ndarray]] = {n: [] for n in
                                         list(_LINEAR_TENSORS.values()) + ["attn_norm", "ffn_norm"]}
  for l in range(cfg.layers):
    for gname, name in _LINEAR_TENSORS.items():
      w = get(f"blk.{l}.{gname}.weight")  # [out, in]
      if name == "q":
        w = _unpermute_rows(w, cfg.heads)
      elif name == "k":
        w = _unpermute_rows(w, cfg.kv_heads)
      stacks[name].append(np.ascontiguousarray(w.T))
    stacks["attn_norm"].append(get(f"blk.{l}.attn_norm.weight"))
    stacks["ffn_norm"].append(get(f"blk.{l}.ffn_norm.weight"))
  weights.update({name: np.stack(ws) for name, ws in stacks.items()})
  try:
    tok = tokenizer_lib.from_gguf_fields(reader.fields)
  except KeyError as e:
    raise ModelFileError(f"{path!r} has no tokenizer metadata ({e})") from None
  return cfg, weights, tok

