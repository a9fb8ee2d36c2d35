"""Modality-routed Mixture-of-Experts fusion (LIMoE-style, Mustafa et al. 2022).

All modalities' tokens go through one transformer block whose feed-forward is a
:class:`ModalityMoE`: each modality has its own :class:`pimoe.moe.PiMoE` (own router) whose experts
are the ``shared`` experts, common to every modality, plus that modality's own experts. The shared
expert modules are the same objects in every modality's layer, so they learn from all tokens.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from pimoe.fusion.layers import Fusion
from pimoe.moe import FFN, PiMoE


class ModalityMoE(nn.Module):
    """Per-modality routing over shared + modality-specific experts.

    Args:
        modalities: names of the modalities.
        d_model: token width.
        shared_experts: experts every modality's router can pick.
        experts_per_modality: experts only that modality's router can pick.
        top_k: experts per token.
        ffn_dim: hidden width of each expert (default ``2 * d_model``).
    """

    def __init__(
        self,
        modalities: list[str],
        d_model: int,
        shared_experts: int = 2,
        experts_per_modality: int = 2,
        top_k: int = 2,
        ffn_dim: int | None = None,
    ) -> None:
        super().__init__()
        ffn_dim = ffn_dim or 2 * d_model
        if shared_experts + experts_per_modality < top_k:
            raise ValueError(
                f"top_k={top_k} exceeds the {shared_experts + experts_per_modality} experts per modality"
            )
        self.shared = nn.ModuleList(FFN(d_model, ffn_dim) for _ in range(shared_experts))
        self.layers = nn.ModuleDict(
            {
                m: PiMoE(
                    d_model,
                    top_k=top_k,
                    experts=[
                        *self.shared,
                        *(FFN(d_model, ffn_dim) for _ in range(experts_per_modality)),
                    ],
                )
                for m in modalities
            }
        )
        self.aux_loss: Tensor = torch.zeros(())

    def forward(self, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{m: [B, S_m, d]}`` -> same shapes; ``aux_loss`` = mean load-balancing loss of the layers."""
        out = {m: self.layers[m](x) for m, x in tokens.items()}
        self.aux_loss = torch.stack([cast(PiMoE, self.layers[m]).aux_loss for m in tokens]).mean()
        return out

    def shared_fraction(self) -> dict[str, float]:
        """Per modality, the share of the last call's routed assignments that went to shared experts."""
        n = len(self.shared)
        result = {}
        for m, layer in self.layers.items():
            stats = cast(PiMoE, layer).last_stats
            if stats is not None:
                load = stats.tokens_per_expert.float()
                result[m] = float(load[:n].sum() / load.sum().clamp_min(1e-9))
        return result


class ModalityMoEFusion(Fusion):
    """Projected tokens + a learned modality embedding, concatenated into one sequence; pre-norm
    self-attention over all of them, then the :class:`ModalityMoE` feed-forward (each residual);
    each modality mean-pooled, concatenated, projected to ``d_model``. Add ``aux_coef * aux_loss``
    to the training loss to balance the experts."""

    def __init__(
        self,
        modalities: dict[str, int],
        d_model: int = 64,
        heads: int = 4,
        shared_experts: int = 2,
        experts_per_modality: int = 2,
        top_k: int = 2,
        allow_missing: bool = False,
    ) -> None:
        super().__init__(modalities, d_model, allow_missing)
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.embed = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(d_model) * 0.02) for m in modalities}
        )
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.moe = ModalityMoE(
            list(modalities), d_model, shared_experts, experts_per_modality, top_k
        )
        self.out = nn.Sequential(nn.Linear(len(modalities) * d_model, d_model), nn.GELU())

    @property
    def aux_loss(self) -> Tensor:
        return self.moe.aux_loss

    def forward(self, inputs: dict[str, Tensor | None]) -> Tensor:
        """``{m: [B, (S_m,) D_m]}`` -> ``[B, d_model]``."""
        tokens = {m: t + self.embed[m] for m, t in self.tokens(inputs).items()}
        lengths = [t.shape[1] for t in tokens.values()]
        x = torch.cat(list(tokens.values()), 1)  # [B, S, d]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        parts = dict(zip(tokens, self.norm2(x).split(lengths, 1)))
        moe_out = self.moe(parts)
        x = x + torch.cat(list(moe_out.values()), 1)
        return self.out(torch.cat([p.mean(1) for p in x.split(lengths, 1)], -1))
