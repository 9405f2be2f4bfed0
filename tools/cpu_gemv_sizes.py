"""How fast XLA:CPU reads a weight in a batch-1 matmul, by the weight's size.

    PYTHONPATH=. python tools/cpu_gemv_sizes.py [--layers 30 --rounds 5]

The default model's decode step is ~210 matmuls of one row against weights of 1.3-7 MB (and the
113 MB tied head). Each shape here is timed as the step runs it: `--layers` distinct fp32
weights chained through the row (each product feeds the next one's input, so none can be
skipped or reordered), every output element used. Shapes are interleaved in rounds of 20 calls;
JSON lines: per shape, µs per matmul (median over rounds) and the read rate it implies
(weight bytes / time).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

# (rows in, columns out) of SmolLM2-135M's packed step (`paths/packed.py`, the shipped pool):
# q/k/v with their experts' shrinks, o with its shrink, o and down alone, gate/up, an eighth of
# the tied head.
SHAPES = {"q,k,v+shrinks": (576, 1152), "o+shrink": (576, 640), "o": (576, 576),
          "down": (1536, 576), "gate,up": (576, 3072), "head/8": (576, 6144)}


def chained(n_in: int, n_out: int, layers: int, seed: int):
  """A jitted call over `layers` weights [n_in, n_out], each product fed back into the row."""
  rng = np.random.default_rng(seed)
  weights = [jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) / n_in ** 0.5)
             for _ in range(layers)]
  back = jnp.asarray(rng.standard_normal((n_out, n_in), np.float32) / n_out ** 0.5)

  @jax.jit
  def run(x, weights):
    for w in weights:
      y = x @ w
      x = x + 1e-3 * jnp.tanh(y.sum()) * back[:1]  # every output element feeds the next row
    return x

  x = jnp.ones((1, n_in), jnp.float32)
  return lambda: run(x, weights).block_until_ready()


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--calls", type=int, default=20)
  args = ap.parse_args()
  calls = {name: chained(*shape, args.layers, i) for i, (name, shape) in enumerate(SHAPES.items())}
  for fn in calls.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(args.rounds):
    for name, fn in calls.items():
      t0 = time.perf_counter()
      for _ in range(args.calls):
        fn()
      times[name].append((time.perf_counter() - t0) / args.calls / args.layers)
  for name, (n_in, n_out) in SHAPES.items():
    seconds = float(np.median(times[name]))
    print(json.dumps({"shape": name, "in": n_in, "out": n_out, "weight_mb": n_in * n_out * 4 / 1e6,
                      "us_per_matmul": round(seconds * 1e6, 1),
                      "us_per_round": [round(t * 1e6, 1) for t in times[name]],
                      "gb_s": round(n_in * n_out * 4 / seconds / 1e9, 1),
                      "layers": args.layers, "device": jax.devices()[0].device_kind,
                      "jax": jax.__version__}))


if __name__ == "__main__":
  main()
