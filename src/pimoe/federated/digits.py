"""The built-in federated task: sklearn digits split among clients, an MLP or a PiMoE classifier.

Digits (:mod:`pimoe.data.digits`): 1,797 8x8 images, stratified 80/20 split (1,437 train / 360
test), pixels in [0, 1]. The training set is partitioned among the clients IID or label-skewed
(Dirichlet), the same way in every process (seeded). The server scores the 360 test images.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from pimoe.data.digits import Split, digits_split
from pimoe.federated.config import DIGITS_MODELS
from pimoe.federated.partition import make_partition
from pimoe.federated.task import FederatedTask
from pimoe.moe import PiMoE


@lru_cache(maxsize=8)
def client_partitions(
    num_clients: int, kind: str, alpha: float, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """The training-set indices of every client (same call in every process gives the same split)."""
    train, _ = digits_split(0.2, seed)
    return tuple(make_partition(train.y.numpy(), num_clients, kind, alpha, seed))


def client_split(client: int, num_clients: int, kind: str, alpha: float, seed: int = 0) -> Split:
    """Client ``client``'s share of the digits training set."""
    if not 0 <= client < num_clients:
        raise ValueError(f"client id {client} outside [0, {num_clients})")
    train, _ = digits_split(0.2, seed)
    idx = torch.from_numpy(client_partitions(num_clients, kind, alpha, seed)[client])
    return Split(train.x[idx], train.y[idx])


def mlp(in_dim: int = 64, hidden: int = 128, classes: int = 10) -> nn.Module:
    """The reference model: 64-128-10 MLP (9,610 parameters)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class MoEClassifier(nn.Module):
    """``x [B, in_dim]`` → embed ``[B, D]`` → residual PiMoE block → logits ``[B, classes]``.

    Its routed experts live under ``moe.experts``: a natural set of layers to keep personal.
    """

    def __init__(
        self,
        in_dim: int = 64,
        d_model: int = 32,
        num_experts: int = 4,
        top_k: int = 2,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, d_model)
        self.moe = PiMoE(d_model, num_experts=num_experts, top_k=top_k, ffn_dim=2 * d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.embed(x))
        return self.head(h + self.moe(h))


class DigitsTask(FederatedTask):
    """Digits with model ``"mlp"`` (64-128-10) or ``"moe"`` (:class:`MoEClassifier`), partitioned
    ``"iid"`` or ``"dirichlet"`` (concentration ``alpha``), split and partitioned with ``seed``."""

    name = "digits"

    def __init__(
        self, model: str = "mlp", partition: str = "dirichlet", alpha: float = 0.5, seed: int = 0
    ) -> None:
        if model not in DIGITS_MODELS:
            raise ValueError(f"unknown digits model {model!r}; expected one of {DIGITS_MODELS}")
        self.model, self.partition, self.alpha, self.seed = model, partition, alpha, seed

    def build_model(self) -> nn.Module:
        return mlp() if self.model == "mlp" else MoEClassifier()

    def client_data(self, partition_id: int, num_partitions: int) -> Split:
        return client_split(partition_id, num_partitions, self.partition, self.alpha, self.seed)

    def test_data(self) -> Split:
        return digits_split(0.2, self.seed)[1]

    def centralized_data(self, num_partitions: int) -> Split:
        return digits_split(0.2, self.seed)[0]
