"""transformers MoE blocks with ``experts_implementation="pimoe"`` vs transformers' ``"grouped_mm"``.

Same block, same weights, same input: only ``config._experts_implementation`` changes between
the contenders, which run interleaved within each round. Shapes: a Qwen3-MoE-like block (64
experts, top-8, expert width 256) and a Mixtral-like block (8 experts, top-2, width 1024), both
at d_model 512, fp32. Ratios < 1 mean pimoe is faster. Forward rows also time a copy of the
block whose expert weights :func:`pimoe.moe.pack_experts_` prepacked (``pimoe_packed``; null
where packing cannot run). The run starts with
:func:`pimoe.hf.check_families` (tiny models of each family: logits and gradients vs eager, and
forward time with pimoe, grouped_mm and eager).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from pimoe.bench.printing import print_table
from pimoe.bench.timing import geomean, interleaved_medians, run_header
from pimoe.io import atomic_write_text

# name -> (transformers model_type, experts, top_k, expert width)
SHAPES: dict[str, tuple[str, int, int, int]] = {
    "qwen3_moe E64 k8 f256": ("qwen3_moe", 64, 8, 256),
    "mixtral E8 k2 f1024": ("mixtral", 8, 2, 1024),
}
CONTENDERS = ("pimoe", "grouped_mm")


@dataclass
class HFBackendBenchConfig:
    """Sizes of the benchmark."""

    d_model: int = 512
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    tokens: list[int] = field(default_factory=lambda: [512, 4096])
    rounds: int = 5
    threads: int = 1
    seed: int = 0
    families: list[str] | None = None  # keys of pimoe.hf.FAMILIES; None: all
    family_tokens: int = 64


def _block(shape: str, d_model: int) -> Any:
    """The family's sparse MoE block (router + experts) with seeded N(0, 0.02) weights."""
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    import pimoe.hf  # noqa: F401  (registers "pimoe")

    model_type, experts, top_k, width = SHAPES[shape]
    config = AutoConfig.for_model(
        model_type,
        hidden_size=d_model,
        num_attention_heads=8,
        intermediate_size=width,
        moe_intermediate_size=width,
        num_local_experts=experts,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
    )
    block_class: Any = MixtralSparseMoeBlock if model_type == "mixtral" else Qwen3MoeSparseMoeBlock
    block = block_class(config)
    for param in block.parameters():
        nn.init.normal_(param, std=0.02)
    return block


def _step(block: Any, implementation: str, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    def run() -> None:
        block.experts.config._experts_implementation = implementation
        if backward:
            block.zero_grad(set_to_none=True)
            block(x.detach().requires_grad_()).sum().backward()
        else:
            with torch.inference_mode():
                block(x)

    return run


def _max_diff_vs_eager(block: Any, x: torch.Tensor) -> float:
    outputs = {}
    with torch.inference_mode():
        for name in ("eager", "pimoe"):
            block.experts.config._experts_implementation = name
            outputs[name] = block(x)
    return (outputs["pimoe"] - outputs["eager"]).abs().max().item()


def _packed_copy(block: Any) -> Any | None:
    """A copy of ``block`` running "pimoe" on prepacked expert weights, or None where packing
    cannot run."""
    from pimoe.moe import pack_experts_

    packed = copy.deepcopy(block)
    packed.experts.config._experts_implementation = "pimoe"
    try:
        pack_experts_(packed)
    except ValueError:
        return None
    return packed


def run(cfg: HFBackendBenchConfig, console: Console | None = None) -> dict:
    """Measure and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.set_num_threads(cfg.threads)
    from pimoe.hf import check_families

    families = check_families(
        cfg.families, seed=cfg.seed, tokens=cfg.family_tokens, repeats=cfg.rounds
    )
    _print_families(families, console)
    rows: list[dict[str, Any]] = []
    for shape in cfg.shapes:
        torch.manual_seed(cfg.seed)
        block = _block(shape, cfg.d_model)
        packed = _packed_copy(block)
        for tokens in cfg.tokens:
            x = torch.randn(1, tokens, cfg.d_model)
            diff = _max_diff_vs_eager(block, x)
            for backward in (False, True):
                fns: dict[str, Callable[[], object]] = {
                    name: _step(block, name, x, backward) for name in CONTENDERS
                }
                if packed is not None and not backward:
                    fns["pimoe_packed"] = _step(packed, "pimoe", x, backward)
                times = interleaved_medians(fns, cfg.rounds)
                rows.append(
                    {
                        "shape": shape,
                        "tokens": tokens,
                        "mode": "fwd+bwd" if backward else "fwd",
                        "pimoe_ms": times["pimoe"] * 1e3,
                        "grouped_mm_ms": times["grouped_mm"] * 1e3,
                        "pimoe_vs_grouped_mm": times["pimoe"] / times["grouped_mm"],
                        "pimoe_packed_vs_grouped_mm": (
                            times["pimoe_packed"] / times["grouped_mm"]
                            if "pimoe_packed" in times
                            else None
                        ),
                        "max_abs_diff_vs_eager": diff,
                    }
                )
                console.print(
                    f"{shape} {tokens} tokens {rows[-1]['mode']}: "
                    f"{rows[-1]['pimoe_vs_grouped_mm']:.2f}x grouped_mm"
                )
    result = {
        **run_header("hf_backend", cfg),
        "fwd_ratio_vs_grouped_mm": geomean(
            [r["pimoe_vs_grouped_mm"] for r in rows if r["mode"] == "fwd"]
        ),
        "fwdbwd_ratio_vs_grouped_mm": geomean(
            [r["pimoe_vs_grouped_mm"] for r in rows if r["mode"] == "fwd+bwd"]
        ),
        "max_abs_diff_vs_eager": max(r["max_abs_diff_vs_eager"] for r in rows),
        "max_abs_logit_diff_hf": max(r["max_abs_logit_diff"] for r in families),
        "families": families,
        "rows": rows,
    }
    _print(result, console)
    return result


def _print_families(families: list[dict], console: Console) -> None:
    print_table(
        console,
        "tiny random models: pimoe vs eager (fp32), forward ms (median, interleaved)",
        (
            "family",
            "E",
            "k",
            "max |logit diff|",
            "max |grad diff| / max |grad|",
            "pimoe ms",
            "grouped_mm ms",
            "eager ms",
        ),
        [
            (
                r["family"],
                str(r["num_experts"]),
                str(r["top_k"]),
                f"{r['max_abs_logit_diff']:.1e}",
                f"{r['max_abs_grad_diff'] / r['max_abs_grad']:.1e}",
                f"{r['fwd_ms_pimoe']:.1f}",
                f"{r['fwd_ms_grouped_mm']:.1f}",
                f"{r['fwd_ms_eager']:.1f}",
            )
            for r in families
        ],
    )


def _print(result: dict, console: Console) -> None:
    print_table(
        console,
        "transformers MoE block: experts_implementation pimoe vs grouped_mm (median, interleaved)",
        (
            "shape",
            "tokens",
            "mode",
            "pimoe ms",
            "grouped_mm ms",
            "pimoe / grouped_mm",
            "packed / grouped_mm",
        ),
        [
            (
                r["shape"],
                str(r["tokens"]),
                r["mode"],
                f"{r['pimoe_ms']:.1f}",
                f"{r['grouped_mm_ms']:.1f}",
                f"{r['pimoe_vs_grouped_mm']:.2f}",
                "-"
                if r["pimoe_packed_vs_grouped_mm"] is None
                else f"{r['pimoe_packed_vs_grouped_mm']:.2f}",
            )
            for r in result["rows"]
        ],
    )
    console.print(
        f"geomean pimoe / grouped_mm: fwd {result['fwd_ratio_vs_grouped_mm']:.3f}, fwd+bwd "
        f"{result['fwdbwd_ratio_vs_grouped_mm']:.3f}; max |pimoe - eager| = {result['max_abs_diff_vs_eager']:.2e}"
    )


def main(
    quick: bool = False,
    json_path: str | Path | None = None,
    rounds: int | None = None,
    threads: int = 1,
) -> dict:
    """Entry point of the transformers-backend benchmark (quick: 512 tokens, 3 rounds)."""
    cfg = HFBackendBenchConfig(threads=threads)
    if quick:
        cfg = HFBackendBenchConfig(tokens=[512], rounds=3, threads=threads)
    if rounds is not None:
        cfg.rounds = rounds
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
