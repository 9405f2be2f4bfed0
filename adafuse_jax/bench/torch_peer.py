"""The PyTorch peer: a gpt-fast-style decode of the same preset, timed in the same bench run.

What a PyTorch user would run for fast batch decoding of a Llama-family model: q/k/v fused into
one weight and gate/up into another, a static KV cache, one greedy decode step compiled with
`torch.compile(mode="reduce-overhead")` (CUDA graphs), the sampled token fed back on the device.
Seeded random bf16 weights of the preset's shapes (speed does not depend on their values).
Needs PyTorch with CUDA (`available()` says why not); the bench reports it as its own row.
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
  import torch.nn.functional as F

  torch.manual_seed(seed)
  dev, dt = "cuda", torch.bfloat16
  d, hq, hkv, hd, f, nl = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn, cfg.layers

  def w(out_dim, in_dim):  # nn.Linear's layout, [out, in], as gpt-fast holds its weights
    return torch.nn.Parameter((torch.randn(out_dim, in_dim, device=dev) * in_dim ** -0.5).to(dt),
                              requires_grad=False)

  class Peer(torch.nn.Module):
    """The decoder with its KV cache as registered buffers: CUDA graphs may mutate buffers (a
    cache passed as a plain tensor made torch skip them, "mutated inputs")."""

    def __init__(self):
      super().__init__()
      self.wqkv = torch.nn.ParameterList([w((hq + 2 * hkv) * hd, d) for _ in range(nl)])
      self.wo = torch.nn.ParameterList([w(d, hq * hd) for _ in range(nl)])
      self.w13 = torch.nn.ParameterList([w(2 * f, d) for _ in range(nl)])
      self.w2 = torch.nn.ParameterList([w(d, f) for _ in range(nl)])
      self.embed = w(cfg.vocab_size, d)
      self.head = self.embed if cfg.tie_embeddings else w(cfg.vocab_size, d)
      self.register_buffer("k_cache", torch.zeros(nl, batch, hkv, cache_len, hd, device=dev,
                                                  dtype=dt))
      self.register_buffer("v_cache", torch.zeros(nl, batch, hkv, cache_len, hd, device=dev,
                                                  dtype=dt))
      self.register_buffer("inv_freq", 1.0 / (cfg.rope_base ** (
          torch.arange(0, hd, 2, device=dev).float() / hd)))

    def forward(self, tok, pos):  # tok [B, 1] int64, pos [1] int64 -> next [B, 1]
      x = F.embedding(tok, self.embed)  # [B, 1, D]
      mask = (torch.arange(cache_len, device=dev) <= pos)[None, None, None, :]
      ang = pos.float()[:, None] * self.inv_freq[None, :]
      cos = torch.cat([ang.cos()] * 2, -1).to(dt)
      sin = torch.cat([ang.sin()] * 2, -1).to(dt)

      def rope(t):  # [B, H, 1, hd], rotate_half form
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

      def rms(t):  # RMSNorm with unit gains (random weights: the gains change nothing timed)
        t32 = t.float()
        return (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + cfg.rms_eps)).to(dt)

      for i in range(nl):
        q, k, v = F.linear(rms(x), self.wqkv[i]).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
        q = rope(q.view(batch, 1, hq, hd).transpose(1, 2))
        k = rope(k.view(batch, 1, hkv, hd).transpose(1, 2))
        v = v.view(batch, 1, hkv, hd).transpose(1, 2)
        self.k_cache[i, :, :, pos] = k
        self.v_cache[i, :, :, pos] = v
        att = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask,
                                             enable_gqa=hq != hkv)
        x = x + F.linear(att.transpose(1, 2).reshape(batch, 1, hq * hd), self.wo[i])
        g, u = F.linear(rms(x), self.w13[i]).split([f, f], dim=-1)
        x = x + F.linear(F.silu(g) * u, self.w2[i])
      return torch.argmax(F.linear(rms(x), self.head), dim=-1)

  model = Peer()

  def step(tok, pos):
    return model(tok, pos)

  compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
  start = cache_len // 2
  tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
  t0 = time.perf_counter()
  with torch.no_grad():
    for i in range(3):  # compile, record the CUDA graph, replay
      tok = compiled(tok, torch.tensor([start + i], device=dev)).clone()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - t0
  positions = [torch.tensor([start + i], device=dev) for i in range(cache_len // 2)]

  def one_round(steps: int = 32) -> tuple[float, float]:
    steps = min(steps, cache_len // 2 - 1)
    cur = tok
    with torch.no_grad():
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
