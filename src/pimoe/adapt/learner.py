"""``AdaptiveLearning(config).adapt(model, (x, y))``: a few steps of fine-tuning from a (meta-)learned
initialization, on a copy of the model, optionally with a hypergradient-adapted learning rate."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pimoe.adapt.functional import LossFn, check_lr, check_pair, get_loss
from pimoe.adapt.lr import HypergradientLR


@dataclass
class AdaptConfig:
    """Settings of :class:`AdaptiveLearning`.

    Args:
        steps: full-batch optimizer steps on the new data.
        lr: (initial) learning rate; MAML's ``inner_lr`` for a MAML-trained model.
        optimizer: ``"sgd"`` (what MAML's inner loop does) or ``"adam"``.
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``loss(pred, target)``.
        hypergradient_beta: > 0 adapts the lr with :class:`HypergradientLR` (0: fixed lr).
    """

    steps: int = 10
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    loss: str | LossFn = "mse"
    hypergradient_beta: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"need steps >= 0, got {self.steps}")
        check_lr("lr", self.lr)
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected 'sgd' or 'adam'")
        get_loss(self.loss)


class AdaptiveLearning:
    """Adapts models to new data; the model passed in is never modified."""

    def __init__(self, config: AdaptConfig | None = None) -> None:
        self.config = config or AdaptConfig()

    def adapt(self, model: nn.Module, new_data: tuple[Tensor, Tensor]) -> nn.Module:
        """A copy of ``model`` after ``config.steps`` steps on ``new_data = (x [M, ...], y [M, ...])``."""
        if not isinstance(new_data, (tuple, list)) or len(new_data) != 2:
            raise TypeError("new_data must be a pair (x, y) of tensors")
        x, y = new_data
        check_pair(x, y)
        cfg = self.config
        adapted = copy.deepcopy(model).train()
        params = [p for p in adapted.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=cfg.lr)
            if cfg.optimizer == "sgd"
            else torch.optim.Adam(params, lr=cfg.lr)
        )
        controller = (
            HypergradientLR(optimizer, cfg.hypergradient_beta)
            if cfg.hypergradient_beta > 0
            else None
        )
        loss_fn = get_loss(cfg.loss)
        for _ in range(cfg.steps):
            optimizer.zero_grad()
            loss_fn(adapted(x), y).backward()
            if controller is not None:
                controller.step()
            optimizer.step()
        return adapted
