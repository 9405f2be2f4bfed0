"""`python -m adafuse_jax.serve`: an OpenAI-compatible HTTP server with continuous batching.

With no options it serves the embedded SmolLM2-135M-Instruct and its shipped expert pool on the
CPU, at http://127.0.0.1:8000/v1, as two model names: the backbone and the pool ("default").

    python -m adafuse_jax.serve
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "default", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

from adafuse_jax import compile_cache
from adafuse_jax.cli_options import (MIXED_HELP, PACKED_HELP, PREFILL_WAIT_HELP,
                                     add_model_options, add_pool_options, add_sere_options,
                                     adapter_config, packed_sizes, positive_ints, resolve_dtype,
                                     sere_path_note, sere_settings)
from adafuse_jax.errors import UserError, cli_error

SERVE_PATHS = ("packed", "xla", "gathered", "merged")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m adafuse_jax.serve",
      description="Serve a Llama-family model and its expert pools over the OpenAI API"
                  " (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
  add_model_options(p)
  p.add_argument("--tokenizer", default=None,
                 help="take the tokenizer from this model spec, or 'bytes' (UTF-8 bytes; for a"
                      " preset with random weights, which has none); default: the model's own")
  p.add_argument("--served-model-name", default=None,
                 help="the backbone's model name; default: the model file's name")
  a = p.add_argument_group("expert pools")
  a.add_argument("--adapters", action="append", default=None, metavar="[NAME=]SPEC",
                 help="a pool to serve as model NAME (repeatable): a checkpoint folder, 'default'"
                      " (the shipped SmolLM2 pool) or 'random[:SEED]'; default: 'default' with"
                      " the default model, none otherwise")
  a.add_argument("--no-backbone", action="store_true",
                 help="do not serve the backbone alone (saves its KV cache)")
  add_pool_options(a)
  add_sere_options(a)
  a.add_argument("--path", choices=SERVE_PATHS, default="packed",
                 help="how experts are applied (see `python -m adafuse_jax.decode --help`);"
                      " merged serves plain LoRAs only")
  a.add_argument("--backend", choices=("auto", "triton", "mosaic", "xla"), default="auto",
                 help="kernel backend of the path's Pallas ops")
  s = p.add_argument_group("server")
  s.add_argument("--host", default="127.0.0.1", help="address to listen on")
  s.add_argument("--port", type=int, default=8000, help="port to listen on")
  s.add_argument("--max-batch", type=int, default=8,
                 help="rows decoded together per model (continuous batching slots)")
  s.add_argument("--max-seq-len", type=int, default=2048,
                 help="most tokens (prompt + completion) per request")
  s.add_argument("--chunk", type=int, default=256,
                 help="most prompt tokens one request prefills between two decode steps")
  s.add_argument("--prefill-rows", default=None, metavar="N,N,...",
                 help="prompts one prefill pass takes at once, as compiled buckets (default:"
                      " powers of four up to --max-batch)")
  s.add_argument("--prefill-lengths", default=None, metavar="N,N,...",
                 help="chunk lengths a prefill pass is compiled for (default: powers of two"
                      " from 16 up to --chunk; --chunk is always one)")
  s.add_argument("--packed-prefill", default=None, metavar="N,N,...|off", help=PACKED_HELP)
  s.add_argument("--mixed-prefill", default=None, metavar="N,N,...|off", help=MIXED_HELP)
  s.add_argument("--prefill-wait", type=int, default=0, metavar="STEPS", help=PREFILL_WAIT_HELP)
  s.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body accepted")
  s.add_argument("--warm-up", action="store_true",
                 help="compile every batch bucket and prompt chunk before listening")
  p.add_argument("--quiet", action="store_true", help="no progress bar while loading")
  return p


def pool_specs(args: argparse.Namespace) -> list[tuple[str, str]]:
  """(model name, spec) of each --adapters."""
  specs = args.adapters
  if specs is None:
    specs = ["default"] if args.model == "default" else []
  out: list[tuple[str, str]] = []
  for item in specs:
    name, sep, spec = item.partition("=")
    if not sep:
      spec = item
      name = (item.replace(":", "-") if item.startswith("random")
              else pathlib.Path(item).name if item != "default" else "default")
    if not name or not spec:
      raise UserError(f"--adapters {item!r}: expected SPEC or NAME=SPEC")
    if name in {n for n, _ in out}:
      raise UserError(f"two pools are named {name!r}; name them with --adapters NAME=SPEC")
    out.append((name, spec))
  return out


def build_engines(args: argparse.Namespace, log=print) -> dict:
  """Loads the model and pools and starts one engine per served model name."""
  import jax.numpy as jnp

  from adafuse_jax.adapters.io import check_adapter_spec, resolve_adapters
  from adafuse_jax.generation import Generator
  from adafuse_jax.paths import registry
  from adafuse_jax.serving.engine import Engine
  from adafuse_jax.serving.steps import MERGED_REFUSAL
  from adafuse_jax.weights import load_model

  if args.port is not None and not 0 <= args.port < 65536:
    raise UserError(f"--port {args.port} must be in [0, 65535]")
  if args.prefill_wait < 0:
    raise UserError(f"--prefill-wait {args.prefill_wait} must be 0 (no waiting) or more decode"
                    " steps")
  cache_dir = compile_cache.from_option(args.compile_cache)
  if cache_dir is not None:
    log(f"compile cache: {cache_dir}")
  mesh = None
  if args.devices != 1:
    from adafuse_jax import parallel
    mesh = parallel.make_mesh(args.devices)
  pools = pool_specs(args)
  if args.no_backbone and not pools:
    raise UserError("--no-backbone with no --adapters leaves nothing to serve")
  configs, sere = {}, {}
  for name, spec in pools:
    cfg = adapter_config(spec, args)
    if cfg.mode == "backbone":
      raise UserError(f"--adapters {spec!r} with --mode backbone: drop one of them")
    registry.check(args.path, cfg, shared_folded=True)
    if args.path == "merged" and cfg.mode != "lora":
      raise UserError(f"--adapters {spec!r} ({cfg.mode}): {MERGED_REFUSAL}")
    check_adapter_spec(spec, cfg)
    configs[name] = cfg
    sere[name] = sere_settings(args, spec, cfg)
    note = sere_path_note(args.path, cfg, sere[name])
    if note:
      log(f"note: {name}: {note}")
  dtype = jnp.dtype(resolve_dtype(args.dtype))
  loaded = load_model(args.model, dtype=dtype, progress=not args.quiet)
  tok = loaded.tokenizer
  if args.tokenizer == "bytes":
    from adafuse_jax.weights.tokenizer import byte_tokenizer
    tok = byte_tokenizer(loaded.model.cfg.vocab_size)
  elif args.tokenizer is not None:
    tok = load_model(args.tokenizer, dtype=jnp.float32, progress=False).tokenizer
  if tok is None:
    raise UserError(f"--model {args.model!r} has no tokenizer; pass --tokenizer SPEC (a model"
                    " whose tokenizer to use, e.g. --tokenizer default, or --tokenizer bytes)")
  if mesh is not None:
    from adafuse_jax import parallel
    parallel.check_divisible(loaded.model.cfg, mesh.size)
    # Once for every engine: each Generator then finds the weights already split.
    parallel.shard_module(loaded.model, mesh, parallel.model_axis)
  engine_args = dict(max_batch=args.max_batch, max_seq_len=min(args.max_seq_len,
                                                               loaded.model.cfg.max_context),
                     chunk=args.chunk,
                     prefill_rows=positive_ints(args.prefill_rows, "--prefill-rows"),
                     prefill_lengths=positive_ints(args.prefill_lengths, "--prefill-lengths"),
                     packed_tokens=packed_sizes(args.packed_prefill),
                     mixed_tokens=packed_sizes(args.mixed_prefill, "--mixed-prefill"),
                     prefill_wait=args.prefill_wait)
  engines = {}
  if not args.no_backbone:
    name = args.served_model_name or pathlib.Path(loaded.source).stem.split(".")[0]
    engines[name] = Engine(Generator(loaded.model, mesh=mesh, attention=args.attention), tok,
                           name=name, **engine_args)
  for name, spec in pools:
    pool = resolve_adapters(spec, configs[name], loaded.model.cfg, dtype=dtype)
    gen = Generator(loaded.model, adapters=pool, path=args.path, backend=args.backend,
                    sere=sere[name], mesh=mesh, attention=args.attention)
    engines[name] = Engine(gen, tok, name=name, **engine_args)
  for name, engine in engines.items():
    engine.start(warm_up=args.warm_up)
    log(f"serving {name!r} (max batch {engine.max_batch}, context {engine.max_seq_len})")
  return engines


# What a server that ran out of device memory while starting can ask for less of.
MEMORY_ADVICE = "lower --max-batch or --max-seq-len, serve a smaller pool or --dtype bfloat16"


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  try:
    if args.max_body_mb <= 0:
      raise UserError(f"--max-body-mb={args.max_body_mb} must be positive")
    engines = build_engines(args, log)
  except KeyboardInterrupt:
    return 130
  except Exception as e:
    return cli_error(e, MEMORY_ADVICE)
  import uvicorn

  from adafuse_jax.serving.api import create_app

  app = create_app(engines, max_body_bytes=int(args.max_body_mb * (1 << 20)))
  log(f"listening on http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
  try:
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
  finally:
    for engine in engines.values():
      engine.stop()
  return 0


if __name__ == "__main__":
  sys.exit(main())
