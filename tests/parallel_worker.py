"""Run by tests/test_parallel.py in a process of its own with simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts): decodes the same
prompts on 1, 2 and 4 devices for every adapter mode on the paths that shard, and prints what
it measured as one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from adafuse_jax.adapters.mixture import MixtureOfLoRA  # noqa: E402
from adafuse_jax.config import AdapterConfig, ModelConfig  # noqa: E402
from adafuse_jax.generation import Generator, generate  # noqa: E402
from adafuse_jax.model import LlamaModel  # noqa: E402
from adafuse_jax.parallel import make_mesh  # noqa: E402

CFG = ModelConfig(vocab_size=96, hidden=64, layers=2, heads=8, kv_heads=4, head_dim=8, ffn=96,
                  rope_base=10000.0, max_context=64, name="tp-tiny")
PROMPTS = [[5, 17, 3, 88, 42, 9, 61], [1, 2, 3]]


def run(mode: str, path: str, devices: int, layout: str) -> dict:
  model = LlamaModel(CFG, seed=1, layout=layout)
  adapters = None
  if mode != "backbone":
    adapters = MixtureOfLoRA(CFG, AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2),
                             seed=2, random_b=True, layout=layout)
  mesh = make_mesh(devices, CFG) if devices > 1 else None
  gen = Generator(model, adapters=adapters, path=path, mesh=mesh)
  res = generate(gen, PROMPTS, max_new_tokens=6)
  cache = gen.new_cache(1, 16)
  _, logits, _, _ = gen.forward(np.asarray([PROMPTS[0][:4]], np.int32), cache, jax.random.key(0))
  q = gen.params["q"].get_value()
  q = q[0] if isinstance(q, tuple) else q
  return {"tokens": [list(map(int, t)) for t in res.tokens],
          "logits": np.asarray(logits, np.float64).tolist(),
          "q_spec": str(getattr(q.sharding, "spec", None)), "q_shards": len(q.sharding.device_set)}


def checkpoints() -> dict:
  """A pool saved on one device restores onto 4 (split as its weights), is saved again from
  there, and restores onto 2 and 1: every restore decodes the tokens of the original."""
  import tempfile

  from adafuse_jax.adapters.io import load_adapters, save_adapters

  model = LlamaModel(CFG, seed=1)
  pool = MixtureOfLoRA(CFG, AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2),
                       seed=3, random_b=True)
  want = generate(Generator(model, adapters=pool, path="xla"), PROMPTS, max_new_tokens=6).tokens
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    save_adapters(f"{tmp}/one", pool)
    four = load_adapters(f"{tmp}/one", CFG, mesh=make_mesh(4, CFG))
    a = four.pool.A_o.get_value()
    a = a[0] if isinstance(a, tuple) else a
    out["restored_on"] = len(a.sharding.device_set)
    save_adapters(f"{tmp}/four", four)
    for devices, source in ((4, four), (2, None), (1, None)):
      mesh = make_mesh(devices, CFG) if devices > 1 else None
      restored = source or load_adapters(f"{tmp}/four", CFG, mesh=mesh)
      got = generate(Generator(LlamaModel(CFG, seed=1), adapters=restored, path="xla",
                               mesh=mesh), PROMPTS, max_new_tokens=6).tokens
      out[f"equal_{devices}"] = [list(map(int, t)) for t in got] == [list(map(int, t))
                                                                     for t in want]
  return out


def main() -> None:
  out = {"devices": len(jax.devices()), "runs": {}, "checkpoints": checkpoints()}
  for layout in ("stacked", "list"):
    for mode in ("backbone", "lora", "pregated", "layerwise"):
      for path in ("xla", "packed"):
        for devices in (1, 2, 4):
          out["runs"][f"{layout}/{mode}/{path}/{devices}"] = run(mode, path, devices, layout)
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
