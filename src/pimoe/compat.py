"""The seed document's inference names as thin adapters over :mod:`pimoe.infer` and :mod:`pimoe.compress`.

- :class:`UltraFastInferenceConfig` holds the seed's fields and maps them to an
  :class:`~pimoe.infer.InferenceConfig` (compile, bf16 autocast, result cache) and, with
  ``enable_model_compression``, an :class:`~pimoe.compress.ArchitectureConfig` (pruning, quantization).
- :class:`UltraFastInferenceEngine` is an :class:`~pimoe.infer.InferenceEngine` with those
  settings: it compresses each model once (on its first call, with that call's inputs as the
  example batch) and runs the compressed copy.
- :class:`AdvancedArchitectureConfig` / :class:`AdvancedArchitectureOptimizer` (from
  :mod:`pimoe.compress.advanced`): the seed's names and ``optimize_architecture(model, input_shape)``.
- :class:`InferenceCache` accepts the seed's ``cache_strategy=`` as an alias of ``policy=``;
  :class:`IntelligentCaching` is that cache with ``get_or_compute(key, fn)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from pimoe.adapt import AdaptConfig, AdaptiveLearning
from pimoe.compress import ArchitectureConfig, CompressionReport
from pimoe.compress.advanced import AdvancedArchitectureConfig, AdvancedArchitectureOptimizer

# federated training over simulated edge nodes; Flower loads on first use
from pimoe.federated.edge import EdgeComputing
from pimoe.fusion import FusionConfig, build_fusion
from pimoe.infer import InferenceCache as _InferenceCache
from pimoe.infer import InferenceConfig, InferenceEngine
from pimoe.privacy.checkpoint import open_state_dict, seal_state_dict
from pimoe.privacy.crypto import generate_key, load_key


class InferenceCache(_InferenceCache):
    """:class:`pimoe.infer.InferenceCache` that also takes ``cache_strategy`` (the seed's name for ``policy``)."""

    def __init__(
        self,
        max_size: int = 1024,
        *,
        cache_strategy: str | None = None,
        policy: str | None = None,
        **kwargs: Any,
    ) -> None:
        if cache_strategy is not None and policy is not None and cache_strategy != policy:
            raise ValueError(
                f"cache_strategy={cache_strategy!r} and policy={policy!r} disagree; give one"
            )
        super().__init__(max_size=max_size, policy=cache_strategy or policy or "lru", **kwargs)


class IntelligentCaching(InferenceCache):
    """The seed's "intelligent cache": an :class:`InferenceCache` (LRU by default).

    ``IntelligentCaching(max_size=..., cache_strategy=...)`` or ``IntelligentCaching(config)`` with
    an :class:`UltraFastInferenceConfig` (its ``cache_size`` becomes ``max_size``). Use
    ``get_or_compute(key, fn)``; the seed's one-argument ``get_or_compute(output)`` has no key to
    look up and is not supported.
    """

    def __init__(self, config: UltraFastInferenceConfig | None = None, **kwargs: Any) -> None:
        if config is not None:
            kwargs.setdefault("max_size", max(1, config.cache_size))
        super().__init__(**kwargs)


@dataclass
class UltraFastInferenceConfig:
    """The seed's engine settings.

    Args:
        cache_size: entries of the engine's LRU result cache (0: no cache).
        enable_model_compression: compress each model once before serving it; the steps are the
            enabled ones of ``enable_pruning`` (``sparsity_ratio`` magnitude pruning) and
            ``enable_quantization`` (``quantization_bits``: 8 dynamic int8, 4 int4 weight-only, 16 bf16).
        enable_torch_compile: ``torch.compile`` the (compressed) model, falling back to eager with
            a warning where compilation is unavailable or fails.
        enable_mixed_precision: bfloat16 autocast (``mixed_precision_dtype``) on ``device``.
    """

    cache_size: int = 0
    enable_model_compression: bool = False
    enable_pruning: bool = False
    enable_quantization: bool = False
    quantization_bits: int = 8
    sparsity_ratio: float = 0.5
    enable_torch_compile: bool = False
    enable_mixed_precision: bool = False
    mixed_precision_dtype: str = "bfloat16"
    device: str = "cpu"

    def inference_config(self) -> InferenceConfig:
        """The :class:`InferenceConfig` these settings ask for."""
        return InferenceConfig(
            compile=self.enable_torch_compile,
            dtype=self.mixed_precision_dtype if self.enable_mixed_precision else "float32",  # type: ignore[arg-type]
            device=self.device,
            cache_size=self.cache_size,
            optimize=self.architecture_config(),
        )

    def architecture_config(self) -> ArchitectureConfig | None:
        """The compression steps, or None without ``enable_model_compression``."""
        if not self.enable_model_compression:
            return None
        return ArchitectureConfig(
            enable_pruning=self.enable_pruning,
            enable_quantization=self.enable_quantization,
            quantization_bits=self.quantization_bits,
            sparsity_ratio=self.sparsity_ratio,
            latency_repeats=1,
        )


class UltraFastInferenceEngine:
    """``UltraFastInferenceEngine(config).infer(model, inputs)``: an :class:`~pimoe.infer.InferenceEngine`
    configured by :meth:`UltraFastInferenceConfig.inference_config`.

    With compression on, each model is compressed once (on a copy; ``model`` is not changed) with
    its first call's inputs as the example batch; :meth:`report` gives the compression report.
    """

    def __init__(self, config: UltraFastInferenceConfig | None = None) -> None:
        self.config = config if config is not None else UltraFastInferenceConfig()
        self.engine = InferenceEngine(self.config.inference_config())

    def infer(self, model: nn.Module, inputs: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Any:
        """``model(*inputs)`` through the engine (on the compressed copy when compression is on)."""
        return self.engine.infer(model, inputs)

    def report(self, model: nn.Module) -> CompressionReport | None:
        """``model``'s compression report (None without compression or before its first call)."""
        return self.engine.report(model)


class AdvancedSecurity:
    """The seed's security component: ``AdvancedSecurity(config).secure(x)`` seals a tensor or a
    state dict with AES-256-GCM (:func:`pimoe.privacy.checkpoint.seal_state_dict`) and returns the
    sealed bytes; :meth:`open` authenticates and decrypts them (a tensor comes back as ``{"tensor": x}``).

    The key is ``key``, else ``config.encryption_key`` if the config has one, else ``$PIMOE_KEY``
    if set, else a fresh random key (kept in ``.key``). Tampered bytes raise IntegrityError.
    """

    def __init__(self, config: Any = None, *, key: bytes | None = None) -> None:
        key = key if key is not None else getattr(config, "encryption_key", None)
        if key is None:
            key = load_key() if os.environ.get("PIMOE_KEY") else generate_key()
        self.key = key

    def secure(self, data: Tensor | dict[str, Tensor]) -> bytes:
        """``data`` sealed: safetensors bytes inside AES-256-GCM."""
        return seal_state_dict({"tensor": data} if isinstance(data, Tensor) else data, self.key)

    def open(self, blob: bytes) -> dict[str, Tensor]:
        """The tensors sealed by :meth:`secure`."""
        return open_state_dict(blob, self.key)


# The seed's adaptive-learning names: ``AdaptiveLearning(AdaptiveLearningConfig()).adapt(model, (x, y))``.
AdaptiveLearningConfig = AdaptConfig


MultiModalFusionConfig = FusionConfig


class MultiModalFusion(nn.Module):
    """The seed's fusion component: ``MultiModalFusion(FusionConfig(modalities={...}, method=...))``
    (or the same fields as keywords); ``.fuse({modality: [B, (S,) D_m]})`` -> ``[B, d_model]`` with
    the :mod:`pimoe.fusion` layer :func:`~pimoe.fusion.build_fusion` makes."""

    def __init__(self, config: FusionConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise ValueError("give a FusionConfig or keyword fields, not both")
        self.fusion = build_fusion(config if config is not None else FusionConfig(**kwargs))

    def fuse(self, inputs: dict[str, Tensor | None]) -> Tensor:
        """The fused representation ``[B, d_model]``."""
        return self.fusion(inputs)

    forward = fuse


__all__ = [
    "AdaptiveLearning",
    "AdaptiveLearningConfig",
    "AdvancedArchitectureConfig",
    "AdvancedArchitectureOptimizer",
    "AdvancedSecurity",
    "EdgeComputing",
    "InferenceCache",
    "IntelligentCaching",
    "MultiModalFusion",
    "MultiModalFusionConfig",
    "UltraFastInferenceConfig",
    "UltraFastInferenceEngine",
]
