"""The expert-parallel C++ kernel (pimoe.moe.threaded): the per-expert loop's results bit for
bit (outputs, every gradient, frozen weights, double backward), fused in C++ for pimoe's
activations and per matmul for any other, chosen by grouped_ffn on several threads only, traced
by torch.compile, and a clean fallback when it cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pimoe.moe import grouped, threaded
from pimoe.moe.grouped import grouped_ffn
from pimoe.moe.threaded import Activation

# bit-for-bit comparisons with the per-expert loop: the kernel's matmuls are at::mm's
pytestmark = pytest.mark.usefixtures("mkl_forward")

SPLITS = [7, 0, 1, 12, 3, 0, 9, 5]  # uneven, two experts without rows


def _swiglu(h: Tensor) -> Tensor:  # a Python activation: the kernel runs it between matmuls
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS = [threaded.swiglu, F.gelu, F.relu, F.silu, _swiglu]  # the first four fused


def _operands(
    dtype: torch.dtype, grad: bool = True, act: Activation = _swiglu, splits: list[int] = SPLITS
) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(splits), 16, generator=gen, dtype=dtype)
    w_in = torch.randn(len(splits), 2 * 24, 16, generator=gen, dtype=dtype) / 4
    width = act(w_in[0, :, :1].t()).shape[1]  # 24 for SwiGLU, 48 for a pointwise activation
    w_out = torch.randn(len(splits), 16, width, generator=gen, dtype=dtype) / 5
    return x.requires_grad_(grad), w_in.requires_grad_(grad), w_out.requires_grad_(grad)


def _loop_reference(
    x: Tensor, w_in: Tensor, w_out: Tensor, act: Activation = _swiglu, splits: list[int] = SPLITS
) -> tuple[Tensor, list[Tensor]]:
    """Output and gradients of the per-expert loop kernel (grouped.py's fallback), one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [t.detach().requires_grad_() for t in (x, w_in, w_out)]
        y = grouped._GroupedFFN.apply(args[0], args[1], None, args[2], None, splits, act, True)
        y.backward(torch.cos(y.detach()))
    finally:
        torch.set_num_threads(before)
    return y.detach(), [t.grad for t in args]  # type: ignore[misc]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=["swiglu", "gelu", "relu", "silu", "python"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threaded_kernel_is_the_loop_bit_for_bit(
    two_threads: None, dtype: torch.dtype, act: Activation
) -> None:
    x, w_in, w_out = _operands(dtype, act=act)
    y = threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, keep_hidden=True)
    # freed NaN buffers of the gradients' sizes, which the allocator hands out again: an expert
    # without rows whose weight gradient is not written would keep NaNs
    del [torch.full_like(t, torch.nan) for t in (x, w_in, w_out)][:]
    y.backward(torch.cos(y.detach()))
    ref, ref_grads = _loop_reference(x, w_in, w_out, act)
    assert torch.equal(y, ref)
    for got, want in zip((x.grad, w_in.grad, w_out.grad), ref_grads):
        assert got is not None and torch.equal(got, want)
    assert not w_in.grad[1].any() and not w_out.grad[5].any()  # type: ignore[index]
    with torch.no_grad():  # the inference form, without an autograd node
        assert torch.equal(threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, False), ref)


@pytest.mark.parametrize("frozen", [(0, 1, 2), (0, 2), (1,), (2,)])
@pytest.mark.parametrize("act", [threaded.swiglu, _swiglu], ids=["fused", "python"])
def test_frozen_inputs_get_no_gradient(
    two_threads: None, frozen: tuple[int, ...], act: Activation
) -> None:
    """Only the gradients asked for (``needs_input_grad``), each the loop's."""
    operands = _operands(torch.float32, act=act)
    for i in frozen:
        operands[i].requires_grad_(False)
    y = grouped_ffn(operands[0], operands[1], None, operands[2], None, SPLITS, act)
    if len(frozen) == 3:
        assert not y.requires_grad
        return
    y.backward(torch.cos(y.detach()))
    _, ref_grads = _loop_reference(*operands, act=act)
    for i, (t, want) in enumerate(zip(operands, ref_grads)):
        assert t.grad is None if i in frozen else torch.equal(t.grad, want)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "act", [threaded.swiglu, F.gelu, _swiglu], ids=["swiglu", "gelu", "python"]
)
def test_double_backward(two_threads: None, act: Activation) -> None:
    small = [2, 0, 1, 3]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(4, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    width = 6 if act is F.gelu else 3  # F of w_out [E, D, F]
    w_out = torch.randn(4, 4, width, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(*t: Tensor) -> Tensor:
        return threaded.threaded_ffn(t[0], t[1], t[2], small, act, keep_hidden=True)

    assert torch.autograd.gradcheck(fn, (x, w_in, w_out))
    assert torch.autograd.gradgradcheck(fn, (x, w_in, w_out))
    # gradgradcheck differentiates the create_graph gradients against themselves: check that
    # they are the plain backward's
    y = fn(x, w_in, w_out)
    v = torch.cos(y.detach())
    plain = torch.autograd.grad(y, (x, w_in, w_out), v, retain_graph=True)
    with_graph = torch.autograd.grad(y, (x, w_in, w_out), v, create_graph=True)
    for got, want in zip(with_graph, plain):
        torch.testing.assert_close(got, want)


def test_grouped_ffn_picks_the_kernel_on_several_threads_only(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = grouped.threaded_ffn

    def counted(*args: object) -> Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(grouped, "threaded_ffn", counted)
    x, w_in, w_out = _operands(torch.float32, grad=False)
    grouped_ffn(x, w_in, None, w_out, None, SPLITS, _swiglu)
    assert calls == [1]
    grouped_ffn(x, w_in, torch.zeros(8, 48), w_out, None, SPLITS, _swiglu)  # biases: the loop
    grouped_ffn(x[:16], w_in, None, w_out, None, [2] * 8, _swiglu)  # equal rows: batched matmuls
    big = [129, 130] + [128] * 4  # 6 experts on 2 threads, over 128 rows each: grouped_mm
    grouped_ffn(torch.randn(sum(big), 16), w_in[:6], None, w_out[:6], None, big, _swiglu)
    assert calls == [1]
    big += [128, 128]  # 8 experts: 4 per thread
    grouped_ffn(torch.randn(sum(big), 16), w_in, None, w_out, None, big, _swiglu)
    assert calls == [1, 1]
    torch.set_num_threads(1)
    grouped_ffn(x, w_in, None, w_out, None, SPLITS, _swiglu)
    assert calls == [1, 1]


def test_failed_build_warns_once_and_falls_back(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.utils.cpp_extension as cpp

    builds: list[int] = []

    def broken(*args: object, **kwargs: object) -> None:
        builds.append(1)
        raise OSError("no compiler")

    monkeypatch.setattr(cpp, "load_inline", broken)
    monkeypatch.setattr(threaded, "_state", {})
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert threaded.threaded_kernel() is None
    assert threaded.threaded_kernel() is None and builds == [1]  # remembered: built once
    x, w_in, w_out = _operands(torch.float32, grad=False)
    ref, _ = _loop_reference(x, w_in, w_out)
    assert torch.allclose(grouped_ffn(x, w_in, None, w_out, None, SPLITS, _swiglu), ref, atol=1e-6)
    monkeypatch.setattr(threaded, "_state", {})
    monkeypatch.setenv("PIMOE_THREADED_EXPERTS", "0")
    assert threaded.threaded_kernel() is None


@pytest.mark.parametrize("keep_hidden", [False, True])
def test_torch_compile_traces_the_fused_kernel(two_threads: None, keep_hidden: bool) -> None:
    """The entry points are custom ops: one graph (``fullgraph`` raises on a graph break), the
    eager results and gradients bit for bit."""
    x, w_in, w_out = _operands(torch.float32, grad=keep_hidden, act=threaded.swiglu)

    def fn(*t: Tensor) -> Tensor:
        return threaded.threaded_ffn(t[0], t[1], t[2], SPLITS, threaded.swiglu, keep_hidden)

    with torch.set_grad_enabled(keep_hidden):
        got, want = torch.compile(fn, fullgraph=True)(x, w_in, w_out), fn(x, w_in, w_out)
    assert torch.equal(got, want)
    if keep_hidden:
        for g, r in zip(
            torch.autograd.grad(got.sum(), (x, w_in, w_out)),
            torch.autograd.grad(want.sum(), (x, w_in, w_out)),
        ):
            assert torch.equal(g, r)


def test_custom_ops_pass_opcheck(two_threads: None) -> None:
    """Schemas, fake (meta) implementations and dispatch of every entry point
    (``torch.library.opcheck``)."""
    x, w_in, w_out = _operands(torch.float32, grad=False, act=threaded.swiglu)
    y, h = threaded.ffn_forward(x, w_in, w_out, SPLITS, "swiglu", True)
    grad_y = torch.cos(y)
    for op, args in (
        (threaded.ffn_forward, (x, w_in, w_out, SPLITS, "swiglu", True)),
        (threaded.ffn_forward, (x, w_in, w_out, SPLITS, "swiglu", False)),
        (threaded.ffn_backward, (grad_y, x, w_in, w_out, h, SPLITS, "swiglu", [True, False, True])),
        (threaded.rows_mm, (x, w_in.transpose(1, 2), SPLITS)),
        (threaded.weights_mm, (grad_y, x, SPLITS)),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
