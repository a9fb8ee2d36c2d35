"""Balancing while the model keeps learning: a short fine-tune of the upcycled SmolLM2 in which
the routers and the experts train together, with DeepSeek-V3's selection bias or the Switch loss.

The model is SmolLM2-135M-Instruct split into 8 experts per MLP at top-4 with the demo's cached
routers and refit (``pimoe demo``), switched to DeepSeek-V3's weighted routing so that the
routers learn from the language-modelling loss: sigmoid scores, the chosen experts' scores
normalized to sum 1 and scaled by ``top_k`` (folded into the experts' down projections, so that
equal weights give the split model's unweighted sum). Every contender starts from that model and
trains the experts (``w_in``, ``w_out``) and router gates (everything else frozen) with AdamW on
the same random 128-token windows of Python's documentation (the training 90%) for the same
steps. The Switch contenders add ``coef * mean over layers of the Switch loss``; the bias
contenders update every router's bias after each optimizer step
(:func:`pimoe.moe.attach_bias_update`), without any auxiliary loss.

Reported per contender: held-out loss (mean next-token cross-entropy on the first windows of the
held-out 10%), and the imbalance (max / mean assignments per expert, 2.0 = four experts take
everything at top-4 of 8) of each layer, on the training tokens of the last half of the steps
and on the held-out tokens.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from pimoe.bench.balance import balance_contenders
from pimoe.bench.printing import print_table
from pimoe.moe import attach_bias_update, set_balance

if TYPE_CHECKING:
    from pimoe.bench.balance import BalanceBenchConfig


def weighted_routing(model: nn.Module) -> None:
    """Switch the split-upcycled ``model``'s :class:`~pimoe.moe.PiMoE` layers in place to
    DeepSeek-V3's weighting: sigmoid scores, chosen weights normalized and scaled by ``top_k``
    (the scale folded into ``experts.w_out [E, D, F_e]``); the chosen experts do not change."""
    from pimoe.models.upcycle import moe_layers

    for layer in moe_layers(model):
        if layer.config.weight_outputs:
            raise ValueError(
                "weighted_routing expects a split-upcycled model (weight_outputs=False)"
            )
        layer.config = layer.config.replace(score="sigmoid", normalize=True, weight_outputs=True)
        layer.router.config = layer.config
        with torch.no_grad():
            layer.experts.get_parameter("w_out").mul_(layer.top_k)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze ``model`` except its experts and router gates; return those parameters."""
    from pimoe.models.upcycle import moe_layers

    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer in moe_layers(model):
        for module in (layer.experts, layer.router.gate):
            module.requires_grad_(True)
            params.extend(module.parameters())
    return params


def _imbalance(stats: list[Any]) -> list[float]:
    return [round(s.imbalance, 3) for s in stats]


def finetune_contender(
    start: nn.Module,
    options: dict[str, Any],
    train_ids: Tensor,
    heldout: Tensor,
    cfg: BalanceBenchConfig,
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune a copy of ``start`` with one balancing ``options`` (``{"balance": "none"}``,
    ``{"balance": "aux_loss", "aux_loss_coef": c}`` or ``{"balance": "bias",
    "bias_update_rate": u}``) on seeded batches of ``train_ids [N]``; one result row."""
    from pimoe.bench.expert_lora import heldout_loss
    from pimoe.models.progress import track
    from pimoe.models.upcycle import moe_layers, record_routing

    model = copy.deepcopy(start)
    layers = moe_layers(model)
    optimizer = torch.optim.AdamW(_trainable(model), lr=cfg.finetune_lr, weight_decay=0.0)
    balance, coef = options["balance"], float(options.get("aux_loss_coef", 0.0))
    if balance == "bias":
        set_balance(model, "bias", options["bias_update_rate"])
        attach_bias_update(optimizer, model)
    generator = torch.Generator().manual_seed(cfg.seed)
    window, steps = cfg.finetune_window, cfg.finetune_steps
    losses: list[float] = []
    model.train()
    with record_routing(model) as totals:
        for step in track(range(steps), "balance fine-tune", enabled=progress):
            if step == steps // 2:
                totals[:] = [None] * len(totals)  # count the last half only
            starts = torch.randint(
                len(train_ids) - window - 1, (cfg.finetune_batch,), generator=generator
            )
            batch = torch.stack(
                [train_ids[s : s + window + 1] for s in starts.tolist()]
            )  # [B, S+1]
            logits = model(batch[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
            )
            losses.append(loss.item())
            if balance == "aux_loss":
                loss = loss + coef * torch.stack([layer.aux_loss for layer in layers]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_stats = list(totals)
    with record_routing(model) as totals:
        after = heldout_loss(model, heldout)
        heldout_stats = list(totals)
    train_imbalance, heldout_imbalance = _imbalance(train_stats), _imbalance(heldout_stats)
    return {
        "heldout_loss": round(after, 4),
        "heldout_perplexity": round(math.exp(after), 3),
        "train_loss_last_10": round(statistics.mean(losses[-10:]), 4),
        "train_imbalance_mean": round(statistics.mean(train_imbalance), 3),
        "train_imbalance_max": max(train_imbalance),
        "heldout_imbalance_mean": round(statistics.mean(heldout_imbalance), 3),
        "heldout_imbalance_max": max(heldout_imbalance),
        "heldout_imbalance_per_layer": heldout_imbalance,
    }


def finetune_workload(cfg: BalanceBenchConfig, progress: bool = True) -> dict[str, Any]:
    """The start model's held-out loss and imbalance, then one row per contender."""
    from pimoe.bench.expert_lora import heldout_loss
    from pimoe.demo_pretrained import PretrainedDemoSettings, upcycle_with_cached_routers
    from pimoe.models import load_pretrained
    from pimoe.models.perplexity import pydoc_token_splits, windows
    from pimoe.models.upcycle import record_routing

    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    train_ids, heldout_ids = pydoc_token_splits(tokenizer)
    source, _ = upcycle_with_cached_routers(
        model, train_ids, windows(heldout_ids, 256, 2), PretrainedDemoSettings(), progress=progress
    )
    heldout = windows(heldout_ids, 256, cfg.finetune_heldout_windows)
    split_loss = heldout_loss(model, heldout)
    weighted_routing(model)
    with record_routing(model) as totals:
        start_loss = heldout_loss(model, heldout)
        start_imbalance = _imbalance(list(totals))
    contenders = balance_contenders(
        cfg.baseline, cfg.finetune_switch_coefs, cfg.finetune_bias_rates
    )
    rows = []
    for name, options in contenders.items():
        begin = time.perf_counter()
        row = finetune_contender(model, options, train_ids, heldout, cfg, progress)
        rows.append({"contender": name, **row, "seconds": round(time.perf_counter() - begin, 1)})
    return {
        "routers": source,
        "heldout_tokens": heldout.numel(),
        "split_heldout_loss": round(split_loss, 4),
        "start_heldout_loss": round(start_loss, 4),
        "start_heldout_imbalance_mean": round(statistics.mean(start_imbalance), 3),
        "start_heldout_imbalance_max": max(start_imbalance),
        "rows": rows,
    }


def print_finetune(result: dict[str, Any], console: Console) -> None:
    columns = (
        "contender",
        "held-out loss",
        "perplexity",
        "train imb. mean / max",
        "held-out imb. mean / max",
        "s",
    )
    print_table(
        console,
        "SmolLM2 split 8x top-4, experts + routers fine-tuned: held-out loss (start "
        f"{result['start_heldout_loss']:.4f}) and imbalance (max/mean tokens per expert)",
        columns,
        (
            (
                row["contender"],
                f"{row['heldout_loss']:.4f}",
                f"{row['heldout_perplexity']:.2f}",
                f"{row['train_imbalance_mean']:.3f} / {row['train_imbalance_max']:.3f}",
                f"{row['heldout_imbalance_mean']:.3f} / {row['heldout_imbalance_max']:.3f}",
                f"{row['seconds']:.0f}",
            )
            for row in result["rows"]
        ),
        left=len(columns),
    )
