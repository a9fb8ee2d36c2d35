"""What keeps the HTTP server up and private: the request guard (an ASGI middleware) and the
connection limits of the uvicorn server that runs it.

:class:`RequestGuard` sees every HTTP request before the app does. In order, it answers

- 503 when the connection layer flagged the request as over ``limit_concurrency`` (``/healthz``
  is still answered, so liveness probes see a live server);
- 401 when an API key is set and the path is not an open one (default: only ``/healthz``) and the
  request lacks ``Authorization: Bearer <key>`` (compared in constant time);
- 413 when ``Content-Length`` (optional whitespace around it allowed) exceeds
  ``max_body_bytes``, and also while reading a body that has no ``Content-Length`` (chunked):
  bytes are counted as they arrive and the answer goes out as soon as the limit is passed, so at
  most ``max_body_bytes`` are buffered per request;
- 503 when the bodies of the requests in flight would pass ``max_total_body_bytes`` (a declared
  body before it is read, a chunked one as soon as it does): a request's share is held from its
  headers to the end of its answer, so at most that many body bytes are held at once, whatever
  the number of connections;
- 408 when the body has not fully arrived ``body_timeout_s`` after the request's headers.

413, 408 and a 503 for the body budget close the connection. Every answer, the app's included, is reported by status to
``on_response``; an exception escaping the app becomes a 500 in the same error shape.

The connection-level limits (:class:`ServerLimits`, :func:`guarded_protocol`,
:func:`uvicorn_options`) are in :mod:`pimoe.infer.connection` and exported here too.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
from collections.abc import Callable, Collection

from pimoe.extras import extra_imports
from pimoe.infer.connection import (
    OVERLOADED,
    ServerLimits,
    guarded_protocol,
    is_loopback,
    uvicorn_options,
)
from pimoe.infer.http_errors import clip, error_response

with extra_imports("serve", "pimoe.infer.security"):
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths answered without an API key.
OPEN_PATHS: frozenset[str] = frozenset({"/healthz"})
#: FastAPI's documentation paths (served only with ``docs=True``; then also open).
DOCS_PATHS: frozenset[str] = frozenset(
    {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
_CLOSE = {"connection": "close"}


def total_body_budget(max_body_bytes: int, max_total_body_bytes: int | None) -> int:
    """The server's budget of body bytes held at once: ``max_total_body_bytes``, or by default
    (``None``) 32 bodies of ``max_body_bytes``. ``TypeError`` for a non-integer (a bool or float
    included), ``ValueError`` for a budget below one body."""
    for name, value in (
        ("max_body_bytes", max_body_bytes),
        ("max_total_body_bytes", max_total_body_bytes),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if max_total_body_bytes is None:
        return 32 * max_body_bytes
    if max_total_body_bytes < max_body_bytes:
        raise ValueError(
            f"max_total_body_bytes ({max_total_body_bytes}) must be >= max_body_bytes "
            f"({max_body_bytes}): no request of the largest size could be read"
        )
    return max_total_body_bytes


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Disconnected(Exception):
    pass


class RequestGuard:
    """ASGI middleware: overload, API key, body size and body-read deadline (module docstring).

    Args:
        app: the wrapped ASGI app.
        api_key: the key clients must send as ``Authorization: Bearer <key>``; ``None``: no check.
        open_paths: paths answered without the key.
        max_body_bytes: largest request body (``Content-Length`` or bytes read).
        max_total_body_bytes: most body bytes held by all requests in flight together (at least
            ``max_body_bytes``); ``None``: no bound beyond ``max_body_bytes`` per request.
        body_timeout_s: longest time from the request's headers to the end of its body.
        on_response: called with the status of every answer.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        open_paths: Collection[str],
        max_body_bytes: int,
        body_timeout_s: float,
        on_response: Callable[[int], None],
        max_total_body_bytes: int | None = None,
    ) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty: give a non-empty key or None")
        if max_body_bytes < 1 or not 0 < body_timeout_s < math.inf:
            raise ValueError(
                f"max_body_bytes must be >= 1 and body_timeout_s > 0 and finite, got "
                f"{max_body_bytes}, {body_timeout_s}"
            )
        if max_total_body_bytes is not None:
            total_body_budget(max_body_bytes, max_total_body_bytes)
        self.app, self.open_paths, self.max_body_bytes = app, frozenset(open_paths), max_body_bytes
        self.body_timeout_s, self.on_response = body_timeout_s, on_response
        self.max_total_body_bytes = max_total_body_bytes
        self.held_body_bytes = 0  # body bytes of the requests in flight (one event loop: no lock)
        self._key_digest = _digest(api_key.encode()) if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.on_response(int(message["status"]))
            await send(message)

        held = _Held(self)
        try:
            try:
                held.take(self._check_headers(scope))
                body = await self._read_body(receive, held)
            except _Reject as r:
                headers = (
                    {"www-authenticate": "Bearer"}
                    if r.status == 401
                    else _CLOSE
                    if r.status in (408, 413) or r.code == "body_budget"
                    else {}
                )
                await error_response(r.status, r.message, code=r.code, headers=headers)(
                    scope, receive, counted_send
                )
                return
            except _Disconnected:
                return
            try:
                await self.app(scope, _replay(body, receive), counted_send)
            except Exception:
                if not started:
                    await error_response(500, "internal server error", code="internal_error")(
                        scope, receive, counted_send
                    )
                raise
        finally:
            held.release()

    def _check_headers(self, scope: Scope) -> int:
        """Overload, API key and ``Content-Length`` checks (``_Reject`` on failure); the declared
        body size (0 without one)."""
        path = scope["path"]
        if scope.get(OVERLOADED) and path not in OPEN_PATHS:
            raise _Reject(503, "the server is at its concurrency limit; retry later", "overloaded")
        auth, length = None, None
        for key, value in scope["headers"]:
            if key == b"authorization":
                auth = value
            elif key == b"content-length":
                length = value
        if (
            self._key_digest is not None
            and path not in self.open_paths
            and not self._authorized(auth)
        ):
            raise _Reject(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                "invalid_api_key",
            )
        length = (length or b"").strip(b" \t")  # optional whitespace (RFC 9110 5.5)
        if not length:
            return 0
        if not length.isdigit():  # the HTTP parser refuses these first; kept for other servers
            raise _Reject(
                400, f"invalid Content-Length {clip(length.decode('latin-1'))}", "invalid_header"
            )
        if int(length) > self.max_body_bytes:
            raise _Reject(
                413,
                f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes} "
                "bytes",
                "body_too_large",
            )
        return int(length)

    def _authorized(self, header: bytes | None) -> bool:
        scheme, _, token = (header or b"").partition(b" ")
        # Comparing digests keeps the time independent of the key's content and length.
        ok = hmac.compare_digest(_digest(token.strip()), self._key_digest or b"")
        return ok and scheme.lower() == b"bearer"

    async def _read_body(self, receive: Receive, held: _Held) -> bytes:
        """The whole body, counting bytes as they arrive (into ``held``); ``_Reject`` past the
        size, the budget or the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise _Reject(
                    408,
                    f"the request body did not arrive within {self.body_timeout_s:g} s",
                    "body_timeout",
                ) from None
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _Reject(
                    413,
                    f"request body exceeds the limit of {self.max_body_bytes} bytes",
                    "body_too_large",
                )
            held.take(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _Held:
    """One request's share of :attr:`RequestGuard.max_total_body_bytes`, grown as its body is
    declared or read and given back once, when the request ends."""

    def __init__(self, guard: RequestGuard) -> None:
        self.guard, self.size = guard, 0

    def take(self, size: int) -> None:
        """Hold ``size`` bytes in all (no more than already held: nothing changes); ``_Reject``
        503 when the budget has no room for the difference."""
        more, budget = size - self.size, self.guard.max_total_body_bytes
        if more <= 0:
            return
        if budget is not None and self.guard.held_body_bytes + more > budget:
            raise _Reject(
                503,
                f"the server holds too many request bodies ({budget} bytes in all); retry later",
                "body_budget",
            )
        self.guard.held_body_bytes += more
        self.size = size

    def release(self) -> None:
        self.guard.held_body_bytes -= self.size
        self.size = 0


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the already read ``body`` once, then defers to ``receive``
    (which reports the client's disconnect to streaming answers)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


__all__ = [
    "DOCS_PATHS",
    "OPEN_PATHS",
    "OVERLOADED",
    "RequestGuard",
    "ServerLimits",
    "guarded_protocol",
    "is_loopback",
    "uvicorn_options",
]
