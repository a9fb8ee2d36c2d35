"""Federated runs through Flower's ServerApp / ClientApp: in process (fast) and once on Ray."""

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from pimoe.federated.client import PERSONAL_KEY, make_client_app
from pimoe.federated.config import FederatedConfig
from pimoe.federated.digits import DigitsTask
from pimoe.federated.simulation import InProcessGrid, flower_task_identity, run_federated

SMALL = dict(clients=6, rounds=2, fraction=1.0, local_epochs=3, lr=0.1, partition="iid", seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_accuracy_improves_with_dropout_and_a_malicious_client():
    cfg = FederatedConfig(**SMALL, dropout=0.3, malicious="2", attack="scale")
    record = run_federated(cfg, backend="inprocess")
    assert len(record.accuracy) == 3
    assert record.accuracy[0] < 0.2 and record.accuracy[-1] > 0.75  # 10 classes: chance is 0.1
    for r in record.rounds:
        assert r.sampled == 6 and r.failed + r.rejected + r.aggregated == 6
    assert (
        sum(r.failed for r in record.rounds) >= 1
    )  # some clients dropped out and training went on
    rejected = [x for r in record.rounds for x in r.rejections]
    # client 2 (node 3) is sampled every round and its x100 update is rejected whenever it did not drop out
    assert len(rejected) == sum(
        1 for r in record.rounds if "client 2 dropped" not in " ".join(r.failures)
    )
    assert all(x["node_id"] == 3 and "median" in x["reason"] for x in rejected)
    assert record.clients_per_round == [r.aggregated for r in record.rounds]


def test_nan_update_is_rejected_and_global_stays_finite():
    cfg = FederatedConfig(**{**SMALL, "rounds": 1}, malicious="0,4", attack="nan")
    record = run_federated(cfg, backend="inprocess")
    assert record.rounds[0].rejected == 2 and record.rounds[0].aggregated == 4
    assert np.isfinite(record.loss[-1]) and record.accuracy[-1] > record.accuracy[0]


def test_fedprox_limits_client_drift():
    """The same client, same data and seed: a large proximal mu keeps its weights nearer the start."""
    model = DigitsTask("mlp").make_model(0)
    start = ArrayRecord(model.state_dict())

    def drift(mu: float) -> float:
        cfg = FederatedConfig(**SMALL, strategy="fedprox", proximal_mu=mu)
        app = make_client_app(cfg)
        ctx = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 6},
            state=RecordDict(),
            run_config={},
        )
        with (
            flower_task_identity()
        ):  # Flower stamps new Messages with the task running in the process
            msg = Message(
                RecordDict(
                    {
                        "arrays": start,
                        "config": ConfigRecord({"server-round": 1, "proximal-mu": mu}),
                    }
                ),
                dst_node_id=1,
                message_type=MessageType.TRAIN,
            )
            reply = app(msg, ctx)
        new = reply.content["arrays"].to_torch_state_dict()
        return float(sum((new[k] - v).pow(2).sum() for k, v in model.state_dict().items()) ** 0.5)

    assert drift(1.0) < 0.8 * drift(0.0)


def test_personal_layers_stay_on_clients():
    cfg = FederatedConfig(
        **{**SMALL, "clients": 4, "rounds": 1}, model="moe", personal_layers="moe.experts"
    )
    grid = InProcessGrid(make_client_app(cfg), cfg.clients)
    from pimoe.federated.server import RunRecord, run_server

    start = DigitsTask("moe").make_model(cfg.seed).state_dict()
    record = RunRecord()
    with flower_task_identity():
        run_server(grid, cfg, record)
    assert record.accuracy[-1] > record.accuracy[0]
    ctx = grid.context(1)
    personal = ctx.state[PERSONAL_KEY].to_torch_state_dict()
    assert personal and all(k.startswith("moe.experts.") for k in personal)
    assert any(not torch.equal(v, start[k]) for k, v in personal.items())  # trained locally...
    final = record.arrays.to_torch_state_dict()
    assert all(torch.equal(final[k], start[k]) for k in personal)  # ...never averaged on the server
    assert not torch.equal(final["head.weight"], start["head.weight"])  # while shared layers were


# Ray's node startup leaves /dev/null handles open and its helper processes to its own shutdown
@pytest.mark.filterwarnings(
    "ignore:unclosed file <_io.(TextIOWrapper|FileIO) name='/dev/null':ResourceWarning"
)
@pytest.mark.filterwarnings("ignore:subprocess [0-9]+ is still running:ResourceWarning")
def test_ray_simulation_matches_in_process():
    """Flower's Ray backend (the scalable path) gives the same run as the in-process grid."""
    cfg = FederatedConfig(**{**SMALL, "clients": 4}, dropout=0.25)
    ray_run = run_federated(cfg, backend="ray", ray_cpus=1)  # one actor: the cheapest Ray start
    local = run_federated(cfg, backend="inprocess")
    assert ray_run.clients_per_round == local.clients_per_round
    assert ray_run.accuracy[-1] > ray_run.accuracy[0] + 0.3
    np.testing.assert_allclose(ray_run.accuracy, local.accuracy, atol=1 / 360 + 1e-6)


def test_deployment_apps_read_the_run_config(tmp_path):
    """The module-level apps that `flwr run` loads take every setting from the run config."""
    import json

    from pimoe.federated.apps import client_app, server_app

    cfg = FederatedConfig(**{**SMALL, "clients": 4, "rounds": 1, "local_epochs": 1})
    out = tmp_path / "result.json"
    run_config = {
        **cfg.to_run_config(),
        "result-path": str(out),
    }  # every app of a run sees the same config
    grid = InProcessGrid(client_app, cfg.clients, run_config=run_config)
    with flower_task_identity():
        server_app(
            grid,
            Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
        )
    result = json.loads(out.read_text())
    assert result["clients_per_round"] == [4]
    assert result["accuracy_per_round"][1] > result["accuracy_per_round"][0] + 0.3


@pytest.mark.parametrize("verbose", [False, True])
def test_library_runs_log_flower_info_only_when_verbose(verbose):
    """The ``flwr`` logger makes no INFO record in a default run, and gets its level back after."""
    logger = logging.getLogger("flwr")
    before = logger.level
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        run_federated(
            FederatedConfig(**{**SMALL, "rounds": 1}), backend="inprocess", verbose=verbose
        )
    finally:
        logger.removeHandler(handler)
    assert any(r.levelno == logging.INFO for r in records) == verbose
    assert logger.level == before


RUN_TWICE = """
import sys
from pimoe.federated.config import FederatedConfig
from pimoe.federated.simulation import run_federated
cfg = FederatedConfig(clients=2, rounds=1, local_epochs=1, partition="iid", fraction=1.0)
run_federated(cfg, backend="inprocess")
print("--- verbose ---", file=sys.stderr, flush=True)
run_federated(cfg, backend="inprocess", verbose=True)
"""


@pytest.mark.slow
def test_a_script_running_a_simulation_prints_no_flower_info_lines():
    """What a user's script shows on its terminal: nothing from Flower by default, INFO lines with
    ``verbose=True`` (Flower's console handler writes to the process's stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_TWICE], capture_output=True, text=True, timeout=120, check=True
    )
    quiet, verbose = done.stderr.split("--- verbose ---")
    assert "INFO" not in quiet + done.stdout
    assert "INFO" in verbose
