"""Property-based tests of the router and the layer it drives (hypothesis, small shapes).

Capacity priority is GShard's: rank-major (every token's first choice before any second choice),
then token order within a rank.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pimoe.moe import FFN, PiMoE, Router

D = 8
PROPERTY = settings(max_examples=50, deadline=None)


@st.composite
def routing_cases(draw: st.DrawFn) -> tuple[int, int, int, float, int]:
    """(tokens T, experts E, top_k, capacity_factor, seed)."""
    num_experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(1, 24))
    factor = draw(st.floats(0.1, 2.0))
    seed = draw(st.integers(0, 2**16))
    return tokens, num_experts, top_k, factor, seed


def routed(tokens: int, num_experts: int, top_k: int, factor: float | None, seed: int):
    torch.manual_seed(seed)
    router = Router(D, num_experts=num_experts, top_k=top_k, capacity_factor=factor)
    x = torch.randn(tokens, D) + torch.randn(D)  # a shared offset makes some experts popular
    return router, router(x)


def priority_order(top_k: int, tokens: int) -> list[tuple[int, int]]:
    """``(token, rank)`` assignments from highest to lowest capacity priority."""
    return [(t, j) for j in range(top_k) for t in range(tokens)]


@PROPERTY
@given(routing_cases())
def test_kept_assignments_never_exceed_capacity(case) -> None:
    tokens, num_experts, top_k, factor, seed = case
    router, out = routed(tokens, num_experts, top_k, factor, seed)
    assert out.mask is not None and out.mask.shape == (tokens, top_k)
    kept = torch.bincount(out.indices[out.mask], minlength=num_experts)
    assert kept.max().item() <= router.capacity(tokens)
    assert (out.weights[~out.mask] == 0).all()  # a dropped assignment contributes nothing


@PROPERTY
@given(routing_cases())
def test_dropped_assignment_means_expert_full_of_higher_priority(case) -> None:
    tokens, num_experts, top_k, factor, seed = case
    router, out = routed(tokens, num_experts, top_k, factor, seed)
    assert out.mask is not None
    capacity = router.capacity(tokens)
    taken = [0] * num_experts  # kept assignments of higher priority, per expert, so far
    for t, j in priority_order(top_k, tokens):
        e = int(out.indices[t, j])
        if out.mask[t, j]:
            assert taken[e] < capacity, f"token {t} rank {j} kept in full expert {e}"
            taken[e] += 1
        else:
            assert taken[e] == capacity, (
                f"token {t} rank {j} dropped from expert {e} holding {taken[e]} < {capacity} "
                "higher-priority assignments"
            )


@PROPERTY
@given(
    st.integers(1, 16),
    st.integers(1, 5),
    st.data(),
    st.sampled_from(["swiglu", "gelu"]),
    st.sampled_from(["softmax", "sigmoid"]),
    st.integers(0, 2**16),
)
def test_permuting_tokens_permutes_outputs_when_dropless(
    tokens: int, num_experts: int, data: st.DataObject, activation: str, score: str, seed: int
) -> None:
    top_k = data.draw(st.integers(1, num_experts))
    perm = torch.tensor(data.draw(st.permutations(range(tokens))), dtype=torch.long)
    torch.manual_seed(seed)
    layer = PiMoE(
        D,
        num_experts=num_experts,
        top_k=top_k,
        ffn_dim=12,
        activation=activation,
        score=score,
        bias=activation != "swiglu",
    ).double()
    x = torch.randn(tokens, D, dtype=torch.float64)
    with torch.no_grad():
        route, route_p = layer.router(x), layer.router(x[perm])
        out, out_p = layer(x), layer(x[perm])
    assert torch.equal(route_p.indices, route.indices[perm])
    torch.testing.assert_close(route_p.weights, route.weights[perm])
    torch.testing.assert_close(out_p, out[perm])


@PROPERTY
@given(st.integers(1, 12), st.integers(1, 5), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_top_k_equal_to_num_experts_is_the_dense_mixture(
    tokens: int, num_experts: int, builtin: bool, normalize: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    if builtin:
        layer = PiMoE(
            D, num_experts=num_experts, top_k=num_experts, ffn_dim=12, normalize=normalize
        )
        experts = [layer.experts.expert(e) for e in range(num_experts)]
    else:
        experts = [FFN(D, 4 + 2 * e, "relu") for e in range(num_experts)]
        layer = PiMoE(D, top_k=num_experts, experts=experts, normalize=normalize)
    layer.double()
    experts = [expert.double() for expert in experts]
    x = torch.randn(tokens, D, dtype=torch.float64)
    with torch.no_grad():
        probs = (x @ layer.router.gate.weight.t()).softmax(dim=-1)  # [T, E]
        dense = sum(probs[:, e : e + 1] * expert(x) for e, expert in enumerate(experts))
        torch.testing.assert_close(layer(x), dense)
