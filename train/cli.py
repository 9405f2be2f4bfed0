"""`python -m adafuse_jax.train`: prepare data, train adapters, evaluate, or all of it in one command.

    python -m adafuse_jax.train data                                   # fetch + tokenize the 5 domains (cached)
    python -m adafuse_jax.train fit --mode pregated --workdir runs/pregated [--steps 400] [--resume-step N]
    python -m adafuse_jax.train all --out docs/training --workdir runs [--export adafuse_jax/pools/smollm2-135m]
                        [--jobs 4]                   # up to 4 modes at once, one process each
    python -m adafuse_jax.train table docs/training/gpu-1000-all/results.json  # re-render results.md
    python -m adafuse_jax.train chat-mix --jsonl mix.jsonl   # the backbone's chats + domain text

`all` trains every mode (lora at the pool's parameter budget, layerwise, pregated, pregated with
per-layer gates) on the frozen SmolLM2-135M, evaluates them and the backbone (per-domain
held-out perplexity, exact match on math and analogies, routing per domain, switch rate), and
writes results.json, results.md, routing heat maps and loss curves under --out. Runs resume from
their last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Sequence

from adafuse_jax.errors import UserError, cli_error


def build_parser() -> argparse.ArgumentParser:
  from adafuse_jax.train.loop import TRAIN_MODES, TrainConfig

  d = TrainConfig()
  p = argparse.ArgumentParser(prog="python -m adafuse_jax.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cache", help="data folder (default ~/.cache/adafuse-jax/data or $ADAFUSE_DATA)")
  sub = p.add_subparsers(dest="command", required=True)
  p.commands = {}
  sub.add_parser("data", help="fetch, split and tokenize the domains")
  t = sub.add_parser("table", help="re-render results.md from a results.json (after a change to"
                                   " the table's layout; the numbers are the run's)")
  t.add_argument("results", help="a results.json written by `python -m adafuse_jax.train all`")
  c = sub.add_parser("sere-calibrate",
                     help="compute a saved pool's SERE expert similarity once and save it beside"
                          " the pool (what --sere-rho reads)")
  c.add_argument("--adapters", required=True, metavar="DIR",
                 help="a saved pre-gated pool (a folder written by save_adapters or fit --export)")
  c.add_argument("--model", default="default",
                 help="the base model the pool was trained on (default: the embedded one)")
  c.add_argument("--data", default=None,
                 help="your own text to calibrate on (as fit --data); default: the built-in"
                      " domains' training text")
  c.add_argument("--windows", type=int, default=2,
                 help="calibration windows of --seq-len tokens per domain")
  c.add_argument("--seq-len", type=int, default=128)
  c.add_argument("--sweep", action="store_true",
                 help="then measure held-out perplexity and distinct experts per batch step for"
                      " each (--sere-primary S, --sere-rho) of --primaries x --rhos, save the"
                      " report beside the pool (sere_quality.json/.md/.png) and the setting"
                      " `--sere-rho auto` uses: the fewest experts within --max-ppl-cost")
  c.add_argument("--rhos", default="1,0.5,0.2,0.1,0", help="with --sweep: rho values")
  c.add_argument("--primaries", default=None,
                 help="with --sweep: S values (default 1 .. top-k - 1)")
  c.add_argument("--max-ppl-cost", type=float, default=0.5, metavar="PCT",
                 help="with --sweep: the mean perplexity `--sere-rho auto` may add, in percent")
  c.add_argument("--sweep-windows", type=int, default=16,
                 help="with --sweep: held-out windows per domain, decoded as one batch")
  c.add_argument("--sweep-seq-len", type=int, default=256)
  c.add_argument("--quiet", action="store_true")
  m = sub.add_parser("chat-mix",
                     help="the backbone's own chats plus the domains' text, as JSONL for fit"
                          " --data: a pool trained on it keeps the chat format's end of turn")
  m.add_argument("--jsonl", required=True, metavar="FILE", help="the JSONL file to write")
  m.add_argument("--chats", type=int, default=80, help="questions asked per domain")
  m.add_argument("--docs-per-domain", type=int, default=400,
                 help="training documents of each built-in domain written beside the chats")
  m.add_argument("--max-new-tokens", type=int, default=96,
                 help="longest reply kept (longer ones are dropped: they never ended their turn)")
  m.add_argument("--seed", type=int, default=0)
  m.add_argument("--quiet", action="store_true")
  for name in ("fit", "all"):
    s = sub.add_parser(name)
    p.commands[name] = s  # for _job_argv, which re-spells an `all` command option by option
    if name == "fit":
      s.add_argument("--mode", choices=TRAIN_MODES, default="pregated")
      s.add_argument("--resume-step", type=int, default=None,
                     help="restore this checkpoint step rather than the latest")
      s.add_argument("--model", default="default",
                     help="the frozen base model: 'default', a GGUF file or a Hugging Face folder")
      s.add_argument("--data", default=None,
                     help="your own text instead of the built-in domains: a folder with one"
                          " subfolder of .txt files per domain, or JSONL lines with \"text\""
                          " (and \"domain\")")
      s.add_argument("--adapters", default=None, metavar="SPEC",
                     help="start from this pool instead of a fresh one: PEFT LoRA folders"
                          " (DIR1,DIR2,...: one expert each, a fresh router) or a saved pool;"
                          " only its router trains unless --train-experts")
      s.add_argument("--train-experts", action="store_true",
                     help="with --adapters: train the experts too, not only the router")
      s.add_argument("--export", help="save the trained pool here (load it with --adapters)")
      s.add_argument("--export-dtype", choices=("float32", "bfloat16"), default=None,
                     help="store the exported pool in this dtype (bfloat16 halves it; default:"
                          " the training dtype)")
      s.add_argument("--devices", type=int, default=1,
                     help="train on N devices: the weights and experts split over N / D"
                          " tensor-parallel devices, each batch over D = --data-parallel groups")
      s.add_argument("--data-parallel", type=int, default=1, metavar="D",
                     help="with --devices: data-parallel groups (default 1: all tensor-parallel)")
    else:
      s.add_argument("--modes", default=",".join(("backbone",) + TRAIN_MODES),
                     help="rows of the table: backbone and/or training modes")
      s.add_argument("--out", required=True, help="folder for results.json/.md and plots")
      s.add_argument("--export", help="save the trained pregated pool here (bf16)")
      s.add_argument("--export-mode", default="pregated",
                     help="which trained mode --export saves (a pre-gated one: pregated,"
                          " pregated-shared, ...)")
      s.add_argument("--rows-from", action="append", default=[],
                     metavar="RESULTS_JSON[:MODE,...]",
                     help="an earlier results.json (its folder's metrics/ too): rows of the"
                          " same settings are kept, not retrained; all of --modes it holds, or"
                          " only the modes named after a colon. Repeatable: each mode from one"
                          " source at most")
      s.add_argument("--jobs", type=int, default=1,
                     help="train and evaluate up to N modes at once, each in its own process"
                          " with 1/N of the GPU's memory (overlaps compilation and small"
                          " kernels; the table is the same as one by one)")
      s.add_argument("--math-items", type=int, default=200)
      s.add_argument("--analogy-items", type=int, default=300)
      s.add_argument("--heldout-windows", type=int, default=16,
                     help="held-out windows of 256 tokens per domain for the table's perplexity"
                          " (0: every window, the whole held-out set)")
    s.add_argument("--workdir", required=True)
    s.add_argument("--modules", default=",".join(d.modules))
    for field in ("num_experts", "rank", "top_k", "steps", "batch", "seq_len", "warmup",
                  "eval_every", "eval_windows", "checkpoint_every", "seed"):
      s.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(d, field))
    for field in ("lr", "aux_coef", "weight_decay", "shared_fraction", "router_lr_scale",
                  "route_context"):
      s.add_argument("--" + field.replace("_", "-"), type=float, default=getattr(d, field))
    s.add_argument("--init-seed", type=int, default=None,
                   help="the adapters' initialisation seed (default: --seed, which also fixes"
                        " the data order)")
    s.add_argument("--clip-apart", action="store_true",
                   help="clip the experts' and the routing gradients each on its own norm"
                        " (an experiment)")
    s.add_argument("--quiet", action="store_true")
  return p


def _config(args, mode: str):
  from adafuse_jax.train.loop import TrainConfig

  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  kw = {k: v for k, v in vars(args).items() if k in fields and k not in ("mode", "modules")}
  return TrainConfig(mode=mode, modules=tuple(m.strip() for m in args.modules.split(",")), **kw)


def _prepared_cache(args) -> pathlib.Path:
  from adafuse_jax.train import data

  cache = pathlib.Path(args.cache) if args.cache else data.default_cache()
  data.prepare(cache, progress=not args.quiet)
  return cache


def _setup(args, cache: pathlib.Path):
  """(the loaded model, train streams, held-out streams) from a prepared data cache."""
  import jax
  import jax.numpy as jnp

  from adafuse_jax.weights import load_model
  from adafuse_jax.train import data

  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  loaded = load_model(getattr(args, "model", "default"), dtype=dtype, progress=not args.quiet)
  if cache is None:  # the user's own --data
    if loaded.tokenizer is None:
      raise UserError(f"--model {args.model!r} has no tokenizer to read --data with")
    return (loaded, *data.user_streams(args.data, loaded.tokenizer, args.seq_len))
  return loaded, data.load_streams(cache, "train"), data.load_streams(cache, "heldout")


def fit(args, mode: str, loaded, train_streams, heldout):
  from adafuse_jax.train.loop import Trainer

  start_from = getattr(args, "adapters", None)
  pool = None
  if start_from:
    from adafuse_jax.adapters.io import load_pool
    pool = load_pool(start_from, loaded.model.cfg, dtype=loaded.model.dtype, seed=args.seed)
  mesh = None
  if getattr(args, "devices", 1) != 1 or getattr(args, "data_parallel", 1) != 1:
    from adafuse_jax.parallel import make_mesh
    mesh = make_mesh(args.devices, loaded.model.cfg, data=args.data_parallel)
  trainer = Trainer(loaded.model, _config(args, mode), train_streams, heldout,
                    pathlib.Path(args.workdir) / mode if args.command == "all" else args.workdir,
                    adapters=pool, router_only=bool(start_from) and not args.train_experts,
                    mesh=mesh)
  start = trainer.restore(getattr(args, "resume_step", None))
  if start:
    print(f"# {mode}: resumed at step {start}", file=sys.stderr)
  t0 = time.perf_counter()
  trainer.fit(progress=not args.quiet)
  return trainer, time.perf_counter() - t0


def chat_mix(args) -> dict:
  """`chat-mix`: writes --jsonl; returns lines per domain and where the file is."""
  from adafuse_jax.train import chat
  from adafuse_jax.weights import load_model

  out = pathlib.Path(args.jsonl)
  if out.exists() or not out.parent.is_dir():
    raise UserError(f"--jsonl {str(out)!r} exists or its folder does not; name a new file in an"
                    " existing folder")
  if args.chats < 1 or args.docs_per_domain < 0 or args.max_new_tokens < 1:
    raise UserError("--chats and --max-new-tokens must be at least 1, --docs-per-domain >= 0")
  cache = _prepared_cache(args)
  loaded = load_model(progress=not args.quiet)
  docs = chat.domain_documents(cache, "train", min(loaded.tokenizer.eos_ids))
  questions = chat.chat_questions(docs, loaded.tokenizer, args.chats, seed=args.seed)
  chats = chat.self_distilled_chats(loaded.model, loaded.tokenizer, questions,
                                    max_new_tokens=args.max_new_tokens, progress=not args.quiet)
  counts = chat.write_chat_mix(out, docs, chats, loaded.tokenizer, args.docs_per_domain,
                               seed=args.seed)
  return {"jsonl": str(out), "questions": len(questions), "lines": counts}


def sere_calibrate(args) -> dict:
  """`train sere-calibrate`: the pool's [L, E, E] expert similarity on calibration windows,
  saved as sere_similarity.npy in the pool's folder."""
  import numpy as np

  from adafuse_jax.adapters.io import DEFAULT_POOL, load_adapters, read_adapter_config
  from adafuse_jax.adapters.sere import SIMILARITY_FILE, save_similarity
  from adafuse_jax.train import sere_sweep

  folder = pathlib.Path(args.adapters)
  if args.windows < 1 or args.seq_len < 2:
    raise UserError(f"--windows {args.windows} and --seq-len {args.seq_len} must be at least 1"
                    " and 2")
  if folder.resolve() == DEFAULT_POOL.resolve():
    raise UserError("the shipped pool 'default' already carries its similarity; calibrate a"
                    " pool you saved (a copy of it, or one trained with fit --export)")
  cfg, _ = read_adapter_config(folder)  # a named error for a folder that is not a pool
  if cfg.mode != "pregated":
    raise UserError(f"SERE re-routes pre-gated choices; {str(folder)!r} is a {cfg.mode!r} pool")
  plan = None
  if args.sweep:
    plan = sere_sweep.plan(args.rhos, args.primaries, cfg.top_k, args.max_ppl_cost)
    if args.sweep_windows < 1 or args.sweep_seq_len < 2:
      raise UserError(f"--sweep-windows {args.sweep_windows} and --sweep-seq-len"
                      f" {args.sweep_seq_len} must be at least 1 and 2")
  writable_folder(str(folder), "--adapters")
  loaded, streams, heldout = _setup(args, None if args.data else _prepared_cache(args))
  pool = load_adapters(folder, loaded.model.cfg, dtype=loaded.model.dtype)
  similarity, count = sere_sweep.calibrate_on(loaded.model, pool, streams, windows=args.windows,
                                              seq_len=args.seq_len)
  save_similarity(folder, similarity)
  mean = similarity.mean(0)
  off = mean[~np.eye(mean.shape[0], dtype=bool)]
  out = {"saved": str(folder / SIMILARITY_FILE), "shape": list(similarity.shape),
         "windows": count, "seq_len": args.seq_len,
         "domains": sorted(streams),
         "off_diagonal_similarity": {"min": float(off.min()), "mean": float(off.mean()),
                                     "max": float(off.max())}}
  if plan is not None:
    report = sere_sweep.report(loaded.model, pool, folder.name, similarity, heldout, *plan,
                               windows=args.sweep_windows, seq_len=args.sweep_seq_len,
                               max_ppl_cost=args.max_ppl_cost, progress=not args.quiet)
    sere_sweep.write(report, folder)
    out["sweep"] = {"saved": str(folder / sere_sweep.QUALITY_FILE),
                    "recommended": report["recommended"]}
  return out


def run_all(args) -> dict:
  import numpy as np

  from adafuse_jax.adapters.io import save_adapters
  from adafuse_jax.bench.measure import environment
  from adafuse_jax.train import eval as E

  if args.heldout_windows < 0:  # before loading anything
    raise UserError(f"--heldout-windows={args.heldout_windows} must be 0 (all) or positive")
  if args.jobs < 1:
    raise UserError(f"--jobs={args.jobs} must be at least 1")
  cache = _prepared_cache(args)  # once, before any job could race to prepare it
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  math_items = E.math_items(cache)[: args.math_items]
  analogy_items = E.analogy_items(cache, args.analogy_items)
  rows = {}
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  # Each mode's evaluated row is kept in the workdir: re-running the same command after a cut
  # (a time limit, a lost machine) resumes training from the checkpoints and skips finished rows.
  rows_dir = pathlib.Path(args.workdir) / "rows"
  rows_dir.mkdir(parents=True, exist_ok=True)
  heldout_windows = args.heldout_windows or None
  for results, kept, named in _rows_sources(args.rows_from, modes):
    _seed_rows(results, _config(args, "pregated").to_json(), len(math_items),
               len(analogy_items), args.heldout_windows, kept, pathlib.Path(args.workdir),
               named=named)
  def unfinished() -> list[str]:
    return [m for m in modes if not (rows_dir / f"{m}.json").exists()]

  todo = unfinished()
  if args.jobs > 1 and len(todo) > 1:
    # Each job is this command for one mode, in the same workdir: it leaves rows/MODE.json (and
    # the export), which the loop below then keeps like any row finished earlier.
    from adafuse_jax.train.jobs import run_jobs
    jobs_dir = pathlib.Path(args.workdir) / "jobs"
    run_jobs([(m, [sys.executable, "-m", "adafuse_jax.train", *_job_argv(args, m, jobs_dir / m)])
              for m in todo], args.jobs, jobs_dir, progress=not args.quiet)
  if not unfinished():
    model = tok = train_streams = heldout = None  # every row is there: nothing to load
  else:
    loaded, train_streams, heldout = _setup(args, cache)
    model, tok = loaded.model, loaded.tokenizer

  def write_report() -> dict:
    report = {"environment": environment(), "config": _config(args, "pregated").to_json(),
              "math_items": len(math_items), "analogy_items": len(analogy_items),
              "heldout_windows": args.heldout_windows, "rows": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    return report

  for mode in modes:
    cached = rows_dir / f"{mode}.json"
    if cached.exists():
      rows[mode] = json.loads(cached.read_text())
      print(f"# {mode}: evaluated earlier ({rows[mode]['environment']['date']}), kept", file=sys.stderr)
      if rows[mode]["routing"]:
        E.heatmap(rows[mode]["routing"], out / f"routing_{mode}.png",
                  f"{mode}: expert load by domain (first adapted layer)")
      continue
    adapters, train_s, params = None, 0.0, 0
    if mode != "backbone":
      trainer, train_s = fit(args, mode, loaded, train_streams, heldout)
      adapters = trainer.adapters
      params = E.used_params(adapters)
    t0 = time.perf_counter()
    losses = E.window_losses(model, adapters, heldout, heldout_windows)
    math_hits = E.item_hits(model, adapters, tok, math_items)
    analogy_hits = E.item_hits(model, adapters, tok, analogy_items)
    row = {"mode": mode, "trainable_params": params, "train_s": train_s,
           "ppl": E.perplexity(losses),
           "math_em": float(math_hits.mean()), "analogy_em": float(analogy_hits.mean()),
           "routing": E.routing_by_domain(model, adapters, heldout),
           # per window / item, so that rows pair up (train.eval.paired_gap)
           "window_ce": {d: [round(float(x), 6) for x in l] for d, l in losses.items()},
           "math_hits": "".join("01"[int(h)] for h in math_hits),
           "analogy_hits": "".join("01"[int(h)] for h in analogy_hits)}
    row["mean_ppl"] = float(np.mean(list(row["ppl"].values())))
    if adapters is not None:  # how far training moved the routing: router weights, tied betas
      row["routing_params"] = routing_summary(adapters)
    row["eval_s"] = time.perf_counter() - t0
    row["environment"] = environment()
    rows[mode] = row
    cached.write_text(json.dumps(row, indent=2))
    print(f"# {mode}: mean ppl {row['mean_ppl']:.3f}, math {row['math_em']:.3f},"
          f" analogies {row['analogy_em']:.3f}", file=sys.stderr)
    if row["routing"]:
      E.heatmap(row["routing"], out / f"routing_{mode}.png",
                f"{mode}: expert load by domain (first adapted layer)")
    if mode == args.export_mode and args.export:
      import jax.numpy as jnp
      save_adapters(args.export, adapters, dtype=jnp.bfloat16)
    write_report()  # after every mode, so that a run cut short keeps what it measured
  report = write_report()  # every row, those kept from earlier runs included
  trained = [m for m in modes if m != "backbone"]
  loss_plot(pathlib.Path(args.workdir), trained, out / "loss.png")
  (out / "metrics").mkdir(exist_ok=True)
  for mode in trained:  # the training logs beside the table they made
    log = pathlib.Path(args.workdir) / mode / "metrics.jsonl"
    if log.exists():
      shutil.copyfile(log, out / "metrics" / f"{mode}.jsonl")
  return report


def _job_argv(args, mode: str, out: pathlib.Path) -> list[str]:
  """The arguments of `python -m adafuse_jax.train` that run `args`'s `all` command for `mode` alone, with
  its tables under `out`: every setting as parsed (so abbreviations and defaults cannot drift),
  without --rows-from (the caller has seeded those rows) and --jobs, quiet, exporting only if
  `mode` is the exported one."""
  parser = build_parser().commands["all"]
  argv = [*(["--cache", args.cache] if args.cache else []), "all"]
  skip = {"help", "modes", "out", "rows_from", "jobs", "quiet", "export"}
  for action in parser._actions:  # argparse keeps no public list of a parser's options
    if action.dest in skip or not action.option_strings:
      continue
    value = getattr(args, action.dest)
    if isinstance(action, argparse._StoreTrueAction):
      argv += [action.option_strings[0]] if value else []
    elif value is not None:
      argv += [action.option_strings[0], str(value)]
  argv += ["--modes", mode, "--out", str(out), "--quiet"]
  if args.export and mode == args.export_mode:
    argv += ["--export", args.export]
  return argv


def _rows_sources(specs: list[str], modes: list[str]
                  ) -> list[tuple[pathlib.Path, list[str], bool]]:
  """--rows-from values ("PATH" or "PATH:MODE,MODE") -> [(results.json, modes to keep, whether
  they were named: each must then be there)]. A named mode must be one of the table's and comes
  from its source only; a PATH alone offers the table's other modes. No mode may be named by
  two sources (which row stood would then be a matter of order)."""
  parsed, named = [], {}
  for spec in specs:
    path, sep, listed = spec.rpartition(":")
    if not sep or not path or "/" in listed:  # no mode list (a colon inside the path is not one)
      parsed.append((pathlib.Path(spec), None))
      continue
    kept = [m.strip() for m in listed.split(",") if m.strip()]
    unknown = [m for m in kept if m not in modes]
    if not kept or unknown:
      raise UserError(f"--rows-from {spec!r}: {', '.join(unknown) or 'no mode'} after the colon;"
                      f" name rows of this table (--modes {','.join(modes)})")
    for m in kept:
      if m in named:
        raise UserError(f"--rows-from: {m} is named by both {named[m]!r} and {spec!r}; keep it"
                        " from one")
      named[m] = spec
    parsed.append((pathlib.Path(path), kept))
  return [(path, kept, True) if kept is not None
          else (path, [m for m in modes if m not in named], False) for path, kept in parsed]


def _seed_rows(results: pathlib.Path, config: dict, math_items: int, analogy_items: int,
               heldout_windows: int, modes: list[str], workdir: pathlib.Path,
               named: bool = False) -> None:
  """Copies the rows (and training logs) of `modes` from an earlier results.json into the
  workdir, so that `all` keeps them; refuses if that run used other settings, or (`named`) if
  it lacks one of `modes`."""
  try:
    prev = json.loads(results.read_text())
    prev_cfg, prev_rows = prev["config"], prev["rows"]
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise UserError(f"--rows-from {str(results)!r} is not a results.json of `python -m adafuse_jax.train all`"
                    f" ({type(e).__name__}: {e})") from None
  from adafuse_jax.train.loop import saved_setting
  diffs = [f"{k}: {saved_setting(prev_cfg, k)!r} there vs {v!r} now"
           for k, v in config.items() if k != "mode" and saved_setting(prev_cfg, k) != v]
  if prev.get("math_items") != math_items or prev.get("analogy_items") != analogy_items:
    diffs.append(f"eval items: {prev.get('math_items')}/{prev.get('analogy_items')} there vs"
                 f" {math_items}/{analogy_items} now")
  if prev.get("heldout_windows", 16) != heldout_windows:  # 16 before the setting existed
    diffs.append(f"held-out windows: {prev.get('heldout_windows', 16)} there vs"
                 f" {heldout_windows} now (0: all)")
  missing = [m for m in modes if m not in prev_rows] if named else []
  if missing:
    raise UserError(f"--rows-from {str(results)!r} has no {', '.join(missing)} row (it has"
                    f" {', '.join(prev_rows) or 'none'})")
  if diffs:
    raise UserError(f"--rows-from {str(results)!r} was made with other settings ("
                    + "; ".join(diffs) + "); its rows cannot stand beside new ones")
  for mode in modes:
    target = workdir / "rows" / f"{mode}.json"
    if mode in prev_rows and not target.exists():
      target.write_text(json.dumps(prev_rows[mode], indent=2))
      log = results.parent / "metrics" / f"{mode}.jsonl"
      if log.exists():
        (workdir / mode).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, workdir / mode / "metrics.jsonl")


def _shared_split(cfg: dict) -> tuple[int, int]:
  """(shared rank, routed rank) of a run's "-shared" rows, as `TrainConfig.adapter_config` makes
  them (a setting missing from an older run's config is its default)."""
  from adafuse_jax.train.loop import TrainConfig

  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  kw = {k: v for k, v in cfg.items() if k in fields and k not in ("mode", "modules")}
  adapter = TrainConfig(mode="pregated-shared", **kw).adapter_config()
  return adapter.shared_rank, adapter.rank


def markdown(report: dict) -> str:
  rows = report["rows"]
  domains = list(next(iter(rows.values()))["ppl"])
  env = report["environment"]
  cfg = report["config"]
  devices = sorted({f"{r['environment']['device']} (JAX {r['environment']['jax']})"
                    for r in rows.values() if "environment" in r})
  lines = [f"Trained and evaluated on {', '.join(devices)}; finished {env['date']}; command:"
           f" `python -m adafuse_jax.train {env['command'].split('train/__main__.py', 1)[-1].strip()}`"
           " (resumable: rows finished by an earlier invocation of it are kept, each with its date"
           " in results.json).", "",
           f"Frozen SmolLM2-135M-Instruct; adapters on {','.join(cfg['modules'])}, E={cfg['num_experts']},"
           f" r={cfg['rank']}, top-{cfg['top_k']} (lora: rank {cfg['rank'] * cfg['num_experts']}),"
           f" {cfg['steps']} steps of {cfg['batch']} x {cfg['seq_len']} tokens, lr {cfg['lr']}.",
           *([f" `-shared` rows: the same budget split into a shared expert of rank"
              f" {_shared_split(cfg)[0]} (every token, folded into the backbone at decode) and"
              f" {cfg['num_experts']} routed experts of rank {_shared_split(cfg)[1]}."]
             if any(m.endswith("-shared") for m in rows) else []),
           *([" `pregated-ctx`: experts from layer 1 on, routed on layer 1's input."]
             if "pregated-ctx" in rows else []),
           *([f" `-tied` rows: the pool is also the shared expert: every token uses all"
              f" {cfg['num_experts']} experts at gate 1 (the lora row's rank"
              f" {cfg['rank'] * cfg['num_experts']}, same budget) and its top-{cfg['top_k']}"
              " again at a learned per-layer scale (from 0) times the router's gates."]
             if any(m.endswith("-tied") for m in rows) else []),
           f" Perplexity: {_windows_text(report)} per domain."
           f" Exact match: {report['math_items']} math interpolate problems,"
           f" {report['analogy_items']} analogies.", "",
           "| mode | params | " + " | ".join(f"{d} ppl" for d in domains)
           + " | mean ppl | math EM | analogy EM | switch rate (set / merge) |",
           "|---|---|" + "---|" * (len(domains) + 4)]
  for r in rows.values():
    sw = r["routing"]
    sw_text = f"{sw['switch_rate_set']:.2f} / {sw['switch_rate_merge']:.2f}" if sw else "-"
    lines.append(f"| {r['mode']} | {r['trainable_params'] / 1e6:.2f}M | "
                 + " | ".join(f"{r['ppl'][d]:.3f}" for d in domains)
                 + f" | {r['mean_ppl']:.3f} | {100 * r['math_em']:.1f}% |"
                 f" {100 * r['analogy_em']:.1f}% | {sw_text} |")
  moved = [f"`{mode}` " + ", ".join(f"{k} {v['max_abs']:.3f} / {v['mean_abs']:.3f}"
                                    for k, v in r["routing_params"].items())
           for mode, r in rows.items() if r.get("routing_params")]
  if moved:
    lines += ["", "Routing parameters after training, max / mean |x| over layers and modules"
              " (tied pools' betas start at 0): " + "; ".join(moved) + "."]
  return "\n".join(lines + goal_lines(rows, domains)) + "\n"


def routing_summary(adapters) -> dict[str, dict[str, float]]:
  """{group: {"max_abs", "mean_abs"}} of the trained routing parameters, grouped over layers
  and modules: "router" (the routers' weights, initialised at std `router_init_std`),
  "router.w_ctx" and "beta" (tied pools' scales of the routed term, initialised at 0). Empty
  for a plain LoRA."""
  import numpy as np
  from flax import nnx

  from adafuse_jax.train.loop import routing_params
  groups: dict[str, list[np.ndarray]] = {}
  for name, value in routing_params(nnx.to_pure_dict(nnx.state(adapters))).items():
    key = ("beta" if ".beta_" in f".{name}" else
           "router.w_ctx" if name.endswith("w_ctx") else "router")
    groups.setdefault(key, []).append(np.abs(value).ravel())
  return {k: {"max_abs": float(np.concatenate(v).max()), "mean_abs": float(np.concatenate(v).mean())}
          for k, v in sorted(groups.items())}


def _windows_text(report: dict) -> str:
  count = report.get("heldout_windows", 16)  # 16 before the setting existed
  return ("every held-out window of 256 tokens" if count == 0 else
          f"{count} evenly spaced held-out windows of 256 tokens")


def goal_lines(rows: dict, domains: list[str]) -> list[str]:
  """The issue's quality goals, checked for every pre-gated row: mean perplexity within 2% of
  layer-wise routing, and no worse than LoRA on any domain (perplexity and exact match)."""
  lines = []
  for mode, r in rows.items():
    if not mode.startswith("pregated"):
      continue
    parts = []
    # Plain layer-wise routing (the goal's baseline), and the row's layer-wise twin: the same
    # pool routed at every layer (pregated-shared -> layerwise-shared, ...), where there is one.
    twin = "layerwise" + mode[len("pregated"):]
    for base in dict.fromkeys(("layerwise", twin)):
      if base in rows:
        gap = r["mean_ppl"] / rows[base]["mean_ppl"] - 1
        parts.append(f"mean ppl {100 * gap:+.1f}% vs {base}")
    if "lora" in rows:
      lora = rows["lora"]
      worse = [d for d in domains if r["ppl"][d] > lora["ppl"][d]]
      worse += [t for t in ("math_em", "analogy_em") if r[t] < lora[t]]
      parts.append("no worse than lora anywhere" if not worse else
                   f"worse than lora on {len(worse)} of {len(domains) + 2} ({', '.join(worse)})")
      if "window_ce" in r and "window_ce" in lora:
        from adafuse_jax.train.eval import format_gap, paired_gap
        gaps = {d: paired_gap(r["window_ce"][d], lora["window_ce"][d]) for d in domains}
        sure = [d for d, (_, lo, _) in gaps.items() if lo > 0]
        parts.append("perplexity vs lora (95% interval over held-out windows): "
                     + ", ".join(f"{d} {format_gap(*gap)}" for d, gap in gaps.items())
                     + (f"; higher beyond the interval on {', '.join(sure)}" if sure else
                        "; on no domain higher beyond the interval"))
      if "math_hits" in r and "math_hits" in lora:
        from adafuse_jax.train.eval import format_gap, paired_hits_gap
        parts.append("exact match vs lora: " + ", ".join(
            f"{t} {format_gap(*paired_hits_gap(r[f'{t}_hits'], lora[f'{t}_hits']), unit=' pts')}"
            for t in ("math", "analogy")))
    if parts:
      lines.append(f"- `{mode}`: " + "; ".join(parts))
  if lines:
    lines = ["", "Goals (pre-gated within 2% of layer-wise mean perplexity; no worse than lora on"
             " any domain's perplexity or exact match):", ""] + lines
  return lines


def loss_plot(workdir: pathlib.Path, modes: list[str], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(figsize=(7, 4))
  for mode in modes:
    log = workdir / mode / "metrics.jsonl"
    if not log.exists():
      continue
    recs = [json.loads(l) for l in log.read_text().splitlines()]
    steps = np.array([r["step"] for r in recs])
    ce = np.array([r["ce"] for r in recs])
    k = max(1, len(ce) // 40)
    smooth = np.convolve(ce, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, label=mode)
  ax.set_xlabel("step")
  ax.set_ylabel("training cross-entropy (nats/token, smoothed)")
  ax.set_title("Adapter training on the frozen SmolLM2-135M")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def writable_folder(path: str, flag: str) -> pathlib.Path:
  """Creates `path` (and its parents) as a folder, or raises UserError naming why it cannot be."""
  folder = pathlib.Path(path)
  if folder.exists() and not folder.is_dir():
    raise UserError(f"{flag} {path!r} is a file; name a folder")
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"{flag} {path!r} cannot be created ({e.strerror}); name a folder you can"
                    " write") from None
  return folder


# What a training or evaluation run that ran out of device memory can ask for less of.
MEMORY_ADVICE = "a smaller --batch or --seq-len, or a smaller pool (--num-experts, --rank)"


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    # Folders the run writes, checked before minutes of data preparation and training.
    for flag in ("cache", "workdir", "out"):
      if getattr(args, flag, None):
        writable_folder(getattr(args, flag), "--" + flag)
    if args.command == "data":
      from adafuse_jax.train import data
      manifest = data.prepare(pathlib.Path(args.cache) if args.cache else None)
      print(json.dumps(manifest, indent=2))
    elif args.command == "table":
      path = pathlib.Path(args.results)
      try:
        report = json.loads(path.read_text())
      except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{args.results!r} is not a readable results.json ({e})") from None
      text = markdown(report)
      (path.parent / "results.md").write_text(text)
      print(text)
    elif args.command == "fit":
      if args.export:
        writable_folder(args.export, "--export")
      loaded, tr, ho = _setup(args, None if args.data else _prepared_cache(args))
      trainer, secs = fit(args, args.mode, loaded, tr, ho)
      print(json.dumps({"mode": trainer.adapters.cfg.mode, "step": trainer.step, "train_s": secs,
                        "domains": sorted(tr), "heldout_ppl": trainer.evaluate(),
                        "routing": routing_summary(trainer.adapters)
                        if trainer.adapters.router is not None else None}, indent=2))
      if args.export:
        from adafuse_jax.adapters.io import save_adapters
        save_adapters(args.export, trainer.adapters, dtype=args.export_dtype)
        print(f"saved the trained pool to {args.export} (use it with --adapters"
              f" {args.export})", file=sys.stderr)
    elif args.command == "sere-calibrate":
      print(json.dumps(sere_calibrate(args), indent=2))
    elif args.command == "chat-mix":
      print(json.dumps(chat_mix(args), indent=2))
    else:
      print(markdown(run_all(args)))
  except Exception as e:
    return cli_error(e, MEMORY_ADVICE)
  return 0


if __name__ == "__main__":
  sys.exit(main())
