"""The seed document's "Advanced Architecture Optimization Implementation" example, with only its
import line changed (``optimization_core.modules.feed_forward`` -> ``pimoe.compat``)."""

import torch
from torch import nn


def test_seed_example_runs_and_compresses() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    input_shape = (16, 32)
    original = {k: v.clone() for k, v in model.state_dict().items()}

    # --- the seed's code, import line changed ---
    from pimoe.compat import AdvancedArchitectureConfig, AdvancedArchitectureOptimizer

    # Create advanced architecture optimizer
    architecture_config = AdvancedArchitectureConfig(
        optimization_level="ultra",
        compression_ratio=0.75,
        quantization_bits=8,
        sparsity_ratio=0.15,
        enable_model_compression=True,
        enable_quantization=True,
        enable_pruning=True,
        enable_knowledge_distillation=True,
    )

    optimizer = AdvancedArchitectureOptimizer(architecture_config)
    optimized_model = optimizer.optimize_architecture(model, input_shape)
    # --- end of the seed's code ---

    report = optimizer.last_report
    names = ["before", "magnitude_prune", "distill", "int8_dynamic", "int8_experts", "embeddings"]
    assert [s.name for s in report.steps] == names
    assert report.steps[2].note.startswith("skipped")  # no distillation data in the seed's call
    assert report.after.bytes_torch_save < 0.5 * report.before.bytes_torch_save
    assert report.after.fidelity > 0.95
    x = torch.randn(input_shape)
    assert optimized_model(x).shape == model(x).shape
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, original[key])


def test_compression_off_and_bad_level() -> None:
    import pytest

    from pimoe.compat import AdvancedArchitectureConfig, AdvancedArchitectureOptimizer

    model = nn.Linear(8, 8)
    wrapped = nn.Sequential(model)
    opt = AdvancedArchitectureOptimizer(AdvancedArchitectureConfig(enable_model_compression=False))
    out = opt.optimize_architecture(wrapped, (4, 8))
    assert out is not wrapped and [s.name for s in opt.last_report.steps] == ["before"]
    with pytest.raises(ValueError, match="optimization_level"):
        AdvancedArchitectureConfig(optimization_level="ludicrous")
    with pytest.raises(ValueError, match="input_shape"):
        opt.optimize_architecture(wrapped, (4, -1))
