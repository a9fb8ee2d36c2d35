import pytest
import torch

from pimoe.compress.moe import (
    drop_experts,
    experts_to_keep,
    merge_experts,
    merge_similar_experts,
    similar_expert_groups,
)
from pimoe.moe import FFN, PiMoE, RoutingStats

D, E = 16, 6


def _layer(**kwargs: object) -> PiMoE:
    return PiMoE(D, num_experts=E, top_k=kwargs.pop("top_k", 2), ffn_dim=24, **kwargs).eval()


def _kill(layer: PiMoE, dead: list[int]) -> None:
    """Make experts unreachable: a biased gate whose rows for them are 0 with bias -1e4."""
    gate = torch.nn.Linear(D, E, bias=True)
    with torch.no_grad():
        gate.weight.copy_(layer.router.gate.weight)
        gate.weight[dead] = 0.0
        gate.bias.zero_()
        gate.bias[dead] = -1e4
    layer.router.gate = gate


def _stats(layer: PiMoE, x: torch.Tensor) -> RoutingStats:
    with torch.no_grad():
        layer(x)
    assert layer.last_stats is not None
    return layer.last_stats


@pytest.mark.parametrize("shared", [0, 1])
def test_dropping_dead_experts_is_exact(shared: int) -> None:
    layer = _layer(shared_experts=shared, bias=True)
    _kill(layer, [1, 4])
    x = torch.randn(3, 10, D)
    stats = _stats(layer, x)
    assert stats.dead_experts == [1, 4]
    with torch.no_grad():
        before = layer(x)
        small = drop_experts(layer, amount=2 / 6, stats=stats)
        after = small(x)
    assert (
        small.num_experts == 4
        and small.router.num_experts == 4
        and small.experts.w_in.shape[0] == 4
    )
    assert small.router.gate.weight.shape == (4, D)
    # Same routing decisions exactly; outputs equal up to the rounding of a smaller gate matmul.
    tokens = x.reshape(-1, D)
    with torch.no_grad():
        old_route, new_route = layer.router(tokens), small.router(tokens)
    kept = torch.tensor([0, 2, 3, 5])
    assert torch.equal(kept[new_route.indices], old_route.indices)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert layer.num_experts == E  # the input layer is untouched
    # dropping by index gives the same layer
    by_index = drop_experts(layer, [0, 2, 3, 5])
    with torch.no_grad():
        torch.testing.assert_close(by_index(x), after, atol=0, rtol=0)


def test_drop_clips_top_k_and_handles_expert_list() -> None:
    layer = PiMoE(D, experts=[FFN(D, 8) for _ in range(4)], top_k=3).eval()
    small = drop_experts(layer, [0, 3])
    assert small.top_k == 2 and small.router.top_k == 2 and len(small.experts) == 2
    assert small(torch.randn(5, D)).shape == (5, D)


def test_keep_by_load_and_weight_norm() -> None:
    layer = _layer()
    stats = _stats(layer, torch.randn(64, D))
    loads = stats.tokens_per_expert.tolist()
    kept = experts_to_keep(layer, 0.5, stats=stats)
    assert len(kept) == 3 and min(loads[e] for e in kept) >= max(
        loads[e] for e in range(E) if e not in kept
    )
    with torch.no_grad():
        layer.experts.w_in[2] *= 10
        layer.experts.w_out[2] *= 10
    assert experts_to_keep(layer, 5 / 6, by="weight_norm") == [2]


def test_capacity_is_preserved_when_dropping() -> None:
    layer = _layer(capacity_factor=1.0)
    small = drop_experts(layer, [0, 1, 2])
    assert small.router.capacity(60) == layer.router.capacity(60)


def test_merging_identical_experts_is_exact_with_dense_routing() -> None:
    layer = _layer(top_k=E, bias=True)
    with torch.no_grad():
        for name in ("w_in", "w_out", "b_in", "b_out"):
            getattr(layer.experts, name)[3] = getattr(layer.experts, name)[1]
        layer.router.gate.weight[3] = layer.router.gate.weight[1]
    x = torch.randn(4, 9, D)
    with torch.no_grad():
        before = layer(x)
        merged = merge_experts(layer, [[1, 3]])
        after = merged(x)
    assert merged.num_experts == E - 1 and merged.top_k == E - 1
    assert merged.router.gate.bias is not None
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # plain averaging of router rows gives the merged expert only one share: outputs change
    with torch.no_grad():
        mean = merge_experts(layer, [[1, 3]], router_merge="mean")(x)
    assert not torch.allclose(mean, before, atol=1e-4)


def test_merge_weights_by_load() -> None:
    layer = _layer()
    stats = _stats(layer, torch.randn(50, D))
    stats.tokens_per_expert = torch.tensor([30, 10, 0, 0, 0, 0])
    merged = merge_experts(layer, [[0, 1]], stats=stats)
    expected = 0.75 * layer.experts.w_in[0] + 0.25 * layer.experts.w_in[1]
    torch.testing.assert_close(merged.experts.w_in[0], expected)
    torch.testing.assert_close(merged.experts.w_in[1:], layer.experts.w_in[2:])
    torch.testing.assert_close(merged.router.gate.bias[0], torch.log(torch.tensor(2.0)))


def test_similar_groups_find_the_duplicate() -> None:
    layer = _layer()
    with torch.no_grad():
        layer.router.gate.weight[4] = layer.router.gate.weight[0] * 1.01
    assert similar_expert_groups(layer, E - 1) == [[0, 4]]
    groups = similar_expert_groups(layer, 2, by="weights")
    assert sorted(e for g in groups for e in g) == sorted(set(e for g in groups for e in g))
    merged = merge_similar_experts(layer, 3)
    assert merged.num_experts == 3 and merged(torch.randn(5, D)).shape == (5, D)


def test_bad_options() -> None:
    layer = _layer()
    with pytest.raises(ValueError):
        drop_experts(layer)
    with pytest.raises(ValueError):
        drop_experts(layer, [0, 0])
    with pytest.raises(ValueError):
        drop_experts(layer, [9])
    with pytest.raises(ValueError):
        drop_experts(layer, [])
    with pytest.raises(ValueError):
        drop_experts(layer, amount=0.5)  # by="load" needs stats
    with pytest.raises(ValueError):
        drop_experts(layer, amount=1.0, by="weight_norm")
    with pytest.raises(ValueError):
        merge_experts(layer, [[0, 1], [1, 2]])
    with pytest.raises(ValueError):
        merge_experts(_layer(score="sigmoid"), [[0, 1]], router_merge="logsumexp")
    with pytest.raises(ValueError):
        merge_similar_experts(layer, 0)
    with pytest.raises(ValueError):
        drop_experts(_layer(routing="expert_choice"), [0, 1])
    with pytest.raises(TypeError):
        merge_experts(PiMoE(D, experts=[FFN(D, 8) for _ in range(3)]), [[0, 1]])
