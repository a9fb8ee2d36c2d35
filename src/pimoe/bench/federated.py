"""Federated vs centralized training on sklearn digits over 100 simulated edge nodes.

Peer: the same 64-128-10 MLP trained centrally on the pooled 1,437 training digits (Adam 1e-3,
30 epochs), measured in the same run. Contenders: 100 Flower clients, 20% sampled per round,
FedAvg and FedProx, IID and Dirichlet(alpha=0.5) non-IID shards, with 0% and 30% of the sampled
clients failing each round. Reported: final test accuracy, its ratio to centralized, and the
first round reaching 90% of centralized accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, TaskID

from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.federated.config import FederatedConfig
from pimoe.federated.plot import plot_accuracy
from pimoe.federated.simulation import run_federated
from pimoe.federated.task import centralized_accuracy, load_task
from pimoe.io import atomic_write_text


@dataclass
class FederatedBenchConfig:
    """The grid of runs; every run shares ``base`` except the fields varied here."""

    base: FederatedConfig = field(default_factory=FederatedConfig)
    strategies: list[str] = field(default_factory=lambda: ["fedavg", "fedprox"])
    partitions: list[str] = field(default_factory=lambda: ["iid", "dirichlet"])
    dropouts: list[float] = field(default_factory=lambda: [0.0, 0.3])
    backend: str = "ray"
    centralized_epochs: int = 30


def run(cfg: FederatedBenchConfig, console: Console | None = None) -> dict:
    """Measure and return the results as a JSON-serializable dict."""
    console = console or Console()
    torch.set_num_threads(1)
    central = centralized_accuracy(
        load_task(cfg.base), cfg.base.clients, cfg.centralized_epochs, cfg.base.seed
    )
    runs = []
    grid = [(s, p, d) for p in cfg.partitions for s in cfg.strategies for d in cfg.dropouts]
    with Progress(console=console) as progress:
        for strategy, partition, dropout in grid:
            run_cfg = replace(cfg.base, strategy=strategy, partition=partition, dropout=dropout)
            label = f"{strategy}, {partition}, dropout {dropout:g}"
            task = progress.add_task(label, total=run_cfg.rounds)
            start = time.perf_counter()

            def on_round(server_round: int, acc: float, task: TaskID = task) -> None:
                progress.update(task, completed=server_round)

            record = run_federated(run_cfg, cfg.backend, on_round=on_round)
            final = record.accuracy[-1]
            runs.append(
                {
                    "strategy": strategy,
                    "partition": partition,
                    "dropout": dropout,
                    "final_accuracy": final,
                    "ratio_to_centralized": final / central,
                    "rounds_to_90pct": record.rounds_to_reach(0.9 * central),
                    "clients_per_round": record.clients_per_round,
                    "mean_clients_per_round": sum(record.clients_per_round)
                    / len(record.clients_per_round),
                    "rejected_updates": sum(r.rejected for r in record.rounds),
                    "seconds": time.perf_counter() - start,
                    "accuracy_per_round": record.accuracy,
                }
            )
    result = {**run_header("federated", cfg), "centralized_accuracy": central, "runs": runs}
    _print(result, console)
    return result


def _print(result: dict, console: Console) -> None:
    cfg = result["config"]["base"]
    print_table(
        console,
        f"{cfg['clients']} clients, {cfg['rounds']} rounds, {cfg['fraction']:.0%} sampled; "
        f"centralized accuracy {result['centralized_accuracy']:.3f} (same run)",
        (
            "strategy",
            "partition",
            "dropout",
            "clients/round",
            "final acc",
            "/ centralized",
            "rounds to 90%",
            "s",
        ),
        [
            (
                r["strategy"],
                r["partition"],
                f"{r['dropout']:.0%}",
                f"{r['mean_clients_per_round']:.1f}",
                f"{r['final_accuracy']:.3f}",
                f"{r['ratio_to_centralized']:.3f}",
                str(r["rounds_to_90pct"]),
                f"{r['seconds']:.0f}",
            )
            for r in result["runs"]
        ],
    )


def main(quick: bool = False, json_path: Path | None = None, backend: str | None = None) -> dict:
    """Entry point of ``benchmarks/federated.py`` (and of ``pimoe bench federated``).

    ``quick``: non-IID FedAvg only (0% and 30% dropout), 15 rounds, in process unless ``backend``
    says otherwise; the full grid runs on Flower's Ray backend.
    """
    cfg = FederatedBenchConfig()
    if quick:
        cfg = FederatedBenchConfig(
            base=FederatedConfig(rounds=15),
            strategies=["fedavg"],
            partitions=["dirichlet"],
            backend="inprocess",
        )
    if backend is not None:
        cfg = replace(cfg, backend=backend)
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
        curves = {
            f"{r['strategy']}, {r['partition']}, dropout {r['dropout']:.0%}": r[
                "accuracy_per_round"
            ]
            for r in result["runs"]
        }
        plot_accuracy(
            curves,
            result["centralized_accuracy"],
            json_path.with_suffix(".png"),
            title="Federated vs centralized, sklearn digits",
        )
    return result
