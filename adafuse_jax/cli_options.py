"""Options shared by the command lines that load a model and expert pools (decode, serve)."""

from __future__ import annotations

import argparse
import pathlib

from adafuse_jax.vocab import MODES

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="default",
                 help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face"
                      " folder with config.json + *.safetensors")
  p.add_argument("--dtype", choices=DTYPES, default="auto",
                 help="parameter dtype; auto = float32 on the CPU, bfloat16 on a GPU")


def add_pool_options(a: argparse._ArgumentGroup) -> None:
  """--mode and the shape of random pools (a saved pool fixes its own)."""
  a.add_argument("--mode", choices=MODES, default=None,
                 help="backbone (no adapters), lora, layerwise (router at every adapted module),"
                      " pregated (route once, apply everywhere); default: the checkpoint's mode,"
                      " or backbone without --adapters")
  a.add_argument("--experts", type=int, default=8, help="experts per module (random pools)")
  a.add_argument("--rank", type=int, default=16, help="LoRA rank (random pools)")
  a.add_argument("--top-k", type=int, default=2, help="experts per token (random pools)")
  a.add_argument("--adapt-modules", default="q,k,v,o,gate,up,down",
                 help="comma-separated adapted modules (random pools)")
  a.add_argument("--per-layer-gates", action="store_true",
                 help="pregated: one gate vector per layer (random pools)")
  a.add_argument("--shared-rank", type=int, default=0,
                 help="rank of a shared expert every token uses, merged into the backbone once"
                      " (random pools; 0 = none)")


def resolve_dtype(name: str) -> str:
  import jax

  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


def adapter_config(spec: str | None, args: argparse.Namespace):
  """The AdapterConfig of an --adapters spec: a saved pool's own (unless --mode asks for
  another), else one built from the random-pool options."""
  from adafuse_jax.adapters.io import read_adapter_config
  from adafuse_jax.config import AdapterConfig

  mode = args.mode
  saved = None
  if spec not in (None, "default") and not spec.startswith("random"):
    if pathlib.Path(spec).exists():
      saved, _ = read_adapter_config(spec)
  if mode is None:
    mode = saved.mode if saved else ("pregated" if spec else "backbone")
  if saved is not None and saved.mode == mode:
    return saved
  modules = tuple(m.strip() for m in args.adapt_modules.split(",") if m.strip())
  return AdapterConfig(mode=mode, modules=modules, num_experts=args.experts, rank=args.rank,
                       top_k=args.top_k, per_layer_gates=args.per_layer_gates,
                       shared_rank=args.shared_rank)
