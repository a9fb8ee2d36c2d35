import json

import pytest
import torch
from rich.console import Console
from torch import nn

from pimoe.compress import (
    ArchitectureConfig,
    ArchitectureOptimizer,
    CompressionReport,
    Int8WeightOnlyLinear,
)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
    )


def _batches(seed: int, n: int, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 32, generator=g) for _ in range(n)]


def _x() -> torch.Tensor:
    return _batches(99, 1, 64)[0]


def test_pipeline_records_each_enabled_step_and_leaves_original_untouched():
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = ArchitectureConfig(
        enable_low_rank=True,
        compression_ratio=0.5,
        enable_pruning=True,
        sparsity_ratio=0.5,
        enable_quantization=True,
        quantization_bits=8,
        quantization_mode="weight_only",
        latency_repeats=3,
    )
    small, report = ArchitectureOptimizer(config).optimize(model, _x())
    names = [
        "before",
        "low_rank",
        "magnitude_prune",
        "int8_weight_only",
        "int8_experts",
        "embeddings",
    ]
    assert [s.name for s in report.steps] == names
    before, low, pruned, quant = report.steps[:4]
    assert before.fidelity == pytest.approx(1.0, abs=1e-6)
    assert low.params < before.params and low.bytes_torch_save < before.bytes_torch_save
    assert pruned.nonzero_params < 0.6 * low.nonzero_params
    assert quant.bytes_torch_save < 0.4 * pruned.bytes_torch_save
    assert (
        quant.bytes_safetensors is not None and quant.bytes_safetensors < pruned.bytes_safetensors
    )
    assert all(0.0 < s.fidelity <= 1.0 + 1e-6 for s in report.steps)
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in small.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert isinstance(model[0], nn.Linear)


def test_dynamic_int8_is_not_safetensors_saveable_and_disabled_steps_are_absent():
    config = ArchitectureConfig(enable_pruning=False, quantization_bits=8, latency_repeats=2)
    _, report = ArchitectureOptimizer(config).optimize(_mlp(), _x())
    assert [s.name for s in report.steps] == [
        "before",
        "int8_dynamic",
        "int8_experts",
        "embeddings",
    ]
    assert report.before.bytes_safetensors is not None
    assert report.after.bytes_safetensors is None
    assert report.after.bytes_torch_save < 0.5 * report.before.bytes_torch_save
    assert report.after.fidelity > 0.99


@pytest.mark.parametrize("bits", [4, 16, 32])
def test_other_bit_widths(bits: int):
    config = ArchitectureConfig(enable_pruning=False, quantization_bits=bits, latency_repeats=2)
    _, report = ArchitectureOptimizer(config).optimize(_mlp(), _x())
    before, after = report.steps[0], report.steps[-1]
    if bits == 32:
        assert after.bytes_torch_save == before.bytes_torch_save
        assert after.fidelity == pytest.approx(1.0, abs=1e-6)
    else:
        assert after.bytes_torch_save < (0.6 if bits == 16 else 0.3) * before.bytes_torch_save
        assert after.fidelity > 0.9


def test_distill_repair_after_pruning_beats_no_repair():
    model, x = _mlp(), _x()
    common = dict(
        enable_pruning=True, sparsity_ratio=0.5, enable_quantization=False, latency_repeats=2
    )
    _, plain = ArchitectureOptimizer(ArchitectureConfig(**common)).optimize(model, x)
    config = ArchitectureConfig(
        **common,
        enable_knowledge_distillation=True,
        distill_epochs=5,
        distill_lr=3e-3,
        distill_temperature=2.0,
    )
    _, report = ArchitectureOptimizer(config).optimize(model, x, distill_data=_batches(1, 20))
    assert [s.name for s in report.steps] == ["before", "magnitude_prune", "distill"]
    assert report.after.nonzero_params == report.steps[1].nonzero_params  # still pruned
    gap_plain = 1.0 - plain.after.fidelity
    gap_repaired = 1.0 - report.after.fidelity
    assert gap_repaired < 0.5 * gap_plain


def test_distill_without_data_is_skipped_with_a_note():
    config = ArchitectureConfig(
        enable_knowledge_distillation=True, enable_quantization=False, latency_repeats=2
    )
    _, report = ArchitectureOptimizer(config).optimize(_mlp(), _x())
    assert [s.name for s in report.steps] == ["before", "magnitude_prune", "distill"]
    assert "skipped" in report.after.note
    assert report.after.fidelity == report.steps[1].fidelity


def test_accuracy_and_callable_fidelity():
    model, x = _mlp(), _x()
    labels = model(x).argmax(-1)
    config = ArchitectureConfig(fidelity="accuracy", enable_quantization=False, latency_repeats=2)
    _, report = ArchitectureOptimizer(config).optimize(model, x, labels=labels)
    assert report.before.fidelity == 1.0 and report.fidelity_metric == "accuracy (labels)"

    def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
        return float((ref - out).abs().max())

    config = ArchitectureConfig(fidelity=max_abs, enable_quantization=False, latency_repeats=2)
    _, report = ArchitectureOptimizer(config).optimize(model, x)
    assert report.before.fidelity == 0.0 and report.after.fidelity > 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(order=["low_rank", "shrink"]),
        dict(quantization_bits=6),
        dict(quantization_mode="histogram"),
        dict(fidelity="psnr"),
        dict(sparsity_ratio=1.0),
        dict(
            compression_ratio=1.0, enable_low_rank=True
        ),  # passed validation, then failed in lowrank
        dict(compression_ratio=0.0, enable_low_rank=True),
        dict(enable_knowledge_distillation=True, order=["prune", "quantize", "distill"]),
        dict(distill_loss="huber", enable_knowledge_distillation=True),
        dict(embedding_bits=3),
        dict(embedding_bits=4, quantization_bits=16),
    ],
)
def test_bad_config_raises(kwargs: dict):
    with pytest.raises(ValueError):
        ArchitectureConfig(**kwargs)


def test_report_table_dict_and_plot(tmp_path):
    _, report = ArchitectureOptimizer(ArchitectureConfig(latency_repeats=2)).optimize(_mlp(), _x())
    assert isinstance(report, CompressionReport)
    data = report.to_dict()
    assert json.loads(json.dumps(data))["steps"][0]["name"] == "before"
    console = Console(record=True, width=200)
    console.print(report.table())
    assert "int8_dynamic" in console.export_text()
    path = report.plot(tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_step_that_breaks_the_model_raises_and_leaves_the_input_untouched() -> None:
    class Float32Only(nn.Module):
        """Fails once its weights are no longer float32 (e.g. after the bf16 cast)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fc.weight.dtype != torch.float32:
                raise TypeError("this model needs float32 weights")
            return self.fc(x)

    torch.manual_seed(0)
    model = nn.Sequential(Float32Only())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ArchitectureConfig(
        enable_pruning=True, sparsity_ratio=0.5, quantization_bits=16, latency_repeats=1
    )
    with pytest.raises(RuntimeError, match="fails after step 'cast'.*unchanged"):
        ArchitectureOptimizer(config).optimize(model, torch.randn(4, 8))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and value.dtype == torch.float32


def test_quantize_lists_layers_left_in_float() -> None:
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(32, 4))
    config = ArchitectureConfig(enable_pruning=False, quantization_bits=8, latency_repeats=1)
    _, report = ArchitectureOptimizer(config).optimize(model, torch.randint(0, 20, (3, 4)))
    assert report.after.left_in_float == ["0 (Embedding)"]
    assert "`0 (Embedding)`" in report.to_markdown()
