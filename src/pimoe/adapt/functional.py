"""Parameters as a dict and a few steps of SGD on them, through ``torch.func.functional_call``.

Every meta-learner here (MAML, Reptile, :class:`AdaptiveLearning`) adapts a model by running
the same module with different weights ("fast weights"); the module itself is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pimoe.adapt.tasks import Task

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Order = Literal["second_order", "first_order", "none"]


def mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of two tensors of one shape (``F.mse_loss`` would broadcast ``[K, 1]``
    against ``[K]`` to ``[K, K]`` with only a warning)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"mse needs prediction and target of one shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}"
        )
    return F.mse_loss(prediction, target)


LOSSES: dict[str, LossFn] = {"mse": mse, "cross_entropy": F.cross_entropy}


def check_finite(name: str, t: Tensor) -> None:
    """``ValueError`` when the float tensor ``t`` holds NaN or infinity (non-floats pass)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or infinity")


def check_pair(x: Tensor, y: Tensor, names: tuple[str, str] = ("x", "y")) -> None:
    """``x [M, ...]`` and ``y [M, ...]``: tensors of one non-zero length, finite where float."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{names[0]} and {names[1]} must be tensors")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"need a non-empty {names[0]} and {names[1]} of equal length, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    check_finite(names[0], x)
    check_finite(names[1], y)


def check_tasks(tasks: Task) -> int:
    """The number ``N >= 1`` of tasks in a batch (``support_x [N, K, ...]`` etc., ``K >= 1``,
    each ``y`` as long as its ``x``, all finite); ``TypeError``/``ValueError`` naming the field."""
    if (
        not isinstance(tasks, tuple)
        or len(tasks) != 4
        or not all(isinstance(t, Tensor) for t in tasks)
    ):
        raise TypeError("tasks must be a Task of four tensors")
    if any(t.dim() < 2 for t in tasks) or len({t.shape[0] for t in tasks}) != 1:
        raise ValueError(
            f"expected a batch of tasks with a common leading dimension, got shapes "
            f"{[tuple(t.shape) for t in tasks]}"
        )
    if tasks[0].shape[0] == 0:
        raise ValueError("the batch of tasks is empty")
    names = Task._fields
    for i in (0, 2):
        check_pair(tasks[i][0], tasks[i + 1][0], (names[i], names[i + 1]))
        if tasks[i].shape[1] != tasks[i + 1].shape[1]:
            raise ValueError(
                f"{names[i + 1]} {tuple(tasks[i + 1].shape)} does not match {names[i]} "
                f"{tuple(tasks[i].shape)}"
            )
        check_finite(names[i], tasks[i])
        check_finite(names[i + 1], tasks[i + 1])
    for i in (0, 1):
        if tasks[i].shape[2:] != tasks[i + 2].shape[2:]:
            raise ValueError(
                f"support and query sets differ in shape: {names[i]} {tuple(tasks[i].shape)}, "
                f"{names[i + 2]} {tuple(tasks[i + 2].shape)}"
            )
    return int(tasks[0].shape[0])


def check_lr(name: str, value: float) -> None:
    """``ValueError`` unless ``value`` is a finite number > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def get_loss(loss: str | LossFn) -> LossFn:
    """``"mse"``, ``"cross_entropy"`` or any ``loss(prediction, target) -> scalar``."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a callable")
    return LOSSES[loss]


def trainable_params(model: nn.Module) -> Params:
    """The model's parameters that require grad, by name (the tensors themselves, not copies)."""
    params: Params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return params


def run(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """``model(x)`` with ``params`` in place of its own parameters."""
    return functional_call(model, params, (x,))


def sgd_steps(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    steps: int,
    lr: float,
    order: Order = "none",
) -> Params:
    """``steps`` full-batch SGD steps from ``params`` on ``(x, y)``; returns the new params.

    ``order`` says how the result depends on ``params`` for an outer gradient:
    ``"second_order"`` keeps the graph of every inner gradient (MAML), ``"first_order"`` treats
    the inner gradients as constants (FOMAML: d(result)/d(params) = identity), ``"none"``
    detaches the result (plain fine-tuning, Reptile).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if order not in ("second_order", "first_order", "none"):
        raise ValueError(f"unknown order {order!r}")
    if order == "none":
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
    for _ in range(steps):
        loss = loss_fn(run(model, params, x), y)
        grads = torch.autograd.grad(
            loss, list(params.values()), create_graph=order == "second_order", allow_unused=True
        )
        params = {n: p if g is None else p - lr * g for (n, p), g in zip(params.items(), grads)}
        if order == "none":
            params = {n: p.detach().requires_grad_() for n, p in params.items()}
    return params
