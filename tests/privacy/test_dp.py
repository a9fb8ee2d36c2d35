import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pimoe.data.digits import digits_split
from pimoe.moe import PiMoE
from pimoe.privacy.dp import (
    dp_compatible,
    epsilon,
    epsilon_spent,
    make_private,
    noise_for_budget,
    opacus_sampling,
    routes_tokens,
    train_private,
)
from pimoe.privacy.per_example import PerExampleModule


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    train, test = digits_split(0.2, 0)
    return train.x, train.y, test.x, test.y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    epochs: int,
    accountant: str = "rdp",
):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    return make_private(
        model,
        optimizer,
        loader,
        target_epsilon=eps,
        target_delta=1e-5,
        epochs=epochs,
        max_grad_norm=1.0,
        accountant=accountant,
    )


def test_budget_is_spent_exactly_and_model_learns(digits) -> None:
    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(0)
    model, optimizer, loader, engine = _private(_mlp(), x_tr, y_tr, eps=8.0, epochs=4)
    assert epsilon(engine, 1e-5) == 0.0
    assert optimizer.noise_multiplier > 0.3
    train_private(model, optimizer, loader, epochs=4)
    spent = epsilon(engine, 1e-5)
    assert 7.9 < spent <= 8.0, spent  # every step is accounted, at the rate Opacus samples with
    assert epsilon(engine, 1e-3) < spent  # a looser delta costs less epsilon
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    assert accuracy > 0.7, accuracy


def test_lower_epsilon_means_more_noise(digits) -> None:
    x_tr, y_tr, _, _ = digits
    sigmas = [
        _private(_mlp(), x_tr, y_tr, eps=e, epochs=5)[1].noise_multiplier for e in (1.0, 3.0, 8.0)
    ]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


def test_prv_accountant_is_tighter_than_rdp(digits) -> None:
    x_tr, y_tr, _, _ = digits
    rdp = _private(_mlp(), x_tr, y_tr, eps=3.0, epochs=2, accountant="rdp")[1].noise_multiplier
    prv = _private(_mlp(), x_tr, y_tr, eps=3.0, epochs=2, accountant="prv")[1].noise_multiplier
    assert 0.7 * rdp < prv < rdp  # same guarantee with less noise


def test_gradients_are_clipped_per_example_and_noised(digits) -> None:
    x_tr, y_tr, _, _ = digits
    torch.manual_seed(0)
    model, optimizer, _, _ = _private(_mlp(), x_tr[:256], y_tr[:256], eps=8.0, epochs=1)
    xb, yb = next(iter(DataLoader(TensorDataset(x_tr[:32], y_tr[:32]), batch_size=32)))
    nn.functional.cross_entropy(
        model(xb * 50), yb.long()
    ).backward()  # large inputs: large gradients
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], dim=1)
    assert (
        per_sample.shape[0] == 32 and per_sample.norm(dim=1).min() > 1.0
    )  # unclipped norms exceed C
    optimizer.pre_step()  # clip each example to C=1 and add noise, without the Adam update
    clipped = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    assert clipped.norm() <= 32 * 1.0 + 1e-4  # a sum of 32 vectors of norm <= 1
    noised = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(noised, clipped / 32)


def test_batchnorm_rejected_then_fixed(digits) -> None:
    x_tr, y_tr, _, _ = digits
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match="dp_compatible"):
        _private(model, x_tr, y_tr, eps=3.0, epochs=1)
    fixed = dp_compatible(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    _private(fixed, x_tr, y_tr, eps=3.0, epochs=1)


def _moe_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 16), PiMoE(16, num_experts=4, top_k=2, ffn_dim=16), nn.Linear(16, 10)
    )


def test_moe_per_example_gradients_are_exact_and_isolated(digits) -> None:
    """Per-example gradients through the experts: they average to the batch gradient, and an
    example's gradient does not depend on the other examples of its batch."""
    x, y = digits[0][:12], digits[1][:12]
    model = _moe_model()
    wrapped = PerExampleModule(model)
    nn.functional.cross_entropy(wrapped(x), y).backward()
    per_example = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert per_example[name].shape == (12, *p.shape)
        torch.testing.assert_close(per_example[name].mean(0), p.grad, atol=1e-6, rtol=1e-5)
    other = torch.cat([x[:1], digits[0][100:111]])  # example 0 with other companions
    nn.functional.cross_entropy(wrapped(other), torch.cat([y[:1], digits[1][100:111]])).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample[0], per_example[name][0], atol=1e-6, rtol=1e-5)
    assert routes_tokens(model) and not routes_tokens(_mlp())


@pytest.mark.slow
def test_dp_sgd_trains_a_trainable_moe_layer(digits) -> None:
    """DP-SGD (ε = 8) on a classifier with a trainable residual PiMoE block: the experts learn, ε is spent as planned."""
    from pimoe.federated.digits import MoEClassifier

    x_tr, y_tr, x_te, y_te = digits
    torch.manual_seed(0)
    model = MoEClassifier()
    experts = model.moe.experts.w_in.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    loader = DataLoader(TensorDataset(x_tr[:768], y_tr[:768]), batch_size=32)
    private, optimizer, loader, engine = make_private(
        model,
        optimizer,
        loader,
        target_epsilon=8.0,
        target_delta=1e-5,
        epochs=2,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    assert isinstance(private, PerExampleModule)
    train_private(private, optimizer, loader, epochs=2)
    assert 7.9 < epsilon(engine, 1e-5) <= 8.0
    assert not torch.equal(experts, model.moe.experts.w_in)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    assert accuracy > 0.3  # 10 classes: chance is 0.1 (measured 0.394)


def test_bad_arguments(digits) -> None:
    x_tr, y_tr, _, _ = digits
    for kwargs, match in [({"eps": 0.0}, "target_epsilon"), ({"eps": 1.0, "epochs": 0}, "epochs")]:
        with pytest.raises(ValueError, match=match):
            _private(_mlp(), x_tr, y_tr, **{"epochs": 1, **kwargs})
    with pytest.raises(ValueError, match="accountant"):
        _private(_mlp(), x_tr, y_tr, eps=1.0, epochs=1, accountant="gdp2")
    model, optimizer, loader, engine = _private(_mlp(), x_tr, y_tr, eps=1.0, epochs=1)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="already wrapped"):
        make_private(
            model, optimizer, loader, target_epsilon=1, target_delta=1e-5, epochs=1, max_grad_norm=1
        )
    with pytest.raises(ValueError, match="delta"):
        epsilon(engine, 0.0)
    with pytest.raises(TypeError, match="PrivacyEngine"):
        epsilon(object(), 1e-5)


@pytest.mark.parametrize(
    ("n", "batch", "rate", "steps"),
    [(1437, 128, 1 / 12, 12), (72, 8, 1 / 9, 9), (93, 1, 1 / 92, 92)],
)
def test_calibration_uses_the_rate_and_steps_opacus_accounts(
    n: int, batch: int, rate: float, steps: int
) -> None:
    """Opacus samples each example with probability 1/ceil(n/b) (not b/n) for int(ceil(n/b)) steps
    (92 for 93 batches: float rounding), and its accountant records exactly that; so must the calibration."""
    torch.manual_seed(0)
    x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    assert opacus_sampling(loader) == (rate, steps)
    assert opacus_sampling(loader, poisson=False) == (1 / len(loader), len(loader))
    net = _mlp()
    model, optimizer, dp_loader, engine = make_private(
        net,
        torch.optim.SGD(net.parameters(), lr=0.0),
        loader,
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=2,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    train_private(model, optimizer, dp_loader, epochs=2)
    noise = optimizer.noise_multiplier
    assert engine.accountant.history == [
        (noise, rate, 2 * steps)
    ]  # what Opacus counted is what we planned for
    assert noise == noise_for_budget(3.0, 1e-5, rate, 2 * steps)
    assert (
        2.95 < epsilon(engine, 1e-5) <= 3.0
    )  # the budget is reached, not undershot (less noise than b/n gave)
    assert (
        epsilon_spent([(noise * 0.99, rate, 2 * steps)], 1e-5) > 3.0
    )  # 1% less noise would overspend


# Opacus's own accountant notes that the best order is the largest alpha (as ours does, silenced)
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
def test_epsilon_matches_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    history = [(1.1, 1 / 12, 240), (0.8, 1 / 9, 18)]
    reference = RDPAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=noise, sample_rate=rate)
    assert reference.history == history
    assert epsilon_spent(history, 1e-5) == reference.get_epsilon(
        1e-5
    )  # same orders, same functions
    assert epsilon_spent([], 1e-5) == 0.0
    sigma = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=1 / 9, steps=90, accountant="rdp"
    )
    assert noise_for_budget(2.0, 1e-5, 1 / 9, 90) == sigma
    with pytest.raises(ValueError, match="accountant"):
        epsilon_spent(history, 1e-5, accountant="gdp")  # type: ignore[arg-type]


def test_empty_poisson_batches_are_noisy_accounted_steps() -> None:
    """6 examples in 6 batches: each Poisson batch is empty with probability (5/6)^6 = 0.33."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 64), torch.randint(0, 10, (6,))
    net = _mlp()
    model, optimizer, loader, engine = make_private(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        DataLoader(TensorDataset(x, y), batch_size=1),
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=5,
        max_grad_norm=1.0,
        accountant="rdp",
    )
    sizes: list[int] = []

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sizes.append(len(target))
        return nn.functional.cross_entropy(out, target)

    loss = train_private(model, optimizer, loader, epochs=5, loss_fn=loss_fn)
    assert len(sizes) == 30 and sizes.count(0) >= 3  # empty batches went through the step
    assert engine.accountant.history == [
        (optimizer.noise_multiplier, 1 / 6, 30)
    ]  # ... and were accounted
    assert all(torch.isfinite(p).all() for p in model.parameters()) and np.isfinite(loss)
