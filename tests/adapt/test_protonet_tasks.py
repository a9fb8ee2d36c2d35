import math

import pytest
import torch
from torch import nn

from pimoe.adapt import DigitsEpisodes, ProtoNet, SinusoidTasks, load_digits_tensors


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


def test_sinusoid_tasks_follow_the_maml_paper_ranges():
    tasks = SinusoidTasks(seed=0).sample(200, 5, 10)
    assert tasks.support_x.shape == (200, 5, 1) and tasks.query_y.shape == (200, 10, 1)
    assert tasks.support_x.min() >= -5 and tasks.support_x.max() <= 5
    assert tasks.query_y.abs().max() <= 5
    # Every task's targets fit A sin(x - phase) with one (A, phase): y = a sin x + b cos x.
    t = tasks.task(0)
    x = torch.cat([t.support_x, t.query_x]).squeeze(1).double()
    y = torch.cat([t.support_y, t.query_y]).squeeze(1).double()
    basis = torch.stack([torch.sin(x), torch.cos(x)], 1)
    coef = torch.linalg.lstsq(basis, y.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(basis @ coef, y, atol=1e-5, rtol=0)
    amplitude, phase = float(coef.norm()), math.atan2(-float(coef[1]), float(coef[0]))
    assert 0.1 <= amplitude <= 5 and -1e-6 <= phase <= math.pi + 1e-6


def test_digits_episodes_are_n_way_k_shot_over_the_given_classes(digits):
    episodes = DigitsEpisodes([5, 6, 7, 8, 9], n_way=5, k_shot=2, queries=3, seed=0, data=digits)
    task = episodes.sample()
    assert task.support_x.shape == (10, 64) and task.query_x.shape == (15, 64)
    assert (
        torch.bincount(task.support_y).tolist() == [2] * 5
        and torch.bincount(task.query_y).tolist() == [3] * 5
    )
    x, y = digits
    rows = {tuple(r.tolist()): int(c) for r, c in zip(x, y)}
    for images, labels in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
        originals = [rows[tuple(r.tolist())] for r in images]
        assert set(originals) <= {5, 6, 7, 8, 9}
        for label in range(5):  # one original class per episode label
            assert len({o for o, lab in zip(originals, labels.tolist()) if lab == label}) == 1
    support = {tuple(r.tolist()) for r in task.support_x}
    assert not support & {tuple(r.tolist()) for r in task.query_x}
    assert episodes.sample_batch(4).support_x.shape == (4, 10, 64)
    with pytest.raises(ValueError):
        DigitsEpisodes([0, 1, 2], n_way=5, data=digits)


def test_prototypes_are_class_means_and_logits_are_negative_squared_distances():
    net = ProtoNet(nn.Identity())
    sx = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    sy = torch.tensor([0, 0, 1])
    torch.testing.assert_close(net.prototypes(sx, sy), torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    logits = net(sx, sy, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -10.0]]))
    with pytest.raises(ValueError, match="support example"):
        net.prototypes(sx, torch.tensor([0, 0, 2]))


def test_episodic_training_raises_protonet_accuracy(digits):
    torch.manual_seed(0)
    net = ProtoNet(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
    train = DigitsEpisodes([0, 1, 2, 3, 4], n_way=5, k_shot=1, queries=5, seed=0, data=digits)
    test = DigitsEpisodes([0, 1, 2, 3, 4], n_way=5, k_shot=1, queries=10, seed=1, data=digits)
    episodes = [test.sample() for _ in range(40)]
    before = sum(net.accuracy(e) for e in episodes) / len(episodes)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(150):
        loss = net.loss(train.sample())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = sum(net.accuracy(e) for e in episodes) / len(episodes)
    assert after > 0.9 and after > before + 0.1, (before, after)
