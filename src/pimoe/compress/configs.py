"""One small config per compression technique, each checking its own settings when it is built.

Pass them to :func:`~pimoe.compress.compress_` (alone or as a list, applied in order). Their
handlers live in :mod:`pimoe.compress.handlers`. Example::

    from pimoe.compress import Int8DynamicConfig, EmbeddingQuantConfig, compress_
    report = compress_(model, [Int8DynamicConfig(), EmbeddingQuantConfig(bits=4)])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from pimoe.compress.api import CompressConfig
from pimoe.compress.distill import Batch, LossKind, default_output_fn


def _fraction(name: str, value: float, *, low_open: bool = True, high_open: bool = True) -> None:
    ok = (value > 0.0 if low_open else value >= 0.0) and (
        value < 1.0 if high_open else value <= 1.0
    )
    if not ok:
        bounds = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


@dataclass
class Int8DynamicConfig(CompressConfig):
    """Dynamic int8 (torch.ao) of ``nn.Linear`` and ``nn.LSTM``: int8 weights, activations
    quantized per call. CPU inference only.

    Attributes:
        per_channel: one weight scale per output channel (LSTMs: per tensor).
        full_range: 8-bit activations and 7-bit weights instead of torch.ao's 7-bit activations
            (the measured better choice on CPUs without VNNI; see ``docs/compress.md``).
        lstm: also quantize ``nn.LSTM`` modules.
    """

    name: ClassVar[str] = "int8_dynamic"
    quantizes: ClassVar[bool] = True
    per_channel: bool = True
    full_range: bool = True
    lstm: bool = True


@dataclass
class Int8WeightOnlyConfig(CompressConfig):
    """``nn.Linear`` -> :class:`~pimoe.compress.weight_only.Int8WeightOnlyLinear` (int8 weights, one
    scale per output channel, dequantized in ``forward``: any device and float dtype)."""

    name: ClassVar[str] = "int8_weight_only"
    quantizes: ClassVar[bool] = True


@dataclass
class Int4WeightOnlyConfig(CompressConfig):
    """``nn.Linear`` -> :class:`~pimoe.compress.weight_only.Int4WeightOnlyLinear` (4-bit codes packed
    two per byte, one scale per ``group_size`` inputs); layers whose width ``group_size`` does not
    divide stay in float."""

    name: ClassVar[str] = "int4_weight_only"
    quantizes: ClassVar[bool] = True
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be even and >= 2, got {self.group_size}")


@dataclass
class Int8ExpertsConfig(CompressConfig):
    """The ``StackedExperts`` of every PiMoE layer -> ``Int8StackedExperts`` (int8 weights, one
    scale per output row of each expert)."""

    name: ClassVar[str] = "int8_experts"
    quantizes: ClassVar[bool] = True


@dataclass
class StaticInt8Config(CompressConfig):
    """Static int8 (torch.ao eager mode, x86 backend) of every ``nn.Linear`` and ``nn.Conv2d``:
    each is wrapped between a quantize step whose scale is calibrated on ``calibration`` and a
    dequantize step, so any model works (no graph tracing). CPU inference only.

    Attributes:
        calibration: batches (a tensor or a tuple of positional arguments each) run through the
            model to record activation ranges; at least one.
    """

    name: ClassVar[str] = "int8_static"
    quantizes: ClassVar[bool] = True
    not_saved: ClassVar[tuple[str, ...]] = ("calibration",)
    calibration: Iterable[Batch] | None = None

    def __post_init__(self) -> None:
        if self.calibration is not None:
            self.calibration = list(self.calibration)
            if not self.calibration:
                raise ValueError("calibration is empty: static int8 needs at least one batch")


@dataclass
class CastConfig(CompressConfig):
    """All floating-point parameters and buffers to ``dtype`` (inputs must match or use autocast)."""

    name: ClassVar[str] = "cast"
    quantizes: ClassVar[bool] = True
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(
                f"dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}"
            )


@dataclass
class EmbeddingQuantConfig(CompressConfig):
    """``nn.Embedding`` modules whose name matches ``patterns`` -> 8-bit (torch.ao) or packed 4-bit
    rows (``group_size`` values per scale); embeddings tied to another module are skipped."""

    name: ClassVar[str] = "embeddings"
    quantizes: ClassVar[bool] = True
    bits: int = 4
    patterns: tuple[str, ...] = ("*word_embeddings",)
    group_size: int = 16

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"embedding bits must be 4 or 8, got {self.bits}")
        self.patterns = tuple(self.patterns)
        if not self.patterns:
            raise ValueError("patterns must name at least one embedding pattern")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be even and >= 2, got {self.group_size}")


@dataclass
class LowRankConfig(CompressConfig):
    """``nn.Linear`` -> :class:`~pimoe.compress.lowrank.LowRankLinear` by truncated SVD where it
    saves parameters. One rule: ``ratio`` (each layer keeps at most this fraction of its weight's
    parameters, in (0, 1)) or ``energy`` (smallest rank keeping this fraction of ``sum(s**2)``,
    in (0, 1]); ``energy=0.95`` when neither is given."""

    name: ClassVar[str] = "low_rank"
    ratio: float | None = None
    energy: float | None = None
    min_features: int = 1

    def __post_init__(self) -> None:
        if self.ratio is not None and self.energy is not None:
            raise ValueError("give either ratio or energy, not both")
        if self.ratio is None and self.energy is None:
            self.energy = 0.95
        if self.ratio is not None:
            _fraction("low-rank ratio", self.ratio)
        if self.energy is not None:
            _fraction("low-rank energy", self.energy, high_open=False)
        if self.min_features < 1:
            raise ValueError(f"min_features must be >= 1, got {self.min_features}")


@dataclass
class MagnitudePruneConfig(CompressConfig):
    """Zero the ``amount`` smallest-magnitude ``nn.Linear`` weights (``scope="global"``: ranked
    together; ``"layer"``: per layer), permanently; no structure changes."""

    name: ClassVar[str] = "magnitude_prune"
    changes_structure: ClassVar[bool] = False
    amount: float = 0.5
    scope: Literal["global", "layer"] = "global"

    def __post_init__(self) -> None:
        _fraction("amount", self.amount, low_open=False)
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {self.scope!r}")


@dataclass
class NeuronPruneConfig(CompressConfig):
    """Remove the ``amount`` least important hidden neurons of every dense FFN (pimoe ``FFN`` /
    ``SwiGLU``, Hugging Face BERT intermediate/output): smaller Linears."""

    name: ClassVar[str] = "neuron_prune"
    amount: float = 0.25

    def __post_init__(self) -> None:
        _fraction("amount", self.amount)


@dataclass
class HeadPruneConfig(CompressConfig):
    """Remove the ``amount`` least important heads of every ``nn.MultiheadAttention`` and Hugging
    Face BERT attention: smaller projections."""

    name: ClassVar[str] = "head_prune"
    amount: float = 0.25

    def __post_init__(self) -> None:
        _fraction("amount", self.amount)


@dataclass
class ConvChannelPruneConfig(CompressConfig):
    """Remove the ``amount`` least important output channels of each ``nn.Conv2d`` whose consumer
    is found in an ``nn.Sequential`` (the next ``Conv2d``, or a ``Flatten`` + ``Linear``), with
    any ``BatchNorm2d`` between them (:func:`~pimoe.compress.conv.prune_conv_channels`)."""

    name: ClassVar[str] = "conv_channel_prune"
    amount: float = 0.25

    def __post_init__(self) -> None:
        _fraction("amount", self.amount)


@dataclass
class ExpertDropConfig(CompressConfig):
    """Drop the ``amount`` of each PiMoE layer's experts with the smallest weight norm."""

    name: ClassVar[str] = "expert_drop"
    amount: float = 0.25

    def __post_init__(self) -> None:
        _fraction("amount", self.amount)


@dataclass
class ExpertMergeConfig(CompressConfig):
    """Merge each PiMoE layer's experts down to ``num_experts`` (most similar router rows first)."""

    name: ClassVar[str] = "expert_merge"
    num_experts: int = 2

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")


@dataclass
class DistillConfig(CompressConfig):
    """Train the model to reproduce ``teacher`` (default: the model as it was before
    ``compress_`` ran) on ``data`` (:func:`~pimoe.compress.distill.distill`); pruned zeros stay
    zero. Must come before any quantization."""

    name: ClassVar[str] = "distill"
    changes_structure: ClassVar[bool] = False
    trains: ClassVar[bool] = True
    not_saved: ClassVar[tuple[str, ...]] = ("data", "teacher", "output_fn")
    data: Iterable[Batch] | None = None
    epochs: int = 1
    steps: int | None = None
    lr: float = 1e-3
    temperature: float = 2.0
    loss: LossKind = "kl"
    output_fn: Callable[[Any], Tensor] = default_output_fn
    teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError(f"epochs and steps must be >= 1, got {self.epochs}, {self.steps}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"lr and temperature must be > 0, got {self.lr}, {self.temperature}")
        if self.loss not in ("kl", "mse", "cosine"):
            raise ValueError(f"loss must be 'kl', 'mse' or 'cosine', got {self.loss!r}")


__all__ = [
    "CastConfig",
    "ConvChannelPruneConfig",
    "DistillConfig",
    "EmbeddingQuantConfig",
    "ExpertDropConfig",
    "ExpertMergeConfig",
    "HeadPruneConfig",
    "Int4WeightOnlyConfig",
    "Int8DynamicConfig",
    "Int8ExpertsConfig",
    "Int8WeightOnlyConfig",
    "LowRankConfig",
    "MagnitudePruneConfig",
    "NeuronPruneConfig",
    "StaticInt8Config",
]
