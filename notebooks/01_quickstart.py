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
# # Quickstart: the default model, the trained expert pool, and where each token goes
#
# Runs on a laptop CPU with nothing but the README's set-up command. We load the embedded
# SmolLM2-135M-Instruct, generate, attach the trained pre-gated expert pool shipped with the
# package (8 LoRA experts of rank 8 on q, k, v, o, tied: every token uses all eight at gate 1 and
# its top-2 again at a learned per-layer scale; trained on five domains, see
# `docs/training/gpu-1000-all/`, then tuned with the backbone's own chats to keep the chat
# format, see `docs/training/chat-tuned/`), look at which experts each token picked, and compare decode
# modes.

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

import adafuse_jax as af

loaded = af.load_model(progress=False)
model, tok = loaded.model, loaded.tokenizer
print(model.cfg.name, f"{model.cfg.layers} layers, hidden {model.cfg.hidden}, backend {jax.default_backend()}")

# %% [markdown]
# ## Plain generation (the backbone)

# %%
prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
res = af.generate(af.Generator(model), [tok.encode(prompt)], max_new_tokens=24,
                  stop_ids=tok.eos_ids)
print(tok.decode(res.tokens[0]))
print(f"decode {res.decode_ms_per_token:.1f} ms/token")

# %% [markdown]
# ## Attach the trained pool and look at the routing
#
# Pre-gating decides once per token: one router at layer 0 picks the top-2 experts and their
# gates, and every adapted layer uses them.

# %%
pool = af.load_pool("default", model.cfg)
adapter_cfg = pool.cfg
print(adapter_cfg)

text = "def add(a, b):\n    return a + b\n\nQuestion: What is 12 + 30?\nAnswer:"
res = af.generate(af.Generator(model, adapters=pool), [tok.encode(text)], max_new_tokens=20)
tokens = [tok.decode([t]) for t in res.tokens[0]]
# routes[i] produced generated token i: experts [1, k] and gates [1, k]
grid = np.zeros((len(tokens), adapter_cfg.num_experts))
for i, (experts, gates) in enumerate(res.routes[: len(tokens)]):
  grid[i, experts[0]] = gates[0]

fig, ax = plt.subplots(figsize=(6, 0.3 * len(tokens) + 1))
im = ax.imshow(grid, cmap="magma", aspect="auto", vmin=0, vmax=1)
ax.set_yticks(range(len(tokens)), [repr(t) for t in tokens], fontsize=8)
ax.set_xticks(range(adapter_cfg.num_experts), [f"e{i}" for i in range(adapter_cfg.num_experts)])
ax.set_xlabel("expert")
ax.set_ylabel("generated token")
fig.colorbar(im, ax=ax, label="gate (0-1)")
ax.set_title("Per-token routing of the trained pool")
plt.show()
print(repr(tok.decode(res.tokens[0])))

# %% [markdown]
# ## The same tokens on every decode path
#
# Path `packed` (the default) applies the experts unmerged; `merged` switches each
# token's experts into the weights (the AdaFuse / LoRA-Switch mechanism) and runs a plain
# backbone pass. Greedy decoding must give the same text.

# %%
ids = tok.encode("The three primary colors are")
outputs = {}
for name, gen in {"backbone": af.Generator(model),
                  "pregated on packed": af.Generator(model, adapters=pool, path="packed"),
                  "pregated on merged": af.Generator(model, adapters=pool, path="merged")}.items():
  r = af.generate(gen, [ids], max_new_tokens=16)
  outputs[name] = tok.decode(r.tokens[0])
  print(f"{name:>20}: {outputs[name]!r}  ({r.decode_ms_per_token:.1f} ms/token)")
assert outputs["pregated on packed"] == outputs["pregated on merged"]
