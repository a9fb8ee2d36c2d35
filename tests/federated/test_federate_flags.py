"""``pimoe federate`` settings that cannot give a meaningful run are refused before training,
naming the setting (before: more clients than training examples ran with every client failing
and printed an accuracy of the untrained model; ``--fraction nan`` said "cannot convert float
NaN to integer"; ``--lr inf`` and ``--dp-epsilon inf`` trained to garbage)."""

from __future__ import annotations

import pytest
import typer

pytest.importorskip("flwr")

from pimoe.federated.cli import checked_config


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"clients": 2000}, "cannot give 2000 clients at least one of"),
        ({"fraction": float("nan")}, "fraction must be in (0, 1], got nan"),
        ({"lr": float("inf")}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"dp_epsilon": float("inf")}, "dp_epsilon must be"),
    ],
)
def test_a_setting_without_a_meaningful_run_is_refused(
    settings: dict[str, float], problem: str
) -> None:
    with pytest.raises(typer.BadParameter) as info:
        checked_config("inprocess", **settings)
    assert problem in str(info.value)


def test_as_many_clients_as_training_examples_are_accepted() -> None:
    cfg = checked_config("inprocess", clients=1437, fraction=0.01, partition="iid")
    assert cfg.clients == 1437  # one training example each
