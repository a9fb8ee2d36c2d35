import copy

import pytest
import torch
from torch import nn

from pimoe.adapt import (
    EWC,
    AdaptConfig,
    AdaptiveLearning,
    HypergradientLR,
    ReplayBuffer,
    fisher_diagonal,
    task_incremental_loss,
)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def test_vectorized_fisher_equals_one_backward_per_sample():
    net = _net()
    x, y = torch.randn(20, 6), torch.randint(0, 4, (20,))
    fast = fisher_diagonal(net, x, y, chunk_size=7)
    slow = fisher_diagonal(net, x, y, vectorize=False)
    manual = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for xi, yi in zip(x, y):
        net.zero_grad()
        nn.functional.cross_entropy(net(xi[None]), yi[None]).backward()
        for n, p in net.named_parameters():
            manual[n] += p.grad.pow(2) / len(x)
    for n in manual:
        torch.testing.assert_close(fast[n], manual[n])
        torch.testing.assert_close(slow[n], manual[n])


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_lam_fisher_delta():
    net = _net()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    ewc = EWC(net, x, y, lam=3.0)
    assert float(ewc.penalty(net).detach()) == 0.0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    net.zero_grad()
    ewc.penalty(net).backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, 3.0 * ewc.fisher[n] * (p.detach() - ewc.anchor[n]))
    with pytest.raises(ValueError):
        ewc.penalty(_net().append(nn.Linear(4, 2)))
    with pytest.raises(ValueError):
        fisher_diagonal(net, x[:0], y[:0])


def test_replay_buffer_is_a_uniform_reservoir():
    kept = torch.zeros(100)
    for seed in range(200):
        buffer = ReplayBuffer(10, seed=seed)
        for start in range(0, 100, 25):
            ids = torch.arange(start, start + 25)
            buffer.add(ids.float().unsqueeze(1), ids)
        assert len(buffer) == 10
        kept[torch.stack(buffer.y)] += 1
    # each of the 100 items is kept with probability 0.1: 20 of 200 runs, binomial sd ~4.2
    assert kept.min() >= 5 and kept.max() <= 40
    assert abs(kept[:50].sum() - kept[50:].sum()) < 150  # early items are not favoured
    x, y = buffer.sample(7)
    assert x.shape == (7, 1) and torch.equal(x.squeeze(1).long(), y)


def test_task_incremental_loss_ignores_other_tasks_logits():
    logits = torch.randn(4, 6)
    y = torch.tensor([0, 2, 3, 5])
    changed = logits.clone()
    changed[0, 3:] += 100  # other task's logits of example 0
    changed[2, :3] -= 100
    torch.testing.assert_close(
        task_incremental_loss(changed, y, 3), task_incremental_loss(logits, y, 3)
    )
    expected = (
        nn.functional.cross_entropy(logits[:2, :3], y[:2]) * 0.5
        + nn.functional.cross_entropy(logits[2:, 3:], y[2:] - 3) * 0.5
    )
    torch.testing.assert_close(task_incremental_loss(logits, y, 3), expected)


def _quadratic_run(lr: float, beta: float | None, steps: int = 200) -> tuple[float, float]:
    scales = torch.tensor([1.0, 10.0])
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    optimizer = torch.optim.SGD([w], lr=lr)
    controller = HypergradientLR(optimizer, beta) if beta else None
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (scales * w.pow(2)).sum()).backward()
        if controller:
            controller.step()
        optimizer.step()
    return float(0.5 * (scales * w.detach().pow(2)).sum()), optimizer.param_groups[0]["lr"]


def test_hypergradient_lr_grows_a_too_small_rate_and_shrinks_a_divergent_one():
    fixed_small, _ = _quadratic_run(1e-3, None)
    adapted_small, lr_small = _quadratic_run(1e-3, 0.05)
    assert lr_small > 1e-2 and adapted_small < 1e-3 * fixed_small
    fixed_big, _ = _quadratic_run(0.25, None)  # 0.25 > 2 / 10: diverges along the steep axis
    adapted_big, lr_big = _quadratic_run(0.25, 0.05)
    assert fixed_big > 1e6 and lr_big < 0.2 and adapted_big < 1e-3
    with pytest.raises(ValueError):
        HypergradientLR(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), beta=1.5)


def test_adaptive_learning_adapts_a_copy_and_lowers_the_loss_on_new_data():
    model = _net()
    original = copy.deepcopy(model.state_dict())
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    learner = AdaptiveLearning(
        AdaptConfig(steps=20, lr=0.5, loss="cross_entropy", hypergradient_beta=0.02)
    )
    adapted = learner.adapt(model, (x, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(adapted(x), y)) < 0.8 * float(loss(model(x), y))
    with pytest.raises(TypeError):
        learner.adapt(model, x)
    with pytest.raises(ValueError):
        learner.adapt(model, (x, y[:3]))
    with pytest.raises(ValueError):
        AdaptConfig(optimizer="rmsprop")


def test_seed_names_adaptive_learning():
    from pimoe.compat import AdaptiveLearning as SeedAdaptiveLearning
    from pimoe.compat import AdaptiveLearningConfig

    model = _net()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    adapted = SeedAdaptiveLearning(
        AdaptiveLearningConfig(steps=5, lr=0.5, loss="cross_entropy")
    ).adapt(model, (x, y))
    assert adapted is not model and isinstance(adapted, nn.Sequential)
