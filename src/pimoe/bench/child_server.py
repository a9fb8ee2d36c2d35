"""A server in a child process for the HTTP benchmarks: start it, wait for ``/healthz``, stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import IO

import numpy as np


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    code: str, args: list[str], threads: int, log: IO[bytes], timeout_s: float = 60.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``python -c code *args`` (``"{port}"`` in ``args`` becomes a free port;
    ``OMP_NUM_THREADS=threads``; output to ``log``) and return the process and its base URL once
    ``/healthz`` answers 200."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    argv = [arg.replace("{port}", str(port)) for arg in args]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"the server did not answer /healthz within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (kill it after 10 s)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values``."""
    return float(np.percentile(np.asarray(values), q))
