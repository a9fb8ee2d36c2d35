"""CLIP-style contrastive alignment of two encoders (Radford et al. 2021): symmetric InfoNCE over
the in-batch similarity matrix with a learnable temperature, and recall@k for retrieval."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def info_nce(emb_a: Tensor, emb_b: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE: row ``i`` of ``emb_a [B, E]`` and ``emb_b [B, E]`` (L2-normalized) is the
    positive pair, the other rows are negatives; mean of the a->b and b->a cross-entropies."""
    if emb_a.shape != emb_b.shape or emb_a.dim() != 2:
        raise ValueError(
            f"need two [B, E] embeddings of one shape, got {tuple(emb_a.shape)} and {tuple(emb_b.shape)}"
        )
    logits = logit_scale * emb_a @ emb_b.t()  # [B, B]
    target = torch.arange(emb_a.shape[0], device=emb_a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class ContrastiveAligner(nn.Module):
    """Two encoders mapping each modality to ``[B, E]``, aligned in one normalized space.

    The temperature is learned as ``logit_scale = exp(s)``, initialized to ``1 / init_temperature``
    and clamped at ``max_logit_scale`` (CLIP: 0.07 and 100).
    """

    def __init__(
        self,
        encoder_a: nn.Module,
        encoder_b: nn.Module,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.encoder_a, self.encoder_b = encoder_a, encoder_b
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    @property
    def logit_scale(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def embed_a(self, x: Tensor) -> Tensor:
        """Normalized embeddings ``[B, E]`` of modality a."""
        return F.normalize(self.encoder_a(x), dim=-1)

    def embed_b(self, x: Tensor) -> Tensor:
        """Normalized embeddings ``[B, E]`` of modality b."""
        return F.normalize(self.encoder_b(x), dim=-1)

    def forward(self, xa: Tensor, xb: Tensor) -> Tensor:
        """Contrastive loss of a batch of pairs ``(xa[i], xb[i])``."""
        return info_nce(self.embed_a(xa), self.embed_b(xb), self.logit_scale)


def recall_at_k(queries: Tensor, gallery: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Fraction of queries ``i`` (``[N, E]``) whose match ``gallery[i]`` is among the ``k`` most
    cosine-similar gallery rows (``[N, E]``)."""
    if queries.shape != gallery.shape or queries.dim() != 2:
        raise ValueError(
            f"need [N, E] queries and gallery of one shape, got {tuple(queries.shape)}, {tuple(gallery.shape)}"
        )
    sims = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).t()  # [N, N]
    true = sims.diagonal().unsqueeze(1)
    rank = (sims > true).sum(1)  # gallery rows strictly more similar than the match
    return {k: float((rank < k).float().mean()) for k in ks}
