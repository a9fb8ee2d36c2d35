"""Bad input to the adaptation APIs (MAML, Reptile, ProtoNets, EWC, AdaptiveLearning): NaN,
empty batches, mismatched shapes, wrong dtypes and settings. Each is a ValueError/TypeError
naming the problem, raised before the model's weights change (a NaN step used to poison them)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pimoe.adapt import EWC, MAML, AdaptConfig, AdaptiveLearning, ProtoNet, Reptile, Task
from pimoe.adapt.functional import get_loss


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def _tasks(n: int = 2, k: int = 3) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, k, 1, generator=g)
    return Task(x, x.sin(), x + 1, (x + 1).sin())


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _with(task: Task, **fields: torch.Tensor) -> Task:
    return task._replace(**fields)


BAD_BATCHES = {
    "nan support": (lambda t: _with(t, support_x=t.support_x.clone().fill_(math.nan)), "NaN"),
    "inf query target": (lambda t: _with(t, query_y=t.query_y.clone().fill_(math.inf)), "NaN"),
    "no tasks": (lambda t: Task(*(v[:0] for v in t)), "empty"),
    "empty support": (
        lambda t: _with(t, support_x=t.support_x[:, :0], support_y=t.support_y[:, :0]),
        "empty",
    ),
    "y shorter than x": (lambda t: _with(t, support_y=t.support_y[:, :2]), "support_y"),
    "y without its last dim": (lambda t: _with(t, query_y=t.query_y[..., 0]), "shape"),
    "tasks disagree": (lambda t: _with(t, query_x=t.query_x[:1], query_y=t.query_y[:1]), "leading"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
@pytest.mark.parametrize("learner", ["maml", "maml_vmap", "reptile"])
def test_a_bad_task_batch_is_refused_and_the_model_is_unchanged(case: str, learner: str) -> None:
    """Before: NaN gave a NaN step that overwrote every weight; an empty batch raised from
    ``torch.stack`` or divided by zero; ``y [K]`` against ``pred [K, 1]`` broadcast to ``[K, K]``
    (a warning, and a wrong loss)."""
    model = _net()
    meta = (
        Reptile(model)
        if learner == "reptile"
        else MAML(model, vectorize=learner == "maml_vmap", first_order=True)
    )
    make, match = BAD_BATCHES[case]
    before = _snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        meta.step(make(_tasks()))
    assert _unchanged(model, before)


def test_mse_refuses_shapes_that_would_broadcast() -> None:
    mse = get_loss("mse")
    with pytest.raises(ValueError, match="shape"):
        mse(torch.zeros(4, 1), torch.zeros(4))
    assert float(mse(torch.ones(4, 1), torch.zeros(4, 1))) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"inner_lr": math.nan}, {"inner_lr": 0.0}, {"inner_steps": 0}, {"inner_lr": math.inf}],
)
def test_maml_and_reptile_refuse_non_finite_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="inner"):
        MAML(_net(), **kwargs)
    with pytest.raises(ValueError, match="inner"):
        Reptile(_net(), **kwargs)


def test_maml_adapt_with_lr_zero_is_refused_not_replaced() -> None:
    """Before: ``lr=0.0`` is falsy and ``lr or inner_lr`` silently used ``inner_lr``."""
    maml = MAML(_net(), inner_lr=0.5)
    task = _tasks(1).task(0)
    with pytest.raises(ValueError, match="lr"):
        maml.adapt(task.support_x, task.support_y, lr=0.0)
    with pytest.raises(ValueError, match="NaN"):
        maml.adapt(task.support_x.clone().fill_(math.nan), task.support_y)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0, 1, -1]), "non-negative"),
        (torch.tensor([0, 1, 10**9]), "every class"),  # before: bincount allocated 8 GB
        (torch.tensor([], dtype=torch.long), "empty"),
        (torch.tensor([0.0, 1.0, 1.0]), "long"),
    ],
)
def test_protonet_refuses_bad_support_labels(labels: torch.Tensor, match: str) -> None:
    net = ProtoNet(_encoder())
    with pytest.raises(ValueError, match=match):
        net.prototypes(torch.zeros(labels.shape[0], 4), labels)


def test_protonet_refuses_nan_and_out_of_range_queries() -> None:
    net = ProtoNet(_encoder())
    sx, sy = torch.rand(4, 4), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        net(sx, sy, torch.full((2, 4), math.nan))
    with pytest.raises(ValueError, match="NaN"):
        net(sx.clone().fill_(math.inf), sy, torch.rand(2, 4))
    with pytest.raises(ValueError, match="query_y"):
        net.loss(Task(sx, sy, torch.rand(2, 4), torch.tensor([0, 2])))


def test_ewc_refuses_nan_data_bad_lam_and_reshaped_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="NaN"):
        EWC(model, x.clone().fill_(math.nan), y, lam=1.0)
    with pytest.raises(ValueError, match="lam"):
        EWC(model, x, y, lam=math.nan)
    ewc = EWC(model, x, y, lam=1.0)
    reshaped = nn.Linear(1, 3)  # same names, other shapes: used to broadcast silently or fail deep
    with pytest.raises(ValueError, match="shape"):
        ewc.penalty(reshaped)


def test_adaptive_learning_refuses_nan_data_and_lr() -> None:
    with pytest.raises(ValueError, match="lr"):
        AdaptConfig(lr=math.nan)
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        AdaptiveLearning().adapt(model, (torch.full((4, 1), math.nan), torch.zeros(4, 1)))
    assert _unchanged(model, before)


@pytest.mark.parametrize("learner", [MAML, Reptile])
def test_a_step_that_diverges_leaves_the_model_unchanged(learner: type) -> None:
    """Finite data, but an inner step so large that the adapted loss overflows."""
    model = _net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="not updated"):
        learner(model, inner_lr=1e30).step(_tasks())
    assert _unchanged(model, before)
