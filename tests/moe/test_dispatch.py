"""The dispatcher's fast paths (padded batched experts, gather-only combine) against the
token-by-token definition of the layer, forward and gradients."""

import pytest
import torch
from torch import Tensor

from pimoe import PiMoE
from pimoe.moe import dispatch
from pimoe.moe.dispatch import combine, plan_dispatch, sort_by_expert
from pimoe.moe.grouped import grouped_ffn


def _reference(layer: PiMoE, x: Tensor) -> Tensor:
    """Token loop over each token's chosen experts (the definition of the routed output)."""
    route = layer.router(x)
    bank = layer.experts
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(x.shape[1])
        for j in range(route.indices.shape[1]):
            if route.mask is None or route.mask[t, j]:
                e = int(route.indices[t, j])
                h = x[t] @ bank.w_in[e].t() + (bank.b_in[e] if bank.b_in is not None else 0)
                acc = acc + route.weights[t, j] * (
                    bank.act(h[None])[0] @ bank.w_out[e].t()
                    + (bank.b_out[e] if bank.b_out is not None else 0)
                )
        rows.append(acc)
    return torch.stack(rows)


def _grads(layer: PiMoE, x: Tensor, fn) -> list[Tensor]:
    layer.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_()
    fn(xg).square().sum().backward()
    return [
        xg.grad,
        *(p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()),
    ]


@pytest.mark.parametrize("pad_limit", [None, 100.0])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(activation="gelu", bias=True),
        dict(capacity_factor=0.6),
        dict(num_experts=16, top_k=4),
    ],
)
def test_padded_and_packed_paths_match_the_token_loop_forward_and_gradients(
    monkeypatch: pytest.MonkeyPatch, pad_limit: float | None, kwargs: dict
) -> None:
    monkeypatch.setattr(dispatch, "PAD_LIMIT", pad_limit if pad_limit is not None else 0.0)
    torch.manual_seed(0)
    layer = PiMoE(16, **{"num_experts": 6, "top_k": 2, "ffn_dim": 24, **kwargs}).double()
    x = torch.randn(37, 16, dtype=torch.float64)
    plan = plan_dispatch(
        layer.router(x).indices, layer.num_experts, layer.router(x).mask, dispatch.PAD_LIMIT
    )
    assert plan.padded == (pad_limit is not None)  # the path under test really ran
    torch.testing.assert_close(layer(x), _reference(layer, x))
    for ours, ref in zip(_grads(layer, x, layer), _grads(layer, x, lambda t: _reference(layer, t))):
        torch.testing.assert_close(ours, ref)


def test_plan_inverts_slot_and_counts_real_assignments() -> None:
    torch.manual_seed(1)
    indices = torch.randint(0, 5, (40, 3))
    for pad_limit in (None, 100.0):
        plan = plan_dispatch(indices, 5, pad_limit=pad_limit)
        assert plan.counts.tolist() == torch.bincount(indices.reshape(-1), minlength=5).tolist()
        assert torch.equal(
            plan.row_assignment[plan.slot], torch.arange(120)
        )  # row_assignment inverts slot
        assert torch.equal(plan.token_rows[plan.slot], torch.arange(40).repeat_interleave(3))
        assert sum(plan.splits) == plan.token_rows.numel()


def test_decode_combine_never_calls_index_add(monkeypatch: pytest.MonkeyPatch) -> None:
    """index_add_ into a few rows stalls for tens of ms with 2 threads on busy cores."""
    layer = PiMoE(16, num_experts=8, top_k=2, ffn_dim=32)
    x = torch.randn(1, 16)
    expected = _reference(layer, x)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("index_add_ called")

    monkeypatch.setattr(Tensor, "index_add_", forbidden)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected.detach())
        token_sorted, weight_sorted, _ = sort_by_expert(
            *(lambda r: (r.indices, r.weights))(layer.router(x)), 8
        )
        rows = x.index_select(0, token_sorted) * 2.0
        torch.testing.assert_close(
            combine(x, rows, token_sorted, weight_sorted), 2.0 * x * weight_sorted.sum()
        )


def test_batched_and_per_expert_grouped_ffn_agree_with_gradients() -> None:
    torch.manual_seed(2)
    w_in = torch.randn(4, 12, 8, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(4, 8, 6, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b_out = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)

    def act(h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    inputs = (x, w_in, b_in, w_out, b_out)
    uniform = grouped_ffn(x, w_in, b_in, w_out, b_out, [5, 5, 5, 5], act)  # batched matmuls
    grads_uniform = torch.autograd.grad(uniform.square().sum(), inputs)
    per_expert = [
        grouped_ffn(
            x[5 * e : 5 * e + 5],
            w_in[e : e + 1],
            b_in[e : e + 1],
            w_out[e : e + 1],
            b_out[e : e + 1],
            [5],
            act,
        )
        for e in range(4)
    ]
    looped = torch.cat(per_expert)
    grads_looped = torch.autograd.grad(looped.square().sum(), inputs)
    torch.testing.assert_close(uniform, looped)
    for a, b in zip(grads_uniform, grads_looped):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *t: grouped_ffn(*t[:5], [5, 5, 5, 5], act), inputs)
