"""Byte-level text data: Python's own documentation, shipped with every CPython (no download)."""

from __future__ import annotations

import torch
from torch import Tensor


def load_pydoc_text() -> bytes:
    """The English help topics of ``pydoc_data.topics`` (about 465 KB of UTF-8), in sorted key
    order, separated by blank lines. It ships with Python, so the text is the same on every
    machine running the same Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def byte_splits(data: bytes, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """Split ``data`` into contiguous ``(train, val)`` long tensors of byte values in [0, 256);
    the last ``val_fraction`` of the bytes is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # [N]
    n_val = int(len(tokens) * val_fraction)
    if n_val < 2 or len(tokens) - n_val < 2:
        raise ValueError(
            f"{len(tokens)} bytes are too few to split with val_fraction={val_fraction}"
        )
    return tokens[:-n_val], tokens[-n_val:]


def get_batch(
    data: Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows of ``data [N]``: ``x [B, block_size]`` and the next-token targets ``y``
    (``x`` shifted by one). The window starts are drawn on the CPU with ``generator``, so a
    seeded generator gives the same batches on any device; ``x``/``y`` live on ``data``'s device."""
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens; need more than block_size={block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # [B]
    offsets = (starts[:, None] + torch.arange(block_size)).to(data.device)  # [B, block_size]
    return data[offsets], data[offsets + 1]
