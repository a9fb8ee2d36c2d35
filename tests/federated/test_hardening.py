"""A bad reply is that client's failure: non-float, complex or garbage updates are dropped, the round goes on."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from pimoe.federated.checks import screen_updates
from pimoe.federated.client import make_client_app
from pimoe.federated.config import FederatedConfig
from pimoe.federated.server import RunRecord, run_server
from pimoe.federated.simulation import InProcessGrid

REF = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}
BASE = dict(clients=6, rounds=1, fraction=1.0, local_epochs=2, partition="iid", seed=0)


@pytest.mark.parametrize("bad", [
    np.full((3, 2), 2**40, np.int64), np.ones((3, 2), np.uint8), np.ones((3, 2), bool),
    np.ones((3, 2), np.complex64), np.ones((3, 2), object), np.full((3, 2), "1"), np.ones((3, 2), np.float64),
])
def test_screen_rejects_every_non_expected_dtype(bad):
    rng = np.random.default_rng(0)
    updates = {i: {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in REF.items()} for i in range(4)}
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
        if msg.metadata.message_type == "train" and context.node_id in self.bad and not reply.has_error():
            reply = Message(self.bad[context.node_id](reply.content), reply_to=msg)
        return reply


def run_tampered(cfg: FederatedConfig, bad: dict, he: tuple[bytes, bytes] | None = None) -> RunRecord:
    torch.set_num_threads(1)
    secret, public = he or (None, None)
    record = RunRecord()
    run_server(InProcessGrid(Tamper(make_client_app(cfg, secret), bad), cfg.clients), cfg, record, None, public)
    return record


def _arrays_as(dtype):
    def bad(content: RecordDict) -> RecordDict:
        arrays = {k: Array(np.full(v.shape, 2**40).astype(dtype)) for k, v in content["arrays"].items()}
        return RecordDict({"arrays": ArrayRecord(arrays), "metrics": content["metrics"]})
    return bad


def test_plain_fedavg_drops_int64_and_complex_updates():
    record = run_tampered(FederatedConfig(**BASE), {2: _arrays_as(np.int64), 3: _arrays_as(np.complex64)})
    r = record.rounds[0]
    assert (r.rejected, r.aggregated) == (2, 4)
    assert {x["node_id"] for x in r.rejections} == {2, 3} and all("dtype" in x["reason"] for x in r.rejections)
    assert record.accuracy[-1] > record.accuracy[0] + 0.3
    assert max(float(np.abs(v).max()) for v in record.arrays.to_torch_state_dict().values()) < 10
