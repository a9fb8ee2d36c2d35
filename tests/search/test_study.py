import statistics

import optuna
import pytest
from optuna.trial import TrialState

from pimoe.search.objective import TrialSettings
from pimoe.search.pruning import CURVE_ATTR, PARAMS_ATTR, MedianRule
from pimoe.search.study import finished_trials, make_sampler, open_storage, run_search


def test_resume_continues_the_stored_study(tmp_path, digits, tiny_space, fast) -> None:
    url = f"sqlite:///{tmp_path / 'search.db'}"
    first = run_search(
        digits, tiny_space, fast, trials=2, storage=url, study_name="s", progress=False
    )
    assert len(finished_trials(first)) == 2
    numbers = [t.number for t in first.trials]
    again = run_search(
        digits, tiny_space, fast, trials=3, storage=url, study_name="s", progress=False
    )
    assert [t.number for t in again.trials][:2] == numbers  # same stored trials, one more run
    assert len(finished_trials(again)) == 3
    stored = optuna.load_study(study_name="s", storage=url)
    assert len(stored.trials) == 3
    for trial in stored.trials:
        assert trial.state == TrialState.COMPLETE and len(trial.values) == 3
        assert len(trial.user_attrs[CURVE_ATTR]) == 2 and trial.user_attrs[PARAMS_ATTR] > 0
        assert 0.0 <= trial.user_attrs["final_accuracy"] <= 1.0
    assert stored.best_trials  # the Pareto front
    with pytest.raises(ValueError, match="another task, space or settings"):
        run_search(
            digits,
            tiny_space,
            TrialSettings(steps=7, checkpoints=2),
            trials=4,
            storage=url,
            study_name="s",
            progress=False,
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trials": 0}, "trials must be >= 1"),
        ({"trials": 2, "budget_minutes": 0}, "budget_minutes must be > 0"),
        (
            {"trials": 2, "storage": "sqlite:////nonexistent-dir/sub/x.db"},
            "cannot open Optuna storage",
        ),
        ({"trials": 2, "storage": "search.db"}, "database URL"),
        ({"trials": 2, "sampler": "grid"}, "unknown sampler"),
    ],
)
def test_bad_budget_storage_or_sampler(digits, tiny_space, fast, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        run_search(digits, tiny_space, fast, progress=False, **kwargs)


def test_samplers() -> None:
    assert isinstance(make_sampler("nsga2", 0, 30), optuna.samplers.NSGAIISampler)
    assert make_sampler("tpe", 0, 30)._n_startup_trials == 10
    assert open_storage(None) is None


def _finished(study, loss_curve, params):
    study.add_trial(
        optuna.trial.create_trial(
            values=[loss_curve[-1], 1.0, 1.0],
            user_attrs={CURVE_ATTR: loss_curve, PARAMS_ATTR: params},
        )
    )


def test_median_rule_compares_with_no_larger_trials() -> None:
    study = optuna.create_study(directions=["minimize"] * 3)
    for loss, params in [(1.0, 100), (2.0, 100), (3.0, 100), (0.1, 10_000)]:
        _finished(study, [loss, loss], params)
    rule = MedianRule(n_startup_trials=3, n_warmup_checkpoints=1)
    assert not rule.should_prune(study, 0, 9.0, 100)  # warm-up checkpoint
    assert rule.should_prune(study, 1, 2.5, 100)  # above the median 2.0 of the three peers
    assert not rule.should_prune(study, 1, 1.5, 100)
    assert not rule.should_prune(study, 1, 2.5, 50)  # no peer this small: not enough evidence
    # the large, good trial joins the peers of large trials only: median of (1, 2, 3, 0.1) = 1.5
    assert rule.should_prune(study, 1, 1.8, 20_000)


def test_pruning_inside_a_search(digits, tiny_space, fast) -> None:
    rule = MedianRule(n_startup_trials=1, n_warmup_checkpoints=0)
    study = run_search(digits, tiny_space, fast, trials=6, prune=rule, progress=False, seed=3)
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    for trial in study.trials:  # trials run one after another: the peers are the earlier ones
        curve, params = trial.user_attrs[CURVE_ATTR], trial.user_attrs[PARAMS_ATTR]
        peers = [
            t.user_attrs[CURVE_ATTR]
            for t in study.trials[: trial.number]
            if t.state == TrialState.COMPLETE and t.user_attrs[PARAMS_ATTR] <= params
        ]
        above = [
            bool(peers) and loss > statistics.median(p[k] for p in peers)
            for k, loss in enumerate(curve)
        ]
        if trial.state == TrialState.PRUNED:
            assert above[-1] and not any(above[:-1])  # stopped at the first checkpoint above
        else:
            assert trial.state == TrialState.COMPLETE and not any(above)
