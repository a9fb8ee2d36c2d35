"""Multi-objective search (Optuna TPE) vs random search at the same trial budget.

For each task and seed, both samplers run the same number of trials on the same space with the
same training settings (so one configuration always gets the same measurements up to latency
noise), without pruning. Each pair of fronts is scored by hypervolume under one normalization
(min-max over the union of both studies' completed trials, reference point 1.1 per objective).
The performance predictor is scored by leave-one-out Spearman rho over all completed trials of
a task (see :mod:`pimoe.search.predictor`).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from rich.console import Console

from pimoe.bench.printing import print_table
from pimoe.bench.timing import run_header
from pimoe.io import atomic_write_text
from pimoe.search.hypervolume import shared_hypervolumes
from pimoe.search.objective import TrialSettings
from pimoe.search.predictor import score_predictor
from pimoe.search.report import plot_front
from pimoe.search.space import SearchSpace
from pimoe.search.study import SamplerName, run_search
from pimoe.search.tasks import make_task

PEER = "random"


@dataclass
class SearchBenchConfig:
    """Budget per sampler and seed; ``sampler`` is compared with random search."""

    tasks: list[str] = field(default_factory=lambda: ["digits", "lm"])
    trials: int = 24
    seeds: int = 3
    steps: int = 60
    latency_repeats: int = 15
    sampler: SamplerName = "tpe"
    threads: int = 1
    space: SearchSpace = field(default_factory=SearchSpace)


def run(cfg: SearchBenchConfig, plot_prefix: Path | None = None, progress: bool = True) -> dict:
    """Run every (task, seed, sampler) study; return the results dict."""
    console = Console()
    result: dict[str, Any] = run_header("search", cfg)
    space = cfg.space
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    per_task: dict[str, dict] = {}
    try:
        for task_name in cfg.tasks:
            runs: list[dict[str, Any]] = []
            pooled = []
            for seed in range(cfg.seeds):
                task = make_task(task_name, seed=seed)
                settings = TrialSettings(
                    steps=cfg.steps, latency_repeats=cfg.latency_repeats, seed=seed
                )
                studies = {
                    name: run_search(
                        task,
                        space,
                        settings,
                        trials=cfg.trials,
                        sampler=cast(SamplerName, name),
                        seed=seed,
                        study_name=f"{task_name}-{name}-{seed}",
                        progress=progress,
                    )
                    for name in (cfg.sampler, PEER)
                }
                complete = {
                    name: [t for t in s.trials if t.values is not None]
                    for name, s in studies.items()
                }
                volumes = shared_hypervolumes(
                    {name: [t.values for t in ts] for name, ts in complete.items()}
                )
                runs.append(
                    {
                        "seed": seed,
                        "hypervolume_search": volumes[cfg.sampler],
                        "hypervolume_random": volumes[PEER],
                        "front_sizes": {n: len(s.best_trials) for n, s in studies.items()},
                    }
                )
                pooled += [t for ts in complete.values() for t in ts]
                if plot_prefix is not None and seed == 0:
                    plot_front(
                        complete,
                        plot_prefix.with_name(f"{plot_prefix.name}_{task_name}.png"),
                        title=f"{task_name}: {cfg.sampler} vs random, {cfg.trials} trials each",
                    )
            predictor = score_predictor(pooled, space)
            per_task[task_name] = {
                "runs": runs,
                "hypervolume_search": statistics.mean(r["hypervolume_search"] for r in runs),
                "hypervolume_random": statistics.mean(r["hypervolume_random"] for r in runs),
                "search_wins": int(
                    sum(r["hypervolume_search"] > r["hypervolume_random"] for r in runs)
                ),
                "predictor": predictor.as_dict(),
            }
    finally:
        torch.set_num_threads(previous_threads)
    all_runs = [r for t in per_task.values() for r in t["runs"]]
    result.update(
        {
            "tasks": per_task,
            "hypervolume_search": statistics.mean(r["hypervolume_search"] for r in all_runs),
            "hypervolume_random": statistics.mean(r["hypervolume_random"] for r in all_runs),
            "search_wins": sum(t["search_wins"] for t in per_task.values()),
            "runs": len(all_runs),
            "predictor_spearman": statistics.mean(
                t["predictor"]["spearman"] for t in per_task.values()
            ),
            "predictor_baseline_spearman": statistics.mean(
                t["predictor"]["baseline_spearman"] for t in per_task.values()
            ),
            "wall_s": round(time.perf_counter() - start, 1),
        }
    )
    result["hypervolume_ratio"] = result["hypervolume_search"] / max(
        result["hypervolume_random"], 1e-12
    )
    _print(console, result, cfg)
    return result


def _print(console: Console, result: dict, cfg: SearchBenchConfig) -> None:
    print_table(
        console,
        f"{cfg.sampler} vs random search, {cfg.trials} trials each, {cfg.seeds} seed(s) "
        "(hypervolume of loss/latency/bytes, shared normalization)",
        (
            "task",
            f"HV {cfg.sampler}",
            "HV random",
            "ratio",
            "wins",
            "predictor rho",
            "last-early-loss rho",
        ),
        [
            (
                name,
                f"{task['hypervolume_search']:.3f}",
                f"{task['hypervolume_random']:.3f}",
                f"{task['hypervolume_search'] / max(task['hypervolume_random'], 1e-12):.2f}x",
                f"{task['search_wins']}/{len(task['runs'])}",
                f"{task['predictor']['spearman']:.3f}",
                f"{task['predictor']['baseline_spearman']:.3f}",
            )
            for name, task in result["tasks"].items()
        ],
    )
    console.print(
        f"mean over {result['runs']} runs: HV {result['hypervolume_search']:.3f} vs "
        f"{result['hypervolume_random']:.3f} ({result['hypervolume_ratio']:.2f}x); "
        f"wall {result['wall_s']:.0f} s"
    )


def main(quick: bool = False, json_path: Path | None = None, seeds: int | None = None) -> dict:
    """Entry point of ``benchmarks/search.py`` (and of ``pimoe bench search``)."""
    cfg = (
        SearchBenchConfig(tasks=["digits"], trials=10, seeds=1, steps=40, latency_repeats=7)
        if quick
        else SearchBenchConfig()
    )
    if seeds is not None:
        cfg.seeds = seeds
    plot_prefix = json_path.with_suffix("") if json_path is not None else None
    result = run(cfg, plot_prefix=plot_prefix)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result
