"""``ServedEncoder``: a sentence encoder and its tokenizer, shaped for the server's micro-batcher.

The encoder is :class:`pimoe.data.minilm.SentenceEncoder` (a Hugging Face encoder with
sentence-transformers pooling, loaded from a local folder, never from a hub), either as saved in
a Hugging Face folder (e.g. all-MiniLM-L6-v2) or compressed by ``pimoe compress`` (a folder with
``recipe.json``; the tokenizer comes from the recipe's source folder). The forward takes
right-padded token ids and their lengths, as :class:`~pimoe.infer.batching.MicroBatcher` passes
them (``fn(batch, lengths=lengths)``): attention and pooling are masked, so padding never changes
a text's embedding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pimoe.infer.batching import lengths_to_mask


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a Hugging Face model (a ``config.json``)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def is_compressed_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``pimoe compress`` (a ``recipe.json``)."""
    return Path(path).is_dir() and (Path(path) / "recipe.json").is_file()


class ServedEncoder(nn.Module):
    """Token ids ``[B, L]`` (right-padded) and ``lengths [B]`` -> sentence embeddings ``[B, D]``.

    Args:
        encoder: a module ``(input_ids [B, L], attention_mask [B, L]) -> [B, D]``, e.g.
            :class:`pimoe.data.minilm.SentenceEncoder` (float or compressed).
        tokenizer: its Hugging Face tokenizer (used by :meth:`encode_text`).
        max_length: longest accepted token sequence (the model's position limit).
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any, max_length: int = 512) -> None:
        super().__init__()
        self.encoder, self.tokenizer, self.max_length = encoder, tokenizer, max_length

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> ServedEncoder:
        """A Hugging Face encoder folder; ``ValueError`` if ``path`` is not one."""
        from pimoe.data.minilm import load_minilm

        if not is_hf_folder(path):
            raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
        try:
            minilm = load_minilm(Path(path))
        except OSError as err:  # transformers': config.json not JSON, weights missing, ...
            raise ValueError(f"{path}: not a loadable Hugging Face encoder folder ({err})") from err
        return cls(minilm.encoder, minilm.tokenizer, _max_positions(minilm.encoder))

    @classmethod
    def from_compressed(cls, path: str | os.PathLike[str]) -> ServedEncoder:
        """A ``pimoe compress`` folder whose source is a Hugging Face encoder folder."""
        from transformers import AutoTokenizer

        from pimoe.compress.saved import load_compressed, read_recipe

        recipe = read_recipe(Path(path))
        if recipe.get("kind") != "hf":
            raise ValueError(
                f"{path} holds a compressed {recipe.get('kind')!r} model, not a text encoder"
            )
        encoder = load_compressed(Path(path))
        tokenizer = AutoTokenizer.from_pretrained(recipe["source"], local_files_only=True)
        return cls(encoder, tokenizer, _max_positions(encoder))

    def encode_text(self, text: str) -> Tensor:
        """One text -> its token ids ``[L]`` (int64, with the model's special tokens).

        ``ValueError`` for an empty text or one longer than ``max_length`` tokens (never truncated).
        """
        if not text.strip():
            raise ValueError("text is empty")
        ids: list[int] = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_length:
            raise ValueError(
                f"text has {len(ids)} tokens; this model takes at most {self.max_length}"
            )
        return torch.tensor(ids, dtype=torch.long)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``input_ids [B, L]`` int64, ``lengths [B]`` (default: all ``L``) -> embeddings ``[B, D]``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        out: Tensor = self.encoder(input_ids, lengths_to_mask(lengths, input_ids.shape[1]).long())
        return out


def _max_positions(encoder: nn.Module) -> int:
    config = getattr(getattr(encoder, "model", None), "config", None)
    return int(getattr(config, "max_position_embeddings", 512))


__all__ = ["ServedEncoder", "is_compressed_folder", "is_hf_folder"]
