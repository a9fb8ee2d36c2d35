"""LoRA on fused 3-D experts and on nn.Linear: identity at creation, training, merging, files."""

import json

import pytest
import torch
from torch import nn

from pimoe.moe import (
    LoRAConfig,
    PiMoE,
    add_lora,
    load_lora,
    lora_modules,
    merge_and_unload,
    merge_lora,
    save_lora,
    unmerge_lora,
)
from pimoe.moe.experts import StackedExperts
from pimoe.moe.lora import ExpertLoRA, LoRALinear, lora_adapters


class Block(nn.Module):
    """An attention-like projection followed by an MoE layer."""

    def __init__(self, ffn_dim: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.moe = PiMoE(16, num_experts=4, top_k=2, ffn_dim=ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(self.q_proj(x))


def block_with_lora(shared_a: bool = False, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    block = Block()
    add_lora(block, LoRAConfig(r=2, lora_alpha=4, shared_a=shared_a, target_modules=("q_proj",)))
    return block


def randomize_b(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.normal_(0.0, 0.1)


def test_zero_init_equals_base() -> None:
    torch.manual_seed(0)
    base = Block()
    x = torch.randn(3, 5, 16)
    expected = base(x)
    names = add_lora(base, LoRAConfig(r=2, target_modules=("q_proj",)))
    assert names == ["q_proj", "moe.experts.w_in", "moe.experts.w_out"]
    adapter = lora_adapters(base)["moe.experts.w_in"]
    weight = base.moe.experts.parametrizations.w_in.original
    assert torch.equal(adapter(weight), weight)  # W + 0, bit for bit
    with torch.no_grad():  # the adapted weights W + 0, without the dispatcher's padding
        torch.testing.assert_close(base(x), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(base(x), expected, rtol=0, atol=1e-7)  # the low-rank training path


def test_expert_update_is_per_expert_low_rank() -> None:
    weight = torch.randn(3, 6, 5)
    for transposed in (False, True):
        stored = weight.transpose(1, 2) if transposed else weight
        adapter = ExpertLoRA(stored, r=2, lora_alpha=6.0, transposed=transposed)
        nn.init.normal_(adapter.lora_B)
        out = adapter(stored)
        out = out.transpose(1, 2) if transposed else out
        for e in range(3):
            torch.testing.assert_close(
                out[e], weight[e] + 3.0 * adapter.lora_B[e] @ adapter.lora_A[e]
            )


def test_gradients_reach_only_the_adapters_and_training_lowers_the_loss() -> None:
    block = block_with_lora()
    x, target = torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    trainable = {n for n, p in block.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.Adam([p for p in block.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (block(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for name, param in block.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in block.named_parameters()
        if "lora_B" in n
    )
    assert losses[-1] < 0.9 * losses[0]


def test_shared_a_is_one_matrix_for_all_experts() -> None:
    block = block_with_lora(shared_a=True)
    adapter = lora_adapters(block)["moe.experts.w_in"]
    assert adapter.lora_A.shape == (1, 2, 16) and adapter.lora_B.shape == (4, 16, 2)
    assert lora_adapters(block)["moe.experts.w_out"].lora_A.shape == (1, 2, 8)


def test_merge_and_unmerge() -> None:
    block = block_with_lora()
    randomize_b(block)
    x = torch.randn(3, 5, 16)
    base_weights = {n: p.detach().clone() for n, p in block.named_parameters() if "lora_" not in n}
    adapted = block(x)
    merge_lora(block)
    merge_lora(block)  # a second merge does nothing
    torch.testing.assert_close(block(x), adapted, rtol=1e-6, atol=1e-6)
    changed = {
        n
        for n, p in block.named_parameters()
        if "lora_" not in n and not torch.equal(p, base_weights[n])
    }
    assert changed == {
        "q_proj.base.weight",
        "moe.experts.parametrizations.w_in.original",
        "moe.experts.parametrizations.w_out.original",
    }
    unmerge_lora(block)
    for name, param in block.named_parameters():
        if "lora_" not in name:  # back to within one rounding of each element
            torch.testing.assert_close(param, base_weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(block(x), adapted, rtol=1e-6, atol=1e-6)


def test_merge_and_unload_leaves_plain_modules() -> None:
    block = block_with_lora()
    randomize_b(block)
    x = torch.randn(3, 5, 16)
    adapted = block(x)
    merge_and_unload(block)
    assert type(block.q_proj) is nn.Linear and type(block.moe.experts).__name__ == "StackedExperts"
    assert not lora_adapters(block)
    assert set(block.state_dict()) == set(Block().state_dict())
    torch.testing.assert_close(block(x), adapted, rtol=1e-6, atol=1e-6)


def test_save_and_load_the_adapters_alone(tmp_path) -> None:
    block = block_with_lora(shared_a=True)
    randomize_b(block)
    x = torch.randn(3, 5, 16)
    save_lora(block, tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (
        info["r"] == 2
        and info["shared_a"] is True
        and info["targets"]["moe.experts.w_in.lora_A"] == [1, 2, 16]
    )
    fresh = Block()
    fresh.load_state_dict(
        {
            k.replace("parametrizations.", "").replace(".original", "").replace("base.", ""): v
            for k, v in block.state_dict().items()
            if "lora_" not in k
        }
    )
    config = load_lora(fresh, tmp_path / "adapter")
    assert config.shared_a and isinstance(fresh.q_proj, LoRALinear)
    torch.testing.assert_close(fresh(x), block(x))


def test_adapters_that_do_not_fit_are_refused(tmp_path) -> None:
    block = block_with_lora()
    save_lora(block, tmp_path / "adapter")
    other = Block(ffn_dim=12)  # other expert width
    x = torch.randn(5, 16)
    before = other(x)
    with pytest.raises(ValueError, match="shape"):
        load_lora(other, tmp_path / "adapter")
    assert not lora_adapters(other) and torch.equal(other(x), before)
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_lora(
            PiMoE(16, num_experts=4, top_k=2, ffn_dim=8), tmp_path / "adapter"
        )  # other module names
    with pytest.raises(ValueError, match="adapter_config"):
        load_lora(other, tmp_path / "missing")
    with pytest.raises(ValueError, match="no 3-D parameter"):
        add_lora(nn.Linear(4, 4), LoRAConfig())
    with pytest.raises(ValueError, match="already"):
        add_lora(block, LoRAConfig())
    with pytest.raises(ValueError, match="r must"):
        LoRAConfig(r=0)


def test_a_refused_load_leaves_the_model_trainable(tmp_path) -> None:
    save_lora(block_with_lora(), tmp_path / "adapter")
    other = Block(ffn_dim=12)
    with pytest.raises(ValueError):
        load_lora(other, tmp_path / "adapter")
    assert all(p.requires_grad for p in other.parameters())


def test_adapter_gradients_match_a_per_token_reference() -> None:
    torch.manual_seed(0)
    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=6)
    add_lora(layer, LoRAConfig(r=2, lora_alpha=2.0))
    randomize_b(layer)
    x = torch.randn(2, 5, 8)
    layer(x).square().sum().backward()
    adapters = lora_adapters(layer)
    got = {n: (a.lora_A.grad.clone(), a.lora_B.grad.clone()) for n, a in adapters.items()}
    for a in adapters.values():
        a.lora_A.grad = a.lora_B.grad = None
    w_in = layer.experts.parametrizations.w_in.original + adapters["experts.w_in"].delta()
    w_out = layer.experts.parametrizations.w_out.original + adapters["experts.w_out"].delta()
    tokens = x.reshape(-1, 8)
    route = layer.router(tokens)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(2):
            e = int(route.indices[t, j])
            gate, up = (w_in[e] @ tokens[t]).chunk(2)
            out[t] = out[t] + route.weights[t, j] * (
                w_out[e] @ (torch.nn.functional.silu(gate) * up)
            )
    out.square().sum().backward()
    for name, adapter in adapters.items():
        torch.testing.assert_close(got[name][0], adapter.lora_A.grad)
        torch.testing.assert_close(got[name][1], adapter.lora_B.grad)


@pytest.mark.parametrize("shared_a", [False, True])
@pytest.mark.parametrize(("bias", "r", "ffn"), [(True, 2, 6), (False, 4, 8)])
def test_low_rank_path_matches_the_adapted_weights(
    shared_a: bool, bias: bool, r: int, ffn: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    grouped = []  # projections run by grouped_mm (16-byte rows, no biases)
    projection = lora_modules._grouped_projection
    monkeypatch.setattr(
        lora_modules, "_grouped_projection", lambda *a: grouped.append(1) or projection(*a)
    )
    torch.manual_seed(0)
    experts = StackedExperts(4, 8, ffn, bias=bias)
    add_lora(experts, LoRAConfig(r=r, lora_alpha=3.0, shared_a=shared_a))
    assert experts.backend == "lora"
    randomize_b(experts)
    x = torch.randn(9, 8, requires_grad=True)
    counts = torch.tensor([3, 0, 2, 4])  # expert 1 gets no rows
    results = []
    for backend in ("lora", experts.lora_base_backend):  # low-rank path, then W + s*B@A
        experts.backend = backend
        out = experts(x, counts)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        adapters = lora_adapters(experts).values()
        results.append(
            [out.detach(), x.grad, *(p.grad for a in adapters for p in (a.lora_A, a.lora_B))]
        )
        x.grad = None
        experts.zero_grad()
    assert bool(grouped) == (not bias)  # both paths are covered
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)
    merge_and_unload(experts)
    assert experts.backend == "auto" and not hasattr(experts, "lora_base_backend")


def test_training_never_forms_the_full_expert_weight() -> None:
    torch.manual_seed(0)
    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=6)
    full = {tuple(layer.experts.w_in.shape), tuple(layer.experts.w_out.shape)}
    add_lora(layer, LoRAConfig(r=2))
    reads = []  # evaluations of W + s*B@A
    for adapter in lora_adapters(layer).values():
        adapter.register_forward_hook(lambda *args: reads.append(1))
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = layer(torch.randn(2, 5, 8)).square().sum()
    loss.backward()
    assert saved and not full & set(saved)  # no [E, out, in] tensor kept for the backward
    assert not reads  # nor formed in the forward (the backend is chosen by the stored weight)
    assert layer.experts.parametrizations.w_in.original.grad is None
