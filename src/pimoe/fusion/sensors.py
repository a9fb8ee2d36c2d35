"""Sensor fusion data from sklearn digits: every 8x8 image seen by two "sensors", the top half
(rows 0-3) and the bottom half (rows 4-7), each a sequence of 4 rows of 8 pixels, with optional
independent Gaussian sensor noise."""

from __future__ import annotations

import torch
from torch import Tensor


def digit_halves(
    noise_std: float = 0.0, test_fraction: float = 0.3, seed: int = 0
) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor]:
    """Seeded random split of the 1,797 digits into train and test:
    ``(train_views, train_y, test_views, test_y)`` with views ``{"top": [N, 4, 8], "bottom": [N, 4, 8]}``
    (pixels in [0, 1] plus noise) and labels ``[N]``."""
    from pimoe.data.digits import load_digits

    if noise_std < 0 or not 0 < test_fraction < 1:
        raise ValueError(
            f"need noise_std >= 0 and 0 < test_fraction < 1, got {noise_std}, {test_fraction}"
        )
    data = load_digits()
    images, labels = data.x.view(-1, 8, 8), data.y  # [N, 8, 8], [N]
    generator = torch.Generator().manual_seed(seed)
    images = images + noise_std * torch.randn(images.shape, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    cut = int(len(labels) * (1 - test_fraction))

    def views(idx: Tensor) -> dict[str, Tensor]:
        return {"top": images[idx, :4], "bottom": images[idx, 4:]}

    return views(order[:cut]), labels[order[:cut]], views(order[cut:]), labels[order[cut:]]
