"""Bounded loopback soak of the generation server: many requests at high concurrency, watching for
5xx answers, memory growth and a stalled ``/healthz``.

The served model is a tiny random Llama (hidden 64, 2 layers) with the real tokenizer and chat
template of the benchmark's model, so the run exercises the server (HTTP, SSE, the engine's
scheduling, the slot cache) rather than the matrix multiplies. Requests cycle through a streamed
completion, a plain completion and a chat completion (``max_tokens`` 8, sampled at temperature 1
with a per-request seed, prompts from the pydoc text). The server's resident memory is read from
``/proc/<pid>/status`` after a warm-up and then every second; ``/healthz`` is polled every 0.25 s
throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from pimoe.bench.child_server import percentile, stop
from pimoe.bench.generate_clients import start_server, stream_completion
from pimoe.bench.tiny_llama import save_tiny_llama, tiny_llama
from pimoe.data import load_pydoc_text


def save_tiny_model(tokenizer_source: Path, folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 64) with the tokenizer (and chat template) of
    ``tokenizer_source``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model = tiny_llama(tokenizer, hidden_size=64, max_position_embeddings=512, seed=seed)
    return save_tiny_llama(folder, tokenizer, model)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _soak(
    url: str, pid: int, num_requests: int, concurrency: int, warmup: int
) -> dict[str, Any]:
    text = load_pydoc_text().decode("utf-8")
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(text) - 400, size=num_requests).tolist()
    statuses: Counter[str] = Counter()
    rss: list[float] = []
    health: Counter[str] = Counter()
    health_latencies: list[float] = []
    done = asyncio.Event()
    next_index = 0
    bar = tqdm(total=num_requests, desc=f"soak, {concurrency} concurrent")

    async def one(session: aiohttp.ClientSession, i: int) -> str:
        prompt = text[starts[i] : starts[i] + 40 + i % 300]
        common = {"model": "lm", "max_tokens": 8, "seed": i}
        if i % 3 == 0:
            return str((await stream_completion(session, {**common, "prompt": prompt})).status)
        path, body = (
            ("/v1/completions", {**common, "prompt": prompt})
            if i % 3 == 1
            else (
                "/v1/chat/completions",
                {**common, "messages": [{"role": "user", "content": prompt}]},
            )
        )
        async with session.post(path, json=body) as response:
            await response.read()
            return str(response.status)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < num_requests:
            i = next_index
            next_index += 1
            try:
                statuses[await one(session, i)] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                statuses[f"client error {type(err).__name__}"] += 1
            bar.update()
            if i == warmup:
                rss.append(_rss_mb(pid))

    async def watch(session: aiohttp.ClientSession) -> None:
        last_rss = time.monotonic()
        while not done.is_set():
            start = time.perf_counter()
            try:
                async with session.get(
                    "/healthz", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    await response.read()
                    health["ok" if response.status == 200 else "failed"] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                health["failed"] += 1
            health_latencies.append(time.perf_counter() - start)
            if rss and time.monotonic() - last_rss > 1:
                rss.append(_rss_mb(pid))
                last_rss = time.monotonic()
            await asyncio.sleep(0.25)

    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(
            base_url=url, timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
        ) as s,
        aiohttp.ClientSession(base_url=url, timeout=timeout) as health_session,
    ):
        watcher = asyncio.create_task(watch(health_session))
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
        done.set()
        await watcher
    bar.close()
    rss.append(_rss_mb(pid))
    latencies = health_latencies
    return {
        "requests": num_requests,
        "concurrency": concurrency,
        "seconds": seconds,
        "requests_per_s": num_requests / seconds,
        "statuses": dict(statuses),
        "server_errors_5xx": sum(n for k, n in statuses.items() if k.startswith("5")),
        "rss_after_warmup_mb": rss[0],
        "rss_end_mb": rss[-1],
        "rss_max_mb": max(rss),
        "rss_growth": rss[-1] / rss[0] - 1,
        "healthz": {
            "ok": health["ok"],
            "failed": health["failed"],
            "p99_ms": percentile(latencies, 99) * 1000,
            "max_ms": max(latencies) * 1000,
        },
    }


def run_soak(
    model: str,
    num_requests: int = 10_000,
    concurrency: int = 64,
    threads: int = 1,
    work_dir: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Serve a tiny model with ``model``'s tokenizer and send it ``num_requests`` requests,
    ``concurrency`` at a time; the figures of :func:`_soak` plus pass/fail of the three checks
    (zero 5xx, RSS growth under 10%, ``/healthz`` never failing)."""
    from pimoe.models.pretrained import cache_path

    console = console or Console()
    work = work_dir or Path.cwd()
    folder = save_tiny_model(cache_path(model), work / "soak-model")
    with open(work / "soak-server.log", "wb") as log:
        proc, url = start_server(folder, threads, 64, log)
    try:
        result = asyncio.run(
            _soak(url, proc.pid, num_requests, concurrency, warmup=min(500, num_requests // 10))
        )
    finally:
        stop(proc)
    result["checks"] = {
        "zero_5xx": result["server_errors_5xx"] == 0,
        "rss_growth_under_10pct": result["rss_growth"] < 0.10,
        "healthz_always_answered": result["healthz"]["failed"] == 0,
    }
    console.print(f"soak checks: {result['checks']}")
    return result


__all__ = ["run_soak", "save_tiny_model"]
