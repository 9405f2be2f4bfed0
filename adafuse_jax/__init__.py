"""adafuse-jax: dynamic LoRA experts for Llama-family models, as fast as the plain model."""

from adafuse_jax.config import PRESETS, ModelConfig, preset
from adafuse_jax.errors import ModelFileError, UserError

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "ModelFileError", "UserError", "preset", "__version__"]
