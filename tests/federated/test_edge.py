import pytest
import torch

from pimoe.data.digits import digits_split
from pimoe.federated.config import FederatedConfig
from pimoe.federated.edge import EdgeComputing


def test_edge_computing_process_uses_the_federated_model():
    torch.set_num_threads(1)
    edge = EdgeComputing(
        FederatedConfig(clients=5, rounds=2, fraction=1.0, local_epochs=2, partition="iid")
    )
    _, test = digits_split(0.2, 0)
    logits = edge.process(test.x)
    assert logits.shape == (len(test), 10)
    assert (logits.argmax(1) == test.y).float().mean() > 0.8
    assert edge.record.clients_per_round == [5, 5]
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        edge.process(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        edge.process(torch.full((1, 64), float("nan")))
