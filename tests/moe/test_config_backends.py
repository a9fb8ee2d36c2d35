"""MoEConfig, the experts-backend registry and token positions handed to experts."""

import pytest
import torch
from torch import Tensor, nn

from pimoe.moe import MoEConfig, PiMoE, Router, experts_backends, register_experts_backend
from pimoe.moe.backends import _BACKENDS
from pimoe.moe.experts import FFN


def test_config_and_keywords_build_the_same_layer() -> None:
    config = MoEConfig(num_experts=4, top_k=2, ffn_dim=16, score="sigmoid", shared_experts=1)
    torch.manual_seed(0)
    a = PiMoE(8, config)
    torch.manual_seed(0)
    b = PiMoE(8, num_experts=4, top_k=2, ffn_dim=16, score="sigmoid", shared_experts=1)
    assert a.config == b.config == config
    x = torch.randn(5, 8)
    torch.testing.assert_close(a(x), b(x))
    c = PiMoE(8, config, top_k=3)  # keywords override the config
    assert c.config.top_k == 3 and c.router.top_k == 3 and c.config.num_experts == 4


def test_config_validates_itself_and_round_trips() -> None:
    config = MoEConfig(num_experts=6, top_k=3, capacity_factor=1.5, backend="loop")
    assert MoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="score"):
        MoEConfig(score="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0.0)
    with pytest.raises(TypeError, match="num_experts"):
        MoEConfig(num_experts=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown MoEConfig keys"):
        MoEConfig.from_dict({"num_expert": 4})
    with pytest.raises(TypeError, match="unknown MoE option"):
        PiMoE(8, num_expert=4)
    with pytest.raises(TypeError, match="MoEConfig"):
        Router(8, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown experts backend"):
        PiMoE(8, backend="nosuch")


def test_unweighted_outputs_with_all_experts_sum_every_expert() -> None:
    """``weight_outputs=False`` with ``top_k == E`` is the plain sum of all experts (MoEfication)."""
    torch.manual_seed(0)
    layer = PiMoE(8, num_experts=4, top_k=4, ffn_dim=16, weight_outputs=False)
    x = torch.randn(7, 8)
    expected = sum(layer.experts.expert(e)(x) for e in range(4))
    torch.testing.assert_close(layer(x), expected)
    weighted = PiMoE(8, layer.config.replace(weight_outputs=True))
    weighted.load_state_dict(layer.state_dict())
    assert not torch.allclose(weighted(x), expected)


def test_registered_backend_is_called_with_sorted_rows_counts_and_positions() -> None:
    calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def spy(experts, x_sorted: Tensor, counts: Tensor, positions: Tensor | None) -> Tensor:
        calls.append((x_sorted, counts, positions))
        return _BACKENDS["loop"](experts, x_sorted, counts, positions)

    register_experts_backend("spy", spy)
    try:
        assert "spy" in experts_backends()
        with pytest.raises(ValueError, match="already registered"):
            register_experts_backend("spy", lambda *a: a[1])
        torch.manual_seed(0)
        layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=16, backend="spy")
        reference = PiMoE(8, layer.config.replace(backend="loop"))
        reference.load_state_dict(layer.state_dict())
        x = torch.randn(2, 3, 8)
        torch.testing.assert_close(layer(x), reference(x))
        x_sorted, counts, positions = calls[-1]
        assert int(counts.sum()) == 2 * 3 * 2 == x_sorted.shape[0]
        # each row is the token at its position, and positions are grouped by expert
        torch.testing.assert_close(x_sorted, x.reshape(-1, 8)[positions])
        given = torch.arange(100, 106).view(2, 3)
        layer(x, positions=given)
        assert set(calls[-1][2].tolist()) == set(range(100, 106))
    finally:
        _BACKENDS.pop("spy", None)


class _PositionEcho(nn.Module):
    """An expert that writes each row's position into its output (to check the hand-over)."""

    uses_positions = True

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return positions.to(x.dtype).unsqueeze(-1).expand_as(x).clone()


def test_position_aware_experts_get_their_rows_positions() -> None:
    layer = PiMoE(4, experts=[FFN(4, 8), _PositionEcho()], top_k=1)
    with torch.no_grad():  # channel 0 > 0 goes to the echo expert
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[1, 0], layer.router.gate.weight[0, 0] = 50.0, -50.0
    x = torch.randn(2, 5, 4)
    x[..., 0] = torch.tensor([[1, -1, 1, -1, 1], [-1, 1, 1, -1, -1]], dtype=x.dtype)
    positions = torch.arange(10).view(2, 5) + 1000
    out = layer(x, positions=positions)
    echo = x[..., 0] > 0
    torch.testing.assert_close(out[echo][:, 0], positions[echo].float())
    with pytest.raises(ValueError, match="positions"):
        layer(x, positions=torch.arange(5))


_HOST_READS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__")


@pytest.mark.parametrize("shared_experts", [0, 1])
def test_grouped_mm_layer_never_reads_tensors_on_the_host(
    monkeypatch: pytest.MonkeyPatch, shared_experts: int
) -> None:
    """With the grouped_mm backend (what ``auto`` runs for bf16 on CUDA) a dropless layer's
    forward and backward read no tensor value on the host: no device sync on a GPU, where a
    sync per layer call costs more than the layer at small batches (docs/benchmarks.md)."""
    torch.manual_seed(0)
    layer = PiMoE(
        32, num_experts=8, top_k=2, ffn_dim=64, backend="grouped_mm", shared_experts=shared_experts
    )
    reference = PiMoE(32, layer.config.replace(backend="loop"))
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10, 32)
    expected = reference(x)

    def refuse(name: str):
        def read(self: Tensor, *args: object, **kwargs: object) -> object:
            raise AssertionError(f"host read Tensor.{name}")

        return read

    for name in _HOST_READS:
        monkeypatch.setattr(Tensor, name, refuse(name))
    out = layer(x.requires_grad_())
    out.sum().backward()
    monkeypatch.undo()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert x.grad is not None and layer.experts.w_in.grad is not None
