import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pimoe import PiMoE, RoutingStats
from pimoe.moe import EXPERT_PRESETS, FFN, StackedExperts, SwiGLU, make_expert


def stacked_expert(bank: StackedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    b_in = bank.b_in[e] if bank.b_in is not None else None
    b_out = bank.b_out[e] if bank.b_out is not None else None
    return F.linear(bank.act(F.linear(x, bank.w_in[e], b_in)), bank.w_out[e], b_out)


def naive_moe(layer: PiMoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference: the definition of the layer, with no vectorization."""
    tokens = x.reshape(-1, layer.d_model)
    route = layer.router(tokens)
    bank = layer.experts
    if isinstance(bank, StackedExperts):
        experts = [functools.partial(stacked_expert, bank, e) for e in range(layer.num_experts)]
    else:
        experts = list(bank.experts)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(route.indices.shape[1]):
            if route.mask is None or route.mask[t, j]:
                out[t] += (
                    route.weights[t, j] * experts[int(route.indices[t, j])](tokens[t : t + 1])[0]
                )
    if layer.shared is not None:
        shared = layer.shared(tokens)
        if layer.shared_gate is not None:
            shared = torch.sigmoid(layer.shared_gate(tokens)) * shared
        out = out + shared
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(activation="gelu", bias=True),
        dict(score="sigmoid", normalize=False),
        dict(capacity_factor=0.5),
        dict(routing="expert_choice"),
        dict(shared_experts=2, shared_ffn_dim=8, shared_gate=True),
        dict(top_k=1, activation="relu"),
    ],
)
def test_vectorized_layer_matches_token_loop(kwargs: dict) -> None:
    kwargs = {"top_k": 2, **kwargs}
    layer = PiMoE(16, num_experts=4, ffn_dim=32, **kwargs)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_any_module_experts_and_presets() -> None:
    experts = [make_expert(name, 16) for name in sorted(EXPERT_PRESETS)] + [
        nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    ]
    layer = PiMoE(16, experts=experts, top_k=2)
    assert layer.num_experts == 5
    x = torch.randn(20, 16)
    torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_presets_are_the_documented_architectures() -> None:
    assert (
        isinstance(make_expert("language", 64), FFN)
        and make_expert("language", 64).up.out_features == 256
    )
    reasoning = make_expert("reasoning", 48)
    assert isinstance(reasoning, SwiGLU) and reasoning.down.in_features == 128  # 8/3 * 48
    with pytest.raises(ValueError, match="unknown expert preset"):
        make_expert("quantum", 16)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_stacked_expert_export_matches_stacked_weights(activation: str) -> None:
    bank = StackedExperts(3, 8, 16, activation, bias=True)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(bank.expert(1)(x), stacked_expert(bank, 1, x))


def test_num_experts_mismatch_with_list() -> None:
    with pytest.raises(ValueError, match="experts were given"):
        PiMoE(8, num_experts=3, experts=[nn.Linear(8, 8), nn.Linear(8, 8)])


def test_gradients_reach_router_and_experts() -> None:
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=32, shared_experts=1, shared_gate=True)
    x = torch.randn(2, 9, 16, requires_grad=True)
    (layer(x).square().mean() + 0.01 * layer.aux_loss + 0.001 * layer.z_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gradients_match_token_loop() -> None:
    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=16, bias=True, activation="gelu")
    x = torch.randn(12, 8)
    layer(x).sum().backward()
    fast = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ref = PiMoE(8, num_experts=4, top_k=2, ffn_dim=16, bias=True, activation="gelu")
    ref.load_state_dict(layer.state_dict())
    naive_moe(ref, x).sum().backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradcheck_double() -> None:
    layer = PiMoE(
        4, num_experts=3, top_k=2, ffn_dim=6, bias=True, shared_experts=1, shared_gate=True
    ).double()
    x = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype: torch.dtype) -> None:
    layer = PiMoE(32, num_experts=4, top_k=2, ffn_dim=64)
    x = torch.randn(64, 32)
    ref = layer(x)
    low = layer.to(dtype)(x.to(dtype))
    assert low.dtype == dtype
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_autocast_bf16_on_cpu() -> None:
    layer = PiMoE(32, num_experts=4, top_k=2, ffn_dim=64)
    x = torch.randn(2, 16, 32)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32  # experts compute in bf16, combine accumulates in x's dtype
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05  # nonzero: bf16 compute really happened


def test_grouped_mm_backend_forward_matches_loop() -> None:
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=32, backend="loop")
    other = PiMoE(16, num_experts=4, top_k=2, ffn_dim=32, backend="grouped_mm")
    other.load_state_dict(layer.state_dict())
    x = torch.randn(30, 16)
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager() -> None:
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=32)
    x = torch.randn(2, 8, 16)
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
    x2 = torch.randn(2, 8, 16, requires_grad=True)
    compiled(x2).sum().backward()
    assert x2.grad is not None and layer.experts.w_in.grad is not None


def test_stats_count_every_assignment_and_aggregate() -> None:
    layer = PiMoE(16, num_experts=4, top_k=2, ffn_dim=32)
    layer(torch.randn(10, 16))
    first = layer.last_stats
    assert isinstance(first, RoutingStats)
    assert first.tokens_per_expert.sum().item() == 20 and first.num_tokens == 10
    assert 0 < first.entropy <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert 0.25 <= first.confidence <= 1.0
    layer(torch.randn(6, 16))
    total = first + layer.last_stats
    assert total.num_tokens == 16 and total.tokens_per_expert.sum().item() == 32
    assert abs(sum(total.load) - 1.0) < 1e-6


def test_stats_report_dead_experts_and_drops() -> None:
    layer = PiMoE(4, num_experts=3, top_k=1, ffn_dim=8, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.zeros(9, 4)
    x[:, 0] = 1.0
    out = layer(x)
    stats = layer.last_stats
    assert stats.dead_experts == [1, 2]
    assert int(stats.dropped_tokens) == 6 and int(stats.dropped_assignments) == 6  # capacity 3
    assert (out[3:] == 0).all()  # dropped tokens get no routed output
    assert stats.imbalance == pytest.approx(3.0)


def test_empty_batch_returns_empty() -> None:
    layer = PiMoE(8, num_experts=2, top_k=1, ffn_dim=16)
    out = layer(torch.randn(0, 5, 8))
    assert out.shape == (0, 5, 8)
    assert layer.aux_loss.item() == 0.0


def test_bad_inputs_raise_clear_errors() -> None:
    layer = PiMoE(8, num_experts=2, top_k=1, ffn_dim=16, check_finite=True)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="does not match"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(bad)
    with pytest.raises(ValueError):
        PiMoE(8, num_experts=2, top_k=3)
    with pytest.raises(ValueError):
        PiMoE(8, num_experts=0, top_k=1)
    with pytest.raises(ValueError, match="activation"):
        PiMoE(8, num_experts=2, top_k=1, activation="tanh")


def test_expert_without_tokens_gets_zero_gradient() -> None:
    layer = PiMoE(4, num_experts=3, top_k=1, ffn_dim=8, bias=True)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.zeros(6, 4)
    x[:, 0] = 1.0
    layer(x).sum().backward()
    for p in (layer.experts.w_in, layer.experts.w_out, layer.experts.b_in, layer.experts.b_out):
        assert torch.isfinite(p.grad).all()
        assert (p.grad[1:] == 0).all() and p.grad[0].abs().sum() > 0


def test_deepcopy_and_pickle_after_a_training_forward() -> None:
    import copy
    import pickle

    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=16)
    x = torch.randn(5, 8)
    out = layer(x)
    twin = copy.deepcopy(layer)
    assert twin.last_stats is None and twin.aux_loss.item() == 0.0
    torch.testing.assert_close(twin(x), out)
    again = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(again(x), out)
    assert layer.last_stats is not None  # the original keeps its stats


@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
@pytest.mark.parametrize(
    "options",
    [{}, {"bias": True}, {"capacity_factor": 0.5}],
    ids=["plain", "bias", "capacity"],
)
def test_create_graph_gradients_are_the_plain_ones(threads: int, options: dict) -> None:
    """With ``create_graph`` (MAML's second order) every custom backward of the layer (gather,
    combine, the grouped and threaded experts) switches to differentiable ops; their gradients
    must be the plain backward's (gradgradcheck alone checks them only against themselves)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        layer = PiMoE(16, num_experts=8, top_k=2, ffn_dim=32, **options)
        x = torch.randn(2, 24, 16, requires_grad=True)
        y = layer(x)
        v = torch.cos(y.detach())
        inputs = (x, *layer.parameters())
        plain = torch.autograd.grad(y, inputs, v, retain_graph=True, allow_unused=True)
        with_graph = torch.autograd.grad(y, inputs, v, create_graph=True, allow_unused=True)
    finally:
        torch.set_num_threads(before)
    for got, want in zip(with_graph, plain, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
