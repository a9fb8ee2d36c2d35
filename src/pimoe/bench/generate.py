"""Text-generation benchmark: ``pimoe serve`` (continuous batching, OpenAI streaming API) against
Hugging Face ``generate``, then a bounded loopback soak (:mod:`pimoe.bench.generate_soak`).

SmolLM2-135M-Instruct serves greedy completions of prompts cut from Python's own docs
(``pydoc_data.topics``, ``prompt_tokens`` tokens each, ``max_tokens`` new tokens). The server runs
in a child process (so the load generator does not share its interpreter lock); ``concurrency``
streaming clients (aiohttp, SSE) send ``concurrency * waves`` requests for each level. Reported
per level: aggregate completion tokens per second (``usage`` counts over the wall time), time to
first token p50/p99 and inter-token latency p99 (gaps between text chunks of a stream). Peers, in
the same run, with the same number of torch threads: HF ``generate`` one request at a time
(``hf_sequential``), run before the first level and after each one, so that each level's ratio
(``x_hf_sequential``) is against the mean of the two runs around it and a change of the machine's
load during the run hits both sides; HF static batching (all of the largest level's prompts in one left-padded
``generate`` call, ``hf_static``); their tokens count up to and including each row's
end-of-sequence token. ``engine_in_process`` runs the same engine on the largest level's prompts
without HTTP (all submitted at once), separating the serving path's cost from the engine's.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pimoe.bench.child_server import stop
from pimoe.bench.generate_clients import (
    StreamResult,
    real_prompts,
    run_level,
    start_server,
    stream_completion,
    summarize,
)
from pimoe.bench.generate_peers import hf_sequential, hf_static_and_engine
from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text


@dataclass
class GenerateBenchConfig:
    """Sizes of the throughput runs and of the soak."""

    model: str = "smollm2-135m-instruct"
    levels: tuple[int, ...] = (1, 8, 32)
    waves: int = 2  # requests per level = level * waves (at least min_requests)
    min_requests: int = 4
    prompt_tokens: int = 64
    max_tokens: int = 64
    hf_sequential_requests: int = (
        3  # per HF sequential run (one before the first level and one after each)
    )
    threads: int = 1
    max_batch_size: int = 32
    seed: int = 0
    soak: dict[str, Any] = field(
        default_factory=lambda: {"num_requests": 10_000, "concurrency": 64}
    )


def run(
    cfg: GenerateBenchConfig, console: Console | None = None, work_dir: Path | None = None
) -> dict[str, Any]:
    """The throughput levels bracketed by HF sequential runs, the other peers and the soak; a
    JSON-serializable dict."""
    from pimoe.bench.generate_soak import run_soak
    from pimoe.models import load_pretrained

    console = console or Console()
    load_before = os.getloadavg()
    torch.set_num_threads(cfg.threads)
    model: Any
    model, tokenizer = load_pretrained(
        cfg.model, progress=True
    )  # the peers run here; the server loads the cached folder
    largest = max(cfg.levels)
    prompts = real_prompts(
        tokenizer, max(largest * cfg.waves, cfg.min_requests), cfg.prompt_tokens, cfg.seed
    )
    sequential_prompts = prompts[: cfg.hf_sequential_requests]
    with torch.inference_mode():
        model.generate(
            torch.tensor([prompts[0]]),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # warm-up
    levels: dict[str, dict[str, float]] = {}
    work = work_dir or Path.cwd()
    with open(work / "generate-server.log", "wb") as log:
        proc, url = start_server(cfg.model, cfg.threads, cfg.max_batch_size, log)
    try:
        bodies = [
            {"model": "lm", "prompt": p, "max_tokens": cfg.max_tokens, "temperature": 0}
            for p in prompts
        ]
        asyncio.run(run_level(url, bodies[:1], 1))  # warm-up
        brackets = [hf_sequential(model, tokenizer, cfg, sequential_prompts)]
        for (
            level
        ) in cfg.levels:  # each level between two HF sequential runs: load drift hits both sides
            count = max(level * cfg.waves, cfg.min_requests)
            console.print(f"[dim]{count} streamed requests, {level} concurrent[/dim]")
            levels[str(level)] = summarize(*asyncio.run(run_level(url, bodies[:count], level)))
            brackets.append(hf_sequential(model, tokenizer, cfg, sequential_prompts))
            peer = (brackets[-2]["tokens_per_s"] + brackets[-1]["tokens_per_s"]) / 2
            levels[str(level)]["hf_sequential_tokens_per_s"] = peer
            levels[str(level)]["x_hf_sequential"] = levels[str(level)]["tokens_per_s"] / peer
    finally:
        stop(proc)
    sequential: dict[str, Any] = {
        "requests_per_run": len(sequential_prompts),
        "runs": brackets,
        "tokens_per_s": sum(b["tokens_per_s"] for b in brackets) / len(brackets),
    }
    peers = {
        "hf_sequential": sequential,
        **hf_static_and_engine(model, tokenizer, cfg, prompts[:largest], console),
    }
    soak = run_soak(cfg.model, **cfg.soak, threads=cfg.threads, work_dir=work, console=console)
    result: dict[str, Any] = {
        **run_header("generate", cfg),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "levels": levels,
        **peers,
        "soak": soak,
    }
    for name, r in levels.items():
        for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms"):
            result[f"{key.replace('tokens_per_s', 'tokens_per_s_pimoe')}_{name}"] = r[key]
    result["tokens_per_s_hf_sequential"] = sequential["tokens_per_s"]
    result[f"tokens_per_s_hf_static_{largest}"] = peers["hf_static"]["tokens_per_s"]
    result[f"tokens_per_s_engine_in_process_{largest}"] = peers["engine_in_process"]["tokens_per_s"]
    result[f"speedup_{largest}_vs_hf_sequential"] = levels[str(largest)]["x_hf_sequential"]
    result["target_4x_met"] = result[f"speedup_{largest}_vs_hf_sequential"] >= 4.0
    _print(result, console)
    return result


def _print(result: dict[str, Any], console: Console) -> None:
    base = result["tokens_per_s_hf_sequential"]
    rows = [
        (
            f"pimoe, {level} streams",
            f"{r['tokens_per_s']:.1f}",
            f"{r['x_hf_sequential']:.2f}",
            f"{r['ttft_p50_ms']:.0f}",
            f"{r['ttft_p99_ms']:.0f}",
            f"{r['itl_p99_ms']:.0f}",
        )
        for level, r in result["levels"].items()
    ]
    for name in ("hf_sequential", "hf_static", "engine_in_process"):
        r = result[name]
        rows.append(
            (name, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / base:.2f}", "", "", "")
        )
    print_table(
        console,
        f"Greedy generation, {result['config']['model']}, {result['config']['max_tokens']} new tokens",
        ("contender", "tokens/s", "x HF sequential", "TTFT p50 ms", "TTFT p99 ms", "ITL p99 ms"),
        rows,
    )
    console.print(f"soak: {json.dumps(result['soak'])}")


def main(
    quick: bool = False,
    json_path: Path | None = None,
    soak_requests: int | None = None,
    long_prompt: bool = False,
) -> dict[str, Any]:
    """Entry point of ``pimoe bench generate``. ``quick``: 32 new tokens, fewer requests and a soak
    of 2,000 requests; ``soak_requests`` overrides the soak's request count. ``long_prompt``: run
    the long-prompt scenario instead (:mod:`pimoe.bench.generate_long`; ``quick``: a 1,024-token
    prompt among streams of 48 new tokens; its plot is written next to the JSON)."""
    if long_prompt:
        from pimoe.bench import generate_long

        long_cfg = generate_long.LongPromptConfig()
        if quick:
            long_cfg = generate_long.LongPromptConfig(long_prompt_tokens=1024, stream_max_tokens=48)
        result = _write(generate_long.run(long_cfg), json_path)
        if json_path is not None:
            generate_long.plot(result, Path(json_path).with_suffix(".png"))
        return result
    cfg = GenerateBenchConfig()
    if quick:
        cfg = GenerateBenchConfig(
            waves=1,
            max_tokens=32,
            hf_sequential_requests=2,
            soak={"num_requests": 2000, "concurrency": 64},
        )
    if soak_requests is not None:
        cfg.soak = {**cfg.soak, "num_requests": soak_requests}
    return _write(run(cfg), json_path)


def _write(result: dict[str, Any], json_path: Path | None) -> dict[str, Any]:
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, default=float))
    return result


__all__ = [
    "GenerateBenchConfig",
    "StreamResult",
    "main",
    "real_prompts",
    "run",
    "start_server",
    "stream_completion",
]
