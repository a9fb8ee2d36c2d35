"""int8 / int4 fused experts that a transformers MoE block can hold, run by pimoe's kernel.

transformers >= 5 stores the experts of its MoE families as fused 3-D parameters
(``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``), which bitsandbytes and torch.ao leave in
floating point. :func:`quantize_hf_experts` replaces every such experts module of a model by a
:class:`QuantizedHFExperts` with the same call signature (``experts(hidden_states [T, D],
top_k_index [T, k], top_k_weights [T, k]) -> [T, D]``): the block's router is unchanged, and
the quantized module dispatches with :mod:`pimoe.moe.dispatch` and runs each expert's FFN with
the quantized matmuls of :mod:`pimoe.compress.quantize_experts` (imported from compress so
that one quantization scheme serves PiMoE layers and transformers models alike).

The module reads the family's layout with :func:`pimoe.hf.backend.experts_layout` (transposed
weights, biases) and keeps the family's gate (``_apply_gate``, e.g. GPT-OSS's clamped gate) and
``post_expert_norm``; it runs whatever ``config._experts_implementation`` says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from pimoe.compress.quantize_experts import BITS, QuantizedFusedExperts, int4_group_size
from pimoe.hf.backend import experts_layout
from pimoe.moe.dispatch import combine_rows, gather_tokens, plan_dispatch

_PLAIN = (bool, int, float, str)


class QuantizedHFExperts(QuantizedFusedExperts):
    """A transformers experts module with int8 or int4 weights.

    Buffers: the quantized ``w_in [E, F_in, D]`` (``gate_up_proj`` or ``up_proj``) and ``w_out
    [E, D, F]`` (``down_proj``), see :class:`~pimoe.compress.quantize_experts.QuantizedFusedExperts`,
    and float biases ``b_in`` / ``b_out`` when the family has them.

    Args:
        experts: the family's experts module (``@use_experts_implementation``).
        bits: 8 or 4.
        group_size: int4: input columns per scale and zero (largest of 256/128/64/32 that is
            <= this and divides both input widths).
    """

    def __init__(self, experts: nn.Module, bits: int = 8, group_size: int = 128) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        layout = experts_layout(experts)
        source: Any = experts
        self.family = type(experts).__name__
        self.num_experts, _, self.d_model = layout.w_in.shape
        self.bits = bits
        self.group_size = (
            int4_group_size((self.d_model, layout.w_out.shape[-1]), group_size) if bits == 4 else 0
        )
        self.quantize("w_in", layout.w_in)
        self.quantize("w_out", layout.w_out)
        for name, bias in (("b_in", layout.b_in), ("b_out", layout.b_out)):
            self.register_buffer(name, None if bias is None else bias.detach().clone())
        # The family's gate reads attributes of its module (act_fn, alpha, limit, ...): keep them.
        for key, value in vars(source).items():
            if (
                isinstance(value, _PLAIN)
                and not key.startswith("_")
                and key not in ("training", "bits", "group_size")
            ):
                setattr(self, key, value)
        self.act_fn = getattr(source, "act_fn", None)
        self.post_expert_norm = source.post_expert_norm if source.has_post_expert_norm else None
        self.expert_parallel = bool(getattr(source, "_is_expert_parallel", False))
        self._gate: Callable[[Any, Tensor], Tensor] | None = (
            type(source)._apply_gate if source.has_gate else None
        )

    def act(self, h: Tensor) -> Tensor:
        """The family's activation: ``[n, F_in] -> [n, F]``."""
        if self._gate is not None:
            return self._gate(self, h)
        if self.act_fn is None:
            raise TypeError(f"{self.family} has neither a gate nor an act_fn")
        out: Tensor = self.act_fn(h)
        return out

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """``hidden_states [T, D]``, ``top_k_index [T, k]`` (``>= E``: another rank's expert),
        ``top_k_weights [T, k]`` -> ``[T, D]`` in ``hidden_states``' dtype."""
        mask = top_k_index < self.num_experts if self.expert_parallel else None
        plan = plan_dispatch(top_k_index, self.num_experts, mask)
        y = self.grouped_forward(gather_tokens(hidden_states, plan), plan.splits)  # [N, D]
        if self.post_expert_norm is not None:
            y = self.post_expert_norm(y)
        return combine_rows(y, top_k_weights, plan).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.family}, num_experts={self.num_experts}, d_model={self.d_model}, int{self.bits}"
        )


def _is_hf_experts(module: nn.Module) -> bool:
    return all(
        hasattr(module, flag) for flag in ("has_gate", "is_transposed", "num_experts")
    ) and any(
        isinstance(getattr(module, name, None), nn.Parameter)
        for name in ("gate_up_proj", "up_proj")
    )


def quantize_hf_experts(
    model: nn.Module, bits: int = 8, *, group_size: int = 128, skip: Iterable[str] = ()
) -> list[str]:
    """Replace, in place, every transformers fused-experts module of ``model`` by a
    :class:`QuantizedHFExperts`; returns the replaced modules' qualified names.

    ``skip``: name patterns (as in ``pimoe compress``) of experts modules to leave in float.
    """
    from pimoe.compress._modules import matches

    skip = tuple(skip)
    replaced = []
    for name, module in list(model.named_modules()):
        if name and _is_hf_experts(module) and not matches(name, skip):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.no_grad():
                setattr(parent, child, QuantizedHFExperts(module, bits, group_size))
            replaced.append(name)
    return replaced
