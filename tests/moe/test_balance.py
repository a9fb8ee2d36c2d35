"""Auxiliary-loss-free balancing: selection bias, load counting, the update rule, persistence."""

import pytest
import torch

from pimoe.moe import (
    MoEConfig,
    PiMoE,
    Router,
    attach_bias_update,
    load_balancing_loss,
    set_balance,
    update_routing_bias,
)
from pimoe.moe.balance import sequence_balance_loss
from pimoe.moe.model import LMConfig, PiMoELM


def test_bias_changes_selection_but_not_combine_weights() -> None:
    torch.manual_seed(0)
    router = Router(
        8, num_experts=4, top_k=2, score="sigmoid", normalize=False, balance="bias"
    ).eval()
    x = torch.randn(64, 8)
    plain = router(x)
    assert router.e_score_correction_bias is not None
    router.e_score_correction_bias.copy_(
        torch.tensor([0.0, 0.0, 0.0, 5.0])
    )  # expert 3 always chosen
    biased = router(x)
    assert (biased.indices == 3).any(-1).all() and not (plain.indices == 3).any(-1).all()
    scores = torch.sigmoid(biased.logits)
    # the weights are the unbiased scores of the chosen experts, never score + bias
    torch.testing.assert_close(biased.weights, scores.gather(1, biased.indices))
    assert (biased.weights < 1).all()
    torch.testing.assert_close(biased.logits, plain.logits)


def test_normalized_weights_of_bias_routing_sum_to_one() -> None:
    router = Router(8, num_experts=4, top_k=2, balance="bias")
    assert router.e_score_correction_bias is not None
    router.e_score_correction_bias.copy_(torch.tensor([3.0, -3.0, 0.0, 0.0]))
    out = router(torch.randn(16, 8))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(16))
    assert (out.indices == 0).any(-1).all()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_choice_combines_the_renormalized_unbiased_scores(score: str) -> None:
    torch.manual_seed(0)
    router = Router(8, num_experts=8, top_k=4, score=score, balance="bias").eval()
    assert router.e_score_correction_bias is not None
    router.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    out = router(torch.randn(32, 8))
    scores = out.logits.softmax(-1) if score == "softmax" else torch.sigmoid(out.logits)
    chosen = scores.gather(1, out.indices)
    torch.testing.assert_close(out.weights, chosen / chosen.sum(-1, keepdim=True))
    biased = scores + router.e_score_correction_bias
    torch.testing.assert_close(out.indices, biased.topk(4, dim=-1).indices)


def test_update_rule_sign_and_magnitude() -> None:
    layer = PiMoE(8, num_experts=4, top_k=1, ffn_dim=8, balance="bias", bias_update_rate=0.01)
    router = layer.router
    assert router.tokens_per_expert is not None and router.e_score_correction_bias is not None
    router.tokens_per_expert.copy_(torch.tensor([6, 3, 9, 2]))  # mean 5
    loads = update_routing_bias(layer)
    assert loads["router"].tolist() == [6.0, 3.0, 9.0, 2.0]
    torch.testing.assert_close(
        router.e_score_correction_bias, torch.tensor([-0.01, 0.01, -0.01, 0.01])
    )
    assert router.tokens_per_expert.sum() == 0
    update_routing_bias(layer)  # nothing counted since: unchanged
    torch.testing.assert_close(
        router.e_score_correction_bias, torch.tensor([-0.01, 0.01, -0.01, 0.01])
    )
    router.tokens_per_expert.copy_(torch.tensor([5, 5, 5, 5]))
    update_routing_bias(layer, rate=0.5)  # balanced: sign 0
    torch.testing.assert_close(
        router.e_score_correction_bias, torch.tensor([-0.01, 0.01, -0.01, 0.01])
    )


def test_loads_are_counted_in_training_forwards_only() -> None:
    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=8, balance="bias")
    x = torch.randn(3, 5, 8)
    layer.eval()(x)
    assert layer.router.tokens_per_expert is not None and layer.router.tokens_per_expert.sum() == 0
    layer.train()(x)
    layer(x)
    assert layer.router.tokens_per_expert.sum() == 2 * 15 * 2
    assert layer.last_stats is not None


def test_imbalance_falls_on_skewed_input() -> None:
    torch.manual_seed(0)
    router = Router(
        16, num_experts=8, top_k=2, score="sigmoid", balance="bias", bias_update_rate=0.02
    )
    with torch.no_grad():
        router.gate.weight[0] += 0.5  # inputs with a positive mean all prefer expert 0
        router.gate.weight[1] += 0.4
    router.train()

    def imbalance() -> float:
        counts = torch.bincount(router(x).indices.reshape(-1), minlength=8).float()
        return float(counts.max() / counts.mean())

    x = torch.randn(512, 16) + 1.0
    before = imbalance()
    for _ in range(200):
        router(torch.randn(512, 16) + 1.0)
        update_routing_bias(router)
    after = imbalance()
    assert before > 3.0
    assert after < 1.3


def test_sequence_balance_loss_is_mean_of_per_sequence_switch_losses() -> None:
    torch.manual_seed(0)
    probs = torch.rand(3 * 7, 5).softmax(-1)
    indices = torch.randint(0, 5, (21, 2))
    expected = torch.stack(
        [
            load_balancing_loss(probs[i * 7 : (i + 1) * 7], indices[i * 7 : (i + 1) * 7], 5)
            for i in range(3)
        ]
    ).mean()
    torch.testing.assert_close(sequence_balance_loss(probs, indices, 5, 7), expected)
    with pytest.raises(ValueError, match="seq_len"):
        sequence_balance_loss(probs, indices, 5, 4)


def test_bias_layers_report_the_sequence_wise_loss() -> None:
    torch.manual_seed(0)
    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=8, balance="bias", score="sigmoid")
    x = torch.randn(3, 6, 8)
    layer(x)
    route = layer.router(x.reshape(-1, 8))
    torch.testing.assert_close(
        layer.aux_loss, sequence_balance_loss(route.probs, route.indices, 4, 6)
    )
    assert not torch.allclose(layer.aux_loss, route.aux_loss)  # the batch-wide Switch loss differs


def test_attach_bias_update_runs_after_each_optimizer_step() -> None:
    torch.manual_seed(0)
    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=8, balance="bias", bias_update_rate=0.1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    handle = attach_bias_update(optimizer, layer)
    layer(torch.randn(2, 5, 8)).sum().backward()
    optimizer.step()
    assert layer.router.e_score_correction_bias is not None
    assert layer.router.e_score_correction_bias.abs().max() == pytest.approx(0.1)
    handle.remove()
    with pytest.raises(ValueError, match="no router"):
        attach_bias_update(optimizer, PiMoE(8, num_experts=4, top_k=2, ffn_dim=8))


def test_bias_is_saved_with_the_model(tmp_path) -> None:
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=16, balance="bias", aux_loss_coef=0.0)
    model = PiMoELM(
        LMConfig(vocab_size=64, d_model=16, n_layer=2, n_head=2, block_size=16, moe=moe)
    )
    for layer in model.moe_layers:
        assert layer.router.e_score_correction_bias is not None
        layer.router.e_score_correction_bias.normal_()
    model.save(tmp_path / "lm.safetensors")
    again = PiMoELM.load(tmp_path / "lm.safetensors")
    for a, b in zip(model.moe_layers, again.moe_layers):
        assert (
            a.router.e_score_correction_bias is not None
            and b.router.e_score_correction_bias is not None
        )
        torch.testing.assert_close(
            a.router.e_score_correction_bias, b.router.e_score_correction_bias
        )
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model.eval()(idx).logits, again.eval()(idx).logits)


def test_set_balance_switches_existing_layers() -> None:
    layer = PiMoE(8, num_experts=4, top_k=2, ffn_dim=8)
    assert "router.e_score_correction_bias" not in layer.state_dict()
    assert set_balance(layer, "bias", bias_update_rate=0.05) == 1
    assert layer.config.balance == layer.router.config.balance == "bias"
    assert "router.e_score_correction_bias" in layer.state_dict()
    set_balance(layer, "aux_loss")
    assert (
        layer.router.e_score_correction_bias is None
        and "router.e_score_correction_bias" not in layer.state_dict()
    )


def test_bad_balance_options() -> None:
    with pytest.raises(ValueError, match="balance"):
        MoEConfig(balance="loss-free")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bias_update_rate"):
        MoEConfig(bias_update_rate=-1.0)
    with pytest.raises(ValueError, match="token_choice"):
        MoEConfig(balance="bias", routing="expert_choice")
    with pytest.raises(ValueError, match="rate"):
        update_routing_bias(PiMoE(8, num_experts=4, top_k=2, ffn_dim=8, balance="bias"), rate=-0.1)
