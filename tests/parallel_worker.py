"""Run by tests/test_parallel.py in a process of its own with simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts): decodes the same
prompts on 1, 2 and 4 devices for every adapter mode and path, and prints what it measured as
one JSON line.

    python tests/parallel_worker.py xla       # paths xla and packed, both layouts; checkpoints
    python tests/parallel_worker.py kernels   # paths gathered and merged: Pallas kernels (in the
                                              # interpreter) run per shard; the switch itself
    python tests/parallel_worker.py train     # data x tensor parallel training, its checkpoint;
                                              # the serving engine on a mesh
"""

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
from adafuse_jax import parallel  # noqa: E402
from adafuse_jax.parallel import make_mesh  # noqa: E402

CFG = ModelConfig(vocab_size=96, hidden=64, layers=2, heads=8, kv_heads=4, head_dim=8, ffn=96,
                  rope_base=10000.0, max_context=64, name="tp-tiny")
PROMPTS = [[5, 17, 3, 88, 42, 9, 61], [1, 2, 3]]


SHARD_CALLS = [0]  # kernels wrapped to run per shard while tracing


def _counting(fn, *args, **kwargs):
  SHARD_CALLS[0] += 1
  return fn(*args, **kwargs)


_on_shards = parallel.on_shards
parallel.on_shards = lambda *a, **k: _counting(_on_shards, *a, **k)


def build(mode: str, path: str, devices: int, layout: str, backend: str = "auto") -> Generator:
  model = LlamaModel(CFG, seed=1, layout=layout)
  adapters = None
  if mode != "backbone":
    adapters = MixtureOfLoRA(CFG, AdapterConfig(mode=mode, num_experts=4, rank=4, top_k=2),
                             seed=2, random_b=True, layout=layout)
  mesh = make_mesh(devices, CFG) if devices > 1 else None
  return Generator(model, adapters=adapters, path=path, backend=backend, mesh=mesh)


def run_steps(mode: str, path: str, devices: int, rows: int = 2, layout: str = "stacked",
              backend: str = "triton") -> dict:
  """A prompt pass of `rows` prompts and three greedy decode steps through `Generator.forward`
  (two compiled programs): the tokens and every step's logits."""
  gen = build(mode, path, devices, layout, backend)
  before = SHARD_CALLS[0]
  cache = gen.new_cache(rows, 8)
  tokens = np.asarray([p[:3] for p in PROMPTS[:rows]], np.int32)
  out, logits = [], []
  for _ in range(4):
    nxt, step_logits, cache, _ = gen.forward(tokens, cache, jax.random.key(0))
    out.append(np.asarray(nxt).tolist())
    logits.append(np.asarray(step_logits, np.float64).tolist())
    tokens = np.asarray(nxt, np.int32)[:, None]
  q = gen.params["q"].get_value()
  q = q[0] if isinstance(q, tuple) else q
  return {"tokens": out, "logits": logits, "q_spec": str(getattr(q.sharding, "spec", None)),
          "q_shards": len(q.sharding.device_set), "shard_calls": SHARD_CALLS[0] - before}


def switch_equality() -> dict:
  """The merged path's switch (the SGMM kernel, interpreted) on 4 devices against one: after the
  same decode, the merged weights of every module agree."""
  out = {}
  states = {}
  for devices in (1, 4):
    gen = build("pregated", "merged", devices, "stacked", backend="triton")
    generate(gen, PROMPTS[:1], max_new_tokens=3)  # the prompt's token and two switches
    states[devices] = gen.switch_state
  one, four = states[1], states[4]
  out["switches"] = [int(one.switches), int(four.switches)]
  out["experts_equal"] = bool(np.array_equal(np.asarray(one.experts), np.asarray(four.experts)))
  out["max_weight_diff"] = max(
      float(np.max(np.abs(np.asarray(one.weights[m], np.float64)
                          - np.asarray(four.weights[m], np.float64)))) for m in one.weights)
  out["weights_split"] = {m: len(w.sharding.device_set) for m, w in four.weights.items()}
  return out


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


def training() -> dict:
  """Four training steps of a pre-gated pool on one device and on a 2 (data) x 2 (tensor) mesh:
  the losses and the trained pools agree; the mesh's checkpoint restores on one device."""
  import tempfile

  from flax import nnx

  from adafuse_jax.adapters.pool import AdapterParam
  from adafuse_jax.train.loop import TrainConfig, Trainer

  rng = np.random.default_rng(0)
  streams = {d: rng.integers(0, CFG.vocab_size, 3000).astype(np.int32) for d in ("a", "b")}
  heldout = {d: rng.integers(0, CFG.vocab_size, 400).astype(np.int32) for d in ("a", "b")}
  cfg = TrainConfig(mode="pregated", modules=("q", "k", "v", "o", "gate", "up", "down"),
                    num_experts=4, rank=4, top_k=2, steps=4, batch=4, seq_len=16, warmup=1,
                    eval_every=4, eval_windows=2, checkpoint_every=4)

  def pool(trainer):
    return jax.tree.map(lambda x: np.asarray(x, np.float64),
                        nnx.state(trainer.adapters, AdapterParam).to_pure_dict())

  def max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))

  with tempfile.TemporaryDirectory() as tmp:
    one = Trainer(LlamaModel(CFG, seed=1), cfg, streams, heldout, f"{tmp}/one")
    one_losses = one.fit(progress=False)
    mesh = make_mesh(4, CFG, data=2)
    split = Trainer(LlamaModel(CFG, seed=1), cfg, streams, heldout, f"{tmp}/mesh", mesh=mesh)
    split_losses = split.fit(progress=False)
    a_q = split.adapters.pool.B_q.get_value()
    back = Trainer(LlamaModel(CFG, seed=1), cfg, streams, heldout, f"{tmp}/mesh")
    restored_step = back.restore()
    return {"losses_one": one_losses, "losses_mesh": split_losses,
            "pool_diff": max_diff(pool(one), pool(split)),
            "restored_step": restored_step, "restored_diff": max_diff(pool(split), pool(back)),
            "b_q_spec": str(a_q.sharding.spec), "b_q_shards": len(a_q.sharding.device_set),
            "batch_spec": str(split._place(np.zeros((4, 17), np.int32)).sharding.spec)}


def serving() -> dict:
  """The serving engine (continuous batching over a slot cache) on 1, 2 and 4 devices: six
  greedy requests of different lengths in flight together, each one's token ids."""
  import dataclasses

  from adafuse_jax.serving.engine import Engine, SamplingParams
  from adafuse_jax.weights.tokenizer import byte_tokenizer

  cfg = dataclasses.replace(CFG, vocab_size=256)  # the byte tokenizer's alphabet
  out = {}
  for devices in (1, 2, 4):
    model = LlamaModel(cfg, seed=1)
    pool = MixtureOfLoRA(cfg, AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2),
                         seed=2, random_b=True)
    mesh = make_mesh(devices, cfg) if devices > 1 else None
    gen = Generator(model, adapters=pool, path="packed", mesh=mesh)
    with Engine(gen, byte_tokenizer(256), max_batch=4, max_seq_len=48, chunk=16) as engine:
      streams = [engine.submit(list(range(3 + 5 * i, 10 + 7 * i)), SamplingParams(max_tokens=4 + i))
                 for i in range(6)]
      out[str(devices)] = [s.result().token_ids for s in streams]
      out[f"cache_spec_{devices}"] = str(getattr(engine._cache.k[0].sharding, "spec", None))
  return out


def main(part: str) -> None:
  out = {"devices": len(jax.devices()), "runs": {}}
  if part == "train":
    out["training"] = training()
    out["serving"] = serving()
  elif part == "xla":
    out["checkpoints"] = checkpoints()
    for layout in ("stacked", "list"):
      for mode in ("backbone", "lora", "pregated", "layerwise"):
        for path in ("xla", "packed"):
          for devices in (1, 2, 4):
            out["runs"][f"{layout}/{mode}/{path}/{devices}"] = run_steps(
                mode, path, devices, layout=layout, backend="auto")
  else:  # the kernels read stacked weights; "triton" runs them in the Pallas interpreter
    out["switch"] = switch_equality()
    for path, modes in (("gathered", ("lora", "pregated", "layerwise")),
                        ("merged", ("lora", "pregated"))):
      for mode in modes:
        for devices in (1, 2, 4):
          # merged at batch 1, where every step switches (a batch of two disagrees and runs
          # unmerged)
          out["runs"][f"stacked/{mode}/{path}/{devices}"] = run_steps(
              mode, path, devices, rows=1 if path == "merged" else 2)
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "xla"))
