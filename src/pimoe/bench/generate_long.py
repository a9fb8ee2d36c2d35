"""A long prompt arriving among running streams, chunked prefill off vs on
(``pimoe bench generate --long-prompt``).

SmolLM2-135M-Instruct in pimoe's generation engine (in the benchmark's process, no HTTP, so the
timings are the engine's): ``streams`` greedy completions of real prompts (``stream_prompt_tokens``
each, ``stream_max_tokens`` new tokens) start; once every stream has sent text twice, one prompt
of ``long_prompt_tokens`` tokens arrives. Without chunked prefill its whole prefill runs between
two decoding steps, so every stream waits for it; with ``enable_chunked_prefill`` it is prefilled
in chunks of at most ``max_num_batched_tokens`` tokens (less the running streams' tokens), one
chunk a step, the streams decoding in between; that mode runs at each budget of
``chunked_budgets`` (the first is also the unchunked mode's budget). Reported per mode: the streams' inter-token
latency (gaps between their text events) p50/p99/max, overall and while the long prompt was
being prefilled (from its arrival to its first token), the long prompt's time to first token,
and the engine's step and chunk counts. The modes alternate (off, on, on, off, on, on, ...) so a
change of the machine's load hits all of them; each figure is the median over the runs.
"""

from __future__ import annotations

import itertools
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pimoe.bench.child_server import percentile
from pimoe.bench.generate_clients import real_prompts
from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.io import save_png


@dataclass
class LongPromptConfig:
    """Sizes of the long-prompt scenario."""

    model: str = "smollm2-135m-instruct"
    streams: int = 4
    stream_prompt_tokens: int = 64
    stream_max_tokens: int = 64
    long_prompt_tokens: int = 1536
    chunked_budgets: tuple[int, ...] = (512, 128)  # max_num_batched_tokens; 512: pimoe serve's
    repeats: int = 2  # runs per mode
    threads: int = 1
    seed: int = 0


def _run_once(
    model: Any,
    prompts: list[list[int]],
    long_prompt: list[int],
    cfg: LongPromptConfig,
    budget: int,
    chunked: bool,
) -> dict[str, Any]:
    from pimoe.infer.generation import GenerationEngine, GenerationEvent, SamplingParams

    engine = GenerationEngine(
        model,
        max_batch_size=cfg.streams + 1,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
    )
    times: list[list[float]] = [[] for _ in prompts]
    ready = threading.Semaphore(0)
    long_first: list[float] = []

    def on_stream(i: int) -> Any:
        def on_event(event: GenerationEvent) -> None:
            if event.text or event.final:
                times[i].append(time.perf_counter())
                if len(times[i]) == 2 or (event.final and len(times[i]) == 1):
                    ready.release()

        return on_event

    def on_long(event: GenerationEvent) -> None:
        if not long_first:
            long_first.append(time.perf_counter())

    params = SamplingParams(max_tokens=cfg.stream_max_tokens, temperature=0)
    try:
        for i, p in enumerate(prompts):
            engine.submit(p, params, on_stream(i))
        for _ in prompts:
            ready.acquire()
        arrival = time.perf_counter()
        engine.submit(long_prompt, SamplingParams(max_tokens=1, temperature=0), on_long)
    finally:
        engine.close()  # finishes every request
    pairs = [(a, b) for t in times for a, b in itertools.pairwise(t)]  # a stream's events
    gaps = [b - a for a, b in pairs]
    during = [b - a for a, b in pairs if b > arrival and a < long_first[0]]
    return {
        "itl_p50_ms": percentile(gaps, 50) * 1000,
        "itl_p99_ms": percentile(gaps, 99) * 1000,
        "itl_max_ms": max(gaps) * 1000,
        "itl_during_long_prefill_max_ms": max(during, default=float("nan")) * 1000,
        "stream_events_during_long_prefill": len(during),
        "long_ttft_ms": (long_first[0] - arrival) * 1000,
        "steps": engine.stats.steps,
        "prefill_chunks": engine.stats.prefill_chunks,
        "stream_events_s": [[round(x - arrival, 4) for x in t] for t in times],
    }


def run(cfg: LongPromptConfig, console: Console | None = None) -> dict[str, Any]:
    """Both modes, alternating, ``cfg.repeats`` runs each; a JSON-serializable dict."""
    from pimoe.infer.lm_models import HFGenerationModel
    from pimoe.models import load_pretrained

    console = console or Console()
    load_before = os.getloadavg()
    torch.set_num_threads(cfg.threads)
    hf, tokenizer = load_pretrained(cfg.model, progress=True)
    model = HFGenerationModel(hf, tokenizer)
    prompts = real_prompts(tokenizer, cfg.streams, cfg.stream_prompt_tokens, cfg.seed)
    long_prompt = real_prompts(tokenizer, 1, cfg.long_prompt_tokens, cfg.seed + 1)[0]
    _run_once(model, prompts[:1], prompts[1][:8], cfg, cfg.chunked_budgets[0], False)  # warm-up
    modes = {"unchunked": (cfg.chunked_budgets[0], False)}
    modes.update({f"chunked_{b}": (b, True) for b in cfg.chunked_budgets})
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for r in range(cfg.repeats):
        for mode, (budget, chunked) in modes.items():
            console.print(f"[dim]{mode}, run {r + 1}/{cfg.repeats}[/dim]")
            runs[mode].append(_run_once(model, prompts, long_prompt, cfg, budget, chunked))
    result: dict[str, Any] = {
        **run_header("generate_long_prompt", cfg),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "runs": runs,
    }
    for mode, rs in runs.items():
        for key in ("itl_p50_ms", "itl_p99_ms", "itl_max_ms", "long_ttft_ms"):
            result[f"{key}_{mode}"] = statistics.median(x[key] for x in rs)
    for b in cfg.chunked_budgets:
        result[f"itl_p99_unchunked_over_chunked_{b}"] = (
            result["itl_p99_ms_unchunked"] / result[f"itl_p99_ms_chunked_{b}"]
        )
    _print(result, console)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """PNG: the streams' text events around the long prompt's arrival (time 0), first run of each
    mode, the long prompt's prefill shaded (arrival to its first token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1.2 + 1.1 * len(runs)), sharex=True)
    for ax, (mode, rs) in zip(axes, runs.items()):
        r = rs[0]
        ax.axvspan(0, r["long_ttft_ms"] / 1000, color="tab:orange", alpha=0.25, lw=0)
        for i, events in enumerate(r["stream_events_s"]):
            ax.plot(events, [i] * len(events), "|", color="tab:blue", markersize=8)
        ax.set_yticks(range(len(r["stream_events_s"])))
        ax.set_ylabel("stream")
        ax.set_title(
            f"{mode}: ITL p99 {r['itl_p99_ms'] / 1000:.1f} s, long prompt's TTFT "
            f"{r['long_ttft_ms'] / 1000:.1f} s (shaded)",
            fontsize=9,
        )
    axes[-1].set_xlabel("seconds since the long prompt arrived")
    fig.tight_layout()
    save_png(fig, path)


def _print(result: dict[str, Any], console: Console) -> None:
    cfg = result["config"]
    print_table(
        console,
        f"{cfg['streams']} streams, a {cfg['long_prompt_tokens']}-token prompt arrives "
        f"(unchunked: budget {cfg['chunked_budgets'][0]} tokens a step)",
        ("mode, run", "ITL p50 ms", "ITL p99 ms", "ITL max ms", "long TTFT ms", "chunks"),
        [
            (
                f"{mode}, {i + 1}",
                f"{r['itl_p50_ms']:.0f}",
                f"{r['itl_p99_ms']:.0f}",
                f"{r['itl_max_ms']:.0f}",
                f"{r['long_ttft_ms']:.0f}",
                str(r["prefill_chunks"]),
            )
            for mode, rs in result["runs"].items()
            for i, r in enumerate(rs)
        ],
    )


__all__ = ["LongPromptConfig", "plot", "run"]
