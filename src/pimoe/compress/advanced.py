"""The compatibility names ``AdvancedArchitectureConfig`` / ``AdvancedArchitectureOptimizer`` over
:class:`ArchitectureConfig` / :class:`ArchitectureOptimizer` (re-exported by :mod:`pimoe.compat`).

``optimizer.optimize_architecture(model, input_shape)`` returns the optimized model; the example
batch for the measurements is drawn from a seeded standard normal of that
shape (or is the tensor given), and the measurements stay available as ``last_report``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pimoe.compress.distill import Batch
from pimoe.compress.optimizer import ArchitectureConfig, ArchitectureOptimizer
from pimoe.compress.report import CompressionReport

OPTIMIZATION_LEVELS = ("basic", "standard", "advanced", "ultra")


@dataclass
class AdvancedArchitectureConfig(ArchitectureConfig):
    """:class:`ArchitectureConfig` plus two fields kept for compatibility.

    Attributes:
        optimization_level: one of ``basic``, ``standard``, ``advanced``, ``ultra``; recorded for
            compatibility only: the ``enable_*`` flags and ratios decide what runs.
        enable_model_compression: ``False`` turns every step off (the model is copied unchanged).
    """

    optimization_level: str = "standard"
    enable_model_compression: bool = True

    def validate(self) -> None:
        super().validate()
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization_level must be one of {OPTIMIZATION_LEVELS}, got {self.optimization_level!r}"
            )

    def enabled_steps(self) -> list[str]:
        return super().enabled_steps() if self.enable_model_compression else []


class AdvancedArchitectureOptimizer(ArchitectureOptimizer):
    """:class:`ArchitectureOptimizer` with the compatibility method ``optimize_architecture``."""

    last_report: CompressionReport | None = None

    def optimize_architecture(
        self,
        model: nn.Module,
        input_shape: Sequence[int] | Tensor | tuple[Tensor, ...],
        *,
        distill_data: Iterable[Batch] | None = None,
        seed: int = 0,
    ) -> nn.Module:
        """The optimized copy of ``model``; its report is kept in ``self.last_report``.

        Args:
            input_shape: the shape of a float input batch (e.g. ``(32, 128)``), or the example
                input tensor(s) themselves (needed for integer inputs such as token ids).
            distill_data: batches for the distill step (it is skipped, and says so, without them).
        """
        if isinstance(input_shape, Tensor) or (
            isinstance(input_shape, tuple)
            and input_shape
            and all(isinstance(t, Tensor) for t in input_shape)
        ):
            example: Batch = input_shape
        elif all(isinstance(d, int) and d > 0 for d in input_shape) and len(input_shape) > 0:
            example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
        else:
            raise ValueError(
                f"input_shape must be positive ints or example tensors, got {input_shape!r}"
            )
        result = self.optimize(model, example, distill_data=distill_data)
        self.last_report = result.report
        return result.model
