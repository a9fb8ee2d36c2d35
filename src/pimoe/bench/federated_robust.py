"""Robust aggregation under malicious clients on the digits federation, every aggregator in one run.

Workload: 100 clients on non-IID (Dirichlet 0.5) digits shards, 20% sampled per round, the
MLP 64-128-10, in process. A fixed, seeded set of 10% or 30% of the client ids is malicious:
each trains honestly, then sends its change scaled by 100, by 1e4, or with its sign flipped
(``FederatedConfig.attack``). Aggregators, all measured here on the same shards and seeds:

- ``fedavg``: Flower FedAvg with no norm screen (only the dtype / shape / NaN checks);
- ``fedavg+screen``: FedAvg with the shipped norm screen (reject > 10x the round's median change);
- ``median``: coordinate-wise median (Flower FedMedian);
- ``trimmed``: coordinate-wise trimmed mean (Flower FedTrimmedAvg, beta 0.2 cut from each tail);
- ``clip``: norm-bounded FedAvg (every change clipped to ``clip_norm``; honest clients' changes
  have a median norm of about 1.4-1.9 here, so the default 2.0 clips only the larger honest ones).

Reported: the final test accuracy of each (aggregator, attack, malicious fraction), plus every
aggregator's accuracy without attack as its own peer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.federated.config import FederatedConfig
from pimoe.federated.simulation import flower_log_level, run_federated
from pimoe.io import atomic_write_text, save_png

AGGREGATORS: dict[str, dict[str, Any]] = {
    "fedavg": dict(strategy="fedavg", norm_factor=0.0),
    "fedavg+screen": dict(strategy="fedavg"),
    "median": dict(strategy="fedmedian", norm_factor=0.0),
    "trimmed": dict(strategy="fedtrimmedavg", norm_factor=0.0),
    "clip": dict(strategy="fedavg", norm_factor=0.0),
}


@dataclass
class RobustBenchConfig:
    """The grid: every aggregator x (no attack, every attack at every malicious fraction)."""

    base: FederatedConfig = field(default_factory=lambda: FederatedConfig(rounds=15))
    aggregators: list[str] = field(default_factory=lambda: list(AGGREGATORS))
    attacks: list[str] = field(default_factory=lambda: ["scale", "scale1e4", "signflip"])
    malicious_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3])
    clip_norm: float = 2.0


def malicious_ids(clients: int, fraction: float, seed: int) -> str:
    """A seeded ``FederatedConfig.malicious`` string naming ``round(fraction * clients)`` client ids."""
    count = round(fraction * clients)
    ids = np.random.default_rng(seed + 7).choice(clients, size=count, replace=False)
    return ",".join(str(i) for i in sorted(ids.tolist()))


def run(cfg: RobustBenchConfig, console: Console | None = None) -> dict:
    """Measure and return the results as a JSON-serializable dict."""
    unknown = set(cfg.aggregators) - set(AGGREGATORS)
    if unknown:
        raise ValueError(
            f"unknown aggregators {sorted(unknown)}; expected some of {list(AGGREGATORS)}"
        )
    console = console or Console()
    torch.set_num_threads(1)
    scenarios = [("none", 0.0)] + [(a, f) for f in cfg.malicious_fractions for a in cfg.attacks]
    runs = []
    # rejected updates are expected here: Flower's warnings about them are hidden as well
    with flower_log_level(logging.ERROR), Progress(console=console) as progress:
        task = progress.add_task("robust aggregation", total=len(scenarios) * len(cfg.aggregators))
        for attack, fraction in scenarios:
            for name in cfg.aggregators:
                run_cfg = replace(
                    cfg.base,
                    **AGGREGATORS[name],
                    clip_norm=cfg.clip_norm if name == "clip" else 0.0,
                    malicious=malicious_ids(cfg.base.clients, fraction, cfg.base.seed)
                    if fraction
                    else "",
                    attack=attack if fraction else "scale",
                )
                start = time.perf_counter()
                record = run_federated(run_cfg, backend="inprocess")
                runs.append(
                    {
                        "aggregator": name,
                        "attack": attack,
                        "malicious_fraction": fraction,
                        "final_accuracy": record.accuracy[-1],
                        "accuracy_per_round": record.accuracy,
                        "rejected_updates": sum(r.rejected for r in record.rounds),
                        "seconds": time.perf_counter() - start,
                    }
                )
                progress.update(
                    task,
                    advance=1,
                    description=f"{name}, {attack} {fraction:.0%}: {record.accuracy[-1]:.3f}",
                )
    result = {**run_header("federated_robust", cfg), "runs": runs}
    _print(result, console)
    return result


def _rows(result: dict) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    cells = {
        (
            r["aggregator"],
            "none"
            if not r["malicious_fraction"]
            else f"{r['attack']} {r['malicious_fraction']:.0%}",
        ): r["final_accuracy"]
        for r in result["runs"]
    }
    aggregators = list(dict.fromkeys(r["aggregator"] for r in result["runs"]))
    scenarios = list(dict.fromkeys(s for _, s in cells))
    return aggregators, scenarios, cells


def _print(result: dict, console: Console) -> None:
    aggregators, scenarios, cells = _rows(result)
    base = result["config"]["base"]
    print_table(
        console,
        f"final test accuracy, {base['clients']} clients, {base['rounds']} rounds, "
        f"{base['fraction']:.0%} sampled, {base['partition']}",
        ("attack, malicious", *aggregators),
        [(s, *(f"{cells[(a, s)]:.3f}" for a in aggregators)) for s in scenarios],
        left=1,
    )


def plot(result: dict, path: Path) -> None:
    """Heat map of final accuracy: attack scenario (rows) x aggregator (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregators, scenarios, cells = _rows(result)
    grid = np.array([[cells[(a, s)] for a in aggregators] for s in scenarios])
    fig, ax = plt.subplots(figsize=(1.3 * len(aggregators) + 2, 0.45 * len(scenarios) + 1.5))
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(aggregators)), aggregators)
    ax.set_yticks(range(len(scenarios)), scenarios)
    for i in range(len(scenarios)):
        for j in range(len(aggregators)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("Final test accuracy under malicious clients (digits, 100 clients)")
    save_png(fig, path, dpi=110, bbox_inches="tight")


def main(quick: bool = False, json_path: Path | None = None) -> dict:
    """Entry point of ``pimoe bench federated-robust``.

    ``quick``: 8 rounds, the scale x100 and sign-flip attacks at 30% only (about a third of the runs).
    """
    cfg = RobustBenchConfig()
    if quick:
        cfg = RobustBenchConfig(
            base=FederatedConfig(rounds=8), attacks=["scale", "signflip"], malicious_fractions=[0.3]
        )
    result = run(cfg)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
        plot(result, Path(json_path).with_suffix(".png"))
    return result
