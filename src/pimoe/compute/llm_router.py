"""The token-level hand-off router of the real-LLM chain.

A small MLP that says whether the *next* tokens are a computed quantity, i.e. whether control goes
to the computation expert now. It reads one position's :func:`router_input`: the frozen LM's
features there (hidden states of the chosen layers, concatenated:
:class:`~pimoe.compute.llm_runner.LMRunner`) and the LM's own log-probability that its next token
starts a number (:meth:`~pimoe.compute.llm_runner.LMRunner.digit_logprob`): the LM already knows
when a number comes next; the hidden states tell the router whether that number is the answer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DIGIT_FLOOR = -20.0  # log-probabilities below this are clipped (the router's input stays bounded)


def router_input(features: Tensor, digit_logprob: Tensor) -> Tensor:
    """``features [..., F]`` and ``digit_logprob [...]`` -> ``[..., F + 1]``."""
    return torch.cat([features, digit_logprob.clamp_min(DIGIT_FLOOR)[..., None]], dim=-1)


class TokenRouter(nn.Module):
    """``router_input [..., feature_dim + 1] -> logit [...]`` of "hand off to the computation expert".

    ``feature_dim`` is the LM features' width (without the digit log-probability). The input is
    standardized with a fixed ``mean``/``std`` (buffers, set from the training inputs) so one
    learning rate fits every layer's scale.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, feature_dim: int, hidden: int = 64) -> None:
        super().__init__()
        if feature_dim < 1 or hidden < 1:
            raise ValueError(
                f"feature_dim and hidden must be positive, got {feature_dim}, {hidden}"
            )
        self.register_buffer("mean", torch.zeros(feature_dim + 1))
        self.register_buffer("std", torch.ones(feature_dim + 1))
        self.net = nn.Sequential(
            nn.Linear(feature_dim + 1, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )

    def set_scale(self, inputs: Tensor) -> None:
        """Standardize with the statistics of ``inputs [N, feature_dim + 1]``."""
        self.mean.copy_(inputs.mean(0))
        self.std.copy_(inputs.std(0).clamp_min(1e-4))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net((inputs - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def fires(self, inputs: Tensor, threshold: float = 0.5) -> bool:
        """For one position's ``inputs [feature_dim + 1]``: hand off now?"""
        return bool(torch.sigmoid(self(inputs)) > threshold)
