"""PEFT LoRAs in and out, against PEFT's own logits (fixtures made by
`tests/fixtures/make_fixtures.py`), and a pool of three trained on the user's own text."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from adafuse_jax.adapters import peft
from adafuse_jax.adapters.io import load_pool
from adafuse_jax.adapters.mixture import merged_model
from adafuse_jax.errors import ModelFileError, UserError
from adafuse_jax.weights import load_model
from tests.test_adapters import logits_with
from tests.test_model import full_logits

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EXPECTED = np.load(FIXTURES / "expected.npz")
LORAS = ["peft-qv", "peft-all", "peft-mlp"]
POOL_SPEC = ",".join(str(FIXTURES / n) for n in LORAS)


@pytest.fixture(scope="module")
def base():
  return load_model(str(FIXTURES / "hf-llama3"), progress=False).model


def prompt() -> np.ndarray:
  return EXPECTED["prompt"][None].astype(np.int32)


def rel(got, want) -> float:
  return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", LORAS)
def test_one_peft_lora_gives_peft_logits_unmerged_and_merged(base, name):
  lora = load_pool(str(FIXTURES / name), base.cfg)
  assert lora.cfg.mode == "lora"
  got = logits_with(base, lora, prompt())[0][0]
  assert rel(got, EXPECTED[name]) < 1e-4
  # The fixture's LoRA really moves the logits: a loader that dropped it would fail above.
  assert rel(EXPECTED["hf-llama3"], EXPECTED[name]) > 0.1
  merged = full_logits(merged_model(base, lora), prompt())[0]
  assert rel(merged, EXPECTED[name + "-merged"]) < 1e-4


def test_several_peft_loras_become_one_pool_of_experts(base):
  pool = load_pool(POOL_SPEC, base.cfg)
  cfg = pool.cfg
  assert (cfg.mode, cfg.num_experts, cfg.rank, cfg.top_k) == ("pregated", 3, 8, 2)
  assert cfg.modules == ("q", "k", "v", "o", "gate", "up", "down")  # the union
  for e, name in enumerate(LORAS):
    lora = peft.read_lora(FIXTURES / name, base.cfg)
    for m in cfg.modules:
      a, b = (np.asarray(x) for x in pool.pool.stacked(m))
      if m in lora.A:  # the expert, zero-padded from its rank to the pool's
        np.testing.assert_array_equal(a[:, :, e, :lora.rank], lora.A[m])
        np.testing.assert_allclose(b[:, e, :lora.rank] * cfg.scale, lora.B[m], rtol=1e-6)
        assert not np.any(b[:, e, lora.rank:])
      else:  # a module this adapter lacks contributes zero
        assert not np.any(b[:, e])


def test_exported_pool_loads_back_with_the_same_logits(base, tmp_path):
  pool = load_pool(POOL_SPEC, base.cfg, seed=3)
  want = np.asarray(logits_with(base, pool, prompt())[0])
  folders = peft.export_peft(pool, tmp_path / "out", "hf-llama3")
  assert [f.name for f in folders] == ["expert-00", "expert-01", "expert-02"]
  back = load_pool(str(tmp_path / "out"), base.cfg)
  np.testing.assert_array_equal(np.asarray(logits_with(base, back, prompt())[0]), want)
  # Each exported expert is a PEFT LoRA that loads alone as its source adapter did.
  for folder, name in zip(folders, LORAS):
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "hf-llama3"
    got = logits_with(base, load_pool(str(folder), base.cfg), prompt())[0][0]
    assert rel(got, EXPECTED[name]) < 1e-4


def test_plain_lora_exports_as_one_peft_folder(base, tmp_path):
  lora = load_pool(str(FIXTURES / "peft-all"), base.cfg)
  assert peft.export_peft(lora, tmp_path / "one") == [tmp_path / "one"]
  got = logits_with(base, load_pool(str(tmp_path / "one"), base.cfg), prompt())[0][0]
  assert rel(got, EXPECTED["peft-all"]) < 1e-4


def test_shipped_tied_pool_exports_and_loads_back(default_model, tmp_path):
  pool = load_pool("default", default_model.model.cfg)
  tokens = np.asarray([default_model.tokenizer.encode("The capital of France is")], np.int32)
  want = np.asarray(logits_with(default_model.model, pool, tokens)[0])
  peft.export_peft(pool, tmp_path / "p", "HuggingFaceTB/SmolLM2-135M-Instruct")
  assert (tmp_path / "p" / "shared" / "adapter_model.safetensors").is_file()
  back = load_pool(str(tmp_path / "p"), default_model.model.cfg)
  np.testing.assert_array_equal(np.asarray(logits_with(default_model.model, back, tokens)[0]),
                                want)


def test_bad_peft_folders_are_named_errors(base, default_model, tmp_path):
  with pytest.raises(ModelFileError, match="PEFT IA3 adapter, not LoRA"):
    load_pool(str(FIXTURES / "peft-ia3"), base.cfg)
  broken = tmp_path / "nofile"
  shutil.copytree(FIXTURES / "peft-qv", broken)
  (broken / "adapter_model.safetensors").unlink()
  with pytest.raises(ModelFileError, match="lacks adapter_model.safetensors"):
    load_pool(str(broken), base.cfg)
  with pytest.raises(UserError, match="made for another base model"):
    load_pool(str(FIXTURES / "peft-qv"), default_model.model.cfg)
  with pytest.raises(ModelFileError, match="does not exist"):
    load_pool(f"{FIXTURES / 'peft-qv'},{tmp_path / 'missing'}", base.cfg)
  dora = tmp_path / "dora"
  shutil.copytree(FIXTURES / "peft-qv", dora)
  cfg = json.loads((dora / "adapter_config.json").read_text())
  (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
  with pytest.raises(ModelFileError, match="DoRA"):
    load_pool(str(dora), base.cfg)


def run_cli(*argv: str, cwd=FIXTURES) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600,
                        cwd=cwd)


@pytest.mark.parametrize("argv, words", [
    (["--model", "hf-llama3", "--adapters", "peft-ia3"], "PEFT IA3 adapter, not LoRA"),
    (["--adapters", "peft-qv"], "made for another base model"),
    (["--model", "hf-llama3", "--adapters", "peft-qv,nowhere"], "does not exist"),
])
def test_cli_bad_peft_input_is_one_error_line(argv, words):
  r = run_cli("-m", "adafuse_jax.decode", *argv, "--prompt", "hi", "--quiet")
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr
  assert "Traceback" not in r.stderr


def test_router_of_three_peft_loras_trains_on_own_data_and_decodes(tmp_path):
  data = tmp_path / "data"
  text = (FIXTURES.parent / "data" / "GPL-3.txt").read_text()
  for i, domain in enumerate(("preamble", "terms", "howto")):
    (data / domain).mkdir(parents=True)
    part = text[i * len(text) // 3:(i + 1) * len(text) // 3]
    for j in range(4):
      (data / domain / f"{j}.txt").write_text(part[j * len(part) // 4:(j + 1) * len(part) // 4])
  out = tmp_path / "pool"
  r = run_cli("-m", "adafuse_jax.train", "fit", "--model", "hf-llama3", "--data", str(data),
              "--adapters", "peft-qv,peft-all,peft-mlp", "--workdir", str(tmp_path / "w"),
              "--steps", "30", "--batch", "4", "--seq-len", "32", "--eval-every", "30",
              "--checkpoint-every", "30", "--export", str(out), "--quiet")
  assert r.returncode == 0, r.stderr
  report = json.loads(r.stdout)
  assert report["mode"] == "pregated" and report["step"] == 30
  assert report["domains"] == ["howto", "preamble", "terms"]
  assert all(np.isfinite(v) for v in report["heldout_ppl"].values())
  base = load_model(str(FIXTURES / "hf-llama3"), progress=False).model
  start, trained = load_pool(POOL_SPEC, base.cfg), load_pool(str(out), base.cfg)
  for m in start.cfg.modules:  # only the router trained
    for x, y in zip(start.pool.stacked(m), trained.pool.stacked(m)):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
  r = run_cli("-m", "adafuse_jax.decode", "--model", "hf-llama3", "--adapters", str(out),
              "--prompt", "Everyone is permitted", "--max-new-tokens", "4", "--show-routing",
              "--quiet")
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("experts [") == 4


def test_own_data_errors_are_named(tmp_path):
  from adafuse_jax.train.data import user_documents

  with pytest.raises(UserError, match="does not exist"):
    user_documents(tmp_path / "nope")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
  with pytest.raises(UserError, match="line 2"):
    user_documents(bad)
  (tmp_path / "d" / "x").mkdir(parents=True)
  (tmp_path / "d" / "x" / "a.bin").write_bytes(b"\xff\xfe\x00bad")
  with pytest.raises(UserError, match="not UTF-8"):
    user_documents(tmp_path / "d")
  good = tmp_path / "good.jsonl"
  good.write_text('{"text": "a", "domain": "x"}\n\n{"text": "b"}\n')
  assert {k: len(v) for k, v in user_documents(good).items()} == {"x": 1, "text": 1}


def test_cli_bad_model_files_are_one_error_line(tmp_path):
  """The issue's other bad inputs through the CLI: a PEFT folder without its safetensors, a GGUF
  whose tokenizer is unsupported, an HF folder of another architecture."""
  import gguf

  nofile = tmp_path / "nofile"
  shutil.copytree(FIXTURES / "peft-qv", nofile)
  (nofile / "adapter_model.safetensors").unlink()
  other = tmp_path / "qwen"
  shutil.copytree(FIXTURES / "hf-default", other)
  cfg = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2ForCausalLM"]}))
  bad_gguf = tmp_path / "bert-tok.gguf"
  reader = gguf.GGUFReader(str(FIXTURES / "bpe.gguf"))
  writer = gguf.GGUFWriter(str(bad_gguf), arch="llama")
  for field in reader.fields.values():
    if field.name.startswith("GGUF.") or field.name == "general.architecture":
      continue
    value = field.contents()
    if field.name == "tokenizer.ggml.model":
      value = "bert"
    writer.add_key_value(field.name, value, field.types[0],
                         sub_type=field.types[-1] if len(field.types) > 1 else None)
  for t in reader.tensors:
    writer.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape.tolist())),
                      raw_dtype=t.tensor_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  cases = [(["--model", "hf-llama3", "--adapters", str(nofile)], "lacks adapter_model.safetensors"),
           (["--model", str(other)], "architecture 'Qwen2ForCausalLM'"),
           (["--model", str(bad_gguf)], "tokenizer model 'bert'")]
  for argv, words in cases:
    r = run_cli("-m", "adafuse_jax.decode", *argv, "--prompt", "hi", "--quiet")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and words in lines[0], lines[0]
