"""``pimoe search``: run (or resume) a search, print the Pareto front, save the chosen config."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Annotated, cast

import typer


def search_and_report(
    task: str = "lm",
    trials: int = 20,
    budget_minutes: float = 10.0,
    storage: str | None = None,
    json_path: Path | None = None,
    study_name: str | None = None,
    sampler: str = "tpe",
    steps: int = 60,
    seed: int = 0,
    prune: bool = True,
    out_dir: Path | None = None,
    threads: int = 1,
    progress: bool = True,
) -> dict:
    """Run :func:`~pimoe.search.study.run_search`, print the front, score the predictor, write
    ``pareto.png`` and ``chosen_config.json`` in ``out_dir`` and the results in ``json_path``."""
    import torch
    from optuna.trial import TrialState
    from rich.console import Console

    from pimoe.io import atomic_write_text
    from pimoe.search.hypervolume import shared_hypervolumes
    from pimoe.search.objective import TrialSettings
    from pimoe.search.predictor import score_predictor
    from pimoe.search.pruning import MedianRule
    from pimoe.search.report import (
        choose,
        front_table,
        plot_front,
        save_choice,
        save_compress_config,
        trial_record,
    )
    from pimoe.search.space import SearchSpace
    from pimoe.search.study import SamplerName, run_search
    from pimoe.search.tasks import make_task

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    console = Console()
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        space, settings = (
            SearchSpace(),
            TrialSettings(steps=steps, checkpoints=min(4, max(1, steps)), seed=seed),
        )
        task_obj = make_task(task, seed=seed)
        study = run_search(
            task_obj,
            space,
            settings,
            trials=trials,
            budget_minutes=budget_minutes,
            storage=storage,
            study_name=study_name,
            sampler=cast(SamplerName, sampler),  # run_search rejects unknown names
            seed=seed,
            prune=MedianRule() if prune else None,
            progress=progress,
        )
    finally:
        torch.set_num_threads(previous_threads)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    started = datetime.datetime.now() - datetime.timedelta(seconds=time.perf_counter() - start)
    if not any(t.datetime_start and t.datetime_start >= started for t in study.trials):
        console.print(
            f"study {study.study_name!r} already has {len(complete) + len(pruned)} finished "
            f"trials (--trials {trials}): nothing left to do; raise --trials to run more"
        )
    front = study.best_trials
    result: dict = {
        "task": task,
        "study": study.study_name,
        "storage": storage,
        "sampler": sampler,
        "settings": {"steps": steps, "seed": seed, "prune": prune, "threads": threads},
        "trials_complete": len(complete),
        "trials_pruned": len(pruned),
        "front": [trial_record(t) for t in sorted(front, key=lambda t: t.values[0])],
    }
    if complete:
        result["hypervolume"] = shared_hypervolumes({"study": [t.values for t in complete]})[
            "study"
        ]
        console.print(
            front_table(
                front,
                space,
                title=f"Pareto front, {task} ({len(complete)} completed, {len(pruned)} pruned)",
            )
        )
        chosen = choose(front)
        result["chosen"] = trial_record(chosen)
        if out_dir is not None:
            save_choice(out_dir / "chosen_config.json", chosen, space, study, task)
            plot_front({sampler: complete}, out_dir / "pareto.png", title=f"pimoe search, {task}")
            compression = space.candidate(chosen.params).compression
            wrote = save_compress_config(out_dir / "compress_config.json", compression)
            console.print(
                f"saved chosen_config.json (trial {chosen.number}), pareto.png"
                + (" and compress_config.json" if wrote else " (no compression chosen)")
                + f" in {out_dir}"
            )
    if len(complete) >= 4:
        result["predictor"] = score_predictor(complete, space).as_dict()
        console.print(
            f"predictor (leave-one-out Spearman rho): {result['predictor']['spearman']:.3f}, "
            f"last early loss alone: {result['predictor']['baseline_spearman']:.3f}"
        )
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2))
    return result


def search(
    trials: Annotated[
        int,
        typer.Option(help="Finished trials wanted in the study (a resumed study runs the rest)."),
    ] = 20,
    budget_minutes: Annotated[
        float, typer.Option(help="Stop starting trials after this many minutes.")
    ] = 10.0,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL, e.g. sqlite:///search.db (default: in memory, not resumable)."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the results here as JSON.")
    ] = None,
    task: Annotated[
        str, typer.Option(help="lm (byte-level LM on pydoc text) or digits (sklearn digits).")
    ] = "lm",
    study_name: Annotated[
        str | None, typer.Option(help="Study name in the storage (default pimoe-<task>-<sampler>).")
    ] = None,
    sampler: Annotated[str, typer.Option(help="tpe, nsga2 or random.")] = "tpe",
    steps: Annotated[int, typer.Option(help="Training steps per trial.")] = 60,
    seed: Annotated[
        int, typer.Option(help="Seed of the sampler, the data split and every trial's training.")
    ] = 0,
    prune: Annotated[
        bool, typer.Option(help="Median pruning on the held-out loss at checkpoints.")
    ] = True,
    out: Annotated[
        Path | None, typer.Option(help="Folder for pareto.png and chosen_config.json.")
    ] = None,
    threads: Annotated[
        int, typer.Option(help="torch threads (latency is measured with these).")
    ] = 1,
) -> None:
    """Multi-objective search (held-out loss, CPU latency, bytes) over PiMoE configs with Optuna."""
    try:
        search_and_report(
            task=task,
            trials=trials,
            budget_minutes=budget_minutes,
            storage=storage,
            json_path=json_path,
            study_name=study_name,
            sampler=sampler,
            steps=steps,
            seed=seed,
            prune=prune,
            out_dir=out,
            threads=threads,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
