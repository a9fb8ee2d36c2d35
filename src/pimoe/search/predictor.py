"""Performance predictor: the final (compressed) held-out loss of a configuration from its
features and the first checkpoints of its learning curve.

A ridge regression on standardized features: the :meth:`Candidate.features` of the configuration
and the held-out losses at the first ``early`` checkpoints (learning-curve extrapolation, with
compression effects learned from the compression features). It is scored by the Spearman rank
correlation of its leave-one-out predictions with the real outcomes (each trial predicted by a
model fitted without it), next to the naive predictor "the last early loss".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from pimoe.search.pruning import CURVE_ATTR
from pimoe.search.space import SearchSpace


@dataclass
class PredictorScore:
    """Rank correlations of predicted vs real final loss over ``n`` held-out trials."""

    spearman: float  # ridge on config features + early curve, leave-one-out
    baseline_spearman: float  # the last early checkpoint's loss alone
    n: int
    early: int  # checkpoints used

    def as_dict(self) -> dict[str, float | int]:
        return {
            "spearman": self.spearman,
            "baseline_spearman": self.baseline_spearman,
            "n": self.n,
            "early": self.early,
        }


def trial_features(trial: FrozenTrial, space: SearchSpace, early: int) -> list[float]:
    """Config features of ``trial.params`` followed by its first ``early`` curve losses."""
    curve = trial.user_attrs.get(CURVE_ATTR, [])
    if len(curve) < early:
        raise ValueError(
            f"trial {trial.number} has {len(curve)} checkpoints, fewer than early={early}"
        )
    return space.candidate(trial.params).features() + list(curve[:early])


def _dataset(
    trials: list[FrozenTrial], space: SearchSpace, early: int, minimum: int
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n, F]`` and final losses ``[n]`` of the completed ``trials``."""
    if early < 1:
        raise ValueError(f"early must be >= 1, got {early}")
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if len(done) < minimum:
        raise ValueError(
            f"the predictor needs at least {minimum} completed trials, got {len(done)}"
        )
    x = np.array([trial_features(t, space, early) for t in done])
    return x, np.array([t.values[0] for t in done])


def _ridge(alpha: float):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=alpha))


def fit_predictor(
    trials: list[FrozenTrial], space: SearchSpace, early: int = 2, alpha: float = 1.0
):
    """The ridge pipeline fitted on the completed ``trials`` (at least 2);
    ``.predict([trial_features(trial, space, early)])`` gives the predicted final loss of a
    partly trained configuration."""
    return _ridge(alpha).fit(*_dataset(trials, space, early, minimum=2))


def score_predictor(
    trials: list[FrozenTrial], space: SearchSpace, early: int = 2, alpha: float = 1.0
) -> PredictorScore:
    """Leave-one-out Spearman rho of the ridge predictor on the completed ``trials``.

    Raises:
        ValueError: fewer than 4 completed trials, ``early < 1``, or a curve shorter than ``early``.
    """
    from scipy.stats import spearmanr
    from sklearn.model_selection import LeaveOneOut, cross_val_predict

    x, y = _dataset(trials, space, early, minimum=4)
    predicted = cross_val_predict(_ridge(alpha), x, y, cv=LeaveOneOut())
    rho = spearmanr(predicted, y).statistic
    baseline = spearmanr(x[:, -1], y).statistic
    return PredictorScore(
        spearman=float(np.nan_to_num(rho)),
        baseline_spearman=float(np.nan_to_num(baseline)),
        n=len(y),
        early=early,
    )
