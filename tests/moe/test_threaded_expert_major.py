"""The threaded kernel's expert-major inference (pimoe.moe.threaded.expert_major_forward): the
Python expert-major loop's output, whole experts per thread, several chunks per expert, the same
bits on every run, and chosen by grouped.expert_major_ffn only where it can run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pimoe.moe import grouped, threaded
from pimoe.moe.threaded import Activation

SPLITS = [50, 0, 7, 33, 120, 1, 64, 25]  # uneven, one expert without rows
T, D, HIDDEN = 150, 16, 24


def _operands(act: Activation, dtype: torch.dtype) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen, dtype=dtype)
    # each expert's rows are distinct tokens; tokens 0-4 get no row at all
    rows = torch.cat([5 + torch.randperm(T - 5, generator=gen)[:n] for n in SPLITS])
    weights = torch.rand(rows.shape[0], generator=gen, dtype=dtype)
    w_in = torch.randn(len(SPLITS), 2 * HIDDEN, D, generator=gen, dtype=dtype) / 4
    width = act(w_in[0, :, :1].t()).shape[1]
    w_out = torch.randn(len(SPLITS), D, width, generator=gen, dtype=dtype) / 4
    return x, rows, weights, w_in, w_out


def _python_loop(args: tuple[Tensor, ...], act: Activation) -> Tensor:
    """grouped.expert_major_ffn's Python loop (what one thread runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, rows, weights, w_in, w_out = args
        return grouped.expert_major_ffn(x, rows, weights, w_in, None, w_out, None, SPLITS, act)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("act", [threaded.swiglu, F.gelu, F.relu, F.silu])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_is_the_python_loop(two_threads: None, act: Activation, dtype: torch.dtype) -> None:
    args = _operands(act, dtype)
    name = threaded.FUSED_ACTIVATIONS[act]
    got = threaded.expert_major_forward(*args, SPLITS, name, 16)  # several chunks per expert
    want = _python_loop(args, act)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert not got[:5].any()  # tokens without rows
    # the experts are dealt to the threads in advance: the same bits on every run
    for chunk in (16, 16, 1000):
        again = threaded.expert_major_forward(*args, SPLITS, name, chunk)
        assert torch.equal(again, got) if chunk == 16 else torch.allclose(again, got, atol=tol)


def test_expert_major_ffn_takes_the_kernel_only_where_it_runs(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = grouped.expert_major_forward

    def spy(*args: object) -> Tensor:
        calls.append(str(args[6]))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(grouped, "expert_major_forward", spy)
    x, rows, weights, w_in, w_out = _operands(threaded.swiglu, torch.float32)
    grouped.expert_major_ffn(x, rows, weights, w_in, None, w_out, None, SPLITS, threaded.swiglu)
    assert calls == ["swiglu"]
    bias = torch.zeros(len(SPLITS), D)
    grouped.expert_major_ffn(x, rows, weights, w_in, None, w_out, bias, SPLITS, threaded.swiglu)

    def python_swiglu(h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    grouped.expert_major_ffn(x, rows, weights, w_in, None, w_out, None, SPLITS, python_swiglu)
    torch.set_num_threads(1)
    grouped.expert_major_ffn(x, rows, weights, w_in, None, w_out, None, SPLITS, threaded.swiglu)
    assert calls == ["swiglu"]  # biases, a Python activation, one thread: the Python loop
