"""LoRA adapter modules: :class:`ExpertLoRA` (a parametrization of a fused ``[E, out, in]``
expert weight) and :class:`LoRALinear` (around a frozen ``nn.Linear``). :mod:`pimoe.moe.lora`
attaches, merges, saves and loads them."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Adapter", "ExpertLoRA", "LoRALinear"]


def _init_a(a: Tensor) -> None:
    """PEFT's default for ``A`` (kaiming-uniform with ``a=sqrt(5)``: bound ``1/sqrt(in)``)."""
    bound = 1.0 / math.sqrt(a.shape[-1])
    nn.init.uniform_(a, -bound, bound)


class ExpertLoRA(nn.Module):
    """Parametrization ``W -> W + scaling * B @ A`` of a fused ``[E, out, in]`` weight.

    Args:
        weight: the parameter adapted (its shape, dtype and device).
        r, lora_alpha, shared_a: see :class:`LoRAConfig`.
        transposed: the weight is stored ``[E, in, out]``.
    """

    def __init__(
        self,
        weight: Tensor,
        r: int,
        lora_alpha: float,
        shared_a: bool = False,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        if weight.dim() != 3:
            raise ValueError(
                f"ExpertLoRA adapts a 3-D [E, out, in] weight, got shape {tuple(weight.shape)}"
            )
        num_experts, out_features, in_features = weight.shape
        if transposed:
            out_features, in_features = in_features, out_features
        self.scaling, self.transposed, self.merged = lora_alpha / r, transposed, False
        kw: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(
            torch.empty(1 if shared_a else num_experts, r, in_features, **kw)
        )
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, **kw))
        _init_a(self.lora_A)

    def delta(self) -> Tensor:
        """``scaling * B @ A`` in the weight's stored layout: ``[E, out, in]`` (or ``[E, in, out]``)."""
        d = self.scaling * torch.matmul(self.lora_B, self.lora_A)
        return d.transpose(1, 2) if self.transposed else d

    def forward(self, weight: Tensor) -> Tensor:
        return weight if self.merged else weight + self.delta().to(weight.dtype)


class LoRALinear(nn.Module):
    """``base(x) + scaling * (x A^T) B^T`` around a frozen ``nn.Linear`` ``base``;
    ``A [r, in]``, ``B [out, r]`` (zeros at creation)."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base, self.scaling, self.merged = base, lora_alpha / r, False
        kw: dict[str, Any] = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        _init_a(self.lora_A)

    @property
    def weight(self) -> Tensor:
        """The base weight ``[out, in]`` (merged with the adapter after :meth:`merge`)."""
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> Tensor:
        """``scaling * B @ A``, ``[out, in]``."""
        return self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        y: Tensor = self.base(x)
        if self.merged:
            return y
        low = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scaling * low).to(y.dtype)


Adapter = ExpertLoRA | LoRALinear
