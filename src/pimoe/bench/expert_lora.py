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
to the adapted one). Memory is measured in a fresh process per run (a few training steps after
the same setup): the peak resident set during training (Linux ``VmHWM``, reset after setup)
above the resident set before the first step, and the bytes of the gradients and of the AdamW
state.

``run(quick, json_path)`` is the entry point of ``pimoe bench expert-lora``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text
from pimoe.moe import LoRAConfig, add_lora, merge_lora, save_lora


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
    memory_steps: int = 3  # training steps of each memory-measuring process (0: skip)


QUICK = ExpertLoRABenchConfig(steps=3, heldout_windows=1, memory_steps=2)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def heldout_loss(model: nn.Module, heldout: Tensor) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``heldout [B, S]``, one window at a time."""
    from pimoe.models.perplexity import perplexity

    return math.log(perplexity(model, heldout, batch_size=1))


def _optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the gradients held by ``model`` and of ``optimizer``'s state (AdamW: 2 moments)."""
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    state = sum(
        t.numel() * t.element_size()
        for per_param in optimizer.state.values()
        for t in per_param.values()
        if isinstance(t, Tensor)
    )
    return {"grad_bytes": grads, "optimizer_state_bytes": state}


def finetune(
    runs: dict[str, tuple[nn.Module, float]],
    train_ids: Tensor,
    cfg: ExpertLoRABenchConfig,
    progress: bool,
    steps: int | None = None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, int]]]:
    """Train each ``name: (model, lr)`` (the parameters that require gradients, AdamW) on the same
    batches for ``steps`` (default ``cfg.steps``), one step of each run in turn (order alternating
    every step, so that the machine's load drift hits all alike); returns the seconds of every
    step of each run and each run's gradient and optimizer-state bytes after its last step."""
    from pimoe.models.progress import track

    optimizers = {name: _optimizer(model, lr) for name, (model, lr) in runs.items()}
    generator = torch.Generator().manual_seed(cfg.seed)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step in track(range(cfg.steps if steps is None else steps), "fine-tune", enabled=progress):
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
    sizes = {name: _state_bytes(runs[name][0], optimizers[name]) for name in names}
    return seconds, sizes


def _setup(cfg: ExpertLoRABenchConfig, progress: bool) -> tuple[nn.Module, Tensor, Tensor, str]:
    """``(upcycled SmolLM2, training token ids [N], held-out windows [B, 256], router source)``."""
    from pimoe.demo_pretrained import PretrainedDemoSettings, upcycle_with_cached_routers
    from pimoe.models import load_pretrained
    from pimoe.models.perplexity import pydoc_token_splits, windows

    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    train_ids, heldout_ids = pydoc_token_splits(tokenizer)
    source, _ = upcycle_with_cached_routers(
        model, train_ids, windows(heldout_ids, 256, 2), PretrainedDemoSettings(), progress=progress
    )
    return model, train_ids, windows(heldout_ids, 256, cfg.heldout_windows), source


def _adapt(model: nn.Module, cfg: ExpertLoRABenchConfig) -> None:
    torch.manual_seed(cfg.seed)  # the adapters' A matrices come from the global generator
    add_lora(model, LoRAConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=ATTENTION))


def _status_kib(field_name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def training_memory(train: Callable[[], dict[str, int]]) -> dict[str, int]:
    """Run ``train()`` (it returns the gradient and optimizer-state bytes) and return, with them,
    the resident bytes before it and the peak resident bytes during it above those (Linux
    ``VmRSS`` / ``VmHWM``, the peak reset first)."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    sizes = train()
    peak = _status_kib("VmHWM")
    return {
        "rss_before_bytes": before * 1024,
        "training_peak_above_bytes": (peak - before) * 1024,
        **sizes,
    }


def memory_child(run: str, cfg: ExpertLoRABenchConfig) -> dict[str, int]:
    """In a fresh process: set up ``run`` (``"lora"`` or ``"full"``), train ``cfg.memory_steps``
    steps and return :func:`training_memory`'s bytes."""
    torch.set_num_threads(cfg.threads)
    model, train_ids, _, _ = _setup(cfg, progress=False)
    if run == "lora":
        _adapt(model, cfg)
    lr = cfg.lora_lr if run == "lora" else cfg.full_lr
    return training_memory(
        lambda: finetune({run: (model, lr)}, train_ids, cfg, False, cfg.memory_steps)[1][run]
    )


def in_fresh_process(call: str, imports: str) -> dict[str, Any]:
    """``call`` (a Python expression returning a JSON-able dict, after ``imports``) evaluated in
    a fresh Python process."""
    code = f"import json; {imports}; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{call} failed in a fresh process:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_memory(run: str, cfg: ExpertLoRABenchConfig) -> dict[str, int]:
    """:func:`memory_child` in a fresh Python process."""
    return in_fresh_process(
        f"memory_child({run!r}, ExpertLoRABenchConfig(**{json.dumps(asdict(cfg))}))",
        "from pimoe.bench.expert_lora import ExpertLoRABenchConfig, memory_child",
    )


def main(
    quick: bool = False,
    json_path: str | Path | None = None,
    progress: bool = True,
    steps: int | None = None,
) -> dict[str, Any]:
    """Entry point of ``pimoe bench expert-lora`` (``steps``: fine-tuning steps, default 10)."""
    cfg = QUICK if quick else ExpertLoRABenchConfig()
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    result: dict[str, Any] = run_header("expert_lora", cfg)
    result["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    try:
        model, train_ids, heldout, source = _setup(cfg, progress)
        total = sum(p.numel() for p in model.parameters())
        before = heldout_loss(model, heldout)
        full_model = copy.deepcopy(model)
        _adapt(model, cfg)
        lora_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        full_trainable = sum(p.numel() for p in full_model.parameters() if p.requires_grad)
        steps_s, sizes = finetune(
            {"lora": (model, cfg.lora_lr), "full": (full_model, cfg.full_lr)},
            train_ids,
            cfg,
            progress,
        )
        result["load_average_after_training"] = [round(v, 2) for v in os.getloadavg()]
        lora_after = heldout_loss(model, heldout)
        with tempfile.TemporaryDirectory() as folder:
            save_lora(model, folder)
            adapter_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
        merge_lora(model)
        merged_after = heldout_loss(model, heldout)
        del model
        full_after = heldout_loss(full_model, heldout)
        del full_model
        memory = (
            {run: measure_memory(run, cfg) for run in ("lora", "full")}
            if cfg.memory_steps
            else {"lora": {}, "full": {}}
        )
    finally:
        torch.set_num_threads(threads)
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
                "step_s_median": round(statistics.median(steps_s["lora"]), 3),
                "step_s": [round(v, 3) for v in steps_s["lora"]],
                "adapter_bytes": adapter_bytes,
                **sizes["lora"],
                "memory": memory["lora"],
            },
            "full": {
                "trainable_params": full_trainable,
                "heldout_loss_after": round(full_after, 4),
                "step_s_median": round(statistics.median(steps_s["full"]), 3),
                "step_s": [round(v, 3) for v in steps_s["full"]],
                **sizes["full"],
                "memory": memory["full"],
            },
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        }
    )
    result["lora_step_time_ratio"] = round(
        result["lora"]["step_s_median"] / result["full"]["step_s_median"], 3
    )
    print_report(result)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    return result


def memory_cells(run: dict[str, Any]) -> tuple[str, str]:
    """A training run's gradient + AdamW state MB and peak RSS above setup MB (``-`` when not
    measured), as printed in the tables."""
    peak = run["memory"].get("training_peak_above_bytes")
    return (
        f"{(run['grad_bytes'] + run['optimizer_state_bytes']) / 1e6:,.1f}",
        "-" if peak is None else f"{peak / 1e6:,.0f}",
    )


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    columns = (
        "run",
        "trainable params",
        "held-out loss after",
        "step s (median)",
        "grads + AdamW state MB",
        "training peak RSS above setup MB",
    )
    print_table(
        console or Console(),
        f"SmolLM2 split 8x top-4, {result['config']['steps']} steps: held-out loss "
        f"(before {result['heldout_loss_before']:.4f} nats/token)",
        columns,
        (
            (
                name,
                f"{result[name]['trainable_params']:,}",
                f"{result[name]['heldout_loss_after']:.4f}",
                f"{result[name]['step_s_median']:.2f}",
                *memory_cells(result[name]),
            )
            for name in ("lora", "full")
        ),
        left=len(columns),
    )
