"""A small decoder-only PiMoE transformer language model (in the spirit of nanoGPT's model.py).

Every ``moe_every``-th block has a :class:`PiMoE` feed-forward layer, the others a dense
:class:`SwiGLU`. :meth:`LMConfig.dense_twin` gives the all-dense model with the same active
parameters per token, the peer an MoE model should be compared with.
Shapes: ``B`` batch, ``S`` sequence, ``D`` model width, ``H`` heads, ``V`` vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from pimoe.io import atomic_output, check_safetensors_shapes, read_safetensors_header, tensor_digest
from pimoe.moe.experts import SwiGLU
from pimoe.moe.kv_cache import KVCache
from pimoe.moe.layer import PiMoE
from pimoe.moe.lm_config import LMConfig, LMOutput
from pimoe.moe.stats import RoutingStats

_CONFIG_KEY = "pimoe.LMConfig"
_DIGEST_KEY = "pimoe.sha256"

__all__ = ["Block", "CausalSelfAttention", "LMConfig", "LMOutput", "PiMoELM"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with PyTorch's fused scaled-dot-product attention."""

    def __init__(self, config: LMConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head, self.dropout, self.layer = config.n_head, config.dropout, layer
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:  # [B, S, D] -> [B, S, D]
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # each [B, S, D]
        q, k, v = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)  # [B, H, past + S, D/H]
            if past and S > 1:  # new query i sees the past and new keys up to its own position
                mask = (
                    torch.arange(past + S, device=x.device)
                    <= past + torch.arange(S, device=x.device)[:, None]
                )
            causal = past == 0
        y = F.scaled_dot_product_attention(  # [B, H, S, D/H]
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None and S > 1,
        )
        y = y.transpose(1, 2).contiguous().view(B, S, D)
        out: Tensor = self.resid_dropout(self.proj(y))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: LMConfig, moe: bool, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = nn.RMSNorm(config.d_model)
        self.ffn: nn.Module = (
            PiMoE(config.d_model, config.moe) if moe else SwiGLU(config.d_model, config.dense_width)
        )
        self.ffn_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cache: KVCache | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """``x [B, S, D]`` -> ``[B, S, D]``; ``positions [B, S]`` go to a PiMoE feed-forward layer."""
        x = x + self.attn(self.norm1(x), cache)
        h = self.norm2(x)
        ffn_out: Tensor = self.ffn(h, positions) if isinstance(self.ffn, PiMoE) else self.ffn(h)
        dropped: Tensor = self.ffn_dropout(ffn_out)
        return x + dropped


class PiMoELM(nn.Module):
    """Decoder-only transformer LM with token + learned position embeddings and a tied head."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, config.is_moe(i), i) for i in range(config.n_layer)
        )
        self.norm_f = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for matrices (experts included), residual outputs scaled by
        ``1/sqrt(2 * n_layer)``; norms stay at 1. MoE and dense models get the same recipe."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    residual = name.endswith(("proj.weight", "down.weight", "w_out"))
                    p.normal_(0.0, residual_std if residual else 0.02)

    @property
    def moe_layers(self) -> list[PiMoE]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, PiMoE)]

    def _check_input(self, idx: Tensor, targets: Tensor | None) -> None:
        if idx.dtype != torch.long:
            raise TypeError(f"idx must be a torch.long tensor of token ids, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, S], got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size={self.config.block_size}"
            )
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        if targets is not None and (targets.dtype != torch.long or targets.shape != idx.shape):
            raise ValueError(
                f"targets must be torch.long of shape {tuple(idx.shape)}, got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> LMOutput:
        """``idx [B, S]`` long token ids, optional ``targets [B, S]`` -> :class:`LMOutput`.

        With a ``cache`` (:meth:`new_cache`), ``idx`` are the tokens after the ``cache.length``
        cached ones: they get positions ``cache.length ...`` and are appended to the cache.
        """
        self._check_input(idx, targets)
        B, S = idx.shape
        past = 0 if cache is None else cache.length
        if cache is not None:
            cache.check_room(S, B)
        pos = torch.arange(past, past + S, device=idx.device)  # [S]
        # The PiMoE layers see positions into the whole context [B, past + S], flattened.
        positions = (
            None if not past else torch.arange(B, device=idx.device)[:, None] * (past + S) + pos
        )
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B, S, D]
        for block in self.blocks:
            x = block(x, cache, positions)
        if cache is not None:
            cache.advance(S)
        logits = self.lm_head(self.norm_f(x))  # [B, S, V]
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = sum((layer.aux_loss for layer in self.moe_layers), zero)
        z_loss = sum((layer.z_loss for layer in self.moe_layers), zero)
        if targets is None:
            return LMOutput(logits, None, None, aux_loss, z_loss)
        ce_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        moe = self.config.moe
        loss = ce_loss + moe.aux_loss_coef * aux_loss + moe.z_loss_coef * z_loss
        return LMOutput(logits, loss, ce_loss, aux_loss, z_loss)

    def new_cache(self, batch: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences, in the model's dtype and device."""
        weight = self.tok_emb.weight
        c = self.config
        return KVCache(
            c.n_layer,
            batch,
            c.n_head,
            c.d_model // c.n_head,
            c.block_size,
            weight.dtype,
            weight.device,
        )

    @property
    def can_cache(self) -> bool:
        """Whether decoding with a KV cache gives the uncached results: every MoE layer routes
        each token on its own (dropless token choice). Capacity limits and expert-choice
        routing look at the whole batch of positions, so they are not causal."""
        return all(
            layer.config.routing == "token_choice" and layer.config.capacity_factor is None
            for layer in self.moe_layers
        )

    def extend(self, idx: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache | None]:
        """Logits of ``idx``'s last position, reusing ``cache`` (which must hold a prefix of
        ``idx [B, S]``, or be None) -> ``(logits [B, V], cache)``.

        Only the positions after the cached prefix are computed. Past ``block_size`` the
        context is cropped to its last ``block_size`` tokens, as without a cache: that changes
        every position, so the window is recomputed (and cached again). Without
        :attr:`can_cache` it always runs uncached and returns ``None``.
        """
        block = self.config.block_size
        if not self.can_cache:
            return self(idx[:, -block:]).logits[:, -1], None
        if cache is None or idx.shape[1] > block or cache.length >= idx.shape[1]:
            cache = self.new_cache(idx.shape[0])
            return self(idx[:, -block:], cache=cache).logits[:, -1], cache
        return self(idx[:, cache.length :], cache=cache).logits[:, -1], cache

    def routing_stats(self) -> list[RoutingStats]:
        """Per MoE layer, the :class:`RoutingStats` of the last forward call."""
        stats = [layer.last_stats for layer in self.moe_layers]
        if any(s is None for s in stats):
            raise RuntimeError("no routing stats yet: run a forward pass with at least one token")
        return [s for s in stats if s is not None]

    def num_params(self, active: bool = False) -> int:
        """Parameter count (the tied head counted once). ``active=True`` counts what one token
        uses: all parameters except the ``num_experts - top_k`` routed experts it skips in each
        MoE layer. The router gates (``d_model * num_experts`` per MoE layer) are counted as
        active, so an MoE model has exactly that many more active parameters than its dense twin."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for layer in self.moe_layers:
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            total -= expert_params * (layer.num_experts - layer.top_k) // layer.num_experts
        return total

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Extend ``idx [B, S]`` by ``max_new_tokens`` sampled tokens -> ``[B, S + max_new_tokens]``.

        The context is cropped to the last ``block_size`` tokens. ``temperature=0`` is greedy
        decoding; ``top_k`` keeps only the k most likely tokens; ``generator`` makes sampling
        reproducible (it must live on the model's device). ``use_cache`` decodes with a KV cache
        (see :meth:`extend`); the outputs are those of the uncached loop.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            if use_cache:
                logits, cache = self.extend(idx, cache)
            else:
                logits = self(idx[:, -self.config.block_size :]).logits[:, -1]
            logits = logits.float()  # [B, V]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights (tied head stored once), the config and a SHA-256 of the weights
        as safetensors metadata, atomically (temp file + rename; stale temps of earlier killed
        saves are removed)."""
        state = {name: t for name, t in self.state_dict().items() if name != "lm_head.weight"}
        metadata = {
            _CONFIG_KEY: json.dumps(self.config.to_dict()),
            _DIGEST_KEY: tensor_digest(state),
        }
        with atomic_output(path) as tmp:
            save_model(self, str(tmp), metadata=metadata)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        map_location: str | torch.device = "cpu",
        verify: bool = True,
    ) -> PiMoELM:
        """Rebuild a model written by :meth:`save`; ``ValueError`` if the file is not one.

        The tensors' declared shapes are checked against the stored config before anything is
        allocated (a crafted header cannot make it allocate more than the file holds), and with
        ``verify`` the weights' SHA-256 and finiteness are checked after loading.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        try:
            metadata, _ = read_safetensors_header(path)
            config = LMConfig.from_dict(json.loads(metadata[_CONFIG_KEY]))
        except KeyError:
            raise ValueError(
                f"{path}: no {_CONFIG_KEY!r} entry in the safetensors metadata"
            ) from None
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            if str(err).startswith(str(path)):
                raise
            raise ValueError(f"{path}: invalid {_CONFIG_KEY!r} metadata ({err})") from err
        with torch.device("meta"):
            expected = {name: t.shape for name, t in cls(config).state_dict().items()}
        check_safetensors_shapes(
            path, expected, may_be_missing=("lm_head.weight", "tok_emb.weight")
        )  # tied: one is stored
        model = cls(config).to(map_location)
        try:
            load_model(model, str(path), strict=True, device=str(map_location))
        except (SafetensorError, RuntimeError) as err:
            raise ValueError(f"{path}: weights do not match the stored config ({err})") from err
        if verify:
            state = {name: t for name, t in model.state_dict().items() if name != "lm_head.weight"}
            if _DIGEST_KEY in metadata and tensor_digest(state) != metadata[_DIGEST_KEY]:
                raise ValueError(
                    f"{path}: the weights do not match their stored SHA-256 (corrupt or tampered file)"
                )
            bad = [
                name
                for name, t in state.items()
                if t.is_floating_point() and not torch.isfinite(t).all()
            ]
            if bad:
                raise ValueError(f"{path}: non-finite weights in {bad[:3]}")
        return model
