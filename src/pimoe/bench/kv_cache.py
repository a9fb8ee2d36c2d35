"""Decoding with a KV cache vs the uncached loop (``pimoe bench kv-cache``).

The same :class:`~pimoe.moe.model.PiMoELM` (random weights: the timing does not depend on them)
decodes ``new_tokens`` greedy tokens after a prompt, with and without the cache, interleaved
round by round; the outputs must be equal token for token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from pimoe.bench.printing import print_table
from pimoe.bench.timing import interleaved_medians, run_header
from pimoe.io import atomic_write_text
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM


@dataclass
class KVCacheBenchConfig:
    """Model and decode sizes (the demo LM's shape with a context that holds the whole decode)."""

    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    num_experts: int = 8
    top_k: int = 2
    ffn_dim: int = 128
    prompt_tokens: int = 32
    new_tokens: int = 256
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 3
    threads: int = 2
    seed: int = 0


def run(cfg: KVCacheBenchConfig) -> dict:
    """Measure and return the results (tokens/s per batch size, cached vs uncached)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    config = LMConfig(
        block_size=cfg.prompt_tokens + cfg.new_tokens,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
        moe=MoEConfig(num_experts=cfg.num_experts, top_k=cfg.top_k, ffn_dim=cfg.ffn_dim),
    )
    model = PiMoELM(config).eval()
    result: dict = {**run_header("kv_cache", cfg), "rows": []}
    for batch in cfg.batches:
        prompt = torch.randint(0, config.vocab_size, (batch, cfg.prompt_tokens))
        outputs: dict[bool, torch.Tensor] = {}

        def decode(
            use_cache: bool,
            prompt: torch.Tensor = prompt,
            outputs: dict[bool, torch.Tensor] = outputs,
        ) -> None:
            outputs[use_cache] = model.generate(
                prompt, cfg.new_tokens, temperature=0, use_cache=use_cache
            )

        seconds = interleaved_medians(
            {"cached": lambda: decode(True), "uncached": lambda: decode(False)},
            rounds=cfg.rounds,
            warmup=0,
        )
        if not torch.equal(outputs[True], outputs[False]):
            raise RuntimeError("cached and uncached decoding disagree")
        tokens = batch * cfg.new_tokens
        result["rows"].append(
            {
                "batch": batch,
                "tokens_per_s_cached": round(tokens / seconds["cached"], 1),
                "tokens_per_s_uncached": round(tokens / seconds["uncached"], 1),
                "speedup": round(seconds["uncached"] / seconds["cached"], 2),
                "outputs_equal": True,
            }
        )
    return result


def main(quick: bool = False, json_path: Path | None = None) -> dict:
    """Entry point of ``pimoe bench kv-cache``: print the table, optionally write JSON."""
    cfg = KVCacheBenchConfig(rounds=1, batches=(1,)) if quick else KVCacheBenchConfig()
    result = run(cfg)
    print_table(
        Console(),
        f"Greedy decoding of {cfg.new_tokens} tokens after {cfg.prompt_tokens} (PiMoELM, "
        f"d={cfg.d_model}, {cfg.n_layer} layers, E{cfg.num_experts} k{cfg.top_k})",
        ("batch", "cached tok/s", "uncached tok/s", "speedup", "same tokens"),
        [
            (
                str(row["batch"]),
                f"{row['tokens_per_s_cached']:.0f}",
                f"{row['tokens_per_s_uncached']:.0f}",
                f"{row['speedup']:.2f}x",
                "yes",
            )
            for row in result["rows"]
        ],
    )
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
