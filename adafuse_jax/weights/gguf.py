"""Loading Llama-architecture GGUF files (any quantization `gguf` can dequantize)."""

from __future__ import annotations

import os
import struct
import sys
from typing import Protocol

import gguf
import numpy as np

from adafuse_jax.config import ModelConfig, RopeScaling
from adafuse_jax.errors import ModelFileError
from adafuse_jax.weights import tokenizer as tokenizer_lib

class Progress(Protocol):
  """The part of a tqdm bar the loaders use."""

  def reset(self, total: int | None = None) -> None: ...

  def update(self, n: int = 1) -> bool | None: ...


# GGUF per-block tensor name -> our linear module name.
_LINEAR_TENSORS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
                   "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: w [out, in] back to the `rotate_half` order.

  The converter maps HF rows with `reshape(H, 2, hd/2, in).swapaxes(1, 2)` so that ggml can
  rotate interleaved pairs; this is its inverse.
  """
  out, inp = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


_SCALARS = {gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1",
            gguf.GGUFValueType.UINT16: "<u2", gguf.GGUFValueType.INT16: "<i2",
            gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
            gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.BOOL: "<u1",
            gguf.GGUFValueType.UINT64: "<u8", gguf.GGUFValueType.INT64: "<i8",
            gguf.GGUFValueType.FLOAT64: "<f8"}


class _ArrayField:
  """A metadata array read in one pass: what `ReaderField` offers the loaders (`contents()`,
  `data` for its length, `types`)."""

  def __init__(self, offset: int, name: str, sub_type, values: list):
    self.offset, self.name, self.values = offset, name, values
    self.types = [gguf.GGUFValueType.ARRAY, sub_type]
    self.parts: list = []
    self.data = list(range(len(values)))

  def contents(self, index_or_slice: int | slice = slice(None)):
    return self.values[index_or_slice]


class _FastReader(gguf.GGUFReader):
  """`gguf.GGUFReader` whose metadata arrays (the tokenizer's 49k tokens, merges and types) are
  read in one pass over the bytes: the stock reader builds numpy views per element (SmolLM2's
  file on a 2-core CPU: 0.15 s against 5.1 s for the stock reader, timed once side by side).
  Little-endian files only (the stock reader takes the others); every other field goes through
  the stock code."""

  def _build_fields(self, offs: int, count: int) -> int:
    if self.byte_order != "I" or sys.byteorder != "little":
      return super()._build_fields(offs, count)
    view = memoryview(self.data)
    for _ in range(count):
      start = offs
      (klen,) = struct.unpack_from("<Q", view, offs)
      key = bytes(view[offs + 8:offs + 8 + klen]).decode("utf-8")
      (vtype,) = struct.unpack_from("<I", view, offs + 8 + klen)
      body = offs + 12 + klen
      if vtype != gguf.GGUFValueType.ARRAY:
        size, parts, idxs, types = self._get_field_parts(body, vtype)
        key_parts = [np.asarray([klen], np.uint64), np.frombuffer(key.encode(), np.uint8),
                     np.asarray([vtype], np.uint32)]
        self._push_field(gguf.ReaderField(start, key, key_parts + parts,
                                          [i + 3 for i in idxs], types), skip_sum=True)
        offs = body + size
        continue
      sub, n = struct.unpack_from("<IQ", view, body)
      p = body + 12
      if sub == gguf.GGUFValueType.STRING:
        values = []
        for _ in range(n):
          (slen,) = struct.unpack_from("<Q", view, p)
          values.append(str(view[p + 8:p + 8 + slen], "utf-8"))
          p += 8 + slen
      elif sub in _SCALARS:
        arr = np.frombuffer(view, dtype=_SCALARS[sub], count=n, offset=p)
        values = arr.astype(bool).tolist() if sub == gguf.GGUFValueType.BOOL else arr.tolist()
        p += arr.nbytes
      else:  # nested arrays: open_reader falls back to the stock reader
        raise ValueError(f"GGUF field {key!r} is an array of arrays")
      self.fields[key] = _ArrayField(start, key, gguf.GGUFValueType(sub), values)
      offs = p
    return offs


def open_reader(path: str) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise ModelFileError(f"model file {path!r} does not exist; pass --model with a .gguf file,"
                         " a Hugging Face folder, or 'default'")
  try:
    try:
      return _FastReader(path)
    except (struct.error, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
      return gguf.GGUFReader(path)  # the stock reader's own errors name what is wrong
  except Exception as e:  # the reader raises many kinds on a damaged file
    raise ModelFileError(
        f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or"
        " corrupt: download or copy it again") from None


def _field(fields: dict, key: str, default=None):
  if key in fields:
    return fields[key].contents()
  if default is None:
    raise ModelFileError(f"GGUF metadata lacks {key!r}; the file is not a complete Llama GGUF")
  return default


def config_from_fields(fields: dict, tensor_names: set[str], path: str) -> ModelConfig:
  arch = _field(fields, "general.architecture")
  if arch != "llama":
    raise ModelFileError(f"{path!r} holds a {arch!r} model; only Llama-architecture models"
                         " (Llama, Mistral, SmolLM2, ...) are supported")
  p = "llama."
  heads = int(_field(fields, p + "attention.head_count"))
  hidden = int(_field(fields, p + "embedding_length"))
  if heads < 1 or hidden < 1:
    raise ModelFileError(f"{path!r} declares {heads} attention heads and embedding length"
                         f" {hidden}; both must be positive (the metadata is damaged)")
  head_dim = int(_field(fields, p + "rope.dimension_count", hidden // heads))
  scaling = None
  if _field(fields, p + "rope.scaling.type", "none") == "linear":
    scaling = RopeScaling(kind="linear", factor=float(_field(fields, p + "rope.scaling.factor")))
  vocab = int(_field(fields, p + "vocab_size", len(_field(fields, "tokenizer.ggml.tokens"))))
  return ModelConfig(
      vocab_size=vocab, hidden=hidden, layers=int(_field(fields, p + "block_count")),
      heads=heads, kv_heads=int(_field(fields, p + "attention.head_count_kv", heads)),
      head_dim=head_dim, ffn=int(_field(fields, p + "feed_forward_length")),
      rope_base=float(_field(fields, p + "rope.freq_base", 10000.0)), rope_scaling=scaling,
      rms_eps=float(_field(fields, p + "attention.layer_norm_rms_epsilon")),
      max_context=int(_field(fields, p + "context_length")),
      tie_embeddings="output.weight" not in tensor_names,
      name=str(_field(fields, "general.name", os.path.basename(path))))


def load_gguf(path: str, progress: Progress | None = None
              ) -> tuple[ModelConfig, dict[str, np.ndarray], tokenizer_lib.Tokenizer]:
  """Reads config, f32 weights in our layout (linear weights stacked [L, in, out]) and tokenizer.

  Args:
    path: a .gguf file.
    progress: a tqdm-like bar, reset to the tensor count and advanced per tensor.
  """
  reader = open_reader(path)
  tensors = {t.name: t for t in reader.tensors}
  if progress is not None:
    progress.reset(total=len(tensors))
  cfg = config_from_fields(reader.fields, set(tensors), path)

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ModelFileError(f"{path!r} lacks tensor {name!r}; the file is incomplete")
    t = tensors[name]
    try:
      # A plain view of the memory map: on the memmap subclass numpy's per-slice bookkeeping
      # took ~30% of the default model's load (tools/gguf_load_probe.py).
      arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except Exception as e:
      raise ModelFileError(f"cannot read tensor {name!r} of {path!r} ({e}); the file may be"
                           " truncated: copy it again") from None
    if progress is not None:
      progress.update(1)
    return np.asarray(arr, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))

  weights: dict[str, np.ndarray] = {"embed": get("token_embd.weight"),
                                    "final_norm": get("output_norm.weight")}
  if not cfg.tie_embeddings:
    weights["lm_head"] = get("output.weight").T
  # Each layer's tensor is written once, transposed, into its stack [L, in, out] (no per-layer
  # copy stacked again afterwards).
  stacks: dict[str, np.ndarray] = {}

  def put(name: str, layer: int, value: np.ndarray) -> None:
    if name not in stacks:
      stacks[name] = np.empty((cfg.layers, *value.shape), np.float32)
    elif stacks[name].shape[1:] != value.shape:
      raise ModelFileError(f"{path!r}: layer {layer}'s {name} has shape {value.shape}, layer 0's"
                           f" {stacks[name].shape[1:]}; the file is inconsistent")
    stacks[name][layer] = value

  for l in range(cfg.layers):
    for gname, name in _LINEAR_TENSORS.items():
      w = get(f"blk.{l}.{gname}.weight")  # [out, in]
      if name == "q":
        w = _unpermute_rows(w, cfg.heads)
      elif name == "k":
        w = _unpermute_rows(w, cfg.kv_heads)
      put(name, l, w.T)
    put("attn_norm", l, get(f"blk.{l}.attn_norm.weight"))
    put("ffn_norm", l, get(f"blk.{l}.ffn_norm.weight"))
  weights.update(stacks)
  try:
    tok = tokenizer_lib.from_gguf_fields(reader.fields)
  except KeyError as e:
    raise ModelFileError(f"{path!r} has no tokenizer metadata ({e})") from None
  return cfg, weights, tok

