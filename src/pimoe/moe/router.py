"""Token-level routing: which experts see which tokens, with what weight.

The router only *decides*; executing the decision is the dispatcher's job (``dispatch.py``).
Shapes: ``T`` tokens, ``D`` model width, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.moe.losses import load_balancing_loss, router_z_loss

Score = Literal["softmax", "sigmoid"]
Routing = Literal["token_choice", "expert_choice"]


@dataclass
class RouterOutput:
    """One routing decision.

    Attributes:
        indices: ``[T, k]`` long, the experts each token is sent to (for expert-choice routing
            ``k == E`` and every column is one expert).
        weights: ``[T, k]`` combine weights, in the input dtype; 0 where an assignment is dropped.
        logits: ``[T, E]`` router logits in float32 (float64 for float64 input) (including the training noise, if any).
        probs: ``[T, E]`` normalized scores used for the losses and statistics.
        mask: ``[T, k]`` bool, the assignments that are executed, or ``None`` when all are
            (dropless token-choice routing, the default).
        aux_loss: scalar load-balancing loss (Switch Transformer), 1.0 at perfect balance.
        z_loss: scalar router z-loss (ST-MoE).
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor
    probs: Tensor
    mask: Tensor | None
    aux_loss: Tensor
    z_loss: Tensor


class Router(nn.Module):
    """Linear gate followed by top-k selection.

    Args:
        d_model: token width ``D``.
        num_experts: ``E`` (>= 1).
        top_k: experts per token ``k`` (1 <= k <= E). For expert-choice routing it sets the
            average number of experts per token (each expert takes ``capacity`` tokens).
        score: ``"softmax"`` (Mixtral / Switch) or ``"sigmoid"`` (DeepSeek-V3 style independent
            per-expert scores).
        normalize: renormalize the selected ``k`` weights to sum to 1 (Mixtral does; Qwen2-MoE
            makes it a config option ``norm_topk_prob``).
        noise_std: standard deviation of Gaussian noise added to the logits in training only
            (noisy gating, Shazeer et al. 2017). 0 disables it.
        capacity_factor: ``None`` for dropless routing (default). Otherwise each expert takes at
            most ``ceil(capacity_factor * T * k / E)`` assignments; the rest are dropped
            (Switch / GShard), first choices having priority over second choices.
        routing: ``"token_choice"`` (each token picks k experts) or ``"expert_choice"``
            (each expert picks its top ``capacity`` tokens, Zhou et al. 2022; perfectly balanced,
            but a token may get 0 or several experts, and it looks at the whole batch, so it is
            not causal: do not use it for autoregressive decoding).
        bias: whether the gate Linear has a bias.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        score: Score = "softmax",
        normalize: bool = True,
        noise_std: float = 0.0,
        capacity_factor: float | None = None,
        routing: Routing = "token_choice",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if routing not in ("token_choice", "expert_choice"):
            raise ValueError(f"routing must be 'token_choice' or 'expert_choice', got {routing!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.score = score
        self.normalize = normalize
        self.noise_std = noise_std
        self.capacity_factor = capacity_factor
        self.routing = routing
        self.gate = nn.Linear(d_model, num_experts, bias=bias)

    def capacity(self, num_tokens: int) -> int:
        """Assignments one expert may take for ``num_tokens`` tokens (expert-choice defaults to 1.0)."""
        factor = 1.0 if self.capacity_factor is None else self.capacity_factor
        return max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor) -> RouterOutput:
        """Route ``x`` of shape ``[T, D]``."""
        logits = self.gate(x)  # [T, E], at least float32 (HF computes routing in float32 too)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        if self.score == "softmax":
            scores = probs = logits.softmax(dim=-1)
        else:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        if self.routing == "expert_choice":
            indices, weights, mask = self._expert_choice(scores)
        else:
            weights, indices = scores.topk(self.top_k, dim=-1)  # [T, k]
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            mask = None
            if self.capacity_factor is not None:
                mask = self._capacity_mask(indices, x.shape[0])
                weights = weights * mask
        return RouterOutput(
            indices=indices,
            weights=weights.to(x.dtype),
            logits=logits,
            probs=probs,
            mask=mask,
            aux_loss=load_balancing_loss(probs, indices, self.num_experts),
            z_loss=router_z_loss(logits),
        )

    def _capacity_mask(self, indices: Tensor, num_tokens: int) -> Tensor:
        """``[T, k]`` bool: keep an assignment if its expert still has room (GShard priority)."""
        capacity = self.capacity(num_tokens)
        # Rank-major order: every token's first choice before any second choice.
        flat = indices.t().reshape(-1)  # [k*T]
        onehot = F.one_hot(flat, self.num_experts)  # [k*T, E]
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # slot taken in its expert
        return (position < capacity).view(self.top_k, -1).t()

    def _expert_choice(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each expert takes its ``capacity`` best tokens; returns ``[T, E]`` indices/weights/mask."""
        num_tokens = scores.shape[0]
        capacity = min(self.capacity(num_tokens), num_tokens)
        top_tokens = scores.topk(capacity, dim=0).indices  # [C, E]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(0, top_tokens, True)
        indices = torch.arange(self.num_experts, device=scores.device).expand(num_tokens, -1)
        return indices, scores * mask, mask

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score={self.score}, routing={self.routing}, capacity_factor={self.capacity_factor}"
        )
