"""Typed model configuration and the built-in presets.

`ModelConfig` describes a Llama-family decoder (Llama 2/3, Mistral, SmolLM2). The presets
`llama2-7b` and `mistral-7b` carry the real shapes with no weights: benchmarks fill them with
seeded random numbers, so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from adafuse_jax.errors import UserError
from adafuse_jax.vocab import MODES, Mode

# The linear modules of a Llama block, in the order the forward pass calls them.
LINEAR_NAMES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
# Linear modules of a block that read the same input, in the order the block calls them.
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def input_group(name: str) -> tuple[str, ...]:
  """The modules that read the same input as `name` (itself included)."""
  return next(g for g in INPUT_GROUPS if name in g)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as Hugging Face configs spell it (`rope_parameters` / `rope_scaling`).

  kind: "linear" (positions divided by `factor`), "llama3" (wavelength-dependent blend),
    "yarn" (NTK-by-parts blend between `beta_fast` and `beta_slow` rotations, cos/sin scaled
    by `attention_factor`) or "dynamic" (dynamic NTK: frequencies change only past
    `max_position_embeddings`, which the model's context is capped at, so inside it they are
    the unscaled ones).
  original_max_position: the pre-training context the llama3 and yarn formulas measure against.
  attention_factor: yarn's scale of cos and sin (None: transformers' default from `factor`,
    `mscale`, `mscale_all_dim`); 1 for the other kinds.
  """

  kind: str = "linear"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float = 1.0
  truncate: bool = True


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
    for field in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn",
                  "max_context"):
      if getattr(self, field) <= 0:
        raise UserError(f"ModelConfig.{field}={getattr(self, field)} must be positive")
    if self.heads % self.kv_heads:
      raise UserError(
          f"ModelConfig.heads={self.heads} must be a multiple of kv_heads={self.kv_heads}"
          " (grouped-query attention shares each kv head among a whole group of query heads)")
    if self.head_dim % 2:
      raise UserError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
    for field in ("rms_eps", "rope_base"):
      value = getattr(self, field)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"ModelConfig.{field}={value} must be a positive finite number (the"
                        " model file's RMSNorm epsilon / RoPE theta)")

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
    # The shape of Llama-2-70B (GQA, 8 KV heads): 138 GB in bf16, more than one 141 GB GPU
    # holds with a KV cache; the tensor-parallel case.
    "llama2-70b": ModelConfig(
        vocab_size=32000, hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128,
        ffn=28672, rope_base=10000.0, rms_eps=1e-5, max_context=4096, name="llama2-70b"),
}


def preset(name: str) -> ModelConfig:
  """Returns a preset by name, with an error listing the known ones."""
  try:
    return PRESETS[name]
  except KeyError:
    raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Which linear modules carry LoRA experts, and how tokens are routed to them.

  Attributes:
    mode: "backbone" (no adapters), "lora" (one plain LoRA, no router), "layerwise" (a top-k
      router at every adapted module, MoLA/MixLoRA style), "pregated" (one router at the first
      adapted module decides experts and gates once for every layer: AdaFuse/LoRA-Switch).
    modules: adapted modules, any subset of q, k, v, o, gate, up, down.
    num_experts: E experts per adapted module and layer (forced to 1 for "lora").
    rank: r of every expert.
    alpha: LoRA scaling numerator; deltas are scaled by alpha / rank.
    top_k: experts per token (forced to 1 for "lora").
    per_layer_gates: "pregated" only: experts are still chosen once, but one matmul at the first
      layer gives each layer its own gates over those experts.
    router_init_std: std of the routers' initial weights.
    shared_rank: rank of a shared expert that every token uses beside its routed ones
      ("pregated" and "layerwise"; 0 = none). It is the same for every token, so a Generator
      merges it into the backbone once (`adafuse_jax.adapters.fold_shared`): free at decode.
    first_layer: layers below it carry no experts, so the pre-gate router reads the first
      adapted module's input at this layer: a hidden state that has seen the context through
      the layers below, where layer 0's input is the token's embedding alone.
    tied_shared: the pool itself is the shared expert ("pregated" and "layerwise"): every token
      uses every expert at gate 1 (together a plain LoRA of rank E*r) and its top-k experts
      again at gate beta * g, beta a learned scalar per module and layer that starts at 0.
      Same trainable budget as that LoRA (+ router and betas) and equal to it at the start;
      a Generator folds the dense part into the backbone and beta into the experts' B
      (`adafuse_jax.adapters.fold_shared`), leaving an ordinary pool for every decode path.
    route_context: "pregated" only, 0 = off. The pre-gate router also reads a running mean of
      the router inputs before the token (weights route_context^distance, normalised), through
      its own matrix that starts at zero: layer 0's input is the token's embedding alone, so
      without it a token id always picks the same experts. A training-time experiment: decoding
      it needs each row's running mean carried from step to step, not built yet (Generator
      refuses it).
  """

  mode: str = "pregated"
  modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  num_experts: int = 8
  rank: int = 16
  alpha: float = 32.0
  top_k: int = 2
  per_layer_gates: bool = False
  router_init_std: float = 0.02
  shared_rank: int = 0
  first_layer: int = 0
  tied_shared: bool = False
  route_context: float = 0.0

  def __post_init__(self) -> None:
    if self.mode not in MODES:
      raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
    unknown = [m for m in self.modules if m not in LINEAR_NAMES]
    if unknown:
      raise UserError(f"unknown adapted module(s) {unknown}; choose from {', '.join(LINEAR_NAMES)}")
    if len(set(self.modules)) != len(self.modules):
      raise UserError(f"adapted modules {self.modules} name a module twice")
    if self.mode != "backbone" and not self.modules:
      raise UserError("no adapted modules: name at least one of q, k, v, o, gate, up, down")
    if self.rank <= 0:
      raise UserError(f"rank={self.rank} must be positive")
    if self.num_experts <= 0:
      raise UserError(f"num_experts={self.num_experts} must be positive")
    if self.top_k <= 0:
      raise UserError(f"top_k={self.top_k} must be positive")
    if self.mode in ("layerwise", "pregated") and self.top_k > self.num_experts:
      raise UserError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}; lower"
                      " --top-k or raise --experts")
    if self.first_layer < 0:
      raise UserError(f"first_layer={self.first_layer} must be 0 or more")
    if self.shared_rank < 0:
      raise UserError(f"shared_rank={self.shared_rank} must be 0 (no shared expert) or positive")
    if self.shared_rank and self.mode not in ("pregated", "layerwise"):
      raise UserError(f"shared_rank={self.shared_rank} needs mode 'pregated' or 'layerwise' (a"
                      " plain LoRA is itself one shared expert: raise its rank instead)")
    if self.tied_shared and self.mode not in ("pregated", "layerwise"):
      raise UserError("tied_shared needs mode 'pregated' or 'layerwise' (a plain LoRA is already"
                      " dense)")
    if self.tied_shared and self.shared_rank:
      raise UserError(f"tied_shared makes the pool the shared expert; shared_rank={self.shared_rank}"
                      " would add a second one: pass one of the two")
    if not 0.0 <= self.route_context < 1.0:
      raise UserError(f"route_context={self.route_context} must be in [0, 1) (0 = off)")
    if self.route_context and self.mode != "pregated":
      raise UserError("route_context applies to mode 'pregated' only (layer-wise routers see the"
                      " context through the layers below)")
    if self.per_layer_gates and self.mode != "pregated":
      raise UserError("per_layer_gates applies to mode 'pregated' only")
    object.__setattr__(self, "mode", str(self.mode))  # a plain string, as configs are saved
    if self.mode == Mode.LORA:
      # One plain LoRA is a pool of one expert that every token uses with gate 1.
      object.__setattr__(self, "num_experts", 1)
      object.__setattr__(self, "top_k", 1)
    # Keep the modules in the model's order so that "first adapted module" is well defined.
    object.__setattr__(self, "modules", tuple(m for m in LINEAR_NAMES if m in self.modules))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def has_shared(self) -> bool:
    """Whether a shared expert serves every token (its own, or the whole pool when tied)."""
    return bool(self.shared_rank) or self.tied_shared

  def replace(self, **changes: Any) -> "AdapterConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["modules"] = list(self.modules)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
    d = dict(d)
    d["modules"] = tuple(d.get("modules", ()))
    return cls(**d)
