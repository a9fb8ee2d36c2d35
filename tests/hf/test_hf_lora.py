"""LoRA on transformers 5 fused experts: the "pimoe" experts implementation trains the adapters
on the activations (no W + s*B@A), equal to the parametrized weights of transformers' eager loop."""

import pytest
import torch
from torch import nn

from pimoe import moe
from pimoe.hf.families import build_tiny
from pimoe.moe.lora import ExpertLoRA, lora_adapters

# gpt_oss: biases, transposed [E, in, out], interleaved clamped gate (the per-expert path);
# the others at r=4 take the grouped_mm path, at r=2 (8-byte rows) the per-expert path.
FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"]
IDS = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def adapted(family: str, r: int = 4, shared_a: bool = False) -> nn.Module:
    model = build_tiny(family)
    moe.add_lora(
        model,
        moe.LoRAConfig(r=r, lora_alpha=2.0 * r, shared_a=shared_a, target_modules=("q_proj",)),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.normal_(0.0, 0.05)
    return model


def expert_adapters(model: nn.Module) -> list[ExpertLoRA]:
    return [a for a in lora_adapters(model).values() if isinstance(a, ExpertLoRA)]


def loss_and_grads(
    model: nn.Module, implementation: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.set_experts_implementation(implementation)
    logits = model(IDS).logits
    loss = (logits * torch.arange(logits.numel()).view_as(logits).sin()).sum()
    params = [p for a in lora_adapters(model).values() for p in (a.lora_A, a.lora_B)]
    return logits.detach(), list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("r", "shared_a"), [(4, False), (4, True), (2, False)])
def test_low_rank_training_equals_the_parametrized_weights(
    family: str, r: int, shared_a: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    grouped = []  # projections run by grouped_mm
    projection = moe.lora_modules._grouped_projection
    monkeypatch.setattr(
        moe.lora_modules, "_grouped_projection", lambda *a: grouped.append(1) or projection(*a)
    )
    model = adapted(family, r, shared_a)
    assert model.config._experts_implementation == "pimoe"  # add_lora switched it
    reads = []  # evaluations of W + s*B@A
    hooks = [a.register_forward_hook(lambda *args: reads.append(1)) for a in expert_adapters(model)]
    logits, grads = loss_and_grads(model, "pimoe")
    assert not reads  # the low-rank path never formed the adapted weights
    assert bool(grouped) == (r == 4 and family != "gpt_oss")  # both paths are covered
    for hook in hooks:
        hook.remove()
    expected_logits, expected_grads = loss_and_grads(model, "eager")  # reads W + s*B@A
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(
            got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()
        )
    moe.merge_lora(model)  # the merged model gives the adapted output
    model.set_experts_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=1e-5, atol=1e-5)
    moe.unmerge_lora(model)  # and unmerged, the low-rank path trains on again
    model.set_experts_implementation("pimoe")
    torch.testing.assert_close(loss_and_grads(model, "pimoe")[0], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_training_keeps_no_expert_weight_sized_tensor(family: str) -> None:
    model = adapted(family)
    bases = [model.get_parameter(n) for n, _ in model.named_parameters() if n.endswith(".original")]
    base_storages = {b.untyped_storage().data_ptr() for b in bases}
    smallest = min(b.numel() for b in bases)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(IDS).logits.square().sum()
    big = [t for t in saved if t.numel() >= smallest and t.dim() == 3]
    # saved [E, out, in]-sized tensors are only the frozen weights themselves (no copy, no W + s*B@A)
    assert all(t.untyped_storage().data_ptr() in base_storages for t in big)
    loss.backward()
    assert all(b.grad is None for b in bases)
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)


def test_inference_reads_the_adapted_weights() -> None:
    model = adapted("mixtral")
    with torch.no_grad():
        got = model(IDS).logits
        model.set_experts_implementation("eager")
        torch.testing.assert_close(got, model(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_save_load_and_unload(family: str, tmp_path) -> None:
    model = adapted(family)
    with torch.no_grad():
        expected = model(IDS).logits
    moe.save_lora(model, tmp_path)
    fresh = build_tiny(family)
    fresh.set_experts_implementation("eager")
    moe.load_lora(fresh, tmp_path)
    assert fresh.config._experts_implementation == "pimoe"
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected, rtol=0, atol=1e-6)
    moe.merge_and_unload(fresh)
    assert fresh.config._experts_implementation == "eager"  # the implementation it had
    assert not any(hasattr(m, "lora_base_experts_implementation") for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected, rtol=1e-5, atol=1e-5)
