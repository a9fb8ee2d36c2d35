"""Few-shot tasks: the MAML paper's sinusoid regression and N-way K-shot episodes on sklearn digits.

A :class:`Task` holds a support set (what the learner adapts on) and a query set (what it is
scored on). A batch of tasks is the same tuple with a leading task dimension ``N``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Task(NamedTuple):
    """Support and query sets; one task (``[K, ...]``) or a batch of tasks (``[N, K, ...]``)."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def task(self, i: int) -> Task:
        """Task ``i`` of a batch."""
        return Task(*(t[i] for t in self))


class SinusoidTasks:
    """Finn et al. 2017, Sec. 5.1: ``y = A sin(x - phase)``, ``A`` ~ U[0.1, 5], ``phase`` ~ U[0, pi],
    ``x`` ~ U[-5, 5]. Inputs and targets are ``[..., 1]`` float32."""

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        seed: int = 0,
    ) -> None:
        for name, (lo, hi) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(lo, hi)}")
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
        return torch.rand(shape, generator=self.generator) * (hi - lo) + lo

    def sample(self, num_tasks: int, k_support: int, k_query: int) -> Task:
        """``num_tasks`` random sinusoids, each with ``k_support`` and ``k_query`` random points:
        ``support_x [N, K, 1]`` etc."""
        if num_tasks < 1 or k_support < 1 or k_query < 1:
            raise ValueError(
                f"need num_tasks, k_support, k_query >= 1, got {num_tasks, k_support, k_query}"
            )
        amp = self._uniform((num_tasks, 1, 1), *self.amplitude)
        phase = self._uniform((num_tasks, 1, 1), *self.phase)
        xs = self._uniform((num_tasks, k_support, 1), *self.x_range)
        xq = self._uniform((num_tasks, k_query, 1), *self.x_range)
        return Task(xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase))

    def sample_points(self, num_points: int) -> tuple[Tensor, Tensor]:
        """``num_points`` points, each from its own random sinusoid (the "pretrained on all tasks"
        baseline's training data): ``x [P, 1]``, ``y [P, 1]``."""
        task = self.sample(num_points, 1, 1)
        return task.support_x[:, 0], task.support_y[:, 0]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """sklearn's 1,797 8x8 digits: ``x [1797, 64]`` float32 in [0, 1] (row-major 8x8), ``y [1797]`` long
    (:func:`pimoe.data.digits.load_digits`)."""
    from pimoe.data.digits import load_digits

    data = load_digits()
    return data.x, data.y


class DigitsEpisodes:
    """N-way K-shot episodes on sklearn digits, classes split into meta-train and meta-test.

    Each episode draws ``n_way`` classes of ``classes``, relabels them 0..n_way-1 in random order,
    and draws ``k_shot`` support and ``queries`` query images per class (disjoint):
    ``support_x [n_way * k_shot, 64]``, ``support_y [n_way * k_shot]``, ``query_x [n_way * queries, 64]``.

    ``rotations=True`` makes each digit rotated by 0, 90, 180 and 270 degrees a class of its own
    (4x the classes, the Omniglot augmentation of Santoro et al. 2016 / Vinyals et al. 2016): with
    only five meta-train digits, episodes otherwise always show the same five classes.
    """

    def __init__(
        self,
        classes: list[int],
        n_way: int = 5,
        k_shot: int = 1,
        queries: int = 15,
        seed: int = 0,
        data: tuple[Tensor, Tensor] | None = None,
        rotations: bool = False,
    ) -> None:
        available = len(classes) * (4 if rotations else 1)
        if n_way < 2 or n_way > available:
            raise ValueError(
                f"n_way must be in [2, {available}] for classes {classes}, got {n_way}"
            )
        if k_shot < 1 or queries < 1:
            raise ValueError(f"k_shot and queries must be >= 1, got {k_shot}, {queries}")
        x, y = data if data is not None else load_digits_tensors()
        images = x.view(-1, 8, 8)
        turns = range(4) if rotations else range(1)
        self.by_class = {
            (c, k): torch.rot90(images[y == c], k, (1, 2)).reshape(-1, 64)
            for c in classes
            for k in turns
        }
        for c, rows in self.by_class.items():
            if len(rows) < k_shot + queries:
                raise ValueError(
                    f"class {c} has {len(rows)} images, fewer than k_shot + queries = {k_shot + queries}"
                )
        self.classes, self.n_way, self.k_shot, self.queries = (
            list(self.by_class),
            n_way,
            k_shot,
            queries,
        )
        self.rng = np.random.default_rng(seed)

    def sample(self) -> Task:
        """One episode."""
        chosen = self.rng.choice(len(self.classes), size=self.n_way, replace=False)
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(chosen):
            rows = self.by_class[self.classes[int(c)]]
            pick = torch.from_numpy(self.rng.permutation(len(rows))[: self.k_shot + self.queries])
            sx.append(rows[pick[: self.k_shot]])
            qx.append(rows[pick[self.k_shot :]])
            sy.append(torch.full((self.k_shot,), label))
            qy.append(torch.full((self.queries,), label))
        return Task(torch.cat(sx), torch.cat(sy), torch.cat(qx), torch.cat(qy))

    def sample_batch(self, num_tasks: int) -> Task:
        """``num_tasks`` episodes stacked: ``support_x [N, n_way * k_shot, 64]`` etc."""
        episodes = [self.sample() for _ in range(num_tasks)]
        return Task(*(torch.stack(parts) for parts in zip(*episodes)))
