import math

import pytest
import torch

from pimoe.moe import Router, load_balancing_loss, router_z_loss


def test_softmax_topk_weights_renormalized_and_match_manual() -> None:
    router = Router(16, num_experts=6, top_k=2)
    x = torch.randn(40, 16)
    out = router(x)
    probs = (x @ router.gate.weight.t()).softmax(-1)
    top, idx = probs.topk(2, dim=-1)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(40))
    assert out.mask is None


def test_unnormalized_weights_are_raw_probabilities() -> None:
    router = Router(8, num_experts=4, top_k=2, normalize=False)
    x = torch.randn(10, 8)
    out = router(x)
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))
    assert (out.weights.sum(-1) < 1).all()


def test_sigmoid_scores_are_independent_per_expert() -> None:
    router = Router(8, num_experts=4, top_k=1, score="sigmoid", normalize=False)
    x = torch.randn(10, 8)
    out = router(x)
    scores = torch.sigmoid(out.logits)
    torch.testing.assert_close(out.weights[:, 0], scores.max(-1).values)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(10))


def test_noise_only_in_training() -> None:
    router = Router(8, num_experts=4, top_k=2, noise_std=1.0)
    x = torch.randn(64, 8)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_capacity_drops_lowest_priority_assignments() -> None:
    router = Router(4, num_experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.zeros(6, 4)
    x[:, 0] = 1.0  # every token prefers expert 0
    out = router(x)
    capacity = router.capacity(6)
    assert capacity == 3
    assert out.mask is not None
    # first three tokens (position order) keep their slot, the rest are dropped with weight 0
    assert out.mask[:, 0].tolist() == [True, True, True, False, False, False]
    assert (out.weights[~out.mask] == 0).all()


def test_capacity_first_choices_have_priority_over_second() -> None:
    router = Router(
        4, num_experts=2, top_k=2, capacity_factor=0.5
    )  # capacity = ceil(0.5*4*2/2) = 2
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 2.0, 0, 0]])
    out = router(x)
    assert out.mask is not None
    assert out.mask[:, 0].all()  # all first choices fit (two per expert)
    assert not out.mask[:, 1].any()  # no room left for second choices


def test_expert_choice_is_balanced() -> None:
    router = Router(8, num_experts=4, top_k=1, routing="expert_choice")
    out = router(torch.randn(32, 8))
    assert out.mask is not None
    assert out.mask.sum(0).tolist() == [8, 8, 8, 8]  # capacity = 32 * 1 / 4
    assert torch.equal(out.weights == 0, ~out.mask)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_experts=0, top_k=1),
        dict(num_experts=2, top_k=3),
        dict(num_experts=2, top_k=0),
        dict(num_experts=2, top_k=1, score="relu"),
        dict(num_experts=2, top_k=1, capacity_factor=0.0),
        dict(num_experts=2, top_k=1, routing="random"),
        dict(num_experts=2, top_k=1, noise_std=-1.0),
    ],
)
def test_bad_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Router(4, **kwargs)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed() -> None:
    e, t = 4, 8
    probs = torch.full((t, e), 1 / e)
    uniform_idx = torch.arange(t).remainder(e).unsqueeze(1)
    assert math.isclose(load_balancing_loss(probs, uniform_idx, e).item(), 1.0, rel_tol=1e-6)
    collapsed = torch.zeros(t, e)
    collapsed[:, 0] = 1.0
    assert math.isclose(
        load_balancing_loss(collapsed, torch.zeros(t, 1, dtype=torch.long), e).item(), e
    )


def test_load_balancing_loss_matches_transformers_times_k() -> None:
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(50, 8)
    idx = logits.softmax(-1).topk(2, dim=-1).indices
    ours = load_balancing_loss(logits.softmax(-1), idx, 8)
    theirs = hf.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(ours * 2, theirs)


def test_aux_loss_has_gradient_to_router() -> None:
    router = Router(8, num_experts=4, top_k=2)
    out = router(torch.randn(16, 8))
    (out.aux_loss + out.z_loss).backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_z_loss_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)
