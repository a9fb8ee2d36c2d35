"""combine_ops.gather_sum (the combine's forward and the gather's backward on the CPU) and
combine_ops.combine_grad_rows (the combine's backward): the index_select + bmm they replace, any
index pattern, out-of-range indices refused, and the layer's outputs and gradients unchanged
when they run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pimoe.moe import PiMoE, combine_ops, dispatch


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    tokens=st.integers(0, 30),
    k=st.integers(1, 4),
    d=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_gather_sum_is_index_select_and_bmm(
    threaded_kernel_built: None, rows: int, tokens: int, k: int, d: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(rows, d, generator=gen)
    slot = torch.randint(0, rows, (tokens, k), generator=gen)
    w = torch.randn(tokens, k, generator=gen)
    want = torch.bmm(w.unsqueeze(1), src.index_select(0, slot.reshape(-1)).view(tokens, k, d))
    torch.testing.assert_close(combine_ops.gather_sum(src, slot, w), want.squeeze(1))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 40),
    tokens=st.integers(1, 30),
    d=st.integers(1, 70),
    dots=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_combine_grad_rows_is_the_gather_and_dots(
    threaded_kernel_built: None, rows: int, tokens: int, d: int, dots: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(tokens, d, generator=gen)
    token = torch.randint(0, tokens, (rows,), generator=gen)
    row_w, y = torch.randn(rows, generator=gen), torch.randn(rows, d, generator=gen)
    grad_y, got = combine_ops.combine_grad_rows(grad_out, token, row_w, y if dots else y[:0])
    gathered = grad_out.index_select(0, token)
    torch.testing.assert_close(grad_y, gathered * row_w.unsqueeze(1))
    if dots:
        torch.testing.assert_close(got, (y * gathered).sum(-1))
    else:
        assert got.numel() == 0


def test_gather_sum_refuses_outside_slots(two_threads: None) -> None:
    src = torch.randn(5, 3)
    for bad in (5, -1):
        with pytest.raises(RuntimeError, match="outside"):
            combine_ops.gather_sum(src, torch.tensor([[0, bad]]), torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="float32"):
        combine_ops.gather_sum(src.double(), torch.tensor([[0]]), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match="outside"):
        combine_ops.combine_grad_rows(src, torch.tensor([5]), torch.ones(1), src[:0])


def test_layer_unchanged_by_gather_sum(two_threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = PiMoE(24, num_experts=6, top_k=2, ffn_dim=16, capacity_factor=1.0)  # drops: keep mask
    x = torch.randn(40, 24)
    calls: list[str] = []

    def spy(name: str) -> object:
        real = getattr(dispatch, name)
        return lambda *args: calls.append(name) or real(*args)

    for name in ("gather_sum", "combine_grad_rows"):
        monkeypatch.setattr(dispatch, name, spy(name))
    results = []
    for usable in (True, False):
        monkeypatch.setattr(dispatch, "gather_sum_usable", lambda src, _u=usable: _u)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, [p.grad for p in layer.parameters()]))
    # combine forward, combine backward, gather backward; only where usable
    assert calls == ["gather_sum", "combine_grad_rows", "gather_sum"]
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    for a, b in zip(gp_a, gp_b):
        torch.testing.assert_close(a, b)
