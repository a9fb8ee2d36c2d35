"""pimoe.fusion: multi-modal fusion layers (concat, gated, FiLM, cross-attention, modality-routed
PiMoE), CLIP-style contrastive alignment, and two-sensor digits data."""

from pimoe.fusion.contrastive import ContrastiveAligner, info_nce, recall_at_k
from pimoe.fusion.layers import ConcatFusion, CrossAttentionFusion, FiLMFusion, Fusion, GatedFusion
from pimoe.fusion.model import METHODS, FusionClassifier, FusionConfig, build_fusion
from pimoe.fusion.moe import ModalityMoE, ModalityMoEFusion
from pimoe.fusion.sensors import digit_halves

__all__ = [
    "METHODS",
    "ConcatFusion",
    "ContrastiveAligner",
    "CrossAttentionFusion",
    "FiLMFusion",
    "Fusion",
    "FusionClassifier",
    "FusionConfig",
    "GatedFusion",
    "ModalityMoE",
    "ModalityMoEFusion",
    "build_fusion",
    "digit_halves",
    "info_nce",
    "recall_at_k",
]
