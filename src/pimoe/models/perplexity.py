"""Held-out perplexity of a Hugging Face causal LM on Python's bundled documentation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.data import load_pydoc_text
from pimoe.models.progress import track


def pydoc_token_splits(tokenizer: object, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """``pydoc_data.topics`` (see :func:`pimoe.data.load_pydoc_text`) tokenized with ``tokenizer``
    as ``(train [N], heldout [M])`` long tensors: the last ``val_fraction`` of the tokens is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = torch.tensor(tokenizer(load_pydoc_text().decode("utf-8"))["input_ids"], dtype=torch.long)  # type: ignore[operator]
    n_val = int(len(ids) * val_fraction)
    return ids[:-n_val], ids[-n_val:]


def windows(ids: Tensor, length: int, count: int) -> Tensor:
    """The first ``count`` contiguous, non-overlapping windows of ``length`` tokens of ``ids [N]``:
    ``[count, length]``."""
    if length < 2 or count < 1 or count * length > len(ids):
        raise ValueError(f"{count} windows of {length} tokens do not fit in {len(ids)} tokens")
    return ids[: count * length].view(count, length)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    batch: Tensor,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model`` over ``batch [B, S]`` (each window
    scored on its own; ``B * (S - 1)`` predictions)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in track(range(0, len(batch), batch_size), desc, enabled=progress):
        ids = batch[start : start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()  # [b, S-1, V]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)
