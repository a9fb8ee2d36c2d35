"""One OpenAI generation answer built from the engine's events: a whole ``text_completion`` /
``chat.completion`` object, or a stream of server-sent events (``data: {...}`` chunks ending with
``data: [DONE]``); and the generation metrics (tokens sent, time to first token, queue length).
A client that disconnects cancels its sequence: the stream checks ``request.is_disconnected()``
after each chunk (and a waiting non-streamed request once a second)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from pimoe.extras import extra_imports
from pimoe.infer.http_errors import error_body
from pimoe.infer.openai_requests import ApiError
from pimoe.infer.text_generator import Cancellable, GenerationEvent, TextGenerator

with extra_imports("serve", "pimoe.infer.openai_reply"):
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_POLL_S = 1.0  # how often a waiting request checks for a disconnected client


class GenerationMetrics:
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
            queued.labels(model=name).set_function(queued_of(engine))


def queued_of(engine: TextGenerator) -> Callable[[], float]:
    return lambda: float(engine.queued)


class Reply:
    """Builds one request's answer (whole or streamed) from its engine events."""

    def __init__(self, model: str, chat: bool, metrics: GenerationMetrics, start: float) -> None:
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
        return sse(body)

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
                    yield sse(error_body(event.error[0], event.error[1]))
                    return
                if event.text:
                    yield self._chunk(event.text, None)
                if event.final:
                    yield self._chunk(None, event.finish_reason)
                    if include_usage:
                        yield sse(
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


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


__all__ = ["GenerationMetrics", "Reply", "sse"]
