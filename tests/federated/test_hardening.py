"""A bad reply is that client's failure: non-float, complex or garbage updates are dropped, the round goes on."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from pimoe.federated.checks import screen_updates
from pimoe.federated.client import make_client_app
from pimoe.federated.config import FederatedConfig
from pimoe.federated.server import RunRecord, run_server
from pimoe.federated.simulation import InProcessGrid, flower_task_identity

REF = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}
BASE = dict(clients=6, rounds=1, fraction=1.0, local_epochs=2, partition="iid", seed=0)


@pytest.mark.parametrize(
    "bad",
    [
        np.full((3, 2), 2**40, np.int64),
        np.ones((3, 2), np.uint8),
        np.ones((3, 2), bool),
        np.ones((3, 2), np.complex64),
        np.ones((3, 2), object),
        np.full((3, 2), "1"),
        np.ones((3, 2), np.float64),
    ],
)
def test_screen_rejects_every_non_expected_dtype(bad):
    rng = np.random.default_rng(0)
    updates = {
        i: {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in REF.items()}
        for i in range(4)
    }
    updates[9] = {**updates[0], "w": bad}
    accepted, rejected = screen_updates(updates, REF, norm_factor=5)
    assert accepted == [0, 1, 2, 3]
    assert [r.node_id for r in rejected] == [9] and "dtype" in rejected[0].reason


class Tamper:
    """A ClientApp wrapper that replaces the train replies of some nodes (node id -> function of the reply)."""

    def __init__(self, app, bad: dict):
        self.app, self.bad = app, bad

    def __call__(self, msg: Message, context):
        reply = self.app(msg, context)
        if (
            msg.metadata.message_type == "train"
            and context.node_id in self.bad
            and not reply.has_error()
        ):
            reply = Message(self.bad[context.node_id](reply.content), reply_to=msg)
        return reply


def run_tampered(
    cfg: FederatedConfig, bad: dict, he: tuple[bytes, bytes] | None = None
) -> RunRecord:
    torch.set_num_threads(1)
    secret, public = he or (None, None)
    record = RunRecord()
    with flower_task_identity():
        run_server(
            InProcessGrid(Tamper(make_client_app(cfg, secret), bad), cfg.clients),
            cfg,
            record,
            None,
            public,
        )
    return record


def _arrays_as(dtype):
    def bad(content: RecordDict) -> RecordDict:
        arrays = {
            k: Array(np.full(v.shape, 2**40).astype(dtype)) for k, v in content["arrays"].items()
        }
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})

    return bad


def test_plain_fedavg_drops_int64_and_complex_updates():
    record = run_tampered(
        FederatedConfig(**BASE), {2: _arrays_as(np.int64), 3: _arrays_as(np.complex64)}
    )
    r = record.rounds[0]
    assert (r.rejected, r.aggregated) == (2, 4)
    assert {x["node_id"] for x in r.rejections} == {2, 3} and all(
        "dtype" in x["reason"] for x in r.rejections
    )
    assert record.accuracy[-1] > record.accuracy[0] + 0.3
    assert max(float(v.abs().max()) for v in record.arrays.to_torch_state_dict().values()) < 10


def _masked_random(content: RecordDict) -> RecordDict:
    size = content["arrays"]["masked"].numpy().size
    vector = np.random.default_rng(0).integers(0, 2**64 - 1, size=size, dtype=np.uint64)
    return RecordDict(
        {"arrays": ArrayRecord({"masked": Array(vector)}), "metrics": content["metrics"]}
    )


def _negative_weight(content: RecordDict) -> RecordDict:
    from flwr.app import MetricRecord

    return RecordDict({"arrays": content["arrays"], "metrics": MetricRecord({"num-examples": -5})})


def _garbage_ciphertext(content: RecordDict) -> RecordDict:
    return RecordDict(
        {"encrypted": ConfigRecord({"chunks": [b"garbage"] * 3}), "metrics": content["metrics"]}
    )


def test_secure_aggregation_survives_bad_replies():
    cfg = FederatedConfig(**BASE, secure_agg=True)
    record = run_tampered(
        cfg, {2: _negative_weight}
    )  # a declared negative weight: dropped like a dropout
    assert (record.rounds[0].rejected, record.rounds[0].aggregated) == (1, 5)
    assert record.accuracy[-1] > record.accuracy[0] + 0.3
    record = run_tampered(
        cfg, {3: _masked_random}
    )  # well-typed noise cannot be attributed: the round is skipped
    assert len(record.accuracy) == 2 and record.accuracy[-1] == record.accuracy[0]


def test_he_aggregation_drops_a_garbage_ciphertext():
    from pimoe.federated.private import he_keys

    record = run_tampered(FederatedConfig(**BASE, he=True), {2: _garbage_ciphertext}, he=he_keys())
    r = record.rounds[0]
    assert (r.rejected, r.aggregated) == (1, 5) and "CKKS" in r.rejections[0]["reason"]
    assert record.accuracy[-1] > record.accuracy[0] + 0.3


def test_he_client_decrypts_only_the_rounds_aggregate_once():
    """A malicious server forwards one client's ciphertext as "the sum": every client refuses."""
    from pimoe.federated.he_round import decrypt_aggregate, encrypt_for_round
    from pimoe.federated.private import he_keys
    from pimoe.privacy.he import add_encrypted, load_context

    secret, public = he_keys()
    nodes, length = [1, 2, 3, 4], 50
    rng = np.random.default_rng(0)
    updates = {n: rng.standard_normal(length) for n in nodes}
    states = {n: RecordDict() for n in nodes}
    chunks = {n: encrypt_for_round(secret, states[n], 7, nodes, n, updates[n]) for n in nodes}
    server = load_context(public)
    with pytest.raises(
        ValueError, match="not the sum"
    ):  # client 2's update presented as the sum of 1, 2, 3
        decrypt_aggregate(secret, states[1], 7, chunks[2], [1, 2, 3], length)
    with pytest.raises(
        ValueError, match="already decrypted"
    ):  # and the refusal used client 1's one decryption
        decrypt_aggregate(
            secret, states[1], 7, add_encrypted(server, [chunks[n] for n in nodes]), nodes, length
        )
    with pytest.raises(
        ValueError, match="strict majority"
    ):  # a pair sum would expose one update to a colluder
        decrypt_aggregate(
            secret, states[2], 7, add_encrypted(server, [chunks[3], chunks[4]]), [3, 4], length
        )
    with pytest.raises(ValueError, match="round 8"):
        decrypt_aggregate(secret, states[3], 8, chunks[3], nodes, length)
    total = decrypt_aggregate(
        secret,
        states[4],
        7,
        add_encrypted(server, [chunks[n] for n in (1, 2, 3)]),
        [1, 2, 3],
        length,
    )
    np.testing.assert_allclose(total, updates[1] + updates[2] + updates[3], atol=1e-5)


def test_secure_aggregation_refuses_too_few_clients_per_round():
    with pytest.raises(ValueError, match="at least 3 clients per round, got 2"):
        FederatedConfig(clients=10, fraction=0.2, secure_agg=True)
    assert FederatedConfig(clients=10, fraction=0.3, secure_agg=True).clients_per_round == 3
