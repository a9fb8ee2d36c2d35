"""Client-level DP-SGD: ε composes over a client's rounds and never passes the budget."""

import pytest
import torch
from flwr.app import RecordDict

from pimoe.federated.config import FederatedConfig
from pimoe.federated.private import BudgetExhausted, dp_train, planned_rounds
from pimoe.federated.task import client_split, make_model


def test_dp_budget_composes_and_is_enforced():
    torch.set_num_threads(1)
    cfg = FederatedConfig(clients=20, rounds=4, fraction=0.5, dp_epsilon=4.0, partition="iid", local_epochs=1, lr=0.05)
    assert planned_rounds(cfg) == 2
    data = client_split(0, 20, "iid", 0.5)
    state = RecordDict()
    start = make_model("mlp").state_dict()
    models = [make_model("mlp") for _ in range(3)]  # a client builds a fresh model every round
    spent = [dp_train(cfg, models[i], data, seed=i, state=state)["epsilon"] for i in range(2)]
    assert 0 < spent[0] < spent[1] <= cfg.dp_epsilon * 1.001  # the planned rounds fit the budget
    assert spent[1] > 0.7 * cfg.dp_epsilon  # and the noise is not needlessly large
    assert any(not torch.equal(v, start[k]) for k, v in models[0].state_dict().items())
    with pytest.raises(BudgetExhausted, match="exceeds"):
        dp_train(cfg, models[2], data, seed=2, state=state)
    with pytest.raises(ValueError, match="FedProx"):
        FederatedConfig(dp_epsilon=1.0, strategy="fedprox")
