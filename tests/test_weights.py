"""Loaders and the tokenizer: GGUF (real), Hugging Face folders (written here), bad files."""

from __future__ import annotations

import dataclasses

import json
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from adafuse_jax.errors import ModelFileError, UserError
from adafuse_jax.weights import load_model
from tests import numpy_reference
from tests.conftest import tiny_config
from tests.test_model import full_logits


@pytest.mark.parametrize("text", [
    "Hello, world!", "naïve café — 日本語テキスト 🚀 emoji", "def f(x):\n\treturn x ** 2  # sq\n",
    "1234567890 and 3.14159", "   leading and trailing spaces   ", "tabs\tand\n\nnewlines\r\n"])
def test_tokenizer_round_trip(default_model, text):
  tok = default_model.tokenizer
  assert tok.decode(tok.encode(text)) == text


def test_tokenizer_splits_digits_one_by_one(default_model):
  tok = default_model.tokenizer
  ids = tok.encode("12345")
  assert len(ids) == 5
  assert [tok.decode([i]) for i in ids] == list("12345")


def test_chat_template_special_tokens_map_to_their_ids(default_model):
  tok = default_model.tokenizer
  text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
  ids = tok.encode(text)
  assert ids[0] == 1  # <|im_start|>
  assert ids.count(1) == 3 and ids.count(2) == 2  # system, user, assistant / two <|im_end|>
  assert tok.token_to_id("<|im_end|>") == 2 and 2 in tok.eos_ids
  assert text.endswith("<|im_start|>assistant\n")


def test_chat_turn_ends_at_any_marker_the_template_writes(default_model):
  """A reply ends at EOS and at every special token the chat template writes: a model that
  writes `<|im_start|>` has begun the next turn (the shipped pool did, with `\\nuser\\n...`)."""
  tok = default_model.tokenizer
  assert tok.chat_stop_ids == tok.eos_ids | {tok.token_to_id("<|im_start|>")}
  assert {tok.decode([i], skip_special=False) for i in tok.chat_stop_ids} == {
      "<|im_start|>", "<|im_end|>"}
  plain = dataclasses.replace(tok, chat_template=None)
  assert plain.chat_stop_ids == tok.eos_ids


def test_greedy_chat_answer_makes_sense(default_model):
  from adafuse_jax.generation import Generator, generate

  tok = default_model.tokenizer
  ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]))
  res = generate(Generator(default_model.model), [ids], max_new_tokens=24, stop_ids=tok.eos_ids,
                 pad_id=2)
  answer = tok.decode(res.tokens[0])
  assert res.stop_reasons == ["eos"]
  assert "4" in answer and "answer" in answer.lower(), answer


def _write_hf_folder(folder: pathlib.Path, cfg, rng, shards: int = 1, nan: bool = False):
  """A random Llama checkpoint in Hugging Face layout (weights [out, in])."""
  t = {"model.embed_tokens.weight": rng.normal(size=(cfg.vocab_size, cfg.hidden)),
       "model.norm.weight": 1 + 0.1 * rng.normal(size=cfg.hidden),
       "lm_head.weight": rng.normal(size=(cfg.vocab_size, cfg.hidden)) * 0.1}
  hf = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "down": "mlp.down_proj"}
  for l in range(cfg.layers):
    for name, (i, o) in cfg.linear_shapes().items():
      t[f"model.layers.{l}.{hf[name]}.weight"] = rng.normal(size=(o, i)) / np.sqrt(i)
    t[f"model.layers.{l}.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=cfg.hidden)
    t[f"model.layers.{l}.post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=cfg.hidden)
  if nan:
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
  t = {k: v.astype(np.float32) for k, v in t.items()}
  names = sorted(t)
  if shards == 1:
    save_file(t, str(folder / "model.safetensors"))
  else:
    weight_map = {}
    for s in range(shards):
      part = names[s::shards]
      fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      save_file({k: t[k] for k in part}, str(folder / fname))
      weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (folder / "config.json").write_text(json.dumps({
      "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
      "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
      "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.ffn,
      "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_base,
      "max_position_embeddings": cfg.max_context, "tie_word_embeddings": False,
      "eos_token_id": 2}))
  return t


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_loads_and_matches_numpy_reference(tmp_path, shards):
  cfg = tiny_config()
  raw = _write_hf_folder(tmp_path, cfg, np.random.default_rng(shards), shards=shards)
  loaded = load_model(str(tmp_path), progress=False)
  assert loaded.model.cfg.replace(name="tiny") == cfg
  w = {"embed": raw["model.embed_tokens.weight"], "final_norm": raw["model.norm.weight"],
       "lm_head": raw["lm_head.weight"]}
  hf = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
  for l in range(cfg.layers):
    for n, h in hf.items():
      w[f"{l}.{n}"] = raw[f"model.layers.{l}.{h}.weight"].astype(np.float64)
  tokens = np.array([5, 17, 3, 88, 42, 9, 61], np.int32)
  ref = numpy_reference.forward(tokens, w, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                                eps=cfg.rms_eps, base=cfg.rope_base, interleaved=False, tied=False)
  got = np.asarray(full_logits(loaded.model, tokens[None])[0])
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_hf_folder_with_nan_weight_is_rejected(tmp_path):
  _write_hf_folder(tmp_path, tiny_config(), np.random.default_rng(0), nan=True)
  with pytest.raises(ModelFileError, match="'up'.*NaN"):
    load_model(str(tmp_path), progress=False)


def test_hf_folder_without_config_is_rejected(tmp_path):
  with pytest.raises(ModelFileError, match="config.json"):
    load_model(str(tmp_path), progress=False)


def test_missing_and_unknown_models_are_rejected(tmp_path):
  with pytest.raises(ModelFileError, match="does not exist"):
    load_model(str(tmp_path / "nope.gguf"), progress=False)
  with pytest.raises(UserError, match="unknown --model"):
    load_model("not-a-model", progress=False)


def test_truncated_gguf_is_rejected(tmp_path):
  from adafuse_jax.weights import default_model_path

  src = pathlib.Path(default_model_path()).read_bytes()
  for cut in (1000, len(src) // 2):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(src[:cut])
    with pytest.raises(ModelFileError, match="truncated|corrupt"):
      load_model(str(bad), progress=False)


def _same_fields_and_tensors(fast, stock) -> None:
  assert list(fast.fields) == list(stock.fields)
  for key, field in stock.fields.items():
    want = field.contents()
    want = want.tolist() if hasattr(want, "tolist") else want
    assert fast.fields[key].contents() == want, key
    assert len(fast.fields[key].data) == len(field.data), key
  assert [t.name for t in fast.tensors] == [t.name for t in stock.tensors]
  for a, b in zip(fast.tensors, stock.tensors):
    np.testing.assert_array_equal(a.data, b.data)


def test_fast_gguf_reader_reads_what_the_stock_reader_reads(tmp_path):
  from adafuse_jax.weights import default_model_path
  from adafuse_jax.weights.gguf import _FastReader

  path = tmp_path / "arrays.gguf"
  writer = gguf.GGUFWriter(str(path), arch="llama")
  writer.add_array("test.strings", ["a", "", "héllo wörld", "Ġthe", "\n\t"])
  writer.add_array("test.ints", [1, -2, 3])
  writer.add_array("test.floats", [0.5, -1.25])
  writer.add_array("test.bools", [True, False, True])
  writer.add_string("test.name", "ünïcode")
  writer.add_uint32("test.count", 7)
  writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  for p in (str(path), str(default_model_path())):
    _same_fields_and_tensors(_FastReader(p), gguf.GGUFReader(p))


def test_non_llama_gguf_is_rejected(tmp_path):
  path = tmp_path / "gpt2.gguf"
  writer = gguf.GGUFWriter(str(path), arch="gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ModelFileError, match="'gpt2'.*only Llama"):
    load_model(str(path), progress=False)


def test_preset_builds_seeded_random_model_without_tokenizer():
  a = load_model("smollm2-135m", seed=7, progress=False)
  b = load_model("smollm2-135m", seed=7, progress=False)
  assert a.tokenizer is None
  np.testing.assert_array_equal(a.model.linear_weight("q"), b.model.linear_weight("q"))
  assert float(jnp.std(a.model.linear_weight("q"))) > 0


def _write_llama_gguf(path: pathlib.Path, cfg, *, drop: tuple[str, ...] = (), tok_model="gpt2",
                      pre: str | None = None, **override) -> None:
  """A tiny random Llama GGUF written by the gguf package, with a byte-level BPE vocabulary;
  `drop` leaves metadata keys out and `override` replaces their values (damaged files)."""
  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(str(path), arch="llama")
  meta = {"llama.block_count": cfg.layers, "llama.context_length": cfg.max_context,
          "llama.embedding_length": cfg.hidden, "llama.feed_forward_length": cfg.ffn,
          "llama.attention.head_count": cfg.heads, "llama.attention.head_count_kv": cfg.kv_heads,
          "llama.attention.layer_norm_rms_epsilon": cfg.rms_eps}
  meta.update(override)
  for key, value in meta.items():
    if key in drop:
      continue
    (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
  if "tokenizer.ggml.tokens" not in drop:
    writer.add_tokenizer_model(tok_model)
    if pre is not None:
      writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, cfg.vocab_size)])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(2)
  t = {"token_embd.weight": rng.normal(size=(cfg.vocab_size, cfg.hidden)),
       "output_norm.weight": np.ones(cfg.hidden)}
  names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
           "up": "ffn_up", "down": "ffn_down"}
  for l in range(cfg.layers):
    for name, (i, o) in cfg.linear_shapes().items():
      t[f"blk.{l}.{names[name]}.weight"] = rng.normal(size=(o, i)) / np.sqrt(i)
    t[f"blk.{l}.attn_norm.weight"] = np.ones(cfg.hidden)
    t[f"blk.{l}.ffn_norm.weight"] = np.ones(cfg.hidden)
  for name, arr in t.items():
    writer.add_tensor(name, arr.astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("drop, override, words", [
    ((), {}, None),
    (("tokenizer.ggml.tokens",), {}, "lacks 'tokenizer.ggml.tokens'"),
    ((), {"llama.attention.head_count": 0}, "must be positive"),
    ((), {"llama.embedding_length": 40}, "disagree"),
    ((), {"llama.attention.head_count_kv": 4}, "must be a multiple of kv_heads"),
    (("llama.feed_forward_length",), {}, "lacks 'llama.feed_forward_length'"),
])
def test_damaged_gguf_metadata_is_a_named_error(tmp_path, drop, override, words):
  path = tmp_path / "tiny.gguf"
  _write_llama_gguf(path, tiny_config(), drop=drop, **override)
  if words is None:  # the undamaged file loads
    assert load_model(str(path), progress=False).model.cfg.hidden == tiny_config().hidden
    return
  with pytest.raises(ModelFileError, match=words):
    load_model(str(path), progress=False)


@pytest.mark.parametrize("change, words", [
    ({"num_attention_heads": None}, "lacks integer num_attention_heads"),
    ({"num_attention_heads": 0}, "must be positive|ZeroDivisionError"),
    ({"hidden_size": 40}, "disagree"),
])
def test_damaged_hf_config_is_a_named_error(tmp_path, change, words):
  _write_hf_folder(tmp_path, tiny_config(), np.random.default_rng(0))
  config = json.loads((tmp_path / "config.json").read_text())
  config.update(change)
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                    if v is not None}))
  with pytest.raises(ModelFileError, match=words):
    load_model(str(tmp_path), progress=False)


def test_fuzzed_gguf_files_load_finite_or_fail_by_name(tmp_path):
  """Truncations and bit flips at seeded offsets of a tiny GGUF written by the gguf package:
  each loads and runs to finite logits, or is a ModelFileError; the source is never touched."""
  from adafuse_jax.model import KVCache

  good = tmp_path / "good.gguf"
  _write_llama_gguf(good, tiny_config())
  data = good.read_bytes()
  rng = np.random.default_rng(1234)
  outcomes = {"loaded": 0, "named": 0}
  for case in range(40):
    bad = bytearray(data)
    if case % 4 == 0:
      bad = bad[:int(rng.integers(0, len(data)))]
    else:
      for _ in range(int(rng.integers(1, 4))):
        at = int(rng.integers(0, len(bad)))
        bad[at] ^= 1 << int(rng.integers(0, 8))
    path = tmp_path / f"case{case}.gguf"
    path.write_bytes(bytes(bad))
    try:
      loaded = load_model(str(path), progress=False)
    except ModelFileError:
      outcomes["named"] += 1
      continue
    cache = KVCache.create(loaded.model.cfg, 1, 8, loaded.model.dtype)
    logits, _ = loaded.model(jnp.asarray([[1, 2, 3]], jnp.int32), cache)
    assert np.isfinite(np.asarray(logits)).all(), f"case {case} loaded to non-finite logits"
    outcomes["loaded"] += 1
  assert good.read_bytes() == data
  assert outcomes["named"] >= 10 and sum(outcomes.values()) == 40


def test_gguf_pre_tokenizers_split_as_named(tmp_path):
  """A Llama-3 GGUF (`llama-bpe`) splits digits in threes, as its tokenizer.json does; the
  GPT-2 rule (`default`) keeps them whole."""
  splits = {}
  for pre in ("llama-bpe", "default", "smollm"):
    _write_llama_gguf(tmp_path / f"{pre}.gguf", tiny_config(), pre=pre)
    tok = load_model(str(tmp_path / f"{pre}.gguf"), progress=False).tokenizer
    splits[pre] = [w for w, _ in tok.backend.pre_tokenizer.pre_tokenize_str("12345 abc")]
  assert splits == {"llama-bpe": ["123", "45", "Ġabc"], "default": ["12345", "Ġabc"],
                    "smollm": ["1", "2", "3", "4", "5", "Ġabc"]}


@pytest.mark.parametrize("kw, words", [({"pre": "qwen2"}, "pre-tokenizer 'qwen2'"),
                                       ({"tok_model": "llama"}, "lacks tokenizer.ggml.scores"),
                                       ({"tok_model": "bert"}, "tokenizer model 'bert'")])
def test_unsupported_gguf_tokenizer_is_a_named_error(tmp_path, kw, words):
  _write_llama_gguf(tmp_path / "t.gguf", tiny_config(), **kw)
  with pytest.raises(ModelFileError, match=words):
    load_model(str(tmp_path / "t.gguf"), progress=False)
