"""An independent Llama forward pass in plain numpy (float64), sharing no code with the model.

It reads weights in the checkpoint's own layout: HF `[out, in]` matrices, or a GGUF file read
directly with `gguf` — with Q/K rows left as llama.cpp permuted them and RoPE rotating
interleaved pairs (2i, 2i+1), the way ggml does. Agreement with the Flax model (which un-permutes
rows and rotates halves) therefore also checks the un-permutation.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, base, interleaved):
  # x: [T, H, hd]
  hd = x.shape[-1]
  inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
  ang = pos[:, None] * inv[None, :]  # [T, hd/2]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  if interleaved:
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out
  a, b = x[..., : hd // 2], x[..., hd // 2:]
  return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def forward(tokens, w, *, layers, heads, kv_heads, eps, base, interleaved, tied):
  """Logits [T, V] for one sequence. `w` maps HF-style names to [out, in] float64 arrays."""
  t = len(tokens)
  h = w["embed"][tokens]
  pos = np.arange(t, dtype=np.float64)
  causal = np.tril(np.ones((t, t), bool))
  for l in range(layers):
    x = _rms(h, w[f"{l}.attn_norm"], eps)
    q = (x @ w[f"{l}.q"].T).reshape(t, heads, -1)
    k = (x @ w[f"{l}.k"].T).reshape(t, kv_heads, -1)
    v = (x @ w[f"{l}.v"].T).reshape(t, kv_heads, -1)
    q, k = _rope(q, pos, base, interleaved), _rope(k, pos, base, interleaved)
    group = heads // kv_heads
    outs = []
    for hh in range(heads):
      kk, vv = k[:, hh // group], v[:, hh // group]
      s = q[:, hh] @ kk.T / np.sqrt(q.shape[-1])
      s = np.where(causal, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      outs.append(p @ vv)
    h = h + np.concatenate(outs, axis=-1) @ w[f"{l}.o"].T
    x = _rms(h, w[f"{l}.ffn_norm"], eps)
    g, u = x @ w[f"{l}.gate"].T, x @ w[f"{l}.up"].T
    h = h + (g / (1 + np.exp(-g)) * u) @ w[f"{l}.down"].T
  h = _rms(h, w["final_norm"], eps)
  return h @ (w["embed"] if tied else w["lm_head"]).T


def read_gguf(path, layers):
  """Weights of a GGUF file as float64 [out, in] arrays, rows as stored."""
  import gguf

  reader = gguf.GGUFReader(path)
  t = {x.name: x for x in reader.tensors}

  def get(name):
    x = t[name]
    return np.asarray(gguf.quants.dequantize(x.data, x.tensor_type), np.float64).reshape(
        tuple(reversed([int(d) for d in x.shape])))

  names = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
           "ffn_up": "up", "ffn_down": "down", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
  w = {"embed": get("token_embd.weight"), "final_norm": get("output_norm.weight")}
  for l in range(layers):
    for g, n in names.items():
      w[f"{l}.{n}"] = get(f"blk.{l}.{g}.weight")
  return w
