"""ArchitectureOptimizer: apply the enabled compression steps in order and measure each one.

The seed's knobs (compression ratio, quantization bits, sparsity ratio and the ``enable_*`` flags)
map onto the techniques of this package: low rank → :func:`~pimoe.compress.lowrank.factorize`,
prune → :func:`~pimoe.compress.prune.magnitude_prune`, distill →
:func:`~pimoe.compress.distill.distill` with the original model as teacher, quantize →
:func:`~pimoe.compress.quantize.quantize_dynamic_int8` / ``quantize_weight_only_int8`` /
``quantize_weight_only_int4`` / :func:`~pimoe.compress.quantize.cast` (bfloat16), plus
:func:`~pimoe.compress.embedding.quantize_embeddings`. Structured steps (drop / merge experts,
prune attention heads / FFN neurons) come from :mod:`pimoe.compress.structured`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from pimoe.compress._modules import float_weight_modules
from pimoe.compress.distill import Batch, LossKind, default_output_fn, distill
from pimoe.compress.embedding import quantize_embeddings
from pimoe.compress.lowrank import factorize
from pimoe.compress.prune import magnitude_prune
from pimoe.compress.quantize import cast, quantize_dynamic_int8, quantize_weight_only_int4, quantize_weight_only_int8
from pimoe.compress.quantize_experts import quantize_experts_int8
from pimoe.compress.report import FIDELITY_FNS, CompressionReport, FidelityFn, measure, run_model
from pimoe.compress.static import quantize_static_int8
from pimoe.compress.structured import (
    drop_experts_everywhere,
    merge_experts_everywhere,
    prune_attention_heads_noted,
    prune_neurons,
)

STEP_NAMES = ("drop_experts", "merge_experts", "prune_heads", "prune_neurons", "low_rank", "prune", "distill", "quantize")
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


@dataclass
class ArchitectureConfig:
    """Which compression steps to run, in which order, and with which settings.

    Attributes:
        compression_ratio: low-rank target, passed to ``factorize(ratio=...)``: each factorized
            Linear keeps at most this fraction of its weight's parameters. In (0, 1].
        quantization_bits: 8 (int8 Linears, see ``quantization_mode``, and int8 weight-only
            PiMoE ``StackedExperts``), 4 (int4 weight-only Linears, group 32),
            16 (bfloat16 cast) or 32 (no quantization; the step is recorded with a note).
        sparsity_ratio: fraction of Linear weights zeroed by global magnitude pruning, in [0, 1).
        enable_*: turn each step on; a step in ``order`` runs only when its flag is set.
        order: step names from ``"drop_experts"``, ``"merge_experts"``, ``"prune_heads"``,
            ``"prune_neurons"``, ``"low_rank"``, ``"prune"``, ``"distill"``, ``"quantize"``.
            ``"distill"`` must come before ``"quantize"`` (quantized models are not trained).
        quantization_mode: for 8 bits, ``"dynamic"`` (torch.ao, activations quantized per call),
            ``"weight_only"`` (:class:`~pimoe.compress.quantize.Int8WeightOnlyLinear`) or
            ``"static"`` (:func:`~pimoe.compress.static.quantize_static_int8`: activation scales
            calibrated on the ``distill_data`` batches; needs a model torch.fx can trace).
        fidelity: ``"cosine"`` (mean cosine similarity to the original's outputs), ``"mse"``,
            ``"accuracy"`` (argmax agreement with the original, or accuracy against ``labels``
            when :meth:`ArchitectureOptimizer.optimize` gets them), or a callable
            ``(reference_out, out) -> float``.
        distill_*: settings of :func:`~pimoe.compress.distill.distill`; ``distill_data`` is the
            default training data (``optimize(distill_data=...)`` overrides it).
        output_fn: turns model outputs into the compared tensor (default ``.logits`` or identity).
        skip: ``fnmatch`` patterns of module names that low rank and quantization leave alone.
        latency_repeats: calls timed per measurement (the median is reported).
        int8_full_range: dynamic int8 with 8-bit instead of torch.ao's 7-bit activations
            (:class:`~pimoe.compress.quantize.FullRangeDynamicLinear`).
        embedding_bits: with the quantize step, also quantize the ``nn.Embedding`` modules
            matching ``embedding_patterns`` to 8 or 4 bits (``embedding_group_size`` values per
            int4 scale); ``None`` leaves embeddings in float.
        expert_drop_ratio: ``drop_experts`` removes this fraction of each PiMoE layer's experts
            (smallest weight norm), in (0, 1).
        experts_after_merge: ``merge_experts`` merges each PiMoE layer down to this many experts
            (most similar router rows first), >= 1.
        head_prune_ratio: ``prune_heads`` removes this fraction of the heads of every
            ``nn.MultiheadAttention`` / Hugging Face BERT attention, in (0, 1).
        neuron_prune_ratio: ``prune_neurons`` removes this fraction of the hidden neurons of every
            dense FFN (pimoe ``FFN`` / ``SwiGLU``, BERT intermediate/output), in (0, 1).
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
    int8_full_range: bool = False
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
        """Raise ``ValueError`` for an unknown step, option or an out-of-range setting."""
        unknown = [name for name in self.order if name not in STEP_NAMES]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown}; choose from {STEP_NAMES}")
        steps = self.enabled_steps()
        if steps.count("quantize") > 1:
            raise ValueError("quantize can run only once")
        if "distill" in steps and "quantize" in steps and steps.index("quantize") < max(
            i for i, name in enumerate(steps) if name == "distill"
        ):
            raise ValueError("distill must come before quantize: quantized models are not trained")
        if self.quantization_bits not in (4, 8, 16, 32):
            raise ValueError(f"quantization_bits must be 4, 8, 16 or 32, got {self.quantization_bits}")
        if self.quantization_mode not in ("dynamic", "weight_only", "static"):
            raise ValueError(
                f"quantization_mode must be 'dynamic', 'weight_only' or 'static', got {self.quantization_mode!r}"
            )
        if not 0.0 < self.compression_ratio <= 1.0:
            raise ValueError(f"compression_ratio must be in (0, 1], got {self.compression_ratio}")
        if not 0.0 <= self.sparsity_ratio < 1.0:
            raise ValueError(f"sparsity_ratio must be in [0, 1), got {self.sparsity_ratio}")
        if not callable(self.fidelity) and self.fidelity not in FIDELITY_FNS:
            raise ValueError(f"fidelity must be one of {sorted(FIDELITY_FNS)} or a callable, got {self.fidelity!r}")
        if self.distill_loss not in ("kl", "mse", "cosine"):
            raise ValueError(f"distill_loss must be 'kl', 'mse' or 'cosine', got {self.distill_loss!r}")
        if self.embedding_bits not in (None, 4, 8):
            raise ValueError(f"embedding_bits must be None, 4 or 8, got {self.embedding_bits}")
        if self.embedding_bits is not None and self.quantization_bits == 16:
            raise ValueError("embedding_bits needs float32 activations; it cannot be combined with quantization_bits=16")
        for name in ("expert_drop_ratio", "head_prune_ratio", "neuron_prune_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.experts_after_merge < 1:
            raise ValueError(f"experts_after_merge must be >= 1, got {self.experts_after_merge}")
        if self.latency_repeats < 1:
            raise ValueError(f"latency_repeats must be >= 1, got {self.latency_repeats}")

    def enabled_steps(self) -> list[str]:
        """The names in ``order`` whose ``enable_*`` flag is set, in order."""
        return [name for name in self.order if getattr(self, _ENABLE_FLAGS[name])]


_STRUCTURED = {
    "drop_experts": (drop_experts_everywhere, "expert_drop_ratio"),
    "merge_experts": (merge_experts_everywhere, "experts_after_merge"),
    "prune_heads": (prune_attention_heads_noted, "head_prune_ratio"),
    "prune_neurons": (prune_neurons, "neuron_prune_ratio"),
}


class OptimizeResult(NamedTuple):
    """What :meth:`ArchitectureOptimizer.optimize` returns: the new model and its report."""

    model: nn.Module
    report: CompressionReport


class ArchitectureOptimizer:
    """Compress a copy of a model step by step, measuring it after each step.

    Example::

        config = ArchitectureConfig(sparsity_ratio=0.5, quantization_bits=8)
        small, report = ArchitectureOptimizer(config).optimize(model, x)
        console.print(report.table())
    """

    def __init__(self, config: ArchitectureConfig | None = None) -> None:
        self.config = config or ArchitectureConfig()
        self.config.validate()

    def _fidelity(self, labels: Tensor | None) -> tuple[FidelityFn, str]:
        fid = self.config.fidelity
        if callable(fid):
            return fid, getattr(fid, "__name__", "custom")
        if fid == "accuracy" and labels is not None:
            return (lambda _ref, out: float((out.argmax(-1) == labels).float().mean())), "accuracy (labels)"
        return FIDELITY_FNS[fid], fid

    def optimize(
        self,
        model: nn.Module,
        example_inputs: Batch,
        *,
        distill_data: Iterable[Batch] | None = None,
        labels: Tensor | None = None,
    ) -> OptimizeResult:
        """Apply the enabled steps to a deep copy of ``model``; ``model`` itself is not changed.

        Args:
            example_inputs: a batch (tensor or tuple) for the fidelity and latency measurements;
                the original's outputs on it are the reference.
            distill_data: training batches for the distill step (else ``config.distill_data``);
                without either, the distill step is recorded with a "skipped" note.
            labels: targets for ``fidelity="accuracy"`` (accuracy instead of agreement).

        Returns:
            ``OptimizeResult(model, report)`` (also unpacks as a pair); the report's first row is
            ``"before"``, then one row per enabled step.

        Raises:
            RuntimeError: the compressed copy fails or gives non-finite outputs after a step.
        """
        cfg = self.config
        fidelity, metric = self._fidelity(labels)
        was_training = model.training
        reference = run_model(model, example_inputs, cfg.output_fn)
        report = CompressionReport(fidelity_metric=metric)

        def record(name: str, current: nn.Module, note: str = "") -> None:
            try:
                step = measure(name, current, example_inputs, reference, fidelity,
                               output_fn=cfg.output_fn, repeats=cfg.latency_repeats, note=note)
            except Exception as error:  # any failure of the compressed copy is reported the same way
                raise RuntimeError(f"the model fails after step {name!r} ({note}): {error}; "
                                   "the input model is unchanged") from error
            if name == "quantize":
                step.left_in_float = float_weight_modules(current)
            if not math.isfinite(step.fidelity):
                raise RuntimeError(f"the model gives non-finite outputs after step {name!r} ({note}); "
                                   "the input model is unchanged")
            report.steps.append(step)

        record("before", model)
        current = copy.deepcopy(model) if not cfg.enabled_steps() else model
        for name, current, note in self._run_steps(model, distill_data):
            if note.startswith("skipped"):
                report.steps.append(dataclasses.replace(report.steps[-1], name=name, note=note))
            else:
                record(name, current, note)
        model.train(was_training)
        current.eval()
        return OptimizeResult(current, report)

    def compress(self, model: nn.Module, *, distill_data: Iterable[Batch] | None = None) -> nn.Module:
        """The enabled steps applied to a deep copy of ``model``, without measurements (eval mode)."""
        was_training = model.training
        current = copy.deepcopy(model) if not self.config.enabled_steps() else model
        for _, current, _ in self._run_steps(model, distill_data):
            pass
        model.train(was_training)
        return current.eval()

    def _run_steps(
        self, model: nn.Module, distill_data: Iterable[Batch] | None
    ) -> Iterator[tuple[str, nn.Module, str]]:
        """Yield ``(step name, model after it, note)`` for each enabled step, on a deep copy."""
        current = copy.deepcopy(model)
        pruned = False
        data = distill_data if distill_data is not None else self.config.distill_data
        for name in self.config.enabled_steps():
            if name == "distill" and data is None:
                yield name, current, "skipped: no distill_data given"
                continue
            current, note = self._apply(name, current, model, data, pruned)
            pruned = pruned or name == "prune"
            yield name, current, note

    def _apply(
        self, name: str, current: nn.Module, teacher: nn.Module, data: Iterable[Batch] | None, pruned: bool
    ) -> tuple[nn.Module, str]:
        """Run one step; return the (possibly new) model and a note for the report."""
        cfg = self.config
        if name in _STRUCTURED:
            function, setting = _STRUCTURED[name]
            changed, skipped = function(current, getattr(cfg, setting), cfg.skip)
            note = "; ".join(changed) or "nothing to change"
            return current, note + "".join(f"; skipped {reason}" for reason in skipped)
        if name == "low_rank":
            fact = factorize(current, ratio=cfg.compression_ratio, skip=cfg.skip)
            return current, f"{len(fact.replaced)} Linear(s) factorized"
        if name == "prune":
            magnitude_prune(current, cfg.sparsity_ratio, skip=cfg.skip)
            return current, f"global magnitude pruning {cfg.sparsity_ratio:.0%}"
        if name == "distill":
            assert data is not None
            with torch.enable_grad():
                result = distill(
                    teacher, current, data, epochs=cfg.distill_epochs, steps=cfg.distill_steps,
                    lr=cfg.distill_lr, temperature=cfg.distill_temperature, loss=cfg.distill_loss,
                    output_fn=cfg.output_fn, preserve_sparsity=pruned,
                )
            last = f", last loss {result.losses[-1]:.4g}" if result.losses else ""
            return current, f"{result.steps} distillation steps{last}"
        return self._quantize(current, data)

    def _quantize(self, current: nn.Module, data: Iterable[Batch] | None) -> tuple[nn.Module, str]:
        current, note = self._quantize_linears(current, data)
        if self.config.embedding_bits is not None:
            cfg = self.config
            replaced, skipped = quantize_embeddings(
                current, cfg.embedding_bits, cfg.embedding_patterns, group_size=cfg.embedding_group_size
            )
            note += f"; int{cfg.embedding_bits} embeddings: {', '.join(replaced) or 'none matched'}"
            note += "".join(f"; skipped {reason}" for reason in skipped)
        return current, note

    def _quantize_linears(self, current: nn.Module, data: Iterable[Batch] | None) -> tuple[nn.Module, str]:
        cfg = self.config
        bits = cfg.quantization_bits
        if bits == 32:
            return current, "32 bits: weights left in float32"
        if bits == 16:
            return cast(current, torch.bfloat16), "bfloat16 cast"
        if bits == 4:
            replaced = quantize_weight_only_int4(current, skip=cfg.skip)
            return current, f"int4 weight-only, {len(replaced)} Linear(s)"
        if cfg.quantization_mode == "static":
            batches = list(data) if data is not None else []
            if not batches:
                raise ValueError("quantization_mode='static' calibrates on distill_data: give at least one batch")
            return quantize_static_int8(current, batches[0], batches), f"int8 static, calibrated on {len(batches)} batch(es)"
        experts = quantize_experts_int8(current, skip=cfg.skip)
        experts_note = f"; int8 weight-only experts: {len(experts)} PiMoE layer(s)" if experts else ""
        if cfg.quantization_mode == "dynamic":
            current = quantize_dynamic_int8(current, skip=cfg.skip, inplace=True, full_range=cfg.int8_full_range)
            note = "int8 dynamic (torch.ao" + (", 8-bit activations, 7-bit weights)" if cfg.int8_full_range else ")")
        else:
            note = f"int8 weight-only, {len(quantize_weight_only_int8(current, skip=cfg.skip))} Linear(s)"
        return current, note + experts_note
