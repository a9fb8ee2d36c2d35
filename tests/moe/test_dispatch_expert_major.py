"""Inference of many rows runs expert by expert from gather to weighted sum
(``StackedExperts.expert_major``): same output as the token-by-token definition, chosen only
without autograd, for the built-in kernel, and past the size rule."""

import pytest
import torch
from test_dispatch import _reference

from pimoe import PiMoE
from pimoe.moe import dispatch, experts, grouped
from pimoe.moe.experts import StackedExperts


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = StackedExperts.expert_major

    def spy(self, x, token_rows, row_weights, splits):  # type: ignore[no-untyped-def]
        calls.append(len(splits))
        return real(self, x, token_rows, row_weights, splits)

    monkeypatch.setattr(StackedExperts, "expert_major", spy)
    return calls


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(activation="gelu", bias=True),
        dict(capacity_factor=0.6),  # dropped assignments
        dict(num_experts=16, top_k=4),  # idle experts
    ],
)
def test_expert_major_inference_matches_the_token_loop(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict
) -> None:
    monkeypatch.setattr(grouped, "EXPERT_MAJOR_MIN_BYTES", 0)
    monkeypatch.setattr(grouped, "CHUNK_HIDDEN_BYTES", 8 * 48 * 8)  # several chunks per expert
    monkeypatch.setattr("pimoe.moe.experts.EXPERT_MAJOR_MIN_BYTES", 0)
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    layer = PiMoE(16, **{"num_experts": 6, "top_k": 2, "ffn_dim": 24, **kwargs}).double()
    x = torch.randn(53, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = _reference(layer, x)
        got = layer(x)
    assert calls == [layer.num_experts]
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)
    assert len(calls) == 2


def test_expert_major_only_without_autograd_and_past_the_size_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _calls(monkeypatch)
    torch.manual_seed(0)
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=16)
    rows_needed = grouped.EXPERT_MAJOR_MIN_BYTES // (16 * 4)  # gathered rows [R, 16] fp32
    assert layer.experts.runs_expert_major(rows_needed)
    assert not layer.experts.runs_expert_major(rows_needed - 1)
    wide = PiMoE(16, num_experts=4, top_k=2, ffn_dim=1024).experts  # hidden [R, 2048] first
    rows_needed = grouped.EXPERT_MAJOR_MIN_HIDDEN_BYTES // (2048 * 4)
    assert wide.runs_expert_major(rows_needed)
    assert not wide.runs_expert_major(rows_needed - 1)
    assert not StackedExperts(4, 16, 16, backend="grouped_mm").runs_expert_major(10**9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.experts.runs_expert_major(10**9)
    monkeypatch.setattr("pimoe.moe.experts.EXPERT_MAJOR_MIN_BYTES", 0)
    x = torch.randn(9, 16)
    out = layer(x)  # grad mode, trainable experts: the differentiable path
    assert calls == [] and out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out.detach())
    assert calls == [4]
    layer.requires_grad_(False)
    layer(x)  # nothing needs a gradient
    assert calls == [4, 4]
    layer(x.requires_grad_())
    assert calls == [4, 4]


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_dispatcher_pads_within_the_banks_pad_limit(
    monkeypatch: pytest.MonkeyPatch, threads: int, threaded: bool
) -> None:
    """grouped_mm on several threads gets padding; one thread or the threaded experts kernel
    (whether or not this machine built it) runs the exact rows."""
    limits: list[float | None] = []
    monkeypatch.setattr(experts, "threaded_usable", lambda *a: threaded and threads > 1)
    real_plan = dispatch.plan_dispatch
    monkeypatch.setattr(
        dispatch,
        "plan_dispatch",
        lambda *a: limits.append(a[3] if len(a) > 3 else None) or real_plan(*a),
    )
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=16)
    layer(torch.randn(8, 16))
    assert limits == [dispatch.PAD_LIMIT_VS_GROUPED_MM if threads > 1 and not threaded else None]
