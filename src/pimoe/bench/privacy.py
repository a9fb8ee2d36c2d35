"""Privacy costs on sklearn digits: DP-SGD accuracy, secure aggregation and CKKS aggregation.

- DP-SGD (Opacus, PRV accountant, delta 1e-5) on the 64-128-10 MLP at epsilon 1 / 3 / 8 vs the
  same training without DP (peer, same seeds, same run): test accuracy, epsilon spent, time.
- Secure aggregation (pairwise masking) of N clients' real updates (one local epoch on an IID
  shard, 9,610 floats each): exactness vs the plaintext sum, time per phase per round, bytes,
  with and without 10% of the clients dropping after masking; peer: the plaintext sum.
- CKKS aggregation (TenSEAL) of 10 such updates: max error of the mean vs plaintext, encrypt /
  add / decrypt time, ciphertext bytes vs fp32 bytes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from pimoe.bench.printing import print_table
from pimoe.bench.privacy_aggregation import client_updates, he_round, secagg_round
from pimoe.bench.timing import run_header
from pimoe.data.digits import digits_split
from pimoe.federated.digits import DigitsTask
from pimoe.federated.task import evaluate, train_epochs
from pimoe.io import atomic_write_text, save_png
from pimoe.privacy.dp import Accountant, epsilon, make_private, train_private


@dataclass
class PrivacyBenchConfig:
    """DP training settings (Adam, batch 128, clip 1.0), aggregation sizes and timing repeats."""

    epsilons: list[float] = field(default_factory=lambda: [1.0, 3.0, 8.0])
    delta: float = 1e-5
    epochs: int = 20
    lr: float = 5e-3
    batch_size: int = 128
    max_grad_norm: float = 1.0
    accountant: Accountant = "prv"
    model: str = "mlp"  # the digits model of the DP runs: "mlp" or "moe" (a trainable PiMoE block)
    seeds: int = 3
    secagg_clients: list[int] = field(default_factory=lambda: [10, 100])
    dropout: float = 0.1
    he_clients: int = 10
    rounds: int = 3


QUICK = PrivacyBenchConfig(epochs=10, seeds=1, secagg_clients=[10], rounds=1)


def _loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def dp_run(cfg: PrivacyBenchConfig, target_epsilon: float | None, seed: int) -> dict:
    """Train ``cfg.model`` on the digits training set (DP-SGD if ``target_epsilon``); test accuracy and cost."""
    train, test = digits_split(0.2, 0)
    torch.manual_seed(seed)
    model = DigitsTask(cfg.model).build_model()
    optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader, engine = _loader(train.x, train.y, cfg.batch_size, seed), None
    if target_epsilon is not None:
        model, optimizer, loader, engine = make_private(
            model,
            optimizer,
            loader,
            target_epsilon=target_epsilon,
            target_delta=cfg.delta,
            epochs=cfg.epochs,
            max_grad_norm=cfg.max_grad_norm,
            accountant=cfg.accountant,
        )
    start = time.perf_counter()
    if engine is not None:  # every Poisson batch is an accounted step, empty ones included
        train_private(model, optimizer, loader, epochs=cfg.epochs)
    else:
        train_epochs(
            model,
            train,
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=seed,
            optimizer=optimizer,
            batches=loader,
        )
    seconds = time.perf_counter() - start
    return {
        "accuracy": evaluate(model, test)[1],
        "epsilon_spent": epsilon(engine, cfg.delta) if engine is not None else None,
        "noise_multiplier": cast(Any, optimizer).noise_multiplier if engine is not None else 0.0,
        "train_seconds": seconds,
    }


def dp_results(cfg: PrivacyBenchConfig, progress: Progress) -> tuple[dict, list[dict]]:
    """The non-private peer and one row per target epsilon (mean, min, max over seeds)."""
    targets: list[float | None] = [None, *cfg.epsilons]
    task = progress.add_task("DP-SGD runs", total=len(targets) * cfg.seeds)
    runs: dict[float | None, list[dict]] = {t: [] for t in targets}
    for seed in range(cfg.seeds):
        for target in targets:
            runs[target].append(dp_run(cfg, target, seed))
            progress.advance(task)

    def summary(rs: list[dict]) -> dict:
        acc = [r["accuracy"] for r in rs]
        return {
            "accuracy_mean": float(np.mean(acc)),
            "accuracy_min": min(acc),
            "accuracy_max": max(acc),
            "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
        }

    peer = summary(runs[None])
    rows = []
    for target in cfg.epsilons:
        row = {
            "target_epsilon": target,
            **summary(runs[target]),
            "epsilon_spent": max(r["epsilon_spent"] for r in runs[target]),
            "noise_multiplier": runs[target][0]["noise_multiplier"],
        }
        row["accuracy_ratio_to_non_private"] = row["accuracy_mean"] / peer["accuracy_mean"]
        row["time_ratio_to_non_private"] = row["train_seconds"] / peer["train_seconds"]
        rows.append(row)
    return peer, rows


def run(cfg: PrivacyBenchConfig, console: Console | None = None) -> dict:
    """Measure and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.set_num_threads(1)
    with Progress(console=console, transient=True) as progress:
        peer, dp_rows = dp_results(cfg, progress)
        task = progress.add_task("aggregation rounds", total=len(cfg.secagg_clients) + 1)
        updates = client_updates(max(cfg.he_clients, *cfg.secagg_clients))
        secagg = []
        for n in cfg.secagg_clients:
            secagg.append(secagg_round(updates[:n], cfg.dropout, cfg.rounds))
            progress.advance(task)
        he_result = he_round(updates[: cfg.he_clients], cfg.rounds)
        progress.advance(task)
    result = {
        **run_header("privacy", cfg),
        "non_private": peer,
        "dp": dp_rows,
        "secagg": secagg,
        "he": he_result,
    }
    _print(result, console)
    return result


def _print(result: dict, console: Console) -> None:
    cfg, peer = result["config"], result["non_private"]
    print_table(
        console,
        f"DP-SGD on digits (MLP 64-128-10, {cfg['epochs']} epochs, delta {cfg['delta']:g}, "
        f"{cfg['seeds']} seed(s)); non-private accuracy {peer['accuracy_mean']:.3f}",
        (
            "target ε",
            "ε spent",
            "noise σ",
            "accuracy (min-max)",
            "x non-private acc",
            "x non-private time",
        ),
        [
            (
                f"{r['target_epsilon']:g}",
                f"{r['epsilon_spent']:.2f}",
                f"{r['noise_multiplier']:.2f}",
                f"{r['accuracy_mean']:.3f} ({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f})",
                f"{r['accuracy_ratio_to_non_private']:.3f}",
                f"{r['time_ratio_to_non_private']:.1f}",
            )
            for r in result["dp"]
        ],
    )
    print_table(
        console,
        "Secure aggregation (pairwise masks), one round; ms (keygen, mask: per client)",
        ("N", "drop", "exact", "error", "keygen", "mask", "unmask", "+drop", "plain", "B/fp32"),
        [
            (
                str(r["clients"]),
                str(r["dropped"]),
                str(r["bit_exact"]),
                f"{max(r['max_abs_error'], r['max_abs_error_with_dropped']):.1e}",
                f"{r['keygen_ms_per_client']:.2f}",
                f"{r['mask_ms_per_client']:.2f}",
                f"{r['unmask_ms']:.2f}",
                f"{r['unmask_with_dropped_ms']:.2f}",
                f"{r['plaintext_sum_ms']:.3f}",
                f"{r['bytes_ratio_to_fp32']:.2f}",
            )
            for r in result["secagg"]
        ],
    )
    h = result["he"]
    console.print(
        f"CKKS aggregation, {h['clients']} clients x {h['dim']} floats: max error of the mean {h['max_abs_error']:.1e}, "
        f"encrypt {h['encrypt_ms_per_client']:.1f} ms/client, add {h['add_ms']:.1f} ms, decrypt {h['decrypt_ms']:.1f} ms "
        f"(plaintext mean {h['plaintext_mean_ms']:.3f} ms), {h['bytes_per_client'] / 1e6:.2f} MB/client "
        f"({h['bytes_ratio_to_fp32']:.0f}x fp32), public context {h['public_context_bytes'] / 1e6:.2f} MB"
    )


def plot(result: dict, path: Path) -> None:
    """PNG: DP test accuracy (mean, min-max) per target epsilon, with the non-private accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["dp"]
    eps = [r["target_epsilon"] for r in rows]
    mean = np.array([r["accuracy_mean"] for r in rows])
    low, high = (
        mean - [r["accuracy_min"] for r in rows],
        np.array([r["accuracy_max"] for r in rows]) - mean,
    )
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(eps, mean, yerr=[low, high], marker="o", capsize=3, label="DP-SGD (Opacus)")
    ax.axhline(
        result["non_private"]["accuracy_mean"], color="gray", linestyle="--", label="non-private"
    )
    ax.set(
        xscale="log",
        xlabel=f"ε (δ = {result['config']['delta']:g})",
        ylabel="test accuracy",
        title="DP-SGD on sklearn digits",
    )
    ax.minorticks_off()
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def dp_models(epsilon_target: float = 8.0, epochs: int = 10, seed: int = 0) -> dict:
    """DP-SGD on the MLP (Opacus hooks) and on the PiMoE classifier (exact per-example gradients),
    same data, budget (RDP accountant) and seed: test accuracy and training wall time of each."""
    cfg = PrivacyBenchConfig(epochs=epochs, accountant="rdp")
    load_before, cpu_start = os.getloadavg(), time.process_time()
    runs = {m: dp_run(replace(cfg, model=m), epsilon_target, seed) for m in ("mlp", "moe")}
    return {
        **run_header("privacy_dp_models", cfg),
        "target_epsilon": epsilon_target,
        "seed": seed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "process_cpu_seconds": time.process_time() - cpu_start,
        "runs": runs,
    }


def main(quick: bool = False, json_path: Path | None = None) -> dict:
    """Entry point of ``benchmarks/privacy.py`` and ``pimoe bench privacy``; with ``json_path``, the
    plot goes next to it as PNG."""
    result = run(QUICK if quick else PrivacyBenchConfig())
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
        plot(result, Path(json_path).with_suffix(".png"))
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="DP-SGD on the digits MLP vs the PiMoE classifier (docs/privacy.md)."
    )
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon (delta 1e-5)")
    parser.add_argument("--epochs", type=int, default=10, help="DP-SGD epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    models = dp_models(args.epsilon, args.epochs, args.seed)
    print(json.dumps(models, indent=2))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(models, indent=2))
