"""Expert parallelism over ``torch.distributed``: each rank owns a contiguous shard of the experts.

Every rank keeps its own tokens and a replica of the router (and shared experts); expert ``e``
lives on rank ``e // (E / W)`` only. One forward, on every rank of the group at once:

1. route the local tokens ``[T, D]`` and sort the executed assignments by expert
   (:func:`pimoe.moe.dispatch.sort_assignments`); shards are contiguous, so this also sorts
   them by destination rank;
2. all-to-all of the per-expert counts ``[E]``: rank ``r`` learns how many rows every rank sends
   to each of its local experts;
3. ``all_to_all_single`` of the token rows with those variable split sizes, regroup the received
   rows by local expert and run the local experts backend once;
4. a second ``all_to_all_single`` sends the results back (the reverse splits), then the weighted
   scatter-add of :func:`pimoe.moe.dispatch.combine`, as in the single-process layer.

The exchanges are differentiable (:func:`all_to_all_rows`: the backward is the reverse
all-to-all), so expert weights get their full gradient (from every rank's tokens) on their owning
rank. Replicated parameters (router, shared experts, the rest of the model) get per-rank partial
gradients: reduce them with :func:`allreduce_replicated_grads`. Every rank must call forward and
backward the same number of times, in the same order (they are collectives).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pimoe.moe.dispatch import combine, sort_assignments
from pimoe.moe.experts import ExpertList, StackedExperts
from pimoe.moe.layer import MoEOutput, PiMoE
from pimoe.moe.router import Router
from pimoe.moe.stats import RoutingStats

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group
DEFAULT_TIMEOUT = timedelta(minutes=2)
_LIST_KEY = re.compile(r"^experts\.experts\.(\d+)\.(.+)$")  # ExpertList: experts.experts.<e>.<param>


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
    def forward(  # type: ignore[override]
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
            dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup = None) -> Tensor:
    """Differentiable ``all_to_all_single`` of rows with variable split sizes.

    ``x [sum(in_splits), ...]``: its first ``in_splits[0]`` rows go to rank 0, and so on.
    Returns ``[sum(out_splits), ...]``: ``out_splits[r]`` rows from rank ``r``, in rank order.
    The backward sends the gradient rows back with the splits swapped.
    """
    return _AllToAll.apply(x, out_splits, in_splits, group)


def expert_shard(num_experts: int, rank: int, world_size: int) -> range:
    """The experts owned by ``rank``: a contiguous ``range`` of ``E / W`` experts."""
    if world_size < 1 or num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the world size {world_size}; expert "
            "parallelism gives every rank the same number of experts"
        )
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def shard_state_dict(full: Mapping[str, Tensor], num_experts: int, rank: int, world_size: int) -> dict[str, Tensor]:
    """The part of a single-process ``PiMoE`` state dict that ``rank`` holds.

    Stacked expert tensors (``experts.w_in [E, ...]`` etc.) are sliced along dim 0; ``ExpertList``
    keys ``experts.experts.<e>.*`` are kept for owned experts and renumbered from 0; other keys
    (router, shared experts) are replicated.
    """
    shard = expert_shard(num_experts, rank, world_size)
    out: dict[str, Tensor] = {}
    for key, value in full.items():
        match = _LIST_KEY.match(key)
        if match:
            e = int(match.group(1))
            if e in shard:
                out[f"experts.experts.{e - shard.start}.{match.group(2)}"] = value
        elif key.startswith("experts."):
            if value.shape[0] != num_experts:
                raise ValueError(f"{key} has {value.shape[0]} experts on dim 0, expected {num_experts}")
            out[key] = value[shard.start : shard.stop]
        else:
            out[key] = value
    return out


def unshard_state_dict(shards: list[Mapping[str, Tensor]], num_experts: int) -> dict[str, Tensor]:
    """Inverse of :func:`shard_state_dict`: ``shards[r]`` is rank ``r``'s state dict."""
    per_rank = len(expert_shard(num_experts, 0, len(shards)))
    out: dict[str, Tensor] = {}
    for rank, shard in enumerate(shards):
        for key, value in shard.items():
            match = _LIST_KEY.match(key)
            if match:
                out[f"experts.experts.{int(match.group(1)) + rank * per_rank}.{match.group(2)}"] = value
            elif key.startswith("experts."):
                out[key] = value if rank == 0 else torch.cat([out[key], value])
            elif rank == 0:
                out[key] = value
    return out


class ExpertParallelMoE(MoEOutput):
    """A :class:`PiMoE` layer whose experts are sharded over the ranks of a process group.

    Input ``[..., D]`` (each rank its own tokens), output of the same shape; the result equals the
    single-process layer applied to the concatenation of all ranks' tokens (dropless token-choice
    routing; a capacity limit or expert-choice routing is computed per rank on its local tokens).

    Build it with :meth:`from_layer` on every rank from the same layer (same seed or weights).
    ``aux_loss``, ``z_loss`` and ``last_stats`` describe this rank's tokens; ``last_send_splits``
    / ``last_recv_splits`` (``[W]`` rows) describe the last exchange.

    Args:
        router: the replicated router (``E`` experts).
        experts: this rank's experts backend (``StackedExperts`` or ``ExpertList`` of ``E / W``).
        num_experts: ``E``.
        shared, shared_gate: replicated shared experts and their gate, or None.
        group: the process group (None: the default group).
    """

    def __init__(
        self,
        router: Router,
        experts: nn.Module,
        num_experts: int,
        *,
        shared: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        group: ProcessGroup = None,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialized process group (see init_process_group)")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.shard = expert_shard(num_experts, self.rank, self.world_size)
        held = len(experts)  # type: ignore[arg-type]
        if held != len(self.shard):
            raise ValueError(f"rank {self.rank} should hold {len(self.shard)} experts, got {held}")
        self.d_model, self.num_experts, self.top_k = router.d_model, num_experts, router.top_k
        self.router, self.experts, self.shared, self.shared_gate = router, experts, shared, shared_gate
        self.aux_loss: Tensor = torch.zeros(())
        self.z_loss: Tensor = torch.zeros(())
        self.last_stats: RoutingStats | None = None
        self.last_send_splits: list[int] = []
        self.last_recv_splits: list[int] = []

    @classmethod
    def from_layer(cls, layer: PiMoE, group: ProcessGroup = None) -> ExpertParallelMoE:
        """Copy ``layer``'s router and shared experts, and this rank's shard of its experts."""
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialized process group (see init_process_group)")
        shard = expert_shard(layer.num_experts, dist.get_rank(group), dist.get_world_size(group))
        bank = layer.experts
        experts: nn.Module
        if isinstance(bank, StackedExperts):
            experts = StackedExperts(
                len(shard), bank.d_model, bank.ffn_dim, bank.activation, bank.b_in is not None, bank.backend
            ).to(bank.w_in.device, bank.w_in.dtype)
            with torch.no_grad():
                for name, param in experts.named_parameters():
                    param.copy_(getattr(bank, name)[shard.start : shard.stop])
        elif isinstance(bank, ExpertList):
            experts = ExpertList([copy.deepcopy(bank.experts[e]) for e in shard])
        else:
            raise TypeError(f"cannot shard experts of type {type(bank).__name__}")
        return cls(
            copy.deepcopy(layer.router), experts, layer.num_experts,
            shared=copy.deepcopy(layer.shared), shared_gate=copy.deepcopy(layer.shared_gate), group=group,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``; a collective: every rank of the group must call it."""
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input [..., {self.d_model}], got shape {tuple(x.shape)}")
        shape, world, local = x.shape, self.world_size, len(self.shard)
        tokens = x.reshape(-1, self.d_model)  # [T, D]
        if torch.is_grad_enabled() and not tokens.requires_grad:
            # Keep the token exchange in the graph, so that every rank runs the same backward
            # collectives even if only some ranks' inputs need a gradient.
            tokens = tokens.detach().requires_grad_()
        route = self.router(tokens)
        token_sorted, weight_sorted, counts = sort_assignments(route, self.num_experts)  # [N], [N], [E]
        recv_counts = torch.empty_like(counts)
        with _collective("all_to_all of expert counts", self.group):
            dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(world, local)  # [W, E/W]: rows from rank r for local expert e
        send_splits = counts.view(world, local).sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        received = all_to_all_rows(tokens.index_select(0, token_sorted), recv_splits, send_splits, self.group)  # [M, D]
        y = self._run_local_experts(received, recv_counts)  # [M, D], in the received order
        y = all_to_all_rows(y, send_splits, recv_splits, self.group)  # [N, D], in token_sorted order
        out = self._finish(tokens, combine(tokens, y, token_sorted, weight_sorted), route, counts)  # [T, D]
        self.last_send_splits, self.last_recv_splits = send_splits, recv_splits
        return out.reshape(shape)

    def _run_local_experts(self, received: Tensor, recv_counts: Tensor) -> Tensor:
        """``received [M, D]`` grouped by source rank then local expert, ``recv_counts [W, E/W]``
        -> ``[M, D]`` in the same order; the experts backend sees the rows grouped by expert."""
        world, local = recv_counts.shape
        if world == 1 or local == 1:  # already grouped by expert
            return self.experts(received, recv_counts.sum(dim=0))
        expert_of_row = torch.arange(local, device=received.device).repeat(world)  # [W * E/W]
        expert_of_row = expert_of_row.repeat_interleave(recv_counts.reshape(-1))  # [M]
        order = expert_of_row.argsort(stable=True)  # [M]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return self.experts(received.index_select(0, order), recv_counts.sum(dim=0)).index_select(0, inverse)

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters owned by this rank only (the expert shard); all others are replicated."""
        return list(self.experts.parameters())

    def gather_full_state_dict(self) -> dict[str, Tensor] | None:
        """Reassemble the single-process ``PiMoE`` state dict (CPU tensors) on the group's rank 0.

        A collective: every rank must call it; ranks other than 0 get None. Replicated tensors are
        taken from rank 0. Load the result into a ``PiMoE`` built with the same arguments.
        """
        local = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        shards: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dst = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        with _collective("gather of the expert shards", self.group):
            dist.gather_object(local, shards, dst=dst, group=self.group)
        return None if shards is None else unshard_state_dict(shards, self.num_experts)

    def load_full_state_dict(self, full: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load a single-process ``PiMoE`` state dict: this rank takes its shard of the experts."""
        self.load_state_dict(shard_state_dict(full, self.num_experts, self.rank, self.world_size), strict=strict)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"rank={self.rank}, world_size={self.world_size}, experts={self.shard.start}..{self.shard.stop - 1}"
        )


def allreduce_replicated_grads(module: nn.Module, average: bool = True, group: ProcessGroup = None) -> None:
    """Make every rank's gradients those of the whole group's loss, after ``backward()``.

    Replicated parameters (everything outside the expert shards of the
    :class:`ExpertParallelMoE` layers in ``module``) are all-reduced (summed); expert gradients
    already hold every rank's contribution and are left as they are. With ``average`` (each rank's
    loss is a mean over its tokens, the DDP convention) both are then divided by the world size,
    giving the gradient of the mean of the ranks' losses; without it, of their sum. Do not wrap
    the layer in DDP as well: DDP would average the different experts of different ranks.
    """
    world = dist.get_world_size(group)
    owned = {id(p) for m in module.modules() if isinstance(m, ExpertParallelMoE) for p in m.expert_parameters()}
    replicated = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in owned]
    if replicated:
        flat = torch.cat([g.reshape(-1) for g in replicated])
        with _collective("all_reduce of replicated gradients", group):
            dist.all_reduce(flat, group=group)
        for grad, chunk in zip(replicated, flat.split([g.numel() for g in replicated])):
            grad.copy_(chunk.view_as(grad))
    if average:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(world)


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
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, timeout=timeout, rank=rank, world_size=world_size)
    return device
