"""Learning-rate adaptation by hypergradient descent (Baydin et al. 2018), for any torch optimizer.

The loss after an update ``theta_t = theta_{t-1} + Delta_{t-1}`` depends on the learning rate
through ``Delta``; its derivative w.r.t. the learning rate has the sign of ``g_t . Delta_{t-1}``.
If the new gradient still points along the last step (loss still falling that way) the rate
grows; if it points back (overshoot, oscillation) the rate shrinks. We use the multiplicative,
scale-free form

    lr <- lr * (1 - beta * cos(g_t, Delta_{t-1}))

per parameter group, clamped to ``[min_lr, max_lr]``. ``Delta`` is measured from the weights
themselves, so the rule works unchanged for SGD, momentum, Adam, ... (For plateau-based decay use
``torch.optim.lr_scheduler.ReduceLROnPlateau``; it is not duplicated here.)
"""

from __future__ import annotations

import torch
from torch import Tensor


class HypergradientLR:
    """Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``.

    Args:
        optimizer: any optimizer whose param groups have an ``"lr"``.
        beta: hyper-learning rate (relative change of the lr per step, at most ``beta``).
        min_lr, max_lr: bounds of the adapted learning rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        beta: float = 0.02,
        min_lr: float = 1e-8,
        max_lr: float = 10.0,
    ) -> None:
        if not 0 < beta < 1:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        if not 0 < min_lr <= max_lr:
            raise ValueError(f"need 0 < min_lr <= max_lr, got {min_lr}, {max_lr}")
        for group in optimizer.param_groups:
            if "lr" not in group:
                raise ValueError(f"{type(optimizer).__name__} has a param group without an 'lr'")
        self.optimizer, self.beta, self.min_lr, self.max_lr = optimizer, beta, min_lr, max_lr
        self._previous: list[list[Tensor] | None] = [None] * len(optimizer.param_groups)
        self.history: list[float] = []

    def step(self) -> None:
        """Update each group's lr from its gradients and last update, then remember the weights."""
        for i, group in enumerate(self.optimizer.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            previous = self._previous[i]
            if previous is not None and len(previous) == len(params):
                g = torch.cat([p.grad.detach().flatten() for p in params])
                delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(params, previous)])
                cos = torch.nn.functional.cosine_similarity(g, delta, dim=0, eps=1e-12)
                group["lr"] = min(
                    self.max_lr, max(self.min_lr, group["lr"] * (1 - self.beta * float(cos)))
                )
            self._previous[i] = [p.detach().clone() for p in params]
        self.history.append(float(self.optimizer.param_groups[0]["lr"]))
