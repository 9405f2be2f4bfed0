"""Loading weights and tokenizers: GGUF, Hugging Face folders, the embedded default model."""

from adafuse_jax.weights.loader import LoadedModel, default_model_path, load_model
from adafuse_jax.weights.tokenizer import Tokenizer

__all__ = ["LoadedModel", "Tokenizer", "default_model_path", "load_model"]
