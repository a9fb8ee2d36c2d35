"""The threaded kernel's buffer pool (pimoe.moe.threaded.empty_cache / cached_bytes): weight
gradients of 1 MiB or more come from kept blocks, results stay the per-expert loop's bit for bit
when a block is reused with stale contents, autograd takes a weight gradient as ``.grad``
without copying it, empty_cache frees what is kept, and outputs (inference) never enter it."""

from __future__ import annotations

import pytest
import torch
from test_threaded_experts import _loop_reference, _swiglu
from torch import Tensor

from pimoe.moe import threaded
from pimoe.moe.threaded import Activation

# bit-for-bit comparisons with the per-expert loop: the kernel's matmuls are at::mm's
pytestmark = pytest.mark.usefixtures("mkl_forward")

D, F = 256, 256  # w_in [E, 2F, D] fp32: 2 MiB, w_out [E, D, F]: 1 MiB, both pooled


def _weights(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w_in = torch.randn(4, 2 * F, D, generator=gen) / 16
    w_out = torch.randn(4, D, F, generator=gen) / 16
    return w_in.requires_grad_(), w_out.requires_grad_()


def _run(w_in: Tensor, w_out: Tensor, splits: list[int], act: Activation, seed: int) -> Tensor:
    x = torch.randn(sum(splits), D, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_()
    y = threaded.threaded_ffn(x, w_in, w_out, splits, act, keep_hidden=True)
    y.backward(torch.cos(y.detach()))
    return x


@pytest.mark.parametrize("act", [threaded.swiglu, _swiglu], ids=["fused", "python"])
def test_reused_blocks_give_the_loop_results(two_threads: None, act: Activation) -> None:
    """The second pass gets the first pass's blocks back, full of its gradients: an expert that
    had rows then and has none now must still get a zero weight gradient."""
    w_in, w_out = _weights(0)
    _run(w_in, w_out, [300, 40, 0, 172], act, seed=1)
    w_in.grad = w_out.grad = None
    assert threaded.cached_bytes() >= (w_in.numel() + w_out.numel()) * 4
    x = _run(w_in, w_out, [310, 0, 90, 112], act, seed=2)
    _, want = _loop_reference(x, w_in, w_out, act, [310, 0, 90, 112])
    for got, ref in zip((x.grad, w_in.grad, w_out.grad), want):
        assert got is not None and torch.equal(got, ref)
    assert not w_in.grad[1].any() and not w_out.grad[1].any()  # type: ignore[index]


def test_gradients_are_taken_without_a_copy_and_come_back(two_threads: None) -> None:
    """AccumulateGrad keeps the kernel's buffer as ``.grad`` (a copy would return the block to
    the pool during backward); dropping ``.grad`` returns it, the next backward takes it again,
    and empty_cache frees it."""
    w_in, w_out = _weights(0)
    grad_bytes = (w_in.numel() + w_out.numel()) * 4
    _run(w_in, w_out, [128, 128, 128, 128], threaded.swiglu, seed=1)
    assert threaded.cached_bytes() == 0
    pointers = {w_in.grad.data_ptr(), w_out.grad.data_ptr()}  # type: ignore[union-attr]
    w_in.grad = w_out.grad = None
    assert threaded.cached_bytes() == grad_bytes
    _run(w_in, w_out, [128, 128, 128, 128], threaded.swiglu, seed=2)
    assert {w_in.grad.data_ptr(), w_out.grad.data_ptr()} == pointers  # type: ignore[union-attr]
    assert threaded.cached_bytes() == 0
    w_in.grad = w_out.grad = None
    assert threaded.empty_cache() == grad_bytes
    assert threaded.cached_bytes() == 0


def test_outputs_stay_out_of_the_pool(two_threads: None) -> None:
    """Inference outputs follow the number of tokens: pooling them would fill the pool with
    sizes a server never asks for again."""
    w_in, w_out = _weights(0)
    with torch.no_grad():
        for rows in (1024, 1500, 2000):  # outputs and hidden activations of 1-8 MiB
            x = torch.randn(rows, D)
            y = threaded.threaded_ffn(x, w_in, w_out, [rows // 4] * 4, threaded.swiglu, False)
            del y
    assert threaded.cached_bytes() == 0
