"""``SentenceEncoder``: a Hugging Face encoder folder (e.g. all-MiniLM-L6-v2) as a served text model.

It loads the tokenizer and model with ``transformers`` from a local folder (never from a hub) and
pools like sentence-transformers: the folder's ``1_Pooling/config.json`` picks mean or CLS
pooling (mean when absent), and ``modules.json`` listing a ``Normalize`` module L2-normalizes the
embeddings. Its forward takes right-padded token ids and their lengths, so it fits the
:class:`~pimoe.infer.batching.MicroBatcher` (``fn(batch, lengths=lengths)``): padding never
changes a sentence's embedding because attention and pooling are masked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from pimoe.infer.batching import lengths_to_mask


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a Hugging Face model (a ``config.json``)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


class SentenceEncoder(nn.Module):
    """Token ids ``[B, L]`` (right-padded) and ``lengths [B]`` -> sentence embeddings ``[B, D]``.

    Args:
        model: a transformers encoder (``AutoModel``) returning ``last_hidden_state [B, L, D]``.
        tokenizer: its tokenizer (used by :meth:`encode_text`).
        pooling: "mean" (average of the real positions) or "cls" (the first position).
        normalize: L2-normalize the pooled embeddings.
        max_length: longest accepted token sequence (the model's position limit).
    """

    def __init__(self, model: nn.Module, tokenizer: object, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 512) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> SentenceEncoder:
        """Load a local HF folder (``config.json``, weights, tokenizer files); ``ValueError`` if it is not one."""
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path)
        if not is_hf_folder(folder):
            raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        pooling, normalize = "mean", False
        pool_cfg = folder / "1_Pooling" / "config.json"
        if pool_cfg.is_file():
            pooling = "cls" if json.loads(pool_cfg.read_text()).get("pooling_mode_cls_token") else "mean"
        modules = folder / "modules.json"
        if modules.is_file():
            normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
        max_length = int(getattr(model.config, "max_position_embeddings", 512))
        return cls(model, tokenizer, pooling, normalize, max_length)

    def encode_text(self, text: str) -> Tensor:
        """One text -> its token ids ``[L]`` (int64, with the model's special tokens).

        ``ValueError`` for an empty text or one longer than ``max_length`` tokens (never truncated).
        """
        if not text.strip():
            raise ValueError("text is empty")
        ids: list[int] = self.tokenizer(text, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
        if len(ids) > self.max_length:
            raise ValueError(f"text has {len(ids)} tokens; this model takes at most {self.max_length}")
        return torch.tensor(ids, dtype=torch.long)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``input_ids [B, L]`` int64, ``lengths [B]`` (default: all ``L``) -> embeddings ``[B, D]``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        mask = lengths_to_mask(lengths, input_ids.shape[1])  # [B, L]
        hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # [B, L, D]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


__all__ = ["SentenceEncoder", "is_hf_folder"]
