"""Loads a pool's exported PEFT folders in PEFT itself, on the base model read by transformers
from its GGUF, and compares the logits with this project's for each expert alone.

    FIXENV/bin/python tools/peft_check.py MODEL.gguf POOL_PEFT_DIR OUR_LOGITS.npz

OUR_LOGITS.npz holds "prompt" and "expert-NN" logits written by tools/peft_pool_demo.sh. Runs in
an environment with torch, transformers, peft and gguf (like tests/fixtures/make_fixtures.py).
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import peft
import torch
import transformers


def main(gguf_file: str, folder: str, ours: str) -> int:
  expected = np.load(ours)
  path = pathlib.Path(gguf_file)
  prompt = torch.tensor(expected["prompt"][None].astype(np.int64))
  worst = 0.0
  for name in sorted(k for k in expected.files if k.startswith("expert-")):
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(base, pathlib.Path(folder) / name).eval()
    with torch.no_grad():
      got = model(prompt).logits[0].numpy()
    err = float(np.linalg.norm(got - expected[name]) / np.linalg.norm(expected[name]))
    worst = max(worst, err)
    print(f"{name} in PEFT {peft.__version__} (transformers {transformers.__version__}) vs"
          f" adafuse-jax: relative error {err:.2e}")
  print("PASS" if worst < 1e-4 else "FAIL")
  return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:4]))
