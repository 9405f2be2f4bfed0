"""Tokenizer: byte-level BPE built from GGUF metadata or a Hugging Face `tokenizer.json`,
plus the model's chat template.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from typing import Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from adafuse_jax.errors import ModelFileError

# GGUF token types (gguf.TokenType): CONTROL tokens are specials matched whole in text.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4


@dataclasses.dataclass
class Tokenizer:
  """Text <-> ids, and chat formatting, as transformers does them.

  Attributes:
    backend: the `tokenizers.Tokenizer` doing the work.
    eos_ids: ids that end generation (the tokenizer's EOS and every id `generation_config.json`
      or the GGUF names).
    chat_template: a Jinja template over `messages` (role/content dicts), or None.
    add_bos_id: an id to put before every prompt that does not already start with it, or None
      (GGUF's `add_bos_token`, older HF folders' `add_bos_token` without a post-processor).
    post_process: whether `encode` runs the backend's post-processor (a Hugging Face
      `tokenizer.json` adds BOS there, the Llama-3 pattern).
    bos_token, eos_token: the strings a chat template's `{{ bos_token }}` / `{{ eos_token }}`
      render to.
  """

  backend: tokenizers.Tokenizer
  eos_ids: frozenset[int]
  chat_template: str | None = None
  add_bos_id: int | None = None
  post_process: bool = False
  bos_token: str = ""
  eos_token: str = ""

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, special: bool = True) -> list[int]:
    """Ids of `text`; with `special` the BOS (or whatever else) the tokenizer adds to a prompt,
    as transformers' `tokenizer(text)` does."""
    ids = self.backend.encode(text, add_special_tokens=special and self.post_process).ids
    if special and self.add_bos_id is not None and ids[:1] != [self.add_bos_id]:
      ids = [self.add_bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """A conversation as text in the model's own template (BOS included when the template
    writes `{{ bos_token }}`): transformers' `apply_chat_template(..., tokenize=False)`."""
    if not self.chat_template:
      raise ValueError("this model has no chat template (no chat_template.jinja or"
                       " tokenizer_config.json entry); drop --chat and give a plain prompt")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      template = env.from_string(self.chat_template)
      return template.render(messages=list(messages),
                             add_generation_prompt=add_generation_prompt,
                             bos_token=self.bos_token, eos_token=self.eos_token)
    except jinja2.TemplateError as e:
      raise ValueError(f"the model's chat template failed: {e}") from None

  def encode_chat(self, messages: Sequence[dict[str, str]],
                  add_generation_prompt: bool = True) -> list[int]:
    """Ids of a conversation: the template's text, tokenized without adding specials again
    (transformers' `apply_chat_template(..., tokenize=True)`)."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt), special=False)


  @functools.cached_property
  def chat_stop_ids(self) -> frozenset[int]:
    """Ids that end an assistant's turn: EOS, and every special token the chat template itself
    writes (ChatML's `<|im_start|>`/`<|im_end|>`, Llama-3's header and `<|eot_id|>` markers).
    Such a token never belongs inside a reply: a model that writes one has begun the next turn
    (what Ollama's and llama.cpp's chat stop lists do). Plain EOS without a template."""
    if not self.chat_template:
      return self.eos_ids
    ids = self.encode_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                            {"role": "user", "content": "z"}])
    special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
    return self.eos_ids | frozenset(special.intersection(ids))


def _raise_template_error(message: str):
  raise ValueError(f"the model's chat template refused the conversation: {message}")


# The split rule of Llama-3's tokenizer.json (and of llama.cpp's `llama-bpe` pre-tokenizer):
# a GGUF names it, the merges were learned over it, so the GPT-2 rule would give other ids.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm", "llama3", "llama-v3", "llama-bpe",
                       "smaug-bpe", "dbrx")


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
  """The split before byte-level BPE for a GGUF's `tokenizer.ggml.pre` (as transformers' GGUF
  reader builds it); an unknown name is a ModelFileError, never the GPT-2 rule by default."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("default", "gpt2", "gpt-2"):
    return byte_level
  if pre == "smollm":
    # SmolLM splits every digit on its own before the byte-level split (its GGUF's `smollm` pre-tokenizer).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in GGUF_PRE_TOKENIZERS:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ModelFileError(f"the GGUF's pre-tokenizer {pre!r} is not supported ("
                       f"{', '.join(GGUF_PRE_TOKENIZERS)} are); use the model's Hugging Face"
                       " folder, whose tokenizer.json spells its split")


def from_gguf_fields(fields: dict) -> Tokenizer:
  """Builds the tokenizer from a GGUFReader's metadata fields: byte-level BPE ("gpt2", with the
  pre-tokenizer the file names) or SentencePiece BPE ("llama": Llama-2, Mistral), as
  transformers' GGUF reader builds them."""
  model_kind = fields["tokenizer.ggml.model"].contents()
  if model_kind == "llama":
    return _sentencepiece_from_gguf(fields)
  if model_kind != "gpt2":
    raise ModelFileError(f"the GGUF's tokenizer model {model_kind!r} is not supported (byte-level"
                         " BPE 'gpt2' and SentencePiece 'llama' are): use the model's Hugging"
                         " Face folder, whose tokenizer.json this project reads")
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
  return _with_gguf_specials(backend, tokens, fields)


def _with_gguf_specials(backend: tokenizers.Tokenizer, tokens: list[str], fields: dict
                        ) -> Tokenizer:
  """The Tokenizer around `backend` with the GGUF's EOS/EOT ids, BOS policy and template."""
  eos = {int(fields["tokenizer.ggml.eos_token_id"].contents())}
  if "tokenizer.ggml.eot_token_id" in fields:
    eos.add(int(fields["tokenizer.ggml.eot_token_id"].contents()))
  add_bos = ("tokenizer.ggml.add_bos_token" in fields
             and bool(fields["tokenizer.ggml.add_bos_token"].contents()))
  # A file that asks for BOS must name it (a KeyError here is the loader's named error).
  bos_id = (int(fields["tokenizer.ggml.bos_token_id"].contents())
            if add_bos or "tokenizer.ggml.bos_token_id" in fields else None)
  template = (fields["tokenizer.chat_template"].contents()
              if "tokenizer.chat_template" in fields else None)
  eos_str = tokens[int(fields["tokenizer.ggml.eos_token_id"].contents())]
  return Tokenizer(backend=backend, eos_ids=frozenset(eos), chat_template=template,
                   add_bos_id=bos_id if add_bos else None,
                   bos_token=tokens[bos_id] if bos_id is not None else "", eos_token=eos_str)


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces
  of the vocabulary, best score first (transformers' `generate_merges`)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for piece, score in zip(tokens, scores):
    local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
             if piece[:i] in vocab and piece[i:] in vocab]
    merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in merges]


def _sentencepiece_from_gguf(fields: dict) -> Tokenizer:
  """SentencePiece BPE from GGUF metadata: scores order the merges, unknown characters fall
  back to the <0xNN> byte pieces, a space is U+2581 and the text gets one in front."""
  tokens: list[str] = fields["tokenizer.ggml.tokens"].contents()
  if "tokenizer.ggml.scores" not in fields:
    raise ModelFileError("the GGUF's SentencePiece tokenizer lacks tokenizer.ggml.scores, which"
                         " order its merges; the file is damaged or was converted incompletely")
  scores = [float(x) for x in fields["tokenizer.ggml.scores"].contents()]
  types = (fields["tokenizer.ggml.token_type"].contents()
           if "tokenizer.ggml.token_type" in fields else [1] * len(tokens))
  backend = tokenizers.Tokenizer(models.BPE(
      vocab={t: i for i, t in enumerate(tokens)}, merges=_sentencepiece_merges(tokens, scores),
      fuse_unk=True, byte_fallback=True))
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                   split=False)
  backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(content=" ", left=1)])
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
  backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                      for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])
  return _with_gguf_specials(backend, tokens, fields)


def from_hf_folder(folder, config: dict) -> Tokenizer:
  """The tokenizer of a Hugging Face folder: `tokenizer.json` (its post-processor adds BOS),
  `tokenizer_config.json` (special tokens, an older `add_bos_token`, the template), the chat
  template from `chat_template.jinja` (transformers 5) or `tokenizer_config.json`, and the EOS
  ids of `generation_config.json` and `config.json`."""
  import json
  import pathlib

  folder = pathlib.Path(folder)
  backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))

  def read(name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}

  tcfg, gcfg = read("tokenizer_config.json"), read("generation_config.json")

  def token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value

  def token_id(value) -> int | None:
    value = token_str(value)
    return backend.token_to_id(value) if isinstance(value, str) else None

  eos: set[int] = set()
  for source in (config.get("eos_token_id"), gcfg.get("eos_token_id")):
    if isinstance(source, int):
      eos.add(source)
    elif isinstance(source, list):
      eos.update(int(e) for e in source)
  if (tid := token_id(tcfg.get("eos_token"))) is not None:
    eos.add(tid)
  bos_id = token_id(tcfg.get("bos_token"))
  # Older Llama folders say add_bos_token in tokenizer_config.json and may lack a
  # post-processor that adds it; prepend it then, once.
  add_bos = bos_id if tcfg.get("add_bos_token", False) else None
  template = tcfg.get("chat_template")
  if (folder / "chat_template.jinja").exists():
    template = (folder / "chat_template.jinja").read_text()
  if isinstance(template, list):  # named templates: transformers picks "default"
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return Tokenizer(backend=backend, eos_ids=frozenset(eos), chat_template=template,
                   add_bos_id=add_bos, post_process=True,
                   bos_token=token_str(tcfg.get("bos_token")) or "",
                   eos_token=token_str(tcfg.get("eos_token")) or "")


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
