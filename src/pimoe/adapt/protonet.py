"""Prototypical Networks (Snell et al. 2017): classify a query by its squared Euclidean distance
to the mean embedding ("prototype") of each class's support examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.adapt.functional import check_finite
from pimoe.adapt.tasks import Task


class ProtoNet(nn.Module):
    """Wraps an ``encoder`` mapping ``x [M, ...]`` to embeddings ``[M, E]`` (any module, PiMoE included).

    Labels of an episode are ``0 .. n_way - 1``; every class must have at least one support example.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def prototypes(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """``support_x [S, ...]``, ``support_y [S]`` long -> prototypes ``[n_way, E]``.

        ``ValueError`` on an empty support set, labels that are not long, negative or leave a
        class of ``0 .. max`` without an example, and NaN/infinity in ``support_x``."""
        if (
            support_y.dim() != 1
            or support_y.shape[0] != support_x.shape[0]
            or support_y.dtype != torch.long
        ):
            raise ValueError(
                f"support_y must be long [{support_x.shape[0]}], got {support_y.dtype} "
                f"{tuple(support_y.shape)}"
            )
        if support_y.shape[0] == 0:
            raise ValueError("the support set is empty")
        if int(support_y.min()) < 0:
            raise ValueError(f"support_y must be non-negative, got {int(support_y.min())}")
        check_finite("support_x", support_x)
        n_way = int(support_y.max()) + 1
        if n_way > support_y.shape[0]:  # checked before bincount allocates n_way counts
            raise ValueError(
                f"every class 0..{n_way - 1} needs a support example; there are "
                f"{support_y.shape[0]} examples"
            )
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
        check_finite("query_x", query_x)
        protos = self.prototypes(support_x, support_y)
        return -torch.cdist(self.encoder(query_x), protos).pow(2)

    def loss(self, task: Task) -> Tensor:
        """Cross-entropy of the query predictions of one episode (``ValueError`` for a query
        label that is no class of the support set)."""
        logits = self(task.support_x, task.support_y, task.query_x)
        y = task.query_y
        if y.dtype != torch.long or y.shape != logits.shape[:1]:
            raise ValueError(
                f"query_y must be long [{logits.shape[0]}], got {y.dtype} {tuple(y.shape)}"
            )
        if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < logits.shape[1]:
            raise ValueError(f"query_y must lie in 0..{logits.shape[1] - 1}, got {y.tolist()}")
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def accuracy(self, task: Task) -> float:
        """Fraction of the episode's queries classified correctly."""
        pred = self(task.support_x, task.support_y, task.query_x).argmax(-1)
        return float((pred == task.query_y).float().mean())
