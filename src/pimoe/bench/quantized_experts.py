"""int8 / int4 fused experts: size, fidelity and speed against the float experts, same weights.

Two workloads:

- tiny random transformers MoE models (Mixtral and Qwen3-MoE configs, the experts quantized in
  place by :func:`pimoe.hf.quantized.quantize_hf_experts`): expert bytes vs bf16, cosine of the
  logits to the float model's, forward tokens/s of float eager, int8 and int4;
- SmolLM2-135M-Instruct upcycled into PiMoE layers (``split``: 8 experts of width F / 8,
  top-8, so that the float model is exactly the dense one and only quantization changes it),
  the experts quantized by :func:`pimoe.compress.quantize_experts.quantize_experts`: expert
  bytes vs bf16, held-out perplexity (Python's docs), logit cosine, prefill tokens/s.

Every variant runs on the same inputs; timings are medians of interleaved rounds.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from pimoe.bench.printing import print_table
from pimoe.bench.timing import interleaved_medians, load_average, run_header
from pimoe.io import atomic_write_text

VARIANTS = ("float", "int8", "int4")
# family -> build_tiny overrides giving int4-friendly widths (multiples of 32)
TINY: dict[str, dict[str, int]] = {
    "mixtral": {"hidden_size": 64, "intermediate_size": 64},
    "qwen3_moe": {"hidden_size": 64, "moe_intermediate_size": 32},
}


@dataclass
class QuantizedExpertsBenchConfig:
    """Sizes of the benchmark."""

    tiny_tokens: tuple[int, int] = (4, 64)  # [batch, sequence] of the tiny models' inputs
    smollm2: bool = True
    windows: int = 8  # held-out windows of ``window`` tokens for SmolLM2's perplexity
    window: int = 128
    experts: int = 8
    group_size: int = 128
    rounds: int = 3
    threads: int = 2
    seed: int = 0


def _expert_bytes(module: nn.Module, bits: int | None) -> int:
    """Bytes of the fused expert weights: bf16 for the float model, the buffers when quantized."""
    from pimoe.compress.quantize_experts import QuantizedFusedExperts

    total = 0
    for sub in module.modules():
        if isinstance(sub, QuantizedFusedExperts):
            total += sub.quantized_nbytes()
        elif bits is None:
            total += sum(
                p.numel() * 2 for n, p in sub.named_parameters(recurse=False) if p.dim() == 3
            )
    return total


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _variants(model: nn.Module, quantize: Any, group_size: int) -> dict[str, nn.Module]:
    out = {"float": model}
    for bits in (8, 4):
        quantized = copy.deepcopy(model)
        quantize(quantized, bits, group_size=group_size)
        out[f"int{bits}"] = quantized.eval()
    return out


def _measure(
    variants: dict[str, nn.Module], ids: torch.Tensor, rounds: int
) -> dict[str, dict[str, float]]:
    with torch.inference_mode():
        logits = {name: m(input_ids=ids).logits.float() for name, m in variants.items()}

    def forward(m: nn.Module) -> Any:
        def run() -> None:
            with torch.inference_mode():
                m(input_ids=ids)

        return run

    times = interleaved_medians({name: forward(m) for name, m in variants.items()}, rounds)
    return {
        name: {
            "expert_bytes": float(_expert_bytes(m, None if name == "float" else int(name[3:]))),
            "logit_cosine": _cosine(logits[name], logits["float"]),
            "tokens_per_s": ids.numel() / times[name],
        }
        for name, m in variants.items()
    }


def _tiny(cfg: QuantizedExpertsBenchConfig) -> dict[str, Any]:
    from pimoe.hf import build_tiny
    from pimoe.hf.quantized import quantize_hf_experts

    ids = torch.randint(3, 96, cfg.tiny_tokens, generator=torch.Generator().manual_seed(cfg.seed))
    results = {}
    for family, overrides in TINY.items():
        model = build_tiny(family, seed=cfg.seed, **overrides)
        results[family] = _measure(_variants(model, quantize_hf_experts, 32), ids, cfg.rounds)
    return results


def _smollm2(cfg: QuantizedExpertsBenchConfig) -> dict[str, Any]:
    from pimoe.compress.quantize_experts import quantize_experts
    from pimoe.models import load_pretrained, upcycle
    from pimoe.models.perplexity import perplexity, pydoc_token_splits, windows
    from pimoe.models.upcycle import find_mlps

    model, tokenizer = load_pretrained("smollm2-135m-instruct", progress=False)
    mlps = find_mlps(model)
    gate: nn.Linear = getattr(mlps[0][1], "gate_proj")  # noqa: B009
    assignment = torch.arange(gate.out_features) % cfg.experts  # balanced; top-E runs every expert
    upcycle(model, cfg.experts, cfg.experts, "split", assignments=[assignment] * len(mlps))
    heldout = windows(pydoc_token_splits(tokenizer)[1], cfg.window, cfg.windows)
    variants = _variants(model.eval(), quantize_experts, cfg.group_size)
    results = _measure(variants, heldout[:2], cfg.rounds)
    for name, m in variants.items():
        results[name]["perplexity"] = perplexity(m, heldout)
    return results


def main(
    quick: bool = False, json_path: Path | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Measure, print and return the results (``pimoe bench quantized-experts``).

    ``quick``: tiny models only, 3 rounds (seconds); otherwise also SmolLM2 (minutes).
    """
    cfg = QuantizedExpertsBenchConfig(smollm2=not quick, rounds=3)
    console = console or Console()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    result: dict[str, Any] = {**run_header("quantized_experts", cfg), "load_start": load_average()}
    result["tiny"] = _tiny(cfg)
    if cfg.smollm2:
        result["smollm2"] = _smollm2(cfg)
    result["load_end"] = load_average()
    _print(result, console)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result


def _print(result: dict[str, Any], console: Console) -> None:
    models = {f"tiny {k}": v for k, v in result["tiny"].items()}
    if "smollm2" in result:
        models["SmolLM2 upcycled"] = result["smollm2"]
    table = []
    for label, rows in models.items():
        bf16 = rows["float"]["expert_bytes"]
        for variant in VARIANTS:
            r = rows[variant]
            table.append(
                (
                    label,
                    variant if variant != "float" else "float (bf16 size)",
                    f"{r['expert_bytes'] / 1e6:.3f}",
                    f"{r['expert_bytes'] / bf16:.3f}",
                    f"{r['logit_cosine']:.6f}",
                    f"{r['perplexity']:.3f}" if "perplexity" in r else "-",
                    f"{r['tokens_per_s']:.0f}",
                )
            )
    print_table(
        console,
        "Quantized fused experts (same weights, same inputs)",
        ("model", "variant", "expert MB", "vs bf16", "logit cosine", "perplexity", "tokens/s"),
        table,
    )
    console.print(
        f"1-min load {result['load_start']:.1f} -> {result['load_end']:.1f} on {result['cpu_count']} cores"
    )
