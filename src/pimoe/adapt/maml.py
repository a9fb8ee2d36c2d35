"""Model-Agnostic Meta-Learning (Finn et al. 2017), second order and first order (FOMAML).

The inner loop runs the model functionally (``torch.func.functional_call``) on fast weights, so
any ``nn.Module`` works, PiMoE layers included. With ``vectorize=True`` the tasks of a meta-batch
are evaluated at once with ``torch.func.vmap`` over ``torch.func.grad`` inner steps; that needs a
module ``vmap`` can trace (fixed shapes, no data-dependent control flow: MLPs and convnets yes,
PiMoE's sort-based dispatch no), and gives the same meta-gradient as the per-task loop, except
through batch norm and layer norm: there the second derivative under ``vmap`` is wrong (the
loop's matches finite differences; functorch issue #534, "layer_norm and batch_norm backward
batching rule is incorrect"), so second-order ``vectorize=True`` refuses models with them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from pimoe.adapt.functional import (
    LossFn,
    Order,
    Params,
    check_lr,
    check_pair,
    check_tasks,
    get_loss,
    run,
    sgd_steps,
    trainable_params,
)
from pimoe.adapt.tasks import Task


class MAML:
    """Meta-learns an initialization of ``model``'s parameters (they are updated in place).

    Args:
        model: any module mapping ``x [K, ...]`` to predictions that ``loss`` compares with ``y``.
        inner_lr: step size ``alpha`` of the inner SGD steps.
        inner_steps: inner steps per task during meta-training.
        first_order: FOMAML (inner gradients treated as constants; no second derivatives).
        outer_lr: learning rate of the default meta-optimizer (Adam), ignored if ``optimizer`` is given.
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(pred, target)``.
        vectorize: evaluate the meta-batch with ``vmap`` (see the module docstring); not with
            second order through batch norm or layer norm (ValueError).
        optimizer: meta-optimizer over ``model.parameters()``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        outer_lr: float = 1e-3,
        loss: str | LossFn = "mse",
        vectorize: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        check_lr("inner_lr", inner_lr)
        if inner_steps < 1:
            raise ValueError(f"need inner_steps >= 1, got {inner_steps}")
        norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
        if vectorize and not first_order and any(isinstance(m, norms) for m in model.modules()):
            raise ValueError(
                "second-order MAML with vectorize=True gives wrong meta-gradients through batch norm "
                "and layer norm (torch.func); use vectorize=False or first_order=True"
            )
        self.model, self.inner_lr, self.inner_steps = model, inner_lr, inner_steps
        self.first_order, self.vectorize = first_order, vectorize
        self.loss_fn = get_loss(loss)
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=outer_lr)

    @property
    def order(self) -> Order:
        """How the inner loop's result depends on the initialization (see :func:`sgd_steps`)."""
        return "first_order" if self.first_order else "second_order"

    def task_loss(self, params: Params, task: Task) -> Tensor:
        """Query loss of one task after ``inner_steps`` steps from ``params`` on its support set."""
        fast = sgd_steps(
            self.model,
            params,
            task.support_x,
            task.support_y,
            self.loss_fn,
            self.inner_steps,
            self.inner_lr,
            self.order,
        )
        return self.loss_fn(run(self.model, fast, task.query_x), task.query_y)

    def _vmapped_losses(self, params: Params, tasks: Task) -> Tensor:
        """``[N]`` query losses, one per task, with vmap over tasks and ``torch.func.grad`` inside."""

        def one(params: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            fast = params
            for _ in range(self.inner_steps):
                g = grad(lambda p: self.loss_fn(run(self.model, p, sx), sy))(fast)
                if self.first_order:
                    g = {n: v.detach() for n, v in g.items()}
                fast = {n: fast[n] - self.inner_lr * g[n] for n in fast}
            return self.loss_fn(run(self.model, fast, qx), qy)

        return vmap(one, in_dims=(None, 0, 0, 0, 0), randomness="different")(params, *tasks)

    def meta_loss(self, tasks: Task) -> Tensor:
        """Mean post-adaptation query loss over a batch of tasks (``support_x [N, K, ...]`` etc.),
        differentiable w.r.t. the model's parameters. ``ValueError``/``TypeError`` on an empty
        batch, an empty support or query set, ``y`` not as long as its ``x``, or NaN/infinity."""
        n = check_tasks(tasks)
        params = trainable_params(self.model)
        if self.vectorize:
            return self._vmapped_losses(params, tasks).mean()
        return torch.stack([self.task_loss(params, tasks.task(i)) for i in range(n)]).mean()

    def step(self, tasks: Task) -> float:
        """One meta-update on a batch of tasks; returns the meta-loss before the update. A
        non-finite meta-loss is a ``ValueError`` and the model is left as it was."""
        self.optimizer.zero_grad()
        loss = self.meta_loss(tasks)
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"the meta-loss is {float(loss)}; the model was not updated")
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def adapt(
        self, x: Tensor, y: Tensor, steps: int | None = None, lr: float | None = None
    ) -> Params:
        """Fast weights after ``steps`` (default ``inner_steps``) SGD steps on ``(x, y)`` from the
        meta-learned initialization; use them with :func:`pimoe.adapt.functional.run`."""
        check_pair(x, y)
        if lr is not None:
            check_lr("lr", lr)
        return sgd_steps(
            self.model,
            trainable_params(self.model),
            x,
            y,
            self.loss_fn,
            self.inner_steps if steps is None else steps,
            self.inner_lr if lr is None else lr,
            "none",
        )
