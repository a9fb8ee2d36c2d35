"""Parameters as a dict and a few steps of SGD on them, through ``torch.func.functional_call``.

Every meta-learner here (MAML, Reptile, :class:`AdaptiveLearning`) adapts a model by running
the same module with different weights ("fast weights"); the module itself is never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Order = Literal["second_order", "first_order", "none"]

LOSSES: dict[str, LossFn] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


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
