"""The token-level hand-off router of the real-LLM chain.

A small MLP over the frozen LM's features at one position (hidden states of the chosen layers,
concatenated: :class:`~pimoe.compute.llm_runner.LMRunner`) that says whether the *next* tokens are
a computed quantity, i.e. whether control goes to the computation expert now.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TokenRouter(nn.Module):
    """``features [..., feature_dim] -> logit [...]`` of "hand off to the computation expert".

    The input is standardized with a fixed ``mean``/``std`` (buffers, set from the training
    features) so one learning rate fits every layer's scale.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, feature_dim: int, hidden: int = 64) -> None:
        super().__init__()
        if feature_dim < 1 or hidden < 1:
            raise ValueError(
                f"feature_dim and hidden must be positive, got {feature_dim}, {hidden}"
            )
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def set_scale(self, features: Tensor) -> None:
        """Standardize with the statistics of ``features [N, feature_dim]``."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-4))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def fires(self, features: Tensor, threshold: float = 0.5) -> bool:
        """For one position's ``features [feature_dim]``: hand off now?"""
        return bool(torch.sigmoid(self(features)) > threshold)
