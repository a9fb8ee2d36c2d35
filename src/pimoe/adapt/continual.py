"""Continual learning: Elastic Weight Consolidation (Kirkpatrick et al. 2017) and experience replay.

EWC adds ``lam / 2 * sum_i F_i (theta_i - theta*_i)^2`` to the loss of each later task, where
``theta*`` are the weights after the earlier task and ``F`` is the diagonal of the empirical Fisher
information on its data (mean of squared per-sample gradients of the loss). Replay mixes a
reservoir sample of earlier examples into each later batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from pimoe.adapt.functional import LossFn, Params, check_pair, get_loss, run, trainable_params


def fisher_diagonal(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: str | LossFn = "cross_entropy",
    *,
    chunk_size: int = 256,
    vectorize: bool = True,
) -> Params:
    """Diagonal empirical Fisher: mean over the ``M`` samples of ``x [M, ...]``, ``y [M, ...]`` of
    the squared per-sample gradient. ``vectorize`` computes per-sample gradients with
    ``vmap(grad)`` (modules vmap can trace); otherwise one backward pass per sample (any module)."""
    check_pair(x, y)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    loss_fn = get_loss(loss)
    params = {n: p.detach() for n, p in trainable_params(model).items()}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}

    def sample_loss(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(run(model, p, xi.unsqueeze(0)), yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    for start in range(0, x.shape[0], chunk_size):
        xs, ys = x[start : start + chunk_size], y[start : start + chunk_size]
        if vectorize:
            grads = per_sample(params, xs, ys)
            for n in fisher:
                fisher[n] += grads[n].pow(2).sum(0)
            continue
        for xi, yi in zip(xs, ys):
            g = grad(sample_loss)(params, xi, yi)
            for n in fisher:
                fisher[n] += g[n].pow(2)
    return {n: f / x.shape[0] for n, f in fisher.items()}


class EWC:
    """EWC penalty anchored at ``model``'s current weights, Fisher from ``(x, y)``.

    Call :meth:`consolidate` again after each further task: Fishers add up, the anchor moves to the
    latest weights (the "online EWC" of Schwarz et al. 2018 with ``gamma = 1``).
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        lam: float,
        loss: str | LossFn = "cross_entropy",
        vectorize: bool = True,
    ) -> None:
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        self.lam, self.loss, self.vectorize = lam, loss, vectorize
        self.fisher: Params = {}
        self.anchor: Params = {}
        self.consolidate(model, x, y)

    def consolidate(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        """Add the Fisher of ``(x, y)`` at the current weights and re-anchor there."""
        new = fisher_diagonal(model, x, y, self.loss, vectorize=self.vectorize)
        self.fisher = {n: self.fisher.get(n, 0) + f for n, f in new.items()}
        self.anchor = {n: p.detach().clone() for n, p in trainable_params(model).items()}

    def penalty(self, model: nn.Module) -> Tensor:
        """Scalar ``lam / 2 * sum F (theta - theta*)^2`` with gradients to ``model``."""
        params = trainable_params(model)
        if params.keys() != self.anchor.keys():
            raise ValueError("model parameters do not match the ones EWC was consolidated on")
        for n, p in params.items():
            if p.shape != self.anchor[n].shape:
                raise ValueError(
                    f"parameter {n!r} has shape {tuple(p.shape)}, EWC was consolidated on "
                    f"{tuple(self.anchor[n].shape)}"
                )
        terms = [(self.fisher[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in params.items()]
        return 0.5 * self.lam * torch.stack(terms).sum()


class ReplayBuffer:
    """Reservoir sample (Vitter's algorithm R) of at most ``capacity`` examples ``(x_i, y_i)``:
    every example seen so far is kept with equal probability."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.seen = capacity, 0
        self.x: list[Tensor] = []
        self.y: list[Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.x)

    def add(self, x: Tensor, y: Tensor) -> None:
        """Offer a batch ``x [M, ...]``, ``y [M, ...]``."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
        for xi, yi in zip(x, y):
            self.seen += 1
            if len(self.x) < self.capacity:
                self.x.append(xi.detach().clone())
                self.y.append(yi.detach().clone())
                continue
            j = int(torch.randint(self.seen, (1,), generator=self.generator))
            if j < self.capacity:
                self.x[j], self.y[j] = xi.detach().clone(), yi.detach().clone()

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` stored examples drawn with replacement: ``x [n, ...]``, ``y [n, ...]``."""
        if not self.x:
            raise ValueError("the replay buffer is empty")
        idx = torch.randint(len(self.x), (n,), generator=self.generator).tolist()
        return torch.stack([self.x[i] for i in idx]), torch.stack([self.y[i] for i in idx])


def task_incremental_loss(logits: Tensor, y: Tensor, classes_per_task: int) -> Tensor:
    """Cross-entropy where each example only competes with the classes of its own task
    (task-incremental learning with one logit group per task; task of class ``c`` is
    ``c // classes_per_task``): ``logits [M, C]``, ``y [M]``."""
    group = y // classes_per_task
    cls = torch.arange(logits.shape[-1], device=logits.device) // classes_per_task
    masked = logits.masked_fill(cls.unsqueeze(0) != group.unsqueeze(1), float("-inf"))
    return F.cross_entropy(masked, y)


def minibatches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled epoch of ``(x, y)`` in batches of ``batch_size``."""
    order = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def train_task(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss: str | LossFn = "cross_entropy",
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 32,
    ewc: EWC | None = None,
    replay: ReplayBuffer | None = None,
    seed: int = 0,
) -> float:
    """Train ``model`` on one task with Adam; with ``ewc`` its penalty is added, with ``replay``
    each batch is doubled with as many replayed examples (and the task's data is added to the
    buffer afterwards). Returns the last batch's loss."""
    loss_fn = get_loss(loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    last = float("nan")
    for _ in range(epochs):
        for xb, yb in minibatches(x, y, batch_size, generator):
            if replay is not None and len(replay):
                rx, ry = replay.sample(xb.shape[0])
                xb, yb = torch.cat([xb, rx]), torch.cat([yb, ry])
            total = loss_fn(model(xb), yb)
            if ewc is not None:
                total = total + ewc.penalty(model)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            last = float(total.detach())
    if replay is not None:
        replay.add(x, y)
    return last
