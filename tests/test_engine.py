"""The continuous-batching engine from Python, on a tiny random model: the same tokens as
`generate`, whatever joins the batch and whenever; chunked prompts; seeded sampling; stop
strings; cancellation; named errors."""

from __future__ import annotations

import numpy as np
import pytest

from adafuse_jax.adapters.mixture import MixtureOfLoRA
from adafuse_jax.config import AdapterConfig
from adafuse_jax.errors import DeviceMemoryError, UserError
from adafuse_jax.generation import Generator, generate
from adafuse_jax.model import LlamaModel
from adafuse_jax.serving import Engine, SamplingParams
from adafuse_jax.serving.engine import EngineError, should_wait_for_prompts
from adafuse_jax.serving.detok import IncrementalText
from adafuse_jax.weights.tokenizer import byte_tokenizer
from tests.conftest import tiny_config

VOCAB = 300


@pytest.fixture(scope="module")
def model():
  return LlamaModel(tiny_config(vocab_size=VOCAB, max_context=256), seed=11)


@pytest.fixture(scope="module")
def pool_gen(model):
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2, router_init_std=0.5)
  return Generator(model, adapters=MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True),
                   path="packed")


@pytest.fixture(scope="module")
def engine(pool_gen):
  with Engine(pool_gen, byte_tokenizer(VOCAB), max_batch=4, max_seq_len=96, chunk=16,
              mixed_tokens=(16,)) as e:
    yield e


def prompts(count: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB, int(n)).tolist() for n in rng.integers(2, 40, count)]


def test_rows_that_join_and_leave_decode_as_each_alone(engine, pool_gen):
  # 10 requests on 4 rows: requests wait, join between steps and leave at different lengths;
  # prompts longer than the 16-token chunk prefill over several iterations.
  ps = prompts(10)
  lengths = [3 + 5 * i % 13 for i in range(10)]
  want = [generate(pool_gen, [p], max_new_tokens=n).tokens[0] for p, n in zip(ps, lengths)]
  streams = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True))
             for p, n in zip(ps, lengths)]
  got = [s.result() for s in streams]
  assert [g.token_ids for g in got] == want
  assert all(g.finish_reason == "length" and g.completion_tokens == n
             for g, n in zip(got, lengths))
  assert engine.stats.running == 0 and engine.stats.waiting == 0
  assert 0 < engine.stats.distinct_experts <= 4
  # short prompts rode in decode steps, the long ones' chunks went in row passes
  assert engine.stats.mixed_steps > 0 and engine.stats.row_passes > 0


@pytest.mark.parametrize("path", ["xla", "packed"])
def test_packed_and_mixed_prefill_sample_what_row_prefill_samples(model, path):
  """Whole prompts end to end in one pass (no padding between them), or riding in a decode
  step (after its decode tokens), against one row each: the same greedy and seeded-sampled
  ids, on the paths with and without a packed copy. Two requests start first, so the others
  arrive while rows decode."""
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2, router_init_std=0.5)
  gen = Generator(model, adapters=MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True),
                  path=path)
  ps = [p[:16] for p in prompts(6, seed=2)]
  # The first two decode 24 tokens, so that they still decode when the rest arrive however
  # busy the machine.
  params = [SamplingParams(max_tokens=24 if i < 2 else 6, ignore_eos=True,
                           temperature=0.8 * (i % 2), seed=i) for i in range(6)]
  got = {}
  for name, packed, mixed in (("rows", [], []), ("packed", None, []), ("mixed", None, [16])):
    with Engine(gen, byte_tokenizer(VOCAB), max_batch=8, max_seq_len=64, chunk=16,
                packed_tokens=packed, mixed_tokens=mixed) as e:
      first = [e.submit(p, sp) for p, sp in zip(ps[:2], params[:2])]
      head = [next(iter(s)) for s in first]  # both decoding before the rest arrive
      rest = [e.submit(p, sp) for p, sp in zip(ps[2:], params[2:])]
      got[name] = [s.result().token_ids for s in first + rest]
      assert all(not h.finished for h in head)
      assert (e.stats.packed_passes > 0) == (name != "rows")
      assert (e.stats.mixed_steps > 0) == (name == "mixed")
  assert got["packed"] == got["rows"] and got["mixed"] == got["rows"]


def test_the_decode_attention_kernel_serves_what_xla_attention_serves(model):
  """The engine's decode steps (its slot cache: rows of their own lengths, a step over its first
  rows and slots only) and mixed steps (decode tokens beside whole prompts) on the Pallas
  decode-attention kernels, the Pallas interpreter here, as "auto" runs "pallas" on a GPU, and
  the kernel that writes the tokens into the cache itself ("pallas-append"): the same greedy
  tokens as on XLA's attention."""
  cfg = AdapterConfig(mode="pregated", num_experts=4, rank=4, top_k=2, router_init_std=0.5)
  pool = MixtureOfLoRA(model.cfg, cfg, seed=3, random_b=True)
  ps = [p[:12] for p in prompts(4, seed=5)]
  got = {}
  for attention in ("xla", "pallas", "pallas-append"):
    gen = Generator(model, adapters=pool, path="packed", attention=attention)
    with Engine(gen, byte_tokenizer(VOCAB), max_batch=4, max_seq_len=48, chunk=16,
                mixed_tokens=(16,)) as e:
      # Decoding before the others arrive, so that they ride in mixed steps; long enough that
      # it is still decoding when they do, however busy the machine (with 8 tokens a loaded
      # machine once let it finish first: every prompt then took a prefill pass).
      first = e.submit(ps[0], SamplingParams(max_tokens=24, ignore_eos=True))
      head = next(iter(first))
      rest = [e.submit(p, SamplingParams(max_tokens=3 + i, ignore_eos=True))
              for i, p in enumerate(ps[1:])]
      got[attention] = [s.result().token_ids for s in [first, *rest]]
      assert not head.finished
      assert e.stats.mixed_steps > 0, e.stats
  assert got["pallas"] == got["xla"] and got["pallas-append"] == got["xla"]


@pytest.mark.parametrize("waited, decoding, free, tokens, limit, wait", [
    ([0], 8, 4, 20, 2, True),  # one prompt of four could still share the pass: wait
    ([1, 0], 8, 4, 40, 2, True),
    ([2, 0], 8, 4, 40, 2, False),  # the oldest waited the limit
    ([0, 0, 0, 0], 8, 4, 80, 2, False),  # the prompts fill the free rows
    ([0, 0], 8, 4, 512, 2, False),  # ... or the largest pass
    ([0], 0, 4, 20, 2, False),  # nothing decodes: the device would idle
    ([1, 1], 2, 4, 20, 4, False),  # two steps waited cost what the pass costs two rows
    ([0], 8, 4, 20, 0, False),  # waiting off
])
def test_a_prefill_pass_waits_only_while_waiting_costs_less_than_the_pass(
    waited, decoding, free, tokens, limit, wait):
  assert should_wait_for_prompts(waited, decoding, free, tokens, 512, limit) is wait


def test_prompts_that_wait_for_a_shared_pass_decode_as_each_alone(pool_gen):
  """A request that arrives while eight rows decode waits (up to `prefill_wait` steps) for
  others to share its pass, then decodes what it decodes alone."""
  ps = prompts(10, seed=4)
  # The eight decode 24 tokens, so that they still decode when the late two arrive however
  # busy the machine (with 8 a loaded machine once let them finish first: nothing to wait
  # beside); greedy, so the late two's 8 tokens are the first 8 of their 24.
  want = [generate(pool_gen, [p], max_new_tokens=24).tokens[0] for p in ps]
  want = want[:8] + [w[:8] for w in want[8:]]
  for wait in (0, 3):
    with Engine(pool_gen, byte_tokenizer(VOCAB), max_batch=16, max_seq_len=96, chunk=64,
                prefill_wait=wait) as e:
      first = [e.submit(p, SamplingParams(max_tokens=24, ignore_eos=True)) for p in ps[:8]]
      heads = [next(iter(s)) for s in first]  # all eight decoding
      late = [e.submit(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in ps[8:]]
      assert [s.result().token_ids for s in first + late] == want
      assert not any(h.finished for h in heads)
      assert (e.stats.prefill_waits > 0) == (wait > 0), e.stats


def test_no_step_copies_a_cache_buffer(pool_gen):
  """Decode, packed and mixed steps write the donated cache in place: no copy of a layer's
  K or V buffer in the compiled program. (The first mixed step read the decode rows between
  two writes of each buffer, and XLA copied every buffer to keep the read's version.)"""
  from adafuse_jax.serving.steps import SlotSteps

  cfg = pool_gen.cfg
  steps = SlotSteps(pool_gen, max_batch=4, max_len=32, chunk=16, mixed_tokens=(16,),
                    packed_tokens=(16,))
  buffer = f"f32[4,32,{cfg.kv_heads},{cfg.head_dim}]"
  for lowered in (steps._lower_decode((4, 32)), steps._lower_packed(16),
                  steps._lower_mixed((4, 32, 16))):
    hlo = lowered.compile().as_text()
    copies = [line for line in hlo.splitlines()
              if " copy(" in line and line.split("=", 1)[1].lstrip().startswith(buffer)]
    assert not copies, copies[:2]


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
  params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7,
                          ignore_eos=True)
  alone = engine.generate([5, 6, 7], params).token_ids
  crowd = [engine.submit(p, SamplingParams(max_tokens=12, temperature=1.0, seed=i))
           for i, p in enumerate(prompts(3, seed=1))]
  again = engine.submit([5, 6, 7], params)
  assert again.result().token_ids == alone
  [s.result() for s in crowd]
  other = engine.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.9, seed=8,
                                                    ignore_eos=True)).token_ids
  assert other != alone


def test_cancel_frees_the_row(engine):
  stream = engine.submit([9, 10, 11], SamplingParams(max_tokens=80, ignore_eos=True))
  events = iter(stream)
  next(events)
  stream.cancel()
  last = list(events)[-1]
  assert last.finished and last.finish_reason == "abort"
  assert engine.generate([9, 10], SamplingParams(max_tokens=3)).completion_tokens <= 3


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-5), "top_k"), (dict(seed=-1), "seed")])
def test_bad_sampling_params_are_named(kwargs, words):
  with pytest.raises(UserError, match=words):
    SamplingParams(**kwargs)


def test_bad_requests_and_configurations_are_named(engine, model):
  with pytest.raises(UserError, match="empty"):
    engine.submit([], SamplingParams())
  with pytest.raises(UserError, match="shorten the prompt"):
    engine.submit(list(range(3, 103)), SamplingParams())
  with pytest.raises(UserError, match="at most 86 tokens"):
    engine.submit(list(range(3, 13)), SamplingParams(max_tokens=90))
  with pytest.raises(UserError, match=r"token ids must be in \[0, 300\)"):
    engine.submit([5, 300], SamplingParams())
  with pytest.raises(UserError, match="max_seq_len"):
    Engine(Generator(model), byte_tokenizer(VOCAB), max_seq_len=10_000)
  pool = MixtureOfLoRA(model.cfg, AdapterConfig(mode="pregated", num_experts=2, rank=2), seed=0)
  with pytest.raises(UserError, match="serve this pool with --path packed"):
    Engine(Generator(model, adapters=pool, path="merged"), byte_tokenizer(VOCAB))
  steps = engine.steps  # a packed size must be compiled and hold the prompts (checked first)
  with pytest.raises(UserError, match=r"packed size 7 is not a compiled size holding 3 tokens"):
    steps.packed_prefill(None, None, [(0, [5, 6, 7])], [0.0], [1.0], [0], [0], size=7)


def test_a_cache_the_device_cannot_hold_raises_device_memory_error():
  """A real failed allocation (a thousand rows of a million-token cache) when the engine
  starts: a DeviceMemoryError naming what to ask for less of; no engine thread is left."""
  big = LlamaModel(tiny_config(vocab_size=VOCAB, max_context=1 << 20), seed=11)
  engine = Engine(Generator(big), byte_tokenizer(VOCAB), max_batch=1000, max_seq_len=1 << 20,
                  chunk=16)
  with pytest.raises(DeviceMemoryError, match="smaller max_batch or max_seq_len"):
    engine.start()
  assert engine._thread is None


def test_a_pass_the_device_cannot_hold_ends_the_rows_and_the_engine_serves_on():
  """A real failed allocation mid-serving (a 65 000-token prompt's prefill pass asks for ~400 GB
  of attention scores): that request, and the one decoding beside it on the cache the failed
  pass was given, end with the memory error; the cache is made again and the next request
  decodes what `generate` does."""
  gen = Generator(LlamaModel(tiny_config(vocab_size=VOCAB, max_context=1 << 17), seed=11))
  with Engine(gen, byte_tokenizer(VOCAB), max_batch=2, max_seq_len=70_000, chunk=65_536,
              packed_tokens=()) as engine:
    beside = engine.submit([5, 6, 7], SamplingParams(max_tokens=60, ignore_eos=True))
    long = engine.submit([5] * 65_000, SamplingParams(max_tokens=4))
    for stream in (beside, long):
      with pytest.raises(EngineError, match=r"^the device ran out of memory \(.*serves on"):
        stream.result()
    after = engine.generate([9, 10, 11], SamplingParams(max_tokens=6, ignore_eos=True))
    assert engine.stats.memory_errors == 1 and engine.stats.requests_finished["error"] == 2
    assert engine.stats.running == 0 and engine._failure is None
  assert after.token_ids == generate(gen, [[9, 10, 11]], max_new_tokens=6).tokens[0]


def test_incremental_text_streams_what_is_final_and_stops_before_a_stop_string():
  tok = byte_tokenizer(VOCAB)
  ids = tok.encode("naïve café: the END of it")
  text = IncrementalText(tok, stop=("END",))
  parts = [text.add(t) for t in ids]
  out = "".join(parts)
  assert text.stopped and out == "naïve café: the "
  # No part ends inside a multi-byte character.
  assert all("\ufffd" not in p for p in parts)
  plain = IncrementalText(tok)
  assert "".join(plain.add(t) for t in ids) + plain.flush() == "naïve café: the END of it"
