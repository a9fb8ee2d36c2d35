"""The threaded kernel's float32 matmul libraries (threaded.expert_matmul): the own AVX-512
kernel and oneDNN give the per-expert loop's outputs and gradients to float rounding on every
entry point that multiplies plain weights, each is shown to run (profiler counts), the own
kernel equals torch.mm on any shape and strides, and the choice is validated."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_threaded_experts import SPLITS, _loop_reference, _operands
from torch.profiler import ProfilerActivity, profile

from pimoe.moe import grouped, matmul_choice, threaded

needs_avx512 = pytest.mark.skipif(
    not matmul_choice._has_avx512(), reason="the own matmul kernel needs a CPU with AVX-512"
)


@pytest.fixture
def choose_matmul() -> object:
    """Restores the process's expert matmul after a test that changes it."""
    before = threaded.expert_matmul()
    yield threaded.set_expert_matmul
    threaded.set_expert_matmul(before)


def _calls(run: Callable[[], object], op: str) -> int:
    """How many ``op`` calls the profiler saw while ``run`` ran on one torch thread (the profiler
    records the calling thread's ops; on one thread the kernel runs every expert there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    finally:
        torch.set_num_threads(threads)
    return sum(e.count for e in prof.key_averages() if e.key == op)


def _loop_to_rounding(
    act: threaded.Activation, splits: list[int] = SPLITS
) -> tuple[torch.Tensor, ...]:
    """Forward, backward, inference and expert-major outputs of the threaded kernel checked
    against the per-expert loop to float rounding; returns the operands."""
    x, w_in, w_out = _operands(torch.float32, act=act, splits=splits)
    y = threaded.threaded_ffn(x, w_in, w_out, splits, act, keep_hidden=True)
    y.backward(torch.cos(y.detach()))
    ref, ref_grads = _loop_reference(x, w_in, w_out, act, splits)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip((x.grad, w_in.grad, w_out.grad), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        inference = threaded.threaded_ffn(x, w_in, w_out, splits, act, False)
        torch.testing.assert_close(inference, ref, atol=1e-5, rtol=1e-5)
        rows = torch.arange(sum(splits))
        weights = torch.ones(sum(splits))
        major = grouped.expert_major_ffn(x, rows, weights, w_in, None, w_out, None, splits, act)
        torch.testing.assert_close(major, ref, atol=1e-5, rtol=1e-5)
    return x, w_in, w_out


OWN_SPLITS = [20, 0, 4, 40, 16, 3]  # the own kernel's forward takes experts of 4-128 rows


@needs_avx512
@pytest.mark.parametrize("act", [threaded.swiglu, torch.nn.functional.gelu], ids=["swiglu", "gelu"])
def test_avx512_is_the_loop_to_rounding(
    two_threads: None, choose_matmul: Callable[[str], None], act: threaded.Activation
) -> None:
    choose_matmul("avx512")
    x, w_in, w_out = _loop_to_rounding(act, OWN_SPLITS)
    x, w_in, w_out = (t.detach().requires_grad_() for t in (x, w_in, w_out))

    def step() -> None:
        y = threaded.threaded_ffn(x, w_in, w_out, OWN_SPLITS, act, keep_hidden=True)
        y.backward(torch.ones_like(y))

    assert _calls(step, "aten::mm") == 0  # the backward on the own kernel
    assert _calls(step, "mkldnn::_linear_pointwise") == 2  # the 3-row expert's forward
    choose_matmul("mkl")
    experts = sum(n > 0 for n in OWN_SPLITS)
    assert _calls(step, "aten::mm") == 6 * experts  # the same step on at::mm


@needs_avx512
@pytest.mark.parametrize(
    ("splits", "library_matmuls"),
    [([128, 4], 0), ([129, 4], 2), ([512, 4], 2), ([513, 4], 6), ([128, 3], 2)],
    ids=["own", "forward-on-onednn", "forward-on-onednn-512", "all-on-libraries", "few-rows"],
)
def test_avx512_leaves_large_experts_to_the_library(
    threaded_kernel_built: None,
    choose_matmul: Callable[[str], None],
    splits: list[int],
    library_matmuls: int,
) -> None:
    """Experts of fewer than 4 or more than 128 rows run their forward on oneDNN, of more than
    512 rows also their backward on at::mm; the others on the own kernel (to rounding either
    way)."""
    choose_matmul("avx512")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(splits), 16, generator=gen, requires_grad=True)
    w_in = torch.randn(2, 24, 16, generator=gen, requires_grad=True)
    w_out = torch.randn(2, 16, 12, generator=gen, requires_grad=True)

    def step() -> torch.Tensor:
        y = threaded.threaded_ffn(x, w_in, w_out, splits, threaded.swiglu, keep_hidden=True)
        y.backward(torch.cos(y.detach()))
        return y

    assert _calls(step, "aten::mm") + _calls(step, "mkldnn::_linear_pointwise") == library_matmuls
    x.grad = w_in.grad = w_out.grad = None
    ref, ref_grads = _loop_reference(x, w_in, w_out, threaded.swiglu, splits)
    torch.testing.assert_close(step(), ref, atol=1e-4, rtol=1e-4)
    for got, want in zip((x.grad, w_in.grad, w_out.grad), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@needs_avx512
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 20),
    k=st.integers(1, 70),
    m=st.integers(1, 150),
    a_transposed=st.booleans(),
    b_sliced=st.booleans(),
)
def test_avx512_mm_is_torch_mm(
    threaded_kernel_built: None, n: int, k: int, m: int, a_transposed: bool, b_sliced: bool
) -> None:
    """Every remainder of the 6-row and 64-column tiles, A with any strides, B rows strided."""
    gen = torch.Generator().manual_seed(n * 10_000 + k * 200 + m)
    a = torch.randn(k, n, generator=gen).t() if a_transposed else torch.randn(n, k, generator=gen)
    b = (
        torch.randn(k, m + 3, generator=gen)[:, 1 : m + 1]
        if b_sliced
        else torch.randn(k, m, generator=gen)
    )
    got = torch.full((n, m), torch.nan)
    threaded.loaded_kernel().avx512_mm_out(got, a, b)
    torch.testing.assert_close(got, a @ b, atol=1e-5 * k, rtol=1e-5)


@pytest.mark.parametrize("act", [threaded.swiglu, torch.nn.functional.gelu], ids=["swiglu", "gelu"])
def test_onednn_forward_is_the_loop_to_rounding(
    two_threads: None, choose_matmul: Callable[[str], None], act: threaded.Activation
) -> None:
    choose_matmul("onednn")
    x, w_in, w_out = _loop_to_rounding(act)
    ref, _ = _loop_reference(x, w_in, w_out, act)
    onednn = "mkldnn::_linear_pointwise"
    with torch.no_grad():
        matmuls = 2 * sum(n > 0 for n in SPLITS)  # two per expert with rows
        run = lambda: threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, False)  # noqa: E731
        assert _calls(run, onednn) == matmuls
        choose_matmul("mkl")  # the same call on at::mm: bit for bit
        assert torch.equal(threaded.threaded_ffn(x, w_in, w_out, SPLITS, act, False), ref)
        assert _calls(run, onednn) == 0


def test_expert_matmul_choice_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="one of"):
        threaded.set_expert_matmul("blas")
    monkeypatch.setattr(matmul_choice, "_has_avx512", lambda: False)
    with pytest.raises(ValueError, match="no AVX-512"):
        threaded.set_expert_matmul("avx512")
    before = matmul_choice._choice.pop("name", None)
    try:
        monkeypatch.delenv("PIMOE_EXPERT_MATMUL", raising=False)
        assert threaded.expert_matmul() in ("onednn", "mkl")  # the default without AVX-512
        monkeypatch.setenv("PIMOE_EXPERT_MATMUL", "cublas")
        with pytest.raises(ValueError, match="PIMOE_EXPERT_MATMUL"):
            threaded.expert_matmul()
        monkeypatch.setenv("PIMOE_EXPERT_MATMUL", "mkl")
        assert threaded.expert_matmul() == "mkl"
    finally:
        if before is not None:
            matmul_choice._choice["name"] = before
