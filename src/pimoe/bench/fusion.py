"""Sensor fusion on sklearn digits: two sensors (top and bottom image halves, with independent
noise), each alone vs every fusion method, same training budget; and cross-modal retrieval between
the halves with CLIP-style contrastive encoders (recall@1/@5 vs chance).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from tqdm import tqdm

from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.fusion import (
    METHODS,
    ContrastiveAligner,
    FusionClassifier,
    FusionConfig,
    build_fusion,
    digit_halves,
    recall_at_k,
)
from pimoe.io import atomic_write_text

Views = dict[str, Tensor]


@dataclass
class FusionBenchConfig:
    """Data, model and training sizes (every method gets the same budget)."""

    noise_std: float = 0.1
    d_model: int = 64
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    aux_coef: float = 0.01
    contrastive_epochs: int = 100
    seeds: int = 3
    seed: int = 0


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def train_classifier(
    model: FusionClassifier, views: Views, y: Tensor, cfg: FusionBenchConfig, seed: int
) -> float:
    """Adam on cross-entropy (+ ``aux_coef`` x the MoE balance loss); returns seconds taken."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        for idx in _batches(len(y), cfg.batch_size, generator):
            loss = F.cross_entropy(model({m: v[idx] for m, v in views.items()}), y[idx])
            loss = loss + cfg.aux_coef * model.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, views: Views, y: Tensor) -> float:
    model.eval()
    return float((model(views).argmax(-1) == y).float().mean())


def classification(
    cfg: FusionBenchConfig, data: tuple[Views, Tensor, Views, Tensor]
) -> dict[str, dict]:
    """Test accuracy (mean and per seed) of each sensor alone and of each fusion method."""
    train_v, train_y, test_v, test_y = data
    dims = {m: v.shape[-1] for m, v in train_v.items()}
    # Each sensor alone, with the MLP-and-pool model and with the attention + MoE model (the
    # strongest single-sensor architecture here), then both sensors with every fusion method.
    contenders: dict[str, tuple[str, dict[str, int]]] = {}
    for m, d in dims.items():
        contenders[f"{m}_only"] = ("concat", {m: d})
        contenders[f"{m}_only_attention"] = ("moe", {m: d})
    contenders.update({method: (method, dims) for method in METHODS})
    results = {}
    for name, (method, modalities) in tqdm(contenders.items(), desc="fusion methods", leave=False):
        accs, seconds = [], 0.0
        for s in range(cfg.seeds):
            torch.manual_seed(cfg.seed + s)
            model = FusionClassifier(
                build_fusion(FusionConfig(modalities, method, cfg.d_model)), 10
            )
            seconds += train_classifier(
                model, {m: train_v[m] for m in modalities}, train_y, cfg, cfg.seed + s
            )
            accs.append(accuracy(model, {m: test_v[m] for m in modalities}, test_y))
        results[name] = {
            "acc": sum(accs) / len(accs),
            "per_seed": accs,
            "train_s": seconds / cfg.seeds,
        }
    return results


def _encoder(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, 128), nn.GELU(), nn.Linear(128, d_out))


def retrieval(
    cfg: FusionBenchConfig, data: tuple[Views, Tensor, Views, Tensor]
) -> dict[str, float]:
    """Contrastive encoders for top and bottom halves trained on the train split; recall@1/@5 of
    finding an image's other half among all test images (both directions), vs chance."""
    train_v, _, test_v, _ = data
    torch.manual_seed(cfg.seed)
    aligner = ContrastiveAligner(_encoder(32, cfg.d_model), _encoder(32, cfg.d_model))
    optimizer = torch.optim.Adam(aligner.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(cfg.seed)
    n = len(train_v["top"])
    for _ in tqdm(range(cfg.contrastive_epochs), desc="contrastive", leave=False):
        for idx in _batches(n, 128, generator):
            loss = aligner(train_v["top"][idx], train_v["bottom"][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        top, bottom = aligner.embed_a(test_v["top"]), aligner.embed_b(test_v["bottom"])
    t2b, b2t = recall_at_k(top, bottom), recall_at_k(bottom, top)
    n_test = len(top)
    return {
        "recall_at_1": (t2b[1] + b2t[1]) / 2,
        "recall_at_5": (t2b[5] + b2t[5]) / 2,
        "top_to_bottom_recall_at_1": t2b[1],
        "bottom_to_top_recall_at_1": b2t[1],
        "chance_recall_at_1": 1 / n_test,
        "chance_recall_at_5": 5 / n_test,
        "temperature": float(1 / aligner.logit_scale.detach()),
        "gallery_size": n_test,
    }


def run(cfg: FusionBenchConfig, console: Console | None = None) -> dict:
    """Measure and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.set_num_threads(1)
    data = digit_halves(noise_std=cfg.noise_std, seed=cfg.seed)
    cls = classification(cfg, data)
    ret = retrieval(cfg, data)
    single = max(r["acc"] for name, r in cls.items() if "_only" in name)
    result = {
        **run_header("fusion", cfg),
        "classification": cls,
        "retrieval": ret,
        "best_single_sensor_acc": single,
    }
    for method in METHODS:
        result[f"{method}_acc"] = cls[method]["acc"]
    result["recall_at_1"], result["recall_at_5"] = ret["recall_at_1"], ret["recall_at_5"]
    _print(result, console)
    return result


def _print(result: dict, console: Console) -> None:
    best = result["best_single_sensor_acc"]
    print_table(
        console,
        f"Digits seen by two noisy sensors (top/bottom half): test accuracy, "
        f"mean of {result['config']['seeds']} seeds",
        ("model", "accuracy", "vs best single sensor", "train s"),
        [
            (name, f"{r['acc']:.3f}", f"{r['acc'] - best:+.3f}", f"{r['train_s']:.1f}")
            for name, r in result["classification"].items()
        ],
    )
    r = result["retrieval"]
    console.print(
        f"Cross-modal retrieval over {r['gallery_size']} test images: recall@1 {r['recall_at_1']:.3f} "
        f"(chance {r['chance_recall_at_1']:.4f}), recall@5 {r['recall_at_5']:.3f} "
        f"(chance {r['chance_recall_at_5']:.4f}), learned temperature {r['temperature']:.3f}"
    )


def main(quick: bool = False, json_path: Path | None = None) -> dict:
    """Entry point of ``benchmarks/fusion.py`` (and of ``pimoe bench fusion``)."""
    cfg = FusionBenchConfig()
    if quick:
        cfg = FusionBenchConfig(epochs=15, contrastive_epochs=30, seeds=1)
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
