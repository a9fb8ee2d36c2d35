"""LoRA on transformers experts: pimoe's low-rank path vs the ``W + s B A`` parametrization vs
full fine-tuning, on random transformers-5 MoE models (Mixtral 8 experts top-2, Qwen3-MoE 64
experts top-8).

Three runs per family, from the same seeded base model, trained with AdamW on the same batches
of random token ids (step time and memory do not depend on the text):

- ``lora``: :func:`pimoe.moe.add_lora` (``r=8, lora_alpha=16``) on every fused expert weight
  (``gate_up_proj``, ``down_proj``) and on ``q_proj``/``k_proj``/``v_proj``/``o_proj``; the
  experts run ``experts_implementation="pimoe"`` (set by ``add_lora``), which trains the
  adapters on the activations without forming ``W + s B A``;
- ``lora_parametrized``: the same adapters (same seed), the experts run transformers'
  ``"grouped_mm"`` on the parametrized weights (each step forms ``W + s B A`` and its full
  gradient): what LoRA on these parameters costs without pimoe's path;
- ``full``: every parameter trained, transformers' ``"grouped_mm"`` (its default).

The runs take their steps in turn (order alternating), so their step times see the same load.
Memory: one fresh process per run, same setup, ``memory_steps`` training steps; the peak resident
set during training above the resident set before it, and the gradient and AdamW-state bytes.

Run: ``python -c "from pimoe.bench.expert_lora_hf import main; main(json_path='out.json')"``.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from pimoe.bench.expert_lora import (
    ATTENTION,
    ExpertLoRABenchConfig,
    finetune,
    in_fresh_process,
    memory_cells,
    training_memory,
)
from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text

# config overrides of pimoe.hf.families.build_tiny: a medium size (about 50M expert parameters)
SHAPES: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 1024, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "intermediate_size": 1024,
        "moe_intermediate_size": 128,
        "num_experts": 64,
        "num_experts_per_tok": 8,
    },
}
COMMON: dict[str, Any] = {
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 4096,
}
# run -> (experts implementation, LoRA)
RUNS: dict[str, tuple[str, bool]] = {
    "lora": ("pimoe", True),
    "lora_parametrized": ("grouped_mm", True),
    "full": ("grouped_mm", False),
}


@dataclass
class HFExpertLoRABenchConfig(ExpertLoRABenchConfig):
    families: tuple[str, ...] = ("mixtral", "qwen3_moe")
    steps: int = 6
    batch_size: int = 4
    memory_steps: int = 2
    size: dict[str, Any] = field(default_factory=lambda: dict(COMMON))


QUICK = HFExpertLoRABenchConfig(
    steps=2,
    batch_size=2,
    window=32,
    memory_steps=1,
    size={**COMMON, "hidden_size": 64, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 256},
)


def build_run(family: str, run: str, cfg: HFExpertLoRABenchConfig) -> tuple[nn.Module, float]:
    """``(model, learning rate)`` of ``run`` (a key of :data:`RUNS`) for ``family``: the seeded
    base model (fp32, train mode), adapted for the LoRA runs."""
    from pimoe.hf.families import build_tiny
    from pimoe.moe import LoRAConfig, add_lora

    implementation, lora = RUNS[run]
    model = build_tiny(family, seed=cfg.seed, **{**cfg.size, **SHAPES[family]})
    if lora:
        torch.manual_seed(cfg.seed)  # the adapters' A matrices come from the global generator
        config = LoRAConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=ATTENTION)
        add_lora(model, config)
    model.set_experts_implementation(implementation)
    return model.train(), cfg.lora_lr if lora else cfg.full_lr


def _train_ids(cfg: HFExpertLoRABenchConfig) -> Tensor:
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(3, int(cfg.size["vocab_size"]), (50_000,), generator=generator)


def memory_child(family: str, run: str, cfg: HFExpertLoRABenchConfig) -> dict[str, int]:
    """In a fresh process: build ``run``, train ``cfg.memory_steps`` steps, return
    :func:`pimoe.bench.expert_lora.training_memory`'s bytes."""
    torch.set_num_threads(cfg.threads)
    model, lr = build_run(family, run, cfg)
    train_ids = _train_ids(cfg)
    return training_memory(
        lambda: finetune({run: (model, lr)}, train_ids, cfg, False, cfg.memory_steps)[1][run]
    )


def measure_memory(family: str, run: str, cfg: HFExpertLoRABenchConfig) -> dict[str, int]:
    """:func:`memory_child` in a fresh Python process."""
    settings = {**asdict(cfg), "families": list(cfg.families)}
    return in_fresh_process(
        f"memory_child({family!r}, {run!r}, HFExpertLoRABenchConfig(**{json.dumps(settings)}))",
        "from pimoe.bench.expert_lora_hf import HFExpertLoRABenchConfig, memory_child",
    )


def bench_family(family: str, cfg: HFExpertLoRABenchConfig, progress: bool) -> dict[str, Any]:
    """Step times (interleaved) and memory (fresh processes) of the three runs on ``family``."""
    runs = {run: build_run(family, run, cfg) for run in RUNS}
    model = runs["full"][0]
    experts = [m for m in model.modules() if hasattr(m, "has_gate")]
    row: dict[str, Any] = {
        "total_params": sum(p.numel() for p in model.parameters()),
        "expert_params": sum(p.numel() for m in experts for p in m.parameters()),
        "trainable_params": {
            run: sum(p.numel() for p in m.parameters() if p.requires_grad)
            for run, (m, _) in runs.items()
        },
    }
    seconds, sizes = finetune(runs, _train_ids(cfg), cfg, progress)
    del runs, model, experts
    for run in RUNS:
        memory = measure_memory(family, run, cfg) if cfg.memory_steps else {}
        row[run] = {
            "step_s_median": round(statistics.median(seconds[run]), 4),
            "step_s": [round(v, 4) for v in seconds[run]],
            **sizes[run],
            "memory": memory,
        }
    full = row["full"]["step_s_median"]
    row["step_time_vs_full"] = {run: round(row[run]["step_s_median"] / full, 3) for run in RUNS}
    return row


def main(
    quick: bool = False, json_path: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run every family of the config; print the table, write the JSON to ``json_path``."""
    cfg = QUICK if quick else HFExpertLoRABenchConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    result: dict[str, Any] = run_header("expert_lora_hf", replace(cfg))
    result["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    try:
        result["families"] = {f: bench_family(f, cfg, progress) for f in cfg.families}
    finally:
        torch.set_num_threads(threads)
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print_report(result)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    return result


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    columns = (
        "family",
        "run",
        "trainable params",
        "step s (median)",
        "vs full",
        "grads + AdamW MB",
        "training peak RSS above setup MB",
    )
    print_table(
        console or Console(),
        f"LoRA on transformers experts, {result['config']['steps']} steps each",
        columns,
        (
            (
                family,
                run,
                f"{row['trainable_params'][run]:,}",
                f"{row[run]['step_s_median']:.3f}",
                f"{row['step_time_vs_full'][run]:.2f}x",
                *memory_cells(row[run]),
            )
            for family, row in result["families"].items()
            for run in RUNS
        ),
        left=len(columns),
    )
