"""Expert weights prepacked by oneDNN for faster CPU inference (``pack_experts_``).

A matmul library reorders a weight into the blocked layout of its inner kernel on every call;
on ~64 rows per expert that reordering is a large part of the call. :func:`pack_experts_`
reorders every expert weight of a model's expert banks once
(``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile``'s freezing and IPEX do for
``nn.Linear``) and inference without autograd then runs the experts on the packed copies in the
threaded kernel (:func:`packed_ffn_forward`,
:func:`packed_expert_major_forward` for many rows, and
:func:`packed_rows_mm` around an activation given as a Python function):
the same per-expert FFN, each thread taking whole experts, with oneDNN's matmul instead of
MKL's. Expert banks are :class:`~pimoe.moe.experts.StackedExperts` and, once :mod:`pimoe.hf` is
imported, transformers' experts modules running ``experts_implementation="pimoe"``
(:func:`register_packable` adds other kinds). Results agree with
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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from pimoe.moe.threaded import loaded_kernel, threaded_kernel


def packed_ffn_forward(x: Tensor, packed: list[Tensor], splits: list[int], act: str) -> Tensor:
    """:func:`ffn_forward`'s ``y`` (inference) on expert weights prepacked by oneDNN
    (``packed``: ``w_in[e]`` for every expert, then ``w_out[e]``, from
    :func:`pimoe.moe.prepack.packed_experts`); ``x [N, D]`` rows grouped by expert -> ``[N, D]``."""
    out: Tensor = loaded_kernel().packed_ffn_forward(x, packed, splits, act)
    return out


def packed_rows_mm(a: Tensor, packed: list[Tensor], splits: list[int]) -> Tensor:
    """:func:`rows_mm` on weights prepacked by oneDNN: ``out[rows of e] = a[rows of e] @ W_e.T``
    for ``a [N, K]`` rows grouped by expert and ``packed[e]`` the packed ``W_e [M, K]`` ->
    ``[N, M]``."""
    out: Tensor = loaded_kernel().packed_rows_mm(a, packed, splits)
    return out


def packed_expert_major_forward(
    x: Tensor,
    token_rows: Tensor,
    row_weights: Tensor,
    packed: list[Tensor],
    splits: list[int],
    act: str,
    chunk_rows: int,
) -> Tensor:
    """:func:`expert_major_forward` on expert weights prepacked by oneDNN (``packed`` as in
    :func:`packed_ffn_forward`) -> ``[T, D]``."""
    out: Tensor = loaded_kernel().packed_expert_major_forward(
        x, token_rows, row_weights, packed, splits, act, chunk_rows
    )
    return out


@dataclass
class _Packed:
    """Packed copies of one bank's weights and the state of the weights they were made from."""

    w_out: weakref.ref[Tensor]  # the bank's stored w_out (a lookup with another finds nothing)
    rows_hint: int
    state: tuple[object, ...]
    tensors: list[Tensor]  # w_in[e] for every e, then w_out[e]


# stored w_in (the parameter behind a view) -> its bank's packed weights (entries go with it)
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
    entry: _Packed | None = _PACKED.get(_key(w_in))  # type: ignore[no-untyped-call]
    if entry is None or entry.w_out() is not _key(w_out) or torch.compiler.is_compiling():
        return None
    state = _state(w_in, w_out)
    if entry.state != state:
        if why_not_packable(w_in, w_out) is not None:
            return None  # the weights moved where packing cannot run (another device or dtype)
        entry.tensors, entry.state = _pack(w_in, w_out, entry.rows_hint), state
    return entry.tensors


ExpertsWeights = Callable[[nn.Module], "tuple[Tensor, Tensor] | str | None"]
"""Reads a module as an expert bank: its ``(w_in [E, F_in, D], w_out [E, D, F])`` exactly as
the kernel receives them (views allowed), a reason it cannot be packed, or None when the module
is not an expert bank of this kind."""
_FINDERS: list[ExpertsWeights] = []


def register_packable(find: ExpertsWeights) -> None:
    """Let :func:`pack_experts_` pack another kind of expert bank (idempotent); ``find`` is an
    :data:`ExpertsWeights`. :mod:`pimoe.hf` registers transformers' experts modules."""
    if find not in _FINDERS:
        _FINDERS.append(find)


def _stacked_experts(module: nn.Module) -> tuple[Tensor, Tensor] | str | None:
    from pimoe.moe.experts import StackedExperts  # experts imports grouped, which imports this

    if not isinstance(module, StackedExperts):
        return None
    if module.b_in is not None or module.b_out is not None:
        return "biases (the packed kernel runs bias-free experts)"
    if any(parametrize.is_parametrized(module, n) for n in ("w_in", "w_out")):
        return "parametrized weights (LoRA adapters: merge them first)"
    return module.w_in, module.w_out


register_packable(_stacked_experts)


def _key(w: Tensor) -> Tensor:
    """The tensor a packed entry is kept under: the stored parameter behind a view."""
    return w if w._base is None else w._base


def _banks(model: nn.Module) -> list[tuple[str, tuple[Tensor, Tensor] | str]]:
    """Every expert bank in ``model``: its name and weights, or why it cannot be packed."""
    banks = []
    for name, module in model.named_modules():
        for find in _FINDERS:
            found = find(module)
            if found is not None:
                banks.append((name or type(model).__name__, found))
                break
    return banks


def pack_experts_(model: nn.Module, rows_hint: int = 64) -> int:
    """Pack the expert weights of every expert bank in ``model`` (in place; returns how many
    banks were packed) for faster CPU inference; see the module docstring.

    Args:
        model: a module holding ``StackedExperts`` (a ``PiMoE`` layer, a pimoe LM, an upcycled
            HF model) or, with :mod:`pimoe.hf` imported, transformers experts modules run with
            ``experts_implementation="pimoe"``.
        rows_hint: the rows per expert oneDNN tunes the layout for (any row count runs).

    Raises:
        ValueError: no bank of ``model`` can be packed (the message says why for each), or
            ``rows_hint`` is not positive.
    """
    if rows_hint < 1:
        raise ValueError(f"rows_hint must be positive, got {rows_hint}")
    reasons, packed = [], 0
    for name, found in _banks(model):
        reason = found if isinstance(found, str) else why_not_packable(*found)
        if reason is not None or isinstance(found, str):
            reasons.append(f"{name}: {reason}")
            continue
        w_in, w_out = found
        tensors = _pack(w_in, w_out, rows_hint)
        _PACKED[_key(w_in)] = _Packed(
            weakref.ref(_key(w_out)), rows_hint, _state(w_in, w_out), tensors
        )
        packed += 1
    if packed == 0:
        why = "; ".join(reasons) if reasons else "it holds no expert bank"
        raise ValueError(f"no experts of {type(model).__name__} can be packed: {why}")
    return packed


def unpack_experts_(model: nn.Module) -> int:
    """Drop the packed copies of ``model``'s expert weights (returns how many banks had them)."""
    dropped = 0
    for _, found in _banks(model):
        if not isinstance(found, str):
            dropped += _PACKED.pop(_key(found[0]), None) is not None  # type: ignore[no-untyped-call]
    return dropped
