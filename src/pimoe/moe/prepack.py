"""Expert weights prepacked by oneDNN for faster CPU inference (``pack_experts_``).

A matmul library reorders a weight into the blocked layout of its inner kernel on every call;
on ~64 rows per expert that reordering is a large part of the call. :func:`pack_experts_`
reorders every expert weight of a model's :class:`~pimoe.moe.experts.StackedExperts` once
(``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile``'s freezing and IPEX do for
``nn.Linear``) and inference without autograd then runs the experts on the packed copies in the
threaded kernel (:func:`pimoe.moe.threaded.packed_ffn_forward`, and
:func:`~pimoe.moe.threaded.packed_expert_major_forward` for many rows): the same per-expert
FFN, each thread taking whole experts, with oneDNN's matmul instead of MKL's. Results agree with
the unpacked kernel to float rounding (not bit for bit: another matmul library).

The packed copies take as much memory as the expert weights again. They are a cache of the
weights: a forward after the weights changed in place (an optimizer step, ``load_state_dict``,
``.data`` assignment) packs them anew first, so packing never returns stale results; anything
that needs gradients (training, ``requires_grad`` inputs under grad mode) runs the unpacked
kernel. :func:`unpack_experts_` drops the copies.

Packing needs CPU weights in float32 (or bfloat16 where oneDNN supports it on this CPU), torch
built with oneDNN, and the threaded kernel's C++ extension; experts adapted by LoRA
(parametrized weights) and experts with biases keep the unpacked path. Measured with
``pimoe bench moe`` (docs/benchmarks.md).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from pimoe.moe.threaded import threaded_kernel

if TYPE_CHECKING:
    from pimoe.moe.experts import StackedExperts


@dataclass
class _Packed:
    """Packed copies of one bank's weights and the state of the weights they were made from."""

    w_out: weakref.ref[Tensor]  # the bank's w_out (a lookup with another finds nothing)
    rows_hint: int
    state: tuple[object, ...]
    tensors: list[Tensor]  # w_in[e] for every e, then w_out[e]


# w_in -> its bank's packed weights (entries go with their weights)
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _state(w_in: Tensor, w_out: Tensor) -> tuple[object, ...]:
    """What identifies the weights' current values: versions bump on in-place writes, the data
    pointers change when ``.data`` is replaced."""
    return tuple(
        item for w in (w_in, w_out) for item in (w._version, w.data_ptr(), w.dtype, tuple(w.shape))
    )


def _pack(w_in: Tensor, w_out: Tensor, rows_hint: int) -> list[Tensor]:
    reorder = torch.ops.mkldnn._reorder_linear_weight
    with torch.no_grad():
        return [reorder(w[e].contiguous(), rows_hint) for w in (w_in, w_out) for e in range(len(w))]


def why_not_packable(w_in: Tensor, w_out: Tensor) -> str | None:
    """Why these ``[E, F_in, D]`` / ``[E, D, F]`` expert weights cannot be packed (None: they
    can): not on the CPU, a dtype oneDNN does not run here, torch without oneDNN, or no threaded
    kernel (no C++ compiler, or ``PIMOE_THREADED_EXPERTS=0``)."""
    if w_in.device.type != "cpu" or w_out.device.type != "cpu":
        return f"weights on {w_in.device.type}; packing is for CPU inference"
    if w_in.dtype != w_out.dtype or w_in.dtype not in (torch.float32, torch.bfloat16):
        return f"weights in {w_in.dtype}; packing runs float32 or bfloat16"
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if w_in.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN runs no bfloat16 matmul on this CPU"
    if threaded_kernel() is None:
        return "pimoe's threaded experts kernel is not available (no C++ compiler or disabled)"
    return None


def packed_experts(w_in: Tensor, w_out: Tensor) -> list[Tensor] | None:
    """The packed copies of ``w_in [E, F_in, D]`` and ``w_out [E, D, F]`` for the threaded
    kernel's ``packed_*`` entry points (``2E`` tensors: ``w_in[e]`` for every ``e``, then
    ``w_out[e]``), packed anew if the weights changed since; None if :func:`pack_experts_` did
    not pack them or under ``torch.compile``."""
    entry: _Packed | None = _PACKED.get(w_in)  # type: ignore[no-untyped-call]
    if entry is None or entry.w_out() is not w_out or torch.compiler.is_compiling():
        return None
    state = _state(w_in, w_out)
    if entry.state != state:
        if why_not_packable(w_in, w_out) is not None:
            return None  # the weights moved where packing cannot run (another device or dtype)
        entry.tensors, entry.state = _pack(w_in, w_out, entry.rows_hint), state
    return entry.tensors


def _banks(model: nn.Module) -> list[tuple[str, StackedExperts]]:
    from pimoe.moe.experts import StackedExperts  # experts imports grouped, which imports this

    return [(name, m) for name, m in model.named_modules() if isinstance(m, StackedExperts)]


def pack_experts_(model: nn.Module, rows_hint: int = 64) -> int:
    """Pack the expert weights of every ``StackedExperts`` in ``model`` (in place; returns how
    many banks were packed) for faster CPU inference; see the module docstring.

    Args:
        model: a module holding ``StackedExperts`` (a ``PiMoE`` layer, a pimoe LM, ...).
        rows_hint: the rows per expert oneDNN tunes the layout for (any row count runs).

    Raises:
        ValueError: no bank of ``model`` can be packed (the message says why for each), or
            ``rows_hint`` is not positive.
    """
    if rows_hint < 1:
        raise ValueError(f"rows_hint must be positive, got {rows_hint}")
    reasons, packed = [], 0
    for name, bank in _banks(model):
        w_in, w_out = bank.w_in, bank.w_out
        reason = why_not_packable(w_in, w_out)
        if reason is None and (bank.b_in is not None or bank.b_out is not None):
            reason = "biases (the packed kernel runs bias-free experts)"
        if reason is None and any(parametrize.is_parametrized(bank, n) for n in ("w_in", "w_out")):
            reason = "parametrized weights (LoRA adapters: merge them first)"
        if reason is not None:
            reasons.append(f"{name or type(model).__name__}: {reason}")
            continue
        tensors = _pack(w_in, w_out, rows_hint)
        _PACKED[w_in] = _Packed(weakref.ref(w_out), rows_hint, _state(w_in, w_out), tensors)
        packed += 1
    if packed == 0:
        found = "; ".join(reasons) if reasons else "it holds no StackedExperts"
        raise ValueError(f"no experts of {type(model).__name__} can be packed: {found}")
    return packed


def unpack_experts_(model: nn.Module) -> int:
    """Drop the packed copies of ``model``'s expert weights (returns how many banks had them)."""
    dropped = 0
    for _, bank in _banks(model):
        if parametrize.is_parametrized(bank, "w_in"):
            continue
        dropped += _PACKED.pop(bank.w_in, None) is not None  # type: ignore[no-untyped-call]
    return dropped
