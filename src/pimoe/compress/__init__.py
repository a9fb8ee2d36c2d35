"""pimoe.compress: model compression the torchao way.

One in-place verb, :func:`compress_` ``(model, config_or_configs, filter_fn=None)``, and one small
config per technique (:mod:`~pimoe.compress.configs`: int8 dynamic / weight-only / static, int4
weight-only, casts, embeddings, low rank, magnitude / neuron / head / conv-channel pruning, expert
drop / merge, distillation), each registered to its handler (:mod:`~pimoe.compress.handlers`,
:func:`register_compress_handler`). :class:`ArchitectureOptimizer` applies a list of configs to a
copy and measures each step; :class:`ArchitectureConfig` maps the original flat knobs onto
configs. :func:`save_compressed` / :func:`load_compressed` write and read self-contained folders.
See ``docs/compress.md``.
"""

from pimoe.compress import handlers as _handlers  # registers every config's handler
from pimoe.compress.api import (
    CompressConfig,
    FilterFn,
    Measure,
    StepContext,
    compress_,
    register_compress_handler,
)
from pimoe.compress.configs import (
    CastConfig,
    ConvChannelPruneConfig,
    DistillConfig,
    EmbeddingQuantConfig,
    ExpertDropConfig,
    ExpertMergeConfig,
    HeadPruneConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8ExpertsConfig,
    Int8WeightOnlyConfig,
    LowRankConfig,
    MagnitudePruneConfig,
    NeuronPruneConfig,
    StaticInt8Config,
)
from pimoe.compress.distill import DistillResult, distill
from pimoe.compress.embedding import Int4Embedding
from pimoe.compress.heads import PrunedMultiheadAttention
from pimoe.compress.lowrank import LowRankLinear
from pimoe.compress.moe import drop_experts, merge_similar_experts
from pimoe.compress.optimizer import ArchitectureConfig, ArchitectureOptimizer, OptimizeResult
from pimoe.compress.prune import sparsity
from pimoe.compress.quantize import FullRangeDynamicLinear, cast, quantize_dynamic_int8, saved_bytes
from pimoe.compress.quantize_experts import Int8StackedExperts
from pimoe.compress.report import CompressionReport, StepResult
from pimoe.compress.saved import load_compressed, save_compressed
from pimoe.compress.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    quantize_weight_only_int4,
    quantize_weight_only_int8,
)

__all__ = [
    # lists of configs, the original knobs, files
    "ArchitectureConfig",
    "ArchitectureOptimizer",
    # one config per technique
    "CastConfig",
    # the verb, its registry and report
    "CompressConfig",
    "CompressionReport",
    "ConvChannelPruneConfig",
    "DistillConfig",
    "DistillResult",
    "EmbeddingQuantConfig",
    "ExpertDropConfig",
    "ExpertMergeConfig",
    "FilterFn",
    # the modules the handlers build; distillation and sparsity as standalone tools
    "FullRangeDynamicLinear",
    "HeadPruneConfig",
    "Int4Embedding",
    "Int4WeightOnlyConfig",
    "Int4WeightOnlyLinear",
    "Int8DynamicConfig",
    "Int8ExpertsConfig",
    "Int8StackedExperts",
    "Int8WeightOnlyConfig",
    "Int8WeightOnlyLinear",
    "LowRankConfig",
    "LowRankLinear",
    "MagnitudePruneConfig",
    "Measure",
    "NeuronPruneConfig",
    "OptimizeResult",
    "PrunedMultiheadAttention",
    "StaticInt8Config",
    "StepContext",
    "StepResult",
    # building blocks kept for existing callers (benchmarks, pimoe.search); prefer compress_
    "cast",
    "compress_",
    "distill",
    "drop_experts",
    "load_compressed",
    "merge_similar_experts",
    "quantize_dynamic_int8",
    "quantize_weight_only_int4",
    "quantize_weight_only_int8",
    "register_compress_handler",
    "save_compressed",
    "saved_bytes",
    "sparsity",
]
del _handlers
