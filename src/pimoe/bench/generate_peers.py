"""The generation benchmark's peers: Hugging Face ``generate`` one request at a time and with
static batching (left-padded), and pimoe's engine in the benchmark's process (no HTTP)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from pimoe.bench.generate import GenerateBenchConfig


def _generated(out: torch.Tensor, prompt_len: int, eos: int) -> int:
    """Tokens each row of ``generate``'s output ``[B, P + N]`` produced, up to and including its first eos."""
    new = out[:, prompt_len:]
    is_eos = new == eos
    first = torch.where(
        is_eos.any(1),
        is_eos.int().argmax(1) + 1,
        torch.full_like(is_eos[:, 0], new.shape[1], dtype=torch.long),
    )
    return int(first.sum())


def _engine_in_process(
    model: Any, tokenizer: Any, cfg: GenerateBenchConfig, prompts: list[list[int]]
) -> dict[str, float]:
    """The same engine without HTTP: all ``prompts`` submitted at once from this process."""
    import queue

    from pimoe.infer.generation import GenerationEngine, SamplingParams
    from pimoe.infer.lm_models import HFGenerationModel

    engine = GenerationEngine(HFGenerationModel(model, tokenizer), cfg.max_batch_size)
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0)
    try:
        done: queue.SimpleQueue[int] = queue.SimpleQueue()
        start = time.perf_counter()
        for p in prompts:
            engine.submit(p, params, lambda e: done.put(e.completion_tokens) if e.final else None)
        tokens = sum(done.get() for _ in prompts)
        seconds = time.perf_counter() - start
    finally:
        engine.close()
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "mean_batch": engine.stats.rows / max(engine.stats.steps, 1),
    }


def hf_sequential(
    model: Any, tokenizer: Any, cfg: GenerateBenchConfig, prompts: list[list[int]]
) -> dict[str, float]:
    """HF ``generate``, one request at a time, on ``prompts``."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": cfg.max_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for p in tqdm(prompts, desc="HF generate, one at a time", leave=False):
            tokens += _generated(
                model.generate(torch.tensor([p]), **kwargs), len(p), int(tokenizer.eos_token_id)
            )
    seconds = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def hf_static_and_engine(
    model: Any, tokenizer: Any, cfg: GenerateBenchConfig, prompts: list[list[int]], console: Console
) -> dict[str, dict[str, float]]:
    """HF static batching (all ``prompts`` in one left-padded ``generate``) and the engine in this
    process (no HTTP) on the same prompts."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": cfg.max_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    console.print(f"[dim]HF static batch of {len(prompts)}[/dim]")
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")  # left padding
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        static = {
            "requests": len(prompts),
            "tokens": _generated(out, batch["input_ids"].shape[1], int(tokenizer.eos_token_id)),
            "seconds": time.perf_counter() - start,
        }
    console.print(f"[dim]pimoe engine in this process, {len(prompts)} requests at once[/dim]")
    engine = _engine_in_process(model, tokenizer, cfg, prompts)
    for r in (static, engine):
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    return {"hf_static": static, "engine_in_process": engine}


__all__ = ["hf_sequential", "hf_static_and_engine"]
