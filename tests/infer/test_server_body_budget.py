"""Odd ``Content-Length`` forms, the budget of request bodies held at once, and TLS files that
cannot be used, over real loopback sockets (a few connections, about a second each)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from live_server import LiveServer, connect, tiny_lm

from pimoe.infer.security import RequestGuard, ServerLimits, uvicorn_options
from pimoe.infer.server import create_app

MAX_BODY = 64 * 1024
BUDGET = 2 * MAX_BODY
BODY_TIMEOUT = 1.0
LIMITS = ServerLimits(limit_concurrency=16, header_timeout_s=2.0, timeout_graceful_shutdown_s=1.0)
REQUEST = b'{"model": "lm", "token_ids": [1, 2, 3]}'


def _app() -> object:
    lm = tiny_lm()
    return create_app(
        {"lm": lm},
        max_body_bytes=MAX_BODY,
        max_total_body_bytes=BUDGET,
        body_timeout_s=BODY_TIMEOUT,
        max_wait_ms=0,
    )


def _head(length: bytes | None) -> bytes:
    framing = b"content-length: " + length if length is not None else b"transfer-encoding: chunked"
    return b"POST /v1/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%s\r\n\r\n" % (
        framing
    )


def _answer(sock: socket.socket, timeout: float) -> tuple[int, bytes, float]:
    """Status, bytes and seconds until the server's first answer (0 and b"" if none in time)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return 0, b"", time.monotonic() - start
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data, time.monotonic() - start


@pytest.mark.parametrize("length", [b"99999999  ", b"99999999\t", b"  99999999 \t "])
def test_a_padded_content_length_over_the_limit_is_413_at_once(length: bytes) -> None:
    """Optional whitespace around the value (RFC 9110) is not a reason to wait: before, trailing
    spaces hid the declared size and the client got a 408 after the body deadline."""
    server = LiveServer(_app(), **uvicorn_options(LIMITS))
    with server, connect(server.port) as sock:
        sock.sendall(_head(length) + b"{")
        status, data, took = _answer(sock, BODY_TIMEOUT + 2)
    assert status == 413 and b"99999999 bytes exceeds" in data, data[:300]
    assert took < BODY_TIMEOUT / 2


def test_bodies_held_at_once_are_bounded_by_the_budget() -> None:
    """Two half-sent bodies declaring ``MAX_BODY`` fill the budget: a third request with a body
    (declared or chunked) is a 503 at once, before its body is read, while /healthz answers; once
    the body deadline ends the two, requests are served again (before: every connection up to
    ``limit_concurrency`` could hold ``max_body_bytes``, 4 GiB at the defaults)."""
    server = LiveServer(_app(), **uvicorn_options(LIMITS))
    with server as client:
        slow = [connect(server.port) for _ in range(2)]
        try:
            for sock in slow:
                sock.sendall(_head(str(MAX_BODY).encode()) + b'{"model"')
            time.sleep(0.2)
            with connect(server.port) as third:
                third.sendall(_head(str(len(REQUEST)).encode()))  # headers only: no body yet
                status, data, took = _answer(third, 1.0)
            assert status == 503 and b'"code":"body_budget"' in data and took < 0.5, data[:300]
            assert b"request bodies" in data
            with connect(server.port) as chunked:
                chunked.sendall(_head(None) + b"%x\r\n%s\r\n" % (len(REQUEST), REQUEST))
                status, data, _ = _answer(chunked, 1.0)
            assert status == 503, data[:300]
            assert client.get("/healthz").status_code == 200
            for sock in slow:
                assert _answer(sock, BODY_TIMEOUT + 2)[0] == 408
        finally:
            for sock in slow:
                sock.close()
        ok = client.post("/v1/infer", content=REQUEST, headers={"content-type": "application/json"})
        assert ok.status_code == 200, ok.text
        metrics = client.get("/metrics").text
        assert 'pimoe_http_responses_total{status="503"} 2.0' in metrics


def test_the_budget_is_returned_after_each_answer() -> None:
    """More requests in sequence than the budget holds bodies: each returns its share."""
    server = LiveServer(_app(), **uvicorn_options(LIMITS))
    body = REQUEST + b" " * (MAX_BODY - len(REQUEST))  # a full-size body, whitespace padded
    with server as client:
        for _ in range(5):
            r = client.post("/v1/infer", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text


def test_a_budget_below_one_body_is_refused() -> None:
    with pytest.raises(ValueError, match="max_total_body_bytes"):
        RequestGuard(
            None,  # type: ignore[arg-type]
            api_key=None,
            open_paths=(),
            max_body_bytes=1024,
            max_total_body_bytes=1023,
            body_timeout_s=1.0,
            on_response=lambda status: None,
        )


def test_unusable_tls_files_are_a_value_error_naming_them(tmp_path: Path) -> None:
    """Before: a missing or non-PEM file passed ``uvicorn_options`` and failed inside
    ``uvicorn.run`` (after the model was loaded) with ``FileNotFoundError``/``ssl.SSLError``."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="missing.pem"):
        uvicorn_options(ssl_certfile=tmp_path / "missing.pem", ssl_keyfile=garbage)
    with pytest.raises(ValueError, match="garbage.pem"):
        uvicorn_options(ssl_certfile=garbage, ssl_keyfile=garbage)


def test_serve_checks_the_tls_files_before_loading_the_model(tmp_path: Path) -> None:
    from pimoe.infer.server import serve

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    # the model path does not exist either: the TLS error must come first
    with pytest.raises(ValueError, match="garbage.pem"):
        serve(tmp_path / "no-model.safetensors", ssl_certfile=garbage, ssl_keyfile=garbage)


@pytest.mark.parametrize("budget", [1023, 0, -5, True, 2.5e9])
def test_serve_refuses_a_bad_budget_before_loading_the_model(
    tmp_path: Path, budget: object
) -> None:
    """Before: serve() loaded the model and only create_app's guard refused the budget."""
    from pimoe.infer.server import serve

    error = TypeError if isinstance(budget, (bool, float)) else ValueError
    with pytest.raises(error, match="max_total_body_bytes"):  # the model path does not exist
        serve(tmp_path / "no-model.safetensors", max_body_bytes=1024, max_total_body_bytes=budget)  # type: ignore[arg-type]
