"""The dispatch's row ops in the threaded extension (C++ in :mod:`pimoe.moe.combine_source` and
:mod:`pimoe.moe.threaded_source`): the gather into a pooled row buffer, the weighted
gather-sum of the combine's forward and the gather's backward, and the combine's backward in one
pass over the rows; float32 on the CPU, used by :mod:`pimoe.moe.dispatch` once the extension is
built."""

from __future__ import annotations

import torch
from torch import Tensor

from pimoe.moe import threaded
from pimoe.moe.threaded import loaded_kernel, threaded_built


@torch.library.custom_op("pimoe::gather_rows", mutates_args=())
def gather_rows(x: Tensor, index: Tensor, inference: bool) -> Tensor:
    """``x[index]``: ``x [T, D]``, ``index [R]`` long -> ``[R, D]``, in a row buffer of the
    kernel's pool (:func:`pimoe.moe.threaded.set_row_pool`), which the next step or forward
    takes again once this one freed it (``inference``: of the pool's 64 MiB for inference)."""
    out: Tensor = loaded_kernel().gather_rows(x, index, inference)
    return out


@gather_rows.register_fake
def _(x: Tensor, index: Tensor, inference: bool) -> Tensor:
    return x.new_empty(index.shape[0], x.shape[1])


@torch.library.custom_op("pimoe::gather_sum", mutates_args=())
def gather_sum(src: Tensor, slot: Tensor, w: Tensor) -> Tensor:
    """``out[t] = sum_j w[t, j] * src[slot[t, j]]``: ``src [R, D]``, ``slot [T, k]`` long,
    ``w [T, k]``, float32 -> ``[T, D]``, without the ``[T * k, D]`` intermediate of a gather
    and a batched matmul; a slot outside ``[0, R)`` raises ``RuntimeError``."""
    out: Tensor = loaded_kernel().gather_sum(src, slot, w)
    return out


@gather_sum.register_fake
def _(src: Tensor, slot: Tensor, w: Tensor) -> Tensor:
    return src.new_empty(slot.shape[0], src.shape[1])


@torch.library.custom_op("pimoe::combine_grad_rows", mutates_args=())
def combine_grad_rows(
    grad_out: Tensor, token: Tensor, row_w: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """The combine's backward per row, float32: ``grad_y[r] = row_w[r] * grad_out[token[r]]``
    (``[R, D]``) and, unless ``y`` is empty, ``dots[r] = <y[r], grad_out[token[r]]>`` (``[R]``;
    else ``[0]``), in one pass; a token outside ``[0, T)`` raises ``RuntimeError``."""
    grad_y, dots = loaded_kernel().combine_grad_rows(grad_out, token, row_w, y)
    return grad_y, dots


@combine_grad_rows.register_fake
def _(grad_out: Tensor, token: Tensor, row_w: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    rows = token.shape[0]
    return grad_out.new_empty(rows, grad_out.shape[1]), grad_out.new_empty(rows if y.numel() else 0)


def gather_sum_usable(src: Tensor) -> bool:
    """Whether :func:`gather_rows`, :func:`gather_sum` and :func:`combine_grad_rows` run on rows
    like ``src``: float32 on the CPU and the
    extension already built (by the experts' kernel: this check never starts a build, so a
    one-thread run, which never needs the experts' kernel, keeps its gathers)."""
    built = threaded_built()
    return (
        src.dtype == torch.float32
        and src.device.type == "cpu"
        and built
        and threaded.threaded_kernel() is not None
    )
