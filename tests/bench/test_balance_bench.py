"""pimoe bench balance: each method's best setting is its lowest held-out loss."""

from pimoe.bench.balance import best_per_method


def test_best_per_method_takes_the_lowest_loss_of_each_method() -> None:
    rows = [
        {"contender": "none", "val_loss": 1.0},  # not a balancing method
        {"contender": "switch 0.01", "val_loss": 3.3},
        {"contender": "switch 0.1", "val_loss": 3.2},
        {"contender": "bias u=0.01", "val_loss": 3.1},
        {"contender": "bias u=0.1", "val_loss": 3.4},
    ]
    assert best_per_method(rows, "val_loss") == {"switch": "switch 0.1", "bias": "bias u=0.01"}
    assert best_per_method([], "val_loss") == {}
