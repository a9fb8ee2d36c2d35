import numpy as np
import pytest

from pimoe.federated.checks import screen_updates, update_norm
from pimoe.federated.config import FederatedConfig
from pimoe.federated.selection import ClientSelector

REF = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}


def _honest(rng, scale=0.1):
    return {
        k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in REF.items()
    }


def test_screen_rejects_nan_shape_outlier_and_keeps_honest():
    rng = np.random.default_rng(0)
    updates = {i: _honest(rng) for i in range(6)}
    updates[10] = {**_honest(rng), "w": np.full((3, 2), np.nan, np.float32)}
    updates[11] = {**_honest(rng), "b": np.zeros(4, np.float32)}
    updates[12] = {k: v * 100 for k, v in _honest(rng).items()}
    updates[13] = {**_honest(rng), "extra": np.zeros(1, np.float32)}
    accepted, rejected = screen_updates(updates, REF, norm_factor=5)
    assert accepted == list(range(6))
    reasons = {r.node_id: r.reason for r in rejected}
    assert set(reasons) == {10, 11, 12, 13}
    assert (
        "NaN" in reasons[10]
        and "shape" in reasons[11]
        and "median" in reasons[12]
        and "unknown" in reasons[13]
    )


def test_norm_test_needs_enough_updates_and_valid_factor():
    rng = np.random.default_rng(1)
    two = {0: _honest(rng), 1: {k: v * 100 for k, v in _honest(rng).items()}}
    assert screen_updates(two, REF)[0] == [0, 1]  # a median of two says nothing
    assert update_norm({"b": np.ones(3, np.float32)}, REF) == pytest.approx(3**0.5)
    with pytest.raises(ValueError, match="norm_factor"):
        screen_updates(two, REF, norm_factor=1.0)


def test_selector_counts_and_weighting():
    nodes = [2**64 - 1 - i for i in range(100)]  # Flower node ids are 64-bit unsigned
    uniform = ClientSelector(0.2, min_clients=2, seed=0)
    chosen = uniform.select(nodes)
    assert len(chosen) == 20 == len(set(chosen)) and all(
        isinstance(n, int) and n in nodes for n in chosen
    )
    assert len(ClientSelector(0.01, min_clients=5).select(nodes)) == 5

    by_size = ClientSelector(0.1, policy="size", seed=0)
    for i, n in enumerate(nodes):
        by_size.observe(n, num_examples=100 if i < 10 else 1, train_loss=1.0)
    picks = [n for _ in range(50) for n in by_size.select(nodes)]
    share_big = np.mean([nodes.index(n) < 10 for n in picks])
    assert share_big > 0.4  # 10% of clients hold 10x the data: they are picked far above 10%

    by_loss = ClientSelector(0.1, policy="loss", seed=0)
    for n, loss in zip(nodes[1:50], np.linspace(0.1, 1.0, 49)):
        by_loss.observe(n, 10, train_loss=loss)
    by_loss.observe(nodes[0], 10, train_loss=0.01)
    picks = [n for _ in range(50) for n in by_loss.select(nodes)]
    assert (
        picks.count(nodes[0]) < 0.5 * 50 * 0.1
    )  # a client with a tiny loss: picked well below uniform (10%)
    assert (
        np.mean([nodes.index(n) >= 50 for n in picks]) > 0.55
    )  # unseen clients count as the highest loss: explored


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="policy"):
        ClientSelector(0.5, policy="oracle")
    with pytest.raises(ValueError, match="fewer than min_clients"):
        ClientSelector(0.5, min_clients=3).select([1, 2])
    with pytest.raises(ValueError, match="dropout"):
        FederatedConfig(dropout=1.0)
    with pytest.raises(ValueError, match="strategy"):
        FederatedConfig(strategy="scaffold")
    with pytest.raises(ValueError, match="unknown run-config key"):
        FederatedConfig.from_run_config({"num-rounds": 3})
    cfg = FederatedConfig(rounds=3, personal_layers="moe.experts")
    assert FederatedConfig.from_run_config(cfg.to_run_config()) == cfg
