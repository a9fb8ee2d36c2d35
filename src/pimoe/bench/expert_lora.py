"""LoRA fine-tuning of the upcycled SmolLM2 (experts + attention) vs full fine-tuning.

The two runs take their steps in turn on the same batches, so step times are compared under the
same machine load.

The model is SmolLM2-135M-Instruct split into 8 experts per MLP at top-4 with the demo's cached
routers and refit (``pimoe demo``). Both runs train on the same random 128-token windows of
Python's documentation (``pydoc_data.topics``, the training 90%) for the same steps with AdamW;
held-out loss is the mean next-token cross-entropy on the first windows of the held-out 10%.

- LoRA: ``r=8, lora_alpha=16`` on every fused expert weight (``w_in``, ``w_out``) and on
  ``q_proj``/``k_proj``/``v_proj``/``o_proj``; everything else frozen.
- Full: every parameter trained.

Reported: held-out loss before and after, trainable parameters, median step time (forward,
backward, optimizer step), the adapter file's size, and the merged model's held-out loss (equal
to the adapted one).

``run(quick, json_path)`` is the entry point of ``pimoe bench expert-lora``.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text
from pimoe.moe import LoRAConfig, add_lora, merge_lora, save_lora
from pimoe.tables import Table


@dataclass
class ExpertLoRABenchConfig:
    steps: int = 10
    batch_size: int = 2
    window: int = 128
    heldout_windows: int = 2  # of 256 tokens
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 1e-3
    full_lr: float = 2e-5
    threads: int = 1
    seed: int = 0


QUICK = ExpertLoRABenchConfig(steps=3, heldout_windows=1)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def heldout_loss(model: nn.Module, heldout: Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``heldout [B, S]``, one window at a time."""
    from pimoe.models.perplexity import perplexity

    return math.log(perplexity(model, heldout, batch_size=1))


def finetune(
    runs: dict[str, tuple[nn.Module, float]],
    train_ids: Tensor,
    cfg: ExpertLoRABenchConfig,
    progress: bool,
) -> dict[str, list[float]]:
    """Train each ``name: (model, lr)`` (the parameters that require gradients, AdamW) on the same
    batches, one step of each run in turn (order alternating every step, so that the machine's
    load drift hits all alike); returns the seconds of every step of each run."""
    from pimoe.models.progress import track

    optimizers = {
        name: torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
        )
        for name, (model, lr) in runs.items()
    }
    generator = torch.Generator().manual_seed(cfg.seed)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step in track(range(cfg.steps), "fine-tune", enabled=progress):
        starts = torch.randint(
            len(train_ids) - cfg.window - 1, (cfg.batch_size,), generator=generator
        )
        batch = torch.stack(
            [train_ids[s : s + cfg.window + 1] for s in starts.tolist()]
        )  # [B, S+1]
        for name in names if step % 2 == 0 else names[::-1]:
            model = runs[name][0].train()
            start = time.perf_counter()
            logits = model(batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
            )
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            seconds[name].append(time.perf_counter() - start)
            model.eval()
    return seconds


def main(
    quick: bool = False, json_path: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Entry point of ``pimoe bench expert-lora``."""
    from pimoe.demo_pretrained import PretrainedDemoSettings, upcycle_with_cached_routers
    from pimoe.models import load_pretrained
    from pimoe.models.perplexity import pydoc_token_splits, windows

    cfg = QUICK if quick else ExpertLoRABenchConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, tokenizer = load_pretrained("smollm2-135m-instruct")
        train_ids, heldout_ids = pydoc_token_splits(tokenizer)
        heldout = windows(heldout_ids, 256, cfg.heldout_windows)
        source, _ = upcycle_with_cached_routers(
            model,
            train_ids,
            windows(heldout_ids, 256, 2),
            PretrainedDemoSettings(),
            progress=progress,
        )
        total = sum(p.numel() for p in model.parameters())
        before = heldout_loss(model, heldout)
        full_model = copy.deepcopy(model)

        torch.manual_seed(cfg.seed)  # the adapters' A matrices come from the global generator
        add_lora(
            model, LoRAConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=ATTENTION)
        )
        lora_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        full_trainable = sum(p.numel() for p in full_model.parameters() if p.requires_grad)
        steps = finetune(
            {"lora": (model, cfg.lora_lr), "full": (full_model, cfg.full_lr)},
            train_ids,
            cfg,
            progress,
        )
        lora_steps, full_steps = steps["lora"], steps["full"]
        lora_after = heldout_loss(model, heldout)
        with tempfile.TemporaryDirectory() as folder:
            save_lora(model, folder)
            adapter_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
        merge_lora(model)
        merged_after = heldout_loss(model, heldout)
        del model

        full_after = heldout_loss(full_model, heldout)
    finally:
        torch.set_num_threads(threads)
    result: dict[str, Any] = run_header("expert_lora", cfg)
    result.update(
        {
            "routers": source,
            "total_params": total,
            "heldout_tokens": heldout.numel(),
            "heldout_loss_before": round(before, 4),
            "lora": {
                "trainable_params": lora_trainable,
                "heldout_loss_after": round(lora_after, 4),
                "merged_heldout_loss": round(merged_after, 4),
                "step_s_median": round(statistics.median(lora_steps), 3),
                "adapter_bytes": adapter_bytes,
            },
            "full": {
                "trainable_params": full_trainable,
                "heldout_loss_after": round(full_after, 4),
                "step_s_median": round(statistics.median(full_steps), 3),
            },
        }
    )
    result["lora_step_time_ratio"] = round(
        result["lora"]["step_s_median"] / result["full"]["step_s_median"], 3
    )
    print_report(result)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    return result


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    table = Table(
        title=f"SmolLM2 split 8x top-4, {result['config']['steps']} steps: held-out loss "
        f"(before {result['heldout_loss_before']:.4f} nats/token)"
    )
    for column in ("run", "trainable params", "held-out loss after", "step s (median)"):
        table.add_column(column)
    for name in ("lora", "full"):
        row = result[name]
        table.add_row(
            name,
            f"{row['trainable_params']:,}",
            f"{row['heldout_loss_after']:.4f}",
            f"{row['step_s_median']:.2f}",
        )
    (console or Console()).print(table)
