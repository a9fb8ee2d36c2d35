"""Execute a routing decision: sort assignments by expert, run each expert once, combine.

No Python loop over tokens: the only loop is over experts, inside the experts backend.
:func:`sort_assignments` and :func:`combine` are the two halves around the experts call; the
expert-parallel layer (``parallel.py``) puts its all-to-all exchange between them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pimoe.moe.router import RouterOutput


def sort_by_expert(
    indices: Tensor, weights: Tensor, num_experts: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Group token-expert assignments by expert.

    Args:
        indices: ``[T, k]`` long, the experts of each token.
        weights: ``[T, k]`` combine weights.
        num_experts: ``E``.
        mask: ``[T, k]`` bool, the assignments to execute (None: all).

    Returns:
        ``(token_sorted [N], weight_sorted [N], counts [E])``: the token index and combine weight
        of each executed assignment, expert 0's first (stable: token order within an expert), and
        the number of assignments per expert.
    """
    num_tokens, k = indices.shape
    flat_expert = indices.reshape(-1)  # [T*k]
    flat_weight = weights.reshape(-1)  # [T*k]
    flat_token = torch.arange(num_tokens, device=indices.device).repeat_interleave(k)  # [T*k]
    if mask is not None:
        keep = mask.reshape(-1)
        flat_expert, flat_weight, flat_token = flat_expert[keep], flat_weight[keep], flat_token[keep]
    order = flat_expert.argsort(stable=True)  # group assignments by expert
    counts = torch.bincount(flat_expert, minlength=num_experts)  # [E]
    return flat_token[order], flat_weight[order], counts


def sort_assignments(route: RouterOutput, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`sort_by_expert` of a router's decision (its indices, weights and mask)."""
    return sort_by_expert(route.indices, route.weights, num_experts, route.mask)


def combine(x: Tensor, y: Tensor, token_sorted: Tensor, weight_sorted: Tensor) -> Tensor:
    """Weighted scatter-add of expert outputs back to their tokens.

    Args:
        x: ``[T, D]`` the layer's tokens (gives the output's shape and dtype).
        y: ``[N, D]`` expert outputs in the order of :func:`sort_assignments` (scaled in place
            when grad mode is off).
        token_sorted, weight_sorted: ``[N]`` from :func:`sort_assignments`.

    Returns:
        ``[T, D]``: each token's weighted sum of its expert outputs (0 for a token with none).
    """
    scale = weight_sorted.unsqueeze(-1).to(y.dtype)  # [N, 1]
    y = y * scale if torch.is_grad_enabled() else y.mul_(scale)  # in place when nothing is saved
    out = torch.zeros_like(x, dtype=y.dtype).index_add_(0, token_sorted, y)
    return out.to(x.dtype)


def dispatch_combine(
    x: Tensor, route: RouterOutput, experts: nn.Module, num_experts: int, positions: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run ``experts`` on the assignments in ``route`` and combine them with their weights.

    Args:
        x: ``[T, D]`` tokens.
        route: the router's decision for ``x`` (``indices``/``weights``/``mask`` are ``[T, k]``).
        experts: an expert bank (``ExpertList`` or ``StackedExperts``): called as
            ``experts(x_sorted [N, D], counts [E], positions [N]) -> [N, D]``.
        num_experts: ``E``.
        positions: ``[T]`` long token positions handed to the experts with their rows (default:
            the token index ``0..T-1``).

    Returns:
        ``(out [T, D], counts [E])``: the weighted sum of each token's expert outputs (0 for a
        token with no executed assignment), and the executed assignments per expert.
    """
    token_sorted, weight_sorted, counts = sort_assignments(route, num_experts)
    row_positions = token_sorted if positions is None else positions.index_select(0, token_sorted)
    y = experts(x.index_select(0, token_sorted), counts, row_positions)  # [N, D]
    return combine(x, y, token_sorted, weight_sorted), counts
