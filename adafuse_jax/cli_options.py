"""Options shared by the command lines that load a model and expert pools (decode, serve)."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from adafuse_jax.compile_cache import HELP as COMPILE_CACHE_HELP
from adafuse_jax.errors import UserError
from adafuse_jax.vocab import ATTENTIONS, MODES

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_model_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="default",
                 help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file, or a Hugging Face"
                      " folder with config.json + *.safetensors")
  p.add_argument("--dtype", choices=DTYPES, default="auto",
                 help="parameter dtype; auto = float32 on the CPU, bfloat16 on a GPU")
  p.add_argument("--devices", type=int, default=1,
                 help="tensor-parallel devices (weights split Megatron-style, KV cache by heads,"
                      " Pallas kernels per shard; every path); on a CPU simulate them with"
                      " XLA_FLAGS=--xla_force_host_platform_device_count=N")
  p.add_argument("--compile-cache", default="auto", metavar="auto|off|DIR", help=COMPILE_CACHE_HELP)
  p.add_argument("--attention", choices=("auto", *ATTENTIONS), default="auto",
                 help="decode steps' attention: pallas (the decode-attention kernel: reads only"
                      " the filled part of the cache), pallas-append (a kernel that also rotates"
                      " the token and writes it into the cache), xla (XLA's fusions over the"
                      " whole cache),"
                      " windowed (XLA's fusions over the cache's written part, in eighths);"
                      " auto = pallas-append on one GPU, else xla")


POOL_DEFAULTS = {"experts": 8, "rank": 16, "top_k": 2, "adapt_modules": "q,k,v,o,gate,up,down",
                 "per_layer_gates": False, "shared_rank": 0}


def add_pool_options(a: argparse._ArgumentGroup) -> None:
  """--mode and the shape of random pools (a saved pool fixes its own)."""
  a.add_argument("--mode", choices=MODES, default=None,
                 help="backbone (no adapters), lora, layerwise (router at every adapted module),"
                      " pregated (route once, apply everywhere); default: the checkpoint's mode,"
                      " or backbone without --adapters")
  d = POOL_DEFAULTS
  a.add_argument("--experts", type=int, default=d["experts"], help="experts per module (random pools)")
  a.add_argument("--rank", type=int, default=d["rank"], help="LoRA rank (random pools)")
  a.add_argument("--top-k", type=int, default=d["top_k"], help="experts per token (random pools)")
  a.add_argument("--adapt-modules", default=d["adapt_modules"],
                 help="comma-separated adapted modules (random pools)")
  a.add_argument("--per-layer-gates", action="store_true",
                 help="pregated: one gate vector per layer (random pools)")
  a.add_argument("--shared-rank", type=int, default=d["shared_rank"],
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
  from adafuse_jax.adapters.io import CONFIG_FILE, pool_folder, read_adapter_config
  from adafuse_jax.config import AdapterConfig

  from adafuse_jax.adapters import peft

  mode = args.mode
  if peft.is_peft_spec(spec):
    cfg = peft.spec_config(spec, mode=mode, top_k=args.top_k)
    asked = [f"--{name.replace('_', '-')} {getattr(args, name)}"
             for name in ("experts", "rank", "adapt_modules", "shared_rank")
             if getattr(args, name) != POOL_DEFAULTS[name]]
    if asked:
      raise UserError(f"{', '.join(asked)} shape random pools, but the PEFT adapters {spec!r}"
                      f" fix their own ({cfg.num_experts} expert(s), rank {cfg.rank}, modules"
                      f" {','.join(cfg.modules)}); drop them")
    if peft.is_export(spec):
      return cfg
    return cfg.replace(per_layer_gates=args.per_layer_gates) if cfg.mode == "pregated" else cfg
  saved = None
  if spec is not None and not spec.startswith("random"):
    folder = pool_folder(spec)
    if (folder / CONFIG_FILE).is_file():
      saved, _ = read_adapter_config(folder)
  if mode is None:
    mode = saved.mode if saved else ("pregated" if spec else "backbone")
  if saved is not None and saved.mode == mode:
    fixed = {"experts": saved.num_experts, "rank": saved.rank, "top_k": saved.top_k,
             "shared_rank": saved.shared_rank, "per_layer_gates": saved.per_layer_gates,
             "adapt_modules": ",".join(saved.modules)}
    asked = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name, value in fixed.items()
             if getattr(args, name) != POOL_DEFAULTS[name] and getattr(args, name) != value]
    if asked:
      raise UserError(f"{', '.join(asked)} shape random pools, but the pool {spec!r} fixes its"
                      f" own (experts {saved.num_experts}, rank {saved.rank}, top-k"
                      f" {saved.top_k}, modules {','.join(saved.modules)}); drop them, or train"
                      " a pool of that shape")
    return saved
  modules = tuple(m.strip() for m in args.adapt_modules.split(",") if m.strip())
  return AdapterConfig(mode=mode, modules=modules, num_experts=args.experts, rank=args.rank,
                       top_k=args.top_k, per_layer_gates=args.per_layer_gates,
                       shared_rank=args.shared_rank)


def positive_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
  """'1,4,16' -> (1, 4, 16) for a command-line option; None stays None."""
  if text is None:
    return None
  try:
    values = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise UserError(f"{flag} {text!r} must be positive integers separated by commas, like"
                    " 1,4,16") from None
  if not values or min(values) < 1:
    raise UserError(f"{flag} {text!r} must be positive integers separated by commas, like"
                    " 1,4,16")
  return values


def packed_sizes(text: str | None, flag: str = "--packed-prefill") -> tuple[int, ...] | None:
  """--packed-prefill and --mixed-prefill: 'off' -> () (none), '512,2048' -> (512, 2048), None
  stays None (the engine's default)."""
  if text is not None and text.strip().lower() == "off":
    return ()
  return positive_ints(text, flag)


PACKED_HELP = ("token counts of a packed prefill pass (whole prompts of up to --chunk tokens"
               " laid end to end, no padding between them), as compiled buckets; default"
               " powers of two from 64 up to 4 x --chunk; 'off': every prompt prefills in its"
               " own row")
MIXED_HELP = ("prompt-token counts a decode step can also prefill (while rows decode, waiting"
              " whole prompts ride in the next step, packed after its decode tokens: one read of"
              " the weights for both), compiled per batch bucket and attention span; default off"
              " (every prompt takes a pass of its own: with mixed steps the H200 server made"
              " 0.85x the tokens/s at 32 streams; see docs/serving.md)")

PREFILL_WAIT_HELP = ("most decode steps a new prompt's prefill pass waits, while rows decode, for"
                     " more prompts to share it (requests freed together arrive a few ms apart;"
                     " one pass reads the weights once for all of them); 0: a pass whenever a"
                     " prompt waits")


def _rho(text: str) -> float | str:
  if text == "auto":
    return text
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is neither a number in [0, 1] nor 'auto'") from None


def add_sere_options(a: argparse._ArgumentGroup) -> None:
  a.add_argument("--sere-rho", type=_rho, default=None, metavar="RHO|auto",
                 help="SERE: move a batch step's secondary expert choices to the most similar"
                      " primary expert when their similarity is at least RHO (0 moves every one,"
                      " 1 none); needs a pre-gated pool saved with its similarity"
                      " (sere_similarity.npy); 'auto': the setting (rho and S) the pool's"
                      " measured sweep recommends (sere_quality.json, from `python -m"
                      " adafuse_jax.train sere-calibrate --sweep`); default off")
  a.add_argument("--sere-primary", type=int, default=1,
                 help="SERE: choices per token kept as they are (the primary experts; with"
                      " --sere-rho auto the sweep's)")


def _recommended(spec: str | None, cfg) -> tuple[float | None, int]:
  """(rho, S) that the pool's SERE sweep recommends, (None, 1) where it found none that reads
  fewer experts within its perplexity budget (SERE stays off, and says so)."""
  if cfg is None or cfg.mode != "pregated" or spec is None or spec.startswith("random"):
    raise UserError("--sere-rho auto reads the SERE sweep saved beside a pre-gated pool"
                    " (--adapters default or a saved pool's folder)")
  from adafuse_jax.adapters.io import pool_folder
  from adafuse_jax.adapters.sere import QUALITY_FILE, load_recommendation

  found = load_recommendation(pool_folder(spec))
  if found is None:
    raise UserError(f"the pool {spec!r} has no {QUALITY_FILE} to pick --sere-rho auto from;"
                    f" measure it with `python -m adafuse_jax.train sere-calibrate --adapters"
                    f" {spec} --sweep`, or give --sere-rho a number")
  best, budget = found
  if best is None:
    print(f"note: SERE off: the sweep of the pool {spec!r} found no setting that reads fewer"
          f" experts within +{budget:g}% perplexity", file=sys.stderr)
    return None, 1
  return float(best["rho"]), int(best["primary_k"])


def sere_path_note(path: str, cfg, sere) -> str | None:
  """The note to print when SERE is on but `path` reads every expert at every step, whatever
  the routing (SERE then changes the tokens and saves no bytes); None otherwise."""
  if sere is None or cfg is None:
    return None
  from adafuse_jax.paths import registry

  decode_path = registry.get(path)
  if decode_path.experts_read(cfg.num_experts, 1.0) != cfg.num_experts:
    return None
  return (f"path {decode_path.name.value!r} reads all {cfg.num_experts} experts at every step:"
          " SERE re-routes the choices but saves no bytes there; path 'gathered' (GPU) reads"
          " only the experts a step uses (`decode --path auto` measures which is faster)")


def sere_settings(args: argparse.Namespace, spec: str | None, cfg):
  """SereSettings from --sere-rho/--sere-primary for the pool `spec` (None when off); checks the
  values and that the pool carries its similarity, before any model loads."""
  import math

  if args.sere_rho is None:
    return None
  from adafuse_jax.adapters.io import pool_folder
  from adafuse_jax.adapters.sere import (SIMILARITY_FILE, SereSettings, load_similarity,
                                         pregated_similarity)

  rho, primary = args.sere_rho, args.sere_primary
  if rho == "auto":
    rho, primary = _recommended(spec, cfg)
    if rho is None:
      return None
  if not (math.isfinite(rho) and 0.0 <= rho <= 1.0):
    raise UserError(f"--sere-rho {rho} must be in [0, 1] (0 re-routes every secondary choice,"
                    " 1 none)")
  if cfg is None or cfg.mode != "pregated":
    raise UserError("--sere-rho re-routes pre-gated choices: it needs a pre-gated pool"
                    " (--adapters with mode pregated)")
  if not 1 <= primary <= cfg.top_k:
    raise UserError(f"--sere-primary {primary} must be in [1, top-k = {cfg.top_k}] for this pool")
  if spec is None or spec.startswith("random"):
    raise UserError(f"--adapters {spec!r} has no SERE similarity file; SERE needs a saved pool"
                    f" with {SIMILARITY_FILE} beside it (the shipped 'default' pool has one)")
  folder = pool_folder(spec)
  similarity = load_similarity(folder)
  if similarity is None:
    raise UserError(f"the pool {spec!r} has no {SIMILARITY_FILE}; compute it with `python -m"
                    f" adafuse_jax.train sere-calibrate --adapters {spec}`, or drop --sere-rho")
  if similarity.ndim != 3 or similarity.shape[1:] != (cfg.num_experts, cfg.num_experts) or \
     not np.isfinite(similarity).all():
    raise UserError(f"{str(folder / SIMILARITY_FILE)!r} holds {similarity.shape}, not finite"
                    f" [layers, {cfg.num_experts}, {cfg.num_experts}] similarities; compute it"
                    " again")
  return SereSettings(similarity=pregated_similarity(similarity), primary_k=primary, rho=rho)
