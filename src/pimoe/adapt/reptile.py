"""Reptile (Nichol et al. 2018): move the initialization towards the weights reached by a few SGD
steps on each task; first-order, no query set needed."""

from __future__ import annotations

import math

import torch
from torch import nn

from pimoe.adapt.functional import (
    LossFn,
    check_lr,
    check_tasks,
    get_loss,
    run,
    sgd_steps,
    trainable_params,
)
from pimoe.adapt.tasks import Task


class Reptile:
    """``theta <- theta + epsilon * mean_tasks(phi_task - theta)``, ``phi_task`` = ``inner_steps``
    SGD steps (``inner_lr``) on the task's support and query sets together.

    Args:
        model: any module; its parameters are updated in place.
        inner_lr, inner_steps: the task-level SGD.
        epsilon: outer step size (the paper's linear-to-zero schedule is left to the caller:
            set ``self.epsilon`` between steps).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float = 0.02,
        inner_steps: int = 5,
        epsilon: float = 0.1,
        loss: str | LossFn = "mse",
    ) -> None:
        check_lr("inner_lr", inner_lr)
        if inner_steps < 1 or not 0 < epsilon <= 1:
            raise ValueError(
                f"need inner_steps >= 1 and 0 < epsilon <= 1, got {inner_steps}, {epsilon}"
            )
        self.model, self.inner_lr, self.inner_steps, self.epsilon = (
            model,
            inner_lr,
            inner_steps,
            epsilon,
        )
        self.loss_fn = get_loss(loss)

    @torch.no_grad()
    def step(self, tasks: Task) -> float:
        """One outer update on a batch of tasks (``support_x [N, K, ...]`` etc.); returns the mean
        loss of the adapted weights on the task data. ``ValueError``/``TypeError`` on a bad batch
        (see :func:`~pimoe.adapt.functional.check_tasks`) or a non-finite adapted loss; the model is
        then left as it was."""
        check_tasks(tasks)
        params = trainable_params(self.model)
        delta = {n: torch.zeros_like(p) for n, p in params.items()}
        losses = []
        for i in range(tasks.support_x.shape[0]):
            task = tasks.task(i)
            x = torch.cat([task.support_x, task.query_x])
            y = torch.cat([task.support_y, task.query_y])
            with torch.enable_grad():
                fast = sgd_steps(
                    self.model, params, x, y, self.loss_fn, self.inner_steps, self.inner_lr, "none"
                )
                losses.append(float(self.loss_fn(run(self.model, fast, x), y).detach()))
            for n in delta:
                delta[n] += fast[n] - params[n]
        if not all(math.isfinite(v) for v in losses) or not all(
            bool(torch.isfinite(d).all()) for d in delta.values()
        ):
            raise ValueError(
                "an adapted loss or weight is NaN or infinite; the model was not updated"
            )
        for n, p in params.items():
            p.add_(delta[n], alpha=self.epsilon / len(losses))
        return sum(losses) / len(losses)
