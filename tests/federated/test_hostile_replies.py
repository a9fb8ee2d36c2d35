"""Replies Flower's own aggregation cannot take: an overflowing example count, metrics or records
unlike the other replies' (in training and in evaluation). Each is that client's loss; the run
goes on and the model stays finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from test_hardening import BASE, Tamper

from pimoe.federated.client import make_client_app
from pimoe.federated.config import FederatedConfig
from pimoe.federated.records import example_count, uniform_replies
from pimoe.federated.server import RunRecord, run_server
from pimoe.federated.simulation import InProcessGrid, flower_task_identity


def _huge_weight(content: RecordDict) -> RecordDict:  # finite, but two of them sum to inf
    loss = content["metrics"]["train-loss"]
    metrics = MetricRecord({"train-loss": loss, "num-examples": 1e308})
    return RecordDict({"arrays": content["arrays"], "metrics": metrics})


def _odd_records(content: RecordDict) -> RecordDict:  # other metric keys, a second ArrayRecord
    metrics = MetricRecord({"num-examples": 40, "extra": [1.0, 2.0]})
    extra = ArrayRecord({"x": Array(np.ones(3, np.float32))})
    return RecordDict({"arrays": content["arrays"], "metrics": metrics, "more": extra})


class EvalTamper(Tamper):
    """Also replaces the evaluate reply of ``eval_bad`` nodes."""

    def __init__(self, app, bad: dict, eval_bad: dict) -> None:
        super().__init__(app, bad)
        self.eval_bad = eval_bad

    def __call__(self, msg: Message, context):
        reply = super().__call__(msg, context)
        if msg.metadata.message_type == "evaluate" and context.node_id in self.eval_bad:
            reply = Message(self.eval_bad[context.node_id](reply.content), reply_to=msg)
        return reply


def test_overflowing_weights_and_odd_replies_are_dropped_not_fatal() -> None:
    torch.set_num_threads(1)
    cfg = FederatedConfig(**{**BASE, "fraction_evaluate": 1.0})
    bad = {1: _huge_weight, 2: _huge_weight, 3: _odd_records}
    eval_bad = {
        4: lambda c: RecordDict({"metrics": MetricRecord({"eval-loss": 1.0})}),  # no count
        5: lambda c: RecordDict({"metrics": MetricRecord({**c["metrics"], "extra": 1.0})}),
    }
    record = RunRecord()
    with flower_task_identity():
        run_server(
            InProcessGrid(EvalTamper(make_client_app(cfg), bad, eval_bad), cfg.clients),
            cfg,
            record,
            None,
            None,
        )
    r = record.rounds[0]
    assert (r.rejected, r.aggregated) == (2, 4)  # 1 and 2 rejected; 3's update is kept
    assert {x["node_id"] for x in r.rejections} == {1, 2}
    assert all("num-examples" in x["reason"] for x in r.rejections)
    values = np.concatenate([v.numpy().ravel() for v in record.arrays.values()])
    assert np.isfinite(values).all() and np.abs(values).max() > 0.01  # not zeroed
    assert record.accuracy[-1] > record.accuracy[0] + 0.3


@pytest.mark.parametrize("count", [0, -3, 2.5, 1e308, 2**53 + 2, float("nan")])
def test_example_count_must_be_a_whole_number_up_to_2_53(count: float) -> None:
    content = RecordDict({"metrics": MetricRecord({"num-examples": count})})
    with pytest.raises(ValueError, match="num-examples"):
        example_count(content)
    assert example_count(RecordDict({"metrics": MetricRecord({"num-examples": 7.0})})) == 7


def test_uniform_replies_keep_the_shared_finite_metrics() -> None:
    def reply(values: dict) -> Message:
        return Message(
            RecordDict({"metrics": MetricRecord(values)}), dst_node_id=1, message_type="train"
        )

    with flower_task_identity():
        a = reply({"num-examples": 3, "loss": 0.5, "acc": 0.9, "hist": [1.0]})
        b = reply({"num-examples": 5.0, "loss": 0.7, "acc": float("nan")})
    uniform_replies([a, b])
    assert dict(a.content["metrics"]) == {"loss": 0.5, "num-examples": 3}
    assert dict(b.content["metrics"]) == {"loss": 0.7, "num-examples": 5}
