"""Loading a local Hugging Face folder (`config.json` + `*.safetensors`) of a Llama/Mistral model."""

from __future__ import annotations

import json
import math
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


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_from_hf(c: dict) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from a config's `rope_parameters` (transformers 5) or its older
  `rope_theta` + `rope_scaling` keys. An unknown rope type is a ModelFileError, never a silent
  default."""
  params = c.get("rope_parameters")
  if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
    raise ModelFileError("config.json sets rope_parameters per layer type; Llama-family models"
                         " use one rotary embedding for every layer")
  rope = dict(c.get("rope_scaling") or {})
  if isinstance(params, dict):
    rope.update(params)
  theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type")) or "default"
  if kind not in ROPE_TYPES:
    raise ModelFileError(f"config.json asks for rope type {kind!r}, which is not supported"
                         f" ({', '.join(ROPE_TYPES)} are); use a model with one of those")
  if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ModelFileError("config.json rotates part of each head (partial_rotary_factor"
                         f" {rope['partial_rotary_factor']}); Llama-family models rotate all of it")
  max_pos = int(c.get("max_position_embeddings", 4096))
  factor = rope.get("factor")
  if kind == "default":
    return theta, None
  if kind in ("linear", "dynamic"):
    return theta, RopeScaling(kind=kind, factor=float(factor))
  original = int(rope.get("original_max_position_embeddings") or max_pos)
  if kind == "llama3":
    return theta, RopeScaling(kind="llama3", factor=float(factor),
                              low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]),
                              original_max_position=original)
  # yarn, with transformers' defaults for what the config leaves out
  factor = float(factor) if factor is not None else max_pos / original
  attention = rope.get("attention_factor")
  if attention is None:
    def mscale(scale: float, m: float = 1.0) -> float:
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
  return theta, RopeScaling(kind="yarn", factor=factor, original_max_position=original,
                            beta_fast=float(rope.get("beta_fast") or 32),
                            beta_slow=float(rope.get("beta_slow") or 1),
                            attention_factor=float(attention),
                            truncate=bool(rope.get("truncate", True)))


def config_from_hf(c: dict, name: str) -> ModelConfig:
  """A ModelConfig from a Llama/Mistral `config.json` (keys of transformers 5 and earlier).

  What this decoder does not compute (another architecture or activation, biases, a rope type
  or partial rotation it lacks) is a ModelFileError naming it. Mistral's sliding window is
  exact as long as the context stays inside it, so the context is capped at the window.
  """
  if c.get("model_type") not in SUPPORTED_TYPES:
    raise ModelFileError(f"config.json has model_type {c.get('model_type')!r}; supported:"
                         f" {', '.join(SUPPORTED_TYPES)} (a Llama-family model)")
  arch = [a for a in c.get("architectures") or [] if a not in SUPPORTED_ARCHITECTURES]
  if arch:
    raise ModelFileError(f"config.json names architecture {arch[0]!r}; supported:"
                         f" {', '.join(SUPPORTED_ARCHITECTURES)}")
  required = ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers",
              "intermediate_size")
  missing = [k for k in required if not isinstance(c.get(k), int)]
  if missing:
    raise ModelFileError(f"config.json of {name!r} lacks integer {', '.join(missing)}; a"
                         " Llama-family config.json sets them (the file is damaged or of"
                         " another kind)")
  act = c.get("hidden_act", "silu")
  if act != "silu":
    raise ModelFileError(f"config.json asks for activation {act!r}; Llama-family models (and"
                         " this decoder) use 'silu'")
  biased = [k for k in ("attention_bias", "mlp_bias") if c.get(k)]
  if biased:
    raise ModelFileError(f"config.json sets {', '.join(biased)}; this decoder has no bias"
                         " terms (Llama and Mistral models have none)")
  heads = int(c["num_attention_heads"])
  hidden = int(c["hidden_size"])
  theta, scaling = rope_from_hf(c)
  context = int(c.get("max_position_embeddings", 4096))
  if c.get("sliding_window"):
    context = min(context, int(c["sliding_window"]))
  return ModelConfig(
      vocab_size=int(c["vocab_size"]), hidden=hidden, layers=int(c["num_hidden_layers"]),
      heads=heads, kv_heads=int(c.get("num_key_value_heads") or heads),
      head_dim=int(c.get("head_dim") or hidden // heads), ffn=int(c["intermediate_size"]),
      rope_base=theta, rope_scaling=scaling, rms_eps=float(c.get("rms_norm_eps", 1e-5)),
      max_context=context, tie_embeddings=bool(c.get("tie_word_embeddings", False)), name=name)


def _tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Maps each tensor name to the safetensors file that holds it (sharded or not)."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      return {str(k): folder / str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ModelFileError(f"cannot read {str(index)!r} ({type(e).__name__}: {e}); the index"
                           " is damaged: copy it again") from None
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise ModelFileError(f"{str(folder)!r} has no *.safetensors files")
  out: dict[str, pathlib.Path] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="flax") as sf:
        out.update({k: f for k in sf.keys()})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds for a bad header
      raise ModelFileError(f"cannot read {str(f)!r} ({e}); the file is truncated or damaged:"
                           " copy it again") from None
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

