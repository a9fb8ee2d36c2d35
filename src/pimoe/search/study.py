"""Run a resumable multi-objective Optuna study over a :class:`SearchSpace`.

The study lives in an Optuna RDB storage (e.g. ``sqlite:///search.db``) under a name; running
:func:`run_search` again with the same storage and name continues it until ``trials`` trials
have finished (completed or pruned). The task, space and settings are stored in the study's user
attributes and must match on resume.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Literal

from pimoe.extras import extra_imports

with extra_imports("search", "pimoe.search"):
    import optuna
    from optuna.trial import FrozenTrial, TrialState

from pimoe.search.objective import OBJECTIVES, TrialSettings, run_trial
from pimoe.search.pruning import CURVE_ATTR, PARAMS_ATTR, MedianRule
from pimoe.search.space import SearchSpace
from pimoe.search.tasks import Task

SamplerName = Literal["tpe", "nsga2", "random"]
SAMPLERS = ("tpe", "nsga2", "random")
_SETUP_ATTR = "pimoe_setup"


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """``"tpe"`` (multi-objective TPE; random for the first ``clamp(trials // 3, 3, 10)``
    trials), ``"nsga2"`` (NSGA-II with a population of ``clamp(trials // 3, 4, 50)``) or
    ``"random"``, seeded."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, trials // 3)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=min(50, max(4, trials // 3))
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """The Optuna RDB storage at ``url`` (``None``: in memory); ``ValueError`` if it cannot be
    opened (bad URL, missing folder, unwritable file, unreachable server)."""
    if url is None:
        return None
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"storage must be a database URL such as 'sqlite:///search.db', got {url!r}"
        )
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # SQLAlchemy raises many types (OperationalError, ArgumentError, ...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot open Optuna storage {url!r}: {reason}") from err


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's completed and pruned trials."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _setup(task: Task, space: SearchSpace, settings: TrialSettings) -> str:
    return json.dumps(
        {
            "task": task.name,
            "space": {k: list(v) for k, v in space.choices().items()},
            "base": asdict(space.base),
            "settings": asdict(settings),
        },
        sort_keys=True,
    )


def run_search(
    task: Task,
    space: SearchSpace | None = None,
    settings: TrialSettings | None = None,
    *,
    trials: int,
    budget_minutes: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    sampler: SamplerName = "tpe",
    seed: int = 0,
    prune: MedianRule | None = None,
    progress: bool = True,
) -> optuna.Study:
    """Search ``space`` on ``task``, minimizing (held-out loss, latency ms, bytes).

    Args:
        trials: total finished trials wanted in the study; a resumed study runs only the rest.
        budget_minutes: stop starting new trials after this wall time (Optuna's ``timeout``).
        storage: Optuna storage URL (``sqlite:///path.db``); ``None`` keeps the study in memory.
        study_name: default ``"pimoe-<task>-<sampler>"``.
        prune: a :class:`MedianRule` to stop unpromising trials early, or ``None``.
        progress: show Optuna's progress bar (tqdm).

    Returns:
        the study; its ``best_trials`` are the Pareto front.

    Raises:
        ValueError: ``trials < 1``, ``budget_minutes <= 0``, an unknown sampler, an unreachable
            storage, or a resumed study created with another task, space or settings.
    """
    space = space or SearchSpace()
    settings = settings or TrialSettings()
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if budget_minutes is not None and not budget_minutes > 0:
        raise ValueError(f"budget_minutes must be > 0, got {budget_minutes}")
    name = study_name or f"pimoe-{task.name}-{sampler}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=open_storage(storage),
        study_name=name,
        load_if_exists=True,
        directions=["minimize"] * len(OBJECTIVES),
        sampler=make_sampler(sampler, seed, trials),
    )
    setup = _setup(task, space, settings)
    stored = study.user_attrs.get(_SETUP_ATTR)
    if stored is None:
        study.set_user_attr(_SETUP_ATTR, setup)
    elif stored != setup:
        raise ValueError(
            f"study {name!r} in {storage} was created with another task, space or settings; "
            "use another --study-name or storage"
        )
    remaining = trials - len(finished_trials(study))
    if remaining <= 0:
        return study

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        candidate = space.sample(trial)

        def on_checkpoint(index: int, loss: float, model: object) -> None:
            num_params = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
            curve = [*trial.user_attrs.get(CURVE_ATTR, []), loss]
            trial.set_user_attr(CURVE_ATTR, curve)
            trial.set_user_attr(PARAMS_ATTR, num_params)
            if prune is not None and prune.should_prune(study, index, loss, num_params):
                raise optuna.TrialPruned(
                    f"held-out loss {loss:.4f} above the median at checkpoint {index}"
                )

        result = run_trial(task, candidate, settings, on_checkpoint)
        for key, value in result.metrics.items():
            trial.set_user_attr(f"final_{key}", value)
        return result.values()

    study.optimize(
        objective,
        n_trials=remaining,
        timeout=None if budget_minutes is None else budget_minutes * 60,
        catch=(FloatingPointError,),
        show_progress_bar=progress,
    )
    return study
