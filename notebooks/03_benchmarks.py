# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Benchmarks: every decode path against the memory floor
#
# Reads the recorded results under `docs/benchmarks/` (each written by `python -m adafuse_jax.bench
# ... --out DIR` or a script in `tools/`, with its command and versions in the file; nothing typed
# by hand) and plots them. `docs/benchmarks.md` explains each and its caveats: the `floor-*` runs
# divide bytes by the memory ceiling measured in the same run and quote ratios over interleaved
# rounds with their 95% intervals; older single runs divide by an element-wise copy rate that
# under-measures the GPU, so read only the ratios between their rows.

# %%
import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np

import adafuse_jax as af

ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
BENCH = ROOT / "docs" / "benchmarks"
results = {p.parent.relative_to(BENCH).as_posix(): json.loads(p.read_text())
           for p in sorted(BENCH.glob("**/results.json"))}
# Decode benches name a preset; the server's load runs (`bench.load`) have levels instead.
runs = {name: r for name, r in results.items() if "preset" in r}
loads = {name: r for name, r in results.items() if "levels" in r}
for name, r in runs.items():
  print(f"{name:<28} {r['environment']['device']:<22} {r['preset']:<12} batch {r['batch']:<3}"
        f" E={r['adapter']['num_experts']} r={r['adapter']['rank']}  {r['environment']['date'][:10]}")


def row_name(mode: str) -> str:
  """A row's name in today's vocabulary (older runs called the gathered path `-fused`)."""
  return mode.replace("-fused", "-gathered")


# %% [markdown]
# ## The floor runs (H200): each row over the backbone, interleaved rounds, 95% intervals
# `bash tools/gpu_check.sh OUT floor` (each `results.json` holds its bench command): Llama-2-7B
# and Mistral-7B shapes, 8 experts of rank 16, top-2 on all 7 modules, batch 1 and 32. Bars are
# the pipelined step's median ratio to its backbone's, paired by round; whiskers the interval.
# The ratios are derived again from each run's rounds by today's rule
# (`adafuse_jax.bench.derive.add_ratios`): a backbone row against the run's first backbone row,
# a row with adapters against the backbone of its own attention (`+pallas-attention`: the
# decode-attention kernel; the `*-attention` runs' rows without a suffix ran XLA's attention).

# %%
from adafuse_jax.bench.derive import add_ratios

floor_runs = sorted(k for k in runs if k.startswith("h200/floor"))
for key in floor_runs:
  add_ratios(runs[key]["results"])
cols = 4
grid_rows = -(-len(floor_runs) // cols)
fig, axes = plt.subplots(grid_rows, cols, figsize=(3.4 * cols, 4.2 * grid_rows), sharey=True,
                         squeeze=False)
for ax in axes.flat[len(floor_runs):]:
  ax.set_visible(False)
for ax, key in zip(axes.flat, floor_runs):
  r = runs[key]
  rows = [row for row in r["results"] if "pipelined_ratio_interval" in row]
  mid = np.array([row["pipelined_ratio_interval"]["median"] for row in rows])
  low = np.array([row["pipelined_ratio_interval"].get("low", m) for row, m in zip(rows, mid)])
  high = np.array([row["pipelined_ratio_interval"].get("high", m) for row, m in zip(rows, mid)])
  ax.bar(range(len(rows)), mid, yerr=[mid - low, high - mid], capsize=3,
         color=["#55A868" if "pregated" in row["mode"] else "#8C8C8C" for row in rows])
  ax.axhline(1.05, color="#C44E52", ls="--", lw=1)
  ax.set_xticks(range(len(rows)), [row["mode"] for row in rows], rotation=35, ha="right",
                fontsize=7)
  ax.set_ylim(0.8, max(1.3, float(high.max()) + 0.05))
  ax.set_title(key.removeprefix("h200/"), fontsize=9)
for ax in axes[:, 0]:
  ax.set_ylabel("pipelined step / backbone's")
fig.tight_layout()
plt.show()
for key in floor_runs:
  r = runs[key]
  print(f"{key}: ceiling {r['ceiling_tb_s']:.2f} TB/s ({r['ceiling_method']}), "
        f"{r['environment']['date'][:10]}")
  for row in r["results"]:
    ci = row.get("pipelined_ratio_interval", {})
    print(f"  {row['mode']:<34} {row['decode_pipelined']['median_ms']:7.3f} ms"
          f"  {ci.get('median', float('nan')):.3f}x [{ci.get('low', float('nan')):.3f},"
          f" {ci.get('high', float('nan')):.3f}]  {100 * row['floor_ms'] / row['decode_pipelined']['median_ms']:3.0f}% of floor")

# %% [markdown]
# ## Batch-1 decode on the H200 (an older single run): every path beside the backbone
# Two timings per row: *synced* (one step, then wait: latency) and *pipelined* (steps dispatched
# back to back, as `generate` runs them). The dashed line is the backbone's floor at the copy
# rate measured in the same run (an under-estimate of the hardware's bandwidth).

# %%
report = runs["h200/batch1"]
rows = report["results"]
names = [row_name(r["mode"]) for r in rows]
synced = np.array([r["decode"]["median_ms"] for r in rows])
pipelined = np.array([r["decode_pipelined"]["median_ms"] for r in rows])
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(9, 4))
ax.bar(x - 0.2, synced, 0.4, label="synced", color="#8C8C8C")
ax.bar(x + 0.2, pipelined, 0.4, label="pipelined (generate)", color="#4C72B0")
ax.axhline(rows[0]["floor_ms"], color="#C44E52", ls="--",
           label=f"backbone floor at the measured copy rate ({rows[0]['floor_ms']:.2f} ms)")
for i, v in enumerate(pipelined / pipelined[0]):
  ax.text(i + 0.2, pipelined[i] + 0.2, f"{v:.2f}x", ha="center", fontsize=8)
ax.set_xticks(x, names, rotation=20, ha="right")
ax.set_ylabel("decode latency (ms/token, median)")
ax.set_title(f"{report['preset']} {report['dtype']} batch 1, {report['environment']['device']}")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Batches of 8 and 32 (H200): pipelined step over the backbone's

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, key in zip(axes, ("h200/batch8", "h200/batch32")):
  rows = runs[key]["results"]
  base = next(r for r in rows if r["mode"] == "backbone")["decode_pipelined"]["median_ms"]
  ratio = [r["decode_pipelined"]["median_ms"] / base for r in rows]
  ax.bar([row_name(r["mode"]) for r in rows], ratio,
         color=["#55A868" if "packed" in r["mode"] else "#8C8C8C" for r in rows])
  ax.axhline(1.05, color="#C44E52", ls="--", lw=1, label="+5%")
  ax.set_title(f"batch {runs[key]['batch']}")
  ax.tick_params(axis="x", rotation=30)
  for i, v in enumerate(ratio):
    ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
axes[0].set_ylabel("pipelined ms/step / backbone")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 64 experts of rank 64 (H100): SERE cuts the experts a step reads

# %%
for key in sorted(k for k in runs if k.startswith("h100/e64r64/")):
  r = runs[key]
  by_mode = {row_name(row["mode"]): row for row in r["results"]}
  plain, sere = by_mode["pregated-gathered"], by_mode["pregated-gathered-sere"]
  cut = 1 - sere["distinct_experts"] / plain["distinct_experts"]
  speed = plain["decode_pipelined"]["median_ms"] / sere["decode_pipelined"]["median_ms"] - 1
  print(f"batch {r['batch']:>2}: distinct experts per step {plain['distinct_experts']:.1f} ->"
        f" {sere['distinct_experts']:.1f} with SERE ({100 * cut:.0f}% fewer), {100 * speed:+.0f}% tokens/s")

# %% [markdown]
# ## Large pools across the space (H200, batch 32): which path wins where
# `bash tools/gpu_check.sh OUT floor` with `EXPERTS`, `RANK`, `TOP_K` (each `results.json` holds its
# command): 64 x rank 64 top-4, 128 x rank 16 and 8 x rank 64 top-2. Each row over the fused-weight
# backbone of its own run (median and 95% interval of the ratio paired by round) and the share of its
# own floor (the bytes that path reads over the run's measured ceiling); the plot is
# `tools/pool_space_plot.py` over the same files.

# %%
from IPython.display import Image, display

from adafuse_jax.bench import derive

for key in ("h200/e64r64-top4-b32", "h200/e128r16-top2-b32", "h200/e8r64-top2-b32"):
  r = runs[key]
  derive.add_ratios(r["results"])
  derive.add_path_floors(r)
  a = r["adapter"]
  print(f"{a['num_experts']} x rank {a['rank']}, top-{a['top_k']}, batch {r['batch']}"
        f" ({r['environment']['device']}, {r['environment']['date'][:10]})")
  for row in r["results"]:
    ratio = row["pipelined_ratio_interval"]
    experts = row.get("distinct_experts")
    print(f"  {row_name(row['mode']):24s} {row['decode_pipelined']['median_ms']:7.3f} ms"
          f"  {ratio['median']:.3f}x [{ratio['low']:.3f}, {ratio['high']:.3f}]"
          + (f"  {experts:5.1f} experts" if experts else ""))
display(Image(filename=str(BENCH / "h200" / "pool-space.png")))

# %% [markdown]
# ## What the bytes allow: the throughput ceiling by batch size
# `tools/throughput_ceiling.py`: the share of the backbone's tokens/s a pool can keep when every
# distinct expert a step touches costs its bytes, with and without SERE, and the measured points.

# %%
from IPython.display import Image, display

display(Image(filename=str(BENCH / "ceiling.png")))

# %% [markdown]
# ## Prompts: segmented kernels, their Triton peer, `ragged_dot` and XLA (H200)
# `tools/segmented_bench.py`: one module of the Llama-2-7B shape over its 32 layers, 512 prompt
# tokens, top-2. Each bar is the cost of a whole module output (x @ W + experts) over the base
# GEMM alone in the same run. SGMV reads only the chosen experts: it wins for 64 rank-64
# experts, while for 8 rank-16 experts two dense GEMMs of inner size E·r = 128 cost less.

# %%
seg = json.loads((BENCH / "h200" / "sgmv" / "segmented.json").read_text())
base = {(r["experts"], r["module"]): r["ms"] for r in seg["rows"] if r["variant"] == "base"}
shown = ["xla-dense", "ragged_dot", "pallas", "triton"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
for ax, experts in zip(axes, sorted({r["experts"] for r in seg["rows"]})):
  modules = list(dict.fromkeys(r["module"] for r in seg["rows"] if r["experts"] == experts))
  for i, variant in enumerate(shown):
    cost = [100 * (next(r["ms"] for r in seg["rows"] if (r["experts"], r["module"], r["variant"])
                        == (experts, m, variant)) / base[(experts, m)] - 1) for m in modules]
    ax.bar(np.arange(len(modules)) + 0.2 * i, cost, 0.2, label=variant)
  rank = next(r["rank"] for r in seg["rows"] if r["experts"] == experts)
  ax.set_xticks(np.arange(len(modules)) + 0.3, modules)
  ax.set_title(f"{experts} experts of rank {rank}, 512 tokens")
axes[0].set_ylabel("cost over the base GEMM, %")
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The bytes behind the floors
# `af.decode_bytes`: what a batch-1 step must read, backbone and experts, for the 7B shape.

# %%
cfg = af.PRESETS["llama2-7b"]
pool = af.AdapterConfig(mode="pregated", num_experts=8, rank=16, top_k=2)
backbone = af.decode_bytes(cfg, "bfloat16", 256, 1, None)
print(f"backbone {backbone / 1e9:.2f} GB per step; with 2 of 8 rank-16 experts on all 7 modules"
      f" {af.decode_bytes(cfg, 'bfloat16', 256, 1, pool) / 1e9:.2f} GB")

# %% [markdown]
# ## The server under load
#
# `python -m adafuse_jax.bench.load` serves the pool over the OpenAI API and keeps 1-8 (CPU) or
# 1-64 (GPU) streams in flight, beside `generate` on a static batch and one request at a time.

# %%
for name, r in loads.items():
  print(f"{name}: {r['model']} + pool {r['pool']}, {r['environment']['device']},"
        f" {r['environment']['date'][:10]}")
  for lv in r["levels"]:
    print(f"  concurrency {lv['concurrency']:>3}: {lv['tokens_per_s']:7.1f} tokens/s,"
          f" TTFT p50 {lv['ttft_p50_ms']:7.1f} ms, ITL p50 {lv['itl_p50_ms']:6.1f} ms")
  print(f"  static batch {r['static_batch']}: {r['static_tokens_per_s']:.1f} tokens/s;"
        f" sequential: {r['sequential_tokens_per_s']:.1f} tokens/s")

