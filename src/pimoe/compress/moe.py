"""Expert-level compression of a :class:`~pimoe.moe.PiMoE` layer: drop experts, merge experts.

Both operations return a new layer and leave the input layer untouched.

Dropping experts removes their weights and their router rows (``top_k`` is clipped to the new
expert count). The output is unchanged *exactly* on inputs where the dropped experts are never
selected, provided the kept experts' combine weights do not depend on the dropped ones: true for
``normalize=True`` (weights renormalized over the selected ``k``, as in Mixtral) and for sigmoid
scores; with softmax scores and ``normalize=False`` the kept weights grow by the removed
probability mass. The capacity factor is rescaled so that each expert keeps the same capacity.

Merging a group of experts averages their weights (weighted by their load when a
:class:`~pimoe.moe.RoutingStats` is given, else uniformly) and replaces their router rows by one
row. With softmax scores the default ``router_merge="logsumexp"`` uses the load-weighted mean row
plus a bias ``logsumexp`` of the group's biases (0 without bias): when the rows in a group are
equal, the merged logit is exactly ``logsumexp`` of the group's logits, so the merged expert gets
the summed probability of the group and every other expert keeps its probability; when they
differ it is an approximation. ``router_merge="mean"`` averages rows and biases (the only option
for sigmoid scores). Sparse top-k selection can still change after a merge (the merged expert
competes with the group's summed mass), so exact invariance is guaranteed only when the merged
experts are identical and selected together, e.g. dense routing (``top_k == num_experts``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from pimoe.moe.experts import ExpertList, StackedExperts
from pimoe.moe.layer import PiMoE
from pimoe.moe.router import Router
from pimoe.moe.stats import RoutingStats


def _check_layer(layer: PiMoE) -> None:
    if not isinstance(layer, PiMoE):
        raise TypeError(f"expected a PiMoE layer, got {type(layer).__name__}")
    if layer.router.routing != "token_choice":
        raise ValueError("expert dropping/merging supports token-choice routing only")


def _loads(layer: PiMoE, stats: RoutingStats | None) -> Tensor | None:
    if stats is None:
        return None
    if stats.num_experts != layer.num_experts:
        raise ValueError(
            f"stats cover {stats.num_experts} experts, the layer has {layer.num_experts}"
        )
    return stats.tokens_per_expert.detach().double().cpu()


def _rebuild(
    layer: PiMoE, gate_weight: Tensor, gate_bias: Tensor | None, experts: torch.nn.Module
) -> PiMoE:
    """A deep copy of ``layer`` with a new router (given gate) and experts backend."""
    old = layer.router
    num_experts = gate_weight.shape[0]
    top_k = min(old.top_k, num_experts)
    capacity_factor = old.capacity_factor
    if capacity_factor is not None:  # keep ceil(f * T * k / E) per expert
        capacity_factor = capacity_factor * num_experts * old.top_k / (layer.num_experts * top_k)
    config = old.config.replace(
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        router_bias=gate_bias is not None,
    )
    router = Router(old.d_model, config).to(device=gate_weight.device, dtype=gate_weight.dtype)
    with torch.no_grad():
        router.gate.weight.copy_(gate_weight)
        if gate_bias is not None:
            router.gate.bias.copy_(gate_bias)
    router.train(old.training)
    # Deep-copy everything else (shared experts, flags; not the last call's routing, which
    # MoEOutput leaves out of copies); the memo hands over the new parts.
    new = copy.deepcopy(layer, memo={id(layer.router): router, id(layer.experts): experts})
    new.config, new.num_experts, new.top_k = config, num_experts, top_k
    return new


def _select_experts(experts: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    if isinstance(experts, ExpertList):
        return ExpertList([copy.deepcopy(experts.experts[e]) for e in keep])
    if not isinstance(experts, StackedExperts):
        raise TypeError(f"unsupported experts backend {type(experts).__name__}")
    new = copy.deepcopy(experts)
    index = torch.tensor(keep, device=experts.w_in.device)
    with torch.no_grad():
        for name in ("w_in", "w_out", "b_in", "b_out"):
            param = getattr(experts, name)
            if param is not None:
                setattr(
                    new, name, torch.nn.Parameter(param.detach().index_select(0, index).clone())
                )
    new.num_experts = len(keep)
    return new


def experts_to_keep(
    layer: PiMoE,
    amount: float,
    *,
    by: Literal["load", "weight_norm"] = "load",
    stats: RoutingStats | None = None,
) -> list[int]:
    """Indices (ascending) of the experts that survive dropping the ``round(amount * E)`` weakest.

    ``by="load"`` ranks by ``stats.tokens_per_expert`` (ties: lower index kept);
    ``"weight_norm"`` by the Frobenius norm of each expert's weights (StackedExperts only).
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    num = layer.num_experts
    if by == "load":
        loads = _loads(layer, stats)
        if loads is None:
            raise ValueError(
                "by='load' needs stats (a RoutingStats collected on representative inputs)"
            )
        score = loads
    elif by == "weight_norm":
        experts = layer.experts
        if not isinstance(experts, StackedExperts):
            raise ValueError("by='weight_norm' needs StackedExperts")
        score = experts.w_in.detach().square().sum(
            dim=(1, 2)
        ) + experts.w_out.detach().square().sum(dim=(1, 2))
        score = score.double().cpu()
    else:
        raise ValueError(f"by must be 'load' or 'weight_norm', got {by!r}")
    count = max(1, num - round(amount * num))
    order = sorted(range(num), key=lambda e: (-float(score[e]), e))
    return sorted(order[:count])


def drop_experts(
    layer: PiMoE,
    keep: Sequence[int] | None = None,
    *,
    amount: float | None = None,
    by: Literal["load", "weight_norm"] = "load",
    stats: RoutingStats | None = None,
) -> PiMoE:
    """A new layer with only some experts: the listed ``keep`` indices, or all but the
    ``round(amount * E)`` weakest ones ranked ``by`` load (needs ``stats``) or weight norm.

    Raises:
        ValueError: neither or both of ``keep``/``amount``, duplicate or out-of-range indices,
            an empty ``keep``, mismatched ``stats``, or expert-choice routing.
    """
    _check_layer(layer)
    if (keep is None) == (amount is None):
        raise ValueError("give exactly one of keep (expert indices) or amount (fraction to drop)")
    if amount is not None:
        keep = experts_to_keep(layer, amount, by=by, stats=stats)
    keep = [int(e) for e in keep]  # type: ignore[union-attr]
    if not keep:
        raise ValueError("keep must name at least one expert")
    if len(set(keep)) != len(keep) or not all(0 <= e < layer.num_experts for e in keep):
        raise ValueError(f"keep must be distinct indices in [0, {layer.num_experts}), got {keep}")
    gate = layer.router.gate
    index = torch.tensor(keep, device=gate.weight.device)
    weight = gate.weight.detach().index_select(0, index)
    bias = gate.bias.detach().index_select(0, index) if gate.bias is not None else None
    return _rebuild(layer, weight, bias, _select_experts(layer.experts, keep))


def _check_groups(groups: Sequence[Sequence[int]], num_experts: int) -> list[list[int]]:
    """All experts as a partition: the given groups plus a singleton for every unnamed expert."""
    named = [int(e) for group in groups for e in group]
    if any(len(group) == 0 for group in groups):
        raise ValueError("groups must not be empty")
    if len(set(named)) != len(named) or not all(0 <= e < num_experts for e in named):
        raise ValueError(
            f"groups must hold distinct expert indices in [0, {num_experts}), got {groups}"
        )
    partition = [sorted(int(e) for e in group) for group in groups]
    partition += [[e] for e in range(num_experts) if e not in set(named)]
    return sorted(partition, key=lambda group: group[0])


def merge_experts(
    layer: PiMoE,
    groups: Sequence[Sequence[int]],
    *,
    stats: RoutingStats | None = None,
    router_merge: Literal["logsumexp", "mean"] | None = None,
) -> PiMoE:
    """A new layer where each group of experts becomes one expert (see the module docstring).

    Args:
        layer: a PiMoE with ``StackedExperts``.
        groups: disjoint lists of expert indices; experts not named stay as they are. Merged
            experts are ordered by the smallest index of their group.
        stats: loads used to weight the average (uniform when ``None`` or a group has no load).
        router_merge: ``"logsumexp"`` (default for softmax scores) or ``"mean"`` (default and only
            choice for sigmoid scores).

    Raises:
        TypeError: experts are not ``StackedExperts``.
        ValueError: invalid groups, mismatched ``stats``, ``"logsumexp"`` with sigmoid scores, or
            expert-choice routing.
    """
    _check_layer(layer)
    experts = layer.experts
    if not isinstance(experts, StackedExperts):
        raise TypeError("merge_experts needs StackedExperts (identically shaped experts)")
    score = layer.router.score
    if router_merge is None:
        router_merge = "logsumexp" if score == "softmax" else "mean"
    if router_merge not in ("logsumexp", "mean"):
        raise ValueError(f"router_merge must be 'logsumexp' or 'mean', got {router_merge!r}")
    if router_merge == "logsumexp" and score != "softmax":
        raise ValueError(
            "router_merge='logsumexp' preserves softmax mass; use 'mean' for sigmoid scores"
        )
    partition = _check_groups(groups, layer.num_experts)
    loads = _loads(layer, stats)
    gate = layer.router.gate
    rows, biases, w_in, w_out, b_in, b_out = [], [], [], [], [], []
    for group in partition:
        index = torch.tensor(group, device=gate.weight.device)
        mix = torch.full((len(group),), 1.0 / len(group), dtype=torch.float64)
        if loads is not None and loads[group].sum() > 0:
            mix = loads[group] / loads[group].sum()
        mix = mix.to(device=gate.weight.device)

        def average(t: Tensor, mix: Tensor = mix, index: Tensor = index) -> Tensor:
            picked = t.detach().index_select(0, index).double()
            mixed: Tensor = torch.tensordot(mix, picked, dims=1)
            return mixed.to(t.dtype)

        rows.append(average(gate.weight))
        group_bias = (
            gate.bias.detach().index_select(0, index).double()
            if gate.bias is not None
            else torch.zeros(len(group), dtype=torch.float64, device=gate.weight.device)
        )
        if router_merge == "logsumexp":
            biases.append(torch.logsumexp(group_bias, dim=0))
        else:
            biases.append(torch.dot(mix, group_bias))
        w_in.append(average(experts.w_in))
        w_out.append(average(experts.w_out))
        if experts.b_in is not None and experts.b_out is not None:
            b_in.append(average(experts.b_in))
            b_out.append(average(experts.b_out))
    bias = torch.stack(biases).to(gate.weight.dtype)
    if gate.bias is None and not bool(bias.abs().gt(0).any()):
        bias = None
    new_experts = copy.deepcopy(experts)
    with torch.no_grad():
        new_experts.w_in = torch.nn.Parameter(torch.stack(w_in))
        new_experts.w_out = torch.nn.Parameter(torch.stack(w_out))
        if b_in:
            new_experts.b_in = torch.nn.Parameter(torch.stack(b_in))
            new_experts.b_out = torch.nn.Parameter(torch.stack(b_out))
    new_experts.num_experts = len(partition)
    return _rebuild(layer, torch.stack(rows), bias, new_experts)


def similar_expert_groups(
    layer: PiMoE,
    num_experts_after: int,
    *,
    stats: RoutingStats | None = None,
    by: Literal["router", "weights"] = "router",
) -> list[list[int]]:
    """Greedy agglomerative grouping of experts the router cannot tell apart.

    Starts from singletons and repeatedly joins the two groups whose representative vectors have
    the highest cosine similarity, until ``num_experts_after`` groups remain. Vectors are the
    router rows (``by="router"``: experts whose logits move together for every input) or the
    flattened expert weights (``by="weights"``, StackedExperts only). A group's representative is
    the load-weighted (uniform without ``stats``) mean of its members' vectors.

    Returns:
        the groups with more than one member, each sorted (pass them to :func:`merge_experts`).
    """
    _check_layer(layer)
    num = layer.num_experts
    if not 1 <= num_experts_after <= num:
        raise ValueError(f"num_experts_after must be in [1, {num}], got {num_experts_after}")
    if by == "router":
        vectors = layer.router.gate.weight.detach().double().cpu()
    elif by == "weights":
        if not isinstance(layer.experts, StackedExperts):
            raise ValueError("by='weights' needs StackedExperts")
        experts = layer.experts
        vectors = torch.cat(
            [experts.w_in.detach().flatten(1), experts.w_out.detach().flatten(1)], dim=1
        )
        vectors = vectors.double().cpu()
    else:
        raise ValueError(f"by must be 'router' or 'weights', got {by!r}")
    loads = _loads(layer, stats)
    mass = loads.clone() if loads is not None else torch.ones(num, dtype=torch.float64)
    mass = torch.where(mass > 0, mass, torch.full_like(mass, 1e-12))
    groups: list[list[int]] = [[e] for e in range(num)]
    reps = [vectors[e] for e in range(num)]
    weights = [float(mass[e]) for e in range(num)]
    while len(groups) > num_experts_after:
        stacked = torch.nn.functional.normalize(torch.stack(reps), dim=1)
        similarity = stacked @ stacked.t()
        similarity.fill_diagonal_(-math.inf)
        flat = int(similarity.argmax())
        i, j = sorted(divmod(flat, len(groups)))
        total = weights[i] + weights[j]
        reps[i] = (weights[i] * reps[i] + weights[j] * reps[j]) / total
        weights[i] = total
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j], reps[j], weights[j]
    return [group for group in groups if len(group) > 1]


def merge_similar_experts(
    layer: PiMoE,
    num_experts_after: int,
    *,
    stats: RoutingStats | None = None,
    by: Literal["router", "weights"] = "router",
    router_merge: Literal["logsumexp", "mean"] | None = None,
) -> PiMoE:
    """:func:`merge_experts` with the groups of :func:`similar_expert_groups`."""
    groups = similar_expert_groups(layer, num_experts_after, stats=stats, by=by)
    return merge_experts(layer, groups, stats=stats, router_merge=router_merge)
