"""How should one decode token's grouped-query attention be written for XLA:GPU?

    python tools/attention_probe.py [--presets llama2-7b,mistral-7b] [--batches 1,32]   # JSON lines

Mistral's 7B preset decodes a batch of 32 at 39% of its floor where Llama's runs at 54%
(docs/benchmarks.md), for less KV cache to read (8 KV heads, not 32): its grouped attention
(four query heads per KV head) is the suspect. This probe times `model.layers.attention` alone
for one query token against a cache of `--cache-len` slots, written several ways, in interleaved
rounds (ratios to the library's, paired by round: median [95% t-interval]), with the bytes it
must read (K and V) over the time, and the GPU kernels per call from a profiler trace.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench import measure as B
from adafuse_jax.config import PRESETS
from adafuse_jax.model.layers import attention, kernel_attention

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from kernel_breakdown import kernel_table  # noqa: E402


def attention_mulsum(q, k, v, mask):
  """One query token: scores as a multiply and a sum over head_dim (each slot's key row is
  contiguous), softmax over slots, output as a multiply and a sum over slots; no transposes."""
  b, t, hq, hd = q.shape
  if t != 1:
    return attention(q, k, v, mask)
  hkv = k.shape[2]
  qg = q.reshape(b, 1, hkv, hq // hkv, hd).astype(jnp.float32)  # [B, 1, Hkv, G, hd]
  scores = jnp.sum(qg * k.astype(jnp.float32)[:, :, :, None, :], axis=-1)  # [B, S, Hkv, G]
  scores = scores * (1.0 / np.sqrt(hd))
  scores = jnp.where(mask[:, 0, :, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=1)
  out = jnp.sum(probs[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [B,Hkv,G,hd]
  return out.reshape(b, 1, hq, hd).astype(q.dtype)


def attention_repeat_kv(q, k, v, mask):
  """K and V repeated to every query head, then attention with groups of one (Llama's case)."""
  g = q.shape[2] // k.shape[2]
  return attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), mask)


def attention_slots_first(q, k, v, mask):
  """The library's einsums with the slot axis kept before the heads in the scores."""
  b, t, hq, hd = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, hq // hkv, hd)
  scores = jnp.einsum("btkgd,bskd->bstkg", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / np.sqrt(hd))
  scores = jnp.where(mask.transpose(0, 2, 1)[:, :, :, None, None], scores,
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=1).astype(v.dtype)
  out = jnp.einsum("bstkg,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, hd).astype(q.dtype)


VARIANTS = {"library": attention, "mulsum": attention_mulsum, "repeat-kv": attention_repeat_kv,
            "slots-first": attention_slots_first, "pallas": kernel_attention}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--presets", default="llama2-7b,mistral-7b")
  p.add_argument("--batches", default="1,32")
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--filled", type=int, default=256, help="slots a query may read (the mask)")
  p.add_argument("--layers", type=int, default=32,
                 help="attention calls per timed program (distinct caches: nothing from L2)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--trace-dir", default="/tmp/attention-probe-traces")
  args = p.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  names = [v for v in args.variants.split(",") if v]
  env = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  for preset in args.presets.split(","):
    cfg = PRESETS[preset]
    for batch in (int(x) for x in args.batches.split(",")):
      rng = jax.random.key(0)
      kq, kk, kv = jax.random.split(rng, 3)
      shape = (batch, args.cache_len, cfg.kv_heads, cfg.head_dim)
      q = jax.random.normal(kq, (args.layers, batch, 1, cfg.heads, cfg.head_dim), dtype)
      # One buffer per layer, as the model's caches hold them: a slice of one stacked array
      # would be copied out before a custom call could read it (the kernel's first run here
      # timed that copy, 64 of them per step).
      k = [jax.random.normal(key, shape, dtype) for key in jax.random.split(kk, args.layers)]
      v = [jax.random.normal(key, shape, dtype) for key in jax.random.split(kv, args.layers)]
      mask = jnp.broadcast_to(jnp.arange(args.cache_len) < args.filled,
                              (batch, 1, args.cache_len))
      # Every layer's attention in one program, as a decode step runs them (unrolled).
      programs = {n: jax.jit(lambda q, k, v, fn=VARIANTS[n]: [fn(q[l], k[l], v[l], mask)
                                                             for l in range(args.layers)])
                  for n in names}
      ref = programs["library"](q, k, v) if "library" in programs else None
      errors = {}
      for n, fn in programs.items():
        out = fn(q, k, v)
        if ref is not None:
          errors[n] = float(max(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)))
                                for a, r in zip(out, ref)))
      kernels = {}
      if not on_cpu:
        for i, n in enumerate(programs):
          trace = pathlib.Path(args.trace_dir) / f"{preset}-b{batch}-{i}"
          with jax.profiler.trace(str(trace)):
            jax.block_until_ready(programs[n](q, k, v))
          table = kernel_table(trace, 1, f"{n} ({preset}, batch {batch})")
          print(table, file=sys.stderr, flush=True)
          kernels[n] = table.splitlines()[0]
      times: dict[str, list[float]] = {n: [] for n in programs}
      for _ in range(args.rounds):
        for n, fn in programs.items():
          jax.block_until_ready(fn(q, k, v))
          t = time.perf_counter()
          out = None
          for _ in range(args.steps):
            out = fn(q, k, v)
          jax.block_until_ready(out)
          times[n].append((time.perf_counter() - t) / args.steps * 1e3)
      read = 2 * args.layers * batch * args.filled * cfg.kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
      for n in programs:
        ms = float(np.median(times[n]))
        row = {"preset": preset, "batch": batch, "variant": n, "ms_per_step": round(ms, 4),
               "vs_library": {key: round(val, 4) for key, val in B.ratio_interval(
                   times[n], times[names[0]]).items()},
               "kv_tb_s": round(read / ms / 1e9, 3), "max_abs_diff_vs_library": errors.get(n),
               "kernels": kernels.get(n, ""), "layers": args.layers, "cache_len": args.cache_len,
               "filled": args.filled, **env}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
