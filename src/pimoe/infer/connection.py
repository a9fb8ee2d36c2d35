"""The connection layer of the HTTP server: uvicorn settings and protocol limits.

:func:`uvicorn_options` configures the uvicorn server with :class:`ServerLimits`: a keep-alive
timeout, a graceful-shutdown deadline, a cap on open connections and in-flight requests, and,
through :func:`guarded_protocol`, a deadline and a byte cap for a request's headers (uvicorn has
neither: a client trickling header bytes keeps its connection forever); with TLS files, it loads
them first, so an unusable file is a ``ValueError`` before a model is loaded. The request-level
checks are :class:`pimoe.infer.security.RequestGuard`'s.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import ssl
from dataclasses import dataclass
from typing import Any

from pimoe.extras import extra_imports

with extra_imports("serve", "pimoe.infer.connection"):
    from starlette.types import Receive, Scope, Send

#: Scope key the connection layer sets on a request over ``limit_concurrency``.
OVERLOADED = "pimoe.overloaded"


@dataclass(frozen=True)
class ServerLimits:
    """Connection-level limits of the uvicorn server (``pimoe serve`` options of the same names).

    Args:
        limit_concurrency: most open connections, and most requests in flight; a request beyond
            either is answered 503 (``None``: no limit).
        timeout_keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        header_timeout_s: a connection whose next request's headers are not complete this many
            seconds after it opened (or after its previous answer) is closed.
        max_header_bytes: a connection that sent this many bytes without completing a request's
            headers is closed.
        timeout_graceful_shutdown_s: on SIGTERM/SIGINT, requests still running after this many
            seconds are cancelled and the server exits.
    """

    limit_concurrency: int | None = 512
    timeout_keep_alive_s: float = 5.0
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    timeout_graceful_shutdown_s: float = 10.0

    def __post_init__(self) -> None:
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(
                f"limit_concurrency must be >= 1 or None, got {self.limit_concurrency}"
            )
        for name in ("timeout_keep_alive_s", "header_timeout_s", "timeout_graceful_shutdown_s"):
            if not 0 < getattr(self, name) < math.inf:  # inf: a connection held open for ever
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")


def guarded_protocol(limits: ServerLimits) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with :class:`ServerLimits`'
    header deadline and byte cap, and with ``limit_concurrency`` answered by the app's
    :class:`RequestGuard` (503 in the app's error shape, counted) instead of uvicorn's plain text."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # uvicorn without httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class GuardedProtocol(Base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limit_concurrency = None  # checked in _flag_overload instead
            self._app = self.app
            self.app = self._flag_overload
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._idle_cycle: object = None

        async def _flag_overload(self, scope: Scope, receive: Receive, send: Send) -> None:
            limit = limits.limit_concurrency
            if limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
                scope[OVERLOADED] = True
            await self._app(scope, receive, send)

        def _await_headers(self) -> None:
            """Start the header deadline: no request since ``self.cycle`` may take longer."""
            self._cancel_header_timer()
            self._idle_cycle, self._header_bytes = self.cycle, 0
            self._header_timer = self.loop.call_later(
                limits.header_timeout_s, self._header_deadline
            )

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _idle(self) -> bool:
            """No new request began since the deadline started and none is being answered."""
            return self.cycle is self._idle_cycle and (
                self.cycle is None or self.cycle.response_complete
            )

        def _header_deadline(self) -> None:
            self._header_timer = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is None or self.transport.is_closing():
                return
            if self.cycle is not self._idle_cycle:  # a request's headers completed
                self._cancel_header_timer()
                return
            self._header_bytes += len(data)
            if self._header_bytes > limits.max_header_bytes:
                self._cancel_header_timer()
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return GuardedProtocol


def uvicorn_options(
    limits: ServerLimits | None = None,
    ssl_certfile: str | os.PathLike[str] | None = None,
    ssl_keyfile: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` that apply ``limits`` (default
    :class:`ServerLimits`) and, with both files given, TLS. ``ValueError`` naming the file when
    the TLS files cannot be read or do not hold a PEM certificate and its unencrypted key (checked
    here, before a model is loaded, rather than by ``uvicorn.run``)."""
    limits = limits or ServerLimits()
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
    if ssl_certfile is not None and ssl_keyfile is not None:
        _check_tls_files(os.fspath(ssl_certfile), os.fspath(ssl_keyfile))
    options: dict[str, Any] = {
        "http": guarded_protocol(limits),
        "timeout_keep_alive": limits.timeout_keep_alive_s,
        "timeout_graceful_shutdown": limits.timeout_graceful_shutdown_s,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }
    if ssl_certfile is not None:
        options.update(ssl_certfile=os.fspath(ssl_certfile), ssl_keyfile=os.fspath(ssl_keyfile))  # type: ignore[arg-type]
    return options


def _check_tls_files(certfile: str, keyfile: str) -> None:
    """``ValueError`` unless ``certfile`` and ``keyfile`` load as a PEM certificate chain and its
    private key (an encrypted key fails: no password is asked for)."""
    for role, path in (("ssl_certfile", certfile), ("ssl_keyfile", keyfile)):
        if not os.path.isfile(path):
            raise ValueError(f"{role} {path!r} is not a readable file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            certfile, keyfile, password=lambda: b""
        )
    except (ssl.SSLError, OSError) as err:
        raise ValueError(
            f"TLS files ssl_certfile={certfile!r}, ssl_keyfile={keyfile!r} do not hold a PEM "
            f"certificate and its unencrypted private key: {err}"
        ) from err


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: assume it is reachable from outside
        return False


__all__ = ["OVERLOADED", "ServerLimits", "guarded_protocol", "is_loopback", "uvicorn_options"]
