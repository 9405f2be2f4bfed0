"""Forms of one decode step's attention over a KV cache on XLA:CPU, timed side by side.

    PYTHONPATH=. python tools/cpu_attention_forms.py [--slots 512 --layers 30 --rounds 5]

The default model's shapes (SmolLM2-135M: 9 query heads, 3 key/value heads of 64, fp32, batch 1):
each timed call writes one token's key and value into every layer's buffers (donated, in place)
and attends to them, `--layers` layers chained through the query as the model chains them.
Forms:
- `library`: `model.layers.attention`, the cache as the model holds it, `[B, S, Hkv, hd]`;
- `einsum`: the library's form before 2026-12-04, still the GPU's (`model.layers.
  head_order_attention`: the same products as einsums whose results put the query heads before
  the tokens);
- `heads-major`: the cache held `[B, Hkv, S, hd]`, so the products need no transpose;
- `flat`: the cache read as `[B, S, Hkv*hd]` against a block-diagonal query, one plain product
  each way (Hkv times the multiply-adds, no batch dimensions);
- `reduce`: multiply and sum (no dot), which XLA fuses into loops;
- `windowed`: `model.layers.windowed_attention`, the library's attention over the narrowest
  eighth of the buffer that holds the written slots (`--position`: the slot written).
Interleaved rounds of 20 calls each; JSON lines: ms per call (all layers), the median over rounds,
each form's ratio to the first form named (`vs_<form>`: paired by round, median and 95%
t-interval, as the bench's ratios), and the bytes the compiled program's `copy` instructions
move per call.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import time

import jax
import jax.numpy as jnp

from adafuse_jax.bench.measure import ratio_interval
from adafuse_jax.model.layers import attention, head_order_attention, windowed_attention

HQ, HKV, HD = 9, 3, 64


def heads_major(q, k, v, mask):
  """k, v: [B, Hkv, S, hd]."""
  b = q.shape[0]
  qg = q[:, 0].reshape(b, HKV, HQ // HKV, HD)
  scores = jnp.einsum("bkgd,bksd->bkgs", qg, k) / math.sqrt(HD)
  scores = jnp.where(mask[:, 0][:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  out = jnp.einsum("bkgs,bksd->bkgd", jax.nn.softmax(scores, axis=-1), v)
  return out.reshape(b, 1, HQ, HD)


def flat(q, k, v, mask):
  b, s = k.shape[:2]
  g = HQ // HKV
  eye = jnp.eye(HKV, dtype=q.dtype)
  qbd = jnp.einsum("bkgd,kj->bjdkg", q[:, 0].reshape(b, HKV, g, HD), eye).reshape(b, HKV * HD, HQ)
  scores = jnp.einsum("bsc,bch->bsh", k.reshape(b, s, HKV * HD), qbd) / math.sqrt(HD)
  scores = jnp.where(mask[:, 0, :, None], scores, jnp.finfo(jnp.float32).min)
  full = jnp.einsum("bsh,bsc->bhc", jax.nn.softmax(scores, axis=1), v.reshape(b, s, HKV * HD))
  out = jnp.einsum("bkgjd,kj->bkgd", full.reshape(b, HKV, g, HKV, HD), eye)
  return out.reshape(b, 1, HQ, HD)


def reduce(q, k, v, mask):
  b = q.shape[0]
  qg = q[:, 0].reshape(b, 1, HKV, HQ // HKV, HD)
  scores = jnp.sum(k[:, :, :, None, :] * qg, axis=-1) / math.sqrt(HD)  # [B, S, Hkv, g]
  scores = jnp.where(mask[:, 0, :, None, None], scores, jnp.finfo(jnp.float32).min)
  out = jnp.sum(jax.nn.softmax(scores, axis=1)[..., None] * v[:, :, :, None, :], axis=1)
  return out.reshape(b, 1, HQ, HD)


# name -> (attention, the buffers' slot axis)
FORMS = {"library": (attention, 1), "einsum": (head_order_attention, 1),
         "windowed": (windowed_attention, 1), "heads-major": (heads_major, 2), "flat": (flat, 1),
         "reduce": (reduce, 1)}


def step_fn(form: str, slots: int):
  attend, slot_axis = FORMS[form]

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step(q, ks, vs, pos):
    new_ks, new_vs = [], []
    new = q[:, :, :HKV] if slot_axis == 1 else jnp.swapaxes(q[:, :, :HKV], 1, 2)
    start = (0, pos, 0, 0) if slot_axis == 1 else (0, 0, pos, 0)
    mask = (jnp.arange(slots) <= pos)[None, None, :]
    for k, v in zip(ks, vs):
      k = jax.lax.dynamic_update_slice(k, new, start)
      v = jax.lax.dynamic_update_slice(v, new, start)
      q = q + 1e-3 * attend(q, k, v, mask)
      new_ks.append(k)
      new_vs.append(v)
    return q, new_ks, new_vs
  return step


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--slots", type=int, default=512)
  p.add_argument("--layers", type=int, default=30)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--position", type=int, default=None, help="the slot written (default: half)")
  p.add_argument("--forms", default=",".join(FORMS))
  args = p.parse_args()
  key = jax.random.key(0)
  q = jax.random.normal(key, (1, 1, HQ, HD))
  k = jax.random.normal(jax.random.key(1), (1, args.slots, HKV, HD))
  v = jax.random.normal(jax.random.key(2), (1, args.slots, HKV, HD))
  pos = args.slots // 2 if args.position is None else args.position
  forms = args.forms.split(",")
  mask = (jnp.arange(args.slots) <= pos)[None, None, :]
  want = attention(q, k, v, mask)
  state, steps, copies = {}, {}, {}
  for form in forms:
    attend, slot_axis = FORMS[form]
    kk, vv = (k, v) if slot_axis == 1 else (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    err = float(jnp.abs(attend(q, kk, vv, mask) - want).max())
    assert err < 1e-4, f"{form}: max abs error {err}"
    steps[form] = step_fn(form, args.slots)
    bufs = ([kk + 0 for _ in range(args.layers)], [vv + 0 for _ in range(args.layers)])
    text = steps[form].lower(q, *bufs, pos).compile().as_text()
    copies[form] = sum(4 * math.prod(int(d) for d in dims.split(",") if d)
                       for dims in re.findall(r"= f32\[([\d,]*)\]\S* copy\(", text))
    state[form] = bufs
  times: dict[str, list[float]] = {f: [] for f in forms}
  for _ in range(args.rounds + 1):  # the first round warms up
    for form in forms:
      ks, vs = state[form]
      out, ks, vs = steps[form](q, ks, vs, pos)
      jax.block_until_ready(out)
      t = time.perf_counter()
      for _ in range(args.calls):
        out, ks, vs = steps[form](q, ks, vs, pos)
      jax.block_until_ready(out)
      times[form].append((time.perf_counter() - t) / args.calls * 1e3)
      state[form] = (ks, vs)
  first = times[forms[0]][1:]
  for form, ts in times.items():
    rounds = sorted(ts[1:])
    vs_first = {k: round(x, 4) for k, x in ratio_interval(ts[1:], first).items()}
    print(json.dumps({"form": form, "ms_per_call": round(rounds[len(rounds) // 2], 3),
                      f"vs_{forms[0]}": vs_first,
                      "rounds_ms": [round(t, 3) for t in ts[1:]], "copied_bytes": copies[form],
                      "slots": args.slots, "position": pos, "layers": args.layers,
                      "device": jax.devices()[0].device_kind,
                      "jax": jax.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


if __name__ == "__main__":
  main()
