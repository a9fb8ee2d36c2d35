"""Grouped expert FFN: rows grouped by expert, each expert's whole FFN run on its rows.

``y[rows of e] = act(x[rows of e] @ W_in[e].T + b_in[e]) @ W_out[e].T + b_out[e]``

Four execution strategies, chosen per call by a fixed rule (measured with ``pimoe bench moe``
and ``benchmarks/moe_padding_vs_grouped_mm.py``, docs/benchmarks.md):

- every expert has the same row count (the dispatcher pads experts to the largest count within
  ``StackedExperts.pad_limit``, see :mod:`pimoe.moe.dispatch`): the whole FFN is two batched
  matmuls over all experts, a handful of kernel launches whatever the number of experts. On 2
  threads ``torch.bmm`` splits the experts between the threads, where ``grouped_mm`` splits
  each small matmul, which made it faster than ``grouped_mm`` on the exact rows whenever the
  padding added at most about a quarter of the rows;
- otherwise, without biases and on more than one thread, the expert-parallel C++ kernel of
  :mod:`pimoe.moe.threaded` where it could be built: each thread runs whole experts'
  FFNs single-threaded (for pimoe's activations both matmuls and the activation in one pass
  per expert, forward and backward), so the experts are split between the threads as
  ``torch.bmm`` splits them, without padding; exact per-expert results (those of the loop below);
- otherwise ``torch.nn.functional.grouped_mm`` where :func:`grouped_mm_usable` allows it (CPU,
  float32/bf16/fp16, no biases, 16-byte strides, not under ``torch.compile``): every expert's
  matmul on its exact rows in one C++ call; autograd's backward (exact, double backward, no
  weight gradient for frozen weights);
- otherwise one expert at a time on its slice, so that inference never allocates the
  ``N x 2F`` intermediate (page-faulting such large fresh buffers on every call made an
  all-experts-at-once version slower than the per-expert loop at large sizes).

Inference of many rows skips all three: :func:`expert_major_ffn` runs each expert from gather
to weighted sum in cache-sized chunks (the dispatcher calls it through
``StackedExperts.expert_major``).

The first and last are one autograd node for all experts; its backward computes only the gradients
whose inputs require them (``ctx.needs_input_grad``: frozen experts under LoRA get no weight
gradient) and writes every expert's weight gradient straight into one ``[E, O, I]`` tensor;
letting autograd handle per-expert weight views (``w.unbind(0)`` or ``w[e]``) costs an extra
full-size stack of the gradients, or a zero-filled full-size gradient per expert
(docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pimoe.moe.prepack import (
    packed_expert_major_forward,
    packed_experts,
    packed_ffn_forward,
    packed_rows_mm,
)
from pimoe.moe.threaded import (
    FUSED_ACTIVATIONS,
    Activation,
    act_with_grad,
    expert_major_forward,
    threaded_ffn,
    threaded_pays,
    threaded_usable,
)

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Hidden activations per chunk of :func:`expert_major_ffn` (a few MiB: they stay in L2/L3).
CHUNK_HIDDEN_BYTES = 4 * 2**20
# Inference takes :func:`expert_major_ffn` once gathering all routed rows ``[R, D]`` (and as
# many output rows) would take at least EXPERT_MAJOR_MIN_BYTES (the L3 cache of the 2-core
# bench machine and glibc's largest mmap threshold: such buffers are page-faulted anew on every
# call), or their hidden activations ``[R, F_in]`` at least EXPERT_MAJOR_MIN_HIDDEN_BYTES (wide
# experts). Measured forward, quiet (``benchmarks/moe_expert_major.py``, docs/benchmarks.md):
# expert-major won at 64 experts from 2048 tokens (gathered rows 32 MiB) and at 8 experts at
# 16384 (64 MiB), and lost at 8 experts at 2048 (8 MiB of rows, 32 MiB of hidden activations:
# 0.98-1.10x dense vs 0.87-0.97x gathered).
EXPERT_MAJOR_MIN_BYTES = 32 * 2**20
EXPERT_MAJOR_MIN_HIDDEN_BYTES = 128 * 2**20


def grouped_mm_usable(
    w_in: Tensor, b_in: Tensor | None, w_out: Tensor, b_out: Tensor | None, x: Tensor | None = None
) -> bool:
    """Whether :func:`grouped_ffn` runs ``torch.nn.functional.grouped_mm`` on these operands
    (``x`` None: on any contiguous input of the weights' dtype): CPU tensors of one
    float32/bf16/fp16 dtype, no biases, every stride and address a multiple of 16 bytes (the CPU
    kernel's requirement), outside ``torch.compile``."""
    if b_in is not None or b_out is not None or not hasattr(F, "grouped_mm"):
        return False
    if torch.compiler.is_compiling() or w_in.dtype not in _GROUPED_MM_DTYPES:
        return False
    for t in (w_in, w_out) if x is None else (w_in, w_out, x):
        if t.device.type != "cpu" or t.dtype != w_in.dtype or t.data_ptr() % 16:
            return False
        size = t.element_size()
        if any(st * size % 16 for st, n in zip(t.stride(), t.shape) if st != 1 and n > 1):
            return False
    return True


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``grouped_mm``'s CPU
    backward rejects the stride-0 gradient of, e.g., ``y.sum()``."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _grouped_mm_ffn(
    x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], act: Activation
) -> Tensor:
    """``grouped_mm`` path of :func:`grouped_ffn` (no biases; ``x`` rows exactly ``sum(counts)``)."""
    offsets = torch.tensor(counts, dtype=torch.int32).cumsum_(0)
    h = F.grouped_mm(x, w_in.transpose(1, 2), offs=offsets)  # [N, F_in]
    return contiguous_grad(F.grouped_mm(act(h).contiguous(), w_out.transpose(1, 2), offs=offsets))


def contiguous_grad(y: Tensor) -> Tensor:
    """``y`` unchanged, with its incoming gradient made contiguous in the backward (what
    ``grouped_mm``'s CPU backward needs)."""
    out: Tensor = _ContiguousGrad.apply(y)  # type: ignore[no-untyped-call]
    return out


def _in_proj(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def is_uniform(splits: list[int]) -> bool:
    """Whether every expert has the same, nonzero row count (the batched-matmul case)."""
    return len(splits) > 1 and splits[0] > 0 and splits.count(splits[0]) == len(splits)


def per_expert(splits: list[int], run: Callable[[int, slice], None]) -> None:
    """Call ``run(e, rows)`` for each expert ``e`` with rows, ``rows`` its slice of the buffer."""
    start = 0
    for e, n in enumerate(splits):
        if n:
            run(e, slice(start, start + n))
            start += n


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w_in: Tensor,
        b_in: Tensor | None,
        w_out: Tensor,
        b_out: Tensor | None,
        splits: list[int],
        act: Activation,
        keep_hidden: bool,
    ) -> Tensor:
        out = x.new_empty(x.shape[0], w_out.shape[1])
        hidden: list[Tensor | None] = []
        if is_uniform(splits):
            num_experts, rows = len(splits), splits[0]
            xb = x.view(num_experts, rows, -1)
            wt_in = w_in.transpose(1, 2)
            h = (
                torch.bmm(xb, wt_in)
                if b_in is None
                else torch.baddbmm(b_in.unsqueeze(1), xb, wt_in)
            )
            a = act(h.view(num_experts * rows, -1)).view(num_experts, rows, -1)
            yb, wt_out = out.view(num_experts, rows, -1), w_out.transpose(1, 2)
            if b_out is None:
                torch.bmm(a, wt_out, out=yb)
            else:
                torch.baddbmm(b_out.unsqueeze(1), a, wt_out, out=yb)
            hidden.append(h if keep_hidden else None)
        else:

            def run(e: int, rows: slice) -> None:
                h = _in_proj(x[rows], w_in[e], None if b_in is None else b_in[e])  # [n, F_in]
                if b_out is None:
                    torch.mm(act(h), w_out[e].t(), out=out[rows])
                else:
                    torch.addmm(b_out[e], act(h), w_out[e].t(), out=out[rows])
                hidden.append(h if keep_hidden else None)

            per_expert(splits, run)
        ctx.save_for_backward(x, w_in, w_out)
        ctx.hidden, ctx.splits, ctx.act = hidden, splits, act
        ctx.has_b_in, ctx.has_b_out = b_in is not None, b_out is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w_in, w_out = ctx.saved_tensors
        if any(h is None for h in ctx.hidden):
            raise RuntimeError(
                "grouped_ffn was run without keep_hidden; it cannot be differentiated"
            )
        need = ctx.needs_input_grad[:5]
        grads = (
            _batched_backward(ctx, x, w_in, w_out, grad_out, need)
            if is_uniform(ctx.splits)
            else (_loop_backward(ctx, x, w_in, w_out, grad_out, need))
        )
        return (*grads, None, None, None)


def _batched_backward(
    ctx: Any, x: Tensor, w_in: Tensor, w_out: Tensor, grad_out: Tensor, need: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """Backward of the uniform-splits case: a few batched matmuls over all experts."""
    num_experts, rows = len(ctx.splits), ctx.splits[0]
    (h,) = ctx.hidden  # [E, C, F_in]
    g = grad_out.view(num_experts, rows, -1)  # [E, C, D]
    grad_a = torch.bmm(g, w_out)  # [E, C, F]
    a, grad_h = act_with_grad(
        ctx.act, h.view(num_experts * rows, -1), grad_a.view(num_experts * rows, -1)
    )
    a, grad_h = a.view(num_experts, rows, -1), grad_h.view(num_experts, rows, -1)
    grad_x = torch.bmm(grad_h, w_in).view_as(x) if need[0] else None
    grad_w_in = (
        torch.bmm(grad_h.transpose(1, 2), x.view(num_experts, rows, -1)) if need[1] else None
    )
    grad_b_in = grad_h.sum(dim=1) if need[2] and ctx.has_b_in else None
    grad_w_out = torch.bmm(g.transpose(1, 2), a) if need[3] else None
    grad_b_out = g.sum(dim=1) if need[4] and ctx.has_b_out else None
    return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out


def _loop_backward(
    ctx: Any, x: Tensor, w_in: Tensor, w_out: Tensor, grad_out: Tensor, need: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """Backward one expert at a time; an expert that saw no token gets a zero gradient."""
    grad_x = torch.empty_like(x) if need[0] else None
    grad_w_in = torch.empty_like(w_in) if need[1] else None
    grad_w_out = torch.empty_like(w_out) if need[3] else None
    grad_b_in = x.new_empty(w_in.shape[:2]) if need[2] and ctx.has_b_in else None
    grad_b_out = x.new_empty(w_out.shape[:2]) if need[4] and ctx.has_b_out else None
    hidden = iter(ctx.hidden)
    start = 0
    for e, n in enumerate(ctx.splits):
        if n == 0:
            for grad in (grad_w_in, grad_w_out, grad_b_in, grad_b_out):
                if grad is not None:
                    grad[e].zero_()
            continue
        rows = slice(start, start + n)
        g = grad_out[rows]  # [n, D]
        a, grad_h = act_with_grad(ctx.act, next(hidden), torch.mm(g, w_out[e]))  # [n, F], [n, F_in]
        if grad_w_out is not None:
            torch.mm(g.t(), a, out=grad_w_out[e])
        if grad_b_out is not None:
            torch.sum(g, dim=0, out=grad_b_out[e])
        if grad_w_in is not None:
            torch.mm(grad_h.t(), x[rows], out=grad_w_in[e])
        if grad_b_in is not None:
            torch.sum(grad_h, dim=0, out=grad_b_in[e])
        if grad_x is not None:
            torch.mm(grad_h, w_in[e], out=grad_x[rows])
        start += n
    return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out


def _packed(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    act: Activation,
) -> list[Tensor] | None:
    """The weights prepacked by :func:`pimoe.moe.prepack.pack_experts_`, where the packed
    kernel can run them on ``x`` (no biases, ``x`` in the weights' dtype); else None."""
    if b_in is not None or b_out is not None or x.dtype != w_in.dtype:
        return None
    return packed_experts(w_in, w_out)


def _packed_ffn(x: Tensor, packed: list[Tensor], splits: list[int], act: Activation) -> Tensor:
    """Inference on packed weights (``packed``: ``w_in[e]`` for every expert, then
    ``w_out[e]``): one pass per expert for pimoe's activations, else two per-matmul passes with
    ``act`` between them."""
    name = FUSED_ACTIVATIONS.get(act)
    if name is not None:
        return packed_ffn_forward(x.contiguous(), packed, splits, name)
    experts = len(splits)
    h = packed_rows_mm(x, packed[:experts], splits)  # [N, F_in]
    return packed_rows_mm(act(h), packed[experts:], splits)


def grouped_ffn(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    counts: Tensor | list[int],
    act: Activation,
) -> Tensor:
    """Run expert ``e``'s FFN on its rows of ``x``, for every expert.

    Args:
        x: ``[N, D]`` rows grouped by expert: the first ``counts[0]`` for expert 0, and so on.
        w_in: ``[E, F_in, D]``; b_in: ``[E, F_in]`` or None.
        w_out: ``[E, D, F]``; b_out: ``[E, D]`` or None.
        counts: ``[E]`` rows per expert (sums to ``N``), a tensor or a list.
        act: ``[n, F_in] -> [n, F]`` (e.g. SwiGLU's ``silu(gate) * up``).

    Returns:
        ``[N, D]``, in the autocast dtype under autocast, else in ``x``'s dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # compute in the autocast dtype, as F.linear does
        dtype = torch.get_autocast_dtype(device_type)
        x, w_in, w_out = x.to(dtype), w_in.to(dtype), w_out.to(dtype)
        b_in = b_in.to(dtype) if b_in is not None else None
        b_out = b_out.to(dtype) if b_out is not None else None
    tensors = [t for t in (x, w_in, b_in, w_out, b_out) if t is not None]
    keep_hidden = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    splits = counts if isinstance(counts, list) else [int(n) for n in counts.tolist()]
    packed = None if keep_hidden else _packed(x, w_in, b_in, w_out, b_out, act)
    if packed is not None:
        return _packed_ffn(x, packed, splits, act)
    if not is_uniform(splits) and b_in is None and b_out is None:
        x = x.contiguous()
        with torch.autocast(device_type, enabled=False):
            if threaded_pays(splits) and threaded_usable(x, w_in, w_out):
                return threaded_ffn(x, w_in, w_out, splits, act, keep_hidden)
            if grouped_mm_usable(w_in, b_in, w_out, b_out, x):
                return _grouped_mm_ffn(x, w_in, w_out, splits, act)
    with torch.autocast(device_type, enabled=False):
        out: Tensor = _GroupedFFN.apply(x, w_in, b_in, w_out, b_out, splits, act, keep_hidden)  # type: ignore[no-untyped-call]
    return out


def expert_major_ffn(
    x: Tensor,
    token_rows: Tensor,
    row_weights: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    splits: list[int],
    act: Activation,
) -> Tensor:
    """Forward-only routed FFN run expert by expert, from gather to weighted sum:
    ``out[token_rows[r]] += row_weights[r] * FFN_e(x[token_rows[r]])`` for the rows ``r`` of
    each expert ``e``, in chunks of at most :data:`CHUNK_HIDDEN_BYTES` of hidden activations.

    Nothing of size ``rows x F`` is allocated: every chunk's input rows, hidden activations and
    outputs stay in the CPU caches and the expert's weights are read once. At 2048-16384 tokens
    this beat gathering all rows first (``pimoe bench moe``, docs/benchmarks.md). Without biases,
    for pimoe's activations and on several threads it runs in the threaded kernel
    (:func:`pimoe.moe.threaded.expert_major_forward`: whole experts per thread, one ``[T, D]``
    sum per extra thread); otherwise as a Python loop of per-expert ops.

    Args:
        x: ``[T, D]`` tokens; token_rows: ``[R]`` long, the token of each routed row, grouped by
            expert (expert 0's first); row_weights: ``[R]`` combine weight of each row.
        w_in, b_in, w_out, b_out, act: as in :func:`grouped_ffn`.
        splits: rows per expert (sums to ``R``).

    Returns:
        ``[T, D]`` in ``x``'s dtype (0 for a token with no row).
    """
    chunk = max(1, CHUNK_HIDDEN_BYTES // (w_in.shape[1] * w_in.element_size()))
    name = FUSED_ACTIVATIONS.get(act)
    packed = _packed(x, w_in, b_in, w_out, b_out, act)
    if packed is not None and name is not None:
        return packed_expert_major_forward(
            x.contiguous(), token_rows, row_weights, packed, splits, name, chunk
        )
    if b_in is None and b_out is None and name is not None and threaded_usable(x, w_in, w_out):
        fused: Tensor = expert_major_forward(
            x, token_rows, row_weights, w_in, w_out, splits, name, chunk
        )
        return fused
    out = torch.zeros_like(x)
    scale = row_weights.to(x.dtype).unsqueeze(1)  # [R, 1]

    def run(e: int, rows: slice) -> None:
        for start in range(rows.start, rows.stop, chunk):
            part = slice(start, min(start + chunk, rows.stop))
            tokens = token_rows[part]
            h = _in_proj(x.index_select(0, tokens), w_in[e], None if b_in is None else b_in[e])
            y = (
                torch.mm(act(h), w_out[e].t())
                if b_out is None
                else torch.addmm(b_out[e], act(h), w_out[e].t())
            )
            # index_add_: 1.2-1.4x faster than index_put_ on 2 threads, quiet (E64, 2048 tokens)
            out.index_add_(0, tokens, y.mul_(scale[part]))

    per_expert(splits, run)
    return out
