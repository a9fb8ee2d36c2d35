"""PiMoE layer vs Hugging Face's MixtralSparseMoeBlock vs the dense limit, same weights and input.

The dense limit is one SwiGLU FFN of width ``top_k * ffn_dim`` on every token: the same active
FLOPs as the MoE layer with no routing, sorting or gathering. Ratios < 1 are faster than it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from pimoe.bench.timing import geomean, interleaved_medians, run_header
from pimoe.io import atomic_write_text
from pimoe.moe import PiMoE, SwiGLU


@dataclass
class MoEBenchConfig:
    """Sizes of the layer benchmark (defaults: the issue's d_model 512, ffn 1024, 8 experts, top-2)."""

    d_model: int = 512
    ffn_dim: int = 1024
    num_experts: int = 8
    top_k: int = 2
    tokens: list[int] = field(default_factory=lambda: [512, 2048, 4096, 16384])
    rounds: int = 7
    threads: int = 2
    seed: int = 0


def _hf_block(cfg: MoEBenchConfig, implementation: str | None) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(
        hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
    )
    hf_cfg._experts_implementation = implementation
    return MixtralSparseMoeBlock(hf_cfg)


def _step(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, backward: bool, params: list[nn.Parameter]) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        if backward:
            xg = x.detach().requires_grad_()
            module(xg).sum().backward()
        else:
            with torch.inference_mode():
                module(x)

    return run


def run(cfg: MoEBenchConfig, console: Console | None = None) -> dict:
    """Measure and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    hf_eager = _hf_block(cfg, None)
    for p in hf_eager.parameters():
        nn.init.normal_(p, std=0.02)
    hf_grouped = _hf_block(cfg, "grouped_mm")
    hf_grouped.load_state_dict(hf_eager.state_dict())
    ours = PiMoE.from_hf(hf_eager)
    dense = SwiGLU(cfg.d_model, cfg.top_k * cfg.ffn_dim)
    contenders: dict[str, nn.Module] = {
        "dense": dense, "pimoe": ours, "hf_eager": hf_eager, "hf_grouped_mm": hf_grouped,
    }
    rows, max_diff = [], 0.0
    for tokens in cfg.tokens:
        x = torch.randn(1, tokens, cfg.d_model)
        with torch.inference_mode():
            max_diff = max(max_diff, (ours(x) - hf_eager(x)).abs().max().item())
        for backward in (False, True):
            fns = {
                name: _step(m, x, backward, list(m.parameters())) for name, m in contenders.items()
            }
            times = interleaved_medians(fns, cfg.rounds)
            row = {"tokens": tokens, "mode": "fwd+bwd" if backward else "fwd", "dense_ms": times["dense"] * 1e3}
            row.update({f"{name}_vs_dense": times[name] / times["dense"] for name in contenders if name != "dense"})
            row["pimoe_vs_hf_eager"] = times["pimoe"] / times["hf_eager"]
            rows.append(row)
    fwd = [r for r in rows if r["mode"] == "fwd"]
    fwdbwd = [r for r in rows if r["mode"] == "fwd+bwd"]
    result = {
        **run_header("moe_layer", cfg),
        "fwd_ratio_vs_dense": geomean([r["pimoe_vs_dense"] for r in fwd]),
        "fwdbwd_ratio_vs_dense": geomean([r["pimoe_vs_dense"] for r in fwdbwd]),
        "fwd_ratio_vs_hf": geomean([r["pimoe_vs_hf_eager"] for r in fwd]),
        "fwdbwd_ratio_vs_hf": geomean([r["pimoe_vs_hf_eager"] for r in fwdbwd]),
        "max_abs_diff_vs_hf": max_diff,
        "rows": rows,
    }
    _print(result, console)
    return result


def _print(result: dict, console: Console) -> None:
    table = Table(title="MoE layer: time / dense limit (median of interleaved rounds; < 1 is faster)")
    for col in ("tokens", "mode", "dense ms", "pimoe", "HF eager", "HF grouped_mm", "pimoe / HF eager"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["tokens"]), r["mode"], f"{r['dense_ms']:.1f}", f"{r['pimoe_vs_dense']:.2f}",
            f"{r['hf_eager_vs_dense']:.2f}", f"{r['hf_grouped_mm_vs_dense']:.2f}", f"{r['pimoe_vs_hf_eager']:.2f}",
        )
    console.print(table)
    console.print(
        f"geomean over sizes: fwd {result['fwd_ratio_vs_dense']:.3f}x dense, fwd+bwd "
        f"{result['fwdbwd_ratio_vs_dense']:.3f}x dense, fwd {result['fwd_ratio_vs_hf']:.3f}x HF eager; "
        f"max |pimoe - HF| = {result['max_abs_diff_vs_hf']:.2e}"
    )


def main(quick: bool = False, json_path: Path | None = None, rounds: int | None = None, threads: int = 2) -> dict:
    """Entry point of ``pimoe bench moe`` and ``benchmarks/moe_layer.py``."""
    cfg = MoEBenchConfig(threads=threads)
    if quick:
        cfg = MoEBenchConfig(tokens=[512, 2048], rounds=3, threads=threads)
    if rounds is not None:
        cfg.rounds = rounds
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
