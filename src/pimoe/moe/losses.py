"""Auxiliary router losses. They are returned to the caller, never silently added to a loss."""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        probs: ``[T, E]`` router probabilities (rows sum to 1).
        indices: ``[T, k]`` chosen experts (the router's choices, before capacity dropping).
        num_experts: ``E``.

    Returns:
        Scalar. ``f_e`` is the fraction of the ``T*k`` assignments that chose expert ``e`` and
        ``P_e`` the mean probability of ``e``; the loss is 1.0 when routing is uniform. (Hugging
        Face's ``load_balancing_loss_func`` divides by ``T`` instead of ``T*k``: it equals
        ``k`` times this value.)
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts).to(
        probs.dtype
    )  # not index_add_: it stalls on busy cores
    fraction = counts / flat.numel()  # [E], no gradient (counts are discrete)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``; ``logits`` is ``[T, E]``."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
