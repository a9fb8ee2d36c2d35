"""pimoe.compress: compression techniques, each usable alone on any ``nn.Module``.

Low-rank factorization (:mod:`~pimoe.compress.lowrank`), pruning (:mod:`~pimoe.compress.prune`),
quantization (:mod:`~pimoe.compress.quantize`) and expert dropping/merging for PiMoE layers
(:mod:`~pimoe.compress.moe`); distillation (:mod:`~pimoe.compress.distill`) to repair them; and
:class:`ArchitectureOptimizer`, which chains them and measures each step in a
:class:`CompressionReport`. See ``docs/compress.md``.
"""

from pimoe.compress.distill import DistillResult, distill, soft_loss
from pimoe.compress.embedding import Int4Embedding, quantize_embeddings
from pimoe.compress.lowrank import (
    FactorizationReport,
    LayerFactorization,
    LowRankLinear,
    factorize,
    rank_for_energy,
    rank_for_ratio,
)
from pimoe.compress.moe import (
    drop_experts,
    experts_to_keep,
    merge_experts,
    merge_similar_experts,
    similar_expert_groups,
)
from pimoe.compress.optimizer import ArchitectureConfig, ArchitectureOptimizer, OptimizeResult
from pimoe.compress.prune import (
    SparsityReport,
    magnitude_prune,
    neuron_scores,
    prune_ffn_neurons,
    sparsity,
)
from pimoe.compress.quantize import (
    FullRangeDynamicLinear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    cast,
    load_weight_only_int4,
    load_weight_only_int8,
    pack_int4,
    quantize_dynamic_int8,
    quantize_embedding_int8,
    quantize_weight_only_int4,
    quantize_weight_only_int8,
    saved_bytes,
    unpack_int4,
)
from pimoe.compress.quantize_experts import Int8StackedExperts, quantize_experts_int8
from pimoe.compress.report import CompressionReport, StepResult, measure
from pimoe.compress.saved import load_compressed, save_compressed

__all__ = [
    "ArchitectureConfig", "ArchitectureOptimizer", "CompressionReport", "DistillResult", "OptimizeResult", "StepResult",
    "FullRangeDynamicLinear", "Int4Embedding", "Int8StackedExperts", "quantize_experts_int8", "load_compressed", "quantize_embeddings", "save_compressed",
    "distill", "measure", "soft_loss",
    "FactorizationReport", "Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "LayerFactorization",
    "LowRankLinear", "SparsityReport", "cast", "drop_experts", "experts_to_keep", "factorize",
    "load_weight_only_int4", "load_weight_only_int8", "magnitude_prune", "merge_experts",
    "merge_similar_experts", "neuron_scores", "pack_int4", "prune_ffn_neurons",
    "quantize_dynamic_int8", "quantize_embedding_int8", "quantize_weight_only_int4",
    "quantize_weight_only_int8", "rank_for_energy", "rank_for_ratio", "saved_bytes",
    "similar_expert_groups", "sparsity", "unpack_int4",
]
