"""int8 / int4 fused experts: error bounds against the dequantized reference and the float
weights, in PiMoE layers and inside tiny transformers MoE models."""

import io

import pytest
import torch
import torch.nn.functional as F

from pimoe import PiMoE
from pimoe.compress.quantize_experts import (
    Int4StackedExperts,
    Int8StackedExperts,
    QuantizedStackedExperts,
    quantize_experts,
    quantize_int4,
    quantize_int8,
)
from pimoe.moe.grouped import grouped_ffn


def test_int8_and_int4_codes_reconstruct_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 32, 64)
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and scale.shape == (3, 32)
    assert ((codes.float() * scale[..., None] - w).abs() <= scale[..., None] / 2 + 1e-7).all()
    layer = PiMoE(64, num_experts=3, top_k=2, ffn_dim=32)
    bank = Int4StackedExperts(layer.experts, group_size=32)
    _, scales_zeros = quantize_int4(layer.experts.w_in, 32)  # [E, I / 32, O, 2]
    step = scales_zeros[..., 0].transpose(1, 2).repeat_interleave(32, dim=-1)  # [E, O, I]
    error = (bank.dequantize("w_in", torch.float32) - layer.experts.w_in).abs()
    assert (error <= step / 2 + 1e-6).all()


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.02), (4, 0.2)])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_layer_matches_its_dequantized_reference_and_stays_near_float(
    bits: int, bound: float, bias: bool
) -> None:
    torch.manual_seed(0)
    layer = PiMoE(64, num_experts=4, top_k=2, ffn_dim=64, bias=bias).eval()
    x = torch.randn(30, 64)
    with torch.no_grad():
        ref = layer(x)
    assert quantize_experts(layer, bits, group_size=32) == ["experts"]
    bank = layer.experts
    assert isinstance(bank, Int8StackedExperts if bits == 8 else Int4StackedExperts)
    with torch.no_grad():
        out = layer(x)
        route = layer.router(x)
        w_in, w_out = bank.dequantized(torch.float32)
        rows = x.repeat_interleave(2, dim=0)  # a grouped run of every token through expert 0..3
        counts = torch.tensor([15, 15, 15, 15])
        torch.testing.assert_close(
            bank(rows, counts),
            grouped_ffn(rows, w_in, bank.b_in, w_out, bank.b_out, counts, bank.act),
            rtol=1e-4,
            atol=1e-5,
        )
    assert route.indices.shape == (30, 2)
    assert 0 < float((out - ref).norm() / ref.norm()) < bound
    xg = x.clone().requires_grad_()  # a gradient is needed: dequantized float kernel, same values
    layer(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_quantized_state_dict_round_trips_and_is_smaller() -> None:
    torch.manual_seed(0)
    layer = PiMoE(64, num_experts=4, top_k=2, ffn_dim=64).eval()
    float_bytes = sum(p.numel() * 4 for p in layer.experts.parameters())
    sizes = {}
    for bits in (8, 4):
        q = PiMoE(64, layer.config).eval()
        q.load_state_dict(layer.state_dict())
        quantize_experts(q, bits, group_size=32)
        assert isinstance(q.experts, QuantizedStackedExperts)
        sizes[bits] = q.experts.quantized_nbytes()
        buffer = io.BytesIO()
        torch.save(q.state_dict(), buffer)
        buffer.seek(0)
        fresh = PiMoE(64, layer.config).eval()
        quantize_experts(fresh, bits, group_size=32)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        x = torch.randn(9, 64)
        with torch.no_grad():
            assert torch.equal(fresh(x), q(x))
    assert (
        sizes[8] < 0.27 * float_bytes and sizes[4] < 0.19 * float_bytes
    )  # group 32: fp32 scale + zero per 32


def test_bad_quantization_settings_raise() -> None:
    layer = PiMoE(24, num_experts=2, top_k=1, ffn_dim=24)
    with pytest.raises(ValueError, match="bits"):
        quantize_experts(layer, 3)
    with pytest.raises(ValueError, match="group size"):
        quantize_experts(layer, 4)  # 24 columns: no group of 32..256 divides them


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("mixtral", {"intermediate_size": 64}), ("qwen3_moe", {"moe_intermediate_size": 32})],
)
@pytest.mark.parametrize(("bits", "floor"), [(8, 0.9999), (4, 0.99)])
def test_tiny_hf_models_with_quantized_experts_stay_close_to_eager(
    family: str, overrides: dict, bits: int, floor: float
) -> None:
    pytest.importorskip("transformers")
    from pimoe.hf import build_tiny
    from pimoe.hf.quantized import QuantizedHFExperts, quantize_hf_experts

    model = build_tiny(family, **overrides)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    names = quantize_hf_experts(model, bits, group_size=32)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(isinstance(model.get_submodule(n), QuantizedHFExperts) for n in names)
    with torch.no_grad():
        quantized = model(input_ids=ids).logits
    cosine = F.cosine_similarity(quantized.flatten(), eager.flatten(), dim=0).item()
    assert floor < cosine < 1.0


def test_quantized_experts_bench_reports_size_fidelity_and_speed_per_variant() -> None:
    pytest.importorskip("transformers")
    from pimoe.bench.quantized_experts import QuantizedExpertsBenchConfig, _tiny

    result = _tiny(
        QuantizedExpertsBenchConfig(tiny_tokens=(1, 8), rounds=1, smollm2=False, threads=1)
    )
    for rows in result.values():
        assert rows["float"]["logit_cosine"] == pytest.approx(1.0)
        assert 0.98 < rows["int4"]["logit_cosine"] < rows["int8"]["logit_cosine"] <= 1.0
        assert (
            rows["int4"]["expert_bytes"]
            < rows["int8"]["expert_bytes"]
            < rows["float"]["expert_bytes"]
        )
        assert all(r["tokens_per_s"] > 0 for r in rows.values())
