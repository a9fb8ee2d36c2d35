"""Static int8 (FX graph mode, calibrated) on a small CNN trained on sklearn digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pimoe.compress.static import load_static_int8, quantize_static_int8, save_static_int8

datasets = pytest.importorskip("sklearn.datasets")


class DigitsCNN(nn.Module):
    """``[B, 1, 8, 8]`` images -> ``[B, 10]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def trained() -> tuple[DigitsCNN, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for idx in train.split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[train], x[test], y[test]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_static_int8_keeps_accuracy_and_is_int8(trained, tmp_path: Path) -> None:
    model, x_train, x_test, y_test = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = list(x_train[:512].split(64))  # training images only: the test set is not seen
    q = quantize_static_int8(model, x_test[:4], calibration)
    fp32_acc, int8_acc = _accuracy(model, x_test, y_test), _accuracy(q, x_test, y_test)
    assert fp32_acc > 0.9
    assert int8_acc >= fp32_acc - 0.02, (fp32_acc, int8_acc)
    kinds = {type(m).__module__ for m in q.modules()}
    assert (
        "torch.ao.nn.quantized.modules.linear" in kinds
        and "torch.ao.nn.quantized.modules.conv" in kinds
    )
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items()
    )  # the input model is untouched

    path = tmp_path / "int8.pt"
    save_static_int8(q, path)
    loaded = load_static_int8(DigitsCNN(), x_test[:4], path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_test), q(x_test))
    assert path.stat().st_size < 0.4 * sum(p.numel() * 4 for p in model.parameters())


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc(x)
        return x


def test_bad_inputs(trained, tmp_path: Path) -> None:
    model, _, x_test, _ = trained
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_static_int8(model, x_test[:4], [])
    with pytest.raises(ValueError, match="torch.fx can trace"):
        quantize_static_int8(Branchy(), torch.randn(2, 4), [torch.randn(2, 4)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a static int8 state dict"):
        load_static_int8(DigitsCNN(), x_test[:4], bad)


def test_architecture_optimizer_static_mode(trained) -> None:
    from pimoe.compress import ArchitectureConfig, ArchitectureOptimizer

    model, x_train, x_test, y_test = trained
    config = ArchitectureConfig(
        enable_pruning=False,
        quantization_bits=8,
        quantization_mode="static",
        fidelity="accuracy",
        latency_repeats=2,
    )
    result = ArchitectureOptimizer(config).optimize(
        model, x_test, labels=y_test, distill_data=list(x_train[:256].split(64))
    )
    before, after = result.report.steps[0], result.report.steps[-1]
    assert [s.name for s in result.report.steps] == ["before", "int8_static", "embeddings"]
    assert "int8 static (x86), 3 Linear/Conv2d layer(s)" in result.report.steps[1].note
    assert after.note == "int4 embeddings: none matched"
    assert after.fidelity >= before.fidelity - 0.02
    assert after.bytes_torch_save < 0.4 * before.bytes_torch_save
    with pytest.raises(ValueError, match="needs calibration batches"):
        ArchitectureOptimizer(config).optimize(model, x_test)
    with pytest.raises(ValueError, match="quantization_mode"):
        ArchitectureConfig(quantization_mode="histogram")
