import pytest
import torch
from torch import nn

from pimoe.compress.lowrank import LowRankLinear, factorize, rank_for_energy, rank_for_ratio


def _mlp(d_in: int = 32, hidden: int = 64, d_out: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def _linear_of_rank(n_in: int, n_out: int, rank: int) -> nn.Linear:
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, rank) @ torch.randn(rank, n_in))
    return linear


def test_full_rank_reproduces_the_layer() -> None:
    linear = nn.Linear(24, 40)
    low = LowRankLinear.from_linear(linear, rank=24)
    x = torch.randn(8, 24)
    assert low.rank == 24
    torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.effective_weight(), linear.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.second.bias, linear.bias)


def test_rank_is_clipped_and_bias_optional() -> None:
    linear = nn.Linear(6, 10, bias=False)
    low = LowRankLinear.from_linear(linear, rank=100)
    assert low.rank == 6 and low.second.bias is None
    x = torch.randn(3, 6)
    torch.testing.assert_close(low(x), linear(x), atol=1e-5, rtol=1e-5)


def test_low_rank_weight_is_recovered_exactly() -> None:
    linear = _linear_of_rank(48, 64, 5)
    low = LowRankLinear.from_linear(linear, rank=5)
    x = torch.randn(4, 48)
    torch.testing.assert_close(low(x), linear(x), atol=1e-4, rtol=1e-4)


def test_energy_rank_is_minimal() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert rank_for_energy(s, 16 / 22) == 1
    assert rank_for_energy(s, 16 / 22 + 1e-6) == 2
    assert rank_for_energy(s, 20 / 22) == 2
    assert rank_for_energy(s, 0.95) == 3
    assert rank_for_energy(s, 1.0) == 4
    for energy in (0.5, 0.8, 0.9, 0.99):
        r = rank_for_energy(s, energy)
        kept = (s[:r] ** 2).sum() / (s**2).sum()
        assert kept >= energy and (r == 1 or (s[: r - 1] ** 2).sum() / (s**2).sum() < energy)


def test_factorize_energy_report_and_outputs() -> None:
    model = nn.Sequential(_linear_of_rank(64, 96, 3), nn.ReLU(), _linear_of_rank(96, 64, 4))
    x = torch.randn(5, 64)
    before = model(x)
    report = factorize(model, energy=0.999999)
    assert [layer.rank for layer in report.layers] == [3, 4]
    assert all(isinstance(model[i], LowRankLinear) for i in (0, 2))
    first = report.layers[0]
    assert first.params_before == 64 * 96 + 96 and first.params_after == 3 * (64 + 96) + 96
    assert first.relative_error < 1e-5
    assert report.params_after < report.params_before
    torch.testing.assert_close(model(x), before, atol=1e-3, rtol=1e-3)


def test_factorize_relative_error_matches_reconstruction() -> None:
    model = _mlp()
    weight = model[0].weight.detach().clone()
    report = factorize(model, ratio=0.3)
    layer = report.layers[0]
    assert layer.replaced
    measured = (model[0].effective_weight().detach() - weight).norm() / weight.norm()
    assert abs(float(measured) - layer.relative_error) < 1e-4


def test_factorize_skips_when_not_saving() -> None:
    model = _mlp()  # random weights are near full rank
    report = factorize(model, energy=1.0)
    assert not any(layer.replaced for layer in report.layers)
    assert all("not save" in layer.reason for layer in report.layers)
    assert all(type(m) is not LowRankLinear for m in model)
    assert report.params_after == report.params_before


def test_ratio_rank_respects_target() -> None:
    assert rank_for_ratio(64, 64, 0.25) == 8  # 8 * 128 = 1024 = 0.25 * 4096
    model = _mlp(64, 64, 64)
    report = factorize(model, ratio=0.25)
    for layer in report.layers:
        assert layer.rank == 8 and layer.params_after - 64 <= 0.25 * 64 * 64


def test_skip_patterns_min_features_and_tied() -> None:
    model = _mlp(32, 64, 4)
    report = factorize(model, ratio=0.2, skip=["0"], min_features=8)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons == {"0": "matches skip", "2": "min(in, out) < min_features=8"}
    tied = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    tied[1].weight = tied[0].weight
    report = factorize(tied, ratio=0.2)
    assert all(layer.reason == "weight is tied to another module" for layer in report.layers)


def test_multihead_attention_projection_is_left_alone() -> None:
    model = nn.Sequential(nn.MultiheadAttention(32, 4))
    report = factorize(model, ratio=0.2)
    assert report.layers == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"energy": 0.9, "ratio": 0.5},
        {"energy": 0.0},
        {"energy": 1.5},
        {"ratio": 1.0},
        {"min_features": 0},
    ],
)
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        factorize(_mlp(), **kwargs)


def test_bare_linear_and_bad_rank_rejected() -> None:
    with pytest.raises(ValueError):
        factorize(nn.Linear(4, 4))
    with pytest.raises(ValueError):
        LowRankLinear(4, 4, rank=0)


def test_pimoe_lm_router_gates_and_tied_head_are_not_factorized() -> None:
    from pimoe.moe.config import MoEConfig
    from pimoe.moe.model import LMConfig, PiMoELM

    config = LMConfig(
        vocab_size=64,
        block_size=16,
        n_layer=2,
        n_head=2,
        d_model=32,
        moe=MoEConfig(num_experts=4, ffn_dim=32),
    )
    model = PiMoELM(config).eval()
    report = factorize(model, ratio=0.3)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["lm_head"] == "weight is tied to another module"
    assert not any("router" in name for name in reasons)
    assert type(model.blocks[0].attn.qkv) is LowRankLinear
    assert model(torch.randint(0, 64, (2, 16))).logits.shape == (2, 16, 64)
