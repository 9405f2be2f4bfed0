"""How far training moved the routing parameters of a run: router weights and tied betas.

    python tools/inspect_routing_params.py RUN/ckpt/STEP/state | POOL_FOLDER [...]

Prints each router matrix and beta vector with its largest and mean magnitude (router weights
start at std 0.02, w_ctx and betas at 0), from a `python -m train` checkpoint or an exported
pool (`--export`, `adafuse_jax.adapter_io`).
"""

from __future__ import annotations

import sys

import pathlib

import numpy as np
import orbax.checkpoint as ocp


def routing_params(state: dict, prefix: str = "") -> dict[str, np.ndarray]:
  """Leaves of an adapter state whose names are router weights (w*) or betas (beta_*)."""
  out = {}
  for key, value in state.items():
    if isinstance(value, dict) and "value" in value and not isinstance(value["value"], dict):
      if key.startswith(("w", "beta_")):
        out[prefix + key] = np.asarray(value["value"])
    elif isinstance(value, dict):
      out.update(routing_params(value, prefix + key + "."))
  return out


def _wrap(tree):
  """A pure dict of arrays in the checkpoints' {"value": array} form."""
  if isinstance(tree, dict):
    return {k: _wrap(v) for k, v in tree.items()}
  return {"value": tree}


def main(paths: list[str]) -> None:
  for path in paths:
    if (pathlib.Path(path) / "adapter_config.json").is_file():
      from flax import nnx

      from adafuse_jax.adapter_io import load_adapters, read_adapter_config
      from adafuse_jax.config import PRESETS
      model = next(c for c in PRESETS.values()
                   if all(getattr(c, k) == v for k, v in read_adapter_config(path)[1].items()))
      adapters = nnx.state(load_adapters(path, model)).to_pure_dict()
      state = {"adapters": {k: _wrap(v) for k, v in adapters.items()}}
    else:
      with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(path)
    for name, a in routing_params(state["adapters"]).items():
      print(f"{path}: {name} {a.shape} max |x| {np.abs(a).max():.4f}, mean |x| {np.abs(a).mean():.4f}")


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  main(sys.argv[1:])
