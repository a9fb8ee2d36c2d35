"""The generation benchmark's client side: the server under test in a child process, real
prompts, and streaming clients that time each chunk of a streamed ``/v1/completions``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import numpy as np

from pimoe.bench import child_server
from pimoe.bench.child_server import percentile
from pimoe.data import load_pydoc_text

_SERVER_CODE = (
    "import sys, torch; torch.set_num_threads(int(sys.argv[4])); from pimoe.infer.server import serve; "
    "serve(sys.argv[1], name='lm', host='127.0.0.1', port=int(sys.argv[2]), max_batch_size=int(sys.argv[3]))"
)


def real_prompts(tokenizer: Any, count: int, tokens: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``tokens`` token ids each, from seeded windows of the pydoc text."""
    text = load_pydoc_text().decode("utf-8")
    rng = np.random.default_rng(seed)
    prompts = []
    for start in rng.integers(0, len(text) - 20 * tokens, size=count).tolist():
        ids = tokenizer(text[start : start + 20 * tokens], add_special_tokens=False)["input_ids"]
        prompts.append(list(ids[:tokens]))
    return prompts


def start_server(
    spec: str | Path, threads: int, max_batch_size: int, log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], str]:
    """``pimoe.infer.server.serve(spec)`` in a child process (model name ``lm``); returns it and its
    base URL once ``/healthz`` answers (loading a model can take a minute on a busy machine)."""
    return child_server.start_server(
        _SERVER_CODE,
        [str(spec), "{port}", str(max_batch_size), str(threads)],
        threads,
        log,
        timeout_s=300,
    )


@dataclass
class StreamResult:
    """One streamed request: HTTP status, time to first text (s), gaps between text chunks (s),
    completion tokens (from ``usage``)."""

    status: int
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


async def stream_completion(session: aiohttp.ClientSession, body: dict[str, Any]) -> StreamResult:
    """POST a streamed ``/v1/completions`` and time its chunks."""
    start = time.perf_counter()
    async with session.post(
        "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as response:
        if response.status != 200:
            await response.read()
            return StreamResult(response.status)
        result, last = StreamResult(200), 0.0
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
        return result


async def run_level(
    url: str, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[float, list[StreamResult]]:
    results: list[StreamResult] = []
    pending = list(reversed(bodies))
    async with aiohttp.ClientSession(
        base_url=url,
        timeout=aiohttp.ClientTimeout(total=1800),
        connector=aiohttp.TCPConnector(limit=concurrency),
    ) as session:

        async def worker() -> None:
            while pending:
                results.append(await stream_completion(session, pending.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, results


def summarize(seconds: float, results: list[StreamResult]) -> dict[str, float]:
    ok = [r for r in results if r.status == 200]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "seconds": seconds,
        "tokens": sum(r.tokens for r in ok),
        "tokens_per_s": sum(r.tokens for r in ok) / seconds,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "itl_p99_ms": percentile(gaps, 99) * 1000 if gaps else float("nan"),
    }


__all__ = [
    "StreamResult",
    "real_prompts",
    "run_level",
    "start_server",
    "stream_completion",
    "summarize",
]
