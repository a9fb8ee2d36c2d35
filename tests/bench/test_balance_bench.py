"""pimoe bench balance: each method's best setting is its lowest held-out loss."""

import pytest
import torch
from torch import nn

from pimoe.bench.balance import best_per_method
from pimoe.bench.balance_finetune import weighted_routing
from pimoe.moe import PiMoE


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


def test_weighted_routing_keeps_the_choice_and_the_split_sum_at_equal_scores() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(PiMoE(16, num_experts=8, top_k=4, ffn_dim=8, weight_outputs=False))
    layer = model[0]
    x = torch.randn(64, 16)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        split_sum = layer(x)
        layer.router.gate.weight.normal_()
        chosen = layer.router(x).indices.sort(-1).values
    weighted_routing(model)
    assert layer.router.config.score == "sigmoid" and layer.config.weight_outputs
    with torch.no_grad():
        torch.testing.assert_close(layer.router(x).indices.sort(-1).values, chosen)
        weights = layer.router(x).weights
        assert not torch.allclose(weights, torch.full_like(weights, 0.25))  # the gate weighs
        layer.router.gate.weight.zero_()  # equal scores: weights 1/4, times top_k in w_out
        torch.testing.assert_close(layer(x), split_sum)
    with pytest.raises(ValueError, match="split-upcycled"):
        weighted_routing(model)
