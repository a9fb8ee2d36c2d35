"""Expert dropping and merging on a PiMoE classifier for sklearn digits: test accuracy before/after.

The model is ``Linear(64, 64) -> x + PiMoE(LayerNorm(x)) -> Linear(64, 10)`` with 8 SwiGLU experts
(ffn 64), top-2, trained on 1,437 digits (AdamW, load-balancing loss 0.01) and tested on the other
360. Each configuration starts from the same trained model; routing statistics (expert loads) come
from the training images. "+ distill" repairs the smaller model by distilling the original's
logits on the training images (no labels), through :class:`~pimoe.compress.ArchitectureOptimizer`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.compress import (
    ArchitectureConfig,
    ArchitectureOptimizer,
    drop_experts,
    merge_similar_experts,
    saved_bytes,
)
from pimoe.io import atomic_write_text
from pimoe.moe import PiMoE


class DigitsMoE(nn.Module):
    """``x [B, 64] -> logits [B, 10]`` with one PiMoE layer in a residual block."""

    def __init__(self, num_experts: int = 8, d_model: int = 64, ffn_dim: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(64, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.moe = PiMoE(d_model, num_experts=num_experts, top_k=2, ffn_dim=ffn_dim)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.head(h + self.moe(self.norm(h)))


@dataclass
class ExpertBenchConfig:
    """Training settings and the seeds averaged over."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 40
    distill_epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3


def digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn digits scaled to [0, 1], split 1,437 train / 360 test (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data / 16.0, data.target, test_size=360, random_state=seed, stratify=data.target
    )
    return (
        torch.tensor(x_tr, dtype=torch.float32),
        torch.tensor(y_tr),
        torch.tensor(x_te, dtype=torch.float32),
        torch.tensor(y_te),
    )


def train(x: Tensor, y: Tensor, cfg: ExpertBenchConfig, seed: int) -> DigitsMoE:
    """Train a :class:`DigitsMoE` with cross-entropy plus 0.01 x the load-balancing loss."""
    torch.manual_seed(seed)
    model = DigitsMoE()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx]) + 0.01 * model.moe.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def _with_layer(model: DigitsMoE, make: Callable[[PiMoE], PiMoE]) -> DigitsMoE:
    new = copy.deepcopy(model)
    new.moe = make(model.moe)
    return new.eval()


def variants(model: DigitsMoE, x_tr: Tensor, cfg: ExpertBenchConfig) -> dict[str, nn.Module]:
    """Every configuration of the table, built from the trained ``model``."""
    with torch.inference_mode():
        model(x_tr)
    stats = model.moe.last_stats
    batches = list(x_tr.split(cfg.batch_size))

    def distilled(**steps: Any) -> nn.Module:
        config = ArchitectureConfig(
            enable_pruning=False,
            enable_quantization=False,
            enable_knowledge_distillation=True,
            distill_epochs=cfg.distill_epochs,
            distill_lr=1e-3,
            **steps,
        )
        return ArchitectureOptimizer(config).compress(model, distill_data=batches)

    return {
        "8 experts (trained)": model,
        "drop 2 (least loaded)": _with_layer(
            model, lambda m: drop_experts(m, amount=0.25, stats=stats)
        ),
        "drop 2 (smallest weight norm)": _with_layer(
            model, lambda m: drop_experts(m, amount=0.25, by="weight_norm")
        ),
        "drop 4 (least loaded)": _with_layer(
            model, lambda m: drop_experts(m, amount=0.5, stats=stats)
        ),
        "merge to 4 (router similarity, load-weighted)": _with_layer(
            model, lambda m: merge_similar_experts(m, 4, stats=stats)
        ),
        "merge to 4 (weight similarity, load-weighted)": _with_layer(
            model, lambda m: merge_similar_experts(m, 4, stats=stats, by="weights")
        ),
        "drop 4 (weight norm) + distill": distilled(enable_expert_drop=True, expert_drop_ratio=0.5),
        "merge to 4 (router) + distill": distilled(enable_expert_merge=True, experts_after_merge=4),
    }


def run(cfg: ExpertBenchConfig, console: Console | None = None) -> dict:
    """Train one model per seed, compress it every way and measure; mean over seeds."""
    console = console or Console()
    torch.set_num_threads(1)
    per_seed: dict[str, list[tuple[float, int, int]]] = {}
    for seed in cfg.seeds:
        x_tr, y_tr, x_te, y_te = digits_split(seed)
        model = train(x_tr, y_tr, cfg, seed)
        for name, variant in variants(model, x_tr, cfg).items():
            experts = cast(PiMoE, variant.moe).num_experts
            per_seed.setdefault(name, []).append(
                (accuracy(variant, x_te, y_te), saved_bytes(variant), experts)
            )
    base = per_seed["8 experts (trained)"]
    rows: list[dict[str, Any]] = []
    for name, values in per_seed.items():
        rows.append(
            {
                "name": name,
                "experts": values[0][2],
                "accuracy": sum(v[0] for v in values) / len(values),
                "accuracy_per_seed": [v[0] for v in values],
                "size_ratio": sum(v[1] / b[1] for v, b in zip(values, base)) / len(values),
            }
        )
    result = {
        **run_header("compress_experts", cfg),
        "dataset": "sklearn digits, 1437 train / 360 test",
        "rows": rows,
    }
    print_table(
        console,
        f"PiMoE digits classifier, test accuracy (mean of seeds {cfg.seeds})",
        ("configuration", "experts", "accuracy", "per seed", "size vs original"),
        [
            (
                row["name"],
                str(row["experts"]),
                f"{row['accuracy']:.3f}",
                " ".join(f"{a:.3f}" for a in row["accuracy_per_seed"]),
                f"{row['size_ratio']:.2f}",
            )
            for row in rows
        ],
        left=1,
    )
    return result


def main(quick: bool = False, json_path: Path | None = None) -> dict:
    """Entry point of ``benchmarks/compress_experts.py`` (and ``pimoe bench compress-experts``)."""
    cfg = (
        ExpertBenchConfig(seeds=[0], epochs=25, distill_epochs=5) if quick else ExpertBenchConfig()
    )
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
