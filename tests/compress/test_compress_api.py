"""compress_(model, config_or_configs, filter_fn): configs validate themselves, a registry maps
them to handlers, the verb works in place, honours the filter and records what it did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from pimoe.compress import (
    ArchitectureConfig,
    ArchitectureOptimizer,
    CompressConfig,
    DistillConfig,
    EmbeddingQuantConfig,
    ExpertMergeConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8ExpertsConfig,
    Int8WeightOnlyConfig,
    Int8WeightOnlyLinear,
    LowRankConfig,
    LowRankLinear,
    MagnitudePruneConfig,
    Measure,
    StepContext,
    compress_,
    register_compress_handler,
)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)
    )


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: LowRankConfig(ratio=1.0), r"ratio must be in \(0, 1\)"),
        (lambda: LowRankConfig(ratio=0.5, energy=0.9), "either ratio or energy"),
        (lambda: MagnitudePruneConfig(amount=1.0), r"amount must be in \[0, 1\)"),
        (lambda: ExpertMergeConfig(num_experts=0), "num_experts must be >= 1"),
        (lambda: EmbeddingQuantConfig(bits=3), "bits must be 4 or 8"),
        (lambda: Int4WeightOnlyConfig(group_size=3), "group_size must be even"),
        (lambda: DistillConfig(loss="huber"), "loss must be"),  # type: ignore[arg-type]
        (
            lambda: ArchitectureConfig(enable_low_rank=True, compression_ratio=1.0),
            r"compression_ratio: low-rank ratio",
        ),
    ],
)
def test_configs_refuse_bad_settings_when_built(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_in_place_with_a_filter_and_a_report() -> None:
    model = _mlp()
    x = torch.randn(16, 32)
    report = compress_(
        model,
        [LowRankConfig(ratio=0.3), Int8WeightOnlyConfig()],
        filter_fn=lambda m, name: name != "2",
        measure_on=Measure(x, latency_repeats=1),
    )
    assert [s.name for s in report.steps] == ["before", "low_rank", "int8_weight_only"]
    assert type(model[2]) is nn.Linear  # the filter kept it out of both steps
    assert isinstance(model[0], LowRankLinear) and isinstance(model[0].first, Int8WeightOnlyLinear)
    assert (
        report.after.bytes_torch_save < 0.8 * report.before.bytes_torch_save
    )  # layer 2 (16 kB) stays float
    assert report.steps[0].fidelity == pytest.approx(1.0) and 0.8 < report.after.fidelity < 1.0
    assert [e["config"]["type"] for e in model.pimoe_compression] == [
        "LowRankConfig",
        "Int8WeightOnlyConfig",
    ]
    assert "2" in model.pimoe_compression[0]["decisions"]["skip"]
    no_measure = compress_(_mlp(), Int8DynamicConfig())
    assert no_measure.after.latency_ms is None and no_measure.after.fidelity is None


def test_order_and_registry() -> None:
    with pytest.raises(ValueError, match="distillation must come before quantization"):
        compress_(_mlp(), [Int8DynamicConfig(), DistillConfig(data=[torch.randn(4, 32)])])

    @dataclass
    class HalveConfig(CompressConfig):
        name: ClassVar[str] = "halve"

    with pytest.raises(TypeError, match="HalveConfig is not a registered compression config"):
        compress_(_mlp(), HalveConfig())

    @register_compress_handler(HalveConfig)
    def _halve(model: nn.Module, config: HalveConfig, ctx: StepContext) -> str:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        return "halved"

    model = _mlp()
    weight = model[0].weight.detach().clone()
    assert compress_(model, HalveConfig()).after.note == "halved"
    assert torch.equal(model[0].weight, weight * 0.5)
    with pytest.raises(ValueError, match="already has a handler"):
        register_compress_handler(HalveConfig)(_halve)


def test_asking_for_8_bits_gets_the_best_measured_recipe() -> None:
    configs = ArchitectureConfig(
        enable_pruning=False, enable_quantization=True, quantization_bits=8
    ).to_configs()
    assert configs == [
        Int8DynamicConfig(full_range=True),
        Int8ExpertsConfig(),
        EmbeddingQuantConfig(bits=4),
    ]
    told = ArchitectureConfig(
        enable_pruning=False, int8_full_range=False, embedding_bits=0
    ).to_configs()
    assert told == [Int8DynamicConfig(full_range=False), Int8ExpertsConfig()]
    assert (
        ArchitectureConfig(enable_pruning=False, quantization_bits=16).to_configs()[0].name
        == "cast"
    )


def test_the_optimizer_is_a_list_of_configs_applied_to_a_copy() -> None:
    model, x = _mlp(), torch.randn(8, 32)
    data = [torch.randn(16, 32) for _ in range(4)]
    optimizer = ArchitectureOptimizer(
        [MagnitudePruneConfig(0.5), DistillConfig(epochs=2), Int8DynamicConfig()], latency_repeats=1
    )
    small, report = optimizer.optimize(model, x, distill_data=data)
    assert [s.name for s in report.steps] == [
        "before",
        "magnitude_prune",
        "distill",
        "int8_dynamic",
    ]
    assert "8 distillation steps" in report.steps[2].note
    assert (
        report.steps[2].nonzero_params == report.steps[1].nonzero_params
    )  # pruned zeros stay zero
    assert type(model[0]) is nn.Linear and small is not model
