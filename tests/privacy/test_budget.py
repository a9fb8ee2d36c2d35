"""PrivacyBudget: the spent ε survives a restart, refuses overspending, and never resets silently."""

import json

import pytest

from pimoe.privacy.budget import PrivacyBudget
from pimoe.privacy.crypto import IntegrityError
from pimoe.privacy.dp import BudgetExhausted, epsilon_spent, noise_for_budget

RATE, STEPS = 1 / 9, 9
NOISE = noise_for_budget(3.0, 1e-5, RATE, 3 * STEPS)  # three rounds of 9 steps spend eps 3


def test_restart_continues_the_budget_and_refuses_past_it(tmp_path) -> None:
    path = tmp_path / "client-4.json"
    first = PrivacyBudget(3.0, 1e-5, path, owner="client-4")
    assert first.spent() == 0.0
    spent = [first.reserve(NOISE, RATE, STEPS)]
    restarted = PrivacyBudget(3.0, 1e-5, path, owner="client-4")  # a new process reads the file
    assert restarted.history == [(NOISE, RATE, STEPS)] and restarted.spent() == spent[0]
    spent += [
        restarted.reserve(NOISE, RATE, STEPS),
        PrivacyBudget(3.0, 1e-5, path, owner="client-4").reserve(NOISE, RATE, STEPS),
    ]
    assert 0 < spent[0] < spent[1] < spent[2] <= 3.0
    final = PrivacyBudget(3.0, 1e-5, path, owner="client-4")
    assert final.history == [
        (NOISE, RATE, 3 * STEPS)
    ]  # same noise and rate: one entry, as Opacus keeps it
    assert final.spent() == pytest.approx(epsilon_spent([(NOISE, RATE, 27)], 1e-5), rel=1e-12)
    with pytest.raises(BudgetExhausted, match="exceeds the budget"):
        final.reserve(NOISE, RATE, 1)
    assert (
        PrivacyBudget(3.0, 1e-5, path, owner="client-4").history == final.history
    )  # the refusal wrote nothing
    assert [p.name for p in tmp_path.iterdir()] == [
        "client-4.json"
    ]  # written atomically, no temp left


def test_in_memory_budget_and_bad_arguments(tmp_path) -> None:
    budget = PrivacyBudget(3.0, 1e-5, history=[(NOISE, RATE, 18)])
    assert budget.path is None and budget.reserve(NOISE, RATE, 9) <= 3.0
    with pytest.raises(BudgetExhausted):
        budget.reserve(NOISE, RATE, 1)
    for kwargs, match in [
        ({"epsilon": 0.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
        ({"path": tmp_path / "b.json", "history": [(1.0, 0.1, 1)]}, "not both"),
    ]:
        with pytest.raises(ValueError, match=match):
            PrivacyBudget(**{"epsilon": 3.0, "delta": 1e-5, **kwargs})
    with pytest.raises(ValueError, match="steps >= 1"):
        budget.reserve(1.0, 0.1, 0)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda text: text[: len(text) // 2], "not a DP budget file"),
        (lambda text: "", "not a DP budget file"),
        (lambda text: "[" * 100_000 + "]" * 100_000, "not a DP budget file"),  # nested too deeply
        (
            lambda text: text.replace(f'"history": [[{NOISE}', f'"history": [[{2 * NOISE}'),
            "hash mismatch",
        ),
        (
            lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "sha256"}),
            "not a DP budget file",
        ),
        (lambda text: text.replace('"owner": "client-4"', '"owner": "client-5"'), "hash mismatch"),
    ],
)
def test_a_damaged_file_is_an_error_not_a_reset(tmp_path, damage, match: str) -> None:
    path = tmp_path / "client-4.json"
    PrivacyBudget(3.0, 1e-5, path, owner="client-4").reserve(NOISE, RATE, STEPS)
    path.write_text(damage(path.read_text()))
    with pytest.raises(IntegrityError, match=match):
        PrivacyBudget(3.0, 1e-5, path, owner="client-4")


def test_another_owners_or_accountants_file_is_refused(tmp_path) -> None:
    path = tmp_path / "budget.json"
    PrivacyBudget(3.0, 1e-5, path, owner="client-4").reserve(NOISE, RATE, STEPS)
    with pytest.raises(IntegrityError, match="belongs to owner 'client-4', not 'client-5'"):
        PrivacyBudget(3.0, 1e-5, path, owner="client-5")
    with pytest.raises(IntegrityError, match="accountant 'rdp', not 'prv'"):
        PrivacyBudget(3.0, 1e-5, path, owner="client-4", accountant="prv")
