"""The NNX decoder: layers, KV cache and the Llama model."""

from adafuse_jax.model.cache import KVCache, SlotCache
from adafuse_jax.model.llama import LINEAR_NAMES, LinearFn, LlamaModel, plain_linear

__all__ = ["KVCache", "SlotCache", "LINEAR_NAMES", "LinearFn", "LlamaModel", "plain_linear"]
