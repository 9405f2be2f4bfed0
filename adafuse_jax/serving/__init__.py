"""Serving: a continuous-batching engine (Python) and an OpenAI-compatible HTTP server on it.

    engine = Engine(Generator(model, adapters=pool), tokenizer, max_batch=8).start()
    print(engine.generate("The capital of France is", SamplingParams(max_tokens=16)).text)

`python -m adafuse_jax.serve` runs the HTTP server (`adafuse_jax.serving.api`).
"""

from adafuse_jax.serving.engine import (Completion, Engine, EngineError, Output, RequestStream,
                                        SamplingParams)

__all__ = ["Completion", "Engine", "EngineError", "Output", "RequestStream", "SamplingParams"]
