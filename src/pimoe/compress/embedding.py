"""Quantized embeddings: packed int4 rows (pure torch) and a dispatcher for int8 (torch.ao) / int4.

Word embeddings are half of a small encoder's parameters (all-MiniLM-L6-v2: 11.7 M of 22.7 M), so
after int8 Linears they dominate the file. :class:`Int4Embedding` stores each row as 4-bit codes
packed two per byte plus one float16 scale per ``group_size`` values, and dequantizes only the rows
looked up.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pimoe.compress._modules import matches, set_module, tied_parameter_ids
from pimoe.compress.quantize import quantize_embedding_int8
from pimoe.compress.weight_only import pack_int4, unpack_int4


class Int4Embedding(nn.Module):
    """Embedding table with symmetric 4-bit codes in ``[-7, 7]`` and one scale per group of a row.

    Buffers: ``weight_packed [num_embeddings, embedding_dim / 2]`` uint8 (even index in the low
    nibble, codes offset by 8), ``scales [num_embeddings, embedding_dim / group_size]`` float16.
    ``forward(ids [...]) -> [..., embedding_dim]`` float32. ``padding_idx`` and ``max_norm`` of
    the source embedding are not kept (lookups only, no training).
    """

    weight_packed: Tensor
    scales: Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 16) -> None:
        super().__init__()
        if group_size < 2 or group_size % 2 or embedding_dim % group_size:
            raise ValueError(
                f"group_size must be even, >= 2 and divide embedding_dim={embedding_dim}, got {group_size}"
            )
        self.num_embeddings, self.embedding_dim, self.group_size = (
            num_embeddings,
            embedding_dim,
            group_size,
        )
        self.register_buffer(
            "weight_packed", torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8)
        )
        self.register_buffer(
            "scales", torch.ones(num_embeddings, embedding_dim // group_size, dtype=torch.float16)
        )

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group_size: int = 16) -> Int4Embedding:
        """Quantize ``embedding.weight`` row group by row group (round to nearest)."""
        weight = embedding.weight.detach().float()
        module = cls(embedding.num_embeddings, embedding.embedding_dim, group_size)
        groups = weight.reshape(embedding.num_embeddings, -1, group_size)  # [V, G, g]
        scales = (
            (groups.abs().amax(-1) / 7.0).to(torch.float16).float().clamp_min(1e-7)
        )  # [V, G], as stored
        codes = (groups / scales[..., None]).round().clamp(-7, 7).to(torch.int16) + 8
        with torch.no_grad():
            module.weight_packed.copy_(pack_int4(codes.reshape(embedding.num_embeddings, -1)))
            module.scales.copy_(scales.to(torch.float16))
        return module

    def forward(self, ids: Tensor) -> Tensor:
        codes = unpack_int4(F.embedding(ids, self.weight_packed)).float() - 8  # [..., D]
        scales = F.embedding(ids, self.scales).float()  # [..., G]
        groups = codes.reshape(*codes.shape[:-1], -1, self.group_size)  # [..., G, g]
        return (groups * scales[..., None]).flatten(-2)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


def quantize_embeddings(
    model: nn.Module,
    bits: int,
    patterns: Iterable[str] = ("*word_embeddings",),
    *,
    group_size: int = 16,
    skip: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """Quantize, in place, the ``nn.Embedding`` modules whose qualified name matches ``patterns``.

    Args:
        bits: 8 (torch.ao quantized embedding, per-row scale and zero point) or 4
            (:class:`Int4Embedding` with ``group_size``).
        patterns: ``fnmatch`` patterns of module names (default: BERT's word embeddings).
        skip: ``fnmatch`` patterns of module names to leave alone.

    Returns:
        ``(replaced names, skipped)``; a matching embedding whose weight is tied to another module
        (e.g. an LM head) is skipped with the reason, since replacing it would untie the weights.
    """
    if bits not in (4, 8):
        raise ValueError(f"embedding bits must be 4 or 8, got {bits}")
    patterns, skip = tuple(patterns), tuple(skip)
    tied = tied_parameter_ids(model)
    replaced, skipped = [], []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Embedding or not matches(name, patterns) or matches(name, skip):
            continue
        if id(module.weight) in tied:
            skipped.append(f"{name} (nn.Embedding): weight tied to another module")
            continue
        if bits == 8:
            quantize_embedding_int8(model, [name])
        else:
            set_module(model, name, Int4Embedding.from_embedding(module, group_size))
        replaced.append(name)
    return replaced, skipped
