"""Weight-only int8 for the stacked experts of PiMoE layers.

``StackedExperts`` holds every expert's weights in two 3-D parameters, which the Linear-based
passes do not see. :class:`Int8StackedExperts` stores them as int8 with one float scale per output
row of each expert and dequantizes in ``forward`` before the same grouped FFN: it saves memory and
file size (about 4x on the expert weights), not compute.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from pimoe.compress._modules import matches
from pimoe.moe.experts import StackedExperts
from pimoe.moe.grouped import grouped_ffn
from pimoe.moe.layer import PiMoE


def _rows_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of the last dimension: ``[..., R, C]`` -> (codes, scales ``[..., R]``)."""
    wide = weight.detach().float()
    scale = wide.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return (wide / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8StackedExperts(nn.Module):
    """A :class:`~pimoe.moe.experts.StackedExperts` with int8 weights (any activation, loop backend).

    Buffers: ``w_in_int8 [E, F_in, D]`` with ``w_in_scale [E, F_in]``, ``w_out_int8 [E, D, F]``
    with ``w_out_scale [E, D]``, and the float biases ``b_in [E, F_in]`` / ``b_out [E, D]`` when
    the source had them. ``forward(x_sorted [N, D], counts [E]) -> [N, D]`` like the source.
    """

    def __init__(self, experts: StackedExperts) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.ffn_dim = experts.num_experts, experts.d_model, experts.ffn_dim
        self.activation = experts.activation
        for name in ("w_in", "w_out"):
            codes, scale = _rows_int8(getattr(experts, name))
            self.register_buffer(f"{name}_int8", codes)
            self.register_buffer(f"{name}_scale", scale.to(getattr(experts, name).dtype))
        for name in ("b_in", "b_out"):
            bias = getattr(experts, name)
            self.register_buffer(name, None if bias is None else bias.detach().clone())

    def __len__(self) -> int:
        return self.num_experts

    def act(self, h: Tensor) -> Tensor:
        return StackedExperts.act(self, h)  # type: ignore[arg-type]  # same activations as the source

    def dequantized(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The float ``(w_in [E, F_in, D], w_out [E, D, F])`` this module computes with."""
        w_in = self.w_in_int8.to(dtype) * self.w_in_scale.to(dtype)[..., None]
        w_out = self.w_out_int8.to(dtype) * self.w_out_scale.to(dtype)[..., None]
        return w_in, w_out

    def forward(self, x_sorted: Tensor, counts: Tensor, positions: Tensor | None = None) -> Tensor:
        w_in, w_out = self.dequantized(x_sorted.dtype)
        return grouped_ffn(x_sorted, w_in, self.b_in, w_out, self.b_out, counts, self.act)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, ffn_dim={self.ffn_dim}, int8"


def quantize_experts_int8(model: nn.Module, *, skip: Iterable[str] = ()) -> list[str]:
    """Replace, in place, the ``StackedExperts`` of every PiMoE layer by :class:`Int8StackedExperts`.

    Returns the qualified names of the replaced expert modules; ``ExpertList`` experts are left
    alone (their Linears are ordinary layers for the other passes).
    """
    skip = tuple(skip)
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, PiMoE) and isinstance(module.experts, StackedExperts):
            path = f"{name}.experts" if name else "experts"
            if not matches(path, skip):
                module.experts = Int8StackedExperts(module.experts)
                replaced.append(path)
    return replaced
