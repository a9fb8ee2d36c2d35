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

With ``replicas`` (see :class:`~pimoe.moe.placement.ExpertPlacement`) an expert may also have
copies on other ranks: a rank holding a copy computes its own rows for that expert locally, and
the other ranks spread theirs over the copies; the counts and rows are then exchanged per (rank,
held expert) slot instead of per expert.

The exchanges are differentiable (:func:`all_to_all_rows`: the backward is the reverse
all-to-all), so expert weights get their full gradient (from every rank's tokens) on their owning
rank (spread over the copies of a replicated expert, until they are summed). Replicated parameters (router, shared experts, the rest of the model) get per-rank partial
gradients: reduce them with :func:`allreduce_replicated_grads`. Every rank must call forward and
backward the same number of times, in the same order (they are collectives).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pimoe.moe.collectives import (
    DEFAULT_TIMEOUT,
    ExpertParallelError,
    ProcessGroup,
    _collective,
    all_to_all_rows,
    init_process_group,
)
from pimoe.moe.dispatch import combine, sort_assignments
from pimoe.moe.experts import ExpertList, StackedExperts
from pimoe.moe.layer import MoEOutput, PiMoE
from pimoe.moe.placement import ExpertPlacement, expert_shard, select_experts, unshard_state_dict
from pimoe.moe.router import Router

__all__ = [
    "DEFAULT_TIMEOUT",
    "ExpertParallelError",
    "ExpertParallelMoE",
    "all_to_all_rows",
    "allreduce_replicated_grads",
    "init_process_group",
]


class ExpertParallelMoE(MoEOutput):
    """A :class:`PiMoE` layer whose experts are sharded (and optionally replicated) over the ranks
    of a process group.

    Input ``[..., D]`` (each rank its own tokens), output of the same shape; the result equals the
    single-process layer applied to the concatenation of all ranks' tokens (dropless token-choice
    routing; a capacity limit or expert-choice routing is computed per rank on its local tokens).

    Build it with :meth:`from_layer` on every rank from the same layer (same seed or weights).
    ``aux_loss``, ``z_loss`` and ``last_stats`` describe this rank's tokens; ``last_send_splits``
    / ``last_recv_splits`` (``[W]`` rows) describe the last exchange.

    Args:
        router: the replicated router (``E`` experts).
        experts: this rank's experts backend (``StackedExperts`` or ``ExpertList``) holding the
            experts ``placement.held[rank]``, in that order.
        num_experts: ``E``.
        shared, shared_gate: replicated shared experts and their gate, or None.
        group: the process group (None: the default group).
        placement: which ranks hold which experts (default: each its shard, no copies).
        replica_numel: for each of ``placement.replicated``, the number of its parameters
            (:meth:`from_layer` fills it in; needed to sum the copies' gradients).
    """

    _slots: Tensor  # [E] slot of each expert (destination rank, then its local expert)

    def __init__(
        self,
        router: Router,
        experts: nn.Module,
        num_experts: int,
        *,
        shared: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        group: ProcessGroup = None,
        placement: ExpertPlacement | None = None,
        replica_numel: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "ExpertParallelMoE needs an initialized process group (see init_process_group)"
            )
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.placement = placement or ExpertPlacement(num_experts, self.world_size)
        if (self.placement.num_experts, self.placement.world_size) != (
            num_experts,
            self.world_size,
        ):
            raise ValueError(
                f"{self.placement} does not fit {num_experts} experts on {self.world_size} ranks"
            )
        self.shard = expert_shard(num_experts, self.rank, self.world_size)
        self.held = self.placement.held[self.rank]
        num_held = len(experts)  # type: ignore[arg-type]
        if num_held != len(self.held):
            raise ValueError(
                f"rank {self.rank} should hold {len(self.held)} experts, got {num_held}"
            )
        if self.placement.replicated and (
            replica_numel is None or len(replica_numel) != len(self.placement.replicated)
        ):
            raise ValueError(
                "replicated experts need replica_numel (one count per replicated expert); use from_layer"
            )
        self.replica_numel = replica_numel or []
        self.register_buffer("_slots", self.placement.slots(self.rank), persistent=False)  # [E]
        self.d_model, self.num_experts, self.top_k = router.d_model, num_experts, router.top_k
        self.router, self.experts, self.shared, self.shared_gate = (
            router,
            experts,
            shared,
            shared_gate,
        )
        self.last_send_splits: list[int] = []
        self.last_recv_splits: list[int] = []

    @classmethod
    def from_layer(
        cls,
        layer: PiMoE,
        group: ProcessGroup = None,
        replicas: Mapping[int, Iterable[int]] | None = None,
    ) -> ExpertParallelMoE:
        """Copy ``layer``'s router and shared experts, and the experts this rank holds: its shard
        and, with ``replicas`` (``{expert: extra ranks}``, the same on every rank), its copies."""
        if not dist.is_initialized():
            raise RuntimeError(
                "ExpertParallelMoE needs an initialized process group (see init_process_group)"
            )
        placement = ExpertPlacement(layer.num_experts, dist.get_world_size(group), replicas)
        held = list(placement.held[dist.get_rank(group)])
        bank = layer.experts
        experts: nn.Module
        if isinstance(bank, StackedExperts):
            experts = StackedExperts(
                len(held),
                bank.d_model,
                bank.ffn_dim,
                bank.activation,
                bank.b_in is not None,
                bank.backend,
            ).to(bank.w_in.device, bank.w_in.dtype)
            with torch.no_grad():
                for name, param in experts.named_parameters():
                    param.copy_(getattr(bank, name)[held])
            numel = [sum(p[0].numel() for p in bank.parameters())] * len(placement.replicated)
        elif isinstance(bank, ExpertList):
            experts = ExpertList([copy.deepcopy(bank.experts[e]) for e in held])
            numel = [
                sum(p.numel() for p in bank.experts[e].parameters()) for e in placement.replicated
            ]
        else:
            raise TypeError(f"cannot shard experts of type {type(bank).__name__}")
        return cls(
            copy.deepcopy(layer.router),
            experts,
            layer.num_experts,
            shared=copy.deepcopy(layer.shared),
            shared_gate=copy.deepcopy(layer.shared_gate),
            group=group,
            placement=placement,
            replica_numel=numel,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D] -> [..., D]``; a collective: every rank of the group must call it."""
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input [..., {self.d_model}], got shape {tuple(x.shape)}")
        shape, world = x.shape, self.world_size
        tokens = x.reshape(-1, self.d_model)  # [T, D]
        if torch.is_grad_enabled() and not tokens.requires_grad:
            # Keep the token exchange in the graph, so that every rank runs the same backward
            # collectives even if only some ranks' inputs need a gradient.
            tokens = tokens.detach().requires_grad_()
        route = self.router(tokens)
        token_sorted, weight_sorted, counts = sort_assignments(
            route, self.num_experts
        )  # [N], [N], [E]
        # Regroup the rows from expert order to slot order (destination rank, then its local expert).
        expert_of_row = torch.arange(self.num_experts, device=counts.device).repeat_interleave(
            counts
        )  # [N]
        order = self._slots[expert_of_row].argsort(stable=True)  # [N]
        token_sorted, weight_sorted = token_sorted[order], weight_sorted[order]
        held_per_rank = [len(h) for h in self.placement.held]
        slot_counts = counts.new_zeros(sum(held_per_rank)).index_add_(0, self._slots, counts)  # [S]
        recv_counts = counts.new_empty(world * len(self.held))
        with _collective("all_to_all of expert counts", self.group):
            dist.all_to_all_single(
                recv_counts, slot_counts, [len(self.held)] * world, held_per_rank, group=self.group
            )
        recv_counts = recv_counts.view(
            world, len(self.held)
        )  # [W, H]: rows from rank r for held expert h
        send_splits = [int(c.sum()) for c in torch.split(slot_counts, held_per_rank)]
        recv_splits = recv_counts.sum(dim=1).tolist()
        received = all_to_all_rows(
            tokens.index_select(0, token_sorted), recv_splits, send_splits, self.group
        )  # [M, D]
        y = self._run_local_experts(received, recv_counts)  # [M, D], in the received order
        y = all_to_all_rows(
            y, send_splits, recv_splits, self.group
        )  # [N, D], in token_sorted order
        out = self._finish(
            tokens, combine(tokens, y, token_sorted, weight_sorted), route, counts
        )  # [T, D]
        self.last_send_splits, self.last_recv_splits = send_splits, recv_splits
        return out.reshape(shape)

    def _run_local_experts(self, received: Tensor, recv_counts: Tensor) -> Tensor:
        """``received [M, D]`` grouped by source rank then held expert, ``recv_counts [W, H]``
        -> ``[M, D]`` in the same order; the experts backend sees the rows grouped by expert."""
        world, local = recv_counts.shape
        if world == 1 or local == 1:  # already grouped by expert
            grouped: Tensor = self.experts(received, recv_counts.sum(dim=0))
            return grouped
        expert_of_row = torch.arange(local, device=received.device).repeat(world)  # [W * H]
        expert_of_row = expert_of_row.repeat_interleave(recv_counts.reshape(-1))  # [M]
        order = expert_of_row.argsort(stable=True)  # [M]
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device)
        )
        y: Tensor = self.experts(received.index_select(0, order), recv_counts.sum(dim=0))
        return y.index_select(0, inverse)

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of the experts this rank holds (not replicated on every rank like the rest)."""
        return list(self.experts.parameters())

    def _held_grads(self, i: int) -> list[Tensor]:
        """Gradient views of held expert ``i``'s parameters (zero-filled where there is none)."""
        if isinstance(self.experts, StackedExperts):
            params = [(p, True) for p in self.experts.parameters()]
        else:
            held: nn.Module = self.experts.experts[i]  # type: ignore[index, assignment]
            params = [(p, False) for p in held.parameters()]
        grads = []
        for p, stacked in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = grad
            grads.append(grad[i] if stacked else grad)
        return grads

    def sum_replica_grads(self) -> None:
        """Sum the gradients of every replicated expert over the ranks holding a copy (a
        collective; a no-op without replicas), so that all copies take the same optimizer step."""
        replicated = self.placement.replicated
        if not replicated:
            return
        device = next(self.experts.parameters()).device
        flat = torch.zeros(sum(self.replica_numel), device=device)
        chunks = torch.split(flat, self.replica_numel)
        mine = [(chunks[j], self.held.index(e)) for j, e in enumerate(replicated) if e in self.held]
        for chunk, i in mine:
            chunk.copy_(torch.cat([g.reshape(-1) for g in self._held_grads(i)]))
        with _collective("all_reduce of replicated expert gradients", self.group):
            dist.all_reduce(flat, group=self.group)
        for chunk, i in mine:
            grads = self._held_grads(i)
            for grad, part in zip(grads, torch.split(chunk, [g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))

    def gather_full_state_dict(self) -> dict[str, Tensor] | None:
        """Reassemble the single-process ``PiMoE`` state dict (CPU tensors) on the group's rank 0.

        A collective: every rank must call it; ranks other than 0 get None. Replicated tensors are
        taken from rank 0, each expert from its owner. Load the result into a ``PiMoE`` built with
        the same arguments.
        """
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        local = select_experts(state, len(self.held), [self.held.index(e) for e in self.shard])
        shards: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dst = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        with _collective("gather of the expert shards", self.group):
            dist.gather_object(local, shards, dst=dst, group=self.group)
        return None if shards is None else unshard_state_dict(shards, self.num_experts)

    def load_full_state_dict(self, full: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load a single-process ``PiMoE`` state dict: this rank takes the experts it holds."""
        self.load_state_dict(select_experts(full, self.num_experts, self.held), strict=strict)

    def extra_repr(self) -> str:
        copies = [e for e in self.held if e not in self.shard]
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"rank={self.rank}, world_size={self.world_size}, experts={self.shard.start}..{self.shard.stop - 1}"
            + (f", copies={copies}" if copies else "")
        )


def allreduce_replicated_grads(
    module: nn.Module, average: bool = True, group: ProcessGroup = None
) -> None:
    """Make every rank's gradients those of the whole group's loss, after ``backward()``.

    Replicated parameters (everything outside the experts of the :class:`ExpertParallelMoE`
    layers in ``module``) are all-reduced (summed); expert gradients already hold every rank's
    contribution, except that an expert with copies on several ranks (``replicas``) has it spread
    over its copies, which are summed over their holders first (:meth:`ExpertParallelMoE.sum_replica_grads`). With ``average`` (each rank's
    loss is a mean over its tokens, the DDP convention) both are then divided by the world size,
    giving the gradient of the mean of the ranks' losses; without it, of their sum. Do not wrap
    the layer in DDP as well: DDP would average the different experts of different ranks.
    """
    world = dist.get_world_size(group)
    layers = [m for m in module.modules() if isinstance(m, ExpertParallelMoE)]
    for layer in layers:
        layer.sum_replica_grads()
    owned = {id(p) for m in layers for p in m.expert_parameters()}
    replicated = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in owned]
    if replicated:
        flat = torch.cat([g.reshape(-1) for g in replicated])
        with _collective("all_reduce of replicated gradients", group):
            dist.all_reduce(flat, group=group)
        for grad, chunk in zip(replicated, torch.split(flat, [g.numel() for g in replicated])):
            grad.copy_(chunk.view_as(grad))
    if average:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(world)
