"""Conv2d and LSTM models on sklearn digits: channel pruning, static int8 convolutions, dynamic
int8 LSTM, accuracy before and after (with stated floors), and saving / loading them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pimoe.compress import (
    ConvChannelPruneConfig,
    DistillConfig,
    Int8DynamicConfig,
    StaticInt8Config,
    compress_,
    load_compressed,
    save_compressed,
)
from pimoe.compress.conv import prune_conv_channels

datasets = pytest.importorskip("sklearn.datasets")


def conv_net() -> nn.Sequential:
    """``[B, 1, 8, 8]`` -> ``[B, 10]``."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32 * 4 * 4, 10),
    )


class RowLSTM(nn.Module):
    """Reads an 8x8 digit row by row: ``[B, 8, 8]`` -> ``[B, 10]``."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], torch.tensor(y)[train], x[test], torch.tensor(y)[test]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=torch.Generator().manual_seed(_)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def trained_conv(digits) -> nn.Sequential:
    torch.manual_seed(0)
    return _train(conv_net(), digits[0], digits[1], epochs=6)


@pytest.mark.slow
def test_channel_pruning_then_static_int8_keeps_accuracy(
    trained_conv, digits, tmp_path: Path
) -> None:
    import copy

    x_train, _, x_test, y_test = digits
    model = copy.deepcopy(trained_conv)
    before = _accuracy(model, x_test, y_test)
    calibration = list(x_train[:512].split(64))
    report = compress_(model, [ConvChannelPruneConfig(0.25)])
    assert report.steps[1].note == "0: 16 -> 12 channels; 3: 32 -> 24 channels"
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [12]
    pruned = _accuracy(model, x_test, y_test)
    compress_(
        model,
        [
            DistillConfig(data=list(x_train.split(64)), epochs=2, lr=1e-3, teacher=trained_conv),
            StaticInt8Config(calibration=calibration),
        ],
    )
    final = _accuracy(model, x_test, y_test)
    print(
        f"conv digits accuracy: fp32 {before:.3f}, 25% channels pruned {pruned:.3f}, "
        f"+ distilled + static int8 {final:.3f}"
    )
    # floors: trained 0.96+, 25% of channels gone without repair within 10 points, repaired + int8 within 2
    assert before > 0.96 and pruned > before - 0.10 and final >= before - 0.02, (
        before,
        pruned,
        final,
    )
    assert report.after.bytes_torch_save < 0.75 * report.before.bytes_torch_save
    kinds = {type(m).__module__ for m in model.modules()}
    assert {"torch.ao.nn.quantized.modules.conv", "torch.ao.nn.quantized.modules.linear"} <= kinds

    save_compressed(tmp_path / "cnn", model)
    with pytest.raises(ValueError, match="pass model="):
        load_compressed(tmp_path / "cnn")
    loaded = load_compressed(tmp_path / "cnn", model=conv_net())
    with torch.inference_mode():
        assert torch.equal(loaded(x_test), model(x_test))


def test_removing_channels_nobody_reads_changes_nothing() -> None:
    torch.manual_seed(0)
    conv, consumer = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        consumer.weight[:, [1, 5]] = 0.0  # channels 1 and 5 are read by nobody: score 0
    x = torch.randn(2, 3, 6, 6)
    new_conv, _, new_consumer = prune_conv_channels(conv, consumer, 0.25)
    assert new_conv.out_channels == new_consumer.in_channels == 6
    torch.testing.assert_close(new_consumer(torch.relu(new_conv(x))), consumer(torch.relu(conv(x))))
    bn, linear = nn.BatchNorm2d(8).eval(), nn.Linear(8 * 6 * 6, 5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    same_conv, same_bn, same_linear = prune_conv_channels(conv, linear, 0.0, bn=bn)
    assert same_bn is not None and same_bn.num_features == 8  # nothing pruned at amount 0
    torch.testing.assert_close(
        same_linear(same_bn(same_conv(x)).flatten(1)), linear(bn(conv(x)).flatten(1))
    )
    with pytest.raises(ValueError, match="consumer"):
        prune_conv_channels(conv, nn.Linear(7, 2), 0.5)


def test_dynamic_int8_lstm_keeps_accuracy_and_saves(digits, tmp_path: Path) -> None:
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = _train(RowLSTM(), x_train[:, 0], y_train, epochs=8)
    before = _accuracy(model, x_test[:, 0], y_test)
    report = compress_(model, Int8DynamicConfig())
    after = _accuracy(model, x_test[:, 0], y_test)
    assert type(model.lstm).__name__ == "LSTM" and type(model.lstm).__module__.endswith(
        "dynamic.modules.rnn"
    )
    print(f"LSTM digits accuracy: fp32 {before:.3f}, dynamic int8 {after:.3f}")
    assert before > 0.85 and after >= before - 0.02, (before, after)  # floor: within 2 points
    assert report.after.bytes_torch_save < 0.4 * report.before.bytes_torch_save

    save_compressed(tmp_path / "lstm", model)
    loaded = load_compressed(tmp_path / "lstm", model=RowLSTM())
    with torch.inference_mode():
        assert torch.equal(loaded(x_test[:, 0]), model(x_test[:, 0]))
