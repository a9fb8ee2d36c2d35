"""LoRA adapter modules: :class:`ExpertLoRA` (a parametrization of a fused ``[E, out, in]``
expert weight) and :class:`LoRALinear` (around a frozen ``nn.Linear``); :func:`low_rank_ffn`, the
adapted experts' FFN on the activations (no ``W + B A`` formed). :mod:`pimoe.moe.lora` attaches,
merges, saves and loads the adapters."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pimoe.moe.grouped import contiguous_grad, grouped_mm_usable, per_expert
from pimoe.moe.threaded import Activation

__all__ = [
    "Adapter",
    "ExpertLoRA",
    "LoRALinear",
    "adapters_train",
    "base_and_adapter",
    "low_rank_ffn",
]


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


def base_and_adapter(module: nn.Module, name: str) -> tuple[Tensor, ExpertLoRA | None]:
    """``(base weight, its adapter)`` of ``module.<name>``: the parametrization's original and its
    :class:`ExpertLoRA` (reading neither evaluates ``W + B A``), or the plain parameter and
    ``None``."""
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]  # type: ignore[index]
        if len(plist) == 1 and isinstance(plist[0], ExpertLoRA):
            original: Tensor = plist.original  # type: ignore[union-attr]
            return original, plist[0]
    weight: Tensor = module.get_parameter(name)
    return weight, None


def adapters_train(adapters: Sequence[ExpertLoRA | None]) -> bool:
    """Whether autograd will train some of ``adapters`` now (grad mode on, an ``A`` or ``B``
    requiring gradients, none merged): then :func:`low_rank_ffn` is the cheaper path."""
    present = [a for a in adapters if a is not None]
    return (
        torch.is_grad_enabled()
        and not any(a.merged for a in present)
        and any(p.requires_grad for a in present for p in (a.lora_A, a.lora_B))
    )


def _loop_projection(
    weight: Tensor, bias: Tensor | None, adapter: ExpertLoRA | None
) -> Callable[[int, Tensor], Tensor]:
    """``(e, x [n, in]) -> [n, out]``, expert ``e``'s projection
    ``x W[e]^T + b[e] + scaling (x A[e]^T) B[e]^T`` (``A[0]`` for all experts when shared)."""

    def plain(e: int, x: Tensor) -> Tensor:
        return F.linear(x, weight[e], None if bias is None else bias[e])

    if adapter is None:
        return plain
    a_of, b_of = adapter.lora_A.unbind(0), adapter.lora_B.unbind(0)  # one backward node each

    def adapted(e: int, x: Tensor) -> Tensor:
        low = F.linear(x, a_of[0 if len(a_of) == 1 else e])  # [n, r]
        return torch.addmm(plain(e, x), low, b_of[e].t(), alpha=adapter.scaling)

    return adapted


def _grouped_projection(
    x: Tensor, offsets: Tensor, weight: Tensor, adapter: ExpertLoRA | None
) -> Tensor:
    """All experts' ``x W[e]^T + scaling (x A[e]^T) B[e]^T`` in ``grouped_mm`` calls:
    ``x [N, in]`` rows grouped by expert (``offsets [E]``, cumulative), ``weight [E, out, in]``."""
    y = contiguous_grad(F.grouped_mm(x, weight.transpose(1, 2), offs=offsets))  # [N, out]
    if adapter is None:
        return y
    a = adapter.lora_A  # [E or 1, r, in]
    low = (
        torch.mm(x, a[0].t())
        if a.shape[0] == 1
        else F.grouped_mm(x, a.transpose(1, 2), offs=offsets)
    )
    update = F.grouped_mm(contiguous_grad(low), adapter.lora_B.transpose(1, 2), offs=offsets)
    return torch.add(y, contiguous_grad(update), alpha=adapter.scaling)


def _grouped_usable(
    x: Tensor, weights: Sequence[Tensor], adapters: Sequence[ExpertLoRA | None]
) -> bool:
    """``grouped_mm`` takes every operand (weights and adapter matrices: CPU, one float dtype,
    16-byte strides; see :func:`pimoe.moe.grouped.grouped_mm_usable`), outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return False
    pairs = [(weights[0], weights[1])] + [(a.lora_A, a.lora_B) for a in adapters if a is not None]
    return all(grouped_mm_usable(p, None, q, None, x) for p, q in pairs) and all(
        a is None or a.lora_A.dtype == x.dtype for a in adapters
    )


def low_rank_ffn(
    x: Tensor,
    splits: list[int],
    w_in: Tensor,
    b_in: Tensor | None,
    lora_in: ExpertLoRA | None,
    w_out: Tensor,
    b_out: Tensor | None,
    lora_out: ExpertLoRA | None,
    act: Activation,
) -> Tensor:
    """Adapted experts' FFN with the adapters on the activations, never forming ``W + s B A``:
    ``h = x W_in[e]^T + b_in[e] + s (x A_in[e]^T) B_in[e]^T``, then ``act(h)`` through the
    adapted ``W_out`` the same way. The frozen ``W`` is differentiated only with respect to its
    input, so its ``[E, out, in]`` gradient is never formed.

    Args:
        x: ``[N, D]`` rows grouped by expert, ``splits[e]`` rows for expert ``e`` (sum ``N``).
        w_in: base ``[E, F_in, D]`` (a view is fine); b_in: ``[E, F_in]`` or None.
        lora_in: the adapter of ``w_in`` (``A [E or 1, r, D]``, ``B [E, F_in, r]``) or None.
        w_out: base ``[E, D, F]``; b_out: ``[E, D]`` or None; lora_out: its adapter or None.
        act: ``[n, F_in] -> [n, F]``.

    Returns:
        ``[N, D]``. Without biases, on CPU in float32/bf16/fp16 with 16-byte strides (``r`` a
        multiple of 4 in float32), each projection is two or three ``grouped_mm`` calls for all
        experts; otherwise one expert at a time.
    """
    if b_in is None and b_out is None and _grouped_usable(x, (w_in, w_out), (lora_in, lora_out)):
        offsets = torch.tensor(splits, dtype=torch.int32, device=x.device).cumsum_(0)
        h = _grouped_projection(x.contiguous(), offsets, w_in, lora_in)
        return _grouped_projection(act(h).contiguous(), offsets, w_out, lora_out)
    project_in = _loop_projection(w_in, b_in, lora_in)
    project_out = _loop_projection(w_out, b_out, lora_out)
    outputs: list[Tensor] = []
    per_expert(splits, lambda e, rows: outputs.append(project_out(e, act(project_in(e, x[rows])))))
    return torch.cat(outputs) if outputs else x.new_zeros(x.shape[0], w_out.shape[1])
