"""LoRA on transformers 5 fused experts, run by the "pimoe" experts implementation."""

import pytest
import torch

from pimoe.hf.families import build_tiny
from pimoe.moe import LoRAConfig, add_lora, merge_lora
from pimoe.moe.lora import lora_adapters


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen3_moe", "gpt_oss"]
)  # gpt_oss: transposed [E, in, out]
def test_pimoe_backend_with_adapters_equals_eager_with_adapters_merged(family: str) -> None:
    model = build_tiny(family)
    ids = torch.randint(3, 96, (2, 16))
    base = model(ids).logits
    names = add_lora(model, LoRAConfig(r=4, target_modules=("q_proj", "v_proj")))
    assert sum(".experts.gate_up_proj" in n or ".experts.down_proj" in n for n in names) == 4
    torch.manual_seed(1)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.normal_(0.0, 0.05)
    model.set_experts_implementation("pimoe")
    adapted = model(ids).logits
    assert (adapted - base).abs().max() > 1e-2  # the adapters change the model
    adapted.square().sum().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)
    merge_lora(model)
    model.set_experts_implementation("eager")
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
