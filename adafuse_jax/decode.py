"""`python -m adafuse_jax.decode`: generate text with a Llama-family model (CLI only).

With nothing but a prompt it runs the embedded SmolLM2-135M-Instruct on the CPU:

    python -m adafuse_jax.decode "The capital of France is"
    python -m adafuse_jax.decode --chat "What is 2+2?"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from adafuse_jax import compile_cache
from adafuse_jax.cli_options import (add_model_options, add_pool_options, add_sere_options,
                                     adapter_config, resolve_dtype, sere_path_note,
                                     sere_settings)
from adafuse_jax.errors import UserError, cli_error
from adafuse_jax.vocab import PATHS, legacy_path


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m adafuse_jax.decode",
      description="Generate text with a Llama-family model; streams the text, then prints one"
                  " line of measured figures (prompt tokens, prefill ms, decode ms/token, tokens/s).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      # No prefix matching: `--prompt` must not silently mean `--prompts-file`.
      allow_abbrev=False)
  p.add_argument("prompt", nargs="*", help="prompt text; several prompts decode as one batch")
  p.add_argument("--prompt", dest="prompt_option", action="append", default=[], metavar="TEXT",
                 help="a prompt (may be repeated), beside or instead of the positional ones")
  p.add_argument("--prompts-file", help="a file with one prompt per line (decoded as one batch)")
  p.add_argument("--chat", action="store_true",
                 help="wrap each prompt as a user message in the model's chat template")
  add_model_options(p)
  p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per prompt")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  a = p.add_argument_group("dynamic adapters")
  a.add_argument("--adapters", default=None,
                 help="an adapter checkpoint folder, 'default' (the shipped SmolLM2 pool), or"
                      " 'random[:SEED]' (a seeded random pool, for tests and benchmarks)")
  add_pool_options(a)
  add_sere_options(a)
  a.add_argument("--path", choices=PATHS, default=None,
                 help="how the experts are applied: packed (default): every expert's A and the"
                      " layer-wise routers appended to the backbone's matrices, q/k/v and gate/up"
                      " one matmul each, one small expansion per module; xla: plain XLA matmuls"
                      " beside the backbone's; gathered: Pallas kernels that read only the step's"
                      " experts and fold them into the base matmul (GPU; interpreted on the CPU);"
                      " merged: --mode lora folds the LoRA into the weights once, --mode pregated"
                      " switches each token's experts into the weights (one SGMM launch, then a"
                      " plain backbone pass); auto: measure every path that can run this"
                      " configuration and use the fastest (prints the choice and why)")
  a.add_argument("--backend", choices=("auto", "triton", "mosaic", "xla"), default="auto",
                 help="kernel backend of the path's Pallas op (gathered, merged); auto: Mosaic"
                      " GPU where it applies, else the Triton lowering, else XLA")
  # Spellings of earlier versions, still accepted: --implementation X is --path X (pallas is
  # gathered), --merge is --path merged.
  a.add_argument("--implementation", default=None, help=argparse.SUPPRESS)
  a.add_argument("--merge", action="store_true", help=argparse.SUPPRESS)
  a.add_argument("--show-routing", action="store_true",
                 help="print, per generated token, the experts and gates chosen")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
  p.add_argument("--quiet", action="store_true", help="no progress bar while loading")
  return p


def _prompts(args: argparse.Namespace) -> list[str]:
  prompts = list(args.prompt) + list(args.prompt_option)
  if args.prompts_file:
    try:
      with open(args.prompts_file, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
      raise UserError(f"cannot read --prompts-file {args.prompts_file!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
      raise UserError(f"--prompts-file {args.prompts_file!r} is not UTF-8 text (byte"
                      f" {e.start}); save it as UTF-8") from None
  for i, p in enumerate(prompts):
    try:  # argv that is not UTF-8 arrives as surrogate escapes: refuse it here, once
      p.encode("utf-8")
    except UnicodeEncodeError:
      raise UserError(f"prompt {i} is not valid UTF-8; pass UTF-8 text") from None
  if not prompts or any(not p.strip() for p in prompts):
    raise UserError("empty prompt: give some text, e.g."
                    " python -m adafuse_jax.decode \"The capital of France is\"")
  return prompts


def _routing_table(tok, res) -> list[dict]:
  """Per generated token of row 0: its text, the experts that produced it, and their gates."""
  rows = []
  for token, (experts, gates) in zip(res.tokens[0], res.routes):
    g = gates[0]
    rows.append({"token": tok.decode([token]), "experts": experts[0].tolist(),
                 "gates": [round(float(x), 3) for x in (g if g.ndim == 1 else g.mean(0))]})
  return rows


def _path(args: argparse.Namespace) -> tuple[str | None, str]:
  """(path or None for the default, backend) from --path/--backend, or from the earlier
  --implementation/--merge spelling (with a note naming the new one)."""
  if args.implementation is None and not args.merge:
    return args.path, args.backend
  if args.path is not None:
    raise UserError("--path replaces --implementation and --merge: pass only --path")
  path, backend = legacy_path(args.implementation, args.merge)
  if path is not None:
    print(f"note: --implementation/--merge are now spelled --path {path}"
          + (f" --backend {backend}" if backend != "auto" else ""), file=sys.stderr)
  return (str(path) if path is not None else None), backend


def run(args: argparse.Namespace) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from adafuse_jax.adapters.io import check_adapter_spec, resolve_adapters
  from adafuse_jax.generation import Generator, check_prompts, decode_shape, generate
  from adafuse_jax.paths import registry
  from adafuse_jax.sampling import SamplingConfig
  from adafuse_jax.weights import load_model

  # Check the cheap arguments before spending seconds on loading the model.
  prompts = _prompts(args)
  sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens={args.max_new_tokens} (max_new_tokens) must be at least 1")
  compile_cache.from_option(args.compile_cache)
  dtype = resolve_dtype(args.dtype)
  adapter_cfg = adapter_config(args.adapters, args)
  path, backend = _path(args)
  path = path or registry.DEFAULT_PATH
  auto = registry.is_auto(path)
  # Conflicts that need no model: report them before seconds of loading.
  if auto and args.adapters is None:
    raise UserError("--path auto chooses how experts are applied: it needs --adapters")
  if not auto:
    registry.check(path, adapter_cfg if adapter_cfg.mode != "backbone" else None,
                   shared_folded=True)
  check_adapter_spec(args.adapters, adapter_cfg)
  sere = sere_settings(args, args.adapters,
                       adapter_cfg if adapter_cfg.mode != "backbone" else None)
  mesh = None
  if args.devices != 1:
    from adafuse_jax.parallel import make_mesh
    mesh = make_mesh(args.devices)
  loaded = load_model(args.model, dtype=jnp.dtype(dtype), progress=not (args.quiet or args.json))
  adapters = resolve_adapters(args.adapters, adapter_cfg, loaded.model.cfg, dtype=jnp.dtype(dtype),
                              seed=args.seed)
  tok = loaded.tokenizer
  if tok is None:
    raise UserError(f"--model {args.model!r} has no tokenizer; a Hugging Face folder needs"
                    " tokenizer.json")
  ids = [tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p)
         for p in prompts]
  context = loaded.model.cfg.max_context
  check_prompts(ids, context)  # before anything is echoed: a long prompt is never printed back
  room = context - max(len(i) for i in ids)
  if args.max_new_tokens > room and not args.json:
    print(f"note: --max-new-tokens {args.max_new_tokens} is capped at {room}, the room the"
          f" model's {context}-token context leaves after the prompt", file=sys.stderr)

  stream = not args.json and len(prompts) == 1
  shown = [""]
  generated: list[int] = []

  def on_token(row: int, token: int) -> None:
    generated.append(token)
    text = tok.decode(generated)
    if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
      return
    sys.stdout.write(text[len(shown[0]):])
    sys.stdout.flush()
    shown[0] = text

  pad_id = min(tok.eos_ids) if tok.eos_ids else 0
  model = loaded.model
  choice = None
  if auto:
    from adafuse_jax.auto import choose_path, prompt_agreement_rate, prompt_switch_rate

    # Measure at the shape that will be generated, so its compiled step is reused.
    _, _, cache_len = decode_shape([len(i) for i in ids], args.max_new_tokens,
                                   model.cfg.max_context)
    rate = prompt_switch_rate(model, adapters, ids[0]) if len(ids) == 1 else None
    agree = prompt_agreement_rate(model, adapters, ids)
    log = None if args.json else (lambda m: print(m, file=sys.stderr))
    choice, gen = choose_path(model, adapters, batch=len(ids), cache_len=cache_len,
                              switch_rate=rate, agree_rate=agree, sere=sere, log=log, mesh=mesh,
                              attention=args.attention)
    if not args.json:
      print(f"auto chose {choice.reason}", file=sys.stderr)
  else:
    notes = [registry.get(path).note(model.layout) if adapters is not None else None,
             sere_path_note(path, adapter_cfg, sere)]
    for note in notes:
      if note and not args.json:
        print(f"note: {note}", file=sys.stderr)
    gen = Generator(model, adapters=adapters, path=path, backend=backend, sere=sere, mesh=mesh,
                    attention=args.attention)
  switch_per_token = gen.merges_per_token
  if stream:
    sys.stdout.write(echo(prompts[0]) if not args.chat else "")
    sys.stdout.flush()
  res = generate(gen, ids, max_new_tokens=args.max_new_tokens,
                 sampling=sampling, seed=args.seed, pad_id=pad_id,
                 stop_ids=tok.chat_stop_ids if args.chat else tok.eos_ids,
                 on_token=on_token if stream else None)
  completions = [tok.decode(t) for t in res.tokens]
  return {
      "model": loaded.source, "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "dtype": dtype, "prompts": prompts,
      "completions": completions, "generated_tokens": [len(t) for t in res.tokens],
      "stop_reasons": res.stop_reasons, "prompt_tokens": res.prompt_tokens,
      "prefill_ms": round(res.prefill_ms, 3),
      "decode_ms_per_token": round(res.decode_ms_per_token, 3),
      "tokens_per_s": round(res.tokens_per_s, 2), "compile_s": round(res.compile_s, 3),
      "streamed": stream,
      "max_new_tokens": min(args.max_new_tokens, room),  # after the context's cap
      "mode": adapter_cfg.mode,
      "sere": ({"rho": sere.rho, "primary": sere.primary_k} if sere is not None else None),
      # Experts a decode step read, over the batch (what SERE lowers).
      "distinct_experts_per_step": (round(float(np.mean([len(np.unique(e)) for e, _ in res.routes])), 3)
                                    if res.routes else None),
      "path": (choice.candidate.name if choice else gen.path_name.value),
      "attention": gen.attention,
      "auto": choice.to_dict() if choice else None,
      "switches": int(gen.switch_state.switches) if switch_per_token else None,
      # Merged batch steps whose rows chose different experts ran unmerged.
      "unmerged_steps": int(gen.switch_state.unmerged) if switch_per_token else None,
      "routing": _routing_table(tok, res) if args.show_routing else None,
  }


ECHO_CHARS = 400
# What a decode that ran out of device memory can ask for less of.
MEMORY_ADVICE = ("decode fewer or shorter prompts at once, a smaller --max-new-tokens, a smaller"
                 " pool (--experts, --rank) or --dtype bfloat16")


def echo(prompt: str) -> str:
  """What streaming prints before the completion: the prompt, or for a long one its last
  ECHO_CHARS characters after a marker saying how much was left out (a long input is never
  printed back whole)."""
  if len(prompt) <= ECHO_CHARS:
    return prompt
  return f"[... {len(prompt) - ECHO_CHARS} characters of the prompt ...]" + prompt[-ECHO_CHARS:]


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    result = run(args)
  except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    return 130
  except Exception as e:
    return cli_error(e, MEMORY_ADVICE)
  if args.json:
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0
  if not result["streamed"]:
    for prompt, completion in zip(result["prompts"], result["completions"]):
      print(f"--- {prompt}\n{completion}")
  else:
    print()
  if result["routing"] is not None:
    if not result["routing"]:
      print("(no routing: this mode has no router)")
    for row in result["routing"]:
      print(f"  {row['token']!r:>16}  experts {row['experts']}  gates {row['gates']}")
  print(f"[{result['mode']} on {result['path']} | {sum(result['prompt_tokens'])} prompt tokens | prefill {result['prefill_ms']:.1f} ms |"
        f" decode {result['decode_ms_per_token']:.2f} ms/token ({result['tokens_per_s']:.1f} tokens/s)"
        f" | {sum(result['generated_tokens'])} tokens | compile {result['compile_s']:.1f} s |"
        f" {result['backend']} {result['dtype']}]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
