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
# # The fused switch, step by step
#
# With pre-gating, a token's experts and gates are known before its forward pass, so they can
# be merged into the weights: `W = W0 + (alpha/r) Σ_j g_j A[e_j] B[e_j]` for every adapted
# matrix of every layer, in **one** kernel launch (`pallas_kernels/sgmm/`). Here it runs in
# the Pallas interpreter on small shapes, against its plain-jnp reference.

# %%
import json
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import adafuse_jax as af

sgmm_op = af.kernels.sgmm  # the fused switch: its entry point, backends and f32 reference

rng = np.random.default_rng(0)
L, E, r = 2, 4, 8
shapes = {"q": (40, 40), "k": (40, 24), "v": (40, 24), "down": (72, 40)}  # GQA-like, ragged
w0 = [jnp.asarray(rng.normal(size=(L, i, o)), jnp.float32) for i, o in shapes.values()]
a = [jnp.asarray(rng.normal(size=(L, i, E, r)) / np.sqrt(i), jnp.float32) for i, o in shapes.values()]
b = [jnp.asarray(rng.normal(size=(L, E, r, o)), jnp.float32) for i, o in shapes.values()]

# %% [markdown]
# ## One switch: token t used experts (0, 2); token t+1 picks (1, 3)

# %%
tiles = sgmm_op.triton.Tiles(block_m=16, block_n=16, row_steps=2)
interpret = jax.default_backend() != "gpu"
old = (jnp.array([0, 2], jnp.int32), jnp.full((L, 2), 0.5, jnp.float32))
new = (jnp.array([1, 3], jnp.int32), jnp.asarray([[0.7, 0.3]] * L, jnp.float32))
merged_old = sgmm_op.triton.switch_weights([x.copy() for x in w0], a, b, *old, True, w0, tiles=tiles, interpret=interpret)
merged_new = sgmm_op.triton.switch_weights([x.copy() for x in merged_old], a, b, *new, True, w0, tiles=tiles,
                            interpret=interpret)
reference = sgmm_op.switch_weights_reference(w0, a, b, *new, True, w0)
for name, got, want in zip(shapes, merged_new, reference):
  print(f"{name:>5}: max |kernel - reference| = {float(jnp.max(jnp.abs(got - want))):.2e}")

fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
for ax, (title, m) in zip(axes, [("W0 (q, layer 0)", w0[0][0]),
                                 ("ΔW after token t", merged_old[0][0] - w0[0][0]),
                                 ("ΔW after the switch to t+1", merged_new[0][0] - w0[0][0])]):
  im = ax.imshow(np.asarray(m), cmap="coolwarm")
  ax.set_title(title)
  ax.set_xlabel("output column")
  ax.set_ylabel("input row")
  fig.colorbar(im, ax=ax, fraction=0.046)
fig.tight_layout()
plt.show()

# %% [markdown]
# Nothing changed → nothing happens: with the `changed` flag false every program returns at
# once and the (aliased) weights are untouched.

# %%
poisoned = [jnp.full_like(x, jnp.nan) for x in w0]
same = sgmm_op.triton.switch_weights(poisoned, a, b, *new, False, w0, tiles=tiles, interpret=interpret)
print("untouched:", all(bool(jnp.isnan(x).all()) for x in same))

# %% [markdown]
# ## The cost model: bytes moved per token on the Llama-2-7B shape (bf16)
#
# Unmerged experts read the backbone plus the k chosen experts; a merged step that switches
# reads W0 and writes W for every adapted matrix, then runs a plain backbone pass. Bytes alone
# here; a step's floor is its bytes over the device's measured memory ceiling (the bench
# measures it in each run, `docs/benchmarks.md`).

# %%

cfg = af.PRESETS["llama2-7b"]
rows = []
for label, modules in {"q,v": ("q", "v"), "q,k,v,o": ("q", "k", "v", "o"),
                       "all 7": ("q", "k", "v", "o", "gate", "up", "down")}.items():
  acfg = af.AdapterConfig(mode="pregated", modules=modules, num_experts=8, rank=16, top_k=2)
  backbone = af.decode_bytes(cfg, jnp.bfloat16, 256, 1, None)
  rows.append((label, backbone / 1e9, af.decode_bytes(cfg, jnp.bfloat16, 256, 1, acfg) / 1e9,
               (backbone + af.switch_bytes(cfg, jnp.bfloat16, acfg)) / 1e9))
labels = [r[0] for r in rows]
x = np.arange(len(rows))
fig, ax = plt.subplots(figsize=(7, 3.5))
for i, (name, color) in enumerate([("backbone", "#4C72B0"), ("unmerged experts", "#55A868"),
                                    ("merged, switching", "#C44E52")]):
  ax.bar(x + (i - 1) * 0.27, [r[i + 1] for r in rows], 0.27, label=name, color=color)
ax.set_xticks(x, labels)
ax.set_xlabel("adapted modules (8 experts, rank 16, top-2)")
ax.set_ylabel("bytes moved per decode step (GB)")
ax.legend()
ax.set_title("Llama-2-7B bf16, batch 1")
plt.show()
for r in rows:
  print(f"{r[0]:>8}: backbone {r[1]:.2f} GB, unmerged {r[2]:.2f} GB, merged+switch {r[3]:.2f} GB")

# %% [markdown]
# Measured on the H100 (`docs/benchmarks/h100/sgmm-switch/`, `python tools/sgmm_bench.py
# --quick --mosaic`): the Triton-lowered kernel above and its Mosaic GPU twin
# (`pallas_kernels/sgmm/mosaic.py`: TMA copies into swizzled shared memory, one `wgmma` per
# tile; GPU only, so not run here) beside plain XLA, on the same weights: both kernels switch
# in about a third of XLA's time, and merged decoding uses the Mosaic kernel where it applies.
# Their "% of copy" column divides by the rate of an element-wise XLA copy, which under-measures
# the device (on the H200 an element-wise pass ran 1.31-1.35x below the measured ceiling), so
# above 100% of it does not mean at the hardware's rate; these kernels have not been measured
# against the ceiling yet.

# %%
sgmm = json.loads(pathlib.Path("../docs/benchmarks/h100/sgmm-switch/sgmm.json").read_text())
for row in sgmm["rows"]:
  if "of_copy" in row:
    print(f"{row['config']:>14} | {row['variant']:<34} | {row['ms']:7.3f} ms | {100 * row['of_copy']:4.0f}% of an element-wise copy's rate")
