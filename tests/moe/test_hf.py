"""Correctness anchor: PiMoE built from Hugging Face MoE blocks gives the same outputs and gradients."""

import pytest
import torch
from torch import nn

from pimoe import PiMoE

mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
qwen2_moe = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe")
from transformers import MixtralConfig, Qwen2MoeConfig  # noqa: E402


def _init(block: nn.Module) -> nn.Module:
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    return block


def mixtral_block() -> nn.Module:
    cfg = MixtralConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2
    )
    return _init(mixtral.MixtralSparseMoeBlock(cfg))


def qwen_block(norm_topk_prob: bool) -> nn.Module:
    cfg = Qwen2MoeConfig(
        hidden_size=32,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=5,
        num_experts_per_tok=3,
        norm_topk_prob=norm_topk_prob,
    )
    return _init(qwen2_moe.Qwen2MoeSparseMoeBlock(cfg))


@pytest.mark.parametrize(
    "make", [mixtral_block, lambda: qwen_block(False), lambda: qwen_block(True)]
)
def test_forward_and_gradients_match_hf(make) -> None:
    block = make()
    layer = PiMoE.from_hf(block)
    x = torch.randn(2, 11, 32)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_hf = layer(x_ours), block(x_hf)
    torch.testing.assert_close(out_ours, out_hf, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out_hf)
    out_ours.backward(grad)
    out_hf.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.router.gate.weight.grad, block.gate.weight.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        layer.experts.w_in.grad, block.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        layer.experts.w_out.grad, block.experts.down_proj.grad, rtol=1e-4, atol=1e-6
    )


def test_qwen_structure_is_carried_over() -> None:
    layer = PiMoE.from_hf(qwen_block(False))
    assert layer.num_experts == 5 and layer.top_k == 3 and layer.ffn_dim == 24
    assert layer.shared is not None and layer.shared.down.in_features == 40
    assert layer.shared_gate is not None and not layer.router.normalize


def test_bf16_block_matches() -> None:
    block = mixtral_block().to(torch.bfloat16)
    layer = PiMoE.from_hf(block)
    assert layer.experts.w_in.dtype == torch.bfloat16
    x = torch.randn(4, 8, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), block(x), rtol=2e-2, atol=2e-2)


def test_unsupported_module_raises() -> None:
    with pytest.raises(TypeError, match="not a supported MoE block"):
        PiMoE.from_hf(nn.Linear(4, 4))
