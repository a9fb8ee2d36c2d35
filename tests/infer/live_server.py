"""A real uvicorn server on a loopback port for the HTTP tests (imported by them)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import torch
import uvicorn

from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_lm() -> PiMoELM:
    """The seeded 1-layer PiMoELM (block 16, d_model 16, 2 experts top-1) the server tests serve."""
    torch.manual_seed(0)
    return PiMoELM(
        LMConfig(
            block_size=16,
            n_layer=1,
            n_head=2,
            d_model=16,
            moe=MoEConfig(num_experts=2, top_k=1, ffn_dim=16),
        )
    )


def connect(port: int) -> socket.socket:
    """A raw loopback connection to ``port`` (Nagle off), for requests no HTTP client would send."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class LiveServer:
    """A uvicorn server on a background thread; ``with LiveServer(app) as client`` gives an httpx client.

    ``options`` go to ``uvicorn.Config``; with ``ssl_certfile`` the client speaks HTTPS and
    verifies with ``verify`` (an ``ssl.SSLContext`` trusting the test certificate).
    """

    def __init__(self, app: object, verify: object = True, **options: object) -> None:
        self.port = _free_port()
        self.scheme = "https" if options.get("ssl_certfile") else "http"
        self.verify = verify
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **options)
        )  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.client = httpx.Client(
            base_url=f"{self.scheme}://127.0.0.1:{self.port}", timeout=10, verify=self.verify
        )  # type: ignore[arg-type]
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
