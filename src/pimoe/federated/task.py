"""The federated task: what a run trains, as user code (the role of ``task.py`` in a Flower app).

A :class:`FederatedTask` says how to build the model, which data each client holds and how the
server evaluates the global model; the ClientApp and ServerApp stay the same for every task.
Flower's ``flwr new`` templates put the same four things in ``task.py`` (``Net``,
``load_data(partition_id, num_partitions)``, ``train``, ``test``)::

    from pimoe.data.digits import Split
    from pimoe.federated.task import FederatedTask

    class WineTask(FederatedTask):
        def build_model(self) -> nn.Module:            # any nn.Module
            return MyNet()
        def client_data(self, partition_id: int, num_partitions: int) -> Split:
            ...                                          # this client's (x [n, ...], y [n])
        def test_data(self) -> Split:
            ...                                          # the server's held-out set

    task = WineTask()       # pimoe federate --task mypackage.mytask:task

``loss`` (cross-entropy), ``train`` (SGD with momentum, optional FedProx term) and ``evaluate``
(loss, accuracy) have defaults for classification; override them for other objectives. The
built-in task is :class:`pimoe.federated.digits.DigitsTask` (``--task digits``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pimoe.data.digits import Split

__all__ = [
    "FederatedTask",
    "Split",
    "centralized_accuracy",
    "evaluate",
    "load_task",
    "proximal_term",
    "train_epochs",
]


def proximal_term(model: nn.Module, anchor: dict[str, Tensor]) -> Tensor:
    """FedProx's ``sum ||w - w_global||^2`` over the parameters named in ``anchor``."""
    terms = [(p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def train_epochs(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    loss_fn: Any = nn.functional.cross_entropy,
) -> float:
    """Train in place with ``loss_fn`` (+ ``mu/2 * ||w - w_start||^2`` when ``proximal_mu > 0``).

    ``optimizer`` defaults to SGD(lr, momentum 0.9); ``batches`` replaces the seeded shuffled
    mini-batches of ``data`` (``x [b, ...]``, ``y [b]``) for every epoch. Returns the mean loss
    of the last epoch.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty split")
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if proximal_mu > 0 else {}
    gen = torch.Generator().manual_seed(seed)
    model.train()
    last = 0.0
    for _ in range(epochs):
        losses = []
        order = torch.randperm(len(data), generator=gen).split(batch_size)
        epoch_batches = batches if batches is not None else ((data.x[i], data.y[i]) for i in order)
        for xb, yb in epoch_batches:
            loss = loss_fn(model(xb), yb)
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * proximal_term(model, anchor)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        last = float(np.mean(losses)) if losses else last
    return last


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Split, loss_fn: Any = nn.functional.cross_entropy
) -> tuple[float, float]:
    """(mean ``loss_fn``, accuracy of the arg-max class) of ``model`` on ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty split")
    model.eval()
    logits = model(data.x)
    return float(loss_fn(logits, data.y)), float((logits.argmax(1) == data.y).float().mean())


class FederatedTask(ABC):
    """A model and its data, split among clients (see the module docstring for an example)."""

    name: str = "task"

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (the runner seeds torch before calling this)."""

    @abstractmethod
    def client_data(self, partition_id: int, num_partitions: int) -> Split:
        """Client ``partition_id``'s training data (of ``num_partitions`` clients): ``x [n, ...]``, ``y [n]``."""

    @abstractmethod
    def test_data(self) -> Split:
        """The held-out data the server scores the global model on after every round."""

    def centralized_data(self, num_partitions: int) -> Split:
        """The pooled training data of the centralized peer (default: every client's data)."""
        parts = [self.client_data(i, num_partitions) for i in range(num_partitions)]
        return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The training loss, averaged over the batch (default: cross-entropy on logits ``[b, C]``)."""
        return nn.functional.cross_entropy(output, target)

    def train(
        self,
        model: nn.Module,
        data: Split,
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        seed: int,
        proximal_mu: float = 0.0,
    ) -> float:
        """Local training in place (default: SGD, momentum 0.9, seeded shuffles); returns the last epoch's loss."""
        return train_epochs(
            model,
            data,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            proximal_mu=proximal_mu,
            loss_fn=self.loss,
        )

    def evaluate(self, model: nn.Module, data: Split) -> tuple[float, float]:
        """``(loss, accuracy)`` of ``model`` on ``data``."""
        return evaluate(model, data, self.loss)

    def make_model(self, seed: int) -> nn.Module:
        """:meth:`build_model` after ``torch.manual_seed(seed)`` (same weights in every process)."""
        torch.manual_seed(seed)
        model = self.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.build_model() must return an nn.Module, got {type(model).__name__}"
            )
        return model


def centralized_accuracy(
    task: FederatedTask, num_partitions: int, epochs: int = 30, seed: int = 0
) -> float:
    """The peer of a federated run: the same model trained on the pooled training data (Adam 1e-3, batch 32)."""
    model = task.make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epochs(
        model,
        task.centralized_data(num_partitions),
        epochs=epochs,
        lr=1e-3,
        batch_size=32,
        seed=seed,
        optimizer=opt,
        loss_fn=task.loss,
    )
    return task.evaluate(model, task.test_data())[1]


def _import(spec: str) -> FederatedTask:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a task is 'digits' or 'module:attr', got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"task {spec!r}: cannot import module {module_name!r} ({err})") from err
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    task = (
        target()
        if isinstance(target, type) or (callable(target) and not isinstance(target, FederatedTask))
        else target
    )
    if not isinstance(task, FederatedTask):
        raise TypeError(
            f"task {spec!r} is a {type(task).__name__}, not a pimoe.federated.task.FederatedTask"
        )
    return task


@lru_cache(maxsize=16)
def load_task(cfg: Any) -> FederatedTask:
    """The task of a :class:`~pimoe.federated.config.FederatedConfig`: ``"digits"`` or ``"module:attr"``.

    ``attr`` names a :class:`FederatedTask` instance, or a class / factory called without
    arguments. One task object per config and process (cached). Raises ValueError / TypeError
    naming the problem.
    """
    if cfg.task == "digits":
        from pimoe.federated.digits import DigitsTask

        return DigitsTask(cfg.model, cfg.partition, cfg.alpha, cfg.seed)
    return _import(cfg.task)
