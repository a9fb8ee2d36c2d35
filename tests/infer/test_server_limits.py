"""Body size counted while reading, body/header deadlines, the concurrency limit and the graceful
shutdown deadline, over real loopback sockets (a few connections, a few seconds each)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from live_server import LiveServer, connect, tiny_lm  # noqa: E402

from pimoe.infer.security import ServerLimits, uvicorn_options  # noqa: E402
from pimoe.infer.server import create_app  # noqa: E402

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 1.0
LIMITS = ServerLimits(
    limit_concurrency=6,
    timeout_keep_alive_s=0.3,
    header_timeout_s=1.0,
    max_header_bytes=8192,
    timeout_graceful_shutdown_s=1.0,
)
REQUEST = b'{"model": "lm", "token_ids": [1, 2, 3]}'


def _app(body_timeout_s: float = BODY_TIMEOUT) -> object:
    lm = tiny_lm()
    return create_app(
        {"lm": lm}, max_body_bytes=MAX_BODY, body_timeout_s=body_timeout_s, max_wait_ms=0
    )


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer(_app(), **uvicorn_options(LIMITS))
    with server:
        yield server


def _head(length: int | None = None, path: str = "/v1/infer") -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{framing}\r\n\r\n".encode()


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What the server sent within ``timeout`` seconds and whether it closed the connection."""
    sock.settimeout(0.1)
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def test_a_chunked_body_over_the_limit_is_413_before_it_ends(live: LiveServer) -> None:
    """The client sends just over the limit in chunks and never ends the body: counting while
    reading answers at once (before: the server waited for the end, buffering all of it)."""
    with connect(live.port) as sock:
        sock.sendall(_head())
        chunk = b"x" * 4096
        for _ in range(MAX_BODY // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        start = time.monotonic()
        data, closed = _read_until_closed(sock, 3)
    assert _status(data) == 413 and b"exceeds the limit" in data, data[:300]
    assert closed and time.monotonic() - start < 1.5


def test_a_chunked_body_within_the_limit_is_served(live: LiveServer) -> None:
    r = live.client.post(
        "/v1/infer",
        content=iter([REQUEST[:10], REQUEST[10:]]),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200 and r.request.headers["transfer-encoding"] == "chunked"


def test_a_partial_body_is_answered_408_and_closed(live: LiveServer) -> None:
    with connect(live.port) as sock:
        sock.sendall(_head(len(REQUEST)) + REQUEST[:10])
        start = time.monotonic()
        data, closed = _read_until_closed(sock, BODY_TIMEOUT + 3)
        took = time.monotonic() - start
    assert _status(data) == 408 and b'"code":"body_timeout"' in data, data[:300]
    assert closed and BODY_TIMEOUT * 0.8 < took < BODY_TIMEOUT + 1.5


def test_trickled_headers_are_cut_off(live: LiveServer) -> None:
    """One header byte every 0.2 s keeps uvicorn's keep-alive timer from firing; the header
    deadline closes the connection anyway."""
    with connect(live.port) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        closed = False
        while not closed and time.monotonic() - start < LIMITS.header_timeout_s + 3:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            _, closed = _read_until_closed(sock, 0.2)
        took = time.monotonic() - start
    assert took < LIMITS.header_timeout_s + 1.5


def test_an_idle_connection_and_oversized_headers_are_closed(live: LiveServer) -> None:
    with connect(live.port) as idle, connect(live.port) as big:
        big.sendall(
            b"GET /healthz HTTP/1.1\r\n" + b"x-filler: " + b"a" * (LIMITS.max_header_bytes + 100)
        )
        data, closed = _read_until_closed(big, 0.8)  # closed at once, well before the deadline
        assert closed and not data
        data, closed = _read_until_closed(idle, LIMITS.header_timeout_s + 2)
        assert closed and not data


def test_keep_alive_connection_is_closed_when_idle(live: LiveServer) -> None:
    """Closed after the keep-alive timeout (0.3 s), well before the header deadline (1 s)."""
    with connect(live.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        start = time.monotonic()
        data, closed = _read_until_closed(sock, LIMITS.header_timeout_s + 2)
    assert (
        _status(data) == 200 and closed and time.monotonic() - start < LIMITS.header_timeout_s - 0.2
    )


def test_slow_clients_do_not_deny_service() -> None:
    """As many half-sent requests as the concurrency limit: another request gets a 503 in the
    app's error shape (counted), /healthz still answers, and service is back once the body
    deadline has cut them off (before: they were held for minutes and nothing else was served).
    A server of its own, so that no other test's connection counts against the limit."""
    server = LiveServer(_app(), **uvicorn_options(LIMITS))
    with server as client:
        slow = [connect(server.port) for _ in range(LIMITS.limit_concurrency or 0)]
        try:
            for sock in slow:
                sock.sendall(_head(len(REQUEST)) + REQUEST[:5])
            time.sleep(0.2)
            r = client.post(
                "/v1/infer", content=REQUEST, headers={"content-type": "application/json"}
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert client.get("/healthz").status_code == 200
            for sock in slow:
                data, closed = _read_until_closed(sock, BODY_TIMEOUT + 2)
                assert _status(data) == 408 and closed
        finally:
            for sock in slow:
                sock.close()
        time.sleep(0.1)
        assert (
            client.post(
                "/v1/infer", content=REQUEST, headers={"content-type": "application/json"}
            ).status_code
            == 200
        )
        metrics = client.get("/metrics").text
        assert 'pimoe_http_responses_total{status="503"} 1.0' in metrics
        assert f'pimoe_http_responses_total{{status="408"}} {float(len(slow))}' in metrics


@pytest.mark.parametrize("graceful", [True, False])
def test_a_partial_body_does_not_block_shutdown(graceful: bool) -> None:
    """With a body deadline far away, only the graceful-shutdown deadline ends the server while a
    client holds a half-sent body; without it (uvicorn's default) the server waits for ever."""
    limits = LIMITS if graceful else None
    options = uvicorn_options(limits)
    if not graceful:
        options["timeout_graceful_shutdown"] = None
    server = LiveServer(_app(body_timeout_s=60), **options)
    with server, connect(server.port) as sock:
        sock.sendall(_head(len(REQUEST)) + REQUEST[:5])
        time.sleep(0.2)
        start = time.monotonic()
        server.server.should_exit = True  # what uvicorn's SIGTERM handler does
        server.thread.join(LIMITS.timeout_graceful_shutdown_s + 2)
        stopped = not server.thread.is_alive()
        took = time.monotonic() - start
    if graceful:
        assert stopped and took < LIMITS.timeout_graceful_shutdown_s + 1.5
    else:
        assert not stopped
        server.server.force_exit = True  # end the hung server now
        server.thread.join(5)


@pytest.fixture(scope="module")
def served_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen, int]]:
    """``pimoe serve`` in a child process (real signals, real RSS) with an API key from the environment."""
    path = tmp_path_factory.mktemp("proc") / "lm.safetensors"
    tiny_lm().save(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable,
        "-c",
        "from pimoe.cli import app; app()",
        "serve",
        str(path),
        "--port",
        str(port),
        "--body-timeout",
        "60",
        "--timeout-graceful-shutdown",
        "1",
    ]
    proc = subprocess.Popen(
        args,
        env={**os.environ, "PIMOE_API_KEY": "k"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(
            f"pimoe serve did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
        )
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_50mb_chunked_body_does_not_grow_the_server(
    served_process: tuple[subprocess.Popen, int],
) -> None:
    """The measured defect: 50 MB chunked raised the server's RSS by ~560 MB before the 413."""
    proc, port = served_process
    before = _rss_kib(proc.pid)
    sent = 0
    with connect(port) as sock:
        sock.sendall(_head().replace(b"host: x\r\n", b"host: x\r\nauthorization: Bearer k\r\n"))
        chunk = b"x" * 65536
        try:
            while sent < 50 * 2**20:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed
            pass
        data, _ = _read_until_closed(sock, 5)
    assert _status(data) == 413, data[:200]
    assert sent < 50 * 2**20  # cut off before the client could send it all
    assert _rss_kib(proc.pid) - before < 32 * 1024  # at most the 8 MiB body (and its join) was held


@pytest.mark.slow
def test_sigterm_with_a_half_sent_body_exits_within_the_deadline(
    served_process: tuple[subprocess.Popen, int],
) -> None:
    """The measured defect: one partial body blocked SIGTERM shutdown for ever."""
    proc, port = served_process
    with connect(port) as sock:
        sock.sendall(
            _head(len(REQUEST)).replace(b"host: x\r\n", b"host: x\r\nauthorization: Bearer k\r\n")
            + REQUEST[:5]
        )
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        took = time.monotonic() - start
    # uvicorn re-raises the signal after its shutdown, so the exit status is SIGTERM's
    assert proc.returncode in (0, -signal.SIGTERM) and took < 5, (proc.returncode, took)
