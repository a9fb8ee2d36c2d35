"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437 §2.1.2).

Each router with ``balance="bias"`` adds a per-expert bias ``b`` to its scores to *choose* the
top-k experts (the combine weights stay the unbiased scores) and counts the assignments it
chooses in training. After each optimizer step :func:`update_routing_bias` moves every bias by
``b_e += u * sign(mean_load - load_e)``: an overloaded expert becomes less likely to be chosen, an
idle one more, without a loss gradient that competes with the language-modelling loss.

The same update drives transformers' routers that hold such a bias (DeepSeek-V3's
``e_score_correction_bias``, 34 families in transformers 5.24) once their loads are counted
(:func:`pimoe.hf.balance.track_expert_load`): a router is any module with the buffers
``e_score_correction_bias [E]`` and ``tokens_per_expert [E]``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["attach_bias_update", "sequence_balance_loss", "set_balance", "update_routing_bias"]


def sequence_balance_loss(probs: Tensor, indices: Tensor, num_experts: int, seq_len: int) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the Switch loss ``E * sum_e f_e * P_e`` of each
    sequence, averaged over the sequences (1.0 when every sequence spreads evenly).

    Args:
        probs: ``[T, E]`` normalized router scores (rows sum to 1), ``T = B * seq_len`` tokens
            in sequence order.
        indices: ``[T, k]`` chosen experts.
        num_experts: ``E``.
        seq_len: ``S``, the length of each sequence.

    Returns:
        Scalar; its gradient flows through ``probs`` only.
    """
    num_tokens, k = indices.shape
    if seq_len < 1 or num_tokens % seq_len:
        raise ValueError(
            f"seq_len={seq_len} does not divide the {num_tokens} tokens into sequences"
        )
    if num_tokens == 0:
        return probs.sum() * 0.0
    batch = num_tokens // seq_len
    counts = torch.zeros(batch, num_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(
        1,
        indices.reshape(batch, seq_len * k),
        torch.ones_like(indices, dtype=probs.dtype).view(batch, -1),
    )
    fraction = counts / (seq_len * k)  # [B, E]
    mean_probs = probs.reshape(batch, seq_len, num_experts).mean(dim=1)  # [B, E]
    return num_experts * (fraction * mean_probs).sum(dim=-1).mean()


def _bias_routers(model: nn.Module) -> list[tuple[str, nn.Module, Tensor, Tensor]]:
    """``(name, module, e_score_correction_bias, tokens_per_expert)`` of every router in ``model``
    with a selection bias and load counts."""
    routers = []
    for name, module in model.named_modules():
        bias = getattr(module, "e_score_correction_bias", None)
        counts = getattr(module, "tokens_per_expert", None)
        if isinstance(bias, Tensor) and isinstance(counts, Tensor):
            routers.append((name, module, bias, counts))
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no router with a selection bias and load counts: build pimoe layers "
            "with MoEConfig(balance='bias') (or set_balance(model, 'bias')), or track a transformers model's "
            "loads with pimoe.hf.balance.track_expert_load"
        )
    return routers


@torch.no_grad()
def update_routing_bias(model: nn.Module, rate: float | None = None) -> dict[str, Tensor]:
    """One bias update of every balancing router in ``model``; call it after each optimizer step
    (or let :func:`attach_bias_update` do it).

    For each router with loads ``c [E]`` counted since the last update:
    ``e_score_correction_bias += rate * sign(mean(c) - c)``; the counts are then reset. A router
    that counted nothing (no training forward since the last update) is left unchanged.

    Args:
        model: any module holding pimoe ``Router``s with ``balance="bias"`` or transformers
            routers whose loads are tracked (:func:`pimoe.hf.balance.track_expert_load`).
        rate: ``u``; default each pimoe router's ``config.bias_update_rate``, else 1e-3.

    Returns:
        ``{router module name: loads [E] (float32, the counts used)}``.

    Raises:
        ValueError: ``model`` has no such router, or ``rate < 0``.
    """
    if rate is not None and not rate >= 0:
        raise ValueError(f"rate must be >= 0, got {rate}")
    routers = _bias_routers(model)
    loads: dict[str, Tensor] = {}
    for name, router, bias, counts in routers:
        load = counts.detach().float()
        loads[name] = load.cpu()
        if int(counts.sum()) == 0:
            continue
        config = getattr(router, "config", None)
        step = rate if rate is not None else float(getattr(config, "bias_update_rate", 1e-3))
        bias.add_(torch.sign(load.mean() - load).to(bias.device, bias.dtype), alpha=step)
        counts.zero_()
    return loads


def attach_bias_update(
    optimizer: torch.optim.Optimizer, model: nn.Module, rate: float | None = None
) -> RemovableHandle:
    """Run :func:`update_routing_bias` on ``model`` after every ``optimizer.step()`` (a step
    post-hook, as torchtitan does); ``handle.remove()`` detaches it."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        update_routing_bias(model, rate)

    _bias_routers(model)  # raises now for a model without balancing routers
    return optimizer.register_step_post_hook(hook)


def set_balance(
    model: nn.Module, balance: Literal["aux_loss", "bias"], bias_update_rate: float | None = None
) -> int:
    """Switch every pimoe ``Router`` (and the ``config`` of its ``PiMoE`` layer) in ``model`` to
    ``balance`` (e.g. the layers of an upcycled model, built with the default ``"aux_loss"``);
    biases start at zero. Returns the number of routers changed."""
    from pimoe.moe.router import Router

    changes: dict[str, Any] = {"balance": balance}
    if bias_update_rate is not None:
        changes["bias_update_rate"] = bias_update_rate
    routers = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(module, Router):
            module.config = module.config.replace(**changes)
            module.sync_balance_buffers()
            routers += 1
        elif config is not None and hasattr(config, "balance") and hasattr(module, "router"):
            module.config = config.replace(**changes)
    return routers
