"""Token-level routing: which experts see which tokens, with what weight.

The router only *decides*; executing the decision is the dispatcher's job (``dispatch.py``).
Shapes: ``T`` tokens, ``D`` model width, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.moe.balance import sequence_balance_loss
from pimoe.moe.config import MoEConfig, Routing, Score
from pimoe.moe.losses import load_balancing_loss, router_z_loss

__all__ = ["Router", "RouterOutput", "Routing", "Score"]


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
        aux_loss: scalar load-balancing loss (Switch Transformer), 1.0 at perfect balance; with
            ``balance="bias"`` and known sequences, the mean of each sequence's Switch loss.
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

    ``Router(d_model, config)`` or ``Router(d_model, num_experts=8, top_k=2, ...)``: the routing
    options are the fields of :class:`~pimoe.moe.config.MoEConfig` (``num_experts``, ``top_k``,
    ``score``, ``normalize``, ``weight_outputs``, ``noise_std``, ``capacity_factor``,
    ``routing``, ``router_bias``), given as a config, keywords, or both (keywords win).

    With ``capacity_factor`` each expert takes at most ``ceil(capacity_factor * T * k / E)``
    assignments; the rest are dropped (Switch / GShard), first choices having priority over
    second choices. Expert-choice routing (each expert picks its top ``capacity`` tokens, Zhou
    et al. 2022) is balanced, but a token may get 0 or several experts, and it looks at the whole
    batch, so it is not causal: do not use it for autoregressive decoding.

    With ``balance="bias"`` (DeepSeek-V3's auxiliary-loss-free balancing) the router holds two
    buffers: ``e_score_correction_bias [E]`` (float32, saved with the model; the name
    transformers' DeepSeek-V3 router uses), added to the scores to choose the top-k but not to
    the combine weights, and ``tokens_per_expert [E]`` (long, not saved), the assignments chosen
    in training forwards since the last :func:`pimoe.moe.update_routing_bias`.
    """

    e_score_correction_bias: Tensor | None
    tokens_per_expert: Tensor | None

    def __init__(self, d_model: int, config: MoEConfig | None = None, **options: Any) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        self.config = MoEConfig.build(config, options)
        self.d_model = d_model
        self.gate = nn.Linear(d_model, self.config.num_experts, bias=self.config.router_bias)
        self.register_buffer("e_score_correction_bias", None)
        self.register_buffer("tokens_per_expert", None, persistent=False)
        self.sync_balance_buffers()

    def sync_balance_buffers(self) -> None:
        """Create (zeros) or remove the balancing buffers so that they match ``config.balance``;
        call it after replacing ``config`` (:func:`pimoe.moe.set_balance` does)."""
        if self.config.balance != "bias":
            self.e_score_correction_bias = self.tokens_per_expert = None
            return
        device, num_experts = self.gate.weight.device, self.config.num_experts
        if self.e_score_correction_bias is None or self.e_score_correction_bias.shape != (
            num_experts,
        ):
            self.e_score_correction_bias = torch.zeros(num_experts, device=device)
        if self.tokens_per_expert is None or self.tokens_per_expert.shape != (num_experts,):
            self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device=device)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def score(self) -> Score:
        return self.config.score

    @property
    def normalize(self) -> bool:
        return self.config.normalize

    @property
    def noise_std(self) -> float:
        return self.config.noise_std

    @property
    def capacity_factor(self) -> float | None:
        return self.config.capacity_factor

    @property
    def routing(self) -> Routing:
        return self.config.routing

    def capacity(self, num_tokens: int) -> int:
        """Assignments one expert may take for ``num_tokens`` tokens (expert-choice defaults to 1.0)."""
        factor = 1.0 if self.capacity_factor is None else self.capacity_factor
        return max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor, seq_len: int | None = None) -> RouterOutput:
        """Route ``x`` of shape ``[T, D]``; ``seq_len``: the length ``S`` of the sequences ``x``
        is made of (``T = B * S``), used by the sequence-wise loss of ``balance="bias"``."""
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
            if not self.config.weight_outputs:
                weights = mask.to(scores.dtype)
        else:
            bias = self.e_score_correction_bias
            if bias is None:
                weights, indices = scores.topk(self.top_k, dim=-1)  # [T, k]
            else:  # the bias chooses the experts; the weights stay the unbiased scores
                indices = (scores.detach() + bias.to(scores.dtype)).topk(self.top_k, dim=-1).indices
                weights = scores.gather(-1, indices)
                if self.training and self.tokens_per_expert is not None:
                    self.tokens_per_expert += torch.bincount(
                        indices.reshape(-1), minlength=self.num_experts
                    )
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            if not self.config.weight_outputs:  # select only: outputs are summed unweighted
                weights = torch.ones_like(weights)
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
            aux_loss=self._balance_loss(probs, indices, seq_len),
            z_loss=router_z_loss(logits),
        )

    def _balance_loss(self, probs: Tensor, indices: Tensor, seq_len: int | None) -> Tensor:
        if self.config.balance == "bias" and seq_len is not None and self.routing == "token_choice":
            return sequence_balance_loss(probs, indices, self.num_experts, seq_len)
        return load_balancing_loss(probs, indices, self.num_experts)

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
