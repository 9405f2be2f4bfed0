"""`python -m adafuse_jax.export`: a pool (or plain LoRA) as PEFT LoRA folders.

    python -m adafuse_jax.export --adapters default --out my-pool-peft
    python -m adafuse_jax.export --model DIR --adapters trained-pool --out DIR --base-model NAME

A plain LoRA becomes one PEFT folder; a pool becomes one folder per expert (plus `shared/` for
its shared part) and the router, which `--adapters OUT` loads back whole. Each folder loads in
PEFT: `PeftModel.from_pretrained(base_model, "OUT/expert-00")`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from adafuse_jax.errors import ModelFileError, UserError


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m adafuse_jax.export", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="default",
                 help="the base model: 'default', a GGUF file or Hugging Face folder")
  p.add_argument("--adapters", default="default",
                 help="the pool: 'default', a saved pool folder, or PEFT folders")
  p.add_argument("--out", required=True, help="a new folder for the PEFT folders")
  p.add_argument("--base-model", default=None,
                 help="recorded as PEFT's base_model_name_or_path (default: --model)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    import jax.numpy as jnp

    from adafuse_jax.adapters.io import load_pool
    from adafuse_jax.adapters.peft import check_new_folder, export_peft
    from adafuse_jax.weights import load_model

    out = pathlib.Path(args.out)
    check_new_folder(out)  # before the model loads
    loaded = load_model(args.model, dtype=jnp.float32, progress=False)
    pool = load_pool(args.adapters, loaded.model.cfg)
    base = args.base_model or (
        "HuggingFaceTB/SmolLM2-135M-Instruct" if args.model == "default" else args.model)
    folders = export_peft(pool, out, base)
  except (UserError, ModelFileError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(folders)} PEFT LoRA folder(s) under {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
