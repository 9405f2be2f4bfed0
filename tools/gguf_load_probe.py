"""How long reading a GGUF's weights takes, the loader's way against its earlier way, interleaved.

    PYTHONPATH=. python tools/gguf_load_probe.py [--path FILE.gguf] [--rounds 5]

`library`: `adafuse_jax.weights.gguf.load_gguf`. `memmap-stack` (the loader before 2026-12-05):
each tensor dequantized from the file's memory map as numpy hands it out (a `np.memmap`, whose
per-slice bookkeeping `gguf`'s row-group loop pays for every group), each layer's transposed copy
then stacked into `[L, in, out]` (a second copy). Both must give identical arrays (checked).
One JSON line per form: seconds per load (median of the rounds), every round, and the ratio to
`library` per round (median and 95% t-interval).
"""

from __future__ import annotations

import argparse
import json
import time

import gguf
import numpy as np

from adafuse_jax.bench.measure import ratio_interval
from adafuse_jax.weights import gguf as gguf_loader
from adafuse_jax.weights.loader import default_model_path


def memmap_stack(path: str) -> dict[str, np.ndarray]:
  """The linear weights and norms as the loader read them before: [L, in, out] stacks."""
  reader = gguf_loader.open_reader(path)
  tensors = {t.name: t for t in reader.tensors}
  cfg = gguf_loader.config_from_fields(reader.fields, set(tensors), path)

  def get(name: str) -> np.ndarray:
    t = tensors[name]
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(arr, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))

  stacks: dict[str, list[np.ndarray]] = {}
  for l in range(cfg.layers):
    for gname, name in gguf_loader._LINEAR_TENSORS.items():
      w = get(f"blk.{l}.{gname}.weight")
      if name in ("q", "k"):
        w = gguf_loader._unpermute_rows(w, cfg.heads if name == "q" else cfg.kv_heads)
      stacks.setdefault(name, []).append(np.ascontiguousarray(w.T))
    for norm in ("attn_norm", "ffn_norm"):
      stacks.setdefault(norm, []).append(get(f"blk.{l}.{norm}.weight"))
  return {name: np.stack(ws) for name, ws in stacks.items()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--path", default=None, help="a .gguf file (default: the embedded model's)")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  path = args.path or default_model_path()
  forms = {"library": lambda: gguf_loader.load_gguf(path)[1],
           "memmap-stack": lambda: memmap_stack(path)}
  new, old = forms["library"](), forms["memmap-stack"]()  # also warms the page cache
  for name, w in old.items():
    assert np.array_equal(new[name], w), f"{name} differs between the two forms"
  times: dict[str, list[float]] = {f: [] for f in forms}
  for _ in range(args.rounds):
    for form, load in forms.items():
      t = time.perf_counter()
      load()
      times[form].append(time.perf_counter() - t)
  for form, ts in times.items():
    print(json.dumps({"form": form, "s_per_load": round(sorted(ts)[len(ts) // 2], 3),
                      "vs_library": {k: round(x, 3) for k, x in
                                     ratio_interval(ts, times["library"]).items()},
                      "rounds_s": [round(t, 3) for t in ts], "file": path.rsplit("/", 1)[-1],
                      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


if __name__ == "__main__":
  main()
