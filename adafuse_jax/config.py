"""Typed model configuration and the built-in presets.

`ModelConfig` describes a Llama-family decoder (Llama 2/3, Mistral, SmolLM2). The presets
`llama2-7b` and `mistral-7b` carry the real shapes with no weights: benchmarks fill them with
seeded random numbers, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adafuse_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as Hugging Face configs spell it.

  kind: "linear" (positions divided by `factor`) or "llama3" (wavelength-dependent blend).
  """

  kind: str = "linear"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and constants of a Llama-family decoder.

  Attributes:
    vocab_size: V.
    hidden: D, the residual width.
    layers: L, number of decoder blocks.
    heads: Hq, query heads.
    kv_heads: Hkv, key/value heads (grouped-query attention: query head h reads kv head
      h // (Hq // Hkv)).
    head_dim: hd; Hq * hd need not equal D.
    ffn: F, the SwiGLU inner width.
    rope_base: theta of the rotary embedding.
    rope_scaling: optional frequency scaling.
    rms_eps: epsilon of RMSNorm.
    max_context: the longest sequence the model was trained for.
    tie_embeddings: the output head reuses the token embedding.
    name: a label for printing.
  """

  vocab_size: int
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  ffn: int
  rope_base: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_eps: float = 1e-5
  max_context: int = 4096
  tie_embeddings: bool = False
  name: str = "llama"

  def __post_init__(self) -> None:
    for field in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn"):
      if getattr(self, field) <= 0:
        raise UserError(f"ModelConfig.{field}={getattr(self, field)} must be positive")
    if self.heads % self.kv_heads:
      raise UserError(
          f"ModelConfig.heads={self.heads} must be a multiple of kv_heads={self.kv_heads}"
          " (grouped-query attention shares each kv head among a whole group of query heads)")
    if self.head_dim % 2:
      raise UserError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")

  @property
  def q_dim(self) -> int:
    return self.heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.kv_heads * self.head_dim

  def linear_shapes(self) -> dict[str, tuple[int, int]]:
    """(in, out) of every per-layer linear module, keyed by the short module name."""
    return {
        "q": (self.hidden, self.q_dim),
        "k": (self.hidden, self.kv_dim),
        "v": (self.hidden, self.kv_dim),
        "o": (self.q_dim, self.hidden),
        "gate": (self.hidden, self.ffn),
        "up": (self.hidden, self.ffn),
        "down": (self.ffn, self.hidden),
    }

  def num_params(self) -> int:
    per_layer = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.hidden
    head = 0 if self.tie_embeddings else self.vocab_size * self.hidden
    return self.layers * per_layer + self.vocab_size * self.hidden + head + self.hidden

  def linear_bytes(self, bytes_per_param: int) -> int:
    """Bytes of all per-layer linear weights: what one batch-1 decode step must read."""
    return self.layers * sum(i * o for i, o in self.linear_shapes().values()) * bytes_per_param

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536,
        rope_base=100000.0, rms_eps=1e-5, max_context=8192, tie_embeddings=True,
        name="smollm2-135m"),
    "llama2-7b": ModelConfig(
        vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128,
        ffn=11008, rope_base=10000.0, rms_eps=1e-5, max_context=4096, name="llama2-7b"),
    "mistral-7b": ModelConfig(
        vocab_size=32000, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
        ffn=14336, rope_base=1000000.0, rms_eps=1e-5, max_context=32768, name="mistral-7b"),
}


def preset(name: str) -> ModelConfig:
  """Returns a preset by name, with an error listing the known ones."""
  try:
    return PRESETS[name]
  except KeyError:
    raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
