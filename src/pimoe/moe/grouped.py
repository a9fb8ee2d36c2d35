"""Grouped expert FFN: rows sorted by expert, each expert's whole FFN run on its slice.

``y[rows of e] = act(x[rows of e] @ W_in[e].T + b_in[e]) @ W_out[e].T + b_out[e]``

It is one autograd node for all experts, for two reasons measured on CPU (docs/benchmarks.md):

- its backward writes every expert's weight gradient straight into one ``[E, O, I]`` tensor;
  letting autograd handle per-expert weight views (``w.unbind(0)`` or ``w[e]``) costs an extra
  full-size stack of the gradients, or a zero-filled full-size gradient per expert;
- the hidden activations are made one expert at a time (``[n_e, F]``, not ``[N, F]``), so
  inference never allocates the ``N x 2F`` intermediate; page-faulting such fresh large buffers
  on every call is what made an all-experts-at-once version slower than a per-expert loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _in_proj(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


class _GroupedFFN(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w_in: Tensor,
        b_in: Tensor | None,
        w_out: Tensor,
        b_out: Tensor | None,
        splits: list[int],
        act: Callable[[Tensor], Tensor],
        keep_hidden: bool,
    ) -> Tensor:
        out = x.new_empty(x.shape[0], w_out.shape[1])
        hidden: list[Tensor | None] = []
        start = 0
        for e, n in enumerate(splits):
            if n == 0:
                hidden.append(None)
                continue
            rows = slice(start, start + n)
            h = _in_proj(x[rows], w_in[e], None if b_in is None else b_in[e])  # [n, F_in]
            if b_out is None:
                torch.mm(act(h), w_out[e].t(), out=out[rows])
            else:
                torch.addmm(b_out[e], act(h), w_out[e].t(), out=out[rows])
            hidden.append(h if keep_hidden else None)
            start += n
        ctx.save_for_backward(x, w_in, w_out)
        ctx.hidden, ctx.splits, ctx.act = hidden, splits, act
        ctx.has_b_in, ctx.has_b_out = b_in is not None, b_out is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w_in, w_out = ctx.saved_tensors
        if any(h is None and n for h, n in zip(ctx.hidden, ctx.splits)):
            raise RuntimeError("grouped_ffn was run without keep_hidden; it cannot be differentiated")
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w_in = torch.empty_like(w_in) if need_w_in else None
        grad_w_out = torch.empty_like(w_out) if need_w_out else None
        grad_b_in = x.new_empty(w_in.shape[:2]) if need_b_in and ctx.has_b_in else None
        grad_b_out = x.new_empty(w_out.shape[:2]) if need_b_out and ctx.has_b_out else None
        start = 0
        for e, (n, h) in enumerate(zip(ctx.splits, ctx.hidden)):
            if n == 0:  # an expert that saw no token gets a zero gradient
                for grad in (grad_w_in, grad_w_out, grad_b_in, grad_b_out):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + n)
            g = grad_out[rows]  # [n, D]
            with torch.enable_grad():
                h_leaf = h.detach().requires_grad_()
                a = ctx.act(h_leaf)  # [n, F]
            (grad_h,) = torch.autograd.grad(a, h_leaf, torch.mm(g, w_out[e]))  # [n, F_in]
            if grad_w_out is not None:
                torch.mm(g.t(), a.detach(), out=grad_w_out[e])
            if grad_b_out is not None:
                torch.sum(g, dim=0, out=grad_b_out[e])
            if grad_w_in is not None:
                torch.mm(grad_h.t(), x[rows], out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(grad_h, dim=0, out=grad_b_in[e])
            if grad_x is not None:
                torch.mm(grad_h, w_in[e], out=grad_x[rows])
            start += n
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def grouped_ffn(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    counts: Tensor,
    act: Callable[[Tensor], Tensor],
) -> Tensor:
    """Run expert ``e``'s FFN on its rows of ``x``, for every expert.

    Args:
        x: ``[N, D]`` rows sorted by expert: the first ``counts[0]`` for expert 0, and so on.
        w_in: ``[E, F_in, D]``; b_in: ``[E, F_in]`` or None.
        w_out: ``[E, D, F]``; b_out: ``[E, D]`` or None.
        counts: ``[E]`` rows per expert (sums to ``N``).
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
    with torch.autocast(device_type, enabled=False):
        return _GroupedFFN.apply(x, w_in, b_in, w_out, b_out, counts.tolist(), act, keep_hidden)
