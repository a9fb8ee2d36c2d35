"""One config for every fusion method, a factory, and a classifier head on top of a fusion layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from pimoe.fusion.layers import ConcatFusion, CrossAttentionFusion, FiLMFusion, Fusion, GatedFusion
from pimoe.fusion.moe import ModalityMoEFusion

Method = Literal["concat", "gated", "film", "cross_attention", "moe"]
METHODS: tuple[str, ...] = ("concat", "gated", "film", "cross_attention", "moe")


@dataclass
class FusionConfig:
    """Settings of :func:`build_fusion`.

    Args:
        modalities: ``{name: feature width D_m}``.
        method: ``"concat"``, ``"gated"``, ``"film"``, ``"cross_attention"`` or ``"moe"``
            (modality-routed PiMoE, LIMoE-style).
        d_model: width of the projected tokens and of the fused output.
        heads: attention heads (cross_attention, moe).
        allow_missing: replace missing modalities by a learned token instead of raising.
        shared_experts, experts_per_modality, top_k: the ``"moe"`` method's experts.
    """

    modalities: dict[str, int] = field(default_factory=dict)
    method: Method = "gated"
    d_model: int = 64
    heads: int = 4
    allow_missing: bool = False
    shared_experts: int = 2
    experts_per_modality: int = 2
    top_k: int = 2


def build_fusion(config: FusionConfig) -> Fusion:
    """The fusion layer ``config`` describes."""
    c = config
    if c.method not in METHODS:
        raise ValueError(f"unknown fusion method {c.method!r}; expected one of {METHODS}")
    if c.method == "moe":
        return ModalityMoEFusion(
            c.modalities,
            c.d_model,
            c.heads,
            c.shared_experts,
            c.experts_per_modality,
            c.top_k,
            c.allow_missing,
        )
    if c.method == "cross_attention":
        return CrossAttentionFusion(c.modalities, c.d_model, c.heads, c.allow_missing)
    layer = {"concat": ConcatFusion, "gated": GatedFusion, "film": FiLMFusion}[c.method]
    return layer(c.modalities, c.d_model, c.allow_missing)


class FusionClassifier(nn.Module):
    """``Linear(d_model, num_classes)`` on a fusion layer: ``{m: [B, (S_m,) D_m]}`` -> logits ``[B, C]``."""

    def __init__(self, fusion: Fusion, num_classes: int) -> None:
        super().__init__()
        self.fusion = fusion
        self.head = nn.Linear(fusion.d_model, num_classes)

    def forward(self, inputs: dict[str, Tensor | None]) -> Tensor:
        return self.head(self.fusion(inputs))

    @property
    def aux_loss(self) -> Tensor | float:
        """The fusion layer's load-balancing loss (MoE fusion), else 0."""
        return getattr(self.fusion, "aux_loss", 0.0)
