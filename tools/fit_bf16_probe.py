"""A few training steps of the GPU configuration (16 x 256 tokens, seed 5, the 1000-step
schedule) with the backbone in bf16 on whatever JAX runs on: the CPU check of the tied pool's
bf16 training graph (docs/training/cpu-tied-s5/README.md). `python -m train` picks f32 on the
CPU; this forces bf16.

    python tools/fit_bf16_probe.py pregated-tied /tmp/bf16-new 60
    PYTHONPATH=<a checkout of an older commit> python tools/fit_bf16_probe.py pregated-tied /tmp/bf16-old 58

Arguments: mode, workdir, steps to run. The log is WORKDIR/metrics.jsonl.
"""

from __future__ import annotations

import sys
import time

import jax.numpy as jnp

from adafuse_jax.weights import load_model
from train import data
from train.loop import TrainConfig, Trainer


def main(argv: list[str]) -> None:
  if len(argv) != 3 or not argv[2].isdigit():
    raise SystemExit(__doc__)
  mode, workdir, steps = argv[0], argv[1], int(argv[2])
  cache = data.default_cache()
  model = load_model(dtype=jnp.bfloat16, progress=False).model
  cfg = TrainConfig(mode=mode, steps=1000, batch=16, seq_len=256, seed=5, eval_every=1000,
                    checkpoint_every=1000)
  trainer = Trainer(model, cfg, data.load_streams(cache, "train"),
                    data.load_streams(cache, "heldout"), workdir)
  t0 = time.time()
  trainer.fit(until=steps, progress=False)
  print("s/step", (time.time() - t0) / steps)


if __name__ == "__main__":
  main(sys.argv[1:])
