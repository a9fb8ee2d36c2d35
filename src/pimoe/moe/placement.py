"""Where experts live under expert parallelism: owned shards, optional replicas, per-rank state dicts.

Expert ``e`` is owned by rank ``e // (E / W)`` (a contiguous shard, as in GShard/DeepSpeed-MoE).
An :class:`ExpertPlacement` may also copy experts to more ranks (``replicas``): a hot expert held
by several ranks has its tokens spread over its copies, and a rank that holds a copy computes its
own tokens for that expert without sending them anywhere. Copies must stay identical: their
gradients are summed over the holders (``allreduce_replicated_grads`` in
:mod:`pimoe.moe.parallel` does it), so the same optimizer step keeps them equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

_LIST_KEY = re.compile(
    r"^experts\.experts\.(\d+)\.(.+)$"
)  # ExpertList: experts.experts.<e>.<param>


def expert_shard(num_experts: int, rank: int, world_size: int) -> range:
    """The experts owned by ``rank``: a contiguous ``range`` of ``E / W`` experts."""
    if world_size < 1 or num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the world size {world_size}; expert "
            "parallelism gives every rank the same number of experts"
        )
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


class ExpertPlacement:
    """Which ranks hold which experts.

    Args:
        num_experts: ``E`` (divisible by ``world_size``).
        world_size: ``W``.
        replicas: ``{expert: ranks}``: extra ranks that hold a copy of ``expert`` besides its owner
            (e.g. ``{0: range(W)}`` copies expert 0 everywhere). Default: no copies.

    Attributes:
        holders: per expert, the sorted ranks holding it (owner included).
        held: per rank, the sorted experts it holds (its shard and its copies).
    """

    def __init__(
        self, num_experts: int, world_size: int, replicas: Mapping[int, Iterable[int]] | None = None
    ) -> None:
        self.num_experts, self.world_size = num_experts, world_size
        holders = [{self.owner(e)} for e in range(num_experts)]  # also validates divisibility
        for expert, ranks in (replicas or {}).items():
            if not 0 <= expert < num_experts:
                raise ValueError(
                    f"replicas names expert {expert}; experts are 0..{num_experts - 1}"
                )
            for rank in ranks:
                if not 0 <= rank < world_size:
                    raise ValueError(
                        f"replicas of expert {expert} name rank {rank}; ranks are 0..{world_size - 1}"
                    )
                holders[expert].add(rank)
        self.holders: tuple[tuple[int, ...], ...] = tuple(tuple(sorted(h)) for h in holders)
        self.held: tuple[tuple[int, ...], ...] = tuple(
            tuple(e for e in range(num_experts) if r in self.holders[e]) for r in range(world_size)
        )

    def owner(self, expert: int) -> int:
        """The rank whose shard holds ``expert``."""
        return expert // len(expert_shard(self.num_experts, 0, self.world_size))

    @property
    def replicated(self) -> tuple[int, ...]:
        """Experts held by more than one rank."""
        return tuple(e for e, h in enumerate(self.holders) if len(h) > 1)

    def destination(self, expert: int, src: int) -> int:
        """The rank that computes ``src``'s rows for ``expert``: ``src`` itself if it holds a copy,
        else copy number ``src mod (number of copies)``."""
        holders = self.holders[expert]
        return src if src in holders else holders[src % len(holders)]

    def slots(self, src: int) -> Tensor:
        """``[E]`` int64: for each expert, the slot that ``src`` sends its rows to, where slots
        number every rank's held experts in (rank, expert) order: sorting rows by slot groups them
        by destination rank, then by the destination's local expert."""
        offsets = [0]
        for held in self.held:
            offsets.append(offsets[-1] + len(held))
        out = []
        for e in range(self.num_experts):
            dest = self.destination(e, src)
            out.append(offsets[dest] + self.held[dest].index(e))
        return torch.tensor(out, dtype=torch.long)

    def __repr__(self) -> str:
        extra = {e: self.holders[e] for e in self.replicated}
        return f"ExpertPlacement(num_experts={self.num_experts}, world_size={self.world_size}, replicated={extra})"


def select_experts(
    full: Mapping[str, Tensor], num_experts: int, experts: Sequence[int]
) -> dict[str, Tensor]:
    """The state dict of a layer holding only ``experts`` (in that order) of a ``PiMoE`` state dict.

    Stacked expert tensors (``experts.w_in [E, ...]`` etc.) keep those rows; ``ExpertList`` keys
    ``experts.experts.<e>.*`` are kept for those experts and renumbered by position; other keys
    (router, shared experts) are kept as they are.
    """
    position = {e: i for i, e in enumerate(experts)}
    rows = torch.tensor(list(experts), dtype=torch.long)
    out: dict[str, Tensor] = {}
    for key, value in full.items():
        match = _LIST_KEY.match(key)
        if match:
            e = int(match.group(1))
            if e in position:
                out[f"experts.experts.{position[e]}.{match.group(2)}"] = value
        elif key.startswith("experts."):
            if value.shape[0] != num_experts:
                raise ValueError(
                    f"{key} has {value.shape[0]} experts on dim 0, expected {num_experts}"
                )
            out[key] = value.index_select(0, rows.to(value.device))
        else:
            out[key] = value
    return out


def shard_state_dict(
    full: Mapping[str, Tensor], num_experts: int, rank: int, world_size: int
) -> dict[str, Tensor]:
    """The part of a single-process ``PiMoE`` state dict that ``rank`` owns (its shard, no copies)."""
    return select_experts(full, num_experts, expert_shard(num_experts, rank, world_size))


def unshard_state_dict(shards: list[Mapping[str, Tensor]], num_experts: int) -> dict[str, Tensor]:
    """Inverse of :func:`shard_state_dict`: ``shards[r]`` is rank ``r``'s state dict."""
    per_rank = len(expert_shard(num_experts, 0, len(shards)))
    out: dict[str, Tensor] = {}
    for rank, shard in enumerate(shards):
        for key, value in shard.items():
            match = _LIST_KEY.match(key)
            if match:
                out[f"experts.experts.{int(match.group(1)) + rank * per_rank}.{match.group(2)}"] = (
                    value
                )
            elif key.startswith("experts."):
                out[key] = value if rank == 0 else torch.cat([out[key], value])
            elif rank == 0:
                out[key] = value
    return out


__all__ = [
    "ExpertPlacement",
    "expert_shard",
    "select_experts",
    "shard_state_dict",
    "unshard_state_dict",
]
