"""Serving benchmark: a bounded loopback HTTP load against ``pimoe serve`` in three modes.

One small :class:`PiMoELM` (the demo's shape, untrained: the weights do not change the cost) is
saved once and served by uvicorn in a child process (so the load generator does not share the
server's interpreter lock) in each mode:

- ``one_by_one``: ``max_batch_size=1``, every request runs its own forward pass;
- ``batching``: the micro-batcher (``max_batch_size=32``, ``max_wait_ms=5``);
- ``batching_cache``: the same plus the LRU result cache (``cache_size=256``).

The load is the same seeded trace in every mode: ``num_requests`` POST /v1/infer calls with
``token_ids`` drawn from a pool of ``num_prompts`` pydoc text windows (16 to 96 bytes) by a Zipf
law of skew ``zipf_skew`` over the pool (popular prompts repeat, as in real traffic), sent by
``concurrency`` asyncio clients over keep-alive connections (aiohttp), answer ``next_token_id`` only.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import aiohttp
import numpy as np
import torch
from rich.console import Console

from pimoe.bench.cache import zipf_trace
from pimoe.bench.child_server import percentile, start_server, stop
from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.data import load_pydoc_text
from pimoe.io import atomic_write_text
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM

MODES: dict[str, dict[str, int]] = {
    "one_by_one": {"max_batch_size": 1, "cache_size": 0},
    "batching": {"max_batch_size": 32, "cache_size": 0},
    "batching_cache": {"max_batch_size": 32, "cache_size": 256},
}

_SERVER_CODE = (
    "import sys; from pimoe.infer.server import serve; "
    "serve(sys.argv[1], name='lm', host='127.0.0.1', port=int(sys.argv[2]), max_batch_size=int(sys.argv[3]), "
    "max_wait_ms=float(sys.argv[4]), cache_size=int(sys.argv[5]))"
)


@dataclass
class ServeBenchConfig:
    """Load and model sizes (by default 2,000 requests, 32 concurrent)."""

    num_requests: int = 2000
    concurrency: int = 32
    num_prompts: int = 500
    zipf_skew: float = 1.0
    min_len: int = 16
    max_len: int = 96
    max_wait_ms: float = 5.0
    warmup_requests: int = 64
    server_threads: int = 2
    seed: int = 0


def prompts_and_trace(cfg: ServeBenchConfig) -> tuple[list[list[int]], list[int]]:
    """The prompt pool (pydoc text windows as byte ids) and the seeded Zipf order of requests."""
    text = load_pydoc_text()
    rng = np.random.default_rng(cfg.seed)
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=cfg.num_prompts)
    starts = rng.integers(0, len(text) - cfg.max_len, size=cfg.num_prompts)
    pool = [list(text[s : s + n]) for s, n in zip(starts.tolist(), lengths.tolist())]
    return pool, zipf_trace(cfg.num_prompts, cfg.num_requests, cfg.zipf_skew, cfg.seed)


def _start_server(
    model_path: Path, mode: dict[str, int], cfg: ServeBenchConfig, log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``serve`` in a child process (output to ``log``); return it and its base URL once
    /healthz answers."""
    args = [
        str(model_path),
        "{port}",
        str(mode["max_batch_size"]),
        str(cfg.max_wait_ms),
        str(mode["cache_size"]),
    ]
    return start_server(_SERVER_CODE, args, cfg.server_threads, log)


async def _load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    """Send ``bodies`` with ``concurrency`` clients; return (seconds, latencies in s of the
    answered requests, errors: non-200 answers and connection failures).

    The load generator is aiohttp: it costs about 0.5 ms of CPU per request here against httpx's
    5 ms, and client and server share the machine's two cores."""
    latencies: list[float] = []
    errors = 0
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        base_url=url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < len(bodies):
                body = bodies[next_index]
                next_index += 1
                start = time.perf_counter()
                try:
                    async with session.post("/v1/infer", json=body) as response:
                        await response.read()
                except (
                    aiohttp.ClientError,
                    asyncio.TimeoutError,
                ):  # counted, not raised: the report says how many failed
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                errors += response.status != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, errors


def run_mode(
    model_path: Path, mode: dict[str, int], bodies: list[dict], cfg: ServeBenchConfig
) -> dict:
    """Serve the model in ``mode`` and measure the load (after ``warmup_requests`` unmeasured ones)."""
    log_path = model_path.with_name(f"server-{mode['max_batch_size']}-{mode['cache_size']}.log")
    with open(log_path, "wb") as log:
        proc, url = _start_server(model_path, mode, cfg, log)
    try:
        asyncio.run(_load(url, bodies[: cfg.warmup_requests], cfg.concurrency))
        seconds, latencies, errors = asyncio.run(_load(url, bodies, cfg.concurrency))
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            metrics = response.read().decode()
    finally:
        stop(proc)
    server_errors = [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if "Error" in line or "Traceback" in line
    ]
    return {
        **mode,
        "requests": len(bodies),
        "errors": errors,
        "seconds": seconds,
        "throughput_rps": len(bodies) / seconds,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
        "mean_batch_size": _mean_batch_size(metrics),
        "server_error_lines": server_errors[:5],
    }


def _mean_batch_size(metrics: str) -> float:
    """Requests per forward pass from the server's ``pimoe_batch_size`` histogram (warmup included)."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("pimoe_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("pimoe_batch_size_count"):
            count = float(line.split()[-1])
    return total / count if count else 0.0


def run(cfg: ServeBenchConfig, console: Console | None = None) -> dict:
    """Measure every mode on the same trace; return the results as a JSON-serializable dict."""
    console = console or Console()
    pool, trace = prompts_and_trace(cfg)
    bodies = [{"model": "lm", "token_ids": pool[i], "return_logits": False} for i in trace]
    model_config = LMConfig(
        block_size=128,
        n_layer=4,
        n_head=4,
        d_model=128,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=128),
    )
    torch.manual_seed(cfg.seed)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        model_path = Path(folder) / "model.safetensors"
        PiMoELM(model_config).save(model_path)
        for name, mode in MODES.items():
            console.print(
                f"[dim]mode {name}: {len(bodies)} requests, {cfg.concurrency} concurrent[/dim]"
            )
            results[name] = run_mode(model_path, mode, bodies, cfg)
    base = results["one_by_one"]["throughput_rps"]
    result = {
        **run_header("serve", cfg),
        "model": asdict(model_config),
        "distinct_prompts_in_trace": len(set(trace)),
        "modes": results,
        "throughput_ratio_batching": results["batching"]["throughput_rps"] / base,
        "throughput_ratio_batching_cache": results["batching_cache"]["throughput_rps"] / base,
    }
    _print(result, console)
    return result


def _print(result: dict, console: Console) -> None:
    cfg = result["config"]
    base = result["modes"]["one_by_one"]["throughput_rps"]
    print_table(
        console,
        f"Loopback HTTP load: {cfg['num_requests']} requests, {cfg['concurrency']} concurrent, "
        f"Zipf {cfg['zipf_skew']} over {cfg['num_prompts']} prompts",
        ("mode", "req/s", "x one-by-one", "p50 ms", "p99 ms", "mean batch", "errors"),
        [
            (
                name,
                f"{r['throughput_rps']:.1f}",
                f"{r['throughput_rps'] / base:.2f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['mean_batch_size']:.1f}",
                str(r["errors"]),
            )
            for name, r in result["modes"].items()
        ],
    )


def main(quick: bool = False, json_path: Path | None = None) -> dict:
    """Entry point of ``benchmarks/serve.py`` (and of ``pimoe bench serve``)."""
    cfg = ServeBenchConfig(num_requests=300, warmup_requests=32) if quick else ServeBenchConfig()
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
