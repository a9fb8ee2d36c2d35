"""OpenAI-compatible text generation routes: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (the tokenizer's chat template), each optionally streamed as
server-sent events (``data: {...}`` chunks ending with ``data: [DONE]``).

:func:`mount_generation` adds them to an app, one :class:`GenerationEngine` per model. Request
bodies are checked strictly (:mod:`pimoe.infer.openai_requests`: unknown fields, ``n != 1`` and
wrong types are 400 naming the field), an unknown model is 404, a full engine queue 429, a passed
deadline 504; every error has :mod:`pimoe.infer.http_errors`' shape, which the ``openai`` package
maps to its exception types. Answers and streams are built by :mod:`pimoe.infer.openai_reply`;
a client that disconnects cancels its sequence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from pimoe.extras import extra_imports
from pimoe.infer.decode_batch import GenerationModel
from pimoe.infer.generation import GenerationEngine
from pimoe.infer.http_errors import clip
from pimoe.infer.openai_reply import GenerationMetrics, Reply
from pimoe.infer.openai_requests import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_prompt,
    completion_prompt,
    parse_body,
    sampling_params,
)
from pimoe.infer.request_queue import EngineClosed, EngineFull
from pimoe.infer.sampling import SamplingParams
from pimoe.infer.text_generator import Cancellable, GenerationEvent, TextGenerator

with extra_imports("serve", "pimoe.infer.openai_api"):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CollectorRegistry


#: Prompts tokenized at the same time (each in a worker thread, off the event loop); a prompt of
#: megabytes holds hundreds of MB of token ids until it is refused for its length.
TOKENIZE_AT_ONCE = 2


def mount_generation(
    app: FastAPI,
    models: Mapping[str, GenerationModel | TextGenerator],
    *,
    max_batch_size: int = 32,
    max_queue: int = 256,
    max_context: int | None = 2048,
    max_num_batched_tokens: int | None = 512,
    enable_chunked_prefill: bool = False,
    timeout_s: float | None = 600.0,
) -> None:
    """Add the OpenAI generation routes to ``app`` for ``models`` (name -> a model, served by a new
    :class:`GenerationEngine` with ``max_batch_size``, ``max_queue``, ``max_context`` (which
    bounds the KV memory), ``max_num_batched_tokens`` and ``enable_chunked_prefill``, or an
    engine). Each request must finish within ``timeout_s`` (504 otherwise; None: no deadline).
    The engines' metrics join ``app.state.metrics.registry`` when the app has one; the engines
    are closed when the app shuts down."""
    engines: dict[str, TextGenerator] = {
        name: GenerationEngine(
            m,
            max_batch_size,
            max_queue,
            max_context,
            max_num_batched_tokens,
            enable_chunked_prefill,
        )
        if isinstance(m, GenerationModel)
        else m
        for name, m in models.items()
    }
    app.state.generation = engines
    registry = getattr(getattr(app.state, "metrics", None), "registry", None)
    metrics = GenerationMetrics(registry if registry is not None else CollectorRegistry(), engines)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            yield state
        for engine in engines.values():
            await asyncio.to_thread(engine.close)

    app.router.lifespan_context = lifespan
    created = int(time.time())
    tokenizing = asyncio.Semaphore(TOKENIZE_AT_ONCE)  # bounds the memory of huge prompts

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
            req = await parse_body(request, ChatCompletionRequest if chat else CompletionRequest)
            if req.model not in engines:
                raise ApiError(
                    404,
                    f"unknown model {clip(req.model)}; served: {sorted(engines)}",
                    "model",
                    "model_not_found",
                )
            engine = engines[req.model]
            # off the event loop: tokenizing a prompt of megabytes takes seconds
            async with tokenizing:
                prompt = await asyncio.to_thread(
                    chat_prompt if chat else completion_prompt,
                    engine.model,
                    req,
                )
            params = sampling_params(req)
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
        reply = Reply(req.model, chat, metrics, start)
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


__all__ = [
    "TOKENIZE_AT_ONCE",
    "ApiError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "mount_generation",
]
