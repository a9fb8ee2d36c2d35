"""``ArchitectureOptimizer``: a list of compression configs applied to a copy of a model, measured.

The flat ``ArchitectureConfig(...)`` (one set of knobs: ``enable_*`` flags,
``compression_ratio``, ``quantization_bits``, ``sparsity_ratio``, ...) is kept as a front end:
:meth:`ArchitectureConfig.to_configs` maps it onto the configs of :mod:`pimoe.compress.configs`,
which validate the settings (so ``enable_low_rank=True, compression_ratio=1.0`` fails when the
config is built, not in the middle of a run). Asking for 8 bits gives the best measured 8-bit
recipe (dynamic int8 with 8-bit activations plus int4 word embeddings) unless told otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn

from pimoe.compress import configs as step_configs
from pimoe.compress._modules import matches
from pimoe.compress.api import (
    CompressConfig,
    FilterFn,
    Measure,
    check_measure_settings,
    check_order,
    compress_,
)
from pimoe.compress.distill import Batch, LossKind, default_output_fn
from pimoe.compress.report import CompressionReport, FidelityFn

STEP_NAMES = (
    "drop_experts",
    "merge_experts",
    "prune_heads",
    "prune_neurons",
    "low_rank",
    "prune",
    "distill",
    "quantize",
)
_ENABLE_FLAGS = {
    "drop_experts": "enable_expert_drop",
    "merge_experts": "enable_expert_merge",
    "prune_heads": "enable_head_pruning",
    "prune_neurons": "enable_neuron_pruning",
    "low_rank": "enable_low_rank",
    "prune": "enable_pruning",
    "distill": "enable_knowledge_distillation",
    "quantize": "enable_quantization",
}

_SETTINGS = {  # the flat fields each step's config is built from (for error messages)
    "drop_experts": "expert_drop_ratio",
    "merge_experts": "experts_after_merge",
    "prune_heads": "head_prune_ratio",
    "prune_neurons": "neuron_prune_ratio",
    "low_rank": "compression_ratio",
    "prune": "sparsity_ratio",
    "distill": "distill_epochs / distill_steps / distill_lr / distill_temperature / distill_loss",
    "quantize": "quantization_bits / embedding_*",
}


@dataclass
class ArchitectureConfig:
    """Flat compression settings; :meth:`to_configs` turns them into configs.

    Attributes:
        compression_ratio: ``low_rank`` → ``LowRankConfig(ratio=...)``, in (0, 1).
        quantization_bits: ``quantize`` → 8: ``quantization_mode`` ``"dynamic"``
            (``Int8DynamicConfig(full_range=int8_full_range)``), ``"weight_only"``
            (``Int8WeightOnlyConfig``) or ``"static"`` (``StaticInt8Config`` calibrated on the
            distillation batches), plus ``Int8ExpertsConfig`` for PiMoE experts; 4:
            ``Int4WeightOnlyConfig(group_size=32)``; 16: ``CastConfig("bfloat16")``; 32: nothing.
        sparsity_ratio: ``prune`` → ``MagnitudePruneConfig(amount=...)``.
        enable_*: turn each step on; a step in ``order`` runs only when its flag is set.
        order: step names from ``"drop_experts"``, ``"merge_experts"``, ``"prune_heads"``,
            ``"prune_neurons"``, ``"low_rank"``, ``"prune"``, ``"distill"``, ``"quantize"``.
        int8_full_range: dynamic int8 with 8-bit activations (default; ``False``: torch.ao's 7).
        embedding_bits: with the quantize step, word embeddings (``embedding_patterns``) to 4 or 8
            bits; 0 leaves them in float; ``None`` (default) means 4 with 8-bit quantization
            (the measured best recipe) and 0 otherwise.
        expert_drop_ratio, experts_after_merge, head_prune_ratio, neuron_prune_ratio: settings of
            ``ExpertDropConfig``, ``ExpertMergeConfig``, ``HeadPruneConfig``, ``NeuronPruneConfig``.
        distill_*: settings of ``DistillConfig`` (``distill_data``: default training batches).
        fidelity, output_fn, latency_repeats: how :meth:`ArchitectureOptimizer.optimize` measures.
        skip: ``fnmatch`` patterns of module names every step leaves alone.
    """

    compression_ratio: float = 0.5
    quantization_bits: int = 8
    sparsity_ratio: float = 0.5
    enable_pruning: bool = True
    enable_quantization: bool = True
    enable_knowledge_distillation: bool = False
    enable_low_rank: bool = False
    order: list[str] = field(default_factory=lambda: list(STEP_NAMES))
    quantization_mode: str = "dynamic"
    fidelity: str | FidelityFn = "cosine"
    distill_steps: int | None = None
    distill_epochs: int = 1
    distill_lr: float = 1e-3
    distill_temperature: float = 2.0
    distill_loss: LossKind = "kl"
    distill_data: Iterable[Batch] | None = None
    output_fn: Callable[[Any], Tensor] = default_output_fn
    skip: Sequence[str] = ()
    latency_repeats: int = 10
    int8_full_range: bool = True
    embedding_bits: int | None = None
    embedding_patterns: Sequence[str] = ("*word_embeddings",)
    embedding_group_size: int = 16
    enable_expert_drop: bool = False
    enable_expert_merge: bool = False
    enable_head_pruning: bool = False
    enable_neuron_pruning: bool = False
    expert_drop_ratio: float = 0.25
    experts_after_merge: int = 2
    head_prune_ratio: float = 0.25
    neuron_prune_ratio: float = 0.25

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for an unknown step or mode, or any setting its config refuses."""
        unknown = [name for name in self.order if name not in STEP_NAMES]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; choose from {STEP_NAMES}")
        if self.enabled_steps().count("quantize") > 1:
            raise ValueError("quantize can run only once")
        if self.quantization_bits not in (4, 8, 16, 32):
            raise ValueError(
                f"quantization_bits must be 4, 8, 16 or 32, got {self.quantization_bits}"
            )
        if self.quantization_mode not in ("dynamic", "weight_only", "static"):
            raise ValueError(
                f"quantization_mode must be 'dynamic', 'weight_only' or 'static', got {self.quantization_mode!r}"
            )
        if self.embedding_bits not in (None, 0, 4, 8):
            raise ValueError(f"embedding_bits must be None, 0, 4 or 8, got {self.embedding_bits}")
        if self.embedding_bits and self.quantization_bits == 16:
            raise ValueError(
                "embedding_bits needs float32 activations; it cannot be combined with quantization_bits=16"
            )
        check_measure_settings(self.fidelity, self.latency_repeats)
        check_order(self.to_configs())

    def enabled_steps(self) -> list[str]:
        """The names in ``order`` whose ``enable_*`` flag is set, in order."""
        return [name for name in self.order if getattr(self, _ENABLE_FLAGS[name])]

    def filter_fn(self) -> FilterFn | None:
        """``skip`` as a ``compress_`` filter (``None`` without patterns)."""
        patterns = tuple(self.skip)
        return (lambda _module, name: not matches(name, patterns)) if patterns else None

    def to_configs(self, distill_data: Iterable[Batch] | None = None) -> list[CompressConfig]:
        """The configs of the enabled steps, in order (``distill_data`` overrides the field)."""
        data = distill_data if distill_data is not None else self.distill_data
        structured: dict[str, Callable[[], CompressConfig]] = {
            "drop_experts": lambda: step_configs.ExpertDropConfig(self.expert_drop_ratio),
            "merge_experts": lambda: step_configs.ExpertMergeConfig(self.experts_after_merge),
            "prune_heads": lambda: step_configs.HeadPruneConfig(self.head_prune_ratio),
            "prune_neurons": lambda: step_configs.NeuronPruneConfig(self.neuron_prune_ratio),
            "low_rank": lambda: step_configs.LowRankConfig(ratio=self.compression_ratio),
            "prune": lambda: step_configs.MagnitudePruneConfig(self.sparsity_ratio),
            "distill": lambda: step_configs.DistillConfig(
                data=data,
                epochs=self.distill_epochs,
                steps=self.distill_steps,
                lr=self.distill_lr,
                temperature=self.distill_temperature,
                loss=self.distill_loss,
                output_fn=self.output_fn,
            ),
        }
        configs: list[CompressConfig] = []
        for name in self.enabled_steps():
            try:
                configs += (
                    self._quantize_configs(data) if name == "quantize" else [structured[name]()]
                )
            except ValueError as error:  # name the flat field, not only the config's own
                raise ValueError(f"{_SETTINGS[name]}: {error}") from error
        return configs

    def _quantize_configs(self, data: Iterable[Batch] | None) -> list[CompressConfig]:
        bits = self.quantization_bits
        configs: list[CompressConfig]
        if bits == 32:
            configs = []
        elif bits == 16:
            configs = [step_configs.CastConfig("bfloat16")]
        elif bits == 4:
            configs = [step_configs.Int4WeightOnlyConfig(32)]
        elif self.quantization_mode == "static":
            configs = [step_configs.StaticInt8Config(calibration=data)]
        elif self.quantization_mode == "weight_only":
            configs = [step_configs.Int8WeightOnlyConfig(), step_configs.Int8ExpertsConfig()]
        else:
            configs = [
                step_configs.Int8DynamicConfig(full_range=self.int8_full_range),
                step_configs.Int8ExpertsConfig(),
            ]
        embedding_bits = (
            (4 if bits == 8 else 0) if self.embedding_bits is None else self.embedding_bits
        )
        if embedding_bits:
            configs.append(
                step_configs.EmbeddingQuantConfig(
                    embedding_bits, tuple(self.embedding_patterns), self.embedding_group_size
                )
            )
        return configs


class OptimizeResult(NamedTuple):
    """What :meth:`ArchitectureOptimizer.optimize` returns: the new model and its report."""

    model: nn.Module
    report: CompressionReport


class ArchitectureOptimizer:
    """A list of compression configs, applied with :func:`~pimoe.compress.compress_` to a copy.

    Example::

        optimizer = ArchitectureOptimizer([step_configs.LowRankConfig(ratio=0.5), step_configs.Int8DynamicConfig()])
        small, report = optimizer.optimize(model, x)      # model itself is unchanged
        ArchitectureOptimizer(ArchitectureConfig(quantization_bits=8))   # the original knobs

    Args:
        configs: the configs, or an :class:`ArchitectureConfig` (mapped by ``to_configs``; its
            ``skip``, ``fidelity``, ``output_fn`` and ``latency_repeats`` are used too).
        filter_fn, fidelity, output_fn, latency_repeats: see :func:`~pimoe.compress.compress_`
            and :class:`~pimoe.compress.api.Measure` (ignored for an ``ArchitectureConfig``).
    """

    def __init__(
        self,
        configs: ArchitectureConfig | Sequence[CompressConfig] | None = None,
        *,
        filter_fn: FilterFn | None = None,
        fidelity: str | FidelityFn = "cosine",
        output_fn: Callable[[Any], Tensor] = default_output_fn,
        latency_repeats: int = 10,
    ) -> None:
        self.config = configs if isinstance(configs, ArchitectureConfig) else None
        if isinstance(configs, ArchitectureConfig):
            self.configs = configs.to_configs()
            filter_fn, fidelity = configs.filter_fn(), configs.fidelity
            output_fn, latency_repeats = configs.output_fn, configs.latency_repeats
        else:
            self.configs = list(ArchitectureConfig().to_configs() if configs is None else configs)
        check_order(self.configs)
        self.filter_fn, self.fidelity, self.output_fn, self.latency_repeats = (
            filter_fn,
            fidelity,
            output_fn,
            latency_repeats,
        )

    def _configs_for(
        self, model: nn.Module, distill_data: Iterable[Batch] | None
    ) -> list[CompressConfig]:
        """The configs with this run's data: distillation batches (the original model as
        teacher unless one is set) and static int8 calibration batches."""
        configs = (
            self.config.to_configs(distill_data) if self.config is not None else list(self.configs)
        )
        out: list[CompressConfig] = []
        for config in configs:
            if isinstance(config, step_configs.DistillConfig):
                config = dataclasses.replace(
                    config,
                    data=config.data if distill_data is None else distill_data,
                    teacher=config.teacher if config.teacher is not None else model,
                )
            elif (
                isinstance(config, step_configs.StaticInt8Config)
                and config.calibration is None
                and distill_data is not None
            ):
                config = dataclasses.replace(config, calibration=distill_data)
            out.append(config)
        return out

    def optimize(
        self,
        model: nn.Module,
        example_inputs: Batch,
        *,
        distill_data: Iterable[Batch] | None = None,
        labels: Tensor | None = None,
    ) -> OptimizeResult:
        """Compress a deep copy of ``model`` (``model`` is not changed) and measure every step on
        ``example_inputs`` against ``model``'s outputs (accuracy against ``labels`` when given
        and ``fidelity="accuracy"``). ``distill_data`` feeds distillation and static calibration."""
        was_training = model.training
        compressed = copy.deepcopy(model)
        measure_on = Measure(
            example_inputs, self.fidelity, self.output_fn, labels, self.latency_repeats
        )
        try:
            report = compress_(
                compressed,
                self._configs_for(model, distill_data),
                self.filter_fn,
                measure_on=measure_on,
            )
        except RuntimeError as error:
            raise RuntimeError(f"{error}; the input model is unchanged") from error
        model.train(was_training)
        return OptimizeResult(compressed, report)

    def compress(
        self, model: nn.Module, *, distill_data: Iterable[Batch] | None = None
    ) -> nn.Module:
        """The configs applied to a deep copy of ``model``, without measurements (eval mode)."""
        was_training = model.training
        compressed = copy.deepcopy(model)
        compress_(compressed, self._configs_for(model, distill_data), self.filter_fn)
        model.train(was_training)
        return compressed
