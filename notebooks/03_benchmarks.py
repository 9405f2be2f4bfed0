# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# ## Latency by mode, Llama-2-7B bf16, batch 1 (latest full run)

# %%
report = runs["h100"]
rows = report["results"]
names = [r["mode"] for r in rows]
med = np.array([r["decode"]["median_ms"] for r in rows])
lo = med - np.array([r["decode"]["p10_ms"] for r in rows])
hi = np.array([r["decode"]["p90_ms"] for r in rows]) - med
fig, ax = plt.subplots(figsize=(9, 4))
ax.bar(names, med, yerr=[lo, hi], capsize=3, color="#4C72B0")
ax.axhline(rows[0]["floor_ms"], color="#C44E52", ls="--",
           label=f"backbone floor at measured copy bandwidth ({rows[0]['floor_ms']:.2f} ms)")
ax.set_ylabel("decode latency (ms/token, median, p10-p90)")
ax.set_title(f"{report['preset']} {report['dtype']} on {report['environment']['device']}")
ax.legend()
plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
fig.tight_layout()
plt.show()

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
# ## Throughput by batch size
# Tokens/s = batch x 1000 / (ms per decode step), from the batch-1 run and the batch sweep in
# `docs/benchmarks/h100-batch/`.

# %%
sweep = [runs["h100"]] + sorted((r for k, r in runs.items() if k.startswith("h100-batch/")),
                                key=lambda r: r["batch"])
modes = ["backbone", "pregated", "pregated-fused", "layerwise"]
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for mode in modes:
  pts = [(r["batch"], 1000 * r["batch"] / row["decode"]["median_ms"])
         for r in sweep for row in r["results"] if row["mode"] == mode]
  ax.plot(*zip(*pts), marker="o", label=mode)
ax.set_xscale("log", base=2)
ax.set_xticks([r["batch"] for r in sweep], [str(r["batch"]) for r in sweep])
ax.set_xlabel("batch size (sequences decoded together)")
ax.set_ylabel("decode throughput (tokens/s)")
ax.set_title("Llama-2-7B bf16 on the H100, 8 experts r=16 top-2, all 7 modules")
ax.legend()
plt.show()
