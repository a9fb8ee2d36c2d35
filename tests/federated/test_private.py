"""Client-level DP-SGD: ε composes over a client's rounds, survives a restart, never passes the budget."""

import json

import pytest
import torch
from flwr.app import Context, RecordDict

from pimoe.federated.config import FederatedConfig
from pimoe.federated.digits import DigitsTask, client_split
from pimoe.federated.private import (
    BUDGET_DIR_KEY,
    BudgetExhausted,
    dp_train,
    planned_rounds,
)
from pimoe.privacy.crypto import IntegrityError
from pimoe.privacy.dp import epsilon_spent, noise_for_budget

MLP = DigitsTask("mlp")
CFG = FederatedConfig(
    clients=20, rounds=4, fraction=0.5, dp_epsilon=4.0, partition="iid", local_epochs=1, lr=0.05
)


def _context(budget_dir=None) -> Context:
    """A fresh client process: empty state (a restarted SuperNode has none)."""
    node = {
        "partition-id": 0,
        "num-partitions": 20,
        **({BUDGET_DIR_KEY: str(budget_dir)} if budget_dir else {}),
    }
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_dp_budget_composes_and_is_enforced():
    torch.set_num_threads(1)
    assert planned_rounds(CFG) == 2
    data = client_split(0, 20, "iid", 0.5)
    context = _context()
    start = MLP.make_model(0).state_dict()
    models = [MLP.make_model(0) for _ in range(3)]  # a client builds a fresh model every round
    spent = [dp_train(CFG, models[i], data, seed=i, context=context)["epsilon"] for i in range(2)]
    assert 0 < spent[0] < spent[1] <= CFG.dp_epsilon  # the planned rounds fit the budget
    assert spent[1] > 0.99 * CFG.dp_epsilon  # and the noise is no larger than the budget needs
    assert any(not torch.equal(v, start[k]) for k, v in models[0].state_dict().items())
    with pytest.raises(BudgetExhausted, match="exceeds"):
        dp_train(CFG, models[2], data, seed=2, context=context)
    with pytest.raises(ValueError, match="FedProx"):
        FederatedConfig(dp_epsilon=1.0, strategy="fedprox")


def test_noise_is_calibrated_at_opacus_sampling_rate():
    """72 examples, batch 8: Opacus samples at 1/ceil(72/8) = 1/9, 9 steps per epoch (not 8/72)."""
    data = client_split(0, 20, "iid", 0.5)
    assert len(data) == 72
    context = _context()
    dp_train(CFG, MLP.make_model(0), data, seed=0, context=context)
    rec = context.state["dp-history"]
    assert (list(rec["rate"]), list(rec["steps"])) == ([1 / 9], [9])
    noise = rec["noise"][0]
    assert noise == noise_for_budget(4.0, 1e-5, 1 / 9, 18)  # two planned rounds of 9 steps
    assert (
        epsilon_spent([(noise, 1 / 9, 18)], 1e-5)
        <= 4.0
        < epsilon_spent([(noise * 0.98, 1 / 9, 18)], 1e-5)
    )


def test_restarted_client_continues_its_budget(tmp_path):
    data = client_split(0, 20, "iid", 0.5)
    first = dp_train(CFG, MLP.make_model(0), data, seed=0, context=_context(tmp_path))["epsilon"]
    saved = json.loads((tmp_path / "dp-budget-client-0.json").read_text())
    assert saved["owner"] == "client-0" and saved["history"][0][2] == 9
    second = dp_train(CFG, MLP.make_model(0), data, seed=1, context=_context(tmp_path))[
        "epsilon"
    ]  # restart
    assert second > first * 1.2  # composed over both rounds, not 0 again
    with pytest.raises(BudgetExhausted):
        dp_train(CFG, MLP.make_model(0), data, seed=2, context=_context(tmp_path))
    (tmp_path / "dp-budget-client-0.json").write_text(
        json.dumps({**saved, "history": [[9.0, 0.1, 1]]})
    )
    with pytest.raises(
        IntegrityError, match="hash mismatch"
    ):  # a tampered file is an error, never a reset
        dp_train(CFG, MLP.make_model(0), data, seed=3, context=_context(tmp_path))


@pytest.mark.slow
def test_dp_sgd_on_a_moe_model_trains_every_client():
    """`pimoe federate --model moe --dp-epsilon 8`: every client trains its PiMoE model privately
    (per-example gradients through the experts) and the global model learns."""
    from pimoe.federated.simulation import run_federated

    torch.set_num_threads(1)
    cfg = FederatedConfig(
        clients=4,
        rounds=1,
        fraction=1.0,
        partition="iid",
        model="moe",
        dp_epsilon=8.0,
        local_epochs=1,
        batch_size=32,
        lr=0.1,
    )
    record = run_federated(cfg, backend="inprocess")
    assert (record.rounds[0].failed, record.rounds[0].aggregated) == (0, 4), record.rounds[
        0
    ].failures
    assert 0 < record.extra["epsilon"] <= 8.0
    assert record.accuracy[-1] > record.accuracy[0] + 0.1  # measured 0.103 -> 0.303 (10 classes)
