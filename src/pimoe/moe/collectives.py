"""The collectives of expert parallelism: a differentiable all-to-all of token rows, errors that
name a failed peer, and a process-group start with a finite timeout."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group
DEFAULT_TIMEOUT = timedelta(minutes=2)


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layer failed: a peer rank died, hung or diverged."""


@contextmanager
def _collective(what: str, group: ProcessGroup) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:  # includes torch.distributed.DistBackendError
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise ExpertParallelError(
            f"{what} failed on rank {rank} of {world}: a peer rank probably exited, crashed or "
            f"did not reach the same collective before the process group's timeout ({err})"
        ) from err


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup
    ) -> Tensor:
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        with _collective("all_to_all of token rows", group):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        with _collective("all_to_all of gradient rows", ctx.group):
            dist.all_to_all_single(
                grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group
            )
        return grad_in, None, None, None


def all_to_all_rows(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup = None
) -> Tensor:
    """Differentiable ``all_to_all_single`` of rows with variable split sizes.

    ``x [sum(in_splits), ...]``: its first ``in_splits[0]`` rows go to rank 0, and so on.
    Returns ``[sum(out_splits), ...]``: ``out_splits[r]`` rows from rank ``r``, in rank order.
    The backward sends the gradient rows back with the splits swapped.
    """
    out: Tensor = _AllToAll.apply(x, out_splits, in_splits, group)  # type: ignore[no-untyped-call]
    return out


def init_process_group(
    backend: str | None = None,
    *,
    timeout: timedelta = DEFAULT_TIMEOUT,
    init_method: str | None = None,
    rank: int = -1,
    world_size: int = -1,
) -> torch.device:
    """Start the default process group with a finite ``timeout``; return this process's device.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (device ``cuda:LOCAL_RANK``), else
    ``"gloo"`` (CPU). ``init_method`` defaults to ``env://`` (what ``torchrun`` sets up). A peer
    that dies makes the others' next collective raise :class:`ExpertParallelError` (gloo sees the
    closed connection at once; a peer that hangs is detected after ``timeout``) instead of waiting
    forever (torch's default gloo timeout is 30 minutes).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(
                f"backend 'nccl' puts each process on its own GPU, but LOCAL_RANK is {local_rank} "
                f"and {gpus} CUDA device(s) are visible: start at most {gpus} process(es) per "
                "machine, or pass backend='gloo' to run the experts on the CPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, timeout=timeout, rank=rank, world_size=world_size
    )
    return device
