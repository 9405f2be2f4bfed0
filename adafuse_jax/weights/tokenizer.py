"""Tokenizer: byte-level BPE built from GGUF metadata or a Hugging Face `tokenizer.json`,
plus the model's chat template.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# GGUF token types (gguf.TokenType): CONTROL tokens are specials matched whole in text.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4


@dataclasses.dataclass
class Tokenizer:
  """Text <-> ids, and chat formatting.

  Attributes:
    backend: the `tokenizers.Tokenizer` doing the work.
    eos_ids: ids that end generation.
    chat_template: a Jinja template over `messages` (role/content dicts), or None.
    add_bos_id: an id to put before every prompt, or None.
  """

  backend: tokenizers.Tokenizer
  eos_ids: frozenset[int]
  chat_template: str | None = None
  add_bos_id: int | None = None

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    return ([self.add_bos_id] if self.add_bos_id is not None else []) + ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """Formats a conversation with the model's own template."""
    if not self.chat_template:
      raise ValueError("this model has no chat template; drop --chat and give a plain prompt")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(self.chat_template)
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           bos_token="", eos_token="")


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    # SmolLM splits every digit on its own before the byte-level split (its GGUF's `smollm` pre-tokenizer).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  return byte_level


def from_gguf_fields(fields: dict) -> Tokenizer:
  """Builds the tokenizer from a GGUFReader's metadata fields (a `gpt2` BPE model)."""
  model_kind = fields["tokenizer.ggml.model"].contents()
  if model_kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported (only byte-level BPE"
                     " 'gpt2'); use a Hugging Face folder with tokenizer.json instead")
  tokens: list[str] = fields["tokenizer.ggml.tokens"].contents()
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
  types = (fields["tokenizer.ggml.token_type"].contents()
           if "tokenizer.ggml.token_type" in fields else [1] * len(tokens))
  vocab = {tok: i for i, tok in enumerate(tokens)}
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                            byte_fallback=False))
  pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"
  backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
  backend.decoder = decoders.ByteLevel()
  specials = [tokenizers.AddedToken(tok, special=True, normalized=False)
              for tok, ty in zip(tokens, types) if ty in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
  backend.add_special_tokens(specials)
  eos = {int(fields["tokenizer.ggml.eos_token_id"].contents())}
  if "tokenizer.ggml.eot_token_id" in fields:
    eos.add(int(fields["tokenizer.ggml.eot_token_id"].contents()))
  add_bos = ("tokenizer.ggml.add_bos_token" in fields
             and bool(fields["tokenizer.ggml.add_bos_token"].contents()))
  bos = int(fields["tokenizer.ggml.bos_token_id"].contents()) if add_bos else None
  template = (fields["tokenizer.chat_template"].contents()
              if "tokenizer.chat_template" in fields else None)
  return Tokenizer(backend=backend, eos_ids=frozenset(eos), chat_template=template, add_bos_id=bos)


def from_hf_folder(folder, config: dict) -> Tokenizer:
  """Loads `tokenizer.json` (+ `tokenizer_config.json` for the template) from a HF folder."""
  import json
  import pathlib

  folder = pathlib.Path(folder)
  backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  tcfg_path = folder / "tokenizer_config.json"
  tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}

  def token_id(value) -> int | None:
    if isinstance(value, dict):
      value = value.get("content")
    return backend.token_to_id(value) if isinstance(value, str) else None

  eos: set[int] = set()
  cfg_eos = config.get("eos_token_id")
  if isinstance(cfg_eos, int):
    eos.add(cfg_eos)
  elif isinstance(cfg_eos, list):
    eos.update(int(e) for e in cfg_eos)
  if (tid := token_id(tcfg.get("eos_token"))) is not None:
    eos.add(tid)
  bos = token_id(tcfg.get("bos_token")) if tcfg.get("add_bos_token", False) else None
  return Tokenizer(backend=backend, eos_ids=frozenset(eos), chat_template=tcfg.get("chat_template"),
                   add_bos_id=bos)


def byte_tokenizer(vocab_size: int) -> Tokenizer:
  """A tokenizer for presets with random weights (benchmarks): text is its UTF-8 bytes (ids
  0-255, GPT-2's byte-level alphabet) and the ids above 255 decode as `<|ID|>`. No merges, no
  end-of-sequence token, no chat template."""
  if vocab_size < 256:
    raise ValueError(f"a byte tokenizer needs a vocabulary of at least 256, not {vocab_size}")
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  # The byte order of GPT-2's table: printable bytes map to themselves, the rest shift up.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, shift = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + shift)
      shift += 1
  assert set(chars.values()) == set(alphabet)
  vocab = {chars[b]: b for b in range(256)}
  vocab.update({f"<|{i}|>": i for i in range(256, vocab_size)})
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  return Tokenizer(backend=backend, eos_ids=frozenset())
