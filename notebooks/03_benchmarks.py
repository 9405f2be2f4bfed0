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
# # Benchmarks: every decode path against the physical floor
#
# Reads the recorded H100 results under `docs/benchmarks/` (written by
# `python -m adafuse_jax.bench ... --out DIR` and `tools/sgmm_bench.py`; nothing typed by hand)
# and plots them.

# %%
import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np

ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
BENCH = ROOT / "docs" / "benchmarks"
runs = {p.parent.relative_to(BENCH).as_posix(): json.loads(p.read_text())
        for p in sorted(BENCH.glob("**/results.json"))}
for name, r in runs.items():
  print(f"{name:<24} {r['environment']['device']:<24} {r['preset']:<12} batch {r['batch']}  {r['environment']['date']}")

# %% [markdown]
# ## Packed projections: every path beside the backbone (latest runs)
# `--implementation packed` (`adafuse_jax/packed.py`) appends every expert's A and the layer-wise
# routers to the backbone's matrices, one matmul per group of modules sharing an input. Each bar
# is a mode's pipelined ms/token over the backbone's in the same run.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
for ax, key in zip(axes, ("h100-packed/b1-pregated", "h100-packed/b1-layerwise", "h100-packed/b32")):
  rows = runs[key]["results"]
  base = next(r for r in rows if r["mode"] == "backbone")["decode_pipelined"]["median_ms"]
  ratio = [r["decode_pipelined"]["median_ms"] / base for r in rows]
  colors = ["#55A868" if "packed" in r["mode"] else "#8C8C8C" for r in rows]
  ax.bar([r["mode"] for r in rows], ratio, color=colors)
  ax.axhline(1.05, color="#C44E52", ls="--", lw=1, label="+5%")
  ax.set_title(f"{key.split('/')[-1]} (batch {runs[key]['batch']})")
  ax.tick_params(axis="x", rotation=60)
  for i, v in enumerate(ratio):
    ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
axes[0].set_ylabel("pipelined ms/token / backbone")
axes[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Latency by mode, Llama-2-7B bf16, batch 1 (full run before the packing)
# Two timings per mode: *synced* (one step, then wait: latency) and *pipelined* (steps dispatched
# back to back, as `generate` runs them). The difference is host launch overhead that pipelining
# hides behind the previous step's GPU work.

# %%
report = runs["h100-full"]
rows = report["results"]
names = [r["mode"] for r in rows]
synced = np.array([r["decode"]["median_ms"] for r in rows])
pipelined = np.array([r["decode_pipelined"]["median_ms"] for r in rows])
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(10, 4))
ax.bar(x - 0.2, synced, 0.4, label="synced", color="#8C8C8C")
ax.bar(x + 0.2, pipelined, 0.4, label="pipelined (generate)", color="#4C72B0")
ax.axhline(rows[0]["floor_ms"], color="#C44E52", ls="--",
           label=f"backbone floor at measured copy bandwidth ({rows[0]['floor_ms']:.2f} ms)")
ax.set_xticks(x, names, rotation=25, ha="right")
ax.set_ylabel("decode latency (ms/token, median)")
ax.set_title(f"{report['preset']} {report['dtype']} on {report['environment']['device']}")
ax.legend()
fig.tight_layout()
plt.show()

# %%
tuned = {r["mode"]: r for r in runs["h100-tuned/batch1"]["results"]}
base = tuned["backbone"]["decode_pipelined"]["median_ms"]
for mode, r in tuned.items():
  ms = r["decode_pipelined"]["median_ms"]
  print(f"{mode:<16} {ms:6.3f} ms/token pipelined  ({100 * (ms / base - 1):+.1f}% vs backbone)")
print(tuned["pregated-auto"]["auto"]["reason"])

# %% [markdown]
# ## Merged switching: a step that switches vs one that does not

# %%
fig, ax = plt.subplots(figsize=(7, 3.6))
labels, values, colors = [], [], []
for key, label in (("h100-merged/bench_qv", "q,v"), ("h100-merged/bench_all7", "all 7")):
  by_mode = {r["mode"]: r for r in runs[key]["results"]}
  for mode, value, color in (("backbone", by_mode["backbone"]["decode"]["median_ms"], "#4C72B0"),
                             ("pregated (unmerged)", by_mode["pregated"]["decode"]["median_ms"], "#55A868"),
                             ("merged, no switch", by_mode["pregated-merged"]["decode_unchanged"]["median_ms"], "#8172B2"),
                             ("merged, switching", by_mode["pregated-merged"]["decode"]["median_ms"], "#C44E52")):
    labels.append(f"{label}\n{mode}")
    values.append(value)
    colors.append(color)
ax.barh(labels, values, color=colors)
ax.set_xlabel("decode latency (ms/token, median)")
ax.invert_yaxis()
ax.set_title("Llama-2-7B bf16 batch 1, 8 experts r=16 top-2 (H100)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Throughput by batch size (pipelined)
# Tokens/s = batch x 1000 / (pipelined ms per decode step). Left: 8 experts of rank 16. Middle: 64
# experts of rank 64, where every distinct expert a step touches costs bandwidth, with SERE
# re-routing (S = 1, rho = 0) cutting the distinct experts per step. Right: the same 64-expert
# pool on the packed projections (which read the whole pool every step) beside the gathered
# kernels (which read only the experts in use): the kernels win small batches, the packing
# large ones.

# %%
groups = {
    "8 experts, rank 16": [runs[k] for k in ("h100-full", "h100-pipelined/batch32",
                                             "h100-pipelined/batch64")],
    "64 experts, rank 64": sorted((r for k, r in runs.items() if k.startswith("h100-e64r64/")),
                                  key=lambda r: r["batch"]),
    "64 experts, rank 64, packed": sorted(
        (r for k, r in runs.items() if k.startswith("h100-e64r64-packed/batch")),
        key=lambda r: r["batch"]),
}
fig, axes = plt.subplots(1, 3, figsize=(18, 4))
for ax, (title, sweep) in zip(axes, groups.items()):
  modes = dict.fromkeys(row["mode"] for r in sweep for row in r["results"]
                        if row["mode"] in ("backbone", "pregated", "pregated-fused",
                                           "pregated-fused-sere", "layerwise-fused",
                                           "pregated-packed"))
  for mode in modes:
    pts = [(r["batch"], 1000 * r["batch"] / row["decode_pipelined"]["median_ms"])
           for r in sweep for row in r["results"] if row["mode"] == mode]
    ax.plot(*zip(*pts), marker="o", label=mode)
  ax.set_xscale("log", base=2)
  ax.set_xticks([r["batch"] for r in sweep], [str(r["batch"]) for r in sweep])
  ax.set_xlabel("batch size (sequences decoded together)")
  ax.set_ylabel("decode throughput (tokens/s)")
  ax.set_title(f"Llama-2-7B bf16, H100: {title}")
  ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
for r in groups["64 experts, rank 64"]:
  by_mode = {row["mode"]: row for row in r["results"]}
  plain, sere = by_mode["pregated-fused"], by_mode["pregated-fused-sere"]
  cut = 1 - sere["distinct_experts"] / plain["distinct_experts"]
  speed = plain["decode_pipelined"]["median_ms"] / sere["decode_pipelined"]["median_ms"] - 1
  print(f"batch {r['batch']:>2}: distinct experts per step {plain['distinct_experts']:.1f} ->"
        f" {sere['distinct_experts']:.1f} with SERE ({100 * cut:.0f}% fewer), {100 * speed:+.0f}% tokens/s")

# %% [markdown]
# ## Prompts: segmented kernels, their Triton peer, `ragged_dot` and XLA (H200)
# `tools/segmented_bench.py`: one module of the Llama-2-7B shape over its 32 layers, 512 prompt
# tokens, top-2. Each bar is the cost of a whole module output (x @ W + experts) over the base
# GEMM alone in the same run. The segmented kernels (Pallas, and the same two kernels in Triton's
# language through jax-triton) read only the chosen experts: they win for 64 rank-64 experts,
# while for 8 rank-16 experts two dense GEMMs of inner size E·r = 128 cost less.

# %%
seg = json.loads((BENCH / "h200-segmented" / "segmented.json").read_text())
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
