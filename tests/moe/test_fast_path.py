"""The per-call fast path: lazy routing losses, fused top-k softmax, the grouped_mm kernel choice
and backward passes that skip the gradients of frozen weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pimoe.moe.router as router_module
from pimoe.moe import PiMoE
from pimoe.moe.grouped import grouped_ffn, grouped_mm_usable
from pimoe.moe.losses import load_balancing_loss, router_z_loss

MATMULS = {
    "mm",
    "bmm",
    "_grouped_mm",
    "addmm",
    "baddbmm",
    "rows_mm",
    "weights_mm",
}  # + pimoe.moe.threaded


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func.overloadpacket.__name__ in MATMULS
        return func(*args, **(kwargs or {}))


def _act(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def test_inference_computes_no_routing_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name, fn in (
        ("load_balancing_loss", load_balancing_loss),
        ("router_z_loss", router_z_loss),
    ):
        monkeypatch.setattr(
            router_module, name, lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a)
        )
    torch.manual_seed(0)
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=16)
    x = torch.randn(10, 16)
    with torch.inference_mode():
        layer(x)
    assert calls == []
    route = layer.router(x)
    expected = load_balancing_loss(route.logits.softmax(-1), route.indices, 4)
    torch.testing.assert_close(layer.aux_loss, expected)
    assert not layer.aux_loss.requires_grad  # computed in the forward's (inference) mode
    layer.aux_loss  # noqa: B018  (kept, not computed again)
    assert calls == ["load_balancing_loss"]


def test_lazy_losses_keep_their_gradient() -> None:
    torch.manual_seed(0)
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=16)
    x = torch.randn(10, 16)
    layer(x)
    (layer.aux_loss + layer.z_loss).backward()
    lazy = layer.router.gate.weight.grad.clone()
    layer.router.gate.weight.grad = None
    logits = layer.router.gate(x)
    indices = logits.topk(2, dim=-1).indices
    (load_balancing_loss(logits.softmax(-1), indices, 4) + router_z_loss(logits)).backward()
    torch.testing.assert_close(lazy, layer.router.gate.weight.grad)
    assert layer.last_stats is not None and layer.last_stats.num_tokens == 10


def test_top_k_softmax_equals_renormalized_softmax() -> None:
    torch.manual_seed(0)
    router = PiMoE(16, num_experts=8, top_k=3, ffn_dim=16).router
    x = torch.randn(50, 16)
    route = router(x)
    weights, indices = router.gate(x).softmax(-1).topk(3, dim=-1)
    assert torch.equal(route.indices, indices)
    torch.testing.assert_close(route.weights, weights / weights.sum(-1, keepdim=True))


def _weights(
    num_experts: int, d: int, f: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    w_in = torch.randn(num_experts, 2 * f, d, dtype=dtype) / d**0.5
    w_out = torch.randn(num_experts, d, f, dtype=dtype) / f**0.5
    return w_in, w_out


def test_grouped_mm_path_equals_the_per_expert_loop() -> None:
    torch.manual_seed(0)
    w_in, w_out = _weights(4, 16, 8)
    assert grouped_mm_usable(w_in, None, w_out, None)
    counts = [3, 0, 6, 2]
    x = torch.randn(11, 16)
    outs, grads = [], []
    for weights in ((w_in, w_out), (w_in.double(), w_out.double())):  # fp64: the loop kernel
        wi, wo = (w.clone().requires_grad_() for w in weights)
        xi = x.to(wi.dtype).detach().requires_grad_()
        y = grouped_ffn(xi, wi, None, wo, None, counts, _act)
        y.sum().backward()  # a stride-0 gradient: grouped_mm's CPU backward needs it contiguous
        outs.append(y.double())
        grads.append([t.grad.double() for t in (xi, wi, wo)])  # type: ignore[union-attr]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(grads[0][1][1], torch.zeros_like(grads[0][1][1]))  # idle expert


def test_grouped_mm_usable_rules() -> None:
    w_in, w_out = _weights(4, 16, 8)
    bias = torch.zeros(4, 16)
    assert not grouped_mm_usable(w_in, bias, w_out, None)
    assert not grouped_mm_usable(w_in.double(), None, w_out.double(), None)
    odd_in, odd_out = _weights(4, 6, 8)  # 24-byte rows
    assert not grouped_mm_usable(odd_in, None, odd_out, None)
    assert grouped_mm_usable(w_in, None, w_out, None, torch.randn(5, 16))
    assert not grouped_mm_usable(w_in, None, w_out, None, torch.randn(5, 16).double())


@pytest.mark.parametrize(
    ("counts", "dtype"),
    [([3, 0, 6, 2], torch.float32), ([4, 4, 4, 4], torch.float32), ([3, 0, 6, 2], torch.float64)],
    ids=["grouped_mm", "batched", "loop"],
)
def test_frozen_experts_get_no_weight_gradient_work(counts: list[int], dtype: torch.dtype) -> None:
    """LoRA with frozen experts: the backward computes the input gradient only."""
    torch.manual_seed(0)
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    matmuls = {}
    for frozen in (False, True):
        w_in, w_out = (w.requires_grad_(not frozen) for w in _weights(4, 16, 8, dtype))
        y = grouped_ffn(x, w_in, None, w_out, None, counts, _act)
        with _CountMatmuls() as mode:
            y.backward(torch.ones_like(y))
        matmuls[frozen] = mode.count
        assert (w_in.grad is None) == frozen and x.grad is not None
    assert (
        matmuls[False] == 2 * matmuls[True] > 0
    )  # per expert: 2 input-gradient + 2 weight matmuls


def test_backends_agree_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """loop (made to take padding: batched matmuls) and grouped_mm: same outputs and gradients,
    including the stride-0 gradient of ``.sum()``."""
    from pimoe.moe import dispatch
    from pimoe.moe.experts import StackedExperts

    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    results = []
    plans: list[bool] = []
    real_plan = dispatch.plan_dispatch
    monkeypatch.setattr(
        dispatch, "plan_dispatch", lambda *a, **kw: plans.append(a[3] is not None) or real_plan(*a)
    )
    from pimoe.moe import threaded

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # padding is for several threads
    monkeypatch.setattr(threaded, "threaded_kernel", lambda: None)  # ... without this kernel
    for backend in ("loop", "grouped_mm"):
        monkeypatch.setattr(StackedExperts, "accepts_padding", backend == "loop")
        torch.manual_seed(1)
        layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=16, backend=backend)
        out = layer(x)
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in layer.parameters()]))
    assert plans == [True, False]  # the loop kernel was offered padding, grouped_mm not
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b)


def test_padding_only_for_small_mean_rows_per_expert() -> None:
    from pimoe.moe.dispatch import PAD_MAX_MEAN_ROWS, plan_dispatch

    for mean_rows, padded in ((PAD_MAX_MEAN_ROWS, True), (PAD_MAX_MEAN_ROWS + 1, False)):
        indices = torch.arange(4).repeat(mean_rows).view(-1, 1)  # [4 * mean_rows, 1], balanced
        assert plan_dispatch(indices, 4, pad_limit=2.0).padded == padded


def test_pad_limit_depends_on_grouped_mm_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the threaded kernel runs the exact rows (several threads, no biases), no padding;
    else where grouped_mm cannot run, padding against a per-expert loop (PAD_LIMIT); where it
    can, padding only on several threads and only within PAD_LIMIT_VS_GROUPED_MM; never for
    other backends."""
    from pimoe.moe import threaded
    from pimoe.moe.dispatch import PAD_LIMIT, PAD_LIMIT_VS_GROUPED_MM
    from pimoe.moe.experts import StackedExperts

    plain = StackedExperts(4, 16, 32)
    assert grouped_mm_usable(plain.w_in, plain.b_in, plain.w_out, plain.b_out)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    if threaded.threaded_kernel() is not None:
        assert plain.pad_limit is None and not plain.accepts_padding
        assert StackedExperts(4, 16, 32).double().pad_limit is None
        assert StackedExperts(4, 16, 32, bias=True).pad_limit == PAD_LIMIT
    monkeypatch.setattr(threaded, "threaded_kernel", lambda: None)
    assert plain.pad_limit == PAD_LIMIT_VS_GROUPED_MM < PAD_LIMIT and plain.accepts_padding
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert plain.pad_limit is None and not plain.accepts_padding
    assert StackedExperts(4, 16, 32, bias=True).pad_limit == PAD_LIMIT  # grouped_mm: no biases
    assert StackedExperts(4, 16, 32).double().pad_limit == PAD_LIMIT  # nor float64
    assert not StackedExperts(4, 16, 32, backend="grouped_mm").accepts_padding
