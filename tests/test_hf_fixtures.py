"""The project against transformers itself: folders saved by transformers 5 (rope types, GQA,
head_dim, tied embeddings, Mistral, the older config keys) give transformers' logits, and the
tokenizer gives its ids (BOS from the post-processor, chat_template.jinja, several EOS ids); a
Llama-2-style GGUF (SentencePiece tokenizer, Q8_0 weights) gives what transformers' GGUF reader
gives.

The fixtures and their expected outputs are made by `tests/fixtures/make_fixtures.py` in an
environment with torch, transformers and peft; this file only reads them.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from adafuse_jax.errors import ModelFileError
from adafuse_jax.weights import load_model
from tests.test_model import full_logits

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EXPECTED = np.load(FIXTURES / "expected.npz")
IDS = json.loads((FIXTURES / "expected.json").read_text())
MODELS = ["hf-llama3", "hf-yarn", "hf-linear", "hf-dynamic", "hf-default", "hf-legacy",
          "hf-mistral"]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_transformers(name):
  loaded = load_model(str(FIXTURES / name), progress=False)
  got = np.asarray(full_logits(loaded.model, EXPECTED["prompt"][None].astype(np.int32))[0])
  want = EXPECTED[name]
  assert got.shape == want.shape
  assert relative_error(got, want) < 1e-4, relative_error(got, want)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def test_rope_types_change_the_logits():
  """The fixtures would not catch a dropped scaling if every rope type gave the same logits."""
  loaded = load_model(str(FIXTURES / "hf-llama3"), progress=False)
  assert loaded.model.cfg.rope_base == 500000.0
  assert loaded.model.cfg.rope_scaling.kind == "llama3"
  unscaled = load_model(str(FIXTURES / "hf-llama3"), progress=False)
  unscaled.model.inv_freq.set_value(
      1.0 / 500000.0 ** (np.arange(8, dtype=np.float32) * 2 / 16))
  prompt = EXPECTED["prompt"][None].astype(np.int32)
  a = np.asarray(full_logits(loaded.model, prompt)[0])
  b = np.asarray(full_logits(unscaled.model, prompt)[0])
  assert relative_error(b, a) > 1e-4


def test_tokenizer_ids_equal_transformers():
  tok = load_model(str(FIXTURES / "hf-llama3"), progress=False).tokenizer
  for text, ids in zip(IDS["texts"], IDS["tokens"]):
    assert tok.encode(text) == ids
    assert ids[0] == IDS["bos_id"]  # BOS from the post-processor
    assert tok.decode(ids) == text
  assert tok.encode_chat(IDS["messages"]) == IDS["chat"]
  assert IDS["chat"].count(IDS["bos_id"]) == 1  # the template's BOS, not a second one
  assert tok.eos_ids == frozenset(IDS["eos_ids"])  # generation_config.json's list


def test_chat_template_from_jinja_file_and_tokenizer_config(tmp_path):
  folder = tmp_path / "m"
  shutil.copytree(FIXTURES / "hf-llama3", folder)
  template = (folder / "chat_template.jinja").read_text()
  (folder / "chat_template.jinja").unlink()
  assert load_model(str(folder), progress=False).tokenizer.chat_template is None
  tcfg = json.loads((folder / "tokenizer_config.json").read_text())
  tcfg["chat_template"] = template  # where transformers 4 kept it
  (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
  tok = load_model(str(folder), progress=False).tokenizer
  assert tok.encode_chat(IDS["messages"]) == IDS["chat"]


def test_mistral_context_is_capped_at_its_sliding_window():
  cfg = load_model(str(FIXTURES / "hf-mistral"), progress=False).model.cfg
  assert cfg.max_context == 64  # the window: attention inside it is exact


@pytest.mark.parametrize("change, words", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "architecture 'Qwen2ForCausalLM'"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
])
def test_unsupported_config_is_a_named_error(tmp_path, change, words):
  folder = tmp_path / "m"
  shutil.copytree(FIXTURES / "hf-default", folder)
  raw = json.loads((folder / "config.json").read_text())
  raw.update(change)
  (folder / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ModelFileError, match=words.replace("(", r"\(")):
    load_model(str(folder), progress=False)


def test_sentencepiece_gguf_equals_transformers_gguf_reader():
  spm = IDS["spm"]
  loaded = load_model(str(FIXTURES / "spm.gguf"), progress=False)
  tok = loaded.tokenizer
  for text, ids, decoded in zip(spm["texts"], spm["tokens"], spm["decoded"]):
    assert tok.encode(text) == ids  # BOS, the U+2581 prefix, byte fallback for 東 and 🚀
    assert tok.decode(ids) == decoded
  assert any(t in range(3, 259) for t in spm["tokens"][-1])  # the byte pieces were used
  got = np.asarray(full_logits(loaded.model, EXPECTED["spm-prompt"][None].astype(np.int32))[0])
  assert relative_error(got, EXPECTED["spm"]) < 1e-4  # Q8_0 FFN weights dequantized alike


def test_llama3_style_gguf_equals_transformers_gguf_reader():
  """A byte-level GGUF naming pre-tokenizer `llama-bpe` (every Llama-3 GGUF)."""
  bpe = IDS["bpe"]
  loaded = load_model(str(FIXTURES / "bpe.gguf"), progress=False)
  for text, ids in zip(bpe["texts"], bpe["tokens"]):
    assert loaded.tokenizer.encode(text) == ids
  got = np.asarray(full_logits(loaded.model, EXPECTED["bpe-prompt"][None].astype(np.int32))[0])
  assert relative_error(got, EXPECTED["bpe"]) < 1e-4
