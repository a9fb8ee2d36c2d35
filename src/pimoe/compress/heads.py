"""Structured attention-head pruning: smaller Q/K/V and output projections, not masks.

Supported attention modules:
- ``nn.MultiheadAttention`` (self- or cross-attention, ``batch_first`` either way, no
  ``add_bias_kv`` / ``add_zero_attn``): replaced by :class:`PrunedMultiheadAttention`, which keeps
  the same ``forward`` signature and returns ``(output, weights or None)``;
- Hugging Face BERT-style attention (a module with ``.self.query/key/value`` Linears and
  ``.output.dense``, e.g. ``BertAttention``): the four Linears are sliced in place and
  ``num_attention_heads`` / ``all_head_size`` updated (transformers' attention reshapes with ``-1``
  heads, so the module runs unchanged).

Importance is data-free, so a saved model's structure can be rebuilt from the source weights: head
``h`` scores ``||W_v[rows of h]||_F * ||W_o[:, columns of h]||_F``, the same bound as
:func:`~pimoe.compress.prune.neuron_scores` (0 when the head's output columns are 0). Query and key
weights are not scored (they only decide where a head looks, not how much it can write).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from pimoe.compress._modules import matches, set_module
from pimoe.compress.prune import _sliced_linear


def head_scores(value_weight: Tensor, out_weight: Tensor, num_heads: int) -> Tensor:
    """``[H]`` importance of each head: ``value_weight [H*d, E_in]``, ``out_weight [E_out, H*d]``."""
    incoming = value_weight.detach().float().reshape(num_heads, -1).square().sum(1)
    outgoing = (
        out_weight.detach().float().reshape(out_weight.shape[0], num_heads, -1).square().sum((0, 2))
    )
    return (incoming * outgoing).sqrt()


def heads_to_keep(scores: Tensor, amount: float) -> Tensor:
    """Sorted indices of the heads kept when the ``round(amount * H)`` lowest-scored go (>= 1 kept)."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    count = max(1, scores.numel() - round(amount * scores.numel()))
    return scores.topk(count).indices.sort().values


def _head_rows(keep: Tensor, head_dim: int) -> Tensor:
    return (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads * head_dim`` decoupled from ``embed_dim``.

    ``q_proj/k_proj/v_proj: E -> H*d``, ``out_proj: H*d -> E``. ``forward`` follows
    ``nn.MultiheadAttention``: inputs ``[B, T, E]`` (``batch_first``) or ``[T, B, E]``;
    ``key_padding_mask [B, S]`` and ``attn_mask [T, S]`` / ``[B*H, T, S]`` are boolean (True = not
    allowed) or additive float; returns ``(output, weights)`` with ``weights [B, T, S]`` (averaged
    over heads) or ``[B, H, T, S]``, or ``None`` when ``need_weights=False``. Eval only (no dropout).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        kdim: int,
        vdim: int,
        bias: bool = True,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim, self.batch_first = (
            embed_dim,
            num_heads,
            head_dim,
            batch_first,
        )
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, keep: Tensor) -> PrunedMultiheadAttention:
        """The heads ``keep`` of ``mha`` (sorted indices), with their weights copied."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn attention is not supported")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, len(keep), mha.head_dim, mha.kdim, mha.vdim, bias, mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (
                mha.q_proj_weight.detach(),
                mha.k_proj_weight.detach(),
                mha.v_proj_weight.detach(),
            )
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        rows = _head_rows(keep, mha.head_dim)
        with torch.no_grad():
            for proj, weight, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(weight[rows])
                if b is not None:
                    proj.bias.copy_(b[rows])
            new.out_proj.weight.copy_(mha.out_proj.weight.detach()[:, rows])
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        return new.to(mha.out_proj.weight.dtype)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (b, t, _), s = query.shape, key.shape[1]

        def heads(x: Tensor) -> Tensor:  # [B, L, H*d] -> [B, H, L, d]
            return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) / self.head_dim**0.5  # [B, H, T, S]
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1)
        for mask, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, s))):
            if mask is None:
                continue
            if shape is None:
                mask = mask.reshape(b, self.num_heads, t, s) if mask.dim() == 3 else mask
            else:
                mask = mask.reshape(shape)
            scores = (
                scores.masked_fill(mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask
            )
        weights = scores.softmax(-1)
        out = self.out_proj((weights @ v).transpose(1, 2).flatten(2))  # [B, T, E]
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def _is_hf_attention(module: nn.Module) -> bool:
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    return (
        isinstance(inner, nn.Module)
        and all(type(getattr(inner, n, None)) is nn.Linear for n in ("query", "key", "value"))
        and hasattr(inner, "attention_head_size")
        and type(getattr(output, "dense", None)) is nn.Linear
    )


def _prune_hf(module: Any, amount: float) -> list[int]:
    """Slice a Hugging Face BERT-style attention (``module.self`` / ``module.output``) in place."""
    inner, dense = module.self, module.output.dense
    size = inner.attention_head_size
    keep = heads_to_keep(
        head_scores(inner.value.weight, dense.weight, inner.value.out_features // size), amount
    )
    rows = _head_rows(keep, size)
    for name in ("query", "key", "value"):
        setattr(inner, name, _sliced_linear(getattr(inner, name), rows, None))
    module.output.dense = _sliced_linear(dense, None, rows)
    inner.num_attention_heads = len(keep)
    inner.all_head_size = len(keep) * size
    return [int(h) for h in keep.tolist()]


def prune_attention_heads(
    model: nn.Module, amount: float, *, skip: Iterable[str] = ()
) -> dict[str, list[int]]:
    """Remove the ``round(amount * H)`` least important heads of every supported attention, in place.

    Returns:
        ``{qualified name: kept head indices}`` for each pruned attention module.

    Raises:
        ValueError: ``amount`` outside ``[0, 1)``.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    skip = tuple(skip)
    kept: dict[str, list[int]] = {}
    for name, module in list(model.named_modules()):
        if matches(name, skip):
            continue
        if type(module) is nn.MultiheadAttention:
            out_weight = module.out_proj.weight
            value_weight = (
                module.in_proj_weight.chunk(3)[2]
                if module._qkv_same_embed_dim
                else module.v_proj_weight
            )
            keep = heads_to_keep(head_scores(value_weight, out_weight, module.num_heads), amount)
            set_module(model, name, PrunedMultiheadAttention.from_mha(module, keep))
            kept[name] = keep.tolist()
        elif _is_hf_attention(module):
            kept[name] = _prune_hf(module, amount)
    return kept


__all__ = ["PrunedMultiheadAttention", "head_scores", "heads_to_keep", "prune_attention_heads"]
