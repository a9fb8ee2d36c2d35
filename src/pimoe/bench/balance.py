"""Aux-loss-free balancing (selection bias) vs the Switch load-balancing loss, same steps.

Two workloads, each contender trained with the same data, steps and seed:

1. The demo LM (``pimoe demo --scratch``'s byte-level PiMoELM, 8 experts top-2): Switch loss at
   several coefficients, no balancing, and DeepSeek-V3's selection bias (updated after every
   optimizer step). Reported: held-out cross-entropy and the imbalance (max / mean tokens per
   expert) of each MoE layer over the last training steps.
2. The router training of the split-upcycled SmolLM2-135M-Instruct (8 experts, top-4, the demo's
   neuron partition): the routers fitted with no balancing, with the Switch loss at several
   coefficients, and with the selection bias. Reported per contender, averaged over the 30 layers
   on held-out tokens: imbalance, the layer's relative output error against the dense MLP, and the
   whole model's held-out perplexity.
3. Balancing while the model keeps learning (:mod:`pimoe.bench.balance_finetune`): the upcycled
   SmolLM2 with DeepSeek-V3's weighted routing, its experts and routers fine-tuned together on
   real text, with the selection bias or the Switch loss; held-out loss and imbalance.

``run(quick, json_path)`` is the entry point of ``pimoe bench balance``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text
from pimoe.moe import MoEConfig, update_routing_bias
from pimoe.moe.model import LMConfig, PiMoELM


@dataclass
class BalanceBenchConfig:
    """Sizes of both workloads (defaults: full run, a few minutes per workload on one thread)."""

    lm_steps: int = 40
    lm_batch_size: int = 16
    lm_lr: float = 2e-3
    switch_coefs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    lm_bias_rates: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 3e-2, 1e-1])
    router_steps: int = 40
    router_train_windows: int = 2  # of 256 tokens
    router_heldout_windows: int = 2
    router_switch_coefs: list[float] = field(default_factory=lambda: [0.1, 1.0, 3.0])
    router_bias_rates: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 3e-2, 1e-1])
    finetune_steps: int = 60
    finetune_batch: int = 4  # windows of finetune_window tokens per step
    finetune_window: int = 128
    finetune_heldout_windows: int = 4  # of 256 tokens
    finetune_lr: float = 1e-4
    finetune_switch_coefs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    finetune_bias_rates: list[float] = field(default_factory=lambda: [1e-3, 1e-2])
    baseline: bool = True  # also the contender without balancing
    threads: int = 1
    seed: int = 0
    workloads: tuple[str, ...] = ("lm", "routers")


QUICK = BalanceBenchConfig(
    lm_steps=30,
    switch_coefs=[0.01],
    lm_bias_rates=[1e-2],
    router_steps=20,
    router_train_windows=2,
    router_heldout_windows=1,
    router_switch_coefs=[0.1],
    router_bias_rates=[1e-2],
    finetune_steps=4,
    finetune_heldout_windows=1,
    finetune_switch_coefs=[0.1],
    finetune_bias_rates=[1e-2],
)


@contextmanager
def _bias_updates() -> Iterator[None]:
    """Update the routing bias of the PiMoELM being trained after every optimizer step, for a
    training loop that builds its model and optimizer itself (``train_lm``)."""
    current: dict[str, nn.Module] = {}

    def remember(module: nn.Module, args: Any) -> None:
        if isinstance(module, PiMoELM):
            current["model"] = module

    def update(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if "model" in current:
            update_routing_bias(current["model"])

    handles = [
        nn.modules.module.register_module_forward_pre_hook(remember),
        register_optimizer_step_post_hook(update),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def lm_workload(cfg: BalanceBenchConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Train the demo LM once per contender; one row per contender."""
    from pimoe.data import byte_splits, load_pydoc_text
    from pimoe.training import train_lm

    train, val = byte_splits(load_pydoc_text())
    base = MoEConfig(num_experts=8, top_k=2, ffn_dim=128)
    contenders: dict[str, MoEConfig] = (
        {"none": base.replace(aux_loss_coef=0.0)} if cfg.baseline else {}
    )
    for coef in cfg.switch_coefs:
        contenders[f"switch {coef:g}"] = base.replace(aux_loss_coef=coef)
    for rate in cfg.lm_bias_rates:
        contenders[f"bias u={rate:g}"] = base.replace(
            balance="bias", bias_update_rate=rate, aux_loss_coef=0.0
        )
    rows = []
    for name, moe in contenders.items():
        config = LMConfig(block_size=128, n_layer=4, n_head=4, d_model=128, moe=moe)
        start = time.perf_counter()
        with _bias_updates() if moe.balance == "bias" else nullcontext():
            result = train_lm(
                config,
                train,
                val,
                cfg.lm_steps,
                cfg.lm_batch_size,
                cfg.lm_lr,
                "cpu",
                cfg.seed,
                progress=progress,
            )
        imbalance = [stats.imbalance for stats in result.routing]
        rows.append(
            {
                "contender": name,
                "val_loss": round(result.val_loss, 4),
                "imbalance_mean": round(statistics.mean(imbalance), 3),
                "imbalance_max": round(max(imbalance), 3),
                "imbalance_per_layer": [round(v, 3) for v in imbalance],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return rows


def _assignments(dense: nn.Module, train_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The demo's neuron partition (8 experts) from its cache, else clustered now."""
    from safetensors.torch import load_file

    from pimoe.demo_pretrained import PretrainedDemoSettings, routers_path
    from pimoe.models.upcycle import find_mlps
    from pimoe.models.upcycle_cluster import cluster_neurons

    mlps = find_mlps(dense)
    width = mlps[0][1].get_parameter("gate_proj.weight").shape[0]
    path = routers_path(PretrainedDemoSettings())
    if path.exists():
        tensors = load_file(str(path))
        found = [tensors.get(f"{i}.assignment") for i in range(len(mlps))]
        if all(t is not None and t.shape == (width,) for t in found):
            return [t for t in found if t is not None]
    return [
        cluster_neurons(mlp, x, 8, seed=i)
        for i, ((_, mlp), x) in enumerate(zip(mlps, train_inputs))
    ]


def router_setup(
    cfg: BalanceBenchConfig, progress: bool
) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(dense SmolLM2, held-out windows [B, 256], training and held-out MLP inputs per layer,
    the neuron partition per layer)`` of the router workload."""
    from pimoe.models import capture_mlp_inputs, load_pretrained
    from pimoe.models.perplexity import pydoc_token_splits, windows

    dense, tokenizer = load_pretrained("smollm2-135m-instruct")
    train_ids, heldout_ids = pydoc_token_splits(tokenizer)
    calibration = windows(train_ids, 256, cfg.router_train_windows)
    heldout = windows(heldout_ids, 256, cfg.router_heldout_windows)
    train_inputs = capture_mlp_inputs(dense, calibration, batch_size=2, progress=progress)
    heldout_inputs = capture_mlp_inputs(dense, heldout, batch_size=2, progress=progress)
    return dense, heldout, train_inputs, heldout_inputs, _assignments(dense, train_inputs)


def balance_contenders(
    baseline: bool, switch_coefs: Iterable[float], bias_rates: Iterable[float]
) -> dict[str, dict[str, Any]]:
    """``set_balance``/``train_routers`` options by contender name: ``"none"`` (with
    ``baseline``), ``"switch <coef>"`` (auxiliary loss) and ``"bias u=<rate>"`` (bias updates)."""
    contenders: dict[str, dict[str, Any]] = {"none": {"balance": "none"}} if baseline else {}
    for coef in switch_coefs:
        contenders[f"switch {coef:g}"] = {"balance": "aux_loss", "aux_loss_coef": coef}
    for rate in bias_rates:
        contenders[f"bias u={rate:g}"] = {"balance": "bias", "bias_update_rate": rate}
    return contenders


def router_workload(cfg: BalanceBenchConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Fit the routers of the split-upcycled SmolLM2 once per contender; one row per contender."""
    from pimoe.models import train_routers, upcycle
    from pimoe.models.perplexity import perplexity

    dense, heldout, train_inputs, heldout_inputs, assignments = router_setup(cfg, progress)
    contenders = balance_contenders(cfg.baseline, cfg.router_switch_coefs, cfg.router_bias_rates)
    rows = []
    for name, options in contenders.items():
        start = time.perf_counter()
        model = upcycle(copy.deepcopy(dense), 8, 4, "split", assignments=assignments, seed=cfg.seed)
        reports = train_routers(
            model,
            train_inputs,
            heldout_inputs,
            steps=cfg.router_steps,
            progress=progress,
            **options,
        )
        rows.append(
            {
                "contender": name,
                "heldout_imbalance_mean": round(
                    statistics.mean(r.heldout_imbalance for r in reports), 3
                ),
                "heldout_imbalance_max": round(max(r.heldout_imbalance for r in reports), 3),
                "heldout_rel_error": round(
                    statistics.mean(r.heldout_rel_error for r in reports), 4
                ),
                "heldout_recall": round(statistics.mean(r.heldout_recall for r in reports), 4),
                "heldout_perplexity": round(perplexity(model, heldout, batch_size=2), 3),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        del model
    return rows


def best_per_method(rows: list[dict[str, Any]], key: str) -> dict[str, str]:
    """``{method: contender}``: the contender of each method (``"switch"``, ``"bias"``) with the
    lowest ``key`` (the held-out loss), i.e. each method at its best setting."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        method = row["contender"].split()[0]
        if method in ("switch", "bias") and (method not in best or row[key] < best[method][key]):
            best[method] = row
    return {method: row["contender"] for method, row in best.items()}


def print_lm(rows: list[dict[str, Any]], console: Console) -> None:
    columns = ("contender", "held-out CE", "imbalance mean", "imbalance max", "s")
    print_table(
        console,
        "Demo LM (8 experts, top-2): held-out CE and imbalance (max/mean tokens per expert)",
        columns,
        (
            (
                row["contender"],
                f"{row['val_loss']:.4f}",
                f"{row['imbalance_mean']:.3f}",
                f"{row['imbalance_max']:.3f}",
                f"{row['seconds']:.0f}",
            )
            for row in rows
        ),
        left=len(columns),
    )


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if result["lm"]:
        print_lm(result["lm"], console)
    if result.get("routers"):
        columns = (
            "contender",
            "imbalance mean",
            "imbalance max",
            "rel. error",
            "recall",
            "perplexity",
            "s",
        )
        print_table(
            console,
            "SmolLM2 split 8 experts top-4, router training: held-out, mean over layers",
            columns,
            (
                (
                    row["contender"],
                    f"{row['heldout_imbalance_mean']:.3f}",
                    f"{row['heldout_imbalance_max']:.3f}",
                    f"{row['heldout_rel_error']:.4f}",
                    f"{row['heldout_recall']:.4f}",
                    f"{row['heldout_perplexity']:.2f}",
                    f"{row['seconds']:.0f}",
                )
                for row in result["routers"]
            ),
            left=len(columns),
        )
    if result.get("finetune"):
        from pimoe.bench.balance_finetune import print_finetune

        print_finetune(result["finetune"], console)


def main(
    quick: bool = False,
    json_path: str | Path | None = None,
    progress: bool = True,
    steps: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Entry point of ``pimoe bench balance``: both workloads (``quick``: a smoke-sized run;
    ``steps``: training steps of both workloads; ``overrides``: :class:`BalanceBenchConfig`
    fields, e.g. ``workloads=("lm",)``)."""
    if steps is not None:
        overrides = {"lm_steps": steps, "router_steps": steps, **overrides}
    cfg = replace(QUICK if quick else BalanceBenchConfig(), **overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        result: dict[str, Any] = run_header("balance", cfg)
        result["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
        result["lm"] = lm_workload(cfg, progress) if "lm" in cfg.workloads else []
        result["routers"] = router_workload(cfg, progress) if "routers" in cfg.workloads else []
        if "finetune" in cfg.workloads:
            from pimoe.bench.balance_finetune import finetune_workload

            result["finetune"] = finetune_workload(cfg, progress)
        result["best"] = {
            "lm": best_per_method(result["lm"], "val_loss"),
            "routers": best_per_method(result["routers"], "heldout_perplexity"),
            "finetune": best_per_method(result.get("finetune", {}).get("rows", []), "heldout_loss"),
        }
        result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    finally:
        torch.set_num_threads(threads)
    print_report(result)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    return result
