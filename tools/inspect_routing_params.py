"""How far training moved the routing parameters of a run: router weights and tied betas.

    python tools/inspect_routing_params.py RUN/ckpt/STEP/state | POOL_FOLDER [...]

Prints each router matrix and beta vector with its largest and mean magnitude (router weights
start at std 0.02, w_ctx and betas at 0), from a `python -m train` checkpoint or an exported
pool (`--export`, `adafuse_jax.adapter_io`).
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import orbax.checkpoint as ocp

from train.loop import routing_params


def adapter_state(path: str):
  """The adapters' state of a training checkpoint or of an exported pool folder."""
  if (pathlib.Path(path) / "adapter_config.json").is_file():
    from flax import nnx

    from adafuse_jax.adapter_io import load_adapters, read_adapter_config
    from adafuse_jax.config import PRESETS
    shapes = read_adapter_config(path)[1]
    model = next(c for c in PRESETS.values()
                 if all(getattr(c, k) == v for k, v in shapes.items()))
    return nnx.to_pure_dict(nnx.state(load_adapters(path, model)))
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path)["adapters"]


def main(paths: list[str]) -> None:
  for path in paths:
    for name, a in routing_params(adapter_state(path)).items():
      print(f"{path}: {name} {a.shape} max |x| {np.abs(a).max():.4f}, mean |x| {np.abs(a).mean():.4f}")


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  main(sys.argv[1:])
