"""Prototypical Networks (Snell et al. 2017): classify a query by its squared Euclidean distance
to the mean embedding ("prototype") of each class's support examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.adapt.tasks import Task


class ProtoNet(nn.Module):
    """Wraps an ``encoder`` mapping ``x [M, ...]`` to embeddings ``[M, E]`` (any module, PiMoE included).

    Labels of an episode are ``0 .. n_way - 1``; every class must have at least one support example.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def prototypes(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """``support_x [S, ...]``, ``support_y [S]`` long -> prototypes ``[n_way, E]``."""
        if (
            support_y.dim() != 1
            or support_y.shape[0] != support_x.shape[0]
            or support_y.dtype != torch.long
        ):
            raise ValueError(
                f"support_y must be long [{support_x.shape[0]}], got {support_y.dtype} "
                f"{tuple(support_y.shape)}"
            )
        n_way = int(support_y.max()) + 1
        counts = torch.bincount(support_y, minlength=n_way)
        if bool((counts == 0).any()):
            raise ValueError(
                f"every class 0..{n_way - 1} needs a support example; counts {counts.tolist()}"
            )
        emb = self.encoder(support_x)  # [S, E]
        sums = emb.new_zeros(n_way, emb.shape[-1]).index_add_(0, support_y, emb)
        return sums / counts.unsqueeze(1).to(emb.dtype)

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits ``[Q, n_way]`` = minus squared distance of each query embedding to each prototype."""
        protos = self.prototypes(support_x, support_y)
        return -torch.cdist(self.encoder(query_x), protos).pow(2)

    def loss(self, task: Task) -> Tensor:
        """Cross-entropy of the query predictions of one episode."""
        return F.cross_entropy(self(task.support_x, task.support_y, task.query_x), task.query_y)

    @torch.no_grad()
    def accuracy(self, task: Task) -> float:
        """Fraction of the episode's queries classified correctly."""
        pred = self(task.support_x, task.support_y, task.query_x).argmax(-1)
        return float((pred == task.query_y).float().mean())
