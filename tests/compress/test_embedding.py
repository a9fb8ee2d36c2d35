"""Int4Embedding, quantize_embeddings and 8-bit-activation dynamic int8."""

import io

import pytest
import torch
from torch import nn

from pimoe.compress.embedding import Int4Embedding, quantize_embeddings
from pimoe.compress.quantize import FullRangeDynamicLinear, quantize_dynamic_int8


def test_int4_embedding_error_bound_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 32)
    q = Int4Embedding.from_embedding(emb, group_size=16)
    ids = torch.arange(50).reshape(5, 10)
    out, ref = q(ids), emb(ids)
    assert out.shape == (5, 10, 32) and out.dtype == torch.float32
    # round to nearest: |error| <= scale / 2 per value, scale = max|group| / 7 (plus fp16 scale rounding)
    group_max = emb.weight.detach().reshape(50, 2, 16).abs().amax(-1).repeat_interleave(16, -1)[ids]
    assert bool(((out - ref).abs() <= group_max / 14 * 1.01 + 1e-6).all())
    assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.shape == (50, 16)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = Int4Embedding(50, 32, group_size=16)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(ids), out)
    with pytest.raises(ValueError, match="group_size"):
        Int4Embedding(50, 30, group_size=16)


def test_quantize_embeddings_skips_tied_and_checks_bits() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(40, 16)
            self.pos_embeddings = nn.Embedding(8, 16)
            self.head = nn.Linear(16, 40, bias=False)
            self.head.weight = self.word_embeddings.weight

    model = TiedLM()
    replaced, skipped = quantize_embeddings(model, 4)
    assert replaced == [] and "tied" in skipped[0]
    model.head = nn.Linear(16, 40, bias=False)  # untie
    replaced, skipped = quantize_embeddings(model, 8)
    assert replaced == ["word_embeddings"] and skipped == []
    assert type(model.pos_embeddings) is nn.Embedding  # not matched by the default pattern
    with pytest.raises(ValueError, match="4 or 8"):
        quantize_embeddings(model, 2)


def test_full_range_activations_lower_the_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(32, 64)
    with torch.inference_mode():
        ref = model(x)
        errors = {}
        for full in (False, True):
            q = quantize_dynamic_int8(model, full_range=full)
            assert (type(q[0]) is FullRangeDynamicLinear) == full
            errors[full] = float((q(x) - ref).norm() / ref.norm())
    assert errors[True] < 0.8 * errors[False]
    assert int(q[0].weight().int_repr().abs().max()) <= 64  # 7-bit weights: no int16 saturation


@pytest.mark.parametrize(("activation", "bias"), [("swiglu", False), ("gelu", True)])
def test_int8_stacked_experts_match_and_round_trip(activation: str, bias: bool) -> None:
    from pimoe.compress.quantize_experts import Int8StackedExperts, quantize_experts_int8
    from pimoe.moe import PiMoE

    torch.manual_seed(0)
    model = nn.Sequential(
        PiMoE(32, num_experts=4, top_k=2, ffn_dim=64, activation=activation, bias=bias)
    ).eval()
    x = torch.randn(10, 32)
    quantized = nn.Sequential(
        PiMoE(32, num_experts=4, top_k=2, ffn_dim=64, activation=activation, bias=bias)
    ).eval()
    quantized.load_state_dict(model.state_dict())
    assert quantize_experts_int8(quantized) == ["0.experts"]
    assert (
        isinstance(quantized[0].experts, Int8StackedExperts)
        and quantized[0].experts.w_in_int8.dtype == torch.int8
    )
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    assert float((out - ref).norm() / ref.norm()) < 0.02  # int8 rows: ~0.5% weight error
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Sequential(
        PiMoE(32, num_experts=4, top_k=2, ffn_dim=64, activation=activation, bias=bias)
    ).eval()
    quantize_experts_int8(fresh)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
