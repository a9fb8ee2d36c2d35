"""The experts-backend registry: how a bank of stacked FFN experts is executed.

A backend is a function ``fn(experts, x_sorted, counts, positions) -> y_sorted``:

- ``experts``: the :class:`~pimoe.moe.experts.StackedExperts` (weights ``w_in [E, F_in, D]``,
  ``w_out [E, D, F]``, optional ``b_in [E, F_in]``, ``b_out [E, D]``, ``experts.act``);
- ``x_sorted [N, D]``: the routed rows, expert 0's first (``counts[e]`` rows for expert ``e``);
- ``counts [E]`` long; ``positions [N]`` long or ``None``: the token position of each row (an
  index into the layer's flattened tokens, or what the caller passed as positions);
- returns ``[N, D]`` in the same order.

Built-ins: ``"loop"`` (:func:`pimoe.moe.grouped.grouped_ffn`, the CPU default: batched matmuls
over experts padded to equal row counts, else ``grouped_mm`` on the exact rows where usable, else
one expert at a time), ``"grouped_mm"`` (``torch.nn.functional.grouped_mm``, one kernel; for CUDA bf16), and
``"auto"`` (grouped_mm for bf16 weights on CUDA when torch has it, else loop). Register your own
with :func:`register_experts_backend` and select it with ``MoEConfig(backend=name)``; the same
grouped kernel is registered with transformers by :mod:`pimoe.hf`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pimoe.moe.grouped import contiguous_grad, grouped_ffn

if TYPE_CHECKING:
    from pimoe.moe.experts import StackedExperts

ExpertsBackend = Callable[["StackedExperts", Tensor, Tensor, "Tensor | None"], Tensor]
_BACKENDS: dict[str, ExpertsBackend] = {}


def register_experts_backend(name: str, fn: ExpertsBackend, *, overwrite: bool = False) -> None:
    """Make ``fn`` selectable as ``MoEConfig(backend=name)``."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"backend {name!r} must be callable, got {type(fn).__name__}")
    if name in _BACKENDS and not overwrite and _BACKENDS[name] is not fn:
        raise ValueError(f"experts backend {name!r} is already registered (pass overwrite=True)")
    _BACKENDS[name] = fn


def experts_backends() -> list[str]:
    """Names accepted by ``MoEConfig(backend=...)``."""
    return ["auto", *sorted(_BACKENDS)]


def check_backend(name: str) -> None:
    """``ValueError`` naming the choices if ``name`` is not a usable backend."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown experts backend {name!r}; choose from {experts_backends()}")
    if name == "grouped_mm" and not hasattr(F, "grouped_mm"):
        raise ValueError("backend='grouped_mm' needs torch.nn.functional.grouped_mm (torch>=2.9)")


def auto_backend(weight: Tensor) -> str:
    """What ``"auto"`` runs for expert weights like ``weight``: ``"grouped_mm"`` for bf16 on CUDA
    when torch has it, else ``"loop"``."""
    use_grouped_mm = weight.is_cuda and hasattr(F, "grouped_mm") and weight.dtype == torch.bfloat16
    return "grouped_mm" if use_grouped_mm else "loop"


def get_experts_backend(name: str, weight: Tensor) -> ExpertsBackend:
    """The backend function for ``name``; ``"auto"`` picks by the weights' device and dtype."""
    if name == "auto":
        name = auto_backend(weight)
    check_backend(name)
    return _BACKENDS[name]


def _loop(
    experts: StackedExperts, x_sorted: Tensor, counts: Tensor, positions: Tensor | None
) -> Tensor:
    return grouped_ffn(
        x_sorted,
        experts.w_in,
        experts.b_in,
        experts.w_out,
        experts.b_out,
        counts,
        experts.activation_fn,
    )


def grouped_mm_ffn(
    x_sorted: Tensor,
    counts: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    """Every expert's FFN on its rows with two ``torch.nn.functional.grouped_mm`` calls.

    ``x_sorted [N, D]`` grouped by expert (``counts [E]`` long on ``x``'s device, summing to
    ``N``), ``w_in [E, F_in, D]``, ``b_in [E, F_in]`` or None, ``w_out [E, D, F]``, ``b_out [E, D]``
    or None, ``act: [N, F_in] -> [N, F]``; returns ``[N, D]``. No host sync.
    """
    offsets = counts.cumsum(0).to(torch.int32)
    h = F.grouped_mm(x_sorted, w_in.transpose(-2, -1), offs=offsets)  # [N, F_in]
    if b_in is not None:
        h = h + b_in.repeat_interleave(counts, dim=0, output_size=x_sorted.shape[0])
    y = F.grouped_mm(act(h), w_out.transpose(-2, -1), offs=offsets)  # [N, D]
    if b_out is not None:
        y = y + b_out.repeat_interleave(counts, dim=0, output_size=x_sorted.shape[0])
    return contiguous_grad(y)


def _grouped_mm(
    experts: StackedExperts, x_sorted: Tensor, counts: Tensor, positions: Tensor | None
) -> Tensor:
    return grouped_mm_ffn(
        x_sorted, counts, experts.w_in, experts.b_in, experts.w_out, experts.b_out, experts.act
    )


register_experts_backend("loop", _loop)
register_experts_backend("grouped_mm", _grouped_mm)
