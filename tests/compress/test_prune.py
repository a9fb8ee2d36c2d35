import pytest
import torch
from torch import nn

from pimoe.compress.prune import magnitude_prune, neuron_scores, prune_ffn_neurons, sparsity


def _mlp() -> nn.Sequential:
    # 16*32 + 32*8 = 768 weights
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _no_masks_or_hooks(model: nn.Module) -> bool:
    names = [name for name, _ in model.named_parameters()] + [
        name for name, _ in model.named_buffers()
    ]
    hooks = any(module._forward_pre_hooks for module in model.modules())
    return not hooks and not any(name.endswith(("_orig", "_mask")) for name in names)


def test_global_pruning_exact_and_permanent() -> None:
    model = _mlp()
    magnitude_prune(model, 0.5)
    report = sparsity(model)
    assert report.total == 768 and report.zeros == 384 and report.overall == 0.5
    assert _no_masks_or_hooks(model)
    assert sorted(name for name, _ in model.named_parameters()) == [
        "0.bias",
        "0.weight",
        "2.bias",
        "2.weight",
    ]


def test_global_pruning_removes_smallest_magnitudes() -> None:
    model = _mlp()
    original = torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])
    magnitude_prune(model, 0.25)
    after = torch.cat([model[0].weight.detach().flatten(), model[2].weight.detach().flatten()])
    zeroed = after == 0
    assert int(zeroed.sum()) == 192
    assert original[zeroed].abs().max() <= original[~zeroed].abs().min()
    torch.testing.assert_close(after[~zeroed], original[~zeroed])


def test_layer_pruning_hits_each_layer() -> None:
    model = _mlp()
    magnitude_prune(model, 0.75, scope="layer")
    report = sparsity(model)
    assert report.per_layer == {"0": 0.75, "2": 0.75}
    assert _no_masks_or_hooks(model)


def test_skip_and_biases_untouched() -> None:
    model = _mlp()
    bias = model[0].bias.detach().clone()
    magnitude_prune(model, 0.5, scope="layer", skip=["2"])
    report = sparsity(model)
    assert report.per_layer["0"] == 0.5 and report.per_layer["2"] == 0.0
    torch.testing.assert_close(model[0].bias, bias)


@pytest.mark.parametrize(
    "kwargs", [{"amount": -0.1}, {"amount": 1.5}, {"amount": 0.5, "scope": "row"}]
)
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        magnitude_prune(_mlp(), **kwargs)
    with pytest.raises(ValueError):
        magnitude_prune(nn.Sequential(nn.ReLU()), 0.5)


def _ffn(x: torch.Tensor, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    return down(torch.relu(up(x)))


def test_structured_shapes_shrink() -> None:
    up, down = nn.Linear(16, 40), nn.Linear(40, 16)
    new_up, new_down = prune_ffn_neurons(up, down, 0.25)
    assert new_up.weight.shape == (30, 16) and new_up.bias.shape == (30,)
    assert new_down.weight.shape == (16, 30) and new_down.bias.shape == (16,)


def test_structured_amount_zero_is_identity() -> None:
    up, down = nn.Linear(16, 40), nn.Linear(40, 16)
    new_up, new_down = prune_ffn_neurons(up, down, 0.0)
    x = torch.randn(7, 16)
    torch.testing.assert_close(_ffn(x, new_up, new_down), _ffn(x, up, down), atol=0, rtol=0)


def test_pruning_dead_neurons_keeps_outputs() -> None:
    up, down = nn.Linear(16, 40), nn.Linear(40, 16)
    dead = torch.tensor([1, 5, 6, 20, 33, 39, 2, 11, 12, 30])
    with torch.no_grad():
        down.weight[:, dead] = 0
    assert neuron_scores(up, down)[dead].eq(0).all()
    new_up, new_down = prune_ffn_neurons(up, down, 0.25)
    assert new_up.out_features == 30
    x = torch.randn(7, 16)
    torch.testing.assert_close(_ffn(x, new_up, new_down), _ffn(x, up, down), atol=1e-6, rtol=1e-5)


def test_gated_pairs_prune_gate_and_up_rows_together() -> None:
    from pimoe.moe import SwiGLU

    ffn = SwiGLU(16, 24)
    with torch.no_grad():
        ffn.down.weight[:, :6] = 0
    x = torch.randn(5, 16)
    before = ffn(x)
    ffn.gate_up, ffn.down = prune_ffn_neurons(ffn.gate_up, ffn.down, 0.25, gated=True)
    assert ffn.gate_up.out_features == 36 and ffn.down.in_features == 18
    torch.testing.assert_close(ffn(x), before, atol=1e-6, rtol=1e-5)


def test_structured_bad_options() -> None:
    up, down = nn.Linear(16, 40), nn.Linear(40, 16)
    with pytest.raises(ValueError):
        prune_ffn_neurons(up, down, 1.0)
    with pytest.raises(ValueError):
        prune_ffn_neurons(up, nn.Linear(20, 16), 0.5)
    with pytest.raises(ValueError):
        prune_ffn_neurons(up, down, 0.5, gated=True)
