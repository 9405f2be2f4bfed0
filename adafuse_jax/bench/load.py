"""`python -m adafuse_jax.bench.load`: the server under load, beside the decoders it is built on.

One process holds the model: it serves the OpenAI API on loopback (the real server: FastAPI,
uvicorn, the continuous-batching engine) and, in the same run, times the two baselines with the
same model and pool:

- **static batch**: `generate` on a batch of `--static-batch` prompts, decode tokens/s in its
  pipelined loop (the `python -m adafuse_jax.bench` step at that batch);
- **sequential**: the same requests decoded one at a time with `generate` (batch 1).

The load itself comes from a separate client process (so parsing streams does not take the
server's interpreter): at each concurrency level it keeps that many streaming requests in
flight until `--requests` (default 4 x the level, at least 8) have finished, and records output
tokens/s, time to first token and inter-token latency (p50/p99). Levels and the static batch are
interleaved over `--rounds` rounds; the server's throughput at the static batch's concurrency is
reported as a ratio to the static batch with a 95% interval. With `--compare-mixed` every level
runs twice a round, with the engine's mixed steps off and on (one engine, the order alternating
by round), and the mixed/unmixed ratio is paired by round; `--compare-prefill-wait` does the
same for prefill passes that wait for arrivals (`--prefill-wait`) and passes that do not.
Bounded: every request has a fixed length (`ignore_eos`), and the whole run stops after
`--time-limit` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple, Sequence

import numpy as np

from adafuse_jax.cli_options import MIXED_HELP, PACKED_HELP, PREFILL_WAIT_HELP
from adafuse_jax.errors import UserError, cli_error


def workload(tok, count: int, vocab: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
  """`count` prompts of real text, token lengths drawn uniformly from `lengths` (ids folded
  into the model's vocabulary, for presets whose tokenizer is borrowed)."""
  text = _corpus()
  ids = tok.encode(text)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    n = int(rng.integers(lengths[0], lengths[1] + 1))
    start = int(rng.integers(0, max(1, len(ids) - n)))
    out.append([t % vocab for t in ids[start:start + n]])
  return out


def _corpus() -> str:
  here = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "GPL-3.txt"
  if here.is_file():
    return here.read_text()
  import this  # noqa: F401  (the Zen of Python, if the checkout's test data is absent)
  import codecs
  return codecs.decode(this.s, "rot13") * 40


# -- the client process -------------------------------------------------------------------

async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
          "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
  t0 = time.perf_counter()
  times, tokens = [], 0
  async with client.stream("POST", url + "/v1/completions", json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      if chunk.get("choices") and chunk["choices"][0]["text"]:
        times.append(time.perf_counter())
  return {"start": t0, "times": times, "tokens": tokens}


async def closed_loop(one, prompts: list[list[int]], concurrency: int) -> tuple[list[dict], float]:
  """`concurrency` workers, each sending the next prompt (`await one(prompt)`) as soon as its
  last request finished, until every prompt is done: (each request's record, wall seconds)."""
  queue = list(range(len(prompts)))
  results: list[dict] = []

  async def worker():
    while queue:
      results.append(await one(prompts[queue.pop(0)]))

  t0 = time.perf_counter()
  await asyncio.gather(*(worker() for _ in range(concurrency)))
  return results, time.perf_counter() - t0


async def _level(url: str, model: str, prompts: list[list[int]], max_tokens: int,
                 concurrency: int) -> dict:
  import httpx

  limits = httpx.Limits(max_connections=concurrency + 4)
  async with httpx.AsyncClient(timeout=600, limits=limits) as client:
    results, wall = await closed_loop(lambda p: _one(client, url, model, p, max_tokens), prompts,
                                      concurrency)
  return level_figures(results, wall, concurrency)


def level_figures(results: list[dict], wall: float, concurrency: int) -> dict:
  """A level's figures from its requests' start times, token arrival times and token counts."""
  ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
  itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
  tokens = sum(r["tokens"] for r in results)
  return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens,
          "wall_s": wall, "tokens_per_s": tokens / wall,
          "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
          "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
          "itl_p50_ms": 1e3 * float(np.percentile(itl, 50)) if itl else 0.0,
          "itl_p99_ms": 1e3 * float(np.percentile(itl, 99)) if itl else 0.0}


def client_main(argv: Sequence[str]) -> int:
  spec = json.loads(sys.stdin.readline())
  import httpx  # noqa: F401  (imported before "ready": the level's clock starts at "go")
  print("ready", flush=True)
  sys.stdin.readline()  # "go"
  out = asyncio.run(_level(spec["url"], spec["model"], spec["prompts"], spec["max_tokens"],
                           spec["concurrency"]))
  print("done", flush=True)
  print(json.dumps(out))
  return 0


def run_level(url: str, model: str, prompts: list[list[int]], max_tokens: int,
              concurrency: int, timeout: float, on_start=None, on_done=None) -> dict:
  """One level from a fresh client process; `on_start()` runs once the client has started
  and imported what it needs, just before it sends its first request, and `on_done()` once its
  last request has finished (before the process reports and exits)."""
  spec = json.dumps({"url": url, "model": model, "prompts": prompts, "max_tokens": max_tokens,
                     "concurrency": concurrency})
  # stderr goes to a file: the pipes are read line by line here, never by communicate() (whose
  # reads would miss what readline() has already buffered).
  with tempfile.TemporaryFile("w+") as err:
    client = subprocess.Popen([sys.executable, "-m", "adafuse_jax.bench.load", "--client"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    timed_out = threading.Event()
    killer = threading.Timer(timeout, lambda: (timed_out.set(), client.kill()))
    killer.start()
    try:
      client.stdin.write(spec + "\n")
      client.stdin.flush()
      if client.stdout.readline().strip() == "ready" and on_start is not None:
        on_start()
      client.stdin.write("go\n")
      client.stdin.close()
      if client.stdout.readline().strip() == "done" and on_done is not None:
        on_done()
      out = client.stdout.read()
      client.wait()
    finally:
      killer.cancel()
    if timed_out.is_set():
      raise RuntimeError(f"the load client's level did not finish in {timeout:.0f} s")
    if client.returncode:
      err.seek(0)
      raise RuntimeError(f"load client failed (exit {client.returncode}): {err.read()[-2000:]}")
  return json.loads(out)


def engine_level(engine, prompts: list[list[int]], max_tokens: int, concurrency: int,
                 timeout: float) -> dict:
  """One level driven in this process straight into the engine (`Engine.submit_async` from an
  event loop in its own thread, the server's path without HTTP): the same closed loop and
  figures as `run_level`, so the two differ only by the HTTP stack and the client process."""
  from adafuse_jax.serving import SamplingParams

  params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

  async def one(prompt: list[int]) -> dict:
    t0 = time.perf_counter()
    times, tokens = [], 0
    async for out in engine.submit_async(prompt, params):
      tokens = out.completion_tokens
      if out.text:
        times.append(time.perf_counter())
      if out.finished and out.finish_reason not in ("length", "stop"):
        raise RuntimeError(f"an in-process request ended with {out.finish_reason}: {out.error}")
    return {"start": t0, "times": times, "tokens": tokens}

  box: dict = {}
  # Its own thread and loop, as the server's uvicorn loop has: the engine thread then competes
  # with one busy event loop for the interpreter, as it does when serving.
  thread = threading.Thread(target=lambda: box.update(out=asyncio.run(
      asyncio.wait_for(closed_loop(one, prompts, concurrency), timeout))), daemon=True)
  thread.start()
  thread.join()
  if "out" not in box:
    raise RuntimeError(f"the in-process level did not finish in {timeout:.0f} s")
  return level_figures(*box["out"], concurrency)


# -- the server process -------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m adafuse_jax.bench.load", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument("--model", default="default", help="'default', a file or folder, or a preset")
  p.add_argument("--tokenizer", default="default",
                 help="where a preset's tokenizer comes from (presets have none): a model spec,"
                      " or 'bytes' (UTF-8 bytes)")
  p.add_argument("--adapters", default="default",
                 help="the pool served: 'default', a folder, or 'random[:SEED]'")
  p.add_argument("--path", default="packed", choices=("packed", "xla", "gathered"))
  p.add_argument("--dtype", default="auto")
  p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated levels")
  p.add_argument("--requests", type=int, default=None,
                 help="requests per level (default 4 x the level, at least 8)")
  p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
  p.add_argument("--prompt-tokens", default="16,128", help="prompt lengths drawn from MIN,MAX")
  p.add_argument("--static-batch", type=int, default=32, help="the static-batch baseline's batch")
  p.add_argument("--sequential", type=int, default=8,
                 help="requests decoded one at a time for the sequential baseline (0: none)")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  p.add_argument("--chunk", type=int, default=256, help="prompt chunk of the engine")
  p.add_argument("--prefill-rows", default=None,
                 help="the engine's prefill-pass row buckets (default: powers of four)")
  p.add_argument("--prefill-lengths", default=None,
                 help="the engine's prefill-pass lengths (default: powers of two up to --chunk)")
  p.add_argument("--packed-prefill", default=None, help=PACKED_HELP)
  p.add_argument("--mixed-prefill", default=None, help=MIXED_HELP)
  p.add_argument("--prefill-wait", type=int, default=0, metavar="STEPS", help=PREFILL_WAIT_HELP)
  p.add_argument("--compare-prefill-wait", action="store_true",
                 help="run every level with --prefill-wait and with 0 (passes that do not wait),"
                      " in the same rounds on one engine")
  p.add_argument("--in-process", action="store_true",
                 help="run every level twice a round: through the server, and driven in this"
                 " process straight into the engine (no HTTP), to price the HTTP stack")
  p.add_argument("--compare-mixed", action="store_true",
                 help="run every level with mixed steps off and on, in the same rounds (needs"
                      " --mixed-prefill)")
  p.add_argument("--time-limit", type=float, default=900, help="seconds before the run stops")
  p.add_argument("--compile-cache", default="off", metavar="off|DIR",
                 help="load and keep compiled programs in DIR (JAX's persistent cache), so a"
                      " second run skips the warm-up's compiles; default off (compile_s then"
                      " measures compiling)")
  p.add_argument("--out", default=None, help="folder for results.json, results.md, load.png")
  return p


# What a load run that ran out of device memory while starting its server can ask for less of.
MEMORY_ADVICE = ("fewer concurrent sequences (--concurrency), shorter --max-tokens or"
                 " --prompt-tokens, or --dtype bfloat16")


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--client"]:
    return client_main(argv[1:])
  args = build_parser().parse_args(argv)
  try:
    levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    lo, hi = (int(x) for x in args.prompt_tokens.split(","))
  except ValueError:
    print("error: --concurrency takes integers like 1,8,32 and --prompt-tokens MIN,MAX",
          file=sys.stderr)
    return 2
  if not levels or levels[0] < 1 or not 1 <= lo <= hi or args.max_tokens < 1 or args.rounds < 1:
    print("error: levels, prompt lengths, --max-tokens and --rounds must be positive",
          file=sys.stderr)
    return 2
  if args.prefill_wait < 0 or (args.compare_prefill_wait and args.prefill_wait == 0):
    print("error: --prefill-wait must be 0 or more decode steps (at least 1 with"
          " --compare-prefill-wait, which compares it with 0)", file=sys.stderr)
    return 2
  if args.sequential < 0:
    print("error: --sequential must be 0 (no sequential baseline) or more", file=sys.stderr)
    return 2
  if args.compare_mixed and not args.mixed_prefill:
    print("error: --compare-mixed needs --mixed-prefill N (the mixed step sizes to compile)",
          file=sys.stderr)
    return 2
  if args.out and pathlib.Path(args.out).is_file():
    print(f"error: --out {args.out!r} is a file; name a folder", file=sys.stderr)
    return 2
  def write(result: dict) -> None:
    if args.out:
      out = pathlib.Path(args.out)
      out.mkdir(parents=True, exist_ok=True)
      (out / "results.json").write_text(json.dumps(result, indent=2))
      (out / "results.md").write_text(table(result) + "\n")
      plot(result, out / "load.png")

  try:
    result = run(args, levels, (lo, hi), on_round=write)
  except Exception as e:
    return cli_error(e, MEMORY_ADVICE)
  print(table(result))
  return 0


def run(args, levels: list[int], prompt_range: tuple[int, int], on_round=None) -> dict:
  import jax.numpy as jnp
  import uvicorn

  from adafuse_jax import compile_cache
  from adafuse_jax.adapters.io import load_pool
  from adafuse_jax.cli_options import resolve_dtype
  from adafuse_jax.generation import Generator, generate
  from adafuse_jax.serving import Engine
  from adafuse_jax.cli_options import packed_sizes, positive_ints
  from adafuse_jax.serving.api import create_app
  from adafuse_jax.weights import load_model
  from adafuse_jax.weights.tokenizer import byte_tokenizer

  deadline = time.time() + args.time_limit
  began = time.time()
  compile_cache.from_option(args.compile_cache)
  log = lambda m: print(f"[{time.time() - began:6.1f} s] {m}", file=sys.stderr, flush=True)  # noqa: E731
  dtype = jnp.dtype(resolve_dtype(args.dtype))
  loaded = load_model(args.model, dtype=dtype, progress=False)
  cfg = loaded.model.cfg
  if loaded.tokenizer is not None:
    tok = loaded.tokenizer
  elif args.tokenizer == "bytes":
    tok = byte_tokenizer(cfg.vocab_size)
  else:
    tok = load_model(args.tokenizer, progress=False).tokenizer
  pool = load_pool(args.adapters, cfg, dtype=dtype)
  gen = Generator(loaded.model, adapters=pool, path=args.path)
  log("model and pool ready")
  largest = max(levels + [args.static_batch])
  max_seq_len = prompt_range[1] + args.max_tokens
  engine = Engine(gen, tok, name="pool", max_batch=largest, max_seq_len=max_seq_len,
                  chunk=min(args.chunk, max_seq_len),
                  batch_buckets=sorted(set(levels) | {args.static_batch}),
                  prefill_rows=positive_ints(args.prefill_rows, "--prefill-rows"),
                  prefill_lengths=positive_ints(args.prefill_lengths, "--prefill-lengths"),
                  packed_tokens=packed_sizes(args.packed_prefill),
                  mixed_tokens=packed_sizes(args.mixed_prefill, "--mixed-prefill"),
                  prefill_wait=args.prefill_wait)
  t0 = time.perf_counter()
  engine.steps.warm_up(log)
  compile_s = time.perf_counter() - t0
  engine.start()
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  url = f"http://127.0.0.1:{sock.getsockname()[1]}"
  server = uvicorn.Server(uvicorn.Config(create_app({"pool": engine}), log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)

  counts = {c: args.requests or max(8, 4 * c) for c in levels}
  prompts = {c: workload(tok, n, cfg.vocab_size, prompt_range, seed=c) for c, n in counts.items()}
  static_prompts = workload(tok, args.static_batch, cfg.vocab_size, prompt_range, seed=10**6)
  seq_prompts = prompts[max(levels)][:args.sequential]

  def static_round() -> float:
    res = generate(gen, static_prompts, max_new_tokens=args.max_tokens)
    return args.static_batch * 1e3 / res.decode_ms_per_token

  def sequential_round() -> float:
    if not seq_prompts:
      return float("nan")
    t, n = 0.0, 0
    for p in seq_prompts:
      s = time.perf_counter()
      res = generate(gen, [p], max_new_tokens=args.max_tokens)
      t += time.perf_counter() - s
      n += len(res.tokens[0])
    return n / t

  log("warming up the baselines and the server")
  static_round()
  log("static batch compiled")
  for p in seq_prompts:  # every prompt bucket of the sequential baseline
    generate(gen, [p], max_new_tokens=2)
  log("sequential compiled")
  run_level(url, "pool", prompts[levels[0]][:2], 4, 2, timeout=120)
  log("server answered")
  rounds: list[dict] = []
  for r in range(args.rounds):
    if time.time() > deadline:
      log(f"time limit reached after {r} rounds")
      break
    row = {"static": static_round(), "sequential": sequential_round(), "levels": {}}
    for label, c, mixed, direct, wait in level_variants(
        levels, args.compare_mixed, args.in_process, flip=r % 2 == 1,
        compare_wait=wait_compared(args)):
      if mixed is not None:
        engine.mixed_prefill = mixed
      engine.prefill_wait = args.prefill_wait if wait is None else wait
      left = max(30.0, deadline - time.time())
      before, after = {}, {}
      if direct:
        before.update(engine_counts(engine.stats))
        res = engine_level(engine, prompts[c], args.max_tokens, c, timeout=left)
        after.update(engine_counts(engine.stats))
      else:
        res = run_level(url, "pool", prompts[c], args.max_tokens, c, timeout=left,
                        on_start=lambda: before.update(engine_counts(engine.stats)),
                        on_done=lambda: after.update(engine_counts(engine.stats)))
      res.update({k: float(after[k] - before[k]) for k in after})
      res.update(label=label, mixed=engine.mixed_prefill, in_process=direct,
                 prefill_wait=engine.prefill_wait)
      row["levels"][label] = res
    rounds.append(row)
    if on_round is not None:  # a run cut short still leaves the rounds it finished
      on_round(summarise(args, levels, prompt_range, counts, rounds, compile_s, str(dtype),
                         cfg.name))
    log(f"round {r + 1}: static {row['static']:.0f} tok/s, " + ", ".join(
        f"c={label} {v['tokens_per_s']:.0f}" for label, v in row["levels"].items()))
  server.should_exit = True
  thread.join(timeout=30)
  engine.stop()
  if not rounds:
    raise UserError("no round finished inside --time-limit; raise it")
  return summarise(args, levels, prompt_range, counts, rounds, compile_s, str(dtype), cfg.name)


class Variant(NamedTuple):
  """One level run of a round: its label, concurrency, the engine settings it runs with (None:
  leave the engine's own) and whether it is driven in-process."""

  label: str
  concurrency: int
  mixed: bool | None
  in_process: bool
  prefill_wait: int | None


def level_variants(levels: list[int], compare_mixed: bool, in_process: bool = False,
                   flip: bool = False, compare_wait: int | None = None) -> list[Variant]:
  """The level runs of a round: with `compare_mixed` each level with mixed steps off and on,
  with `compare_wait` (the engine's --prefill-wait) each with prefill passes that wait for
  arrivals and without ("no-wait"), with `in_process` each through the server and in-process;
  the order flipped on alternate rounds so that no variant always runs second."""
  mixes = (False, True) if compare_mixed else (None,)
  waits = (compare_wait, 0) if compare_wait is not None else (None,)
  ways = (False, True) if in_process else (False,)
  if flip:
    mixes, waits, ways = mixes[::-1], waits[::-1], ways[::-1]
  return [Variant(" ".join([str(c)] + ["mixed"] * bool(m) + ["no-wait"] * (w == 0)
                           + ["in-process"] * d), c, m, d, w)
          for c in levels for m in mixes for w in waits for d in ways]


def engine_counts(stats) -> dict[str, float]:
  """What the engine did, to explain a level's time: decode steps (mixed ones among them),
  prefill passes of their own, steps run while new prompts waited for a shared pass, tokens
  generated, and its thread's seconds waiting for the device, working on the host and idle (no
  request to serve)."""
  return {"decode_steps": stats.decode_steps, "mixed_steps": stats.mixed_steps,
          "prefill_passes": stats.packed_passes + stats.row_passes,
          "prefill_waits": stats.prefill_waits, "prompt_tokens": stats.prompt_tokens,
          "prefill_computed_tokens": stats.prefill_computed_tokens,
          "generated": stats.generated_tokens, "device_wait_s": stats.device_wait_s,
          "host_s": stats.host_s, "idle_s": stats.idle_s}


def server_stack() -> str:
  """What uvicorn serves with here: it takes httptools and uvloop when they are installed."""
  import importlib.util

  import uvicorn

  have = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
  return (f"uvicorn {uvicorn.__version__}, HTTP {'httptools' if have('httptools') else 'h11'},"
          f" loop {'uvloop' if have('uvloop') else 'asyncio'}")


def wait_compared(args) -> int | None:
  """The --prefill-wait compared with 0 in every round, or None when no comparison runs."""
  return args.prefill_wait if args.compare_prefill_wait else None


def summarise(args, levels, prompt_range, counts, rounds, compile_s, dtype, model) -> dict:
  """The result of the rounds so far (medians, the served/static ratio with its interval)."""
  import jax

  from adafuse_jax.bench.measure import environment, ratio_interval

  def med(values):
    return float(np.median(values))

  summary = []
  for label, *_ in level_variants(levels, args.compare_mixed, args.in_process,
                                  compare_wait=wait_compared(args)):
    per = [rd["levels"][label] for rd in rounds]
    summary.append({k: (med([p[k] for p in per]) if isinstance(per[0][k], float) else per[0][k])
                    for k in per[0]})
  static = [rd["static"] for rd in rounds]

  def over(label: str, base: list[float]) -> dict | None:
    if not all(label in rd["levels"] for rd in rounds):
      return None
    served = [rd["levels"][label]["tokens_per_s"] for rd in rounds]
    # ratio_interval divides its first list by its second: time per token, inverted.
    return ratio_interval([1 / s for s in base], [1 / s for s in served])

  plain, mixed = str(args.static_batch), f"{args.static_batch} mixed"
  ratio = over(plain, static)
  ratios = {}
  if args.compare_mixed and ratio is not None:
    ratios = {"mixed_over_static": over(mixed, static),
              "mixed_over_unmixed": over(mixed, [rd["levels"][plain]["tokens_per_s"]
                                                 for rd in rounds])}
  if args.compare_prefill_wait and ratio is not None:
    ratios["wait_over_no_wait"] = over(plain, [rd["levels"][f"{plain} no-wait"]["tokens_per_s"]
                                               for rd in rounds])
  if args.in_process and ratio is not None:
    direct = f"{args.static_batch} in-process"
    ratios.update(in_process_over_static=over(direct, static),
                  served_over_in_process=over(plain, [rd["levels"][direct]["tokens_per_s"]
                                                      for rd in rounds]))
  return {"environment": environment(), "model": model, "pool": args.adapters,
          "path": args.path, "dtype": dtype, "max_tokens": args.max_tokens,
          "server_stack": server_stack(), "prefill_wait": args.prefill_wait,
          "prompt_tokens": list(prompt_range), "requests": counts, "rounds": len(rounds),
          "compile_s": compile_s, "static_batch": args.static_batch,
          "static_tokens_per_s": med(static), "static_rounds": static,
          "sequential_tokens_per_s": med([rd["sequential"] for rd in rounds]),
          "levels": summary, "served_over_static": ratio, **ratios, "raw_rounds": rounds,
          "device": jax.devices()[0].device_kind}


def table(res: dict) -> str:
  env = res["environment"]
  lines = [f"Server under load: {res['model']} + pool {res['pool']} on path {res['path']},"
           f" {res['dtype']}, {res['max_tokens']} tokens per request, prompts of"
           f" {res['prompt_tokens'][0]}-{res['prompt_tokens'][1]} tokens; median of"
           f" {res['rounds']} interleaved rounds.",
           f"Device {env['device']}, JAX {env['jax']}, {env['date']}; command: `{env['command']}`"
           + (f" with XLA_FLAGS=`{env['xla_flags']}`" if env.get("xla_flags") else "")
           + (f"; server: {res['server_stack']}" if res.get("server_stack") else ""),
           "",
           "Engine columns (median per round): decode steps, those of them that also prefilled"
           " prompts (mixed), prefill passes of their own, decode steps run while new prompts"
           " waited for more to share a pass (waits), the prompt tokens prefilled and"
           " those the passes computed (padding to their compiled sizes included), tokens"
           " generated per decode step,"
           " and the engine thread's seconds over the level: waiting for the device's results,"
           " working on the host, idle (no request to serve).",
           "",
           "| concurrency | requests | output tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |"
           " ITL p99 ms | decode steps | mixed | prefill passes | waits | prompt tokens |"
           " computed | tokens/step | device wait s | host s | idle s |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for lv in res["levels"]:
    steps = lv.get("decode_steps", float("nan"))
    per_step = lv["generated"] / steps if steps and "generated" in lv else float("nan")
    lines.append(f"| {lv.get('label', lv['concurrency'])} | {lv['requests']} |"
                 f" {lv['tokens_per_s']:.1f} |"
                 f" {lv['ttft_p50_ms']:.1f} | {lv['ttft_p99_ms']:.1f} | {lv['itl_p50_ms']:.2f} |"
                 f" {lv['itl_p99_ms']:.2f} | {steps:.0f} | {lv.get('mixed_steps', 0):.0f} |"
                 f" {lv.get('prefill_passes', 0):.0f} | {lv.get('prefill_waits', float('nan')):.0f} |"
                 f" {lv.get('prompt_tokens', float('nan')):.0f} |"
                 f" {lv.get('prefill_computed_tokens', float('nan')):.0f} | {per_step:.1f} |"
                 f" {lv.get('device_wait_s', float('nan')):.2f} | {lv.get('host_s', float('nan')):.2f} |"
                 f" {lv.get('idle_s', float('nan')):.2f} |")
  seq = res["sequential_tokens_per_s"]
  lines += ["", "- sequential decoding (`generate`, batch 1): "
            + ("not run" if seq != seq else f"{seq:.1f} tokens/s"),
            f"- static batch {res['static_batch']} (`generate`, decode only):"
            f" {res['static_tokens_per_s']:.1f} tokens/s"]
  r = res.get("served_over_static")
  if r:
    interval = f" [{r['low']:.3f}, {r['high']:.3f}]" if "low" in r else ""
    lines.append(f"- server at concurrency {res['static_batch']} / static batch:"
                 f" {r['median']:.3f}x{interval} (95% interval over {r['rounds']} rounds)")
  for key, what in (("mixed_over_static", "server with mixed steps / static batch"),
                    ("mixed_over_unmixed", "server with mixed steps / without them"),
                    ("wait_over_no_wait", "server with prefill passes that wait for arrivals"
                     " / without waiting"),
                    ("in_process_over_static", "engine driven in-process / static batch"),
                    ("served_over_in_process", "server / engine driven in-process")):
    r = res.get(key)
    if r:
      interval = f" [{r['low']:.3f}, {r['high']:.3f}]" if "low" in r else ""
      lines.append(f"- at concurrency {res['static_batch']}, {what}: {r['median']:.3f}x"
                   f"{interval} (paired by round)")
  return "\n".join(lines)


def plot(res: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  def kind(lv: dict) -> tuple:
    return lv.get("mixed"), lv.get("in_process", False), "no-wait" in lv.get("label", "").split()

  kinds = sorted({kind(lv) for lv in res["levels"]}, key=str)
  for mixed, direct, no_wait in kinds:
    lvs = [lv for lv in res["levels"] if kind(lv) == (mixed, direct, no_wait)]
    tag = ""
    if len({m for m, _, _ in kinds}) > 1:
      tag += " mixed steps" if mixed else " no mixed steps"
    if no_wait:
      tag += " passes do not wait"
    if direct:
      tag += " in-process"
    tag = f" ({tag.strip()})" if tag else ""
    cs = [lv["concurrency"] for lv in lvs]
    a.plot(cs, [lv["tokens_per_s"] for lv in lvs], "o-" if not mixed else "o:",
           label=("engine" if direct else "server") + tag)
    b.plot(cs, [lv["ttft_p50_ms"] for lv in lvs], "o-", label="TTFT p50" + tag)
    b.plot(cs, [lv["itl_p50_ms"] for lv in lvs], "s-", label="ITL p50" + tag)
    b.plot(cs, [lv["itl_p99_ms"] for lv in lvs], "s--", label="ITL p99" + tag)
  a.axhline(res["static_tokens_per_s"], ls="--", c="k",
            label=f"static batch {res['static_batch']} (decode)")
  if res["sequential_tokens_per_s"] == res["sequential_tokens_per_s"]:  # not NaN: it ran
    a.axhline(res["sequential_tokens_per_s"], ls=":", c="gray", label="sequential")
  a.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s",
        title="throughput")
  a.legend(fontsize=8)
  b.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="ms", title="latency")
  b.legend(fontsize=8)
  fig.suptitle(f"{res['model']} + pool, {res['device']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)  # one plot per finished round: keep no figure open


if __name__ == "__main__":
  sys.exit(main())
