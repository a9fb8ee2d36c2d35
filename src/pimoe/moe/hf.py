"""Load Hugging Face transformers MoE blocks into :class:`PiMoE` (the correctness anchor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pimoe.moe.experts import StackedExperts, SwiGLU

if TYPE_CHECKING:
    from pimoe.moe.layer import PiMoE


def _is_silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def from_hf_block(cls: type[PiMoE], block: nn.Module) -> PiMoE:
    """Copy a ``MixtralSparseMoeBlock`` or ``Qwen2MoeSparseMoeBlock`` (transformers >= 5 layout:
    ``gate.weight [E, D]``, ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``)."""
    name = type(block).__name__
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None or not hasattr(experts, "gate_up_proj"):
        raise TypeError(
            f"{name} is not a supported MoE block: expected a transformers>=5 MixtralSparseMoeBlock "
            "or Qwen2MoeSparseMoeBlock (with gate.weight and experts.gate_up_proj)"
        )
    if not _is_silu(experts.act_fn):
        raise ValueError(
            f"{name} uses activation {type(experts.act_fn).__name__}; only SiLU (SwiGLU) is supported"
        )
    num_experts, two_f, d_model = experts.gate_up_proj.shape
    shared = getattr(block, "shared_expert", None)
    if shared is not None and not _is_silu(shared.act_fn):
        raise ValueError(f"{name}'s shared expert uses an activation other than SiLU")
    layer = cls(
        d_model,
        num_experts=num_experts,
        top_k=gate.top_k,
        ffn_dim=two_f // 2,
        normalize=getattr(gate, "norm_topk_prob", True),
        shared_experts=1 if shared is not None else 0,
        shared_ffn_dim=shared.down_proj.in_features if shared is not None else None,
        shared_gate=getattr(block, "shared_expert_gate", None) is not None,
    )
    bank, shared_ffn = layer.experts, layer.shared
    if not isinstance(bank, StackedExperts):
        raise TypeError(
            f"{cls.__name__} built {type(bank).__name__} experts, expected StackedExperts"
        )
    with torch.no_grad():
        layer.router.gate.weight.copy_(gate.weight)
        bank.w_in.copy_(experts.gate_up_proj)
        bank.w_out.copy_(experts.down_proj)
        if shared is not None and isinstance(shared_ffn, SwiGLU):
            shared_ffn.gate_up.weight.copy_(
                torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
            )
            shared_ffn.down.weight.copy_(shared.down_proj.weight)
        if isinstance(layer.shared_gate, nn.Linear):
            shared_gate: nn.Linear = getattr(block, "shared_expert_gate")  # noqa: B009
            layer.shared_gate.weight.copy_(shared_gate.weight)
    return layer.to(device=gate.weight.device, dtype=gate.weight.dtype)
