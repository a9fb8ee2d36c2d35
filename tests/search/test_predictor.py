import numpy as np
import optuna
import pytest

from pimoe.search.predictor import fit_predictor, score_predictor, trial_features
from pimoe.search.pruning import CURVE_ATTR
from pimoe.search.space import FEATURE_NAMES


def _trials(space, n: int, seed: int) -> list:
    """Trials whose final loss follows their early curve (plus noise), as in real training."""
    rng = np.random.default_rng(seed)
    distributions = {
        k: optuna.distributions.CategoricalDistribution(v) for k, v in space.choices().items()
    }
    trials = []
    for _ in range(n):
        params = {k: v[rng.integers(len(v))] for k, v in space.choices().items()}
        early = rng.uniform(0.5, 2.0)
        final = 0.6 * early + 0.3 * params["sparsity"] + rng.normal(0, 0.02)
        trials.append(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                values=[final, 1.0, 1.0],
                user_attrs={CURVE_ATTR: [early + 0.5, early, final]},
            )
        )
    return trials


def test_ranks_held_out_trials(tiny_space) -> None:
    trials = _trials(tiny_space, 20, seed=0)
    score = score_predictor(trials, tiny_space, early=2)
    assert score.n == 20 and score.early == 2
    assert score.spearman > 0.9  # leave-one-out: each trial predicted by a fit without it
    assert score.baseline_spearman > 0.5
    model = fit_predictor(trials, tiny_space, early=2)
    new = _trials(tiny_space, 10, seed=1)
    predicted = model.predict([trial_features(t, tiny_space, 2) for t in new])
    assert np.corrcoef(predicted, [t.values[0] for t in new])[0, 1] > 0.9
    assert len(trial_features(new[0], tiny_space, 2)) == len(FEATURE_NAMES) + 2


def test_needs_enough_trials_and_checkpoints(tiny_space) -> None:
    trials = _trials(tiny_space, 3, seed=0)
    with pytest.raises(ValueError, match="at least 4"):
        score_predictor(trials, tiny_space)
    with pytest.raises(ValueError, match="fewer than early"):
        score_predictor(_trials(tiny_space, 5, seed=0), tiny_space, early=4)
    with pytest.raises(ValueError, match="early"):
        fit_predictor(trials, tiny_space, early=0)
