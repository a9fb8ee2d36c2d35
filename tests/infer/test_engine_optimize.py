"""``InferenceConfig(optimize=ArchitectureConfig(...))``: the engine compresses each model once."""

from __future__ import annotations

import torch
from torch import nn

from pimoe.compress import ArchitectureConfig
from pimoe.infer import InferenceConfig, InferenceEngine


def _config() -> ArchitectureConfig:
    return ArchitectureConfig(
        enable_pruning=True, enable_quantization=False, sparsity_ratio=0.5, latency_repeats=1
    )


def test_engine_runs_a_compressed_copy_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    original = [p.detach().clone() for p in model.parameters()]
    engine = InferenceEngine(InferenceConfig(optimize=_config()))
    assert engine.report(model) is None
    x = torch.randn(3, 8)
    out = engine.infer(model, x)
    report = engine.report(model)
    assert report is not None and [s.name for s in report.steps] == ["before", "magnitude_prune"]
    pruned = engine._models[id(model)].target
    assert pruned is not model and torch.equal(out, pruned(x))
    assert not torch.equal(out, model(x))  # half the weights are zeroed in the copy
    assert all(
        torch.equal(a, b) for a, b in zip(original, model.parameters())
    )  # the model is unchanged
    engine.infer(model, torch.randn(5, 8))
    assert engine.report(model) is report  # compressed once per model


def test_engine_without_optimize_has_no_report() -> None:
    model = nn.Linear(2, 2)
    engine = InferenceEngine()
    engine.infer(model, torch.randn(1, 2))
    assert engine.report(model) is None
