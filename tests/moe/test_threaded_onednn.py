"""The threaded kernel's default float32 forward matmuls on oneDNN (threaded.forward_matmul):
the per-expert loop's outputs and gradients to float rounding, on every entry point that
multiplies plain weights, and the choice validated."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_threaded_experts import SPLITS, _loop_reference, _operands
from torch.profiler import ProfilerActivity, profile

from pimoe.moe import grouped, threaded


@pytest.fixture
def onednn_forward() -> object:
    before = threaded.forward_matmul()
    threaded.set_forward_matmul("onednn")
    yield
    threaded.set_forward_matmul(before)


def _onednn_calls(run: Callable[[], object]) -> int:
    """How many oneDNN linear calls the profiler saw while ``run`` ran on one torch thread (the
    profiler records the calling thread's ops; on one thread the kernel runs every expert there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    finally:
        torch.set_num_threads(threads)
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("act", [threaded.swiglu, torch.nn.functional.gelu], ids=["swiglu", "gelu"])
def test_onednn_forward_is_the_loop_to_rounding(
    two_threads: None, onednn_forward: None, act: threaded.Activation
) -> None:
    x, w_in, w_out = _operands(torch.float32, act=act)
    y = threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, keep_hidden=True)
    y.backward(torch.cos(y.detach()))
    ref, ref_grads = _loop_reference(x, w_in, w_out, act)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip((x.grad, w_in.grad, w_out.grad), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        inference = threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, False)
        torch.testing.assert_close(inference, ref, atol=1e-5, rtol=1e-5)
        rows = torch.arange(sum(SPLITS))
        weights = torch.ones(sum(SPLITS))
        major = grouped.expert_major_ffn(x, rows, weights, w_in, None, w_out, None, SPLITS, act)
        torch.testing.assert_close(major, ref, atol=1e-5, rtol=1e-5)
        matmuls = 2 * sum(n > 0 for n in SPLITS)  # two per expert with rows
        run = lambda: threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, False)  # noqa: E731
        assert _onednn_calls(run) == matmuls
        threaded.set_forward_matmul("mkl")  # the same call on at::mm: bit for bit
        assert torch.equal(threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, False), ref)
        assert _onednn_calls(run) == 0


def test_forward_matmul_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="one of"):
        threaded.set_forward_matmul("blas")
    before = threaded._state.pop("forward_matmul", None)
    try:
        monkeypatch.setenv("PIMOE_EXPERT_MATMUL", "cublas")
        with pytest.raises(ValueError, match="PIMOE_EXPERT_MATMUL"):
            threaded.forward_matmul()
        monkeypatch.setenv("PIMOE_EXPERT_MATMUL", "mkl")
        assert threaded.forward_matmul() == "mkl"
    finally:
        if before is not None:
            threaded._state["forward_matmul"] = before
