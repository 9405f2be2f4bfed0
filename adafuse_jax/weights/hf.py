"""Loading a local Hugging Face folder (`config.json` + `*.safetensors`) of a Llama/Mistral model."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors import safe_open

from adafuse_jax.config import ModelConfig, RopeScaling
from adafuse_jax.errors import ModelFileError
from adafuse_jax.weights import tokenizer as tokenizer_lib
from adafuse_jax.weights.gguf import Progress

SUPPORTED_TYPES = ("llama", "mistral")
_HF_LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}


def config_from_hf(c: dict, name: str) -> ModelConfig:
  if c.get("model_type") not in SUPPORTED_TYPES:
    raise ModelFileError(f"config.json has model_type {c.get('model_type')!r}; supported:"
                         f" {', '.join(SUPPORTED_TYPES)}")
  required = ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers",
              "intermediate_size")
  missing = [k for k in required if not isinstance(c.get(k), int)]
  if missing:
    raise ModelFileError(f"config.json of {name!r} lacks integer {', '.join(missing)}; a"
                         " Llama-family config.json sets them (the file is damaged or of"
                         " another kind)")
  heads = int(c["num_attention_heads"])
  hidden = int(c["hidden_size"])
  rs = c.get("rope_scaling") or None
  scaling = None
  if rs:
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
      scaling = RopeScaling(kind="linear", factor=float(rs["factor"]))
    elif kind == "llama3":
      scaling = RopeScaling(kind="llama3", factor=float(rs["factor"]),
                            low_freq_factor=float(rs["low_freq_factor"]),
                            high_freq_factor=float(rs["high_freq_factor"]),
                            original_max_position=int(rs["original_max_position_embeddings"]))
    elif kind not in (None, "default"):
      raise ModelFileError(f"rope_scaling type {kind!r} is not supported (linear, llama3 are)")
  return ModelConfig(
      vocab_size=int(c["vocab_size"]), hidden=hidden, layers=int(c["num_hidden_layers"]),
      heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
      head_dim=int(c.get("head_dim") or hidden // heads), ffn=int(c["intermediate_size"]),
      rope_base=float(c.get("rope_theta", 10000.0)), rope_scaling=scaling,
      rms_eps=float(c.get("rms_norm_eps", 1e-5)),
      max_context=int(c.get("max_position_embeddings", 4096)),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), name=name)


def _tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Maps each tensor name to the safetensors file that holds it (sharded or not)."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {k: folder / v for k, v in weight_map.items()}
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise ModelFileError(f"{str(folder)!r} has no *.safetensors files")
  out: dict[str, pathlib.Path] = {}
  for f in files:
    with safe_open(str(f), framework="flax") as sf:
      out.update({k: f for k in sf.keys()})
  return out


def load_hf(folder: str | pathlib.Path, progress: Progress | None = None
            ) -> tuple[ModelConfig, dict[str, np.ndarray], tokenizer_lib.Tokenizer | None]:
  """Reads config, f32 weights in our layout, and the tokenizer if the folder has one."""
  folder = pathlib.Path(folder)
  try:
    raw = json.loads((folder / "config.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ModelFileError(f"cannot read {str(folder / 'config.json')!r}: {e}") from None
  cfg = config_from_hf(raw, folder.name)
  files = _tensor_files(folder)
  if progress is not None:
    progress.reset(total=len(files))
  handles: dict[pathlib.Path, object] = {}

  def get(name: str) -> np.ndarray:
    if name not in files:
      raise ModelFileError(f"{str(folder)!r} lacks tensor {name!r}")
    path = files[name]
    try:
      if path not in handles:
        handles[path] = safe_open(str(path), framework="flax")
      arr = handles[path].get_tensor(name)
    except Exception as e:
      raise ModelFileError(f"cannot read {name!r} from {str(path)!r} ({e}); the file may be"
                           " truncated: copy it again") from None
    if progress is not None:
      progress.update(1)
    return np.asarray(arr.astype("float32"))

  weights = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight")}
  if not cfg.tie_embeddings:
    weights["lm_head"] = get("lm_head.weight").T
  for name, hf_name in _HF_LINEARS.items():
    weights[name] = np.stack([np.ascontiguousarray(get(f"model.layers.{l}.{hf_name}.weight").T)
                              for l in range(cfg.layers)])
  weights["attn_norm"] = np.stack([get(f"model.layers.{l}.input_layernorm.weight")
                                   for l in range(cfg.layers)])
  weights["ffn_norm"] = np.stack([get(f"model.layers.{l}.post_attention_layernorm.weight")
                                  for l in range(cfg.layers)])
  tok = tokenizer_lib.from_hf_folder(folder, raw) if (folder / "tokenizer.json").exists() else None
  return cfg, weights, tok

