"""The handler of each config of :mod:`pimoe.compress.configs`, registered with
:func:`~pimoe.compress.api.register_compress_handler`.

Every handler works in place on the whole model, honours ``ctx.filter_fn`` (through the passes'
``skip`` names) and returns the report's note. The passes themselves (``factorize``,
``quantize_dynamic_int8``, ...) live in their own modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

from pimoe.compress import configs
from pimoe.compress._modules import matches, plain_linears, set_module, tied_parameter_ids
from pimoe.compress.api import StepContext, register_compress_handler
from pimoe.compress.conv import prune_sequential_convs
from pimoe.compress.distill import call_model, distill
from pimoe.compress.embedding import quantize_embeddings
from pimoe.compress.lowrank import LowRankLinear, factorize
from pimoe.compress.prune import magnitude_prune
from pimoe.compress.quantize import quantize_dynamic_int8, quiet_torch_ao
from pimoe.compress.quantize_experts import quantize_experts_int8
from pimoe.compress.structured import (
    Changes,
    drop_experts_everywhere,
    merge_experts_everywhere,
    prune_attention_heads_noted,
    prune_neurons,
)
from pimoe.compress.weight_only import quantize_weight_only_int4, quantize_weight_only_int8


def _joined(changed: list[str], skipped: list[str]) -> str:
    return ("; ".join(changed) or "nothing to change") + "".join(
        f"; skipped {reason}" for reason in skipped
    )


@register_compress_handler(configs.Int8DynamicConfig)
def _int8_dynamic(model: nn.Module, config: configs.Int8DynamicConfig, ctx: StepContext) -> str:
    quantize_dynamic_int8(
        model,
        config.per_channel,
        lstm=config.lstm,
        skip=ctx.skip_names(model),
        inplace=True,
        full_range=config.full_range,
    )
    replaced = sum(1 for m in model.modules() if isinstance(m, (nnqd.Linear, nnqd.LSTM)))
    activations = (
        "8-bit activations, 7-bit weights" if config.full_range else "7-bit activations (torch.ao)"
    )
    return f"int8 dynamic, {replaced} Linear/LSTM module(s), {activations}"


@register_compress_handler(configs.Int8WeightOnlyConfig)
def _int8_weight_only(
    model: nn.Module, config: configs.Int8WeightOnlyConfig, ctx: StepContext
) -> str:
    return f"int8 weight-only, {len(quantize_weight_only_int8(model, skip=ctx.skip_names(model)))} Linear(s)"


@register_compress_handler(configs.Int4WeightOnlyConfig)
def _int4_weight_only(
    model: nn.Module, config: configs.Int4WeightOnlyConfig, ctx: StepContext
) -> str:
    replaced = quantize_weight_only_int4(
        model, group_size=config.group_size, skip=ctx.skip_names(model)
    )
    return f"int4 weight-only (group {config.group_size}), {len(replaced)} Linear(s)"


@register_compress_handler(configs.Int8ExpertsConfig)
def _int8_experts(model: nn.Module, config: configs.Int8ExpertsConfig, ctx: StepContext) -> str:
    replaced = quantize_experts_int8(model, skip=ctx.skip_names(model))
    return f"int8 weight-only experts: {', '.join(replaced) or 'no PiMoE StackedExperts'}"


@register_compress_handler(configs.StaticInt8Config)
def _int8_static(model: nn.Module, config: configs.StaticInt8Config, ctx: StepContext) -> str:
    from torch.ao.quantization import QuantWrapper, convert, get_default_qconfig, prepare

    if config.calibration is None and not ctx.replay:
        raise ValueError("configs.StaticInt8Config needs calibration batches")
    skip, tied = ctx.skip_names(model), tied_parameter_ids(model)
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    targets = [
        (n, m)
        for n, m in [*plain_linears(model), *convs]
        if n and not matches(n, skip) and id(m.weight) not in tied
    ]
    with (
        warnings.catch_warnings()
    ):  # torch.ao's observer notices (and, on a replay, "observer not run")
        warnings.simplefilter("ignore", UserWarning)
        qconfig = get_default_qconfig("x86")  # type: ignore[no-untyped-call]
    for name, module in targets:
        wrapper = QuantWrapper(module)
        wrapper.qconfig = qconfig
        set_module(model, name, wrapper)
    model.eval()
    with quiet_torch_ao(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prepare(model, inplace=True)  # type: ignore[no-untyped-call]
        if not ctx.replay and config.calibration is not None:
            with torch.no_grad():
                for batch in config.calibration:
                    call_model(model, batch)
        convert(model, inplace=True)  # type: ignore[no-untyped-call]
    return f"int8 static (x86), {len(targets)} Linear/Conv2d layer(s)"


@register_compress_handler(configs.CastConfig)
def _cast(model: nn.Module, config: configs.CastConfig, ctx: StepContext) -> str:
    model.to(getattr(torch, config.dtype))
    return f"{config.dtype} cast"


@register_compress_handler(configs.EmbeddingQuantConfig)
def _embeddings(model: nn.Module, config: configs.EmbeddingQuantConfig, ctx: StepContext) -> str:
    replaced, skipped = quantize_embeddings(
        model,
        config.bits,
        config.patterns,
        group_size=config.group_size,
        skip=ctx.skip_names(model),
    )
    return f"int{config.bits} embeddings: {', '.join(replaced) or 'none matched'}" + "".join(
        f"; skipped {reason}" for reason in skipped
    )


@register_compress_handler(configs.LowRankConfig)
def _low_rank(model: nn.Module, config: configs.LowRankConfig, ctx: StepContext) -> str:
    if ctx.replay:  # the ranks came from the source's singular values: rebuild them as recorded
        for name, rank in ctx.decisions["ranks"].items():
            linear = model.get_submodule(name)
            if type(linear) is not nn.Linear:
                raise ValueError(
                    f"{name} is a {type(linear).__name__}, not the nn.Linear the recipe factorized"
                )
            set_module(
                model,
                name,
                LowRankLinear(
                    linear.in_features,
                    linear.out_features,
                    rank,
                    bias=linear.bias is not None,
                    dtype=linear.weight.dtype,
                ),
            )
        return "rebuilt"
    report = factorize(
        model,
        energy=config.energy,
        ratio=config.ratio,
        min_features=config.min_features,
        skip=ctx.skip_names(model),
    )
    ctx.decisions["ranks"] = {layer.name: layer.rank for layer in report.replaced}
    return f"{len(report.replaced)} of {len(report.layers)} Linear(s) factorized"


@register_compress_handler(configs.MagnitudePruneConfig)
def _magnitude_prune(
    model: nn.Module, config: configs.MagnitudePruneConfig, ctx: StepContext
) -> str:
    magnitude_prune(model, config.amount, scope=config.scope, skip=ctx.skip_names(model))
    return f"{config.scope} magnitude pruning {config.amount:.0%}"


def _structural(
    change: Callable[[nn.Module, Any, list[str]], Changes], setting: Callable[[Any], Any]
) -> Callable[[nn.Module, Any, StepContext], str]:
    """The handler running a structural pass of :mod:`pimoe.compress.structured`,
    ``change(model, setting(config), skipped names)``, and noting what it changed and skipped."""

    def handler(model: nn.Module, config: Any, ctx: StepContext) -> str:
        return _joined(*change(model, setting(config), ctx.skip_names(model)))

    return handler


register_compress_handler(configs.NeuronPruneConfig)(
    _structural(prune_neurons, lambda config: config.amount)
)
register_compress_handler(configs.HeadPruneConfig)(
    _structural(prune_attention_heads_noted, lambda config: config.amount)
)


@register_compress_handler(configs.ConvChannelPruneConfig)
def _conv_channel_prune(
    model: nn.Module, config: configs.ConvChannelPruneConfig, ctx: StepContext
) -> str:
    return _joined(prune_sequential_convs(model, config.amount, ctx.skip_names(model)), [])


register_compress_handler(configs.ExpertDropConfig)(
    _structural(drop_experts_everywhere, lambda config: config.amount)
)
register_compress_handler(configs.ExpertMergeConfig)(
    _structural(merge_experts_everywhere, lambda config: config.num_experts)
)


@register_compress_handler(configs.DistillConfig)
def _distill(model: nn.Module, config: configs.DistillConfig, ctx: StepContext) -> str:
    teacher = config.teacher if config.teacher is not None else ctx.teacher
    if config.data is None or teacher is None:
        return "skipped: no distillation data given"
    with torch.enable_grad():
        result = distill(
            teacher,
            model,
            config.data,
            epochs=config.epochs,
            steps=config.steps,
            lr=config.lr,
            temperature=config.temperature,
            loss=config.loss,
            output_fn=config.output_fn,
            preserve_sparsity=ctx.pruned,
        )
    last = f", last loss {result.losses[-1]:.4g}" if result.losses else ""
    return f"{result.steps} distillation steps{last}"
