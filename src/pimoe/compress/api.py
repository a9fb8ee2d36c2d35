"""``compress_(model, config_or_configs, filter_fn=None)``: one in-place verb for every technique.

Modelled on torchao's ``quantize_(model, config, filter_fn)``: each technique is a small dataclass
config (:mod:`pimoe.compress.configs`) that validates itself when built, and a handler registered
for its type with :func:`register_compress_handler` does the work (:mod:`pimoe.compress.handlers`).
``compress_`` runs the configs in order on ``model`` in place and returns a
:class:`~pimoe.compress.report.CompressionReport` with one row per config. The applied configs
(and the structural decisions that depend on weights, such as SVD ranks) are appended to
``model.pimoe_compression``, which :func:`~pimoe.compress.saved.save_compressed` writes so that
the structure can be rebuilt without the source model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from pimoe.compress._modules import float_weight_modules
from pimoe.compress.distill import Batch, default_output_fn
from pimoe.compress.report import FIDELITY_FNS, CompressionReport, FidelityFn, measure, run_model

FilterFn = Callable[[nn.Module, str], bool]
RECIPE_ATTR = "pimoe_compression"


@dataclass
class CompressConfig:
    """Base class of the technique configs (torchao's ``AOBaseConfig``).

    Class attributes of each subclass: ``name`` (the report's row name), ``changes_structure``
    (whether rebuilding a saved model must replay it), ``trains`` / ``quantizes`` (a training step
    may not follow a quantization step). Fields listed in ``not_saved`` (data, callables) are
    left out of :meth:`to_dict`.
    """

    name: ClassVar[str] = "config"
    changes_structure: ClassVar[bool] = True
    trains: ClassVar[bool] = False
    quantizes: ClassVar[bool] = False
    not_saved: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """``{"type": class name, field: value, ...}`` of the JSON-serializable fields."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            if f.name not in self.not_saved:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class StepContext:
    """What a handler gets besides the model and its config.

    Attributes:
        filter_fn: ``(module, qualified name) -> bool``; modules for which it is False are left
            alone (``None``: every module the technique supports).
        teacher: the model as it was before ``compress_`` ran (a copy), for distillation.
        pruned: a magnitude-pruning step ran earlier in this call (distillation keeps its zeros).
        replay: the structure is being rebuilt for loading saved weights: handlers must build the
            same modules and may skip work on values (no calibration, no SVD of random weights).
        decisions: recorded by the handler: weight-dependent structural choices (JSON values)
            that a replay receives back in the same field.
    """

    filter_fn: FilterFn | None = None
    teacher: nn.Module | None = None
    pruned: bool = False
    replay: bool = False
    decisions: dict[str, Any] = field(default_factory=dict)

    def skip_names(self, model: nn.Module) -> list[str]:
        """Qualified names of the modules ``filter_fn`` excludes (exact ``fnmatch`` patterns for
        the passes' ``skip=`` arguments; module names hold no wildcard characters)."""
        if self.filter_fn is None:
            return []
        return [name for name, module in model.named_modules() if not self.filter_fn(module, name)]


Handler = Callable[[nn.Module, Any, StepContext], str]
_HANDLERS: dict[type[CompressConfig], Handler] = {}
CONFIG_TYPES: dict[str, type[CompressConfig]] = {}
C = TypeVar("C", bound=CompressConfig)


def register_compress_handler(
    config_type: type[C],
) -> Callable[
    [Callable[[nn.Module, C, StepContext], str]], Callable[[nn.Module, C, StepContext], str]
]:
    """Decorator registering ``handler(model, config, ctx) -> note`` for ``config_type``
    (torchao's ``register_quantize_module_handler``). The handler works in place and returns a
    one-line note for the report."""

    def decorate(
        handler: Callable[[nn.Module, C, StepContext], str],
    ) -> Callable[[nn.Module, C, StepContext], str]:
        if config_type in _HANDLERS:
            raise ValueError(f"{config_type.__name__} already has a handler")
        _HANDLERS[config_type] = handler
        CONFIG_TYPES[config_type.__name__] = config_type
        return handler

    return decorate


def compress_config_from_dict(values: dict[str, Any]) -> CompressConfig:
    """Inverse of :meth:`CompressConfig.to_dict`; ``ValueError`` for an unknown type or field."""
    values = dict(values)
    kind = values.pop("type", None)
    if kind not in CONFIG_TYPES:
        raise ValueError(f"unknown compression config type {kind!r}; known: {sorted(CONFIG_TYPES)}")
    cls = CONFIG_TYPES[kind]
    known = {f.name for f in dataclasses.fields(cls)} - set(cls.not_saved)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{kind}: unknown field(s) {unknown}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"{kind}: {error}") from error


def check_order(configs: Sequence[CompressConfig]) -> None:
    """``TypeError`` for a non-config; ``ValueError`` when a training step follows a quantization."""
    for config in configs:
        if type(config) not in _HANDLERS:
            raise TypeError(f"{type(config).__name__} is not a registered compression config")
    first_quant = next((i for i, c in enumerate(configs) if c.quantizes), None)
    if first_quant is not None and any(c.trains for c in configs[first_quant:]):
        raise ValueError(
            "distillation must come before quantization: quantized models are not trained"
        )


def check_measure_settings(fidelity: str | FidelityFn, latency_repeats: int) -> None:
    """``ValueError`` for an unknown fidelity name or fewer than one timing repeat."""
    if not callable(fidelity) and fidelity not in FIDELITY_FNS:
        raise ValueError(
            f"fidelity must be one of {sorted(FIDELITY_FNS)} or a callable, got {fidelity!r}"
        )
    if latency_repeats < 1:
        raise ValueError(f"latency_repeats must be >= 1, got {latency_repeats}")


@dataclass
class Measure:
    """Optional measurements of :func:`compress_`: ``example_inputs`` (a batch; the model's output
    on it before the first step is the reference), how outputs are compared, timing repeats."""

    example_inputs: Batch
    fidelity: str | FidelityFn = "cosine"
    output_fn: Callable[[Any], Tensor] = default_output_fn
    labels: Tensor | None = None
    latency_repeats: int = 10

    def __post_init__(self) -> None:
        check_measure_settings(self.fidelity, self.latency_repeats)

    def metric(self) -> tuple[FidelityFn, str]:
        """The fidelity function and its name for the report."""
        fid, labels = self.fidelity, self.labels
        if callable(fid):
            return fid, getattr(fid, "__name__", "custom")
        if fid == "accuracy" and labels is not None:
            return (
                lambda _ref, out: float((out.argmax(-1) == labels).float().mean())
            ), "accuracy (labels)"
        return FIDELITY_FNS[fid], fid


def compress_(
    model: nn.Module,
    config_or_configs: CompressConfig | Sequence[CompressConfig],
    filter_fn: FilterFn | None = None,
    *,
    measure_on: Measure | None = None,
    replay: Sequence[dict[str, Any]] | None = None,
) -> CompressionReport:
    """Apply one config or a list of configs to ``model`` in place, in order.

    Args:
        model: any ``nn.Module`` (each technique acts on the module types it supports and says
            in its note what it changed or skipped).
        config_or_configs: instances of the configs of :mod:`pimoe.compress.configs`.
        filter_fn: ``(module, qualified name) -> bool``: only modules for which it is True are
            compressed (torchao's convention); default: all supported modules.
        measure_on: with a :class:`Measure`, every row also has latency and fidelity on its
            example batch (the ``"before"`` row is the model as given).
        replay: internal (loading): the recorded decisions of each config, in order.

    Returns:
        the report: a ``"before"`` row, then one row per config (name, sizes, note).

    Raises:
        TypeError / ValueError: an unregistered config or a training step after quantization.
        RuntimeError: the model fails or gives non-finite outputs after a step (with ``measure_on``).
    """
    configs = (
        [config_or_configs]
        if isinstance(config_or_configs, CompressConfig)
        else list(config_or_configs)
    )
    check_order(configs)
    ctx = StepContext(filter_fn=filter_fn, replay=replay is not None)
    if replay is None and any(c.trains and getattr(c, "teacher", None) is None for c in configs):
        ctx.teacher = copy.deepcopy(
            model
        ).eval()  # the model as it was, for configs without a teacher
    fidelity, metric = measure_on.metric() if measure_on is not None else (None, "none")
    reference = (
        run_model(model, measure_on.example_inputs, measure_on.output_fn) if measure_on else None
    )
    report = CompressionReport(fidelity_metric=metric)

    def record(name: str, note: str) -> None:
        if measure_on is None or fidelity is None or reference is None:
            report.steps.append(measure(name, model, note=note))
            return
        try:
            step = measure(
                name,
                model,
                measure_on.example_inputs,
                reference,
                fidelity,
                output_fn=measure_on.output_fn,
                repeats=measure_on.latency_repeats,
                note=note,
            )
        except Exception as error:  # any failure of the compressed model is reported the same way
            raise RuntimeError(f"the model fails after step {name!r} ({note}): {error}") from error
        if step.fidelity is not None and not math.isfinite(step.fidelity):
            raise RuntimeError(f"the model gives non-finite outputs after step {name!r} ({note})")
        report.steps.append(step)

    if replay is None:
        record("before", "")
    log: list[dict[str, Any]] = getattr(model, RECIPE_ATTR, None) or []
    for index, config in enumerate(configs):
        if replay is not None and not config.changes_structure:
            continue
        if replay is not None:  # the modules the filter excluded when the model was compressed
            ctx.decisions = dict(replay[index])
            excluded = frozenset(ctx.decisions.get("skip", ()))
            ctx.filter_fn = lambda _module, name, excluded=excluded: name not in excluded
        else:
            ctx.decisions = {"skip": ctx.skip_names(model)} if filter_fn is not None else {}
        note = _HANDLERS[type(config)](model, config, ctx)
        ctx.pruned = ctx.pruned or config.name == "magnitude_prune"
        if replay is None:
            log.append({"config": config.to_dict(), "decisions": ctx.decisions})
            record(config.name, note)
            if config.quantizes:
                report.steps[-1].left_in_float = float_weight_modules(model)
    object.__setattr__(model, RECIPE_ATTR, log)  # a plain attribute, not a submodule or buffer
    model.eval()
    return report


__all__ = [
    "CONFIG_TYPES",
    "CompressConfig",
    "FilterFn",
    "Measure",
    "StepContext",
    "compress_",
    "compress_config_from_dict",
    "register_compress_handler",
]
