"""A byte-level :class:`PiMoELM` behind the text-generation engine, its sequences batched.

:meth:`PiMoELM.forward` gives every row of a batch the same length, so the engine's rows (each at
its own length) cannot share its cached forward. Here newly admitted prompts are prefilled
together through the model's own forward (grouped by length, right-padded: causal attention and
dropless token-choice routing make the padding invisible to the real positions), and a decode
step runs all rows in one pass over the model's modules with each row's own position (embedding,
a mask over its own keys in a :class:`~pimoe.infer.decode_batch.SlotCache`, and the positions a
PiMoE layer hands to position-aware experts, as in a batch-1 cached decode). Greedy outputs equal
:meth:`PiMoELM.generate`'s.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from pimoe.infer.decode_batch import (
    DecodeBatch,
    GenerationModel,
    PartialPrefill,
    SlotBatch,
    SlotCache,
    length_groups,
)
from pimoe.moe.layer import PiMoE
from pimoe.moe.model import Block, PiMoELM


class _PiMoEBatch(SlotBatch):
    def __init__(self, model: PiMoELM, max_rows: int) -> None:
        c = model.config
        weight = model.tok_emb.weight
        self.model = model
        self.cache = SlotCache(
            c.n_layer,
            max_rows,
            c.n_head,
            c.d_model // c.n_head,
            c.block_size,
            weight.dtype,
            weight.device,
        )

    @torch.inference_mode()
    def add(self, prompts: list[list[int]]) -> Tensor:
        device = self.model.tok_emb.weight.device
        pending: list[tuple[list[Tensor], list[Tensor], int, int] | None] = [None] * len(prompts)
        logits: list[Tensor | None] = [None] * len(prompts)
        for group in length_groups([len(p) for p in prompts]):
            longest = max(len(prompts[i]) for i in group)
            ids = torch.zeros((len(group), longest), dtype=torch.long)
            for j, i in enumerate(group):
                ids[j, : len(prompts[i])] = torch.tensor(prompts[i])
            kv = self.model.new_cache(len(group))
            out = self.model(ids.to(device), cache=kv).logits  # [n, longest, V]
            for j, i in enumerate(group):
                pending[i] = (kv.keys, kv.values, j, len(prompts[i]))
                logits[i] = out[j, len(prompts[i]) - 1]
        for item in pending:
            assert item is not None
            keys, values, j, length = item
            self.cache.put_row(keys, values, j, 0, length)
        return torch.stack([t for t in logits if t is not None])

    def forward_chunk(
        self, prefill: PartialPrefill, ids: list[int]
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        if prefill.cache is None:
            prefill.cache = self.model.new_cache(1)
        kv = prefill.cache
        chunk = torch.tensor([ids], device=self.model.tok_emb.weight.device)
        logits: Tensor = self.model(chunk, cache=kv).logits[0, -1]  # positions kv.length...
        return kv.keys, kv.values, logits

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> Tensor:
        model, cache = self.model, self.cache
        visible = cache.begin_step()[:, None, None, :]  # [rows, 1, 1, end]
        positions = cache.lengths[:, None]  # [rows, 1]: each row's new position
        ids = torch.tensor(tokens, device=positions.device)[:, None]
        x = model.tok_emb(ids) + model.pos_emb(positions)  # [rows, 1, D]
        rows, _, d = x.shape
        for layer, module in enumerate(model.blocks):
            block = cast(Block, module)
            attn = block.attn
            q, k, v = (
                t.view(rows, 1, attn.n_head, d // attn.n_head).transpose(1, 2)
                for t in attn.qkv(block.norm1(x)).split(d, dim=2)
            )  # each [rows, H, 1, D/H]
            keys, values = cache.update(k, v, layer)  # [rows, H, end, D/H]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
            x = x + attn.proj(y.transpose(1, 2).reshape(rows, 1, d))
            h = block.norm2(x)
            x = x + (block.ffn(h, positions) if isinstance(block.ffn, PiMoE) else block.ffn(h))
        cache.end_step()
        logits: Tensor = model.lm_head(model.norm_f(x))[:, -1]
        return logits


class PiMoEGenerationModel(GenerationModel):
    """A byte-level :class:`PiMoELM`: prompts are UTF-8 bytes, completions are decoded as UTF-8
    (invalid bytes become U+FFFD); chat messages are joined as ``"role: content\\n"`` lines
    followed by ``"assistant: "``. It has no end-of-sequence token."""

    eos_ids: frozenset[int] = frozenset()
    vocab_size = 256
    chunked_prefill = True

    def __init__(self, model: PiMoELM) -> None:
        if model.config.vocab_size != 256:
            raise ValueError(
                f"a PiMoELM served for text must be byte-level (vocab_size 256), got {model.config.vocab_size}"
            )
        if not model.can_cache:
            raise ValueError(
                "this PiMoELM routes across positions (capacity or expert choice), so it cannot decode "
                "with a KV cache"
            )
        model.eval()
        self.model = model
        self.context_length = model.config.block_size

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(
            "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        )

    def new_batch(self, max_rows: int) -> DecodeBatch:
        return _PiMoEBatch(self.model, max_rows)


__all__ = ["PiMoEGenerationModel"]
