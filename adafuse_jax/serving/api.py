"""The OpenAI-compatible HTTP API over one or more engines (FastAPI; `python -m adafuse_jax.serve`).

Endpoints: `/v1/completions`, `/v1/chat/completions` (with `stream: true` as server-sent events
ending in `data: [DONE]`), `/v1/models`, `/health`, `/metrics` (Prometheus text). Every engine
(the backbone, each loaded pool) is a model name. Bad requests get OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) with the matching status; the server keeps
serving.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from adafuse_jax.errors import UserError
from adafuse_jax.serving.engine import Engine, EngineError, RequestStream, SamplingParams
from adafuse_jax.serving.metrics import metrics_text

DEFAULT_MAX_BODY = 4 << 20


def error_response(status: int, message: str, *, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
  """OpenAI's error object."""
  return JSONResponse(status_code=status, content={
      "error": {"message": message, "type": kind, "param": param, "code": code}})


class _Common(BaseModel):
  """Fields shared by completions and chat (unknown fields are ignored, as OpenAI's API does)."""

  model_config = ConfigDict(extra="ignore")

  model: str
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop: str | list[str] | None = None
  seed: int | None = None
  n: int = 1
  stream: bool = False
  stream_options: dict[str, Any] | None = None
  ignore_eos: bool = False
  # Accepted at their neutral values only: anything else is refused by name, never ignored.
  logprobs: bool | int | None = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0

  def sampling(self, default_max_tokens: int | None) -> SamplingParams:
    if self.n != 1:
      raise UserError(f"n={self.n}: this server returns one choice per request; send n=1 (or"
                      " several requests)")
    if self.logprobs:
      raise UserError("logprobs are not supported; leave logprobs unset")
    if self.presence_penalty or self.frequency_penalty:
      raise UserError("presence_penalty and frequency_penalty are not supported; leave them 0")
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
    max_tokens = self.max_completion_tokens if self.max_tokens is None else self.max_tokens
    return SamplingParams(max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                          temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                          seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)

  @property
  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Common):
  prompt: str | list[str] | list[int]
  echo: bool = False
  best_of: int | None = None

  def prompt_value(self) -> str | list[int]:
    if self.echo:
      raise UserError("echo is not supported; leave it false")
    if self.best_of not in (None, 1):
      raise UserError("best_of must be 1 (or unset)")
    if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
      if len(self.prompt) != 1:
        raise UserError(f"prompt holds {len(self.prompt)} strings; send one prompt per request")
      return self.prompt[0]
    return self.prompt


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="ignore")

  role: Literal["system", "user", "assistant"]
  content: str | list[dict[str, Any]]

  def text(self) -> str:
    if isinstance(self.content, str):
      return self.content
    parts = []
    for part in self.content:
      if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise UserError("message content parts must be {'type': 'text', 'text': ...}; this model"
                        " reads text only")
      parts.append(part["text"])
    return "".join(parts)


class ChatRequest(_Common):
  messages: list[ChatMessage] = Field(min_length=1)


def _usage(out) -> dict[str, int]:
  """OpenAI's usage object from an `Output` or a `Completion` (both carry the two counts)."""
  return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
          "total_tokens": out.prompt_tokens + out.completion_tokens}


def _sse(obj: dict | str) -> bytes:
  data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
  return f"data: {data}\n\n".encode()


class _BodyLimit:
  """Refuses request bodies over `limit` bytes with 413, before they are read whole."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope.get("headers") or ()).get(b"content-length")
    too_large = error_response(413, f"the request body is larger than {self.limit} bytes; send a"
                               " shorter prompt", code="request_too_large")
    if length is not None and length.isdigit() and int(length) > self.limit:
      return await too_large(scope, receive, send)
    seen = 0
    started = False

    async def counted():
      nonlocal seen
      message = await receive()
      if message["type"] == "http.request":
        seen += len(message.get("body", b""))
        if seen > self.limit:
          raise _TooLarge
      return message

    async def tracked_send(message):
      nonlocal started
      started = started or message["type"] == "http.response.start"
      await send(message)

    try:
      await self.app(scope, counted, tracked_send)
    except _TooLarge:
      if not started:
        await too_large(scope, receive, send)


class _CountResponses:
  """Counts answered HTTP requests by path and status into `counts` (for /metrics).

  A plain ASGI wrapper, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware passes
  every chunk of a streamed response through a task and a memory stream, which a CPU profile
  of the server under 32 streams put at a third of the event loop's time."""

  def __init__(self, app, counts: dict[tuple[str, str], int]):
    self.app, self.counts = app, counts

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def counting_send(message):
      if message["type"] == "http.response.start":
        key = (scope["path"], str(message["status"]))
        self.counts[key] = self.counts.get(key, 0) + 1
      await send(message)

    await self.app(scope, receive, counting_send)


class _TooLarge(Exception):
  """A request body grew past the limit while it was read."""


class _UnknownModel(Exception):
  """A request named a model this server does not serve (answered with 404)."""


def create_app(engines: dict[str, Engine], *, max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
  """The FastAPI app serving `engines` (model name -> started engine)."""
  app = FastAPI(title="adafuse-jax", docs_url=None, redoc_url=None)
  app.state.http_counts = {}
  created = int(time.time())

  @app.exception_handler(RequestValidationError)
  async def invalid(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
      return error_response(400, f"the request body is not valid JSON: {first.get('msg', '')};"
                            " send a JSON object", code="invalid_json")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}",
                          param=where or None)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

  @app.exception_handler(UserError)
  async def user_error(request: Request, exc: UserError):
    return error_response(400, str(exc))

  @app.exception_handler(EngineError)
  async def engine_error(request: Request, exc: EngineError):
    return error_response(503, str(exc), kind="server_error")

  def engine_for(name: str) -> Engine:
    if name not in engines:
      raise _UnknownModel(name)
    return engines[name]

  @app.exception_handler(_UnknownModel)
  async def unknown_model(request: Request, exc: _UnknownModel):
    return error_response(404, f"the model {exc.args[0]!r} does not exist; this server has"
                          f" {sorted(engines)} (GET /v1/models)", param="model",
                          code="model_not_found")

  @app.exception_handler(Exception)
  async def internal(request: Request, exc: Exception):
    return error_response(500, f"internal error: {exc!r}", kind="server_error")

  @app.get("/health")
  async def health():
    failed = [n for n, e in engines.items() if e._failure is not None]
    if failed:
      return error_response(503, f"engines failed: {failed}", kind="server_error")
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "adafuse-jax",
         "max_model_len": e.max_seq_len, "experts": e.has_router} for name, e in engines.items()]}

  @app.get("/metrics")
  async def metrics():
    return Response(metrics_text(engines, app.state.http_counts),
                    media_type="text/plain; version=0.0.4; charset=utf-8")

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest):
    engine = engine_for(body.model)
    params = body.sampling(default_max_tokens=16)
    stream = engine.submit_async(body.prompt_value(), params)
    rid = f"cmpl-{uuid.uuid4().hex}"

    def chunk(text: str, finish: str | None) -> dict:
      return {"id": rid, "object": "text_completion", "created": int(time.time()),
              "model": body.model,
              "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    if body.stream:
      return _stream_response(stream, chunk, body.include_usage)
    result = await _result(stream)
    out = chunk(result.text, result.finish_reason)
    out["usage"] = _usage(result)
    return out

  @app.post("/v1/chat/completions")
  async def chat(body: ChatRequest):
    engine = engine_for(body.model)
    params = body.sampling(default_max_tokens=None)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
      prompt = engine.tokenizer.encode_chat(messages)
    except ValueError as e:
      raise UserError(f"model {body.model!r}: {e}") from None
    params = dataclasses.replace(params, stop_token_ids=engine.tokenizer.chat_stop_ids)
    stream = engine.submit_async(prompt, params)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    first = [True]

    def chunk(text: str, finish: str | None) -> dict:
      delta: dict[str, str] = {}
      if first[0]:
        delta["role"], first[0] = "assistant", False
      if text or finish is None:
        delta["content"] = text
      return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
              "model": body.model,
              "choices": [{"index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": finish}]}

    if body.stream:
      return _stream_response(stream, chunk, body.include_usage)
    result = await _result(stream)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": _usage(result)}

  return _CountResponses(_BodyLimit(app, max_body_bytes),  # type: ignore[return-value]
                         app.state.http_counts)


async def _result(stream: RequestStream):
  try:
    return await stream.aresult()
  finally:
    stream.cancel()  # no-op when finished; frees the row if the client went away


def _stream_response(stream: RequestStream, chunk, include_usage: bool) -> StreamingResponse:
  async def events() -> AsyncIterator[bytes]:
    try:
      async for out in stream:
        if out.finish_reason == "error":
          yield _sse({"error": {"message": out.error, "type": "server_error", "param": None,
                                "code": None}})
          break
        if out.text or out.finished:
          yield _sse(chunk(out.text, out.finish_reason if out.finished else None))
        if out.finished and include_usage:
          last = chunk("", None)
          last["choices"], last["usage"] = [], _usage(out)
          yield _sse(last)
      yield _sse("[DONE]")
    finally:
      stream.cancel()  # the client disconnected (or we are done): free the row

  return StreamingResponse(events(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})
