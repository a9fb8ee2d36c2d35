"""``plan_dispatch`` against its earlier implementation (argsort, bincount, repeat_interleave),
kept here as the reference: every field of the plan, and the layer's output and gradients, must
be bit-for-bit the same for random routings, masks and padding limits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from pimoe import PiMoE
from pimoe.moe import dispatch
from pimoe.moe.dispatch import PAD_MAX_MEAN_ROWS, DispatchPlan, plan_dispatch


def _reference_plan(
    indices: Tensor, num_experts: int, mask: Tensor | None = None, pad_limit: float | None = None
) -> DispatchPlan:
    """The earlier ``plan_dispatch``, unchanged."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    if mask is not None:
        flat = flat.masked_fill(~mask.reshape(-1), num_experts)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    splits = counts.tolist()
    executed = sum(splits)
    order = order[:executed]
    capacity = max(splits, default=0)
    pad = (
        pad_limit is not None
        and 0 < executed <= PAD_MAX_MEAN_ROWS * num_experts
        and num_experts * capacity <= pad_limit * executed
    )
    position = torch.arange(executed)
    if pad:
        starts = counts.cumsum(0) - counts
        shift = torch.arange(num_experts) * capacity - starts
        expert_sorted = torch.repeat_interleave(counts, output_size=executed)
        rows_of_sorted = position + shift[expert_sorted]
        num_rows = num_experts * capacity
        token_rows = torch.zeros(num_rows, dtype=torch.long)
        token_rows.scatter_(0, rows_of_sorted, order // k)
        row_assignment = torch.full((num_rows,), flat.numel(), dtype=torch.long)
        row_assignment.scatter_(0, rows_of_sorted, order)
        splits = [capacity] * num_experts
    else:
        rows_of_sorted, token_rows, row_assignment = position, order // k, order
    slot = torch.zeros_like(flat).scatter_(0, order, rows_of_sorted)
    return DispatchPlan(token_rows, slot, row_assignment, counts, splits, mask, k, pad)


def _assert_same_plan(ours: DispatchPlan, ref: DispatchPlan) -> None:
    for name in ("token_rows", "slot", "row_assignment", "counts"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.splits == ref.splits
    assert ours.padded == ref.padded
    assert ours.top_k == ref.top_k
    assert (ours.keep is None) == (ref.keep is None)


@settings(max_examples=200, deadline=None)
@given(
    num_experts=st.integers(1, 12),
    top_k=st.integers(1, 4),
    tokens=st.integers(1, 40),
    pad_limit=st.sampled_from([None, 1.0, 1.25, 2.0, math.inf]),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_plan_is_bitwise_the_earlier_plan(
    num_experts: int, top_k: int, tokens: int, pad_limit: float | None, masked: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, num_experts, (tokens, top_k), generator=gen)
    mask = torch.rand(tokens, top_k, generator=gen) < 0.7 if masked else None
    _assert_same_plan(
        plan_dispatch(indices, num_experts, mask, pad_limit),
        _reference_plan(indices, num_experts, mask, pad_limit),
    )


def test_the_padded_plan_is_exercised_with_idle_and_dropped_experts() -> None:
    """The padded branch with an expert that gets no row and dropped assignments."""
    indices = torch.tensor([[0, 2], [2, 0], [0, 3], [2, 2]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    ours = plan_dispatch(indices, 4, mask, math.inf)
    assert ours.padded and ours.splits == [4, 4, 4, 4]  # expert 1 idle, expert 2 has 4
    _assert_same_plan(ours, _reference_plan(indices, 4, mask, math.inf))


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 0.7])
def test_layer_output_and_gradients_are_bitwise_those_of_the_earlier_plan(
    monkeypatch: pytest.MonkeyPatch, pad: bool, capacity_factor: float | None
) -> None:
    torch.manual_seed(0)
    layer = PiMoE(32, num_experts=8, top_k=2, ffn_dim=48, capacity_factor=capacity_factor)
    monkeypatch.setattr(type(layer.experts), "pad_limit", math.inf if pad else None)
    monkeypatch.setattr(dispatch, "PAD_MAX_MEAN_ROWS", 2**62)
    x = torch.randn(64, 32)

    def run() -> list[Tensor]:
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out = layer(xg)
        out.square().sum().backward()
        return [out.detach(), xg.grad, *(p.grad for p in layer.parameters())]

    assert (
        dispatch.plan_dispatch(layer.router(x).indices, 8, None, layer.experts.pad_limit).padded
        == pad
    )
    ours = run()
    monkeypatch.setattr(dispatch, "plan_dispatch", _reference_plan)
    ref = run()
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
