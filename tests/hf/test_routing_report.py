"""routing_report: counts, losses and plots of a forward pass, for transformers and pimoe models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from pimoe.hf import routing_report
from pimoe.hf.families import build_tiny
from pimoe.moe import PiMoE


def _ids(model: nn.Module, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(3)
    )


def test_mixtral_counts_and_loss_match_transformers() -> None:
    """Counts equal a recount from output_router_logits; hf_aux_loss equals transformers' aux_loss."""
    model = build_tiny("mixtral")
    assert not model.config.output_router_logits  # the report must not depend on it
    ids = _ids(model)
    report = routing_report(model, {"input_ids": ids})
    out = model(input_ids=ids, output_router_logits=True)
    k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    assert len(report.layers) == len(out.router_logits) == model.config.num_hidden_layers
    for layer, logits in zip(report.layers, out.router_logits):
        recount = torch.bincount(
            logits.softmax(-1).topk(k, dim=-1).indices.reshape(-1), minlength=num_experts
        )
        assert layer.stats.tokens_per_expert.tolist() == recount.tolist()
        assert int(layer.stats.tokens_per_expert.sum()) == ids.numel() * k
        assert layer.counts_from == "executed"
    assert report.hf_aux_loss == pytest.approx(float(out.aux_loss.detach()), rel=1e-5)


def test_padding_is_excluded_like_transformers() -> None:
    model = build_tiny("mixtral")
    ids = _ids(model)
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    report = routing_report(model, {"input_ids": ids, "attention_mask": mask})
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    k = model.config.num_experts_per_tok
    assert all(
        int(layer.stats.tokens_per_expert.sum()) == int(mask.sum()) * k for layer in report.layers
    )
    assert report.hf_aux_loss == pytest.approx(float(out.aux_loss.detach()), rel=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_every_family_reports_executed_assignments(family: str) -> None:
    """Counts sum to tokens*k per MoE layer (DeepSeek-V3's dense first layer is not reported);
    where routing is the top-k of softmax(logits), each layer's loss is transformers' loss of that
    layer divided by k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = build_tiny(family)
    ids = _ids(model)
    report = routing_report(model, {"input_ids": ids})
    out = model(input_ids=ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    dense = getattr(model.config, "first_k_dense_replace", 0)
    assert len(report.layers) == len(out.router_logits) == model.config.num_hidden_layers - dense
    for layer, logits in zip(report.layers, out.router_logits):
        assert int(layer.stats.tokens_per_expert.sum()) == ids.numel() * k
        assert (
            0.0
            < layer.stats.entropy
            <= torch.log(torch.tensor(float(layer.stats.num_experts))).item() + 1e-6
        )
        if family != "deepseek_v3":  # sigmoid + group routing: not a top-k of softmax
            expected = float(load_balancing_loss_func((logits.detach(),), logits.shape[-1], k)) / k
            assert layer.aux_loss == pytest.approx(expected, rel=1e-5)
    assert json.loads(json.dumps(report.as_dict()))["layers"][0]["num_tokens"] == ids.numel()


def test_deepseek_counts_follow_group_routing_not_softmax_top_k() -> None:
    """Sigmoid + group-limited routing with a correction bias: the report counts what the experts
    executed, which differs from a top-k of softmax(logits) (what a logits-only recount gives)."""
    model = build_tiny("deepseek_v3")
    ids = _ids(model, batch=4, length=32)
    report = routing_report(model, {"input_ids": ids})
    out = model(input_ids=ids, output_router_logits=True)
    k, num_experts = model.config.num_experts_per_tok, model.config.n_routed_experts
    naive = [
        torch.bincount(
            lg.softmax(-1).topk(k, -1).indices.reshape(-1), minlength=num_experts
        ).tolist()
        for lg in out.router_logits
    ]
    assert [layer.stats.tokens_per_expert.tolist() for layer in report.layers] != naive


def test_pimoe_layers_use_last_stats() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe1 = PiMoE(16, num_experts=4, top_k=2, ffn_dim=32)
            self.moe2 = PiMoE(16, num_experts=6, top_k=1, ffn_dim=32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.moe2(self.moe1(x))

    net = Net()
    x = torch.randn(3, 10, 16)
    report = routing_report(net, x)
    assert [layer.name for layer in report.layers] == ["moe1", "moe2"]
    assert [int(layer.stats.tokens_per_expert.sum()) for layer in report.layers] == [60, 30]
    assert report.layers[0].aux_loss == pytest.approx(float(net.moe1.aux_loss))
    assert report.hf_aux_loss is None


def test_table_and_heatmap(tmp_path) -> None:
    model = build_tiny("qwen3_moe")
    report = routing_report(model, _ids(model))
    text = str(report)
    assert "model.layers.0.mlp" in text and "imbalance" in text
    path = tmp_path / "routing.png"
    report.save_heatmap(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_without_moe_raises() -> None:
    with pytest.raises(TypeError, match="Sequential has no MoE layer"):
        routing_report(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))


def test_router_rows_that_are_already_probabilities_are_kept() -> None:
    """Some routers (Gemma 4) record probabilities instead of logits: no second softmax."""
    from pimoe.hf.report import _as_probs

    logits = torch.randn(5, 4)
    probs = logits.softmax(-1)
    torch.testing.assert_close(_as_probs(logits), probs)
    torch.testing.assert_close(_as_probs(probs), probs)


def test_model_outside_the_experts_interface_counts_router_top_k() -> None:
    """JetMoE (mixture of attention heads and MLP experts, no @use_experts_implementation):
    counts come from the router's top-k and the pooled loss still equals transformers' aux_loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "jetmoe",
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=8,
        intermediate_size=24,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = _ids(model, length=10)
    report = routing_report(model, {"input_ids": ids})
    out = model(input_ids=ids, output_router_logits=True)
    assert len(report.layers) == len(out.router_logits) == 4
    assert {layer.counts_from for layer in report.layers} == {"router_top_k"}
    for layer, logits in zip(report.layers, out.router_logits):
        recount = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=4)
        assert layer.stats.tokens_per_expert.tolist() == recount.tolist()
    assert report.hf_aux_loss == pytest.approx(float(out.aux_loss.detach()), rel=1e-5)
