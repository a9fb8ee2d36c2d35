"""The one error shape of the HTTP server: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Every error answer of :func:`pimoe.infer.server.create_app`, whatever its status and whichever
layer produces it (a route, FastAPI's validation, Starlette's 404/405, the request guard's
401/408/413/503, an unhandled exception's 500), has this body, so one client-side handler (the
``openai`` package's, for instance: it reads ``error.message``) understands all of them.
Echoed user input goes through :func:`clip`, so an answer never grows with the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pimoe.extras import extra_imports

with extra_imports("serve", "pimoe.infer.http_errors"):
    from starlette.responses import JSONResponse


#: How many characters of a user-supplied value an error message quotes at most.
CLIP_CHARS = 200

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status: ``"invalid_request_error"`` for other 4xx,
    ``"server_error"`` for 5xx."""
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error answer with HTTP ``status``.

    Args:
        message: what is wrong, for a person (quote user input only through :func:`clip`).
        code: a short machine-readable reason (``"invalid_api_key"``, ``"model_not_found"``, ...).
        param: the request field at fault, if one is.
    """
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A :class:`JSONResponse` with :func:`error_body` and ``status``."""
    return JSONResponse(
        error_body(status, message, code=code, param=param),
        status_code=status,
        headers=dict(headers) if headers else None,
    )


def clip(value: object, limit: int = CLIP_CHARS, quote: bool = True) -> str:
    """``value`` for quoting in an error message: ``repr`` of at most ``limit`` characters of a
    string (``quote=False``: the characters themselves), saying how many were left out. Lone
    surrogates and (quoted) control characters are escaped, so the message is always valid UTF-8."""
    text = value if isinstance(value, str) else repr(value)
    cut = text[:limit]
    shown = (
        repr(cut)
        if quote and isinstance(value, str)
        else cut.encode("utf-8", "backslashreplace").decode()
    )
    return shown if len(text) <= limit else f"{shown}... ({len(text) - limit} more characters)"


__all__ = ["CLIP_CHARS", "clip", "error_body", "error_response", "error_type"]
