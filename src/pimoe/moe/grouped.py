"""Grouped linear: ``y[rows of e] = x[rows of e] @ W[e].T (+ b[e])`` for rows sorted by expert.

One autograd node for all experts. Its backward writes every expert's weight gradient straight
into one ``[E, O, I]`` tensor, instead of letting autograd stack per-expert gradients (what
``w.unbind(0)`` or ``w[e]`` leads to: an extra full-size copy, or a zero-filled full-size
gradient per expert). On CPU that copy was a third of the layer's forward+backward time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, splits: list[int]) -> Tensor:  # type: ignore[override]
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, n in enumerate(splits):
            if n:
                rows = slice(start, start + n)
                if bias is None:
                    torch.mm(x[rows], weight[e].t(), out=out[rows])
                else:
                    torch.addmm(bias[e], x[rows], weight[e].t(), out=out[rows])
                start += n
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, splits = inputs
        ctx.save_for_backward(x, weight)
        ctx.splits = splits
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad_out.new_empty(weight.shape[0], weight.shape[1]) if need_b and ctx.has_bias else None
        start = 0
        for e, n in enumerate(ctx.splits):
            rows = slice(start, start + n)
            if n == 0:
                if grad_w is not None:
                    grad_w[e].zero_()
                if grad_b is not None:
                    grad_b[e].zero_()
                continue
            g = grad_out[rows]
            if grad_x is not None:
                torch.mm(g, weight[e], out=grad_x[rows])
            if grad_w is not None:
                torch.mm(g.t(), x[rows], out=grad_w[e])
            if grad_b is not None:
                torch.sum(g, dim=0, out=grad_b[e])
            start += n
        return grad_x, grad_w, grad_b, None


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, counts: Tensor, use_grouped_mm: bool = False) -> Tensor:
    """Per-expert Linear on rows sorted by expert.

    Args:
        x: ``[N, I]`` rows, the first ``counts[0]`` for expert 0, and so on.
        weight: ``[E, O, I]``; bias: ``[E, O]`` or None.
        counts: ``[E]`` rows per expert (sums to ``N``).
        use_grouped_mm: run ``torch.nn.functional.grouped_mm`` (one kernel and no host sync on
            CUDA; its CPU backward fails in torch 2.13) instead of the per-expert loop.

    Returns:
        ``[N, O]``, in the autocast dtype under autocast, else in ``x``'s dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # compute in the autocast dtype, as F.linear does
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        if use_grouped_mm:
            out = F.grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
            if bias is not None:
                out = out + bias.repeat_interleave(counts, dim=0, output_size=x.shape[0])
            return out
        return _GroupedLinear.apply(x, weight, bias, counts.tolist())
