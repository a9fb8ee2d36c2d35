"""The toy table of docs/compress.md: quantization error and saved size on a small MLP.

Linear(64, 256) -> GELU -> Linear(256, 64), default init, seed 0, 32 Gaussian inputs.
Usage: python benchmarks/quantize_toy.py  (a property of this toy, not a benchmark of a real model)
"""

import copy

import torch
from torch import nn

from pimoe.compress import (
    cast,
    quantize_dynamic_int8,
    quantize_weight_only_int4,
    quantize_weight_only_int8,
    saved_bytes,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


if __name__ == "__main__":
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(32, 64)
    fp32 = saved_bytes(model)
    with torch.no_grad():
        reference = model(x)
        rows = []
        for name, per_channel in (
            ("dynamic int8, per-channel", True),
            ("dynamic int8, per-tensor", False),
        ):
            q = quantize_dynamic_int8(model, per_channel=per_channel)
            rows.append((name, _rel(q(x), reference), saved_bytes(q) / fp32))
        for name, apply in (
            ("weight-only int8", quantize_weight_only_int8),
            ("weight-only int4, group 32", quantize_weight_only_int4),
        ):
            q = copy.deepcopy(model)
            apply(q)
            rows.append((name, _rel(q(x), reference), saved_bytes(q) / fp32))
        q = cast(copy.deepcopy(model), torch.bfloat16)
        rows.append(("bf16 cast", _rel(q(x.bfloat16()), reference), saved_bytes(q) / fp32))
    print("| method | relative output error | saved_bytes vs fp32 |\n|---|---|---|")
    for name, err, size in rows:
        print(f"| {name} | {err:.4f} | {size:.3f} |")
