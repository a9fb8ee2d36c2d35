"""Training transformers' DeepSeek-V3 selection bias with pimoe's update."""

import pytest
import torch

from pimoe.hf.balance import track_expert_load
from pimoe.hf.families import build_tiny
from pimoe.moe import update_routing_bias


@pytest.mark.parametrize("implementation", ["pimoe", "eager"])
def test_deepseek_v3_bias_follows_the_executed_loads(implementation: str) -> None:
    model = build_tiny("deepseek_v3")
    model.set_experts_implementation(implementation)
    tracker = track_expert_load(model)
    assert len(tracker.routers) == 2  # the dense first layer has no router
    ids = torch.randint(3, 96, (2, 16))
    model.eval()(ids)
    assert all(
        r.tokens_per_expert.sum() == 0 for r in tracker.routers
    )  # eval forwards do not count
    executed: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args):
            executed[name] = torch.bincount(args[1].reshape(-1), minlength=8)

        return hook

    handles = [
        model.get_submodule(n.rsplit(".", 1)[0]).experts.register_forward_pre_hook(record(n))
        for n in ("model.layers.1.mlp.gate", "model.layers.2.mlp.gate")
    ]
    model.train()(ids)
    for handle in handles:
        handle.remove()
    before = {n: model.get_submodule(n).e_score_correction_bias.clone() for n in executed}
    loads = update_routing_bias(model, rate=0.01)
    for name, counts in executed.items():
        assert loads[name].tolist() == counts.float().tolist()
        step = model.get_submodule(name).e_score_correction_bias - before[name]
        torch.testing.assert_close(step, 0.01 * torch.sign(counts.float().mean() - counts.float()))
    tracker.remove()
    assert not [n for n, _ in model.named_buffers() if n.endswith("tokens_per_expert")]
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()


def test_families_without_a_selection_bias_are_refused() -> None:
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        track_expert_load(build_tiny("mixtral"))
