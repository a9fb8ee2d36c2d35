"""pimoe.search: multi-objective architecture search over PiMoE configurations (Optuna).

Builds on the core (:mod:`pimoe.moe`) and on :mod:`pimoe.compress`, whose low-rank, pruning and
quantization functions are part of every searched configuration. See ``docs/search.md``.
Names are imported lazily (PEP 562) so ``import pimoe.search`` does not load Optuna or sklearn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "hypervolume": ("hypervolume", "normalize", "pareto_mask", "shared_hypervolumes"),
    "objective": (
        "OBJECTIVES",
        "TrialResult",
        "TrialSettings",
        "compress_model",
        "run_trial",
        "train",
    ),
    "predictor": ("PredictorScore", "fit_predictor", "score_predictor", "trial_features"),
    "pruning": ("MedianRule",),
    "report": (
        "choose",
        "describe",
        "front_table",
        "load_compression",
        "load_config",
        "plot_front",
        "save_choice",
        "save_compress_config",
        "to_architecture_config",
    ),
    "space": ("Candidate", "Compression", "SearchSpace"),
    "study": ("finished_trials", "make_sampler", "open_storage", "run_search"),
    "tasks": ("DigitsMoEClassifier", "DigitsTask", "LMTask", "Task", "make_task"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pimoe.search' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pimoe.search.{_MODULE_OF[name]}"), name)
