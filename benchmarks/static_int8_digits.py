"""Static int8 (calibrated, FX graph mode) vs dynamic int8 vs fp32 on a small CNN trained on sklearn digits.

Prints test accuracy, bytes of the saved state dict and median latency of one 360-image batch
(1 thread, interleaved rounds). Run: python benchmarks/static_int8_digits.py
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from pimoe.compress import quantize_dynamic_int8
from pimoe.compress.static import quantize_static_int8


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def main() -> None:
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for idx in train[torch.randperm(len(train))].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    calibration = list(x[train[:512]].split(64))  # training images only
    models = {
        "fp32": model,
        "int8 dynamic (Linear only)": quantize_dynamic_int8(model),
        "int8 static (Conv2d + Linear, calibrated)": quantize_static_int8(
            model, x[test[:4]], calibration
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(30):
            for name, m in models.items():
                start = time.perf_counter()
                m(x[test])
                times[name].append(time.perf_counter() - start)
    base_bytes = base_ms = 0.0
    print(f"{'model':45s} {'test acc':>8s} {'bytes':>8s} {'ratio':>6s} {'ms':>6s} {'ratio':>6s}")
    for name, m in models.items():
        buffer = io.BytesIO()
        torch.save(m.state_dict(), buffer)
        size, ms = buffer.tell(), statistics.median(times[name]) * 1000
        base_bytes, base_ms = (size, ms) if name == "fp32" else (base_bytes, base_ms)
        with torch.inference_mode():
            acc = float((m(x[test]).argmax(1) == y[test]).float().mean())
        print(
            f"{name:45s} {acc:8.3f} {size:8d} {size / base_bytes:6.3f} {ms:6.2f} {ms / base_ms:6.2f}"
        )


if __name__ == "__main__":
    main()
