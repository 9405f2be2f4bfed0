"""Where does a synced decode step's time go beyond the GPU's own? One 7B decode step compiled
under several XLA compiler options in one process, timed in interleaved rounds: pipelined
(steps back to back), synced (one step, then wait), and the host's dispatch alone (how long
`run` takes to return, before the device is done); beside them a program with the step's
arguments and no work, for the host's cost of a call alone.

    python tools/step_probe.py [--mode backbone-packed] [--rounds 5]     # GPU; JSON lines
    python tools/step_probe.py --preset smollm2-135m --mode pregated-packed --rank 8 \
        --adapt-modules q,k,v,o                                         # CPU, float32

Options tried on a GPU: XLA's defaults; command buffers (CUDA graphs) off; command buffers for
every kernel kind with no minimum graph size. And the step with every buffer it touches at a
fixed address ("stable buffers"): XLA records a command buffer again whenever an allocation its
commands use moved since the last call (`CommandBufferThunk::ShouldUpdateCommandBuffer`); here
the sampled token (fed back as the next input) and the key are donated and written back in
place, the logits not returned, so the cache, the token and the key keep their addresses from
call to call; once more with the token also handed out as a fresh array, which a loop reading
tokens on the host needs. XLA's defaults fed back as the bench fed them before the library's
`Decoder` (each call's token the last call's output, reshaped by a second dispatch). The
library's `Decoder` (`adafuse_jax.stepper`: the state donated and aliased, the token and
routing handed out by a second program), with XLA's top-k and with the argmax one below, and
handing them out as the step's own fresh outputs (`hand_out="outputs"`).
Beside them the step compiled with the router's top-k written as k masked argmaxes (same
experts, same order) instead of `lax.top_k`, with each layer's attention in XLA's fusions
instead of the library's default (the Pallas decode-attention kernel on one GPU), and with
each RMSNorm as one Pallas kernel (`pallas_kernels.rms_norm`) instead of XLA's reduction and
multiply, and with XLA's attention written as the library wrote it before 2026-12-04
(`model.layers.head_order_attention`, still the GPU's) and as the CPU writes it since
(`token_order_attention`), and with every matmul as one `x @ w` (`plain-matmuls`: the CPU's
small ones are split in two otherwise, `model.layers.matmul`; `--swaps` picks which of these
six compile). On the
CPU: XLA's defaults, its XNNPACK graph fusion, its oneDNN dots and its YNNPACK fusions off.
Each JSON line: a program's medians over the rounds, and its ratio to the first option set's
program (`vs_first_*`: paired by round, median and 95% t-interval, as the bench's ratios).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from adafuse_jax.bench import measure as B
from adafuse_jax.config import PRESETS, AdapterConfig
from adafuse_jax.sampling import SamplingConfig
from adafuse_jax.stepper import Decoder
from adafuse_jax.model.llama import LlamaModel
from adafuse_jax.model.layers import ATTENTION, head_order_attention, token_order_attention
from adafuse_jax.vocab import parse_variant

GPU_OPTIONS = {
    "defaults": {},
    "no-command-buffers": {"xla_gpu_enable_command_buffer": ""},
    "all-command-buffers": {
        "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                                         "DYNAMIC_SLICE_FUSION",
        "xla_gpu_graph_min_graph_size": "1"},
    # How XLA orders a command buffer's commands in its CUDA graph: a chain (one node after the
    # other), the data-flow DAG, or the latency-hiding scheduler's order. The host's
    # cuGraphLaunch of the 7B step took 837 µs of a synced step's 1.1 ms dispatch (H100,
    # docs/benchmarks/h100/host-trace/): does the graph's shape set that cost?
    "cb-serialize": {"xla_gpu_command_buffer_scheduling_mode": "SERIALIZE"},
    "cb-concurrent": {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"},
    "cb-lhs": {"xla_gpu_command_buffer_scheduling_mode": "LHS"},
}
# XLA:CPU's library paths for dots and element-wise work (XNNPACK graph fusion and oneDNN off by
# default in this XLA; its YNNPACK fusions on: an empty list turns them off).
CPU_OPTIONS = {
    "defaults": {},
    "xnn-graph-greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "onednn": {"xla_cpu_use_onednn": True},
    "ynn-off": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


def argmax_top_k_gates(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`routing.top_k_gates` without `lax.top_k`: k rounds of argmax, each masking its pick (the
  lowest index first among ties, as `lax.top_k`)."""
  x = logits.astype(jnp.float32)
  experts, tops = [], []
  for _ in range(k):
    e = jnp.argmax(x, axis=-1)
    experts.append(e)
    tops.append(jnp.take_along_axis(x, e[:, None], axis=-1)[:, 0])
    x = jnp.where(jax.nn.one_hot(e, x.shape[-1], dtype=bool), -jnp.inf, x)
  return jnp.stack(experts, -1).astype(jnp.int32), jax.nn.softmax(jnp.stack(tops, -1), axis=-1)


def pallas_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """`model.layers.rms_norm` [..., D] through the one-launch Pallas kernel
  (`pallas_kernels.rms_norm`; the Pallas interpreter on the CPU)."""
  from pallas_kernels.common import interpret
  from pallas_kernels.rms_norm import triton as norm_kernel
  rows = norm_kernel.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps, interpret=interpret())
  return rows.reshape(x.shape)


SWAPS = {"defaults, argmax top-k": "argmax-top-k", "defaults, xla attention": "xla-attention",
         "defaults, pallas rms_norm": "pallas-rms-norm",
         "defaults, einsum attention": "einsum-attention",
         "defaults, token-order attention": "token-order-attention",
         "defaults, plain matmuls": "plain-matmuls"}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="llama2-7b")
  p.add_argument("--mode", default="backbone-packed")
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--adapt-modules", default="q,k,v,o,gate,up,down")
  p.add_argument("--options", default=None,
                 help="comma-separated compiler option sets to compile (default: all of this"
                      " backend's; the swapped, no-work and stable-buffer programs always run)")
  p.add_argument("--swaps", default=",".join(SWAPS.values()),
                 help="comma-separated functions to swap, a program each (default: all)")
  args = p.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  options = CPU_OPTIONS if on_cpu else GPU_OPTIONS
  if args.options:
    unknown = sorted(set(args.options.split(",")) - set(options))
    if unknown:
      p.error(f"--options: unknown {', '.join(unknown)}; this backend has {', '.join(options)}")
    options = {name: options[name] for name in args.options.split(",")}
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  model = LlamaModel(PRESETS[args.preset], dtype=dtype)
  variant, _ = parse_variant(args.mode)
  acfg = AdapterConfig(num_experts=args.experts, rank=args.rank,
                       modules=tuple(args.adapt_modules.split(",")))
  adapters = (B.build_adapters(model.cfg, variant.mode, acfg, dtype, 0)
              if variant.mode is not None else None)
  gen = B.variant_generator(model, variant, adapters)
  sampling = SamplingConfig()
  cache = gen.new_cache(1, args.cache_len)
  tokens = jnp.ones((1, 1), jnp.int32)
  key = jax.random.key(0)
  steps = {}
  for name, opts in options.items():
    t = time.perf_counter()
    fn = jax.jit(gen._forward, static_argnums=(6,), donate_argnums=(4,))
    try:
      steps[name] = fn.lower(gen.params, gen.adapter_params, gen.derived, tokens, cache, key,
                             sampling).compile(compiler_options=opts)
    except Exception as e:  # an option this XLA does not know: say so and go on
      print(json.dumps({"option": name, "error": str(e).splitlines()[0][:300]}), flush=True)
      continue
    print(json.dumps({"option": name, "compile_s": round(time.perf_counter() - t, 1)}), flush=True)
  # The same step with one function of the library swapped at trace time:
  # - the router's top-k as k masked argmaxes (no sort or TopK kernel): is it what holds the
  #   host for the whole step in the pre-gated program (probe/README.md)?
  # - each layer's one-token attention in XLA's fusions instead of the library's default (the
  #   Pallas decode-attention kernel on one GPU: split over the cache, only filled blocks read).
  from adafuse_jax.model import layers as model_layers
  from adafuse_jax.model import llama
  from adafuse_jax.paths import base as paths_base
  original_top_k = paths_base.top_k_gates
  for name, module, attr, swap in [
      ("defaults, argmax top-k", paths_base, "top_k_gates", argmax_top_k_gates),
      ("defaults, xla attention", gen, "attend_fn", ATTENTION["xla"]),
      ("defaults, pallas rms_norm", llama, "rms_norm", pallas_rms_norm),
      ("defaults, einsum attention", gen, "attend_fn", head_order_attention),
      ("defaults, token-order attention", gen, "attend_fn", token_order_attention),
      # every matmul as one `x @ w` (the CPU's small ones are split in two otherwise)
      ("defaults, plain matmuls", model_layers, "CPU_SPLIT_BELOW_BYTES", 0)]:
    if SWAPS[name] not in args.swaps.split(","):
      continue
    original = getattr(module, attr)
    setattr(module, attr, swap)
    try:
      fn = jax.jit(gen._forward, static_argnums=(6,), donate_argnums=(4,))
      steps[name] = fn.lower(gen.params, gen.adapter_params, gen.derived, tokens, cache, key,
                             sampling).compile()
    finally:
      setattr(module, attr, original)
  # The host's share of a call alone: the same arguments (every weight array, the cache donated
  # and handed back), no work on the device.
  no_work = jax.jit(lambda params, ap, derived, tok, c, k, s: (tok[:, 0], None, c, None),
                    static_argnums=(6,), donate_argnums=(4,))
  steps["no-work, same arguments"] = no_work.lower(gen.params, gen.adapter_params, gen.derived,
                                                   tokens, cache, key, sampling).compile()

  state = {"cache": gen.new_cache(1, args.cache_len)}

  def step(fn) -> jax.Array:
    nxt, _, state["cache"], _ = fn(gen.params, gen.adapter_params, gen.derived, tokens,
                                   state["cache"], key)
    return nxt

  # Stable buffers: (token [B, 1], cache, key) in, the same three out, all donated and aliased.
  def stable_forward(params, ap, derived, tok, c, k, s):
    nxt, _, c, _ = gen._forward(params, ap, derived, tok, c, k, s)
    return nxt[:, None].astype(tok.dtype), c, jax.random.split(k)[0]

  stable = jax.jit(stable_forward, static_argnums=(6,), donate_argnums=(3, 4, 5)).lower(
      gen.params, gen.adapter_params, gen.derived, tokens, cache, key, sampling).compile()
  state["stable"] = (jnp.ones((1, 1), jnp.int32), jax.random.key(1))

  def stable_step(fn) -> jax.Array:
    tok, k = state["stable"]
    tok, state["cache"], k = fn(gen.params, gen.adapter_params, gen.derived, tok,
                                state["cache"], k)
    state["stable"] = (tok, k)
    return tok

  # The same with the sampled token also handed out as a fresh array (what a loop that reads
  # each token on the host while the next step runs must have: a donated array cannot be read).
  def stable_out_forward(params, ap, derived, tok, c, k, s):
    nxt, c, k = stable_forward(params, ap, derived, tok, c, k, s)
    return nxt, c, k, nxt[:, 0]

  stable_out = jax.jit(stable_out_forward, static_argnums=(6,), donate_argnums=(3, 4, 5)).lower(
      gen.params, gen.adapter_params, gen.derived, tokens, cache, key, sampling).compile()

  def stable_out_step(fn) -> jax.Array:
    tok, k = state["stable"]
    tok, state["cache"], k, out = fn(gen.params, gen.adapter_params, gen.derived, tok,
                                     state["cache"], k)
    state["stable"] = (tok, k)
    return out

  # And XLA's defaults fed back as the bench and `generate` feed them: each step's token input
  # is the last step's output (a new array every call), reshaped by a second dispatch.
  state["fed"] = tokens

  def fed_step(fn) -> jax.Array:
    nxt, _, state["cache"], _ = fn(gen.params, gen.adapter_params, gen.derived, state["fed"],
                                   state["cache"], key)
    state["fed"] = nxt[:, None]
    return nxt

  # The library's decode loop (`adafuse_jax.stepper.Decoder`: the state donated and aliased,
  # token and routing handed out by a second program), and the same with the argmax top-k.
  decoders = {}
  # The library's decoder compiled under each non-default option set asked for (GPU), too.
  option_rows = [(f"library decoder, {name}", None, "program", opts)
                 for name, opts in options.items() if opts and not on_cpu]
  for name, swap, hand_out, opts in [("library decoder", None, "program", None),
                                     ("library decoder, outputs", None, "outputs", None),
                                     ("library decoder, argmax top-k", argmax_top_k_gates,
                                      "program", None), *option_rows]:
    if swap is not None and "argmax-top-k" not in args.swaps.split(","):
      continue
    decoder = Decoder(gen, jnp.ones((1,), jnp.int32), gen.new_cache(1, args.cache_len),
                      jax.random.key(1), sampling, hand_out=hand_out)
    if swap is not None or opts is not None:
      paths_base.top_k_gates = swap or original_top_k
      try:
        decoder._fn = jax.jit(gen._decode, static_argnums=(4, 5), donate_argnums=(3,),
                              keep_unused=True).lower(gen.params, gen.adapter_params,
                                                      gen.derived, decoder.state,
                                                      sampling, hand_out).compile(
                                                          compiler_options=opts)
      finally:
        paths_base.top_k_gates = original_top_k
    decoders[name] = decoder
    steps[name] = decoder._fn

  steps["stable buffers"] = stable
  steps["stable buffers, token out"] = stable_out
  steps["defaults, token fed back"] = next(iter(steps.values()))  # the first option set's
  special = {"stable buffers": stable_step, "stable buffers, token out": stable_out_step,
             "defaults, token fed back": fed_step}
  special.update({name: (lambda fn, d=d: d.step()[0]) for name, d in decoders.items()})
  runner = {name: special.get(name, step) for name in steps}

  def reset() -> None:
    half = jnp.asarray(args.cache_len // 2, jnp.int32)
    state["cache"] = state["cache"].replace(length=half)
    for d in decoders.values():
      d.cache = d.cache.replace(length=half)

  times = {n: {"pipelined": [], "synced": [], "dispatch": []} for n in steps}
  for name, fn in steps.items():  # warm every program
    reset()
    for _ in range(3):
      jax.block_until_ready(runner[name](fn))
  for _ in range(args.rounds):
    for name, fn in steps.items():
      reset()
      t = time.perf_counter()
      out = None
      for _ in range(args.steps):
        out = runner[name](fn)
      jax.block_until_ready(out)
      times[name]["pipelined"].append((time.perf_counter() - t) / args.steps * 1e3)
      reset()
      synced, dispatch = [], []
      for _ in range(args.steps):
        t = time.perf_counter()
        out = runner[name](fn)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        synced.append((t2 - t) * 1e3)
        dispatch.append((t1 - t) * 1e3)
      times[name]["synced"].append(float(np.median(synced)))
      times[name]["dispatch"].append(float(np.median(dispatch)))
  first = next(iter(times.values()))  # the first option set's program: the baseline
  for name, ts in times.items():
    ratios = {f"vs_first_{k}": {r: round(x, 4)
                                for r, x in B.ratio_interval(ts[k], first[k]).items()}
              for k in ("pipelined", "synced")}
    print(json.dumps({"option": name, "mode": args.mode, "cache_len": args.cache_len,
                      "rounds": args.rounds,
                      **{k: round(float(np.median(v)), 3) for k, v in ts.items()}, **ratios,
                      "rounds_pipelined": [round(x, 3) for x in ts["pipelined"]],
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}),
          flush=True)


if __name__ == "__main__":
  main()
