"""How much of the backbone's throughput a batch with per-token experts can keep, by bytes alone.

    python tools/throughput_ceiling.py [--preset llama2-7b] [--out docs/benchmarks/ceiling.md]
        [--plot docs/benchmarks/ceiling.png --measured RUN_DIR,RUN_DIR,...]

A decode step of B sequences reads the backbone (linear weights, head, embeddings, KV cache:
`benchmarks.decode_bytes`) plus every expert that some token of the step chose. With E experts,
top-k and a router that spreads tokens evenly, a token leaves a given expert unchosen with
probability 1 - k/E, so a step touches D = E (1 - (1 - k/E)^B) distinct experts in expectation;
SERE with S = 1 and rho = 0 keeps only the union of the tokens' first choices, E (1 - (1 - 1/E)^B).
Each distinct expert costs L · r · Σ_m (in_m + out_m) weights. If both the backbone and the
experts stream at the same bandwidth, the share of the backbone's tokens/s a step can keep is
at most bytes(backbone) / (bytes(backbone) + D · bytes(expert)): the ceiling this prints, beside
the most distinct experts a step may touch to keep a target share (default 85%, issue #7's goal).
Where the backbone itself runs far below its byte floor (launch- or compute-bound steps, e.g.
the H100 at batch 64: 54% of its floor), extra bytes partly hide and a measured share can pass
the ceiling; where it runs near the floor, the ceiling holds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

import jax.numpy as jnp

from adafuse_jax import costs
from adafuse_jax.config import PRESETS

MODULES = ("q", "k", "v", "o", "gate", "up", "down")


def expected_distinct(num_experts: int, choices: int, batch: int) -> float:
  """Expected distinct experts when each of `batch` tokens picks `choices` of `num_experts`
  uniformly without replacement."""
  return num_experts * (1 - (1 - choices / num_experts) ** batch)


def ceiling(backbone_bytes: float, distinct: float, per_expert: float) -> float:
  """Share of the backbone's tokens/s left when a step also reads `distinct` experts."""
  return backbone_bytes / (backbone_bytes + distinct * per_expert)


def table(preset: str, configs: list[tuple[int, int]], batches: list[int], top_k: int,
          target: float, cache_len: int, command: str = "") -> str:
  cfg = PRESETS[preset]
  lines = [f"Ceiling by bytes, `{preset}` bf16, top-{top_k}, experts on {','.join(MODULES)}, KV"
           f" cache of {cache_len // 2} positions per sequence (as `adafuse_jax.bench` times"
           f" steps); uniform routing. Made by `python tools/throughput_ceiling.py"
           f"{' ' + command if command else ''}`.", "",
           "| E x r | batch | backbone GB/step | GB per expert | distinct experts | ceiling |"
           f" with SERE (S=1, rho=0): distinct | ceiling | SERE's cut | most distinct experts"
           f" for {target:.0%} |", "|---|---|---|---|---|---|---|---|---|---|"]
  for num_experts, rank in configs:
    per_expert = costs.expert_bytes(cfg, jnp.bfloat16, rank, MODULES)
    for batch in batches:
      base = costs.decode_bytes(cfg, jnp.bfloat16, cache_len // 2, batch, None)
      d = expected_distinct(num_experts, top_k, batch)
      ds = expected_distinct(num_experts, 1, batch)
      most = (base / target - base) / per_expert
      lines.append(f"| {num_experts}x{rank} | {batch} | {base / 1e9:.2f} | {per_expert / 1e9:.3f}"
                   f" | {d:.1f} | {ceiling(base, d, per_expert):.0%} | {ds:.1f}"
                   f" | {ceiling(base, ds, per_expert):.0%} | {1 - ds / d:.0%} | {most:.1f} |")
  return "\n".join(lines) + "\n"


def measured_shares(paths: list[str]) -> dict[tuple[int, int], list[tuple[int, float, str]]]:
  """(E, r) -> [(batch, share of the backbone's pipelined tokens/s, mode)] of the best expert
  mode in each `adafuse_jax.bench` results.json (or folder holding one)."""
  out: dict = {}
  for path in paths:
    f = pathlib.Path(path)
    report = json.loads((f / "results.json" if f.is_dir() else f).read_text())
    # Dynamic experts only: a plain LoRA merges into the weights and costs nothing per step.
    by_mode = {r["mode"]: r for r in report["results"]
               if "decode_pipelined" in r and not r["mode"].startswith("lora")}
    base = by_mode.pop("backbone")["decode_pipelined"]["median_ms"]
    mode, best = min(by_mode.items(), key=lambda kv: kv[1]["decode_pipelined"]["median_ms"])
    key = (report["adapter"]["num_experts"], report["adapter"]["rank"])
    out.setdefault(key, []).append(
        (report["batch"], base / best["decode_pipelined"]["median_ms"], mode))
  return out


def plot(preset: str, configs: list[tuple[int, int]], top_k: int, cache_len: int,
         measured: dict, out: pathlib.Path) -> None:
  """Ceiling (and SERE's) against batch size per configuration, measured shares as points."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cfg = PRESETS[preset]
  batches = list(range(1, 65))
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, (num_experts, rank) in enumerate(configs):
    per_expert = costs.expert_bytes(cfg, jnp.bfloat16, rank, MODULES)
    base = [costs.decode_bytes(cfg, jnp.bfloat16, cache_len // 2, b, None) for b in batches]
    for choices, style, what in ((top_k, "-", "ceiling"), (1, ":", "ceiling with SERE")):
      share = [ceiling(bb, expected_distinct(num_experts, choices, b), per_expert)
               for bb, b in zip(base, batches)]
      ax.plot(batches, [100 * v for v in share], style, color=f"C{i}",
              label=f"{num_experts}x{rank}: {what}")
    points = measured.get((num_experts, rank), [])
    if points:
      ax.scatter([b for b, _, _ in points], [100 * v for _, v, _ in points], color=f"C{i}",
                 zorder=3, label=f"{num_experts}x{rank}: measured, best expert path (H100, H200)")
  ax.axhline(85, color="grey", lw=0.8, ls="--", label="85% goal")
  ax.set_xlabel("batch")
  ax.set_ylabel("% of the backbone's tokens/s")
  ax.set_ylim(0, 105)
  ax.set_title(f"{preset} bf16, top-{top_k}: what the bytes allow (even routing)")
  ax.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="llama2-7b", choices=sorted(PRESETS))
  p.add_argument("--configs", default="8x16,64x64", help="E x r pairs, comma-separated")
  p.add_argument("--batches", default="1,8,32,64")
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--target", type=float, default=0.85)
  p.add_argument("--cache-len", type=int, default=512)
  p.add_argument("--out")
  p.add_argument("--plot", help="PNG of the ceilings against batch size")
  p.add_argument("--measured", default="", help="bench results (folders or results.json),"
                 " comma-separated: their best expert path's share, drawn as points")
  args = p.parse_args(argv)
  try:
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
  except ValueError:
    p.error(f"--configs {args.configs!r} / --batches {args.batches!r}: want e.g. 8x16,64x64 / 1,8")
  if any(len(c) != 2 or c[0] < args.top_k or c[1] < 1 for c in configs) or min(batches) < 1:
    p.error("each config needs E >= top-k and r >= 1; batches >= 1")
  command = shlex.join(sys.argv[1:] if argv is None else argv)
  text = table(args.preset, configs, batches, args.top_k, args.target, args.cache_len, command)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)
  if args.plot:
    measured = measured_shares([m for m in args.measured.split(",") if m])
    plot(args.preset, configs, args.top_k, args.cache_len, measured, pathlib.Path(args.plot))
  return text


if __name__ == "__main__":
  main()
