import pytest
import torch
from torch import nn

from pimoe.fusion import (
    METHODS,
    CrossAttentionFusion,
    FiLMFusion,
    FusionClassifier,
    FusionConfig,
    GatedFusion,
    ModalityMoEFusion,
    build_fusion,
    digit_halves,
)

DIMS = {"top": 8, "bottom": 8}


def _inputs(batch: int = 5) -> dict[str, torch.Tensor]:
    return {"top": torch.randn(batch, 4, 8), "bottom": torch.randn(batch, 8)}


def _trained_like(layer: nn.Module) -> nn.Module:
    """FiLM's modulation starts at zero, so its condition gets gradients only once it is non-zero."""
    if isinstance(layer, FiLMFusion):
        nn.init.normal_(layer.film.weight, std=0.1)
    return layer


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fuses_to_d_model_and_trains_every_projection(method):
    layer = _trained_like(build_fusion(FusionConfig(DIMS, method, d_model=16)))
    out = layer(_inputs())
    assert out.shape == (5, 16)
    out.sum().backward()
    for m in DIMS:
        assert layer.proj[m][0].weight.grad.abs().sum() > 0, m


@pytest.mark.parametrize("method", METHODS)
def test_examples_are_fused_independently(method):
    layer = build_fusion(FusionConfig(DIMS, method, d_model=16)).eval()
    x = _inputs(6)
    full = layer(x)
    alone = torch.cat([layer({m: v[i : i + 1] for m, v in x.items()}) for i in range(6)])
    torch.testing.assert_close(full, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_output_depends_on_every_modality(method):
    layer = build_fusion(FusionConfig(DIMS, method, d_model=16)).eval()
    x = _inputs()
    with torch.no_grad():
        for p in layer.parameters():  # FiLM starts as the identity modulation; perturb it
            p.add_(0.05 * torch.randn_like(p))
        base = layer(x)
        for m in DIMS:
            changed = dict(x)
            changed[m] = x[m] + 1.0
            assert not torch.allclose(layer(changed), base), m


def test_gated_fusion_weights_are_a_distribution_over_modalities():
    layer = GatedFusion(DIMS, 16)
    layer(_inputs())
    assert layer.last_gates.shape == (5, 2, 16)
    torch.testing.assert_close(layer.last_gates.sum(1), torch.ones(5, 16))


def test_film_starts_as_identity_modulation_of_the_first_modality():
    layer = FiLMFusion(DIMS, 16)
    x = _inputs()
    tokens = layer.tokens(x)
    torch.testing.assert_close(layer(x), torch.relu(tokens["top"]).mean(1))


def test_cross_attention_to_a_single_token_is_its_value_projection():
    layer = CrossAttentionFusion({"a": 3, "b": 3}, 8, heads=2)
    x = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    tokens = layer.tokens(x)
    attn = layer.attn["a"]
    v = nn.functional.linear(tokens["b"], attn.in_proj_weight[16:], attn.in_proj_bias[16:])
    expected = attn.out_proj(v)
    got, _ = attn(tokens["a"], tokens["b"], tokens["b"])
    torch.testing.assert_close(got, expected)


def test_modality_moe_shares_experts_across_modalities_and_has_its_own():
    layer = ModalityMoEFusion(DIMS, 16, shared_experts=2, experts_per_modality=1, top_k=2)
    top, bottom = (
        layer.moe.layers["top"].experts.experts,
        layer.moe.layers["bottom"].experts.experts,
    )
    assert top[0] is bottom[0] and top[1] is bottom[1] and top[2] is not bottom[2]
    out = layer(_inputs())
    (out.sum() + layer.aux_loss).backward()
    assert layer.moe.layers["top"].router.gate.weight.grad is not None
    fractions = layer.moe.shared_fraction()
    assert set(fractions) == set(DIMS) and all(0 <= f <= 1 for f in fractions.values())
    n_params = sum(p.numel() for p in layer.moe.parameters())
    expert = sum(p.numel() for p in top[0].parameters())
    gates = sum(p.numel() for m in DIMS for p in layer.moe.layers[m].router.parameters())
    assert n_params == 4 * expert + gates  # 2 shared + 1 per modality, shared ones counted once


def test_bad_inputs_raise_clear_errors():
    layer = build_fusion(FusionConfig(DIMS, "concat", d_model=16))
    with pytest.raises(ValueError, match="'top' must be"):
        layer({"top": torch.randn(5, 4, 7), "bottom": torch.randn(5, 8)})
    with pytest.raises(ValueError, match="batch size"):
        layer({"top": torch.randn(5, 8), "bottom": torch.randn(4, 8)})
    with pytest.raises(ValueError, match="unknown modalities"):
        layer({**_inputs(), "audio": torch.randn(5, 8)})
    with pytest.raises(TypeError):
        layer({"top": torch.ones(5, 8, dtype=torch.long), "bottom": torch.randn(5, 8)})
    with pytest.raises(TypeError):
        layer([torch.randn(5, 8)])
    with pytest.raises(ValueError, match="max_tokens"):
        layer({"top": torch.randn(5, 65, 8), "bottom": torch.randn(5, 8)})
    with pytest.raises(ValueError, match="unknown fusion method"):
        build_fusion(FusionConfig(DIMS, "sum"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_fusion(FusionConfig({"top": 8}, "gated"))
    with pytest.raises(ValueError):
        build_fusion(FusionConfig({"top": 0, "bottom": 8}, "concat"))


@pytest.mark.parametrize("method", METHODS)
def test_missing_modality_raises_unless_allowed_then_uses_a_learned_token(method):
    strict = build_fusion(FusionConfig(DIMS, method, d_model=16))
    with pytest.raises(ValueError, match=r"missing modalities \['bottom'\]"):
        strict({"top": torch.randn(5, 4, 8)})
    with pytest.raises(ValueError, match="missing"):
        strict({"top": torch.randn(5, 4, 8), "bottom": None})
    lenient = _trained_like(
        build_fusion(FusionConfig(DIMS, method, d_model=16, allow_missing=True))
    )
    out = lenient({"top": torch.randn(5, 4, 8)})
    assert out.shape == (5, 16)
    out.sum().backward()
    assert lenient.missing["bottom"].grad.abs().sum() > 0
    assert lenient.missing["top"].grad is None
    with pytest.raises(ValueError, match="no modality"):
        lenient({})


def test_fusion_beats_each_sensor_on_noisy_digit_halves():
    train_v, train_y, test_v, test_y = digit_halves(noise_std=0.1, seed=0)
    assert train_v["top"].shape[1:] == (4, 8) and len(train_y) + len(test_y) == 1797

    def fit(modalities: dict[str, int]) -> float:
        torch.manual_seed(0)
        model = FusionClassifier(build_fusion(FusionConfig(modalities, "concat", d_model=32)), 10)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(4):
            for idx in torch.randperm(len(train_y)).split(64):
                loss = nn.functional.cross_entropy(
                    model({m: train_v[m][idx] for m in modalities}), train_y[idx]
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return float(
                (model({m: test_v[m] for m in modalities}).argmax(-1) == test_y).float().mean()
            )

    top, bottom, both = fit({"top": 8}), fit({"bottom": 8}), fit(DIMS)
    assert both > max(top, bottom) + 0.05, (top, bottom, both)
