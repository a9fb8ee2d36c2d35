"""Routing statistics: what the router did on one call, aggregatable over many."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RoutingStats:
    """Counts and sums from one or more routing calls; tensors stay on the layer's device.

    Means are computed lazily so that collecting stats does not force a device sync. Add two
    stats (``a + b``) or use :meth:`merge` to aggregate over steps or layers of equal ``E``.

    Attributes:
        tokens_per_expert: ``[E]`` int64, executed assignments per expert.
        num_tokens: tokens routed.
        dropped_assignments: token-expert assignments removed by the capacity limit.
        dropped_tokens: tokens that reached no routed expert at all.
        entropy_sum: sum over tokens of the router's entropy (nats).
        confidence_sum: sum over tokens of the top-1 router probability.
    """

    tokens_per_expert: Tensor
    num_tokens: int
    dropped_assignments: Tensor
    dropped_tokens: Tensor
    entropy_sum: Tensor
    confidence_sum: Tensor

    @classmethod
    def from_routing(cls, probs: Tensor, mask: Tensor | None, counts: Tensor) -> RoutingStats:
        """Build from ``probs [T, E]``, the executed-assignment ``mask [T, k]`` (or None) and ``counts [E]``."""
        probs = probs.detach()
        zero = torch.zeros((), dtype=torch.long, device=probs.device)
        if mask is None:
            dropped_assignments, dropped_tokens = zero, zero
        else:
            dropped_assignments = (~mask).sum()
            dropped_tokens = (~mask.any(dim=-1)).sum()
        return cls(
            tokens_per_expert=counts.detach().long(),
            num_tokens=probs.shape[0],
            dropped_assignments=dropped_assignments,
            dropped_tokens=dropped_tokens,
            entropy_sum=torch.special.entr(probs).sum(),  # -p log p, 0 at p = 0
            confidence_sum=probs.amax(dim=-1).sum() if probs.shape[0] else probs.sum(),
        )

    def __add__(self, other: RoutingStats) -> RoutingStats:
        if self.tokens_per_expert.shape != other.tokens_per_expert.shape:
            raise ValueError(
                f"cannot add stats of {self.num_experts} and {other.num_experts} experts"
            )
        return RoutingStats(
            tokens_per_expert=self.tokens_per_expert
            + other.tokens_per_expert.to(self.tokens_per_expert.device),
            num_tokens=self.num_tokens + other.num_tokens,
            dropped_assignments=self.dropped_assignments
            + other.dropped_assignments.to(self.dropped_assignments.device),
            dropped_tokens=self.dropped_tokens
            + other.dropped_tokens.to(self.dropped_tokens.device),
            entropy_sum=self.entropy_sum + other.entropy_sum.to(self.entropy_sum.device),
            confidence_sum=self.confidence_sum
            + other.confidence_sum.to(self.confidence_sum.device),
        )

    @staticmethod
    def merge(stats: list[RoutingStats]) -> RoutingStats:
        """Sum a non-empty list of stats."""
        if not stats:
            raise ValueError("merge needs at least one RoutingStats")
        total = stats[0]
        for item in stats[1:]:
            total = total + item
        return total

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()

    @property
    def load(self) -> list[float]:
        """Fraction of executed assignments per expert (sums to 1)."""
        total = max(int(self.tokens_per_expert.sum()), 1)
        return [c / total for c in self.tokens_per_expert.tolist()]

    @property
    def dead_experts(self) -> list[int]:
        """Experts that received no token."""
        return [e for e, c in enumerate(self.tokens_per_expert.tolist()) if c == 0]

    @property
    def imbalance(self) -> float:
        """Max load over mean load: 1.0 is perfectly balanced, ``E`` is one expert taking all."""
        counts = self.tokens_per_expert.float()
        mean = counts.mean().item()
        return counts.max().item() / mean if mean > 0 else 0.0

    @property
    def entropy(self) -> float:
        """Mean router entropy per token (nats); ``log(E)`` is uniform."""
        return self.entropy_sum.item() / max(self.num_tokens, 1)

    @property
    def confidence(self) -> float:
        """Mean top-1 router probability per token."""
        return self.confidence_sum.item() / max(self.num_tokens, 1)

    def as_dict(self) -> dict[str, object]:
        """Plain-Python summary (forces a device sync)."""
        return {
            "num_tokens": self.num_tokens,
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "dropped_assignments": int(self.dropped_assignments),
            "dropped_tokens": int(self.dropped_tokens),
            "dead_experts": self.dead_experts,
            "imbalance": round(self.imbalance, 4),
            "entropy": round(self.entropy, 4),
            "confidence": round(self.confidence, 4),
        }
