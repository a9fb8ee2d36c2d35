"""Median pruning for multi-objective studies.

Optuna's pruners work through ``trial.report``/``trial.should_prune``, which raise
``NotImplementedError`` in multi-objective studies, so the rule is applied here to the learning
curves stored in the trials' user attributes. It is Optuna's ``MedianPruner`` rule (stop a trial
whose intermediate value is worse than the median of the completed trials at the same step, once
``n_startup_trials`` have completed and after ``n_warmup_checkpoints``) with one change for a
multi-objective search: a trial is compared only with completed trials that have *no more
parameters* than it, so a small model is not stopped for having the higher loss that its size buys.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from pimoe.extras import extra_imports

with extra_imports("search", "pimoe.search"):
    import optuna
    from optuna.trial import TrialState

CURVE_ATTR = "curve"
PARAMS_ATTR = "num_params"


@dataclass(frozen=True)
class MedianRule:
    """Prune at checkpoint ``i >= n_warmup_checkpoints`` when the held-out loss exceeds the
    median at checkpoint ``i`` of at least ``n_startup_trials`` completed trials no larger than
    the current one."""

    n_startup_trials: int = 4
    n_warmup_checkpoints: int = 1

    def __post_init__(self) -> None:
        if self.n_startup_trials < 1 or self.n_warmup_checkpoints < 0:
            raise ValueError("n_startup_trials must be >= 1 and n_warmup_checkpoints >= 0")

    def should_prune(
        self, study: optuna.Study, checkpoint: int, loss: float, num_params: int
    ) -> bool:
        """Whether a trial with ``num_params`` parameters and held-out ``loss`` at
        ``checkpoint`` (0-based) should stop."""
        if checkpoint < self.n_warmup_checkpoints:
            return False
        peers = [
            t.user_attrs[CURVE_ATTR][checkpoint]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if len(t.user_attrs.get(CURVE_ATTR, ())) > checkpoint
            and t.user_attrs.get(PARAMS_ATTR, float("inf")) <= num_params
        ]
        return len(peers) >= self.n_startup_trials and loss > statistics.median(peers)
