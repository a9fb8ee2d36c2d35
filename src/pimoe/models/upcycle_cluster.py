"""Co-activation clustering of a gated MLP's neurons into balanced experts (MoEfication).

Neuron ``i`` of ``down(silu(gate(x)) * up(x))`` contributes ``a_i(x) * down[:, i]`` to the output.
Its *activation profile* over ``T`` real tokens is ``|a_i(x_t)| * ||down[:, i]||`` (``[T]``); neurons
with similar (cosine) profiles fire on the same tokens and go into the same expert, so a token's
output mass concentrates in few experts. Clusters are balanced (``F / E`` neurons each) by a
spherical k-means whose assignment step fills clusters greedily by similarity.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.models.progress import track


@torch.no_grad()
def capture_mlp_inputs(
    model: nn.Module,
    input_ids: Tensor,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Tensor]:
    """Inputs of every gated MLP (or, if the model has none, every PiMoE layer) of ``model`` on
    ``input_ids [B, S]``: a list (one per layer, module order) of ``[B * S, D]`` float32 CPU tensors."""
    from pimoe.models.upcycle import find_mlps, moe_layers

    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    modules: list[nn.Module] = [m for _, m in find_mlps(model)] or list(moe_layers(model))
    if not modules:
        raise ValueError(f"{type(model).__name__} has no gated MLP or PiMoE layer")
    captured: list[list[Tensor]] = [[] for _ in modules]

    def hook(i: int):
        def save(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

        return save

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        model.eval()
        for start in track(
            range(0, len(input_ids), batch_size), "capture MLP inputs", enabled=progress
        ):
            model(input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in captured]


def balanced_assign(similarity: Tensor) -> Tensor:
    """``similarity [F, E]`` -> ``[F]`` cluster of each item, each cluster taking exactly ``F / E``
    items: in rounds, every unplaced item bids for its most similar open cluster and each cluster
    keeps its most similar bidders up to its remaining room."""
    num_items, num_clusters = similarity.shape
    if num_items % num_clusters:
        raise ValueError(f"{num_clusters} clusters do not divide {num_items} items")
    room = [num_items // num_clusters] * num_clusters
    labels = torch.full((num_items,), -1, dtype=torch.long)
    open_sims = similarity.clone().float()
    while (labels < 0).any():
        free = torch.nonzero(labels < 0).flatten()
        choice = open_sims[free].argmax(dim=1)
        for c in range(num_clusters):
            bidders = free[choice == c]
            if len(bidders) == 0:
                continue
            keep = bidders[open_sims[bidders, c].argsort(descending=True)[: room[c]]]
            labels[keep] = c
            room[c] -= len(keep)
            if room[c] == 0:
                open_sims[:, c] = float("-inf")
    return labels


def gated_projections(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """``(gate_proj, up_proj, down_proj)`` of a gated MLP (as found by
    :func:`pimoe.models.upcycle.find_mlps`, which checks that all three are ``nn.Linear``)."""
    return (
        cast(nn.Linear, mlp.gate_proj),
        cast(nn.Linear, mlp.up_proj),
        cast(nn.Linear, mlp.down_proj),
    )


@torch.no_grad()
def activation_profiles(mlp: nn.Module, x: Tensor) -> Tensor:
    """``[F, T]`` unit-norm activation profile of each neuron of ``mlp`` on ``x [T, D]``."""
    gate_proj, up_proj, down_proj = gated_projections(mlp)
    weight = gate_proj.weight
    x = x.to(weight.device, weight.dtype)
    act = F.silu(x @ gate_proj.weight.T) * (x @ up_proj.weight.T)  # [T, F]
    profiles = (act.abs() * down_proj.weight.norm(dim=0)).T.float()  # [F, T]
    return F.normalize(profiles, dim=1).cpu()


@torch.no_grad()
def cluster_neurons(
    mlp: nn.Module, x: Tensor, num_experts: int, seed: int = 0, iterations: int = 15
) -> Tensor:
    """Balanced co-activation clusters of ``mlp``'s neurons on inputs ``x [T, D]``: ``[F]`` expert
    id per neuron, ``F / num_experts`` neurons per expert."""
    in_features = gated_projections(mlp)[0].in_features
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"MLP inputs must be [T, {in_features}], got {tuple(x.shape)}")
    profiles = activation_profiles(mlp, x)  # [F, T]
    generator = torch.Generator().manual_seed(seed)
    centroids = profiles[torch.randperm(len(profiles), generator=generator)[:num_experts]]  # [E, T]
    labels = balanced_assign(profiles @ centroids.T)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, labels, profiles)
        centroids = F.normalize(sums, dim=1)
        new = balanced_assign(profiles @ centroids.T)
        if torch.equal(new, labels):
            break
        labels = new
    return labels
