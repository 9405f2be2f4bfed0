"""`python -m adafuse_jax.bench`: every decode path side by side, against the physical floor.

    python -m adafuse_jax.bench --preset llama2-7b --out docs/benchmarks/h200/batch1   # on the GPU
    python -m adafuse_jax.bench --preset tiny --steps 5                         # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
from typing import Callable, Sequence

from adafuse_jax.cli_options import positive_ints
from adafuse_jax.errors import UserError, cli_error
from adafuse_jax.vocab import ATTENTIONS

TINY = dict(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
            max_context=1024, name="tiny")


def build_parser() -> argparse.ArgumentParser:
  from adafuse_jax.bench.measure import DEFAULT_VARIANTS
  p = argparse.ArgumentParser(prog="python -m adafuse_jax.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument("--preset", default="llama2-7b",
                 help="llama2-7b, mistral-7b (seeded random weights), smollm2-135m (the real"
                      " embedded model), or tiny (CPU smoke test)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="auto: bfloat16 on a GPU, float32 on the CPU")
  p.add_argument("--modes", default=",".join(v.name for v in DEFAULT_VARIANTS),
                 help="comma-separated rows, each MODE[-PATH][@BACKEND][+sere]"
                      "[+NAME-attention]: a mode (backbone,"
                      " lora, layerwise,"
                      " pregated) on a path (xla when omitted; packed, gathered, merged, auto),"
                      " optionally a kernel backend, SERE re-routing and a forced attention"
                      f" (NAME: {', '.join(ATTENTIONS)}; default: the library's, the Pallas"
                      " kernel on one GPU)")
  p.add_argument("--layouts", default="auto",
                 help="weight layouts for the backbone, comma-separated (stacked,list); auto ="
                      " the backend's default only")
  p.add_argument("--adapters", default="random",
                 help="the pool of every adapter row: random (seeded, non-zero B, of the shape"
                      " --experts/--rank/--top-k/--adapt-modules give), default (the trained pool"
                      " shipped for smollm2-135m), a folder written by training or PEFT LoRA"
                      " folders; a saved pool's own shape replaces those four flags")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--adapt-modules", default="q,k,v,o,gate,up,down")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--devices", type=int, default=1,
                 help="tensor-parallel devices every row runs on (every path); the"
                      " floor is then each device's share of the bytes")
  p.add_argument("--cache-len", type=int, default=512,
                 help="KV-cache slots; decode steps attend to the first half of them")
  p.add_argument("--prefill", default="128,512,2048", help="prompt lengths to time prefill on")
  p.add_argument("--prefill-modes", default="backbone,pregated,pregated-gathered,layerwise",
                 help="modes whose prefill is timed")
  p.add_argument("--steps", type=int, default=50, help="timed decode steps per mode (>= 20 for reports)")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--rounds", type=int, default=5,
                 help="after each row's own measurements, time every row again in this many"
                      " interleaved rounds (A B C A B C ...): ratios to the backbone are paired by"
                      " round and reported with a 95%% interval; 1 = each row once, in order")
  p.add_argument("--switch-rate", type=float, default=None,
                 help="pregated-auto: the share of steps whose experts or gates change, for the"
                      " merged candidate's expected cost (default 1.0: every step switches, as"
                      " with random weights)")
  p.add_argument("--sere-rho", type=float, default=0.0,
                 help="-sere modes: similarity threshold rho (0: every secondary choice moves to"
                      " a primary expert; 1: off)")
  p.add_argument("--sere-primary", type=int, default=1,
                 help="-sere modes: primary choices per token S (< top-k)")
  p.add_argument("--torch-peer", choices=("auto", "on", "off"), default="auto",
                 help="time a gpt-fast-style PyTorch decode of the same preset as its own row"
                      " (fused qkv and gate/up, static KV cache, torch.compile reduce-overhead);"
                      " auto: on a GPU where PyTorch sees CUDA")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="folder for results.json and decode.png")
  p.add_argument("--profile", help="folder for a JAX profiler trace of the run")
  p.add_argument("--table", metavar="RESULTS_JSON",
                 help="measure nothing: re-render table.md (and decode.png) beside a results.json"
                      " this command wrote")
  return p


def saved_pool_config(spec: str, preset: str, variants) -> "AdapterConfig":
  """The config of the saved pool `spec` (`--adapters`), checked before anything is measured:
  made for the preset's model shape, and of the mode of every adapter row. Raises UserError /
  ModelFileError naming the mismatch."""
  from adafuse_jax.adapters import peft
  from adafuse_jax.adapters.io import model_mismatch, pool_config, pool_folder, read_adapter_config
  from adafuse_jax.config import PRESETS, ModelConfig
  from adafuse_jax.vocab import Mode

  cfg = pool_config(spec)
  if not peft.is_peft_spec(spec):
    model_cfg = ModelConfig(**TINY) if preset == "tiny" else PRESETS[preset]
    diffs = model_mismatch(read_adapter_config(pool_folder(spec))[1], model_cfg)
    if diffs:
      raise UserError(f"--adapters {spec!r} was made for another model than preset {preset!r} ("
                      + "; ".join(diffs) + "); pass the preset it was trained on"
                      " (smollm2-135m for 'default') or --adapters random")
  wrong = sorted({str(v.mode) for v in variants if v.mode not in (Mode.BACKBONE, cfg.mode)})
  if wrong:
    raise UserError(f"--adapters {spec!r} is a {cfg.mode} pool; rows of mode {', '.join(wrong)}"
                    f" need --adapters random (or keep to backbone and {cfg.mode} rows)")
  return cfg


def run(args: argparse.Namespace) -> dict:
  import jax
  import jax.numpy as jnp

  from adafuse_jax import costs
  from adafuse_jax.auto import choose_path
  from adafuse_jax.bench import ceiling, derive, torch_peer
  from adafuse_jax.bench import measure as B
  from adafuse_jax.config import PRESETS, AdapterConfig, ModelConfig
  from adafuse_jax.model.llama import LlamaModel, default_layout
  from adafuse_jax.paths import registry
  from adafuse_jax.adapters.io import load_pool, random_seed
  from adafuse_jax.vocab import Mode, Variant, parse_variant
  from adafuse_jax.weights import load_model

  variants = []
  for text in (m.strip() for m in args.modes.split(",") if m.strip()):
    variant, note = parse_variant(text)
    if note:
      print(f"note: {note}", file=sys.stderr)
    variants.append(variant)
  if args.switch_rate is not None and not 0.0 <= args.switch_rate <= 1.0:
    raise UserError(f"--switch-rate={args.switch_rate} must be in [0, 1]")
  if not 0.0 <= args.sere_rho <= 1.0:
    raise UserError(f"--sere-rho={args.sere_rho} must be in [0, 1]")
  if not 1 <= args.sere_primary:
    raise UserError(f"--sere-primary={args.sere_primary} must be at least 1")
  if args.batch < 1:
    raise UserError(f"--batch={args.batch} must be at least 1")
  if args.devices > 1 and args.torch_peer == "on":
    raise UserError("--torch-peer on runs the PyTorch peer on one device; drop it with --devices")
  if args.steps < 1 or args.warmup < 0:
    raise UserError("--steps must be >= 1 and --warmup >= 0")
  if args.rounds < 1:
    raise UserError(f"--rounds={args.rounds} must be at least 1")
  if args.out and pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
    # Checked before minutes of measuring, not after.
    raise UserError(f"--out {args.out!r} is a file; name a folder (it gets results.json,"
                    " table.md, decode.png)")
  if args.preset not in PRESETS and args.preset != "tiny":
    raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}, tiny")
  prefill_lengths = positive_ints(args.prefill, "--prefill") if args.prefill else ()
  prefill_modes = {parse_variant(m.strip())[0].name for m in args.prefill_modes.split(",")
                   if m.strip()}
  modules = tuple(m.strip() for m in args.adapt_modules.split(",") if m.strip())
  adapter_base = AdapterConfig(mode="pregated", modules=modules, num_experts=args.experts,
                               rank=args.rank, top_k=args.top_k)  # validates E >= k etc.
  pool_seed = random_seed(args.adapters, args.seed)
  saved_pool = pool_seed is None
  if saved_pool:
    adapter_base = saved_pool_config(args.adapters, args.preset, variants)
  dtype = jnp.dtype(args.dtype if args.dtype != "auto" else
                    ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
  layouts = ([default_layout()] if args.layouts == "auto" else
             [x.strip() for x in args.layouts.split(",") if x.strip()])

  def make_model(layout: str) -> LlamaModel:
    if args.preset == "tiny":
      return LlamaModel(ModelConfig(**TINY), dtype=dtype, seed=args.seed, layout=layout)
    if args.preset == "smollm2-135m":
      return load_model("default", dtype=dtype, progress=False).model.with_layout(layout)
    return LlamaModel(PRESETS[args.preset], dtype=dtype, seed=args.seed, layout=layout)

  if args.profile:
    jax.profiler.start_trace(args.profile)
  env = B.environment()
  sample_ceiling = None
  if jax.default_backend() == "cpu":  # a multi-threaded GEMV's read rate (see copy_bandwidth)
    # A shared CPU machine's rate drifts by tens of percent within minutes (11.3-14.0 GB/s in
    # one run, docs/benchmarks/cpu/ceiling-samples/): sampled again after every
    # interleaved round, the best sample is the ceiling (a floor must not come out above a
    # step that ran faster than one slow sample said the machine could).
    def sample_ceiling() -> float:
      return B.copy_bandwidth(nbytes=256 << 20, dtype=dtype)
    bw = elementwise = sample_ceiling()
    ceiling_method, rates = "cpu-gemv", {}
  else:
    rates = ceiling.measure(2 << 30, log=lambda m: print(f"# {m}", file=sys.stderr))
    best = ceiling.ceiling(rates)
    bw, ceiling_method = best.tb_s * 1e12, best.method
    elementwise = rates["xla-add-one"].tb_s * 1e12
  print(f"# {env['device']} | jax {env['jax']} | memory ceiling {bw / 1e12:.4f} TB/s"
        f" ({ceiling_method})" + ("" if sample_ceiling else
                                  f"; an element-wise XLA pass {elementwise / 1e12:.3f} TB/s"),
        file=sys.stderr)
  keep = args.rounds > 1
  rows = []
  mesh = None
  for layout in layouts:
    model = make_model(layout)
    cfg = model.cfg
    if args.devices > 1:
      from adafuse_jax.parallel import make_mesh
      mesh = make_mesh(args.devices, cfg)
    for variant in (variants if layout == layouts[0] else [Variant(Mode.BACKBONE)]):
      if model is None:  # consumed by a packed path
        model = make_model(layout)
      if saved_pool and variant.mode != Mode.BACKBONE:
        adapters = load_pool(args.adapters, cfg, dtype=dtype)
      else:
        adapters = B.build_adapters(cfg, variant.mode, adapter_base, dtype, pool_seed)
      label = variant.name if len(layouts) == 1 else f"{variant.name}[{layout}]"
      print(f"# measuring {label} ...", file=sys.stderr)
      path, backend, auto = variant.path, variant.backend, None
      if registry.is_auto(path):
        # [0]: not the chooser's Generator (a model-sized packing must not stay alive while
        # the chosen path is built again and measured: that ran out of memory at E=64, r=64).
        auto = choose_path(model, adapters, batch=args.batch, cache_len=args.cache_len,
                           switch_rate=args.switch_rate, seed=args.seed,
                           log=lambda m: print(f"#   {m}", file=sys.stderr),
                           attention=variant.attention)[0]
        print(f"#   auto chose {auto.reason}", file=sys.stderr)
        path, backend = auto.candidate.path, auto.candidate.backend
        gc.collect()
      sere = None
      if variant.sere:
        sere = B.calibrated_sere(model, adapters, primary_k=args.sere_primary,
                                 rho=args.sere_rho, seed=args.seed)
      # A packing path packs the weights with the model's and the pool's deleted on the way
      # (one copy in memory: a 7B with 64 rank-64 experts does not fit twice); the next row
      # rebuilds the model, from the same seed.
      # Interleaved rounds keep every row's Generator alive, and rows share the model: no release.
      release = not keep and not registry.get(path).reads_own_weights()
      run_model = model
      if release:
        model = None
      r = B.bench_mode(run_model, adapters, batch=args.batch, cache_len=args.cache_len,
                       warmup=args.warmup, steps=args.steps,
                       prefill_lengths=prefill_lengths if variant.name in prefill_modes else (),
                       seed=args.seed, path=path, backend=backend, sere=sere,
                       release_weights=release, keep=keep, mesh=mesh,
                       attention=variant.attention)
      merge = r.pop("merges_per_token")
      if sere is not None:
        r["sere"] = {"rho": sere.rho, "primary_k": sere.primary_k}
      if auto is not None:
        r["auto"] = auto.to_dict()
      # A LoRA merged once reads what the backbone reads.
      acfg = None if adapters is None or (registry.get(path).merges and not merge) else (
          adapter_base.replace(mode=variant.mode))
      nbytes = costs.decode_bytes(cfg, dtype, args.cache_len // 2, args.batch, acfg)
      if merge:
        # The merged forward reads no experts; each switch moves the adapted weights twice.
        r["floor_unchanged_ms"] = costs.decode_bytes(cfg, dtype, args.cache_len // 2, 1, None) / bw * 1e3
        nbytes = costs.decode_bytes(cfg, dtype, args.cache_len // 2, 1, None) + costs.switch_bytes(
            cfg, dtype, acfg)
      # Split over devices, each reads about its share (the replicated A of column modules
      # and norms aside): the floor per device.
      nbytes = nbytes // args.devices
      r.update(mode=label, layout=layout, bytes_per_step=nbytes, floor_ms=nbytes / bw * 1e3,
               effective_tb_s=nbytes / (r["decode"]["median_ms"] / 1e3) / 1e12)
      rows.append(r)
      unchanged = r.get("decode_unchanged") or r.get("decode_agreed_unchanged")
      if unchanged:
        print(f"#   {label}: {unchanged['median_ms']:.3f} ms/token when nothing switches",
              file=sys.stderr)
      print(f"#   {label}: {r['decode']['median_ms']:.3f} ms/token, floor {r['floor_ms']:.3f} ms,"
            f" {r['kernels_per_step']} kernels, prefill "
            + ", ".join(f"{n}: {t['median_ms']:.2f} ms" for n, t in r["prefill"].items()),
            file=sys.stderr)
      del run_model, adapters
      gc.collect()
    del model
    gc.collect()
  base = derive.baseline_row(rows)
  peer_ok, peer_why = torch_peer.available()
  peer_error = None
  if args.torch_peer == "on" and not peer_ok:
    raise UserError(f"--torch-peer on: {peer_why}")
  if args.torch_peer == "on" or (args.torch_peer == "auto" and peer_ok and args.devices == 1
                                 and jax.default_backend() == "gpu"):
    try:
      rows.append(_peer_row(cfg, args, dtype, bw, base))
    except Exception as e:  # noqa: BLE001  (auto: the JAX rows stand without their peer)
      if args.torch_peer == "on":
        raise
      peer_error = f"{type(e).__name__}: {str(e)[:500]}"
      print(f"# pytorch-peer failed, left out: {peer_error}", file=sys.stderr)
  samples = [bw]
  if keep:
    _interleave(rows, args.rounds, sample_ceiling and (lambda: samples.append(sample_ceiling())))
  if max(samples) > bw:
    _rescale_floors(rows, bw, max(samples))
    bw = elementwise = max(samples)
    print(f"# memory ceiling {bw / 1e12:.4f} TB/s: the best of {len(samples)} samples",
          file=sys.stderr)
  for r in rows:
    r.pop("round", None)
  if args.profile:
    jax.profiler.stop_trace()
  report = {"environment": env, "baseline": derive.add_ratios(rows), "preset": args.preset,
            "dtype": str(dtype), "adapter": adapter_base.to_dict(), "adapters": args.adapters,
            "batch": args.batch,
            "cache_len": args.cache_len, "devices": args.devices, "torch_peer_error": peer_error,
            "rounds": args.rounds, "ceiling_tb_s": bw / 1e12, "ceiling_method": ceiling_method,
            "copy_bandwidth_tb_s": elementwise / 1e12,
            "ceiling_samples_tb_s": [x / 1e12 for x in samples] if len(samples) > 1 else None,
            "ceiling_rates_tb_s": {n: r.tb_s for n, r in rates.items()},
            "peak_memory_bytes": B.peak_memory_bytes(), "results": rows}
  derive.add_path_floors(report)
  return report


def _peer_row(cfg, args, dtype, bw: float, base: dict | None) -> dict:
  """The PyTorch peer as a bench row (`torch_peer`): compiled, timed once, and timed again in
  the interleaved rounds."""
  import dataclasses

  from adafuse_jax import costs
  from adafuse_jax.bench import torch_peer
  from adafuse_jax.timing import Timing

  print("# measuring pytorch-peer (gpt-fast style: fused weights, static cache, torch.compile"
        " reduce-overhead) ...", file=sys.stderr)
  one_round, compile_s = torch_peer.build(cfg, batch=args.batch, cache_len=args.cache_len,
                                             seed=args.seed)
  pipelined, synced = one_round()
  nbytes = costs.decode_bytes(cfg, dtype, args.cache_len // 2, args.batch, None)
  row = {"mode": "pytorch-peer", "layout": "-", "compile_s": compile_s, "kernels_per_step": "-",
         "prefill": {}, "decode": dataclasses.asdict(Timing.of([synced / 1e3])),
         "decode_pipelined": dataclasses.asdict(Timing.of([pipelined / 1e3])),
         "bytes_per_step": nbytes, "floor_ms": nbytes / bw * 1e3,
         "effective_tb_s": nbytes / (synced / 1e3) / 1e12, "round": one_round}
  print(f"#   pytorch-peer: {pipelined:.3f} ms/token pipelined, {synced:.3f} synced, compile"
        f" {compile_s:.1f} s", file=sys.stderr)
  return row


def _ceiling_note(report: dict) -> str:
  """How the ceiling was measured, for the table's first line."""
  samples = report.get("ceiling_samples_tb_s")
  if report.get("ceiling_method") == "cpu-gemv":
    # On the CPU no element-wise figure is measured: XLA:CPU runs it on one thread.
    return "cpu-gemv" + (f", the best of {len(samples)} samples taken between the rounds,"
                         f" {1000 * min(samples):.1f}-{1000 * max(samples):.1f} GB/s"
                         if samples else "")
  return (f"{report.get('ceiling_method', 'element-wise copy')}; an element-wise XLA pass"
          f" {1000 * report['copy_bandwidth_tb_s']:.1f} GB/s")


def _rescale_floors(rows: list[dict], old_bw: float, new_bw: float) -> None:
  """Floors computed against a ceiling of old_bw, recomputed against new_bw (bytes/s)."""
  for r in rows:
    for key in ("floor_ms", "floor_unchanged_ms"):
      if key in r:
        r[key] *= old_bw / new_bw


def _interleave(rows: list[dict], rounds: int, after_round: Callable[[], None] | None = None
                ) -> None:
  """Times every row again in `rounds` rounds, rows interleaved (A B C A B C ...), so that the
  machine's drift hits every row alike; each row's pipelined timing becomes the median of its
  rounds, and the per-round figures are kept for paired ratios. `after_round` runs after each
  round (the CPU's ceiling sampled again)."""
  import dataclasses

  from adafuse_jax.timing import Timing

  per_row = [([], []) for _ in rows]
  for i in range(rounds):
    print(f"# round {i + 1}/{rounds}", file=sys.stderr)
    for r, (pipelined, synced) in zip(rows, per_row):
      p, s = r["round"]()
      pipelined.append(p)
      synced.append(s)
    if after_round is not None:
      after_round()
  for r, (pipelined, synced) in zip(rows, per_row):
    del r["round"]
    r["rounds_pipelined_ms"], r["rounds_synced_ms"] = pipelined, synced
    r["decode_pipelined"] = dataclasses.asdict(Timing.of([ms / 1e3 for ms in pipelined]))


def _interval(r: dict, key: str, ratio: float | None) -> str:
  """'1.088x [1.071, 1.102]' from a row's interleaved rounds, or the plain ratio."""
  iv = r.get(key)
  if iv and "low" in iv:
    return f"{iv['median']:.3f}x [{iv['low']:.3f}, {iv['high']:.3f}]"
  return f"{ratio:.3f}x" if ratio else "-"


def _baselines_sentence(bases: dict | str | None) -> str:
  """Which backbone row each ratio is to, where that is not simply the row `backbone`."""
  if not isinstance(bases, dict):  # reports before 2026-12-04: the `backbone` row or none
    return ""
  names = set(bases.values())
  if names <= {"backbone"}:
    return ""
  if len(names) == 1:
    return f" Ratios are to the `{names.pop()}` row."
  return (" Backbone rows' ratios are to the first backbone row, other rows' to the backbone"
          " row with the same attention: "
          + "; ".join(f"`{b}` for " + ", ".join(f"`{m}`" for m, mb in bases.items() if mb == b)
                      for b in dict.fromkeys(bases.values())) + ".")


def markdown(report: dict) -> str:
  ceiling_tb_s = report.get("ceiling_tb_s", report["copy_bandwidth_tb_s"])
  rounds = report.get("rounds", 1)
  devices = report.get("devices", 1)
  # The own-floor columns only where some path's bytes differ from the step's floor.
  own = any(abs(r.get("path_floor_ms", r["floor_ms"]) - r["floor_ms"]) > 1e-9
            for r in report["results"])
  lines = [f"Preset `{report['preset']}`, {report['dtype']}, batch {report['batch']},"
           + (f" {devices} tensor-parallel devices (floors per device)," if devices > 1 else "")
           + (f" pool `{report['adapters']}`,"
              if not str(report.get("adapters", "random")).startswith("random") else "")
           + f" experts"
           f" {report['adapter']['num_experts']}, rank {report['adapter']['rank']}, top-"
           f"{report['adapter']['top_k']}, modules {','.join(report['adapter']['modules'])};"
           f" {report['environment']['device']}, jax {report['environment']['jax']},"
           f" {report['environment']['date']}. Memory ceiling {1000 * ceiling_tb_s:.1f} GB/s"
           f" ({_ceiling_note(report)}); floors are bytes / ceiling.", "",
           "Synced: one step, then wait for it (latency). Pipelined: steps dispatched back to back,"
           " as `generate` runs them (the host enqueues a step while the device runs the last)."
           + (f" Every row timed again in {rounds} interleaved rounds; ratios to the backbone are"
              " paired by round: median [95% t-interval]." if rounds > 1 else "")
           + _baselines_sentence(report.get("baseline"))
           + (" Floor: the bytes a step must read (k experts per token, at most E); own floor:"
              " the bytes this path reads (all E for packed, the distinct experts for gathered)."
              if own else ""),
           "",
           "| mode | pipelined ms/token | vs backbone | synced ms/token (median) | p10-p90 |"
           " vs backbone | floor ms | % of floor (pipelined) |"
           + (" own floor ms | % of own floor |" if own else "")
           + " kernels/step | compile s | distinct experts/step |",
           "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if own else "")]
  for r in report["results"]:
    d, pp = r["decode"], r.get("decode_pipelined")  # runs before 2026-11-23 were synced only
    pms = pp["median_ms"] if pp else float("nan")
    lines.append(f"| {r['mode']} | {pms:.3f} |"
                 f" {_interval(r, 'pipelined_ratio_interval', r.get('pipelined_ratio_to_backbone'))} |"
                 f" {d['median_ms']:.3f} | {d['p10_ms']:.3f}-{d['p90_ms']:.3f} |"
                 f" {_interval(r, 'synced_ratio_interval', r['ratio_to_backbone'])} |"
                 f" {r['floor_ms']:.3f} | {100 * r['floor_ms'] / pms:.0f}% |"
                 + (f" {r['path_floor_ms']:.3f} | {100 * r['path_floor_ms'] / pms:.0f}% |"
                    if own else "")
                 + f" {r['kernels_per_step']} | {r['compile_s']:.1f} |"
                 f" {r['distinct_experts'] if 'distinct_experts' in r else '-'} |")
  for r in report["results"]:
    if r.get("auto"):
      lines += ["", f"`{r['mode']}` chose **{r['auto']['path']}**: {r['auto']['reason']}."]
  merged = [r for r in report["results"]
            if "decode_unchanged" in r or "decode_agreed_unchanged" in r]
  if merged:
    lines += ["", "Merged modes: a step that switches (new experts or gates: every step here) and"
              " one where nothing changed; expected ms/token = s x switched + (1 - s) x unchanged"
              " for a switch rate s.", "",
              "| mode | switched ms | floor ms | unchanged ms | floor ms | share of timed steps"
              " that switched |", "|---|---|---|---|---|---|"]
    for r in merged:
      # At batch > 1 both steps are timed on identical rows, which agree (a merged pass); runs
      # before that timed disagreeing rows here, i.e. two unmerged steps.
      agreed_rows = "decode_agreed_unchanged" in r
      switched = r["decode_agreed" if agreed_rows else "decode"]["median_ms"]
      unchanged = r["decode_agreed_unchanged" if agreed_rows else "decode_unchanged"]["median_ms"]
      share = r["agreed_switched_share" if agreed_rows else "switched_share"]
      lines.append(f"| {r['mode']} | {switched:.3f} | {r['floor_ms']:.3f} |"
                   f" {unchanged:.3f} | {r['floor_unchanged_ms']:.3f} | {share:.2f} |")
    if report["batch"] > 1 and not all("decode_agreed_unchanged" in r for r in merged):
      lines += ["", "(Recorded before identical rows were used for this table: at this batch both"
                " of its timings had rows that disagree, so both ran unmerged; the table below"
                " is the one to read.)"]
  agreed = [r for r in report["results"] if "decode_agreed" in r]
  if agreed:
    lines += ["", f"Merged modes at batch {report['batch']}: random rows disagree on their experts, so"
              " those steps run unmerged on the pristine weights; identical rows agree and switch"
              " the merged weights every step.", "",
              "| mode | rows disagree ms | share unmerged | rows agree ms | share switched |",
              "|---|---|---|---|---|"]
    for r in agreed:
      lines.append(f"| {r['mode']} | {r['decode']['median_ms']:.3f} | {r['unmerged_share']:.2f} |"
                   f" {r['decode_agreed']['median_ms']:.3f} | {r['agreed_switched_share']:.2f} |")
  pre = [r for r in report["results"] if r["prefill"]]
  if pre:
    lengths = list(pre[0]["prefill"])
    lines += ["", "| mode | " + " | ".join(f"prefill {n} ms" for n in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for r in pre:
      lines.append(f"| {r['mode']} | " + " | ".join(f"{r['prefill'][n]['median_ms']:.2f}"
                                                    for n in lengths) + " |")
  return "\n".join(lines)


def plot(report: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  rows = report["results"]
  fig, ax = plt.subplots(figsize=(8, 4.5))
  names = [r["mode"] for r in rows]
  x = np.arange(len(rows))
  synced = [r["decode"]["median_ms"] for r in rows]
  piped = [r["decode_pipelined"]["median_ms"] for r in rows]
  # error bars: the spread of the interleaved rounds (pipelined), p10-p90 of the steps (synced)
  perr = [[m - min(r.get("rounds_pipelined_ms", [m])) for m, r in zip(piped, rows)],
          [max(r.get("rounds_pipelined_ms", [m])) - m for m, r in zip(piped, rows)]]
  serr = [[m - r["decode"]["p10_ms"] for m, r in zip(synced, rows)],
          [r["decode"]["p90_ms"] - m for m, r in zip(synced, rows)]]
  ax.bar(x - 0.2, piped, 0.4, yerr=perr, color="#4C72B0", capsize=3, label="pipelined")
  ax.bar(x + 0.2, synced, 0.4, yerr=serr, color="#8C8C8C", capsize=3, label="synced")
  ax.set_xticks(x, names)
  floor = rows[0]["floor_ms"]
  ax.axhline(floor, color="#C44E52", ls="--", label=f"backbone floor at the memory ceiling ({floor:.2f} ms)")
  ax.set_ylabel("decode latency (ms/token, median)")
  ax.set_title(f"{report['preset']} {report['dtype']} batch {report['batch']} —"
               f" {report['environment']['device']}")
  ax.legend()
  plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _rerender(path: str) -> int:
  """`--table`: table.md and decode.png again from a results.json (no measuring)."""
  f = pathlib.Path(path)
  try:
    report = json.loads(f.read_text())
    from adafuse_jax.bench import derive
    report["baseline"] = derive.add_ratios(report["results"])  # the rule of today's bench
    derive.add_path_floors(report)
    table = markdown(report)
  except (OSError, json.JSONDecodeError, KeyError, TypeError, UserError) as e:
    print(f"error: {path!r} is not a results.json of `python -m adafuse_jax.bench`"
          f" ({type(e).__name__}: {e})", file=sys.stderr)
    return 2
  (f.parent / "table.md").write_text(table + "\n")
  plot(report, f.parent / "decode.png")
  print(table)
  return 0


# What a bench that ran out of device memory can ask for less of: every row of an interleaved
# run stays on the device until the last round (four packed 7B rows did not fit an 80 GB H100).
MEMORY_ADVICE = ("every row of an interleaved run stays on the device: run fewer --modes per"
                 " call, a smaller --batch, --cache-len or pool")


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.table:
    return _rerender(args.table)
  try:
    report = run(args)
  except Exception as e:
    return cli_error(e, MEMORY_ADVICE)
  table = markdown(report)
  print(table)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(table + "\n")
    plot(report, out / "decode.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
