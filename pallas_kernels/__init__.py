"""Pallas kernels for dynamic LoRA experts, one sub-package per op as the field names them:

- `bgmv`: the decode gather (each row's own experts, reading only those the step uses; the
  expansion fused into the base matmul, or alone beside one run elsewhere);
- `sgmv`: the segmented prompt matmul (token-expert pairs grouped by expert);
- `sgmm`: the fused switch (the chosen experts merged into every adapted weight, one launch);
- `decode_attention`: one query token per row against its KV cache (flash-decoding: split over
  the cache, only the filled blocks read), for the decode step's attention;
- `rms_norm`: the block's RMSNorm in one launch (XLA runs it as two kernels);
- `swiglu_down`: the MLP's down projection with SwiGLU (and the gate and up experts' delta) in
  its prologue.

Each op has `reference.py` (plain jnp: the f32 truth, and XLA's own formulation where it has
one), one file per backend (`triton.py`: the Triton lowering of Pallas; `mosaic.py`: Mosaic GPU;
`jax_triton.py`: a peer in Triton's language), and its `__init__.py` as the one entry point that
picks a backend (`backend="auto"` falls back in a stated order). `common.py` holds what they
share. Each backend's tile sizes are a frozen `Tiles` dataclass with `get_default(...)`.
"""

from pallas_kernels import bgmv, decode_attention, rms_norm, sgmm, sgmv, swiglu_down  # noqa: E402

__all__ = ["bgmv", "decode_attention", "rms_norm", "sgmm", "sgmv", "swiglu_down"]
