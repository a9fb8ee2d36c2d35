"""OpenAI-compatible text generation routes: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (the tokenizer's chat template), each optionally streamed as
server-sent events (``data: {...}`` chunks ending with ``data: [DONE]``).

:func:`mount_generation` adds them to an app, one :class:`GenerationEngine` per model. Request
bodies are checked strictly (unknown fields, ``n != 1`` and wrong types are 400 naming the field),
an unknown model is 404, a full engine queue 429, a passed deadline 504; every error has
:mod:`pimoe.infer.http_errors`' shape, which the ``openai`` package maps to its exception types.
A client that disconnects cancels its sequence: the stream checks ``request.is_disconnected()``
after each chunk (and a waiting non-streamed request once a second).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pimoe.extras import extra_imports
from pimoe.infer.decode_batch import GenerationModel, TextModel
from pimoe.infer.generation import (
    Cancellable,
    EngineClosed,
    EngineFull,
    GenerationEngine,
    GenerationEvent,
    SamplingParams,
    TextGenerator,
)
from pimoe.infer.http_errors import clip, error_body, error_response

with extra_imports("serve", "pimoe.infer.openai_api"):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_POLL_S = 1.0  # how often a waiting request checks for a disconnected client


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions`` (one prompt: a string, a list of one string, or token ids)."""

    prompt: str | list[str] | list[int]
    max_tokens: int | None = 16


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class ApiError(Exception):
    """An error answer: HTTP ``status``, message, OpenAI ``param`` and ``code``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, code=self.code, param=self.param)


class _GenerationMetrics:
    def __init__(self, registry: CollectorRegistry, engines: Mapping[str, TextGenerator]) -> None:
        self.tokens = Counter(
            "pimoe_generated_tokens",
            "Completion tokens sent, by model",
            ["model"],
            registry=registry,
        )
        self.ttft = Histogram(
            "pimoe_time_to_first_token_seconds",
            "Time from request to first completion text",
            ["model"],
            registry=registry,
        )
        queued = Gauge(
            "pimoe_generation_queued",
            "Requests waiting for a decoding row",
            ["model"],
            registry=registry,
        )
        for name, engine in engines.items():
            queued.labels(model=name).set_function(_queued_of(engine))


def _queued_of(engine: TextGenerator) -> Callable[[], float]:
    return lambda: float(engine.queued)


def mount_generation(
    app: FastAPI,
    models: Mapping[str, GenerationModel | TextGenerator],
    *,
    max_batch_size: int = 32,
    max_queue: int = 256,
    max_context: int | None = 2048,
    max_prefill_tokens: int | None = 512,
    timeout_s: float | None = 600.0,
) -> None:
    """Add the OpenAI generation routes to ``app`` for ``models`` (name -> a model, served by a new
    :class:`GenerationEngine` with ``max_batch_size``, ``max_queue``, ``max_context`` (which
    bounds the KV memory) and ``max_prefill_tokens``, or an engine). Each
    request must finish within ``timeout_s`` (504 otherwise; None: no deadline). The engines'
    metrics join ``app.state.metrics.registry`` when the app has one; the engines are closed
    when the app shuts down."""
    engines: dict[str, TextGenerator] = {
        name: GenerationEngine(m, max_batch_size, max_queue, max_context, max_prefill_tokens)
        if isinstance(m, GenerationModel)
        else m
        for name, m in models.items()
    }
    app.state.generation = engines
    registry = getattr(getattr(app.state, "metrics", None), "registry", None)
    metrics = _GenerationMetrics(registry if registry is not None else CollectorRegistry(), engines)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            yield state
        for engine in engines.values():
            await asyncio.to_thread(engine.close)

    app.router.lifespan_context = lifespan
    created = int(time.time())

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "pimoe"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The generation models."""
        return {"object": "list", "data": [card(name) for name in engines]}

    @app.get("/v1/models/{name:path}", response_model=None)
    async def get_model(name: str) -> dict[str, Any] | JSONResponse:
        if name not in engines:
            return ApiError(
                404, f"unknown model {clip(name)}", "model", "model_not_found"
            ).response()
        return card(name)

    async def run(request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        try:
            req = await _parse(request, ChatCompletionRequest if chat else CompletionRequest)
            if req.model not in engines:
                raise ApiError(
                    404,
                    f"unknown model {clip(req.model)}; served: {sorted(engines)}",
                    "model",
                    "model_not_found",
                )
            engine = engines[req.model]
            prompt = (
                _chat_prompt(engine.model, req) if chat else _completion_prompt(engine.model, req)
            )
            params = _sampling(req)
            if engine.greedy_only and (
                (params.temperature > 0 and req.temperature is not None) or params.top_p < 1
            ):
                param = "top_p" if params.top_p < 1 else "temperature"
                raise ApiError(
                    400,
                    f"model {clip(req.model)} decodes greedily: {param} must be omitted (or "
                    f"temperature 0, top_p 1)",
                    param,
                )
            events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            ticket = _submit(
                engine,
                prompt,
                params,
                lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                timeout_s,
                "messages" if chat else "prompt",
            )
        except ApiError as err:
            return err.response()
        reply = _Reply(req.model, chat, metrics, start)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                reply.stream(request, events, ticket, include_usage),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return await reply.whole(request, events, ticket)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        """OpenAI text completion (``stream: true`` for server-sent events)."""
        return await run(request, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completion (``stream: true`` for server-sent events)."""
        return await run(request, chat=True)


async def _parse(request: Request, model: type[_Sampling]) -> Any:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(
            400, f"the request body is not valid JSON ({clip(str(err), quote=False)})"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unsupported parameter"
        raise ApiError(
            400, clip(f"{param}: {msg}", 500, quote=False), param, "invalid_value"
        ) from None


def _completion_prompt(model: TextModel, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return _encode(model, prompt, "prompt")
    texts = [p for p in prompt if isinstance(p, str)]
    if texts:
        if len(prompt) != 1:
            raise ApiError(400, f"one prompt per request is supported, got {len(prompt)}", "prompt")
        return _encode(model, texts[0], "prompt")
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < model.vocab_size]
    if bad:
        raise ApiError(
            400, f"token ids must be in [0, {model.vocab_size}), got {clip(bad[:5])}", "prompt"
        )
    return ids


def _chat_prompt(model: TextModel, req: ChatCompletionRequest) -> list[int]:
    if not req.messages:
        raise ApiError(400, "messages is empty", "messages")
    messages = [
        {
            "role": m.role,
            "content": m.content
            if isinstance(m.content, str)
            else "".join(p.text for p in m.content),
        }
        for m in req.messages
    ]
    for i, m in enumerate(messages):
        _encode(model, m["content"], f"messages.{i}.content")  # checks the text
    try:
        return model.chat_ids(messages)
    except ValueError as err:
        raise ApiError(400, str(err), "messages") from None


def _encode(model: TextModel, text: str, param: str) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, f"{param} is not valid Unicode (it holds a lone surrogate)", param
        ) from None
    return model.encode(text)


def _sampling(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n} is not supported: one completion per request (n=1)", "n")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    values = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "seed": req.seed,
        "stop": stop,
    }
    try:
        return SamplingParams(**values)  # type: ignore[arg-type]
    except ValueError as err:
        param = next((k for k in values if str(err).startswith(k)), None)
        raise ApiError(400, str(err), param) from None


def _submit(
    engine: TextGenerator,
    prompt: list[int],
    params: SamplingParams,
    on_event: Any,
    timeout_s: float | None,
    param: str,
) -> Cancellable:
    try:
        return engine.submit(prompt, params, on_event, timeout_s)
    except EngineFull as err:
        raise ApiError(429, f"the server is busy: {err}; retry later", code="queue_full") from None
    except EngineClosed as err:
        raise ApiError(503, str(err), code="shutting_down") from None
    except ValueError as err:
        raise ApiError(400, str(err), param, "context_length_exceeded") from None


class _Reply:
    """Builds one request's answer (whole or streamed) from its engine events."""

    def __init__(self, model: str, chat: bool, metrics: _GenerationMetrics, start: float) -> None:
        self.model, self.chat, self.metrics, self.start = model, chat, metrics, start
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.first = True

    def _observe(self, event: GenerationEvent) -> None:
        if self.first and (event.text or event.final):
            self.first = False
            self.metrics.ttft.labels(model=self.model).observe(time.perf_counter() - self.start)
        if event.final:
            self.metrics.tokens.labels(model=self.model).inc(event.completion_tokens)

    async def _next(
        self, request: Request, events: asyncio.Queue[GenerationEvent], ticket: Cancellable
    ) -> GenerationEvent | None:
        """The next event, or None once the client has gone (its sequence is then cancelled)."""
        while True:
            try:
                event = await asyncio.wait_for(events.get(), _POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    ticket.cancel()
                    return None
                continue
            self._observe(event)
            return event

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    @staticmethod
    def _usage(event: GenerationEvent) -> dict[str, int]:
        return {
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
        }

    async def whole(
        self, request: Request, events: asyncio.Queue[GenerationEvent], ticket: Cancellable
    ) -> Response:
        parts: list[str] = []
        while True:
            event = await self._next(request, events, ticket)
            if event is None:
                return Response(status_code=499)  # nobody is listening
            if event.error is not None:
                return ApiError(
                    event.error[0],
                    event.error[1],
                    code="timeout" if event.error[0] == 504 else None,
                ).response()
            parts.append(event.text)
            if event.final:
                break
        text = "".join(parts)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": event.finish_reason,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": event.finish_reason,
            }
            body = self._envelope("text_completion", [choice])
        return JSONResponse({**body, "usage": self._usage(event)})

    def _chunk(self, text: str | None, finish: str | None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""}
                if role
                else {}
                if text is None
                else {"content": text}
            )
            body = self._envelope(
                "chat.completion.chunk",
                [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            )
        else:
            body = self._envelope(
                "text_completion",
                [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}],
            )
        return _sse(body)

    async def stream(
        self,
        request: Request,
        events: asyncio.Queue[GenerationEvent],
        ticket: Cancellable,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk(None, None, role=True)
            while True:
                event = await self._next(request, events, ticket)
                if event is None:
                    return
                if event.error is not None:
                    yield _sse(error_body(event.error[0], event.error[1]))
                    return
                if event.text:
                    yield self._chunk(event.text, None)
                if event.final:
                    yield self._chunk(None, event.finish_reason)
                    if include_usage:
                        yield _sse(
                            {
                                **self._envelope(
                                    "chat.completion.chunk" if self.chat else "text_completion", []
                                ),
                                "usage": self._usage(event),
                            }
                        )
                    yield "data: [DONE]\n\n"
                    return
                if await request.is_disconnected():
                    return
        finally:
            ticket.cancel()  # no-op for a finished sequence; frees the row of an abandoned one


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


__all__ = ["ApiError", "ChatCompletionRequest", "CompletionRequest", "mount_generation"]
