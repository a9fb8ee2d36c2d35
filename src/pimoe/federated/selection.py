"""Which clients train each round: uniform sampling, or sampling weighted by what the server has
learned about each client (its number of examples, or its last training loss).

Weighted policies sample without replacement with probability proportional to the weight; a
client never heard from gets the mean weight of the known ones (the maximum for "loss", so new
clients are explored first), and every weight is floored at 10% of the mean so no client starves.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("uniform", "size", "loss")


class ClientSelector:
    """Picks ``max(min_clients, fraction * available)`` node ids per round with one of ``POLICIES``."""

    def __init__(
        self, fraction: float, min_clients: int = 2, policy: str = "uniform", seed: int = 0
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {min_clients}")
        if policy not in POLICIES:
            raise ValueError(f"unknown selection policy {policy!r}; expected one of {POLICIES}")
        self.fraction, self.min_clients, self.policy = fraction, min_clients, policy
        self.rng = np.random.default_rng(seed)
        self.num_examples: dict[int, float] = {}
        self.last_loss: dict[int, float] = {}

    def observe(self, node_id: int, num_examples: float, train_loss: float) -> None:
        """Record what a client reported after training."""
        self.num_examples[node_id] = float(num_examples)
        self.last_loss[node_id] = float(train_loss)

    def _weights(self, nodes: list[int]) -> np.ndarray:
        known = self.num_examples if self.policy == "size" else self.last_loss
        if not known:
            return np.ones(len(nodes))
        values = np.array(list(known.values()))
        unseen = values.max() if self.policy == "loss" else values.mean()
        w = np.array([known.get(n, unseen) for n in nodes], dtype=float)
        return np.maximum(w, 0.1 * w.mean())

    def select(self, nodes: list[int]) -> list[int]:
        """The node ids to train this round (sorted)."""
        if len(nodes) < self.min_clients:
            raise ValueError(
                f"{len(nodes)} clients available, fewer than min_clients={self.min_clients}"
            )
        k = min(len(nodes), max(self.min_clients, int(self.fraction * len(nodes))))
        nodes = sorted(nodes)  # node ids are 64-bit unsigned: sample positions, not ids, with numpy
        w = np.ones(len(nodes)) if self.policy == "uniform" else self._weights(nodes)
        picked = self.rng.choice(len(nodes), size=k, replace=False, p=w / w.sum())
        return sorted(nodes[i] for i in picked)
