"""The serving engine: continuous batching of requests over one model and expert pool.

A background thread owns the device state (a `SlotCache` of `max_batch` rows and each row's
next token) and loops:

1. take new requests and cancellations;
2. admit waiting requests into free rows: with mixed steps on (`mixed_tokens`) and rows
   decoding, whole prompts of at most `chunk` tokens ride in the next decode step (packed end
   to end after its decode tokens, so they cost no read of the weights of their own); otherwise
   one prefill pass: whole prompts packed end to end (no padding between them, up to the largest
   packed size), or else the next chunk of up to `prefill_rows[-1]` long prompts, each into its
   own row; so a burst of arrivals costs one read of the weights and a long prompt delays the
   running streams by one pass, not by its whole prefill. While rows decode, a pass of new
   prompts may wait a decode step or two for more arrivals to share it (`prefill_wait`,
   `should_wait_for_prompts`);
3. dispatch one decode step over the rows in use (a batch bucket: the smallest compiled batch
   that holds the highest row in use), with the riding prompts if any;
4. read the tokens of the previous iteration on the host, stream them to their requests and
   retire the finished ones, whose rows the next iteration can admit into.

Steps are pipelined: the device runs step t+1 while the host reads step t, as in `generate`.
Every row keeps its own experts (routing is per token); the step is one compiled function per
batch bucket.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Sequence

import numpy as np

from adafuse_jax.errors import DeviceMemoryError, UserError, as_user_error, device_memory_errors
from adafuse_jax.generation import Generator, round_up
from adafuse_jax.serving.detok import IncrementalText
from adafuse_jax.serving.steps import SlotSteps, bucket_for
from adafuse_jax.weights.tokenizer import Tokenizer

if TYPE_CHECKING:
  import jax

ENGINE_MEMORY_ADVICE = "give the engine a smaller max_batch or max_seq_len, or a smaller pool"
# A step's own buffers (a long prompt's attention, say) come on top of the cache held from the
# start: the requests in that step end with this, and the engine serves on.
STEP_MEMORY_ADVICE = ("the requests in that step were ended and the engine serves on; send a"
                      " shorter prompt, or give the engine a smaller chunk, max_batch or"
                      " max_seq_len (the server's --chunk, --max-batch, --max-seq-len)")


def should_wait_for_prompts(waited: Sequence[int], decoding: int, free: int, tokens: int,
                            largest: int, limit: int) -> bool:
  """Whether a prefill pass of the waiting new prompts should wait one more decode step for
  more prompts to share it.

  A pass costs every decoding row about one step (it reads all the weights, as a step does),
  whatever it carries up to its largest size, while a prompt left waiting costs only its own
  row a step. Requests that free rows together (a wave of fixed-length completions, clients
  that answer at once) arrive a few milliseconds apart, so taking them as they come runs
  several small passes where one would do. Text Generation Inference waits the same way
  (`--waiting-served-ratio`, `--max-waiting-tokens`).

  Args:
    waited: decode steps each waiting new prompt has waited so far.
    decoding: rows decoding now.
    free: rows free to admit into.
    tokens: the waiting prompts' tokens.
    largest: the most prompt tokens one pass takes.
    limit: the most steps any prompt waits (0: never wait).
  Returns:
    True to run the decode step without the pass. Never while nothing decodes (the device
    would idle), once the prompts fill the free rows or the largest pass, once one has waited
    `limit` steps, or once the steps they waited add up to the decoding rows (their wait has
    then cost what the pass costs the others).
  """
  if limit < 1 or not waited or decoding < 1:
    return False
  if len(waited) >= free or tokens >= largest or max(waited) >= limit:
    return False
  return sum(waited) < decoding


class EngineError(RuntimeError):
  """The engine failed while running a request (not the request's fault)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded.

  Attributes:
    max_tokens: the most tokens generated; None = up to the end of the engine's context.
    temperature: 0 = greedy.
    top_p: nucleus mass in (0, 1].
    top_k: keep the k most likely tokens; 0 (or -1, as vLLM spells it) keeps all.
    seed: the request's sampling seed; None draws one.
    stop: strings that end the completion (not included in it).
    ignore_eos: keep generating past the end-of-sequence token (benchmarks).
    stop_token_ids: more ids that end the completion, not included in it (vLLM's field; a chat
      request gets the template's turn markers, `Tokenizer.chat_stop_ids`).
  """

  max_tokens: int | None = 16
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False
  stop_token_ids: frozenset[int] = frozenset()

  def __post_init__(self) -> None:
    if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or self.max_tokens < 1):
      raise UserError(f"max_tokens={self.max_tokens} must be at least 1")
    if not np.isfinite(self.temperature) or self.temperature < 0:
      raise UserError(f"temperature={self.temperature} must be a finite number >= 0 (0 means"
                      " greedy)")
    if not (np.isfinite(self.top_p) and 0 < self.top_p <= 1):
      raise UserError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < -1:
      raise UserError(f"top_k={self.top_k} must be >= 1, or 0 / -1 for no limit")
    if self.seed is not None and not 0 <= self.seed < 2**32:
      raise UserError(f"seed={self.seed} must be in [0, 2**32)")
    if len(self.stop) > 16 or any(not isinstance(s, str) for s in self.stop):
      raise UserError("stop must be at most 16 strings")


@dataclasses.dataclass
class Output:
  """One event of a request's stream.

  Attributes:
    text: the new text (a delta; may be empty on the last event).
    finished: whether this is the last event.
    finish_reason: "stop" (end token or stop string), "length" (max_tokens or the context),
      "abort" (cancelled), "error"; None before the end.
    prompt_tokens, completion_tokens: counts so far.
  """

  text: str
  finished: bool = False
  finish_reason: str | None = None
  prompt_tokens: int = 0
  completion_tokens: int = 0
  error: str | None = None


@dataclasses.dataclass
class Completion:
  """A finished request, as `RequestStream.result` returns it."""

  text: str
  finish_reason: str
  prompt_tokens: int
  completion_tokens: int
  token_ids: list[int]


class _Outbox:
  """Events for streams read from event loops, held by the engine thread until `flush`: one
  wake-up per loop per engine iteration carries every stream's events, where a wake-up per
  event (a write to the loop's self-pipe each) took a quarter of the engine thread's time
  under 32 streams."""

  def __init__(self) -> None:
    self._held: dict[asyncio.AbstractEventLoop, list[tuple["RequestStream", Output]]] = {}

  def add(self, stream: "RequestStream", out: Output) -> None:
    self._held.setdefault(stream._loop, []).append((stream, out))

  def flush(self) -> None:
    held, self._held = self._held, {}
    for loop, events in held.items():
      try:
        loop.call_soon_threadsafe(_deliver, events)
      except RuntimeError:  # the loop closed: nobody listens any more
        for stream, _ in events:
          stream.cancelled.set()


def _deliver(events: list[tuple["RequestStream", "Output"]]) -> None:
  """Runs in the streams' event loop."""
  for stream, out in events:
    stream._async_q.put_nowait(out)


class RequestStream:
  """The handle `Engine.submit` returns: iterate it (sync or async) for `Output` events.

  Events arrive from the engine thread; with an event loop given at submission they are
  delivered into it (for `async for`; batched per engine iteration, `_Outbox`), else into a
  thread-safe queue (for `for`).
  """

  def __init__(self, request_id: str, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None):
    self.request_id = request_id
    self.prompt_tokens = prompt_tokens
    self.token_ids: list[int] = []
    self._loop = loop
    self._async_q: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
    self._sync_q: queue.SimpleQueue = queue.SimpleQueue()
    self.cancelled = threading.Event()
    self._engine: Engine | None = None

  def _put(self, out: Output, outbox: _Outbox) -> None:
    if self._loop is not None:
      outbox.add(self, out)
    else:
      self._sync_q.put(out)

  def cancel(self) -> None:
    """Stops the request and frees its row (a client that went away)."""
    if not self.cancelled.is_set():
      self.cancelled.set()
      if self._engine is not None:
        self._engine._wake()

  def __iter__(self) -> Iterator[Output]:
    if self._loop is not None:
      raise RuntimeError("this stream was submitted from an event loop: use `async for`")
    while True:
      out = self._sync_q.get()
      yield out
      if out.finished:
        return

  async def __aiter__(self) -> AsyncIterator[Output]:
    if self._async_q is None:
      raise RuntimeError("this stream was submitted without an event loop: use `for`")
    while True:
      out = await self._async_q.get()
      yield out
      if out.finished:
        return

  @staticmethod
  def _join(outs: Sequence[Output], ids: list[int]) -> Completion:
    last = outs[-1]
    if last.finish_reason == "error":
      raise EngineError(last.error or "the engine failed")
    return Completion(text="".join(o.text for o in outs), finish_reason=last.finish_reason or "",
                      prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                      token_ids=ids)

  def result(self) -> Completion:
    """Waits for the whole completion (sync streams)."""
    return self._join(list(self), self.token_ids)

  async def aresult(self) -> Completion:
    """Waits for the whole completion (async streams)."""
    return self._join([o async for o in self], self.token_ids)


@dataclasses.dataclass
class _Seq:
  stream: RequestStream
  prompt: list[int]
  params: SamplingParams
  max_tokens: int
  seed: int
  detok: IncrementalText
  arrival: float
  slot: int | None = None
  prefilled: int = 0
  waited: int = 0  # decode steps run while it waited for its first prefill pass
  position: int = 0  # the slot the row's next decode step writes
  generated: int = 0
  finished: bool = False
  first_token_s: float | None = None
  experts: frozenset[int] | None = None


@dataclasses.dataclass
class EngineStats:
  """Running totals and the latest step's figures (read by /metrics)."""

  requests_finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  prompt_tokens: int = 0
  generated_tokens: int = 0
  decode_steps: int = 0
  packed_passes: int = 0  # prefill passes of whole prompts end to end
  mixed_steps: int = 0  # decode steps that also prefilled whole prompts
  row_passes: int = 0  # prefill passes of prompt chunks, one row each
  prefill_waits: int = 0  # decode steps run while new prompts waited for more to share a pass
  memory_errors: int = 0  # passes or steps the device had no memory for (their rows ended)
  # Prompt tokens the prefill passes and mixed steps computed, padding to their compiled
  # sizes included (against `prompt_tokens`: what padding costs).
  prefill_computed_tokens: int = 0
  running: int = 0
  waiting: int = 0
  last_bucket: int = 0
  last_occupancy: float = 0.0
  switch_rate: float = 0.0
  distinct_experts: float = 0.0
  # The engine thread's time, split three ways (seconds): blocked waiting for requests with
  # nothing to do; waiting for the device's results (a pass's or step's tokens); everything
  # else it does (admission, dispatch, streaming tokens out).
  idle_s: float = 0.0
  device_wait_s: float = 0.0
  host_s: float = 0.0
  ttft_s: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1024))
  token_times: collections.deque = dataclasses.field(
      default_factory=lambda: collections.deque(maxlen=4096))  # when each token was read

  def tokens_per_s(self, window_s: float = 10.0) -> float:
    """Generated tokens per second over the last `window_s` seconds."""
    now = time.perf_counter()
    recent = [t for t in self.token_times if now - t <= window_s]
    if not recent:
      return 0.0
    return len(recent) / max(now - recent[0], 1e-3)


class Engine:
  """Continuous batching over one generator (a model and, optionally, an expert pool).

  Args:
    gen: the compiled-step holder (`adafuse_jax.Generator`), any path except the per-token
      merged switch.
    tokenizer: text <-> ids, chat template, end-of-sequence ids.
    max_batch: rows decoded together (slots of the KV cache).
    max_seq_len: the most tokens (prompt + completion) a request may hold; default the model's
      context, at most 4096.
    chunk: the most prompt tokens one request prefills between two decode steps.
    name: the model name requests use.
    batch_buckets: batch sizes the decode step is compiled for (default: powers of two).
    prefill_rows, prefill_lengths: the shapes of the one prefill pass between decode steps
      (default: rows in powers of four up to max_batch, lengths in powers of two from 16 up to
      chunk); see `SlotSteps`.
    packed_tokens: the sizes of packed prefill passes (default powers of two from 64 up to
      4 x chunk; empty: every prompt goes by rows); see `SlotSteps`.
    mixed_tokens: the prompt tokens a decode step can also prefill (default none: every prompt
      takes a pass of its own); see `SlotSteps`.
    prefill_wait: the most decode steps a new prompt's prefill pass waits, while rows decode,
      for more prompts to share it (`should_wait_for_prompts`; 0: a pass whenever one waits).

  Use `start()` (or `with Engine(...) as engine`), then `submit(...)`. A pass or step the
  device has no memory for ends the requests holding a row with that error (`EngineError` from
  their streams) and the engine serves on; any other error stops it (`EngineError` from then on).
  """

  def __init__(self, gen: Generator, tokenizer: Tokenizer, *, max_batch: int = 8,
               max_seq_len: int | None = None, chunk: int = 256, name: str = "model",
               batch_buckets: Sequence[int] | None = None,
               prefill_rows: Sequence[int] | None = None,
               prefill_lengths: Sequence[int] | None = None,
               packed_tokens: Sequence[int] | None = None,
               mixed_tokens: Sequence[int] | None = None, prefill_wait: int = 0):
    if max_batch < 1:
      raise UserError(f"max_batch={max_batch} must be at least 1")
    context = gen.cfg.max_context
    max_seq_len = min(context, 4096) if max_seq_len is None else max_seq_len
    if not 2 <= max_seq_len <= context:
      raise UserError(f"max_seq_len={max_seq_len} must be in [2, {context}] (the model's context)")
    if chunk < 1:
      raise UserError(f"chunk={chunk} must be at least 1")
    if prefill_wait < 0:
      raise UserError(f"prefill_wait={prefill_wait} must be 0 (no waiting) or more decode steps")
    chunk = min(chunk, max_seq_len)
    self.name = name
    self.tokenizer = tokenizer
    self.max_seq_len = max_seq_len
    self.steps = SlotSteps(gen, max_batch=max_batch, max_len=round_up(max_seq_len, chunk),
                           chunk=chunk, batch_buckets=batch_buckets,
                           prefill_rows=prefill_rows, prefill_lengths=prefill_lengths,
                           packed_tokens=packed_tokens, mixed_tokens=mixed_tokens)
    self.max_batch, self.chunk = max_batch, chunk
    # Whether whole prompts ride in decode steps; settable between steps (the load bench
    # compares both ways on one engine), only meaningful when mixed steps were compiled.
    self.mixed_prefill = bool(self.steps.mixed_buckets)
    self.prefill_wait = prefill_wait  # settable between steps too
    self.stats = EngineStats()
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._waiting: collections.deque[_Seq] = collections.deque()
    self._slots: list[_Seq | None] = [None] * max_batch
    self._riding: list[_Seq] = []  # whole prompts admitted into the next decode step
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._stopping = threading.Event()
    self._failure: BaseException | None = None
    self._rng = np.random.default_rng()
    self._outbox = _Outbox()

  # -- public ------------------------------------------------------------------------------

  @property
  def has_router(self) -> bool:
    return self.steps.gen.adapter_params is not None

  def start(self, warm_up: bool = False) -> "Engine":
    """Starts the engine thread (compiling every shape first with `warm_up`).

    Raises:
      DeviceMemoryError: the device cannot hold the KV cache of max_batch x max_seq_len tokens
        (or, warming up, a step's buffers).
    """
    with device_memory_errors(ENGINE_MEMORY_ADVICE):
      if warm_up:
        self.steps.warm_up()
      if self._thread is None:
        self._cache = self.steps.new_cache()
        self._nxt = self.steps.new_tokens()
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the thread; requests still running end with finish_reason "abort"."""
    self._stopping.set()
    self._wake()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def __enter__(self) -> "Engine":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
    ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    vocab = self.steps.gen.cfg.vocab_size
    if any(not 0 <= t < vocab for t in ids):
      raise UserError(f"prompt token ids must be in [0, {vocab})")
    return ids

  def submit(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams(), *,
             loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
    """Queues a request; returns its stream at once.

    Args:
      prompt: text (tokenized here, BOS as the tokenizer adds it) or token ids.
      params: sampling and length settings.
      loop: deliver events into this event loop (for `async for`); `submit_async` passes the
        running one.
    Raises:
      UserError: an empty prompt, a prompt or prompt + max_tokens beyond `max_seq_len`.
      EngineError: the engine stopped or failed.
    """
    if self._failure is not None:
      raise EngineError(f"the engine failed: {self._failure!r}")
    if self._thread is None or self._stopping.is_set():
      raise EngineError("the engine is not running: call start()")
    ids = self.encode_prompt(prompt)
    if not ids:
      raise UserError("the prompt is empty; give some text to continue")
    n = len(ids)
    if n >= self.max_seq_len:
      raise UserError(f"the prompt has {n} tokens but this server's context is"
                      f" {self.max_seq_len} (prompt + completion); shorten the prompt")
    max_tokens = params.max_tokens if params.max_tokens is not None else self.max_seq_len - n
    if n + max_tokens > self.max_seq_len:
      raise UserError(f"max_tokens={max_tokens} with a prompt of {n} tokens exceeds the context"
                      f" of {self.max_seq_len}; ask for at most {self.max_seq_len - n} tokens")
    seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
    stream = RequestStream(f"{self.name}-{next(self._ids)}", n, loop)
    stream._engine = self
    seq = _Seq(stream=stream, prompt=ids, params=params, max_tokens=max_tokens, seed=seed,
               detok=IncrementalText(self.tokenizer, params.stop), arrival=time.perf_counter())
    self._inbox.put(seq)
    return stream

  def submit_async(self, prompt: str | Sequence[int],
                   params: SamplingParams = SamplingParams()) -> RequestStream:
    """`submit` from a coroutine: the stream is read with `async for`."""
    return self.submit(prompt, params, loop=asyncio.get_running_loop())

  def generate(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams()
               ) -> Completion:
    """Submits one request and waits for it."""
    return self.submit(prompt, params).result()

  # -- the engine thread ------------------------------------------------------------------

  def _wake(self) -> None:
    self._inbox.put(None)

  def _run(self) -> None:
    pending: list[tuple] = []
    try:
      while not self._stopping.is_set():
        try:
          pending = self._iteration(pending)
        except Exception as e:  # noqa: BLE001 - only the device's memory error is survived
          error = as_user_error(e, STEP_MEMORY_ADVICE)
          if not isinstance(error, DeviceMemoryError):
            raise
          pending = []
          self._drop_rows_after_memory_error(str(error))
      self._fail_all("abort", None)
    except BaseException as e:  # keep serving the error to every request, never hang them
      self._failure = e
      self._fail_all("error", f"the engine failed: {e!r}")
      raise

  def _iteration(self, pending: list[tuple]) -> list[tuple]:
    """One pass of the loop: admit, dispatch a step, stream out the last one's tokens.
    Returns what this pass dispatched (read out by the next)."""
    st = self.stats
    idle = not (self._waiting or pending or any(self._slots))
    t0 = time.perf_counter()
    self._take_inbox(block=idle)
    t1 = time.perf_counter()
    if idle:
      st.idle_s += t1 - t0
    waited = st.device_wait_s
    self._drop_cancelled()
    dispatched: list[tuple] = []
    self._admit(dispatched)
    self._dispatch_step(dispatched)
    self._drain(pending)
    self._outbox.flush()
    st.host_s += time.perf_counter() - (t1 if idle else t0) - (st.device_wait_s - waited)
    st.running = sum(s is not None for s in self._slots)
    st.waiting = len(self._waiting)
    return dispatched

  def _drop_rows_after_memory_error(self, error: str) -> None:
    """After a pass or step the device had no memory for: every request holding a row ends
    with `error` (finish_reason "error"), since the KV cache they shared was donated to the
    step that failed; the cache is made again and requests still queued are served as usual."""
    self._riding = []
    holders = [seq for seq in self._slots if seq is not None]
    for seq in holders:
      if seq in self._waiting:  # mid-prefill
        self._waiting.remove(seq)
      if not seq.finished:
        self._finish(seq, "error", error=error)
    self._slots = [None] * self.max_batch
    self._cache = self._nxt = None  # let the failed step's buffers go before allocating again
    self._cache = self.steps.new_cache()
    self._nxt = self.steps.new_tokens()
    self.stats.memory_errors += 1
    self._outbox.flush()

  def _take_inbox(self, block: bool) -> None:
    try:
      item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
      while True:
        if item is not None:
          self._waiting.append(item)
        item = self._inbox.get_nowait()
    except queue.Empty:
      pass

  def _drop_cancelled(self) -> None:
    for seq in [s for s in self._waiting if s.stream.cancelled.is_set()]:
      self._waiting.remove(seq)
      self._finish(seq, "abort")
    for seq in self._slots:
      if seq is not None and seq.stream.cancelled.is_set():
        self._finish(seq, "abort")

  def _admit(self, dispatched: list[tuple]) -> None:
    """Admission between decode steps: with mixed steps on and rows decoding, whole prompts ride
    in the next decode step (`_admit_riding`); else one prefill pass. Whole prompts of at most
    `chunk` tokens go in a packed pass (`_admit_packed`: laid end to end, no padding between
    them); a long prompt's chunks go in a row pass: the next chunk of up to the largest
    prefill-rows bucket of waiting prompts (in arrival order, each into its own row). Either
    way a burst of arrivals reads the weights once rather than once per prompt."""
    free = [i for i, s in enumerate(self._slots) if s is None]
    if (self._admit_riding(free) or self._wait_for_prompts(free)
        or self._admit_packed(free, dispatched)):
      return
    ready = list(itertools.islice(self._waiting, self.steps.prefill_rows[-1]))
    ready = [seq for seq in ready if seq.slot is not None] + [
        seq for seq in ready if seq.slot is None][:len(free)]
    if not ready:
      return
    # Exactly a compiled rows bucket, never padded with empty rows (whose compute is waste
    # where prefill is compute-bound, as on a CPU); the rest waits one decode step.
    take = max(b for b in self.steps.prefill_rows if b <= len(ready))
    chosen = sorted(ready[:take], key=lambda seq: seq.arrival)
    for seq in chosen:
      if seq.slot is None:
        seq.slot = free.pop(0)
        self._slots[seq.slot] = seq
    # A multiple of chunk: chunk writes stay inside the row.
    pieces = [(seq.slot, seq.prompt[seq.prefilled:seq.prefilled + self.chunk], seq.prefilled)
              for seq in chosen]
    params = [seq.params for seq in chosen]
    self._cache, self._nxt, tokens, _ = self.steps.prefill(
        self._cache, self._nxt, pieces, [p.temperature for p in params],
        [p.top_p for p in params], [max(p.top_k, 0) for p in params],
        [seq.seed for seq in chosen])
    self.stats.row_passes += 1
    rows, length = self.steps.row_pass_shape([len(piece) for _, piece, _ in pieces])
    self.stats.prefill_computed_tokens += rows * length
    done = []  # (index in the pass, seq) of the prompts this pass completed
    for i, (seq, (_, piece, _)) in enumerate(zip(chosen, pieces)):
      seq.prefilled += len(piece)
      if seq.prefilled == len(seq.prompt):
        seq.position = len(seq.prompt)
        self._waiting.remove(seq)
        done.append((i, seq))
        self.stats.prompt_tokens += len(seq.prompt)
    if done:
      dispatched.append(("first", done, tokens))

  def _wait_for_prompts(self, free: list[int]) -> bool:
    """Whether this iteration skips the prefill pass so that prompts still arriving share the
    next one (`should_wait_for_prompts`); never while a long prompt is mid-prefill."""
    if self.prefill_wait < 1 or not self._waiting or not free:
      return False
    new = [seq for seq in self._waiting if seq.slot is None]
    if len(new) < len(self._waiting):
      return False
    steps = self.steps
    largest = (steps.packed_buckets[-1] if steps.packed_buckets
               else steps.prefill_rows[-1] * self.chunk)
    wait = should_wait_for_prompts([seq.waited for seq in new], len(self._decoding_rows()),
                                   len(free), sum(len(seq.prompt) for seq in new), largest,
                                   self.prefill_wait)
    self.stats.prefill_waits += wait
    return wait

  def _whole_prompts(self, free: list[int], room: int) -> list[_Seq]:
    """The waiting whole prompts (at most `chunk` tokens) at the head of the queue, in arrival
    order, while they fit `room` tokens and the free rows."""
    chosen, total = [], 0
    for seq in self._waiting:
      if (seq.slot is not None or len(seq.prompt) > self.chunk or len(chosen) == len(free)
          or total + len(seq.prompt) > room):
        break
      chosen.append(seq)
      total += len(seq.prompt)
    return chosen

  def _admit_riding(self, free: list[int]) -> bool:
    """While rows are decoding: the waiting whole prompts that fit the largest mixed step ride
    in the next decode step (`_dispatch_step`); False when there are none or nothing decodes."""
    if (not self.mixed_prefill or not self.steps.mixed_buckets or not free
        or not self._decoding_rows()):
      return False
    self._riding = self._whole_prompts(free, self.steps.mixed_buckets[-1])
    for seq, row in zip(self._riding, free):
      seq.slot = row
      self._slots[row] = seq
    return bool(self._riding)

  def _admit_packed(self, free: list[int], dispatched: list[tuple]) -> bool:
    """A packed pass of the waiting whole prompts (in arrival order, while they fit the largest
    packed size and the free rows), when the oldest waiting prompt is one; False otherwise."""
    steps = self.steps
    if not steps.packed_buckets or not free:
      return False
    # An oldest prompt that is long (or mid-prefill) yields none: the row pass serves it.
    chosen = self._whole_prompts(free, steps.packed_buckets[-1])
    if not chosen or self._rows_pass_is_smaller(chosen):
      return False
    for seq, row in zip(chosen, free):
      seq.slot = row
      self._slots[row] = seq
    params = [seq.params for seq in chosen]
    self._cache, self._nxt, tokens, _ = steps.packed_prefill(
        self._cache, self._nxt, [(seq.slot, seq.prompt) for seq in chosen],
        [p.temperature for p in params], [p.top_p for p in params],
        [max(p.top_k, 0) for p in params], [seq.seed for seq in chosen])
    self.stats.packed_passes += 1
    self.stats.prefill_computed_tokens += steps.packed_size([len(seq.prompt) for seq in chosen])
    for seq in chosen:
      seq.prefilled = seq.position = len(seq.prompt)
      self._waiting.remove(seq)
      self.stats.prompt_tokens += len(seq.prompt)
    dispatched.append(("first", list(enumerate(chosen)), tokens))
    return True

  def _rows_pass_is_smaller(self, chosen: list) -> bool:
    """Whether one row pass of these prompts computes fewer tokens, padding included, than their
    packed pass (a few prompts of one length fill their rows; many of mixed lengths pack)."""
    steps = self.steps
    if len(chosen) > steps.prefill_rows[-1]:
      return False
    lengths = [len(seq.prompt) for seq in chosen]
    rows, length = steps.row_pass_shape(lengths)
    return rows * length < steps.packed_size(lengths)

  def _decoding_rows(self) -> list[tuple[int, _Seq]]:
    return [(i, s) for i, s in enumerate(self._slots)
            if s is not None and s.prefilled == len(s.prompt) and not s.finished]

  def _dispatch_step(self, dispatched: list[tuple]) -> None:
    rows = self._decoding_rows()
    if not rows:
      return
    b = bucket_for(rows[-1][0] + 1, self.steps.batch_buckets)
    active = np.zeros(b, bool)
    temperature = np.zeros(b, np.float32)
    top_p = np.ones(b, np.float32)
    top_k = np.zeros(b, np.int32)
    seeds = np.zeros(b, np.uint32)
    longest = max(s.position for _, s in rows)
    for i, s in rows:
      s.position += 1
      active[i] = True
      temperature[i], top_p[i], top_k[i] = s.params.temperature, s.params.top_p, max(s.params.top_k, 0)
      seeds[i] = s.seed
    longest = min(longest, self.steps.max_len - 1)
    for seq in self._waiting:
      seq.waited += seq.slot is None
    riding, self._riding = self._riding, []
    if not riding:
      self._cache, self._nxt, new, routing = self.steps.decode(
          self._cache, self._nxt, active, temperature, top_p, top_k, seeds, longest)
      dispatched.append(("step", rows, new, routing, b))
      return
    params = [seq.params for seq in riding]
    self._cache, self._nxt, new, routing = self.steps.decode_with_prompts(
        self._cache, self._nxt, active, temperature, top_p, top_k, seeds, longest,
        [(seq.slot, seq.prompt) for seq in riding], [p.temperature for p in params],
        [p.top_p for p in params], [max(p.top_k, 0) for p in params], [seq.seed for seq in riding])
    self.stats.mixed_steps += 1
    self.stats.prefill_computed_tokens += self.steps.packed_size(
        [len(seq.prompt) for seq in riding], mixed=True)
    for seq in riding:
      seq.prefilled = seq.position = len(seq.prompt)
      self._waiting.remove(seq)
      self.stats.prompt_tokens += len(seq.prompt)
    dispatched.append(("step", rows, new, routing, b))
    dispatched.append(("first", [(b + j, seq) for j, seq in enumerate(riding)], new))

  def _drain(self, pending: list[tuple]) -> None:
    for item in pending:
      if item[0] == "first":
        _, done, tokens = item
        tokens = self._fetch(tokens)  # one transfer for the whole pass
        for i, seq in done:
          if not seq.finished:
            self._on_token(seq, int(tokens[i]))
        continue
      _, rows, new, routing, b = item
      new = self._fetch(new)
      experts = self._fetch(routing[0]) if routing is not None else None
      self._step_stats(rows, experts, b)
      for i, seq in rows:
        if not seq.finished:
          self._on_token(seq, int(new[i]))

  def _fetch(self, x: jax.Array) -> np.ndarray:
    """x on the host; the time spent waiting for the device counts as `device_wait_s`."""
    t0 = time.perf_counter()
    out = np.asarray(x)
    self.stats.device_wait_s += time.perf_counter() - t0
    return out

  def _step_stats(self, rows: list[tuple[int, _Seq]], experts: np.ndarray | None, b: int) -> None:
    st = self.stats
    st.decode_steps += 1
    st.last_bucket = b
    st.last_occupancy = len(rows) / b
    if experts is None:
      return
    chosen = [frozenset(experts[i].tolist()) for i, _ in rows]
    st.distinct_experts = float(len(frozenset().union(*chosen)))
    switched = [seq.experts != c for (_, seq), c in zip(rows, chosen) if seq.experts is not None]
    st.switch_rate = float(np.mean(switched)) if switched else 0.0
    for (_, seq), c in zip(rows, chosen):
      seq.experts = c

  def _on_token(self, seq: _Seq, token: int) -> None:
    now = time.perf_counter()
    if seq.first_token_s is None:
      seq.first_token_s = now - seq.arrival
      self.stats.ttft_s.append(seq.first_token_s)
    seq.generated += 1
    self.stats.generated_tokens += 1
    self.stats.token_times.append(now)
    if ((not seq.params.ignore_eos and token in self.tokenizer.eos_ids)
        or token in seq.params.stop_token_ids):
      self._finish(seq, "stop", seq.detok.flush())
      return
    seq.stream.token_ids.append(token)
    delta = seq.detok.add(token)
    if seq.detok.stopped:
      self._finish(seq, "stop", delta)
    elif seq.generated >= seq.max_tokens:
      self._finish(seq, "length", delta + seq.detok.flush())
    elif delta:
      seq.stream._put(Output(delta, prompt_tokens=len(seq.prompt),
                             completion_tokens=seq.generated), self._outbox)

  def _finish(self, seq: _Seq, reason: str, text: str = "", error: str | None = None) -> None:
    seq.finished = True
    if seq.slot is not None and self._slots[seq.slot] is seq:
      self._slots[seq.slot] = None
    self.stats.requests_finished[reason] += 1
    # Before the last event goes out, so a caller that saw it reads settled figures.
    self.stats.running = sum(s is not None for s in self._slots)
    self.stats.waiting = sum(not s.finished for s in self._waiting)
    seq.stream._put(Output(text, finished=True, finish_reason=reason,
                           prompt_tokens=len(seq.prompt), completion_tokens=seq.generated,
                           error=error), self._outbox)

  def _fail_all(self, reason: str, error: str | None) -> None:
    for seq in list(self._waiting) + [s for s in self._slots if s is not None]:
      if not seq.finished:
        self._finish(seq, reason, error=error)
    self._waiting.clear()
    try:  # requests that arrived after the loop ended
      while True:
        seq = self._inbox.get_nowait()
        if seq is not None:
          self._finish(seq, reason, error=error)
    except queue.Empty:
      pass
    self._outbox.flush()
