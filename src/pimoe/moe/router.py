"""Token-level routing: which experts see which tokens, with what weight.

The router only *decides*; executing the decision is the dispatcher's job (``dispatch.py``).
Shapes: ``T`` tokens, ``D`` model width, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
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

    ``probs``, ``aux_loss`` and ``z_loss`` are computed on first access only (then kept), in the
    autograd mode the routing ran in: a forward whose caller never reads them (inference, a zero
    loss coefficient) does not pay for them.

    Attributes:
        indices: ``[T, k]`` long, the experts each token is sent to (for expert-choice routing
            ``k == E`` and every column is one expert).
        weights: ``[T, k]`` combine weights, in the input dtype; 0 where an assignment is dropped.
        logits: ``[T, E]`` router logits in float32 (float64 for float64 input) (including the
            training noise, if any).
        mask: ``[T, k]`` bool, the assignments that are executed, or ``None`` when all are
            (dropless token-choice routing, the default).
        score: how ``logits`` become ``probs``: ``"softmax"``, or ``"sigmoid"`` normalized to sum 1.
        seq_len: the length ``S`` of the sequences the tokens are made of when ``aux_loss`` is
            the sequence-wise balance loss (``balance="bias"``), else None (the Switch loss).
        grad_enabled: whether the lazily computed losses are differentiable.
        known_probs: ``[T, E]`` ``probs`` when the router computed them anyway, else None.
    """

    indices: Tensor
    weights: Tensor
    logits: Tensor
    mask: Tensor | None
    score: Score = "softmax"
    seq_len: int | None = None
    grad_enabled: bool = True
    known_probs: Tensor | None = field(default=None, repr=False)

    @cached_property
    def probs(self) -> Tensor:
        """``[T, E]`` normalized scores (rows sum to 1) used for the losses and statistics."""
        if self.known_probs is not None:
            return self.known_probs
        with torch.set_grad_enabled(self.grad_enabled):
            return score_probs(self.logits, self.score)[1]

    @cached_property
    def aux_loss(self) -> Tensor:
        """Scalar load-balancing loss (Switch Transformer), 1.0 at perfect balance; with
        ``seq_len``, the mean of each sequence's Switch loss."""
        probs, num_experts = self.probs, self.logits.shape[-1]
        with torch.set_grad_enabled(self.grad_enabled):
            if self.seq_len is not None:
                return sequence_balance_loss(probs, self.indices, num_experts, self.seq_len)
            return load_balancing_loss(probs, self.indices, num_experts)

    @cached_property
    def z_loss(self) -> Tensor:
        """Scalar router z-loss (ST-MoE)."""
        with torch.set_grad_enabled(self.grad_enabled):
            return router_z_loss(self.logits)


def score_probs(logits: Tensor, score: Score) -> tuple[Tensor, Tensor]:
    """``(scores, probs)`` of ``logits [T, E]``: the selection scores and their normalization to
    rows summing to 1 (the same tensor for softmax)."""
    if score == "softmax":
        probs = logits.softmax(dim=-1)
        return probs, probs
    scores = torch.sigmoid(logits)
    return scores, scores / scores.sum(dim=-1, keepdim=True)


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
        token_choice = self.routing == "token_choice"
        bias, mask, probs = self.e_score_correction_bias, None, None
        if token_choice and self.score == "softmax" and self.normalize and bias is None:
            # the softmax of the top-k logits is the renormalized top-k of the full softmax
            top_logits, indices = logits.topk(self.top_k, dim=-1)  # [T, k]
            weights = top_logits.softmax(dim=-1)
        else:
            scores, probs = score_probs(logits, self.score)
            if not token_choice:
                indices, weights, mask = self._expert_choice(scores)
            elif bias is None:
                weights, indices = scores.topk(self.top_k, dim=-1)  # [T, k]
            else:  # the bias chooses the experts; the weights stay the unbiased scores
                indices = (scores.detach() + bias.to(scores.dtype)).topk(self.top_k, dim=-1).indices
                weights = scores.gather(-1, indices)
                if self.training and self.tokens_per_expert is not None:
                    self.tokens_per_expert += torch.bincount(
                        indices.reshape(-1), minlength=self.num_experts
                    )
            if token_choice and self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.config.weight_outputs:  # select only: outputs are summed unweighted
            weights = torch.ones_like(weights) if mask is None else mask.to(weights.dtype)
        if token_choice and self.capacity_factor is not None:
            mask = self._capacity_mask(indices, x.shape[0])
            weights = weights * mask
        sequence_loss = token_choice and self.config.balance == "bias" and seq_len is not None
        return RouterOutput(
            indices=indices,
            weights=weights.to(x.dtype),
            logits=logits,
            mask=mask,
            score=self.score,
            seq_len=seq_len if sequence_loss else None,
            grad_enabled=torch.is_grad_enabled(),
            known_probs=probs,
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
