"""The threaded kernel's buffer pool (pimoe.moe.threaded.empty_cache / cached_bytes /
set_row_pool): weight gradients and row buffers of 1 MiB or more come from kept blocks, results
stay the per-expert loop's bit for bit when a block is reused with stale contents, autograd
takes a weight gradient as ``.grad`` without copying it, row counts that move a little share a
size class, the least recently kept blocks go first beyond 1 GiB, blocks freed by inference are
kept up to 64 MiB only, and empty_cache frees what is kept."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from test_threaded_experts import _loop_reference, _swiglu
from torch import Tensor

from pimoe.moe import threaded
from pimoe.moe.combine_ops import gather_rows
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
    and empty_cache frees it. The step's row buffers (here the hidden activations,
    ``[512, 512]`` fp32 = 1 MiB) are back in the pool once the backward is done."""
    w_in, w_out = _weights(0)
    grad_bytes = (w_in.numel() + w_out.numel()) * 4
    row_bytes = 512 * 2 * F * 4
    _run(w_in, w_out, [128, 128, 128, 128], threaded.swiglu, seed=1)
    assert threaded.cached_bytes() == row_bytes
    pointer = w_in.grad.data_ptr()  # type: ignore[union-attr]
    w_in.grad = w_out.grad = None
    assert threaded.cached_bytes() == row_bytes + grad_bytes
    _run(w_in, w_out, [128, 128, 128, 128], threaded.swiglu, seed=2)
    assert w_in.grad.data_ptr() == pointer  # type: ignore[union-attr]  # 2 MiB: its own class
    assert threaded.cached_bytes() == row_bytes  # the 1 MiB blocks: hidden and w_out's grad
    w_in.grad = w_out.grad = None
    assert threaded.empty_cache() == row_bytes + grad_bytes
    assert threaded.cached_bytes() == 0


@pytest.fixture
def rows_from_malloc() -> Iterator[None]:
    threaded.set_row_pool(False)
    yield
    threaded.set_row_pool(True)


def test_row_pool_off_keeps_row_buffers_out(two_threads: None, rows_from_malloc: None) -> None:
    with pytest.raises(TypeError, match="True or False"):
        threaded.set_row_pool("false")  # type: ignore[arg-type]
    w_in, w_out = _weights(0)
    _run(w_in, w_out, [128, 128, 128, 128], threaded.swiglu, seed=1)
    assert threaded.cached_bytes() == 0
    w_in.grad = w_out.grad = None
    assert threaded.cached_bytes() == (w_in.numel() + w_out.numel()) * 4


def _gathered(rows: int, width: int, inference: bool = False) -> int:
    """Gather ``rows`` rows of ``width`` floats into a pooled row buffer and free it; returns its
    data pointer."""
    x = torch.ones(4, width)
    out = gather_rows(x, torch.zeros(rows, dtype=torch.long), inference)
    assert out.shape == (rows, width) and bool((out == 1).all())
    return out.data_ptr()


def test_row_counts_that_move_a_little_share_a_block(two_threads: None) -> None:
    """Size classes: 8 per power of two, so 1000 and 1020 rows of 2 KiB (1.95 and 1.99 MiB)
    take the same 2 MiB block, and 1100 rows (2.15 MiB) needs a block of the next class."""
    first = _gathered(1000, 512)
    assert threaded.cached_bytes() == 2 << 20
    assert _gathered(1020, 512) == first
    assert threaded.cached_bytes() == 2 << 20
    _gathered(1100, 512)
    assert threaded.cached_bytes() == (2 << 20) + (9 << 18)


def test_the_pool_keeps_at_most_1_gib_most_recent_first(two_threads: None) -> None:
    """Eight row buffers of distinct size classes (128-240 MiB, 1.4 GiB in all): the pool keeps
    the most recently freed ones that fit in 1 GiB and gives back the rest; the newest block is
    taken again by the next buffer of its size."""
    sizes = [(128 + 16 * i) << 20 for i in range(8)]  # classes step by 16 MiB in [128, 256) MiB
    pointers = [_gathered(size // 4096, 1024) for size in sizes]
    newest_that_fit = 0
    while newest_that_fit < len(sizes) and sum(sizes[-newest_that_fit - 1 :]) <= 1 << 30:
        newest_that_fit += 1
    assert 0 < newest_that_fit < len(sizes)
    assert threaded.cached_bytes() == sum(sizes[-newest_that_fit:])
    assert _gathered(sizes[-1] // 4096, 1024) == pointers[-1]


def test_inference_keeps_at_most_64_mib(two_threads: None) -> None:
    """Inference's row buffers come from the pool too (a forward takes its gathered rows and
    outputs back), but of blocks freed by inference only the most recent 64 MiB are kept, and
    a training block in the pool is not evicted for them."""
    w_in, w_out = _weights(0)
    with torch.no_grad():
        x = torch.randn(2048, D)  # outputs of 2 MiB, hidden activations not kept
        first = threaded.threaded_ffn(x, w_in, w_out, [512] * 4, threaded.swiglu, False)
        pointer = first.data_ptr()
        del first
        assert threaded.cached_bytes() == 2 << 20
        again = threaded.threaded_ffn(x, w_in, w_out, [512] * 4, threaded.swiglu, False)
        assert again.data_ptr() == pointer
        del again
    training = _gathered(8 << 10, 1024)  # 32 MiB, freed by training
    sizes = [(16 + 2 * i) << 20 for i in range(6)]  # 16-26 MiB, distinct classes: 126 MiB
    for size in sizes:
        _gathered(size // 4096, 1024, inference=True)
    newest_that_fit = 0
    while sum(sizes[len(sizes) - newest_that_fit - 1 :]) <= 64 << 20:
        newest_that_fit += 1
    assert threaded.cached_bytes() == (32 << 20) + sum(sizes[-newest_that_fit:])
    assert _gathered(8 << 10, 1024) == training


def test_a_training_step_gathers_into_the_pool(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer's gather takes a pooled row buffer, of training's budget with grad enabled, of
    inference's under no_grad; both give ``x[token_rows]``."""
    from pimoe.moe import PiMoE, dispatch

    calls: list[tuple[int, bool]] = []

    def spy(x: Tensor, index: Tensor, inference: bool) -> Tensor:
        calls.append((index.numel(), inference))
        return gather_rows(x, index, inference)

    monkeypatch.setattr(dispatch, "gather_rows", spy)
    torch.manual_seed(0)
    layer = PiMoE(64, num_experts=8, top_k=2, ffn_dim=32)
    x = torch.randn(2, 48, 64)
    layer(x).sum().backward()
    assert calls == [(2 * 48 * 2, False)]
    with torch.no_grad():
        want = layer(x)
    assert calls == [(2 * 48 * 2, False), (2 * 48 * 2, True)]
    torch.testing.assert_close(layer(x).detach(), want)
