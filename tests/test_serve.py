"""The OpenAI-compatible server, driven by the real `openai` client over loopback (CPU, the
default model and its shipped pool)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from adafuse_jax import decode
from adafuse_jax.adapters.io import load_pool
from adafuse_jax.generation import Generator
from adafuse_jax.model import LlamaModel
from adafuse_jax.serving import Engine
from adafuse_jax.serving.api import create_app
from adafuse_jax.weights.tokenizer import byte_tokenizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.xdist_group("server")

CONTEXT = 128
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at",
           "Once upon a time, in a land far away, there lived", "import numpy as np\n",
           "The three primary colors are", "SELECT * FROM", "My favourite season is"]


@contextlib.contextmanager
def serving(engines: dict[str, Engine]) -> Iterator[str]:
  """The engines started and served over loopback by uvicorn in a thread; yields the URL."""
  for e in engines.values():
    e.start()
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  srv = uvicorn.Server(uvicorn.Config(create_app(engines, max_body_bytes=1 << 20),
                                      log_level="warning"))
  thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  while not srv.started:
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    srv.should_exit = True
    thread.join(timeout=30)
    for e in engines.values():
      e.stop()


@pytest.fixture(scope="module")
def server(default_model):
  model, tok = default_model.model, default_model.tokenizer
  pool = load_pool("default", model.cfg)
  engines = {"smollm2": Engine(Generator(model), tok, name="smollm2", max_batch=4,
                               max_seq_len=CONTEXT, chunk=32),
             "default": Engine(Generator(model, adapters=pool), tok, name="default", max_batch=32,
                               max_seq_len=CONTEXT, chunk=32)}
  with serving(engines) as url:
    yield url, engines


def client(url: str) -> openai.OpenAI:
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def complete(url: str, prompt: str, max_tokens: int, model: str = "default") -> str:
  out = client(url).completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0)
  return out.choices[0].text


def decode_cli(capsys, *args: str) -> dict:
  assert decode.main(["--json", "--quiet", *args]) == 0
  return json.loads(capsys.readouterr().out)


def test_models_lists_the_backbone_and_each_pool(server):
  url, _ = server
  names = {m.id for m in client(url).models.list().data}
  assert names == {"smollm2", "default"}
  assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_greedy_completion_equals_the_decode_cli(server, capsys):
  url, _ = server
  cli = decode_cli(capsys, "--adapters", "default", "--max-new-tokens", "16", PROMPTS[1])
  out = client(url).completions.create(model="default", prompt=PROMPTS[1], max_tokens=16,
                                       temperature=0)
  assert out.choices[0].text == cli["completions"][0]
  assert out.usage.prompt_tokens == cli["prompt_tokens"][0]
  assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
  # The backbone alone, as a model name of its own.
  cli = decode_cli(capsys, "--max-new-tokens", "8", PROMPTS[0])
  assert complete(url, PROMPTS[0], 8, model="smollm2") == cli["completions"][0]


def test_streaming_completion_and_chat_match_the_whole_answer(server, capsys):
  url, _ = server
  c = client(url)
  whole = c.completions.create(model="default", prompt=PROMPTS[3], max_tokens=12, temperature=0)
  parts = list(c.completions.create(model="default", prompt=PROMPTS[3], max_tokens=12,
                                    temperature=0, stream=True))
  assert len(parts) > 3
  assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
  assert parts[-1].choices[0].finish_reason == "length"

  messages = [{"role": "user", "content": "What is the capital of France?"}]
  chat = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=20,
                                   temperature=0)
  cli = decode_cli(capsys, "--chat", "--max-new-tokens", "20", messages[0]["content"])
  assert chat.choices[0].message.content == cli["completions"][0]
  assert chat.choices[0].message.role == "assistant"
  assert chat.choices[0].finish_reason == ("stop" if cli["stop_reasons"][0] == "eos" else "length")
  chunks = list(c.chat.completions.create(model="smollm2", messages=messages, max_tokens=20,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
  assert text == chat.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

  # The shipped pool ends its chat turn (a pool trained on raw text alone wrote the next one).
  pooled = c.chat.completions.create(model="default", max_tokens=64, temperature=0,
                                     messages=[{"role": "user", "content": "What is 2 + 2?"}])
  assert pooled.choices[0].finish_reason == "stop", pooled
  assert "\nuser\n" not in pooled.choices[0].message.content


def test_32_concurrent_streams_of_different_lengths_equal_each_alone(server):
  url, engines = server
  requests = [(PROMPTS[i % len(PROMPTS)], 3 + (5 * i) % 17) for i in range(32)]
  alone = [complete(url, p, n) for p, n in requests]

  async def stream_one(c: openai.AsyncOpenAI, prompt: str, n: int) -> str:
    parts = await c.completions.create(model="default", prompt=prompt, max_tokens=n,
                                       temperature=0, stream=True)
    return "".join([p.choices[0].text async for p in parts])

  async def all_at_once() -> list[str]:
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    return await asyncio.gather(*(stream_one(c, p, n) for p, n in requests))

  steps_before = engines["default"].stats.decode_steps
  together = asyncio.run(all_at_once())
  assert together == alone
  # They shared steps: far fewer steps than tokens.
  steps = engines["default"].stats.decode_steps - steps_before
  assert steps < sum(n for _, n in requests) / 4


def test_a_client_that_disconnects_frees_its_row(server):
  url, engines = server
  engine = engines["default"]
  body = {"model": "default", "prompt": PROMPTS[2], "max_tokens": CONTEXT - 8, "temperature": 0,
          "stream": True, "ignore_eos": True}
  other = threading.Thread(target=lambda: results.append(complete(url, PROMPTS[0], 10)))
  results: list[str] = []
  with httpx.Client(timeout=300) as h:
    with h.stream("POST", url + "/v1/completions", json=body) as r:
      lines = r.iter_lines()
      got = [line for _, line in zip(range(6), lines)]
      assert any(line.startswith("data: {") for line in got)
      other.start()
      assert engine.stats.running >= 1
  # The stream is closed: its row is freed long before its 120 tokens would have finished.
  deadline = time.time() + 60
  while engine.stats.requests_finished["abort"] < 1 and time.time() < deadline:
    time.sleep(0.1)
  assert engine.stats.requests_finished["abort"] >= 1
  other.join(timeout=300)
  assert results == [complete(url, PROMPTS[0], 10)]
  while engine.stats.running and time.time() < deadline:
    time.sleep(0.1)
  assert engine.stats.running == 0


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "nope", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "default", "prompt": ""}, 400, "empty"),
    ({"model": "default", "prompt": "word " * 200}, 400, "shorten the prompt"),
    ({"model": "default", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "default", "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "default", "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ({"model": "default", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "default", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": "default", "prompt": "hi", "n": 2}, 400, "n=2"),
    ({"model": "default"}, 400, "prompt"),
    ({"model": "default", "messages": []}, 400, "messages"),
    pytest.param("BIG", 413, "larger than", id="10MB-body"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, status, words):
  url, _ = server
  path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
  content = ("x" * (10 << 20) if body == "BIG" else body) if isinstance(body, str) else json.dumps(body)
  r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"},
                 timeout=60)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert words in error["message"] and error["type"]
  assert httpx.get(url + "/health").json() == {"status": "ok"}
  assert complete(url, PROMPTS[0], 2)


def test_the_client_library_raises_its_own_errors(server):
  url, _ = server
  with pytest.raises(openai.NotFoundError):
    client(url).completions.create(model="nope", prompt="hi", max_tokens=2)
  with pytest.raises(openai.BadRequestError, match="top_p"):
    client(url).chat.completions.create(model="default", messages=[{"role": "user",
                                                                     "content": "hi"}], top_p=2)


def test_metrics_report_requests_tokens_and_routing(server):
  url, _ = server
  complete(url, PROMPTS[4], 4)
  text = httpx.get(url + "/metrics").text
  for name in ("adafuse_requests_total", "adafuse_generation_tokens_total",
               "adafuse_running_sequences", "adafuse_waiting_sequences", "adafuse_batch_occupancy",
               "adafuse_tokens_per_second", "adafuse_switch_rate", "adafuse_distinct_experts",
               "adafuse_prefill_waits_total", "adafuse_mixed_steps_total"):
    assert f"{name}{{" in text, name
  generated = [line for line in text.splitlines()
               if line.startswith('adafuse_generation_tokens_total{model="default"}')]
  assert float(generated[0].split()[-1]) >= 4
  prompt, computed = (float(line.split()[-1]) for name in ("prompt", "prefill_computed")
                      for line in text.splitlines()
                      if line.startswith(f'adafuse_{name}_tokens_total{{model="default"}}'))
  assert computed >= prompt > 0  # the passes computed the prompt tokens and their padding
  # The engine thread's time: it served a request, so it waited for the device and worked.
  seconds = {line.split('state="')[1].split('"')[0]: float(line.split()[-1])
             for line in text.splitlines()
             if line.startswith('adafuse_engine_seconds_total{model="default"')}
  assert set(seconds) == {"device_wait", "host", "idle"}
  assert seconds["device_wait"] > 0 and seconds["host"] > 0 and seconds["idle"] >= 0
  answered = [line for line in text.splitlines()
              if line.startswith('adafuse_http_requests_total{path="/v1/completions",status="200"}')]
  assert answered and float(answered[0].split()[-1]) >= 1


def test_a_step_out_of_device_memory_is_an_openai_error_and_the_server_keeps_serving():
  """A real failed allocation mid-serving (a tiny random model whose 65 000-token prompt's
  prefill pass asks for ~400 GB of attention scores): that request gets an OpenAI-style error
  that names the memory, /health stays ok, the next request is answered, /metrics counts it."""
  model = LlamaModel(tiny_config(vocab_size=300, max_context=1 << 17), seed=11)
  engine = Engine(Generator(model), byte_tokenizer(300), name="tiny", max_batch=2,
                  max_seq_len=70_000, chunk=65_536, packed_tokens=())
  with serving({"tiny": engine}) as url:
    with pytest.raises(openai.InternalServerError) as error:
      client(url).completions.create(model="tiny", prompt="a" * 65_000, max_tokens=2)
    assert error.value.status_code == 503
    assert error.value.body["type"] == "server_error"
    assert error.value.body["message"].startswith("the device ran out of memory (")
    assert "the engine serves on" in error.value.body["message"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    answer = client(url).completions.create(model="tiny", prompt="hello", max_tokens=3,
                                            temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    assert 'adafuse_memory_errors_total{model="tiny"} 1.0' in httpx.get(url + "/metrics").text


@pytest.mark.parametrize("args, words", [
    (("--port", "99999"), "--port 99999 must be in [0, 65535]"),
    (("--adapters", "default", "--sere-rho", "2"), "--sere-rho 2.0 must be in [0, 1]"),
    (("--adapters", "a=default", "--adapters", "a=random"), "two pools are named 'a'"),
    (("--adapters", "default", "--path", "merged"), "path 'merged'"),
    (("--mixed-prefill", "8"), "mixed step sizes [8]: the largest must hold a whole chunk"),
    (("--mixed-prefill", "many"), "--mixed-prefill 'many' must be positive integers"),
    (("--compile-cache", "/proc/no-such-dir"), "cannot write there"),
    (("--prefill-wait", "-1"), "--prefill-wait -1 must be 0 (no waiting) or more decode steps"),
    (("--max-batch", "100000", "--max-seq-len", "8192"), "); lower --max-batch or --max-seq-len"),
])
def test_bad_server_options_are_one_error_line(args, words):
  import subprocess
  import sys

  out = subprocess.run([sys.executable, "-m", "adafuse_jax.serve", *args], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and words in lines[-1] and "Traceback" not in out.stderr
