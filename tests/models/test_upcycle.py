"""Dense -> MoE upcycling on tiny random Llama models: equivalences, partitions, counts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pimoe.models.upcycle import (
    find_mlps,
    moe_layers,
    parameter_counts,
    set_top_k,
    split_groups,
    upcycle,
)
from pimoe.models.upcycle_cluster import (
    balanced_assign,
    capture_mlp_inputs,
    cluster_neurons,
)
from pimoe.moe import PiMoE

D, F_DIM, LAYERS, VOCAB = 32, 64, 2, 97


def tiny_llama(hidden_act: str = "silu", mlp_bias: bool = False, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=D,
        intermediate_size=F_DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_act=hidden_act,
        mlp_bias=mlp_bias,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def tokens(batch: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_copy_equals_dense_at_init_for_any_top_k() -> None:
    model, ids = tiny_llama(), tokens()
    dense = logits(model, ids)
    upcycle(model, num_experts=4, top_k=2, method="copy")
    layers = moe_layers(model)
    assert len(layers) == LAYERS and not find_mlps(model)
    assert layers[0].experts.w_in.shape == (4, 2 * F_DIM, D) and layers[0].experts.w_out.shape == (
        4,
        D,
        F_DIM,
    )
    torch.testing.assert_close(logits(model, ids), dense, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the equality comes from copying, not from a degenerate router
        layers[0].experts.w_out[1].mul_(2.0)
    assert (logits(model, ids) - dense).abs().max() > 1e-3


def test_split_with_all_experts_equals_dense() -> None:
    model, ids = tiny_llama(), tokens()
    dense = logits(model, ids)
    inputs = capture_mlp_inputs(model, ids)
    assert [x.shape for x in inputs] == [(ids.numel(), D)] * LAYERS
    upcycle(model, num_experts=4, top_k=4, method="split", mlp_inputs=inputs)
    layer = moe_layers(model)[0]
    assert layer.experts.w_in.shape == (4, 2 * F_DIM // 4, D) and layer.experts.w_out.shape == (
        4,
        D,
        F_DIM // 4,
    )
    torch.testing.assert_close(logits(model, ids), dense, atol=1e-5, rtol=1e-5)
    set_top_k(model, 2)
    assert (logits(model, ids) - dense).abs().max() > 1e-4


def test_split_partitions_every_neuron_once_in_balanced_experts() -> None:
    model = tiny_llama()
    inputs = capture_mlp_inputs(model, tokens())
    mlp = find_mlps(model)[0][1]
    labels = cluster_neurons(mlp, inputs[0], num_experts=8, seed=0)
    assert torch.bincount(labels, minlength=8).tolist() == [F_DIM // 8] * 8
    groups = split_groups(labels, 8)
    assert sorted(torch.cat(groups).tolist()) == list(range(F_DIM))
    upcycle(model, 8, 2, "split", assignments=[labels, labels])
    layer = moe_layers(model)[0]
    assert torch.equal(layer.neuron_assignment, labels)
    torch.testing.assert_close(layer.experts.w_out[3], mlp.down_proj.weight[:, groups[3]])
    torch.testing.assert_close(layer.experts.w_in[3, F_DIM // 8 :], mlp.up_proj.weight[groups[3]])


def test_clustering_groups_coactivated_neurons() -> None:
    """Neurons that fire on disjoint token sets are separated: the greedy balanced k-means puts
    each planted group in one cluster."""
    profiles = torch.zeros(16, 40)
    for g in range(4):
        profiles[g::4, g * 10 : (g + 1) * 10] = (
            torch.rand(4, 10) + 0.5
        )  # group g fires on tokens of block g
    labels = balanced_assign(profiles @ profiles[[0, 1, 2, 3]].T)
    for g in range(4):
        assert labels[g::4].unique().numel() == 1
    assert torch.bincount(labels).tolist() == [4, 4, 4, 4]


def test_parameter_counts() -> None:
    model = tiny_llama()
    dense_total = sum(p.numel() for p in model.parameters())
    mlp_params, router = 3 * D * F_DIM, 8 * D
    upcycle(model, 8, 2, "split", assignments=[torch.arange(F_DIM) % 8] * LAYERS)
    assert parameter_counts(model) == (
        dense_total + LAYERS * router,
        dense_total + LAYERS * (router - mlp_params * 6 // 8),
    )
    model = tiny_llama()
    upcycle(model, 4, 2, "copy")
    assert parameter_counts(model) == (
        dense_total + LAYERS * (3 * mlp_params + 4 * D),
        dense_total + LAYERS * (mlp_params + 4 * D),
    )


def test_bad_input_is_named() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="no gated MLP"):
        upcycle(nn.Sequential(nn.Linear(4, 4)), 4, 2)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(model, 4, 5)
    with pytest.raises(ValueError, match="method"):
        upcycle(model, 4, 2, method="clone")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_experts"):
        upcycle(model, 4.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs assignments or mlp_inputs"):
        upcycle(model, 4, 2, "split")
    with pytest.raises(ValueError, match="divide"):
        upcycle(model, 5, 2, "split", assignments=[torch.zeros(F_DIM, dtype=torch.long)] * LAYERS)
    with pytest.raises(ValueError, match="same number of neurons"):
        upcycle(model, 4, 2, "split", assignments=[torch.zeros(F_DIM, dtype=torch.long)] * LAYERS)
    with pytest.raises(ValueError, match="SiLU"):
        upcycle(tiny_llama(hidden_act="gelu"), 4, 2)
    with pytest.raises(ValueError, match="biases"):
        upcycle(tiny_llama(mlp_bias=True), 4, 2)
    with pytest.raises(ValueError, match="no PiMoE layer"):
        set_top_k(model, 2)
    assert find_mlps(model) and not any(isinstance(m, PiMoE) for m in model.modules())  # untouched
