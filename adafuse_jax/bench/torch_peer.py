"""The PyTorch peer: a gpt-fast-style decode of the same preset, timed in the same bench run.

What a PyTorch user would run for fast batch decoding of a Llama-family model, written the way
gpt-fast writes it: q/k/v fused into one weight and gate/up into another, a static KV cache per
layer (registered buffers updated in place at the step's position), attention over the whole
cache with a causal-mask row, the math attention kernel (Inductor generates the attention
itself), one greedy decode step compiled with `torch.compile(mode="reduce-overhead",
fullgraph=True)` (CUDA graphs) with Inductor's coordinate-descent tuning, and the sampled token
fed back on the device. Seeded random bf16 weights of the preset's shapes (speed does not depend
on their values). Needs PyTorch with CUDA (`available()` says why not); the bench reports it as
its own row.

Its first version kept every layer's cache in one [layers, ...] buffer and wrote the step's
position through it: at batch 32 that ran 107 ms a step (the update was not done in place), so
it was not a fair peer; the per-layer buffers here follow gpt-fast's `KVCache`.
"""

from __future__ import annotations

import time
from typing import Callable

from adafuse_jax.config import ModelConfig


def available() -> tuple[bool, str]:
  """(whether the peer can run in this process, why not)."""
  try:
    import torch
  except ImportError as e:
    return False, f"PyTorch is not installed ({e})"
  if not torch.cuda.is_available():
    return False, "PyTorch sees no CUDA device"
  return True, ""


def build(cfg: ModelConfig, *, batch: int, cache_len: int, seed: int = 0
          ) -> tuple[Callable[[], tuple[float, float]], float]:
  """(one_round() -> (pipelined, synced) ms/step, compile seconds) of the peer.

  Steps start half-way into the cache, as the JAX rows do."""
  import torch
  import torch._inductor.config as inductor
  import torch.nn.functional as F
  from torch.nn.attention import SDPBackend, sdpa_kernel

  inductor.coordinate_descent_tuning = True  # as gpt-fast: tunes the GEMV kernels' launch
  inductor.triton.unique_kernel_names = True
  torch.manual_seed(seed)
  dev, dt = "cuda", torch.bfloat16
  d, hq, hkv, hd, f, nl = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn, cfg.layers

  def w(out_dim, in_dim):  # nn.Linear's layout, [out, in], as gpt-fast holds its weights
    return torch.nn.Parameter((torch.randn(out_dim, in_dim, device=dev) * in_dim ** -0.5).to(dt),
                              requires_grad=False)

  def rms(t, gain):
    t32 = t.float()
    return (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + cfg.rms_eps)).to(dt) * gain

  class Block(torch.nn.Module):
    """One decoder layer with its own KV cache buffers [B, kv heads, S, head dim], written in
    place at the step's position (CUDA graphs may mutate buffers)."""

    def __init__(self):
      super().__init__()
      self.wqkv, self.wo = w((hq + 2 * hkv) * hd, d), w(d, hq * hd)
      self.w13, self.w2 = w(2 * f, d), w(d, f)
      self.attn_norm = torch.nn.Parameter(torch.ones(d, device=dev, dtype=dt), False)
      self.ffn_norm = torch.nn.Parameter(torch.ones(d, device=dev, dtype=dt), False)
      shape = (batch, hkv, cache_len, hd)
      self.register_buffer("k_cache", torch.zeros(shape, device=dev, dtype=dt))
      self.register_buffer("v_cache", torch.zeros(shape, device=dev, dtype=dt))

    def forward(self, x, pos, cos, sin, mask):
      q, k, v = F.linear(rms(x, self.attn_norm), self.wqkv).split(
          [hq * hd, hkv * hd, hkv * hd], dim=-1)
      q = rope(q.view(batch, 1, hq, hd).transpose(1, 2), cos, sin)
      k = rope(k.view(batch, 1, hkv, hd).transpose(1, 2), cos, sin)
      v = v.view(batch, 1, hkv, hd).transpose(1, 2)
      self.k_cache[:, :, pos] = k
      self.v_cache[:, :, pos] = v
      keys, values = self.k_cache, self.v_cache
      if hkv != hq:  # grouped-query attention, as gpt-fast expands it
        keys = keys.repeat_interleave(hq // hkv, dim=1)
        values = values.repeat_interleave(hq // hkv, dim=1)
      att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
      x = x + F.linear(att.transpose(1, 2).reshape(batch, 1, hq * hd), self.wo)
      g, u = F.linear(rms(x, self.ffn_norm), self.w13).split([f, f], dim=-1)
      return x + F.linear(F.silu(g) * u, self.w2)

  def rope(t, cos, sin):  # [B, H, 1, hd], rotate_half form
    t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
    return t * cos + torch.cat([-t2, t1], -1) * sin

  class Peer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = torch.nn.ModuleList([Block() for _ in range(nl)])
      self.embed = w(cfg.vocab_size, d)
      self.head = self.embed if cfg.tie_embeddings else w(cfg.vocab_size, d)
      self.norm = torch.nn.Parameter(torch.ones(d, device=dev, dtype=dt), False)
      self.register_buffer("causal", torch.tril(torch.ones(cache_len, cache_len, device=dev,
                                                           dtype=torch.bool)))
      self.register_buffer("inv_freq", 1.0 / (cfg.rope_base ** (
          torch.arange(0, hd, 2, device=dev).float() / hd)))

    def forward(self, tok, pos):  # tok [B, 1] int64, pos [1] int64 -> next [B, 1]
      x = F.embedding(tok, self.embed)  # [B, 1, D]
      mask = self.causal[None, None, pos]  # [1, 1, 1, S]: the row of the step's position
      ang = pos.float()[:, None] * self.inv_freq[None, :]
      cos = torch.cat([ang.cos()] * 2, -1).to(dt)
      sin = torch.cat([ang.sin()] * 2, -1).to(dt)
      for block in self.layers:
        x = block(x, pos, cos, sin, mask)
      return torch.argmax(F.linear(rms(x, self.norm), self.head), dim=-1)

  model = Peer()

  def step(tok, pos):
    return model(tok, pos)

  # gpt-fast decodes under the math attention kernel: better for Inductor to generate attention.
  math_attention = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
  compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
  start = cache_len // 2
  tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
  t0 = time.perf_counter()
  with torch.no_grad(), math_attention():
    for i in range(3):  # compile, record the CUDA graph, replay
      tok = compiled(tok, torch.tensor([start + i], device=dev)).clone()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - t0
  positions = [torch.tensor([start + i], device=dev) for i in range(cache_len // 2)]

  def one_round(steps: int = 32) -> tuple[float, float]:
    steps = min(steps, cache_len // 2 - 1)
    cur = tok
    with torch.no_grad(), math_attention():
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      for i in range(steps):  # pipelined: one sync at the end
        cur = compiled(cur, positions[i]).clone()
      torch.cuda.synchronize()
      pipelined = (time.perf_counter() - t0) / steps * 1e3
      synced = []
      for i in range(steps):
        t0 = time.perf_counter()
        cur = compiled(cur, positions[i]).clone()
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - t0)
    synced.sort()
    return pipelined, synced[len(synced) // 2] * 1e3

  return one_round, compile_s
