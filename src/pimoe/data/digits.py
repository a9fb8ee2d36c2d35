"""sklearn's handwritten digits (1,797 8x8 images, shipped inside scikit-learn: no download).

One loader for every subsystem that trains on digits (federated learning, architecture search,
meta-learning, sensor fusion, DP-SGD): pixels scaled from 0..16 to [0, 1], float32, and a
stratified, seeded train/test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

NUM_CLASSES = 10
NUM_FEATURES = 64  # 8 x 8 pixels, row-major


@dataclass(frozen=True)
class Split:
    """Inputs ``x [N, ...]`` and targets ``y [N, ...]`` of ``N`` examples (digits: ``x [N, 64]``
    float32 in [0, 1], ``y [N]`` int64); also the data type of :mod:`pimoe.federated.task`."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim < 1 or self.y.ndim < 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"need x [N, ...] and y [N, ...] of the same N, got {tuple(self.x.shape)} and "
                f"{tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return len(self.y)


@lru_cache(maxsize=1)
def _arrays() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(data.target, dtype=torch.long)


def load_digits() -> Split:
    """All 1,797 digits: ``x [1797, 64]`` float32 in [0, 1] (row-major 8x8), ``y [1797]`` int64.

    The tensors are shared between calls: clone them before writing in place.
    """
    x, y = _arrays()
    return Split(x, y)


@lru_cache(maxsize=8)
def digits_split(test_size: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """``(train, test)``: a stratified split with ``test_size`` of the images held out, seeded.

    ``test_size=0.2`` gives 1,437 / 360 images (the federated and DP workloads); the
    architecture search uses ``0.25`` (1,347 / 450).
    """
    from sklearn.model_selection import train_test_split

    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    data = load_digits()
    idx = torch.arange(len(data))
    train_idx, test_idx = train_test_split(
        idx.numpy(), test_size=test_size, stratify=data.y.numpy(), random_state=seed
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Split(data.x[train_idx], data.y[train_idx]), Split(data.x[test_idx], data.y[test_idx])
