"""The bodies of the OpenAI generation routes (``/v1/completions``, ``/v1/chat/completions``),
checked strictly (unknown fields and wrong types are 400 naming the field), and how a body becomes
a prompt's token ids and :class:`~pimoe.infer.sampling.SamplingParams`. Every problem is an
:class:`ApiError` (HTTP status, message, OpenAI ``param`` and ``code``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pimoe.extras import extra_imports
from pimoe.infer.decode_batch import TextModel
from pimoe.infer.http_errors import clip, error_response
from pimoe.infer.sampling import SamplingParams

with extra_imports("serve", "pimoe.infer.openai_requests"):
    from fastapi import Request
    from fastapi.responses import JSONResponse


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
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


class ChatCompletionRequest(SamplingFields):
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's ``dict``; ``ApiError`` for a key given twice (which one would count
    depends on the parser, so a proxy and the server could read different requests)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ApiError(400, f"the request body gives the key {clip(key)} twice", key)
        seen.add(key)
    return dict(pairs)


async def parse_body(request: Request, model: type[SamplingFields]) -> Any:
    try:
        body = json.loads(await request.body(), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(
            400, f"the request body is not valid JSON ({clip(str(err), quote=False)})"
        ) from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
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


def completion_prompt(model: TextModel, req: CompletionRequest) -> list[int]:
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


def chat_prompt(model: TextModel, req: ChatCompletionRequest) -> list[int]:
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
        _check_text(m["content"], f"messages.{i}.content")  # the template tokenizes them once
    try:
        return model.chat_ids(messages)
    except ValueError as err:
        raise ApiError(400, str(err), "messages") from None


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, f"{param} is not valid Unicode (it holds a lone surrogate)", param
        ) from None


def _encode(model: TextModel, text: str, param: str) -> list[int]:
    _check_text(text, param)
    return model.encode(text)


def sampling_params(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n} is not supported: one completion per request (n=1)", "n")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens < 1:  # overridden, but still a wrong value
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
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


__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "SamplingFields",
    "StreamOptions",
    "TextPart",
    "chat_prompt",
    "completion_prompt",
    "parse_body",
    "sampling_params",
]
