"""`python -m adafuse_jax.decode`: output, JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "adafuse_jax.decode", *args], capture_output=True,
                        text=True, timeout=timeout)


def test_json_chat_answer_and_figures():
  out = run_cli("--chat", "--json", "--max-new-tokens", "20", "What is 2+2?")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert "4" in result["completions"][0]
  assert result["prompt_tokens"][0] > 10 and result["decode_ms_per_token"] > 0
  assert result["prefill_ms"] > 0 and result["tokens_per_s"] > 0
  assert result["attention"] == "xla"  # "auto" on the CPU: the kernel only runs interpreted


def test_chat_with_the_shipped_pool_ends_its_turn():
  """The pool trained on raw text alone answered "2 + 2 = 4" and went on with "\\n\\nuser\\n
  What is ..." (stop reason length); the shipped pool, tuned with the backbone's own chats
  (docs/training/chat-tuned), ends its turn with EOS and writes no next turn."""
  out = run_cli("--chat", "--json", "--adapters", "default", "--max-new-tokens", "64",
                "What is 2 + 2?")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result["stop_reasons"] == ["eos"], result
  assert "\nuser\n" not in result["completions"][0], result


def test_streaming_prints_text_then_one_figures_line():
  out = run_cli("--max-new-tokens", "8", "--quiet", "--prompt", "The capital of France is")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("The capital of France is") and "Paris" in lines[0]
  assert "prefill" in lines[-1] and "ms/token" in lines[-1] and "tokens/s" in lines[-1]


def test_a_long_prompt_is_not_echoed_whole():
  from adafuse_jax.decode import ECHO_CHARS, echo

  long = "a" * 5000 + "THE END"
  shown = echo(long)
  assert len(shown) < ECHO_CHARS + 60 and shown.endswith("THE END") and "4607 characters" in shown
  assert echo("short") == "short"


@pytest.mark.parametrize("args, message", [
    ((" ",), "empty prompt"),
    (("--model", "/nonexistent/model.gguf", "hi"), "does not exist"),
    (("--model", "no-such-model", "hi"), "unknown --model"),
    (("--temperature", "-1", "hi"), "temperature"),
    (("--max-new-tokens", "0", "hi"), "max_new_tokens"),
    (("x " * 9000,), "context is 8192"),
    ((b"caf\xe9".decode("utf-8", "surrogateescape"),), "not valid UTF-8"),
    (("--compile-cache", "/proc/no-such-dir", "hi"), "cannot write there"),
])
def test_bad_input_is_one_line_error_exit_2(args, message):
  out = run_cli(*args)
  assert out.returncode == 2, (out.stdout, out.stderr)
  assert "Traceback" not in out.stderr
  error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], out.stderr
  assert out.stderr.rstrip().endswith(error_lines[0])
  assert len(out.stdout) < 200  # a long prompt is never echoed back


@pytest.mark.parametrize("ask", ["batch", "pool"])
def test_running_out_of_device_memory_is_one_error_line(ask, tmp_path):
  """A batch whose KV cache, or a random pool whose experts, the device cannot hold: XLA's
  out-of-memory error (a real one: the allocation fails) as one `error:` line that says what to
  ask for less of, exit code 2 (the pool's once aborted the process on the CPU)."""
  if ask == "batch":
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n" * 100_000)
    args = ("--prompts-file", str(prompts), "--max-new-tokens", "8000")
  else:
    args = ("--mode", "pregated", "--adapters", "random", "--experts", "4000000", "--rank",
            "64", "--max-new-tokens", "2", "hi")
  out = run_cli(*args, "--quiet")
  assert out.returncode == 2, (out.stdout[-500:], out.stderr[-2000:])
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the device ran out of memory (") and "--max-new-tokens" in last


def test_only_user_errors_and_xla_out_of_memory_become_error_lines():
  """`errors.as_user_error`: a UserError as itself; XLA's RESOURCE_EXHAUSTED (a real failed
  allocation) as a DeviceMemoryError naming the request and the advice; anything else None (a
  bug keeps its traceback)."""
  import jax
  import jax.numpy as jnp

  from adafuse_jax.errors import DeviceMemoryError, UserError, as_user_error

  bad = UserError("bad input")
  assert as_user_error(bad, "advice") is bad
  with pytest.raises(jax.errors.JaxRuntimeError) as oom:
    jnp.zeros((2**42,), jnp.float32).block_until_ready()
  error = as_user_error(oom.value, "ask for less")
  assert isinstance(error, DeviceMemoryError) and isinstance(error, UserError)
  assert str(error).startswith("the device ran out of memory (Out of memory allocating")
  # On a GPU the line also says how much of the GPU JAX takes.
  assert str(error).endswith("; ask for less" if jax.default_backend() == "cpu"
                             else "XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. 0.9) allows more")
  # A library call's DeviceMemoryError (its parameters' advice) gets the command's advice.
  try:
    raise DeviceMemoryError("the device ran out of memory (...); max_new_tokens") from oom.value
  except DeviceMemoryError as library_error:
    again = as_user_error(library_error, "ask for less")
  assert isinstance(again, DeviceMemoryError) and str(again) == str(error)
  assert as_user_error(ValueError("a bug"), "advice") is None
  assert as_user_error(RuntimeError("RESOURCE_EXHAUSTED: not XLA's"), "advice") is None


def test_a_second_run_loads_its_programs_from_the_compile_cache(tmp_path):
  """`--compile-cache DIR` keeps the compiled programs (JAX's persistent cache): the second run
  writes nothing new there and decodes the same tokens."""
  args = ("--json", "--max-new-tokens", "6", "--compile-cache", str(tmp_path), "Hello")
  first = run_cli(*args)
  assert first.returncode == 0, first.stderr
  programs = sorted(p.name for p in tmp_path.glob("*-cache"))
  assert programs, "nothing was cached"
  second = run_cli(*args)
  assert second.returncode == 0, second.stderr
  assert sorted(p.name for p in tmp_path.glob("*-cache")) == programs
  assert json.loads(second.stdout)["completions"] == json.loads(first.stdout)["completions"]


def test_compile_cache_auto_uses_the_cache_home_and_off_is_off(tmp_path, monkeypatch):
  """auto: $XDG_CACHE_HOME/adafuse-jax/xla on the CPU too, and no cache (not an error) where that
  cannot be written; off switches nothing on."""
  import jax

  from adafuse_jax import compile_cache

  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert compile_cache.from_option("off") is None
    assert not jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.from_option("auto") == tmp_path / "adafuse-jax" / "xla"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "adafuse-jax" / "xla")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-dir")
    assert compile_cache.from_option("auto") is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_help_documents_every_option():
  out = run_cli("--help")
  assert out.returncode == 0
  for flag in ("--chat", "--model", "--dtype", "--max-new-tokens", "--temperature", "--top-p",
               "--seed", "--json", "--compile-cache", "--attention"):
    assert flag in out.stdout


def test_lora_merged_once_equals_unmerged(default_model):
  from adafuse_jax.adapters.io import resolve_adapters
  from adafuse_jax.config import AdapterConfig
  from adafuse_jax.generation import Generator, generate

  # (--show-routing of a pre-gated pool: test_auto_measures_the_candidates_and_says_what_it_chose)
  merged = run_cli("--json", "--mode", "lora", "--adapters", "random:3", "--path", "merged",
                   "--rank", "4", "--max-new-tokens", "4", "Hello")
  assert merged.returncode == 0, merged.stderr
  # The same LoRA unmerged, in this process (the CLI's default path, packed).
  model, tok = default_model.model, default_model.tokenizer
  lora = resolve_adapters("random:3", AdapterConfig(mode="lora", rank=4), model.cfg, seed=3)
  res = generate(Generator(model, adapters=lora, path="packed"), [tok.encode("Hello")],
                 max_new_tokens=4, stop_ids=tok.eos_ids, pad_id=min(tok.eos_ids))
  assert json.loads(merged.stdout)["completions"] == [tok.decode(res.tokens[0])]


@pytest.mark.parametrize("args, message", [
    (("--mode", "layerwise", "hi"), "needs adapters"),
    (("--mode", "pregated", "--adapters", "random", "--top-k", "9", "hi"), "larger than num_experts"),
    (("--mode", "layerwise", "--adapters", "random", "--path", "merged", "hi"),
     "path 'merged': merged decoding switches pre-gated experts"),
    (("--mode", "layerwise", "--adapters", "random", "--merge", "hi"), "cannot merge"),
    (("--adapters", "/no/such/ckpt", "--mode", "pregated", "hi"), "does not exist"),
    (("--mode", "pregated", "--adapters", "random", "--merge", "--implementation", "auto", "hi"),
     "drop one"),
    (("--path", "auto", "hi"), "needs --adapters"),
    (("--implementation", "auto", "hi"), "needs --adapters"),
    (("--mode", "pregated", "--adapters", "random", "--merge", "--implementation", "packed", "hi"),
     "--implementation packed applies them unmerged"),
    (("--path", "packed", "--implementation", "xla", "hi"), "pass only --path"),
    (("--mode", "pregated", "--adapters", "random", "--implementation", "cuda", "hi"),
     "unknown --implementation 'cuda'"),
    (("--adapters", "default", "--sere-rho", "1.5", "hi"), "--sere-rho 1.5 must be in [0, 1]"),
    (("--adapters", "default", "--sere-rho", "0.2", "--sere-primary", "3", "hi"),
     "--sere-primary 3 must be in [1, top-k = 2]"),
    (("--adapters", "random", "--sere-rho", "0.2", "hi"), "has no SERE similarity file"),
    (("--sere-rho", "0.2", "hi"), "needs a pre-gated pool"),
    (("--adapters", "default", "--sere-rho", "high", "hi"),
     "--sere-rho: 'high' is neither a number in [0, 1] nor 'auto'"),
    (("--adapters", "random", "--sere-rho", "auto", "hi"), "reads the SERE sweep saved beside"),
    (("--attention", "flash", "hi"), "argument --attention: invalid choice: 'flash'"),
    (("--adapters", "default", "--top-k", "3", "--rank", "4", "hi"),
     "--rank 4, --top-k 3 shape random pools, but the pool 'default' fixes its own"),
])
def test_bad_adapter_arguments_exit_2(args, message):
  out = run_cli(*args)
  assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_auto_measures_the_candidates_and_says_what_it_chose():
  out = run_cli("--json", "--mode", "pregated", "--adapters", "random:2", "--path",
                "auto", "--max-new-tokens", "3", "--experts", "4", "--rank", "4",
                "--adapt-modules", "q,v", "--show-routing", "The capital of France is")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  auto = result["auto"]
  # On the CPU: plain XLA, packed and (one pre-gated prompt, q/v adapted) the merged switch.
  assert set(auto["expected_ms"]) == {"pregated-xla", "pregated-packed", "pregated-merged"}
  assert all(t > 0 for t in auto["expected_ms"].values())
  assert auto["path"] == min(auto["expected_ms"], key=auto["expected_ms"].get) == result["path"]
  assert 0.0 <= auto["switch_rate"] <= 1.0 and auto["path"] in auto["reason"]
  assert result["generated_tokens"] == [3]
  assert len(result["routing"]) == 3  # --show-routing: experts and gates per generated token
  for row in result["routing"]:
    assert len(row["experts"]) == 2 and abs(sum(row["gates"]) - 1) < 1e-2


def test_shipped_pool_is_trained_and_decodes_merged_as_unmerged(default_model):
  """`--adapters default`: the tied pool (docs/training/gpu-1000-all, chat-tuned) loads, lowers the loss on
  Python source (its code domain is the standard library's) well below the backbone's, and
  switching its experts into the weights (--path merged) writes the same greedy tokens as applying
  them unmerged."""
  import argparse
  import collections
  import inspect
  import json as json_module
  import textwrap

  import jax.numpy as jnp
  import numpy as np

  from adafuse_jax.adapters.io import DEFAULT_POOL, read_adapter_config, resolve_adapters
  from adafuse_jax.train.loop import forward_loss

  cfg, _ = read_adapter_config(DEFAULT_POOL)
  assert (cfg.mode, cfg.tied_shared, cfg.num_experts, cfg.rank, cfg.top_k) == (
      "pregated", True, 8, 8, 2)
  model, tok = default_model.model, default_model.tokenizer
  pool = resolve_adapters("default", cfg, model.cfg)
  # 256 tokens from inside each of four modules: on the CPU the pool's mean cross-entropy is
  # 0.22 nats below the backbone's (0.06 to 0.34 per module); an untrained pool would be level.
  windows = jnp.asarray(np.stack([
      np.asarray(tok.encode(inspect.getsource(m))[1000:1257], np.int32)
      for m in (json_module.encoder, textwrap, argparse, collections)]))
  backbone_ce = float(forward_loss(model, None, windows)[0])
  pool_ce = float(forward_loss(model, pool, windows)[0])
  assert pool_ce < backbone_ce - 0.1, (pool_ce, backbone_ce)

  outs = [run_cli("--json", "--adapters", "default", *path, "--max-new-tokens", "8",
                  "def fibonacci(n):") for path in ((), ("--path", "merged"))]
  for out in outs:
    assert out.returncode == 0, out.stderr
  unmerged, merged = (json.loads(o.stdout)["completions"] for o in outs)
  assert unmerged == merged and len(unmerged[0]) > len("def fibonacci(n):")


def test_earlier_spellings_still_run_and_name_the_new_one(capsys):
  """The decode CLI of earlier versions: `--implementation X` and `--merge` mean `--path ...`,
  with a note naming the new spelling; one of them end to end."""
  from adafuse_jax.decode import _path, build_parser

  for old, new in ((("--implementation", "xla"), ("xla", "auto")),
                   (("--implementation", "pallas"), ("gathered", "auto")),
                   (("--merge",), ("merged", "auto")),
                   (("--merge", "--implementation", "xla"), ("merged", "xla"))):
    assert _path(build_parser().parse_args([*old, "hi"])) == new
    assert f"now spelled --path {new[0]}" in capsys.readouterr().err
  assert _path(build_parser().parse_args(["--path", "gathered", "hi"])) == ("gathered", "auto")
  out = run_cli("--json", "--mode", "pregated", "--adapters", "random:1", "--experts", "4",
                "--rank", "4", "--adapt-modules", "q,v", "--merge", "--max-new-tokens", "2", "Hi")
  assert out.returncode == 0, out.stderr
  assert "now spelled --path merged" in out.stderr and json.loads(out.stdout)["path"] == "merged"


def test_a_prompts_file_that_is_not_utf8_is_one_error_line(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_bytes(b"hello\ncaf\xe9 au lait\n")
  out = run_cli("--prompts-file", str(path))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [
      f"error: --prompts-file {str(path)!r} is not UTF-8 text (byte 9); save it as UTF-8"]


def test_sere_rho_auto_takes_the_setting_the_shipped_pools_sweep_recommends():
  from adafuse_jax.adapters.io import DEFAULT_POOL
  from adafuse_jax.adapters.sere import load_recommendation

  best, budget = load_recommendation(DEFAULT_POOL)
  out = run_cli("--adapters", "default", "--sere-rho", "auto", "--json", "--max-new-tokens", "4",
                "--prompt", "def fibonacci(n):", "--prompt", "The capital of France is")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  if best is None:  # the sweep found nothing to save within its budget: SERE off, said so
    assert result.get("sere") is None and f"within +{budget:g}% perplexity" in out.stderr
  else:
    assert result["sere"] == {"rho": best["rho"], "primary": best["primary_k"]}
    assert best["ppl_cost_pct"] <= budget


def test_sere_runs_from_the_command_line_with_the_pools_similarity():
  out = run_cli("--adapters", "default", "--sere-rho", "0", "--json", "--max-new-tokens", "6",
                "--prompt", "def fibonacci(n):", "--prompt", "The capital of France is")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result["sere"] == {"rho": 0.0, "primary": 1}
  # Two rows of top-2 choices: at most 4 experts a step, and rho 0 keeps only the primaries.
  assert 1 <= result["distinct_experts_per_step"] <= 2
  assert all(n > 0 for n in result["generated_tokens"])


def test_sere_with_path_auto_measures_the_unmerged_paths_re_routing():
  """`--path auto` with SERE: the merged switch is left out (it cannot re-route), the other
  candidates are measured with SERE on, and the run reads what SERE leaves."""
  out = run_cli("--adapters", "default", "--sere-rho", "0", "--path", "auto", "--json",
                "--max-new-tokens", "3", "--prompt", "def fibonacci(n):")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  auto = result["auto"]
  assert set(auto["expected_ms"]) == {"pregated-xla", "pregated-packed"}  # the CPU's candidates
  assert "SERE re-routes unmerged steps only" in auto["details"]["pregated-merged"]["skipped"]
  assert "pregated-merged (SERE re-routes unmerged steps only)" in auto["reason"]
  assert result["path"] == min(auto["expected_ms"], key=auto["expected_ms"].get)
  assert result["sere"] == {"rho": 0.0, "primary": 1}
  assert result["distinct_experts_per_step"] == 1  # one row, rho 0: its primary alone


def test_sere_on_a_path_that_reads_every_expert_gets_a_note():
  import jax.numpy as jnp

  from adafuse_jax.adapters.sere import SereSettings
  from adafuse_jax.cli_options import sere_path_note
  from adafuse_jax.config import AdapterConfig

  cfg = AdapterConfig(mode="pregated", num_experts=8, rank=16, top_k=2)
  sere = SereSettings(similarity=jnp.eye(8), primary_k=1, rho=0.0)
  note = sere_path_note("packed", cfg, sere)
  assert "path 'packed' reads all 8 experts at every step" in note and "'gathered'" in note
  assert sere_path_note("gathered", cfg, sere) is None  # reads the step's experts only
  assert sere_path_note("packed", cfg, None) is None
