"""Secure (pairwise-masked) and homomorphic (CKKS) aggregation give FedAvg's model, dropped clients included."""

import json

import numpy as np
import torch

from pimoe.federated.config import FederatedConfig
from pimoe.federated.simulation import run_federated

BASE = dict(clients=6, rounds=1, fraction=1.0, local_epochs=2, partition="iid", dropout=0.3, seed=0)


def test_secure_and_he_aggregation_equal_plain_fedavg(tmp_path):
    torch.set_num_threads(1)
    plain = run_federated(FederatedConfig(**BASE), backend="inprocess")
    # seed 0: client 4 fails after the key exchange, so the survivors must reveal its pair seeds
    assert plain.rounds[0].failed == 1 and plain.rounds[0].aggregated == 5
    audit = tmp_path / "audit.jsonl"
    secure = run_federated(
        FederatedConfig(**BASE, secure_agg=True, audit_log=str(audit)), backend="inprocess"
    )
    he = run_federated(FederatedConfig(**BASE, he=True), backend="inprocess")
    want = plain.arrays.to_torch_state_dict()
    for run in (secure, he):
        assert run.clients_per_round == [5]
        got = run.arrays.to_torch_state_dict()
        for name, value in want.items():
            np.testing.assert_allclose(got[name].numpy(), value.numpy(), atol=1e-6)
    assert (
        len(he.extra["he_ciphertext_bytes_per_round"]) == 1
        and he.extra["he_ciphertext_bytes_per_round"][0] > 5 * 9611 * 8
    )
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events == ["secagg_keys_relayed", "round_aggregated"]
