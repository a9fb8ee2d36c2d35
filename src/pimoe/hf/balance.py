"""Auxiliary-loss-free balancing for transformers MoE models whose routers carry a selection bias.

transformers' DeepSeek-V3 router (and those of 33 more families in transformers 5.24: GLM-4-MoE,
Kimi, dots.llm1, ...) adds the buffer ``e_score_correction_bias [E]`` to its scores to choose the
experts, exactly as pimoe's ``balance="bias"`` router does, but transformers never updates it:
it is loaded from checkpoints and frozen. :func:`track_expert_load` counts the tokens each experts
module executes in training forwards into a ``tokens_per_expert`` buffer on the router, so that
:func:`pimoe.moe.update_routing_bias` (after each optimizer step, or through
:func:`pimoe.moe.attach_bias_update`) trains the bias as DeepSeek-V3 does. Counting happens in a
forward pre-hook of the experts module, so it works with every experts implementation
(``"pimoe"``, ``"grouped_mm"``, ``"eager"``).

Families without such a buffer (Mixtral, Qwen3-MoE, OLMoE, ...) choose with a plain top-k: they
are not covered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pimoe.hf.report import _is_hf_experts, _top_k_index

BIAS = "e_score_correction_bias"


def _bias_router(block: nn.Module) -> nn.Module | None:
    """The module of ``block`` (itself or a direct child) that holds the selection bias."""
    for module in (block, *block.children()):
        if isinstance(getattr(module, BIAS, None), Tensor):
            return module
    return None


class LoadTracker:
    """Forward pre-hooks counting each experts module's assignments into its router's
    ``tokens_per_expert [E]`` buffer (long, not saved); :meth:`remove` detaches them and
    deletes the buffers."""

    def __init__(self, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
        self.routers = [router for router, _ in pairs]
        self._handles: list[RemovableHandle] = []
        for router, experts in pairs:
            bias = getattr(router, BIAS)
            router.register_buffer(
                "tokens_per_expert",
                torch.zeros(bias.shape, dtype=torch.long, device=bias.device),
                persistent=False,
            )
            self._handles.append(
                experts.register_forward_pre_hook(self._counter(router), with_kwargs=True)
            )

    @staticmethod
    def _counter(router: nn.Module) -> Any:
        def count(experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not experts.training:
                return
            counts = router.get_buffer("tokens_per_expert")
            with torch.no_grad():
                index = _top_k_index(args, kwargs).reshape(-1)
                index = index[
                    index < counts.numel()
                ]  # expert-parallel sentinels are other ranks' experts
                counts += torch.bincount(index, minlength=counts.numel()).to(counts.device)

        return count

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for router in self.routers:
            router._buffers.pop("tokens_per_expert", None)
        self._handles, self.routers = [], []


def track_expert_load(model: nn.Module) -> LoadTracker:
    """Count, in training forwards, the assignments of every MoE layer of a transformers
    ``model`` whose router holds ``e_score_correction_bias``; then
    ``pimoe.moe.update_routing_bias(model, rate)`` updates those biases.

    Raises:
        ValueError: no experts module of ``model`` sits next to such a router.
    """
    pairs = []
    for name, module in model.named_modules():
        if not name or not _is_hf_experts(module):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        router = _bias_router(parent)
        if router is not None:
            pairs.append((router, module))
    if not pairs:
        raise ValueError(
            f"{type(model).__name__} has no MoE layer whose router holds {BIAS!r} (DeepSeek-V3 style); "
            "families that choose experts by a plain top-k have no selection bias to train"
        )
    return LoadTracker(pairs)
