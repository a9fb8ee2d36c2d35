"""A key/value cache for autoregressive decoding with :class:`~pimoe.moe.model.PiMoELM`.

Each attention layer's keys and values of the tokens decoded so far are kept in preallocated
tensors ``[B, H, block_size, D/H]``, so a decoding step runs the model on the new tokens only.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of the first ``length`` positions of a batch, for every layer.

    Args:
        n_layer: attention layers.
        batch: ``B``.
        n_head: ``H``.
        head_dim: ``D / H``.
        max_len: positions the cache can hold (the model's ``block_size``).
        dtype, device: of the stored keys and values.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(n_layer, batch, n_head, head_dim, max_len) < 1:
            raise ValueError("KVCache sizes must all be >= 1")
        shape = (batch, n_head, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0  # positions written by every layer
        self.max_len, self.batch = max_len, batch

    def check_room(self, new: int, batch: int) -> None:
        """``ValueError`` unless ``new`` more positions of a batch of ``batch`` fit."""
        if batch != self.batch:
            raise ValueError(f"the cache holds a batch of {self.batch}, got {batch}")
        if self.length + new > self.max_len:
            raise ValueError(
                f"{self.length} cached + {new} new positions exceed max_len={self.max_len}"
            )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v [B, H, S, D/H]`` of the new positions of ``layer``; return the keys and
        values of all ``length + S`` positions."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new: int) -> None:
        """Mark ``new`` positions as written (after every layer has stored them)."""
        self.length += new
